"""How runs are executed (device, numeric type, cache, decoding workers, the runtime of the frozen layers)
and the sizes a cache budget is checked in."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transferlab.core.errors import ConfigError
from transferlab.core.fields import option
from transferlab.features.runtimes import RUNTIMES

if TYPE_CHECKING:
    from transferlab.features.cache import FeatureCache


@dataclass(frozen=True)
class EngineConfig:
    """How runs are executed; none of these change the numbers on CPU."""

    device: str = option("auto", "auto | cpu | cuda")
    dtype: str = option("float32", "numeric type of the model: float32, or float64 for reference checks", choices=("float32", "float64"))
    use_cache: bool = option(True, "run the frozen backbone on every image every epoch", flag="--no-cache", invert=True)
    cache_dir: str | None = option(None, "feature cache folder (default: OUT/cache)")
    cache_max_gb: float = option(32.0, "largest activation cache to write (on disk; larger ones run uncached): "
                                 "features, fine-tuning cuts and view sets")
    cache_ram_gb: float | None = option(None, "largest split of cached inputs to load into memory; a larger one stays "
                                        "in memory-mapped shards on disk, streamed batch by batch (default: a quarter of RAM)")
    cache_shard_mb: float = option(64.0, "size of one cache shard file: the unit of streaming, resuming and "
                                   "distributed extraction")
    num_workers: int | None = option(None, "image decoding worker processes, 0: in this process (default: on CPU, threads "
                                     "of this process taking turns with the model; on CUDA min(4, cores))", flag="--workers")
    progress: bool = option(True, "no progress bars", flag="--no-progress", invert=True)
    runtime: str = option("auto", "what runs the frozen layers: auto (OpenVINO, else ONNX Runtime, else PyTorch on CPU; "
                          "PyTorch on CUDA), torch, compile, onnxruntime, openvino", choices=RUNTIMES)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A ConfigError naming the field for a value that cannot work (checked on construction)."""
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 0):
            raise ConfigError("num_workers", self.num_workers, "must be 0 (decode in this process) or a positive number of workers")
        if isinstance(self.cache_max_gb, bool) or not isinstance(self.cache_max_gb, (int, float)) \
                or not math.isfinite(self.cache_max_gb) or self.cache_max_gb < 0:
            raise ConfigError("cache_max_gb", self.cache_max_gb, "must be a finite number of GB, 0 or more")
        if self.cache_ram_gb is not None and (isinstance(self.cache_ram_gb, bool) or not isinstance(self.cache_ram_gb, (int, float))
                                              or not math.isfinite(self.cache_ram_gb) or self.cache_ram_gb < 0):
            raise ConfigError("cache_ram_gb", self.cache_ram_gb, "must be a finite number of GB, 0 or more")
        if isinstance(self.cache_shard_mb, bool) or not isinstance(self.cache_shard_mb, (int, float)) \
                or not math.isfinite(self.cache_shard_mb) or self.cache_shard_mb <= 0:
            raise ConfigError("cache_shard_mb", self.cache_shard_mb, "must be a positive number of MB")

    def feature_cache(self, directory: str | os.PathLike | None) -> FeatureCache:
        """The feature cache in `directory` (None: in memory only) with this engine's memory and shard sizes."""
        from transferlab.features.cache import FeatureCache

        ram = None if self.cache_ram_gb is None else self.cache_ram_gb * 1e9
        return FeatureCache(directory, ram_bytes=ram, shard_bytes=self.cache_shard_mb * 1e6)


def size_text(n_bytes: float) -> str:
    """`n_bytes` in kB, MB or GB with 3 significant digits, rounded up: a size said to exceed a limit does."""
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0)) if n_bytes >= s or s == 1.0)
    x = n_bytes / scale
    if unit == "B":
        return f"{math.ceil(x)} B"
    digits = 2 - math.floor(math.log10(x))  # decimals that leave 3 significant digits
    step = 10.0 ** -digits
    return f"{math.ceil(x / step) * step:.{max(0, digits)}f} {unit}"


def over_budget(need: float, max_gb: float, what: str = "") -> str:
    """'31.3 MB{what} > --cache-max-gb 0.02 (20 MB)': both sides in one unit, the need rounded up."""
    shown = size_text(need)
    unit = shown.split()[1]
    scale = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1.0}[unit]
    return f"{shown}{what} > --cache-max-gb {max_gb:g} ({max_gb * 1e9 / scale:g} {unit})"

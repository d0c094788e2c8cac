"""Where tensors live: resolving ``--device`` and the numeric type runs compute in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transferlab.core.errors import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError("device", device, "expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", device, "no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


@dataclass(frozen=True)
class Placement:
    """The device and dtype of a model: every tensor fed to it is moved here first.

    Creating an input with ``torch.zeros(...)`` (CPU, float32) and feeding it to a model that lives
    elsewhere is the bug class this guards against; float64 on CPU exercises the same paths in CI.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, device: str, dtype: str = "float32") -> Placement:
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, f"expected one of {', '.join(DTYPES)}")
        return cls(resolve_device(device), DTYPES[dtype])

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on this device; floating tensors also in this dtype, image-shaped ones (N, C, H, W) channels_last
        as the models are (convolutions run 1.5-2.5x faster so on CPU and on CUDA)."""
        if x.is_floating_point():
            x = x.to(self.device, self.dtype, non_blocking=True)
            return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        return x.to(self.device, non_blocking=True)

    def store(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on this device (floating tensors in this dtype), in its own layout: for data kept whole, whose
        batches go through :meth:`put`."""
        return x.to(self.device, self.dtype, non_blocking=True) if x.is_floating_point() else x.to(self.device, non_blocking=True)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (a process-wide setting; True where applied).

    By default every tensor above the mmap threshold (32 MB at most; a training step's activations are
    larger) is returned to the OS when freed and page-faulted back, zeroed, at the next allocation: on
    this CPU a whole-network training step of EfficientNet-Lite0 spent a fifth of its time in those
    faults (2 million per 4 steps) and ran 1.75x slower. Raising the mmap and trim thresholds keeps the
    pages; peak memory is unchanged, the process just holds it. A no-op off glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))

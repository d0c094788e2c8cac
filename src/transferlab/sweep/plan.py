"""A sweep's runs before they execute: the identity (hash) of each run, the runs each phase plans, and
the plan and time left as the sweep says them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transferlab.core.fields import identity
from transferlab.core.hashing import stable_hash
from transferlab.data import DataConfig
from transferlab.features.engine import EngineConfig
from transferlab.models.freezing import layers_of_last_blocks
from transferlab.sweep.config import SweepConfig
from transferlab.sweep.ledger import Method
from transferlab.train.config import TrainConfig


def numerics_identity(engine: EngineConfig) -> dict:
    """What of the engine changes a run's numbers: device type, dtype and the runtime of the frozen layers
    (name, version, precision). Not: workers, progress bars, cache folders, the executor."""
    from transferlab.core.devices import Placement
    from transferlab.features.runtimes import planned_runner

    placement = Placement.of(engine.device, engine.dtype)
    runner = planned_runner(engine.runtime, placement)
    return {"device": placement.device.type, "dtype": engine.dtype, "runtime": [runner.name, runner.version, runner.precision],
            "cached": engine.use_cache}


def run_hash(method: Method, backbone: str, weights_digest: str, data_digest: str, data: DataConfig,
             train: TrainConfig, k: int, start: str | None = None, numerics: dict | None = None) -> str:
    """Identity of one run: everything that changes its numbers (the images and the numerics too)."""
    return stable_hash(
        {"method": method, "backbone": backbone, "weights": weights_digest, "images": data_digest,
         "data": dataclasses.asdict(data), "train": identity(train), "n_trainable_layers": k, "start": start,
         "numerics": numerics or {}},
        length=20,
    )


def ft_layer_counts(cfg: SweepConfig, backbone) -> dict[str, int]:
    """{unit text ("blocks:2", "layers:3"): number of trainable layers} of the fine-tuning grid on `backbone`."""
    return {f"{unit}:{n}": (layers_of_last_blocks(backbone, n) if unit == "blocks" else int(n)) for unit, n in cfg.ft_units()}


@dataclass(frozen=True)
class PlannedRun:
    """One run of a phase: its ledger hash, its training config and how many layers it trains."""

    hash: str
    cfg: TrainConfig
    k: int
    unit: str = "layers:1"  # what the grid said: "layers:k" or "blocks:N"


@dataclass(frozen=True)
class PhasePlan:
    """How many runs a phase of one backbone plans and how many the ledger already holds finished
    (`done` None: not known yet, as for LP-FT before its probe is chosen)."""

    method: Method
    total: int
    done: int | None

    @property
    def to_run(self) -> int:
        """Runs left to execute (all of them while `done` is unknown)."""
        return self.total - (self.done or 0)

    def text(self) -> str:
        """'LP 8 runs (8 done, 0 to run)'; 'LP-FT 2 runs (after the probe is chosen)'."""
        counts = "after the probe is chosen" if self.done is None else f"{self.done} done, {self.to_run} to run"
        return f"{self.method} {self.total} run{'s' if self.total != 1 else ''} ({counts})"


def plan_line(backbone: str, phases: list[PhasePlan]) -> str:
    """One backbone's line of the plan: 'efficientnet_lite0: LP 8 runs (8 done, 0 to run), LP-FT 2 runs (...)'."""
    return f"{backbone}: " + ", ".join(p.text() for p in phases)


def progress_desc(backbone: str, method: Method) -> str:
    """The progress bar's description while a phase runs: 'efficientnet_lite0 LP'."""
    return f"{backbone} {method}"


def time_left_text(elapsed_s: float, runs_executed: int, runs_left: int) -> str | None:
    """A rough time left, from the elapsed time per executed run so far ('about 3 min left'); None without
    an executed run to measure by or with nothing left to run."""
    if runs_executed <= 0 or runs_left <= 0:
        return None
    seconds = elapsed_s / runs_executed * runs_left
    if seconds < 60:
        return "under a minute left"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"

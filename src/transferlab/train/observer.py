"""What a run tells whoever watches it: it starts, each epoch ends, it ends, its model is tested.

`probe` and `sweep` accept observers; their progress bars and the sweep's ledger are observers too, and an
experiment tracker is one more. Events are plain picklable values, so epochs of runs executing in
worker processes or Ray tasks reach the coordinator's observers the same way (see ``sweep.executors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transferlab.train.config import TrainConfig
from transferlab.train.results import EpochRecord, FitResult


@dataclass(frozen=True)
class RunInfo:
    """One run as observers see it: `run_id` is the sweep's run hash (a probe's output folder)."""

    run_id: str
    backbone: str
    method: str  # "LP", "LP-FT", or "probe" for `transferlab probe`
    config: TrainConfig
    n_trainable_layers: int
    unit: str = "layers:1"


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: its status (done, diverged or failed), its numbers, or the error that failed it."""

    status: str
    metrics: dict[str, Any]
    error: str | None = None
    result: FitResult | None = field(default=None, repr=False)  # the history and trained state (in the coordinator)


class RunObserver:
    """Receives the events of runs; every method does nothing unless overridden."""

    def run_start(self, run: RunInfo) -> None:
        """`run` is about to execute (a sweep: submitted to its executor)."""

    def epoch(self, run_id: str, record: EpochRecord) -> None:
        """An epoch of run `run_id` ended (epoch 0: before any update)."""

    def run_end(self, run_id: str, end: RunEnd) -> None:
        """Run `run_id` ended."""

    def test(self, run_id: str, accuracy: float) -> None:
        """The chosen run `run_id` was evaluated on the test split (once)."""


class Observers(RunObserver):
    """Several observers as one, each event passed to each in order."""

    def __init__(self, observers: Sequence[RunObserver] = ()):
        self.observers = list(observers)

    def run_start(self, run: RunInfo) -> None:
        for o in self.observers:
            o.run_start(run)

    def epoch(self, run_id: str, record: EpochRecord) -> None:
        for o in self.observers:
            o.epoch(run_id, record)

    def run_end(self, run_id: str, end: RunEnd) -> None:
        for o in self.observers:
            o.run_end(run_id, end)

    def test(self, run_id: str, accuracy: float) -> None:
        for o in self.observers:
            o.test(run_id, accuracy)

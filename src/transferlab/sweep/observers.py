"""The sweep's own observers: the ledger recording every run, and the progress bar."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from tqdm.auto import tqdm

from transferlab.sweep.ledger import Ledger, Method
from transferlab.sweep.store import save_params
from transferlab.train.observer import RunEnd, RunInfo, RunObserver
from transferlab.train.results import EpochRecord


class LedgerRecorder(RunObserver):
    """Writes each run's row: running when it starts; done, diverged or failed with its numbers when it ends
    (its parameters saved first, so a 'done' row always has its file); the one test evaluation of a choice."""

    def __init__(self, ledger: Ledger, out: Path):
        self.ledger, self.out = ledger, out

    def run_start(self, run: RunInfo) -> None:
        method = typing.cast(Method, run.method)
        self.ledger.mark_running(run.run_id, run.backbone, method, dataclasses.asdict(run.config))

    def run_end(self, run_id: str, end: RunEnd) -> None:
        if end.error is not None or end.result is None:
            self.ledger.fail(run_id, end.error or "no result")
            return
        save_params(self.out, run_id, end.result.best_state)
        self.ledger.finish(run_id, "diverged" if end.status == "diverged" else "done", end.metrics,
                           list(end.result.history), {"train_loop_s": end.result.train_seconds,
                                                      "train_step_s": end.result.step_seconds,
                                                      "images_trained": end.result.images_trained})

    def test(self, run_id: str, accuracy: float) -> None:
        self.ledger.record_test(run_id, accuracy)


class SweepProgress(RunObserver):
    """One bar over every run of the sweep: finished runs count, the latest epoch's numbers show beside it."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="runs", unit="run", disable=not enabled)

    def phase(self, text: str, already_done: int) -> None:
        """A phase starts ('efficientnet_lite0 LP'); `already_done` of its runs were finished before."""
        self.bar.set_description(text)
        self.bar.update(already_done)

    def epoch(self, run_id: str, record: EpochRecord) -> None:
        self.bar.set_postfix(val_xent=f"{record['val_xent']:.4f}", val_err=f"{record['val_err']:.3f}")

    def run_end(self, run_id: str, end: RunEnd) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

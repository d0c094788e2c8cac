"""The one early-stopping rule of every run, a single ``fit`` or a head of a batched probe pass.

After every epoch: a run whose metrics are not finite, or whose epoch-average train cross-entropy
exceeds :func:`divergence_threshold`, has diverged and stops; else a strict improvement of the
selection key (``selection_key``: the criterion, ties broken by the other metric) makes the epoch the
best one; `patience` epochs without one stop the run."""

from __future__ import annotations

import math

from transferlab.train.config import selection_key
from transferlab.train.results import EpochRecord, RunStatus

# A run has blown up (e.g. lr=100 with Adam), even before any value is inf or NaN, when its
# epoch-average train cross-entropy exceeds this multiple of ln(n_classes), the cross-entropy of a
# uniform guess. One reference for every phase: a probe's untrained head and a fine-tuning run's
# start (an already good probe) would otherwise judge the same numbers differently.
EXPLODED_FACTOR = 100.0


def divergence_threshold(n_classes: int) -> float:
    """Train cross-entropy above which a run counts as diverged."""
    return EXPLODED_FACTOR * math.log(max(n_classes, 2))


def has_diverged(train_xent: float, val_xent: float, n_classes: int) -> bool:
    """Non-finite metrics, or a train cross-entropy above :func:`divergence_threshold`."""
    if not (math.isfinite(train_xent) and math.isfinite(val_xent)):
        return True
    return train_xent > divergence_threshold(n_classes)


class EarlyStopping:
    """Tracks one run's best epoch under `select` and says when it stops.

    Epoch 0 (the untrained or start state) is the first best. `first_candidate` = 1 makes epoch 1 the
    best whatever its score (a run interpolated with its start, WiSE-FT, must return a trained state;
    the start is a = 0 of the interpolation).
    """

    def __init__(self, select: str, patience: int, n_classes: int, epoch_zero: EpochRecord, first_candidate: int = 0):
        self.select, self.patience, self.n_classes, self.first_candidate = select, patience, n_classes, first_candidate
        self.best_epoch = 0
        self.best_key = selection_key(select, epoch_zero["val_xent"], epoch_zero["val_err"])
        self.since_best = 0
        self.status: RunStatus = "done"
        self.stopped = False

    def update(self, record: EpochRecord) -> bool:
        """Judge a trained epoch; True when it is the new best (the caller keeps its state)."""
        assert record["train_xent"] is not None
        if has_diverged(record["train_xent"], record["val_xent"], self.n_classes):
            self.status, self.stopped = "diverged", True
            return False
        key = selection_key(self.select, record["val_xent"], record["val_err"])
        if key < self.best_key or record["epoch"] == self.first_candidate:
            self.best_epoch, self.best_key, self.since_best = record["epoch"], key, 0
            return True
        self.since_best += 1
        self.stopped = self.since_best >= self.patience
        return False

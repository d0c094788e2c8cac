"""What a training run returns: one record per epoch and the run's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict

import torch

RunStatus = Literal["done", "diverged"]


class EpochRecord(TypedDict):
    """Metrics of one epoch; epoch 0 (before training) has no train metrics. `lr`: the head's learning rate
    at the epoch's last step (after warmup and schedule; records written before it have none)."""

    epoch: int
    train_loss: float | None
    train_xent: float | None
    train_err: float | None
    val_xent: float
    val_err: float
    lr: float | None


@dataclass
class FitResult:
    """History (one record per epoch, epoch 0 first), the chosen epoch and how the run ended."""

    history: list[EpochRecord]
    best_epoch: int
    status: RunStatus
    best_state: dict[str, torch.Tensor] = field(repr=False)  # what the run returns (after interpolation, if any)
    train_seconds: float = 0.0
    start_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the trainable state at epoch 0
    wise_alpha: float | None = None  # the chosen interpolation weight (None: not interpolated)
    wise: list[dict] = field(default_factory=list)  # {alpha, val_xent, val_err} of every interpolation tried
    step_seconds: float = 0.0  # of train_seconds, the training passes (batches and updates; not validation)
    images_trained: int = 0  # training examples the passes went through (epochs run x training images)

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch]

    @property
    def val_metrics(self) -> tuple[float, float]:
        """(val_xent, val_err) of the returned state: the interpolation chosen, else the best epoch."""
        if self.wise_alpha is not None:
            row = next(r for r in self.wise if r["alpha"] == self.wise_alpha)
            return row["val_xent"], row["val_err"]
        return self.best["val_xent"], self.best["val_err"]

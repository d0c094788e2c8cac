"""The learning rate over a run: linear warmup, then constant or a cosine decay to 0."""

from __future__ import annotations

import math

from transferlab.train.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The multiplier of every learning rate at optimiser step `step` (0-based): linear warmup over
    ``warmup_epochs``, then constant or a cosine decay reaching 0 at the end of ``epochs``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    total = max(cfg.epochs * steps_per_epoch - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))

"""The learning rate over a run: linear warmup, then constant or a cosine decay to 0; or one cycle."""

from __future__ import annotations

import math

from transferlab.train.config import TrainConfig

# torch.optim.lr_scheduler.OneCycleLR's defaults (Smith & Topin 2019, as fastai's fit_one_cycle)
ONE_CYCLE_PCT_START, ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 0.3, 25.0, 1e4


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The multiplier of every learning rate at optimiser step `step` (0-based): linear warmup over
    ``warmup_epochs``, then constant or a cosine decay reaching 0 at the end of ``epochs``; or
    ``one_cycle``, the factors of torch's ``OneCycleLR`` with its defaults over ``epochs`` (which warm up
    themselves: ``warmup_epochs`` is not used)."""
    if cfg.lr_schedule == "one_cycle":
        return one_cycle_factor(step, max(cfg.epochs * steps_per_epoch, 2))
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    total = max(cfg.epochs * steps_per_epoch - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))


def one_cycle_factor(step: int, total_steps: int) -> float:
    """OneCycleLR's lr / max_lr at `step` of `total_steps` (two phases, cosine annealing): from 1/25 up to
    1 at step ``0.3 * total - 1``, then down to 1/(25 * 1e4) at the last step."""
    start = 1.0 / ONE_CYCLE_DIV
    low = start / ONE_CYCLE_FINAL_DIV
    peak_step = float(ONE_CYCLE_PCT_START * total_steps) - 1
    last_step = total_steps - 1
    step = min(step, last_step)
    if step <= peak_step:
        a, b, pct = start, 1.0, step / peak_step if peak_step > 0 else 1.0
    else:
        a, b, pct = 1.0, low, (step - peak_step) / (last_step - peak_step)
    return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

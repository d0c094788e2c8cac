"""WiSE-FT (Wortsman et al. 2022): weight-space interpolation between a run's start and its trained state."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from transferlab.features.sources import BatchSource
from transferlab.models.freezing import load_state_strict, set_train_mode
from transferlab.train.config import selection_key
from transferlab.train.loop import evaluate
from transferlab.train.results import FitResult


def interpolate_states(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * trained`` for every floating tensor (exactly `start` at 0 and
    `trained` at 1: ``torch.lerp``); integer buffers (batch counters) are taken from `trained`."""
    return {k: torch.lerp(start[k], v, alpha) if v.is_floating_point() else v.clone() for k, v in trained.items()}


@torch.no_grad()
def wise_interpolate(model: nn.Module, net: nn.Module, val: BatchSource, result: FitResult, alphas: tuple[float, ...],
                     select: str) -> FitResult:
    """WiSE-FT (Wortsman et al. 2022): the interpolation between a run's start and its best state
    that validates best under `select` (ties: the first of `alphas`), loaded into `model`.

    Only the trainable tensors move (the frozen ones are the same in both states); ``alpha = 0`` is
    exactly the start (e.g. the probe), ``alpha = 1`` exactly the trained run.
    """
    assert result.start_state is not None
    table, chosen = [], None
    for alpha in alphas:
        state = interpolate_states(result.start_state, result.best_state, alpha)
        load_state_strict(model, state)
        set_train_mode(model, False)
        val_xent, val_err = evaluate(net, val)
        table.append({"alpha": alpha, "val_xent": val_xent, "val_err": val_err})
        key = selection_key(select, val_xent, val_err)
        if chosen is None or key < chosen[0]:
            chosen = (key, alpha, state)
    assert chosen is not None
    load_state_strict(model, chosen[2])
    return dataclasses.replace(result, best_state=chosen[2], wise_alpha=chosen[1], wise=table)

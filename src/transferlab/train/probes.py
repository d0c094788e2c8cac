"""Linear probes trained together: heads sharing a schedule train in one batched pass on cached features,
each with its own lr, l2, patience and early stopping, each reproducing what ``fit`` returns for it alone."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from transferlab.features.sources import BatchSource
from transferlab.train.config import TrainConfig
from transferlab.train.early_stopping import EarlyStopping
from transferlab.train.loop import epoch_zero
from transferlab.train.objective import Objective, stacked_loss, stacked_xent
from transferlab.train.results import EpochRecord, FitResult
from transferlab.train.schedule import lr_factor


def probe_groups(configs: list[TrainConfig]) -> list[list[int]]:
    """Indices of `configs` grouped into batched linear-probe passes (same schedule), in first-seen order.

    A head's numbers do not depend on the other heads of its group (see ``fit_linear_probes``), so
    a group may hold any subset of a grid: a resumed or extended sweep trains only what is missing.
    """
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.schedule(), []).append(i)
    return list(groups.values())


class _StackedOptimizer:
    """Adam / SGD-momentum (Nesterov or not) on stacked per-head tensors with a per-head learning rate
    (AdamW is Adam here: weight decay is the backbone's, and a probe trains only its head).

    Mirrors the arithmetic of ``torch.optim.Adam`` (single-tensor path) and ``torch.optim.SGD`` so a
    batched run reproduces the individual runs. Every operation is elementwise, so a head's update
    does not depend on the other heads.
    """

    def __init__(self, params: list[torch.Tensor], lrs: torch.Tensor, cfg: TrainConfig, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lrs, self.cfg = params, lrs, cfg
        self.betas, self.eps, self.step_count = betas, eps, 0
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    def _lr(self, p: torch.Tensor) -> torch.Tensor:
        return self.lrs.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, grads: tuple[torch.Tensor, ...]) -> None:
        self.step_count += 1
        for p, g, (m, v) in zip(self.params, grads, self.state):
            lr = self._lr(p)
            if self.cfg.optimizer == "sgd":
                if self.step_count == 1:
                    m.copy_(g)
                else:
                    m.mul_(self.cfg.momentum).add_(g)
                p.sub_(lr * (g.add(m, alpha=self.cfg.momentum) if self.cfg.nesterov else m))
                continue
            b1, b2 = self.betas
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bias1 = 1 - b1**self.step_count
            bias2_sqrt = math.sqrt(1 - b2**self.step_count)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.sub_((lr / bias1) * m / denom)


def _stacked_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(G, B, C) logits of G heads, one matmul per head.

    Every head's matmul has the same shapes whatever G is, so a head's numbers are bit-identical
    whichever other heads share the pass (one einsum over all heads is not: its blocking depends on G).
    """
    return torch.stack([torch.addmm(b, x, w.t()) for w, b in zip(weight.unbind(0), bias.unbind(0))])


def fit_linear_probes(
    heads: list[nn.Linear],
    train: BatchSource,
    val: BatchSource,
    cfgs: list[TrainConfig],
    head_name: str = "",
    on_epoch: Callable[[int, EpochRecord], None] | None = None,
) -> list[FitResult]:
    """Train several linear heads on the same cached features in one batched pass.

    The heads must share a schedule (:meth:`TrainConfig.schedule`: same minibatches); each has its
    own lr, l2 and patience, its own early stopping and divergence check. Each result is what
    :func:`fit` would return for that head alone (tested within 1e-5) and is bit-identical whatever
    other heads share the pass; the heads are left holding their best weights. `head_name` prefixes
    the keys of each ``best_state`` (e.g. ``"output"``). `on_epoch(g, record)` sees every record of head g
    (epoch 0 first), as :func:`fit`'s `on_epoch` sees its run's.
    """
    if len({c.schedule() for c in cfgs}) != 1:
        raise ValueError("batched probes must share a schedule (seed, epochs, batch size, optimizer, ...)")
    cfg0, n_heads, n_train = cfgs[0], len(cfgs), len(train)
    n_classes = heads[0].out_features
    weight = torch.stack([h.weight.detach() for h in heads]).clone().requires_grad_(True)
    bias = torch.stack([h.bias.detach() for h in heads]).clone().requires_grad_(True)
    device = weight.device
    lrs = torch.tensor([c.lr for c in cfgs], dtype=weight.dtype, device=device)
    l2_scales = [Objective(c.l2, n_train).head_l2_scale for c in cfgs]
    optimizer = _StackedOptimizer([weight, bias], lrs, cfg0)
    order_gen = torch.Generator().manual_seed(cfg0.seed)
    prefix = f"{head_name}." if head_name else ""

    def val_metrics() -> tuple[list[float], list[float]]:
        with torch.no_grad():
            xent_sum = torch.zeros(n_heads, device=device)
            wrong = torch.zeros(n_heads, dtype=torch.long, device=device)
            for x, y in val.batches(torch.arange(len(val)), 512):
                logits = _stacked_logits(weight, bias, x)
                xent_sum += stacked_xent(logits, y) * len(y)
                wrong += (logits.argmax(2) != y).sum(1)
            return (xent_sum / len(val)).tolist(), (wrong.double() / len(val)).tolist()

    def snapshot(g: int) -> dict[str, torch.Tensor]:
        return {prefix + "weight": weight[g].detach().clone(), prefix + "bias": bias[g].detach().clone()}

    vx, ve = val_metrics()
    histories = [[epoch_zero(vx[g], ve[g])] for g in range(n_heads)]
    stopping = [EarlyStopping(c.select, c.patience, n_classes, h[0]) for c, h in zip(cfgs, histories)]
    step, steps_per_epoch = 0, math.ceil(n_train / cfg0.batch_size)
    best_state = [snapshot(g) for g in range(n_heads)]
    if on_epoch:
        for g in range(n_heads):
            on_epoch(g, histories[g][0])
    start = time.perf_counter()
    for epoch in range(1, cfg0.epochs + 1):
        if all(s.stopped for s in stopping):
            break
        loss_sum = torch.zeros(n_heads, device=device)
        xent_sum = torch.zeros(n_heads, device=device)
        wrong = torch.zeros(n_heads, dtype=torch.long, device=device)
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg0.batch_size):
            factor = lr_factor(cfg0, step, steps_per_epoch)
            optimizer.lrs = lrs if factor == 1.0 else lrs * factor
            logits = _stacked_logits(weight, bias, x)
            loss, xent = stacked_loss(logits, y, weight, l2_scales, cfg0.label_smoothing)
            grads = torch.autograd.grad(loss.sum(), [weight, bias])
            optimizer.step(grads)
            step += 1
            b = len(y)
            loss_sum += loss.detach() * b
            xent_sum += xent.detach() * b
            wrong += (logits.detach().argmax(2) != y).sum(1)
        vx, ve = val_metrics()
        tl, tx, te = (loss_sum / n_train).tolist(), (xent_sum / n_train).tolist(), (wrong.double() / n_train).tolist()
        for g in range(n_heads):
            if stopping[g].stopped:
                continue
            record = EpochRecord(epoch=epoch, train_loss=tl[g], train_xent=tx[g], train_err=te[g], val_xent=vx[g], val_err=ve[g],
                                 lr=cfgs[g].lr * factor)
            histories[g].append(record)
            if stopping[g].update(record):
                best_state[g] = snapshot(g)
            if on_epoch:
                on_epoch(g, record)
    seconds = (time.perf_counter() - start) / n_heads
    results = []
    for g, head in enumerate(heads):
        with torch.no_grad():
            head.weight.copy_(best_state[g][prefix + "weight"])
            head.bias.copy_(best_state[g][prefix + "bias"])
        results.append(FitResult(histories[g], stopping[g].best_epoch, stopping[g].status, best_state[g], seconds))
    return results

"""One training run: minibatch Adam (or SGD) with early stopping on validation cross-entropy.

The loss is the :class:`~transferlab.objective.Objective`. Epoch 0 evaluates the untrained model on
validation before any update. After every epoch the validation cross-entropy decides: a strict
improvement keeps a copy of the trainable state in memory; `patience` epochs without one stop
training; the best state is restored at the end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from .freezing import load_state_strict, set_train_mode, trainable_parameters, trainable_state
from .objective import Objective, stacked_loss, stacked_xent
from .sources import BatchSource
from .utils import ConfigError, UserError, option

# A run has blown up (e.g. lr=100 with Adam), even before any value is inf or NaN, when its
# epoch-average train cross-entropy exceeds this multiple of ln(n_classes), the cross-entropy of a
# uniform guess. One reference for every phase: a probe's untrained head and a fine-tuning run's
# start (an already good probe) would otherwise judge the same numbers differently.
EXPLODED_FACTOR = 100.0

RunStatus = Literal["done", "diverged"]


def divergence_threshold(n_classes: int) -> float:
    """Train cross-entropy above which a run counts as diverged."""
    return EXPLODED_FACTOR * math.log(max(n_classes, 2))


def has_diverged(train_xent: float, val_xent: float, n_classes: int) -> bool:
    """Non-finite metrics, or a train cross-entropy above :func:`divergence_threshold`."""
    if not (math.isfinite(train_xent) and math.isfinite(val_xent)):
        return True
    return train_xent > divergence_threshold(n_classes)


class EpochRecord(TypedDict):
    """Metrics of one epoch; epoch 0 (before training) has no train metrics."""

    epoch: int
    train_loss: float | None
    train_xent: float | None
    train_err: float | None
    val_xent: float
    val_err: float


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (saved beside every run)."""

    lr: float = option(1e-3, "learning rate")
    l2: float = option(0.0, "loss = mean xent + (l2 / n_train) * sum(W_head^2)")
    seed: int = option(0, "head init and batch order")
    epochs: int = option(100, "maximum number of epochs")
    patience: int = option(15, "epochs without a val xent improvement before stopping")
    batch_size: int = option(64, "minibatch size")
    optimizer: str = option("adam", "adam, or sgd with momentum", choices=("adam", "sgd"))
    momentum: float = option(0.9, "SGD momentum")
    # Trainable batch-norm layers: False keeps normalising with the pretrained running statistics
    # (small target sets give noisy batch statistics, and switching a probe's features to them
    # shifts what the head was trained on); True uses and updates batch statistics.
    train_bn: bool = option(False, "trainable batch-norm layers use batch statistics (default: pretrained running statistics)")
    augment: bool = option(False, "random resized crops and flips of training images (runs the backbone every epoch)")
    label_smoothing: float = option(0.0, "cross-entropy against labels smoothed by this much (0: plain)")
    l2sp: float = option(0.0, "L2-SP: + l2sp * sum ||w - w_pretrained||^2 over the fine-tuned backbone tensors (the head keeps --l2)")
    layer_order: str = option("forward", "which layers are 'the last k': in the order a forward pass runs them, or by "
                              "parameter definition (the course's rule)", choices=("forward", "definition"))

    def validate(self) -> None:
        """ConfigError naming the field for values that cannot train."""
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a positive number"),
            (math.isfinite(self.l2) and self.l2 >= 0, "l2", self.l2, "must be zero or positive"),
            (self.epochs >= 0, "epochs", self.epochs, "must be zero or positive"),
            (self.patience >= 1, "patience", self.patience, "must be at least 1"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1"),
            (self.optimizer in ("adam", "sgd"), "optimizer", self.optimizer, "expected adam or sgd"),
            (self.layer_order in ("forward", "definition"), "layer_order", self.layer_order, "expected forward or definition"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "must be in [0, 1)"),
            (math.isfinite(self.l2sp) and self.l2sp >= 0, "l2sp", self.l2sp, "must be zero or positive"),
        ]
        for ok, name, value, reason in checks:
            if not ok:
                raise ConfigError(name, value, reason)

    def schedule(self) -> tuple:
        """Everything but lr, l2 and patience: runs that share it see identical minibatches."""
        return tuple(v for k, v in dataclasses.asdict(self).items() if k not in ("lr", "l2", "patience"))


def probe_groups(configs: list[TrainConfig]) -> list[list[int]]:
    """Indices of `configs` grouped into batched linear-probe passes (same schedule), in first-seen order.

    A head's numbers do not depend on the other heads of its group (see ``fit_linear_probes``), so
    a group may hold any subset of a grid: a resumed or extended sweep trains only what is missing.
    """
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.schedule(), []).append(i)
    return list(groups.values())


@dataclass
class FitResult:
    """History (one record per epoch, epoch 0 first), the chosen epoch and how the run ended."""

    history: list[EpochRecord]
    best_epoch: int
    status: RunStatus
    best_state: dict[str, torch.Tensor] = field(repr=False)
    train_seconds: float = 0.0

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=cfg.lr)


@torch.no_grad()
def evaluate(net: nn.Module, source: BatchSource, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, error rate) of `net` on `source`, in eval mode, in the source's order."""
    xent_sum, wrong, n = 0.0, 0, 0
    order = torch.arange(len(source))
    for x, y in source.batches(order, batch_size):
        logits = net(x)
        xent_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        wrong += (logits.argmax(1) != y).sum().item()
        n += len(y)
    return xent_sum / n, wrong / n


@torch.no_grad()
def predict_proba(net: nn.Module, source: BatchSource, batch_size: int = 512) -> torch.Tensor:
    """Softmax probabilities (N, C), float64 on CPU, in the source's order."""
    order = torch.arange(len(source))
    return torch.cat([torch.softmax(net(x).double(), 1).cpu() for x, _y in source.batches(order, batch_size)])


def _epoch_zero(val_xent: float, val_err: float) -> EpochRecord:
    return EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=val_xent, val_err=val_err)


def fit(
    model: nn.Module,
    net: nn.Module,
    head: nn.Linear,
    train: BatchSource,
    val: BatchSource,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    pretrained: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train `model`'s trainable parameters; `net` maps a source's inputs to logits.

    `pretrained` holds the pretrained values of the fine-tuned backbone tensors (by parameter name),
    the anchors of the L2-SP term when ``cfg.l2sp`` > 0.

    `net` is either the whole model (images in) or the suffix of its chain after a cache (cached
    activations in); the modules are shared, so both paths train the same parameters. The batch
    order comes from a generator seeded with ``cfg.seed``, identically in both paths.
    """
    if len(train) == 0 or len(val) == 0:
        raise UserError("training and validation splits must both hold at least one image")
    optimizer = make_optimizer(list(trainable_parameters(model).values()), cfg)
    objective = Objective(cfg.l2, len(train), cfg.label_smoothing, cfg.l2sp)
    named = trainable_parameters(model)
    anchors: list[tuple[torch.Tensor, torch.Tensor]] | None = (
        [(named[n], w0) for n, w0 in (pretrained or {}).items() if n in named] if cfg.l2sp else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_train, n_classes = len(train), head.out_features

    set_train_mode(model, False)
    history = [_epoch_zero(*evaluate(net, val))]
    best_epoch, best_xent, best_state = 0, history[0]["val_xent"], trainable_state(model)
    status: RunStatus = "done"
    since_best = 0
    if on_epoch:
        on_epoch(history[-1])
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(model, True, cfg.train_bn)
        loss_sum = xent_sum = 0.0
        wrong = 0
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg.batch_size):
            logits = net(x)
            loss, xent = objective.loss(logits, y, head.weight, anchors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            b = len(y)
            loss_sum += loss.item() * b
            xent_sum += xent.item() * b
            wrong += (logits.detach().argmax(1) != y).sum().item()
        set_train_mode(model, False)
        val_xent, val_err = evaluate(net, val)
        record = EpochRecord(epoch=epoch, train_loss=loss_sum / n_train, train_xent=xent_sum / n_train,
                             train_err=wrong / n_train, val_xent=val_xent, val_err=val_err)
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if has_diverged(xent_sum / n_train, val_xent, n_classes):
            status = "diverged"
            break
        if val_xent < best_xent:
            best_epoch, best_xent, best_state, since_best = epoch, val_xent, trainable_state(model), 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    train_seconds = time.perf_counter() - start
    load_state_strict(model, best_state)
    set_train_mode(model, False)
    return FitResult(history, best_epoch, status, best_state, train_seconds)


class _StackedOptimizer:
    """Adam / SGD-momentum on stacked per-head tensors with a per-head learning rate.

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
                p.sub_(lr * m)
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
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[FitResult]:
    """Train several linear heads on the same cached features in one batched pass.

    The heads must share a schedule (:meth:`TrainConfig.schedule`: same minibatches); each has its
    own lr, l2 and patience, its own early stopping and divergence check. Each result is what
    :func:`fit` would return for that head alone (tested within 1e-5) and is bit-identical whatever
    other heads share the pass; the heads are left holding their best weights. `head_name` prefixes
    the keys of each ``best_state`` (e.g. ``"output"``).
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
    histories = [[_epoch_zero(vx[g], ve[g])] for g in range(n_heads)]
    best_epoch, best_xent = [0] * n_heads, list(vx)
    best_state = [snapshot(g) for g in range(n_heads)]
    since_best, active = [0] * n_heads, [True] * n_heads
    status: list[RunStatus] = ["done"] * n_heads
    start = time.perf_counter()
    for epoch in range(1, cfg0.epochs + 1):
        if not any(active):
            break
        loss_sum = torch.zeros(n_heads, device=device)
        xent_sum = torch.zeros(n_heads, device=device)
        wrong = torch.zeros(n_heads, dtype=torch.long, device=device)
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg0.batch_size):
            logits = _stacked_logits(weight, bias, x)
            loss, xent = stacked_loss(logits, y, weight, l2_scales, cfg0.label_smoothing)
            grads = torch.autograd.grad(loss.sum(), [weight, bias])
            optimizer.step(grads)
            b = len(y)
            loss_sum += loss.detach() * b
            xent_sum += xent.detach() * b
            wrong += (logits.detach().argmax(2) != y).sum(1)
        vx, ve = val_metrics()
        tl, tx, te = (loss_sum / n_train).tolist(), (xent_sum / n_train).tolist(), (wrong.double() / n_train).tolist()
        for g in range(n_heads):
            if not active[g]:
                continue
            histories[g].append(EpochRecord(epoch=epoch, train_loss=tl[g], train_xent=tx[g], train_err=te[g],
                                            val_xent=vx[g], val_err=ve[g]))
            if has_diverged(tx[g], vx[g], n_classes):
                status[g], active[g] = "diverged", False
            elif vx[g] < best_xent[g]:
                best_epoch[g], best_xent[g], best_state[g], since_best[g] = epoch, vx[g], snapshot(g), 0
            else:
                since_best[g] += 1
                active[g] = since_best[g] < cfgs[g].patience
        if on_epoch:
            on_epoch(EpochRecord(epoch=epoch, train_loss=None, train_xent=min(tx), train_err=min(te),
                                 val_xent=min(vx), val_err=min(ve)))
    seconds = (time.perf_counter() - start) / n_heads
    results = []
    for g, head in enumerate(heads):
        with torch.no_grad():
            head.weight.copy_(best_state[g][prefix + "weight"])
            head.bias.copy_(best_state[g][prefix + "bias"])
        results.append(FitResult(histories[g], best_epoch[g], status[g], best_state[g], seconds))
    return results

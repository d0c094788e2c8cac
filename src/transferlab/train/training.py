"""One training run: minibatch Adam (or SGD) with early stopping on a validation criterion.

The loss is the :class:`~transferlab.objective.Objective`. Epoch 0 evaluates the untrained model on
validation before any update. After every epoch the selection criterion (``--select``: validation
cross-entropy, ties broken by validation error, or the reverse) decides: a strict improvement keeps a
copy of the trainable state in memory; `patience` epochs without one stop training; the best state is
restored at the end. A run that started from another run's state (LP-then-FT) can then be
interpolated in weight space with its start (WiSE-FT, :func:`wise_interpolate`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.fields import option
from transferlab.features.sources import BatchSource
from transferlab.models.freezing import load_state_strict, set_train_mode, trainable_parameters, trainable_state
from transferlab.train.objective import Objective, stacked_loss, stacked_xent

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
    feature_augment: str = option("none", "augmentation on the cached path: none, views:K (K seeded crop+flip views of "
                                  "every training image cached through the frozen part, one drawn per image each "
                                  "epoch) or map (random crops and flips of cached spatial maps)", flag="--ft-augment")
    augment_min_scale: float = option(0.35, "smallest random crop, as a fraction of the image (or map) area")
    backbone_lr_mult: float = option(1.0, "trainable backbone layers learn at lr times this (the head at lr)",
                                     flag="--ft-backbone-lr-mult")
    lr_schedule: str = option("constant", "learning rate over the run: constant, or cosine decay to 0 over --epochs",
                              choices=("constant", "cosine"))
    warmup_epochs: int = option(0, "linear learning-rate warmup from 0 over this many epochs")
    select: str = option("val_xent", "what early stopping (and a sweep's choices) minimise: val_xent or val_err, "
                         "ties broken by the other", choices=("val_xent", "val_err"))
    wise_alphas: tuple[float, ...] = option((), "after a run that starts from another run (LP-then-FT): weight "
                                            "interpolations (1-a)*start + a*trained to try on validation (WiSE-FT)",
                                            flag="--wise")
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
            (parse_feature_augment(self.feature_augment) is not None, "feature_augment", self.feature_augment,
             "expected none, map or views:K with K >= 1"),
            (0.0 < self.augment_min_scale <= 1.0, "augment_min_scale", self.augment_min_scale, "must be in (0, 1]"),
            (math.isfinite(self.backbone_lr_mult) and self.backbone_lr_mult >= 0, "backbone_lr_mult",
             self.backbone_lr_mult, "must be zero or positive"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule", self.lr_schedule, "expected constant or cosine"),
            (0 <= self.warmup_epochs <= max(self.epochs, 0), "warmup_epochs", self.warmup_epochs, "must be in [0, epochs]"),
            (self.select in ("val_xent", "val_err"), "select", self.select, "expected val_xent or val_err"),
            (not (self.augment and self.feature_augment != "none"), "feature_augment", self.feature_augment,
             "cannot be combined with --augment (which already shows new views every epoch)"),
            (all(0.0 <= a <= 1.0 for a in self.wise_alphas), "wise_alphas", ",".join(map(str, self.wise_alphas)),
             "every a must be in [0, 1]"),
        ]
        for ok, name, value, reason in checks:
            if not ok:
                raise ConfigError(name, value, reason)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from its ``dataclasses.asdict`` form read back from JSON (lists become tuples again)."""
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)

    def schedule(self) -> tuple:
        """Everything but lr, l2 and patience: runs that share it see identical minibatches."""
        return tuple(v for k, v in dataclasses.asdict(self).items() if k not in ("lr", "l2", "patience"))


def parse_feature_augment(text: str) -> tuple[str, int] | None:
    """("none", 0), ("map", 0) or ("views", K) from a --ft-augment value; None if it is not one."""
    if text in ("none", "map"):
        return text, 0
    kind, _, k = text.partition(":")
    if kind == "views" and k.isdigit() and int(k) >= 1:
        return "views", int(k)
    return None


def selection_key(select: str, val_xent: float, val_err: float) -> tuple[float, float]:
    """What is minimised to choose an epoch, a configuration or an interpolation: the criterion, then the other."""
    return (val_err, val_xent) if select == "val_err" else (val_xent, val_err)


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
    best_state: dict[str, torch.Tensor] = field(repr=False)  # what the run returns (after interpolation, if any)
    train_seconds: float = 0.0
    start_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the trainable state at epoch 0
    wise_alpha: float | None = None  # the chosen interpolation weight (None: not interpolated)
    wise: list[dict] = field(default_factory=list)  # {alpha, val_xent, val_err} of every interpolation tried

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


def make_optimizer(model: nn.Module, head: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD over `model`'s trainable parameters: the head at ``cfg.lr``, the backbone's at
    ``cfg.lr * cfg.backbone_lr_mult``. Each group remembers its ``base_lr`` for the schedule."""
    head_ids = {id(p) for p in head.parameters()}
    params = list(trainable_parameters(model).values())
    groups = [{"params": [p for p in params if id(p) in head_ids], "base_lr": cfg.lr},
              {"params": [p for p in params if id(p) not in head_ids], "base_lr": cfg.lr * cfg.backbone_lr_mult}]
    groups = [dict(g, lr=g["base_lr"]) for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


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
    first_candidate: int = 0,
) -> FitResult:
    """Train `model`'s trainable parameters; `net` maps a source's inputs to logits.

    The best epoch is chosen among epochs >= `first_candidate` (when any ran): 1 makes a run that
    will be interpolated with its start (WiSE-FT) return a trained state, the start being a = 0.

    `pretrained` holds the pretrained values of the fine-tuned backbone tensors (by parameter name),
    the anchors of the L2-SP term when ``cfg.l2sp`` > 0.

    `net` is either the whole model (images in) or the suffix of its chain after a cache (cached
    activations in); the modules are shared, so both paths train the same parameters. The batch
    order comes from a generator seeded with ``cfg.seed``, identically in both paths.
    """
    if len(train) == 0 or len(val) == 0:
        raise UserError("training and validation splits must both hold at least one image")
    optimizer = make_optimizer(model, head, cfg)
    objective = Objective(cfg.l2, len(train), cfg.label_smoothing, cfg.l2sp)
    named = trainable_parameters(model)
    anchors: list[tuple[torch.Tensor, torch.Tensor]] | None = (
        [(named[n], w0) for n, w0 in (pretrained or {}).items() if n in named] if cfg.l2sp else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_train, n_classes = len(train), head.out_features

    set_train_mode(model, False)
    history = [_epoch_zero(*evaluate(net, val))]
    start_state = trainable_state(model)
    best_epoch, best_key, best_state = 0, selection_key(cfg.select, history[0]["val_xent"], history[0]["val_err"]), start_state
    status: RunStatus = "done"
    since_best = step = 0
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if on_epoch:
        on_epoch(history[-1])
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(model, True, cfg.train_bn)
        loss_sum = xent_sum = 0.0
        wrong = 0
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg.batch_size):
            factor = lr_factor(cfg, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            logits = net(x)
            loss, xent = objective.loss(logits, y, head.weight, anchors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
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
        key = selection_key(cfg.select, val_xent, val_err)
        if key < best_key or epoch == first_candidate:
            best_epoch, best_key, best_state, since_best = epoch, key, trainable_state(model), 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    train_seconds = time.perf_counter() - start
    load_state_strict(model, best_state)
    set_train_mode(model, False)
    return FitResult(history, best_epoch, status, best_state, train_seconds, start_state)


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
    best_epoch, best_key = [0] * n_heads, [selection_key(cfg0.select, vx[g], ve[g]) for g in range(n_heads)]
    step, steps_per_epoch = 0, math.ceil(n_train / cfg0.batch_size)
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
            if not active[g]:
                continue
            histories[g].append(EpochRecord(epoch=epoch, train_loss=tl[g], train_xent=tx[g], train_err=te[g],
                                            val_xent=vx[g], val_err=ve[g]))
            if has_diverged(tx[g], vx[g], n_classes):
                status[g], active[g] = "diverged", False
            elif selection_key(cfg0.select, vx[g], ve[g]) < best_key[g]:
                best_epoch[g], best_key[g], best_state[g], since_best[g] = epoch, selection_key(cfg0.select, vx[g], ve[g]), snapshot(g), 0
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

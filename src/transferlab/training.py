"""One training run: minibatch Adam (or SGD) with early stopping on validation cross-entropy.

Per batch: ``loss = mean cross-entropy + (l2 / n_train) * sum(W_head ** 2)`` (bias not penalised).
Epoch 0 evaluates the untrained model on validation before any update. After every epoch the
validation cross-entropy decides: a strict improvement keeps a copy of the trainable state in
memory; `patience` epochs without one stop training; the best state is restored at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .freezing import set_train_mode, trainable_parameters, trainable_state
from .heads import l2_penalty
from .utils import UserError


# A run whose epoch-average train cross-entropy exceeds this multiple of the untrained model's
# validation cross-entropy has blown up (e.g. lr=100 with Adam), even if no value is inf or NaN yet.
EXPLODED_FACTOR = 100.0


def has_diverged(train_xent: float, val_xent: float, start_val_xent: float) -> bool:
    """Non-finite metrics, or a train cross-entropy that exploded relative to where training started."""
    if not (math.isfinite(train_xent) and math.isfinite(val_xent)):
        return True
    return train_xent > EXPLODED_FACTOR * max(start_val_xent, 1e-3)


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batches(self, order: torch.Tensor, batch_size: int): ...


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (saved beside every run)."""

    lr: float = 1e-3
    l2: float = 0.0
    seed: int = 0
    epochs: int = 100
    patience: int = 15
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    momentum: float = 0.9
    # Trainable batch-norm layers: False keeps normalising with the pretrained running statistics
    # (small target sets give noisy batch statistics, and switching a probe's features to them
    # shifts what the head was trained on); True uses and updates batch statistics.
    train_bn: bool = False
    augment: bool = False  # random resized crops + flips of the training images (needs the uncached path)

    def validate(self) -> None:
        """UserError naming the flag for values that cannot train."""
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, f"--lr {self.lr}: must be a positive number"),
            (math.isfinite(self.l2) and self.l2 >= 0, f"--l2 {self.l2}: must be zero or positive"),
            (self.epochs >= 0, f"--epochs {self.epochs}: must be zero or positive"),
            (self.patience >= 1, f"--patience {self.patience}: must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.optimizer in ("adam", "sgd"), f"--optimizer {self.optimizer}: expected adam or sgd"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class FitResult:
    """History (one dict per epoch, epoch 0 first), the chosen epoch and how the run ended."""

    history: list[dict]
    best_epoch: int
    status: str  # "done" | "diverged"
    best_state: dict = field(repr=False)
    train_seconds: float = 0.0

    @property
    def best(self) -> dict:
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


def fit(
    model: nn.Module,
    net: nn.Module,
    head: nn.Linear,
    train: BatchSource,
    val: BatchSource,
    cfg: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train `model`'s trainable parameters; `net` maps a source's inputs to logits.

    `net` is either the whole model (images in) or the suffix of its chain after a cache (cached
    activations in); the modules are shared, so both paths train the same parameters. The batch
    order comes from a generator seeded with ``cfg.seed``, identically in both paths.
    """
    if len(train) == 0 or len(val) == 0:
        raise UserError("training and validation splits must both hold at least one image")
    params = list(trainable_parameters(model).values())
    optimizer = make_optimizer(params, cfg)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_train = len(train)
    l2_scale = cfg.l2 / n_train

    set_train_mode(model, False)
    val_xent, val_err = evaluate(net, val)
    history = [dict(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=val_xent, val_err=val_err)]
    best_epoch, best_xent, best_state = 0, val_xent, trainable_state(model)
    status, since_best = "done", 0
    if on_epoch:
        on_epoch(history[-1])
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(model, True, cfg.train_bn)
        loss_sum = xent_sum = 0.0
        wrong = 0
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg.batch_size):
            logits = net(x)
            xent = F.cross_entropy(logits, y)
            loss = xent + l2_scale * l2_penalty(head) if cfg.l2 else xent
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            b = len(y)
            loss_sum += loss.item() * b
            xent_sum += xent.item() * b
            wrong += (logits.detach().argmax(1) != y).sum().item()
        set_train_mode(model, False)
        val_xent, val_err = evaluate(net, val)
        record = dict(
            epoch=epoch,
            train_loss=loss_sum / n_train,
            train_xent=xent_sum / n_train,
            train_err=wrong / n_train,
            val_xent=val_xent,
            val_err=val_err,
        )
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if has_diverged(record["train_xent"], val_xent, history[0]["val_xent"]):
            status = "diverged"
            break
        if val_xent < best_xent:
            best_epoch, best_xent, best_state, since_best = epoch, val_xent, trainable_state(model), 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state, strict=False)
    set_train_mode(model, False)
    return FitResult(history, best_epoch, status, best_state, train_seconds)


def _same_schedule(cfgs: list[TrainConfig]) -> None:
    first = cfgs[0]
    for c in cfgs[1:]:
        if (c.seed, c.epochs, c.batch_size, c.optimizer, c.momentum) != (first.seed, first.epochs, first.batch_size, first.optimizer, first.momentum):
            raise ValueError("batched probes must share seed, epochs, batch size and optimizer")


class _StackedOptimizer:
    """Adam / SGD-momentum on stacked per-head tensors with a per-head learning rate.

    Mirrors the arithmetic of ``torch.optim.Adam`` (single-tensor path) and ``torch.optim.SGD`` so a
    batched run reproduces the individual runs.
    """

    def __init__(self, params: list[torch.Tensor], lrs: torch.Tensor, cfg: TrainConfig, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lrs, self.cfg = params, lrs, cfg
        self.betas, self.eps, self.step_count = betas, eps, 0
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    def _lr(self, p: torch.Tensor) -> torch.Tensor:
        return self.lrs.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
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


def _stacked_metrics(weight, bias, x, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head (G,) mean cross-entropy and error count, plus the (G, B, C) logits."""
    logits = torch.einsum("bd,gcd->gbc", x, weight) + bias[:, None, :]
    g, b, c = logits.shape
    xent = F.cross_entropy(logits.reshape(g * b, c), y.repeat(g), reduction="none").view(g, b).mean(1)
    wrong = (logits.argmax(2) != y).sum(1)
    return xent, wrong, logits


def fit_linear_probes(
    heads: list[nn.Linear],
    train,
    val,
    cfgs: list[TrainConfig],
    head_name: str = "",
    on_epoch: Callable[[dict], None] | None = None,
) -> list[FitResult]:
    """Train several linear heads on the same cached features in one batched pass.

    The heads must share seed, epochs, batch size and optimizer (so they see identical minibatches);
    each has its own lr, l2 and patience, its own early stopping and divergence check. Each result is
    what :func:`fit` would return for that head alone (tested within 1e-5); the heads are left holding
    their best weights. `head_name` prefixes the keys of each ``best_state`` (e.g. ``"output"``).
    """
    _same_schedule(cfgs)
    cfg0, n_heads, n_train = cfgs[0], len(cfgs), len(train)
    weight = torch.stack([h.weight.detach() for h in heads]).clone().requires_grad_(True)
    bias = torch.stack([h.bias.detach() for h in heads]).clone().requires_grad_(True)
    device = weight.device
    lrs = torch.tensor([c.lr for c in cfgs], dtype=weight.dtype, device=device)
    l2_scale = torch.tensor([c.l2 / n_train for c in cfgs], dtype=weight.dtype, device=device)
    optimizer = _StackedOptimizer([weight, bias], lrs, cfg0)
    order_gen = torch.Generator().manual_seed(cfg0.seed)
    prefix = f"{head_name}." if head_name else ""

    def val_metrics():
        with torch.no_grad():
            xent_sum = torch.zeros(n_heads, device=device)
            wrong = torch.zeros(n_heads, dtype=torch.long, device=device)
            for x, y in val.batches(torch.arange(len(val)), 512):
                xent, w, _ = _stacked_metrics(weight, bias, x, y)
                xent_sum += xent * len(y)
                wrong += w
            return (xent_sum / len(val)).tolist(), (wrong.double() / len(val)).tolist()

    def snapshot(g):
        return {prefix + "weight": weight[g].detach().clone(), prefix + "bias": bias[g].detach().clone()}

    vx, ve = val_metrics()
    histories = [[dict(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=vx[g], val_err=ve[g])] for g in range(n_heads)]
    best_epoch, best_xent = [0] * n_heads, list(vx)
    best_state = [snapshot(g) for g in range(n_heads)]
    since_best, status, active = [0] * n_heads, ["done"] * n_heads, [True] * n_heads
    start = time.perf_counter()
    for epoch in range(1, cfg0.epochs + 1):
        if not any(active):
            break
        loss_sum = torch.zeros(n_heads, device=device)
        xent_sum = torch.zeros(n_heads, device=device)
        wrong = torch.zeros(n_heads, dtype=torch.long, device=device)
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg0.batch_size):
            xent, w, _ = _stacked_metrics(weight, bias, x, y)
            loss = xent + l2_scale * weight.pow(2).sum((1, 2))
            grads = torch.autograd.grad(loss.sum(), [weight, bias])
            optimizer.step(grads)
            b = len(y)
            loss_sum += loss.detach() * b
            xent_sum += xent.detach() * b
            wrong += w
        vx, ve = val_metrics()
        tl, tx, te = (loss_sum / n_train).tolist(), (xent_sum / n_train).tolist(), (wrong.double() / n_train).tolist()
        for g in range(n_heads):
            if not active[g]:
                continue
            histories[g].append(dict(epoch=epoch, train_loss=tl[g], train_xent=tx[g], train_err=te[g], val_xent=vx[g], val_err=ve[g]))
            if has_diverged(tx[g], vx[g], histories[g][0]["val_xent"]):
                status[g], active[g] = "diverged", False
            elif vx[g] < best_xent[g]:
                best_epoch[g], best_xent[g], best_state[g], since_best[g] = epoch, vx[g], snapshot(g), 0
            else:
                since_best[g] += 1
                active[g] = since_best[g] < cfgs[g].patience
        if on_epoch:
            on_epoch(dict(epoch=epoch, val_xent=min(vx), val_err=min(ve), active=sum(active)))
    seconds = (time.perf_counter() - start) / n_heads
    results = []
    for g, head in enumerate(heads):
        with torch.no_grad():
            head.weight.copy_(best_state[g][prefix + "weight"])
            head.bias.copy_(best_state[g][prefix + "bias"])
        results.append(FitResult(histories[g], best_epoch[g], status[g], best_state[g], seconds))
    return results

"""One training run: minibatch Adam (AdamW, SGD) with early stopping on a validation criterion.

The loss is the :class:`~transferlab.objective.Objective`. Epoch 0 evaluates the untrained model on
validation before any update. After every epoch the selection criterion (``--select``: validation
cross-entropy, ties broken by validation error, or the reverse) decides: a strict improvement keeps a
copy of the trainable state in memory; `patience` epochs without one stop training; the best state is
restored at the end. A run that started from another run's state (LP-then-FT) can then be
interpolated in weight space with its start (WiSE-FT, :func:`wise_interpolate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.errors import UserError
from transferlab.features.sources import BatchSource
from transferlab.models.freezing import load_state_strict, set_train_mode, trainable_parameters, trainable_state
from transferlab.train.config import TrainConfig
from transferlab.train.early_stopping import EarlyStopping
from transferlab.train.objective import Objective
from transferlab.train.results import EpochRecord, FitResult
from transferlab.train.schedule import lr_factor


def lr_scales(model: nn.Module, head: nn.Module, cfg: TrainConfig,
              blocks: Sequence[nn.Module] = ()) -> dict[int, float]:
    """{id(parameter): its lr / cfg.lr} for `model`'s trainable parameters.

    The head learns at 1. A backbone parameter in block j of `blocks` (the chain's blocks that hold
    parameters, the head's block last, index L) learns at ``backbone_lr_mult * layer_decay ** (L - j)``
    (timm's ``layer_decay``: the last backbone block one factor below the head, the stem the most);
    without `blocks`, or outside them, at ``backbone_lr_mult``.
    """
    head_ids = {id(p) for p in head.parameters()}
    depth: dict[int, int] = {}
    if cfg.layer_decay != 1.0 and blocks:
        last = len(blocks) - 1
        for j, block in enumerate(blocks):
            for p in block.parameters():
                depth.setdefault(id(p), last - j)
    return {id(p): 1.0 if id(p) in head_ids else cfg.backbone_lr_mult * cfg.layer_decay ** depth.get(id(p), 0)
            for p in trainable_parameters(model).values()}


NO_DECAY_WORDS = ("token", "pos_embed", "position_embedding", "relative_position")


def no_weight_decay(model: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay though 2-D or more: what the model's (timm's)
    ``no_weight_decay()`` names, at any depth, and class/register tokens and position embeddings."""
    names = {n for n, _ in model.named_parameters() if any(w in n for w in NO_DECAY_WORDS)}
    for prefix, module in model.named_modules():
        own = getattr(module, "no_weight_decay", None)
        if callable(own):
            try:
                names |= {f"{prefix}.{n}" if prefix else n for n in own()}
            except TypeError:
                continue
    return names


def make_optimizer(model: nn.Module, head: nn.Module, cfg: TrainConfig,
                   blocks: Sequence[nn.Module] = ()) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over `model`'s trainable parameters, each at ``cfg.lr`` times its
    :func:`lr_scales` (one group per scale, the head's first). Weight decay applies to the backbone's
    weight tensors (2-D and up; as timm, not biases, normalisation or :func:`no_weight_decay`'s
    embeddings), never to the head, whose penalty is the objective's l2. Each group remembers its
    ``base_lr`` for the schedule."""
    scales = lr_scales(model, head, cfg, blocks)
    head_ids = {id(p) for p in head.parameters()}
    exempt = no_weight_decay(model)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in trainable_parameters(model).items():
        decays = bool(cfg.weight_decay) and id(p) not in head_ids and p.dim() > 1 and name not in exempt
        groups.setdefault((scales[id(p)], decays), []).append(p)
    order = sorted(groups, key=lambda g: (not any(id(p) in head_ids for p in groups[g]), -g[0], g[1]))
    param_groups = [{"params": groups[g], "base_lr": cfg.lr * g[0], "lr": cfg.lr * g[0],
                     "weight_decay": cfg.weight_decay if g[1] else 0.0} for g in order]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr)
    return torch.optim.Adam(param_groups, lr=cfg.lr)


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`net`'s logits for `x`, at least float32. On CUDA, inputs with spatial or token axes (images, maps,
    tokens: backbone layers run) go through bf16 autocast, as extraction there does; a head on pooled
    features (N, D) runs plain, as the batched probes do."""
    amp = x.device.type == "cuda" and x.dim() > 2
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = net(x)
    return logits if logits.dtype == torch.float64 else logits.float()


@torch.no_grad()
def evaluate(net: nn.Module, source: BatchSource, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, error rate) of `net` on `source`, in eval mode, in the source's order."""
    xent_sum, wrong, n = 0.0, 0, 0
    order = torch.arange(len(source))
    for x, y in source.batches(order, batch_size):
        logits = forward(net, x)
        xent_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        wrong += int((logits.argmax(1) != y).sum())
        n += len(y)
    return xent_sum / n, wrong / n


@torch.no_grad()
def predict_proba(net: nn.Module, source: BatchSource, batch_size: int = 512) -> torch.Tensor:
    """Softmax probabilities (N, C), float64 on CPU, in the source's order."""
    order = torch.arange(len(source))
    return torch.cat([torch.softmax(forward(net, x).double(), 1).cpu() for x, _y in source.batches(order, batch_size)])


def epoch_zero(val_xent: float, val_err: float) -> EpochRecord:
    """The record of epoch 0: the model before any update, on validation only."""
    return EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=val_xent, val_err=val_err, lr=None)


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
    blocks: Sequence[nn.Module] = (),
) -> FitResult:
    """Train `model`'s trainable parameters; `net` maps a source's inputs to logits.

    The best epoch is chosen among epochs >= `first_candidate` (when any ran): 1 makes a run that
    will be interpolated with its start (WiSE-FT) return a trained state, the start being a = 0.

    `blocks` are the backbone's chain blocks holding parameters (the head's last), for layer-wise lr
    decay (:func:`lr_scales`).

    `pretrained` holds the pretrained values of the fine-tuned backbone tensors (by parameter name),
    the anchors of the L2-SP term when ``cfg.l2sp`` > 0.

    `net` is either the whole model (images in) or the suffix of its chain after a cache (cached
    activations in); the modules are shared, so both paths train the same parameters. The batch
    order comes from a generator seeded with ``cfg.seed``, identically in both paths.
    """
    if len(train) == 0 or len(val) == 0:
        raise UserError("training and validation splits must both hold at least one image")
    optimizer = make_optimizer(model, head, cfg, blocks)
    objective = Objective(cfg.l2, len(train), cfg.label_smoothing, cfg.l2sp)
    named = trainable_parameters(model)
    anchors: list[tuple[torch.Tensor, torch.Tensor]] | None = (
        [(named[n], w0) for n, w0 in (pretrained or {}).items() if n in named] if cfg.l2sp else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)

    set_train_mode(model, False)
    history = [epoch_zero(*evaluate(net, val))]
    start_state = best_state = trainable_state(model)
    stopping = EarlyStopping(cfg.select, cfg.patience, head.out_features, history[0], first_candidate)
    step, n_train = 0, len(train)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if on_epoch:
        on_epoch(history[-1])
    start = time.perf_counter()
    step_seconds = 0.0
    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(model, True, cfg.train_bn)
        loss_sum = xent_sum = 0.0
        wrong = 0
        pass_start = time.perf_counter()
        for x, y in train.batches(torch.randperm(n_train, generator=order_gen), cfg.batch_size):
            factor = lr_factor(cfg, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            logits = forward(net, x)
            loss, xent = objective.loss(logits, y, head.weight, anchors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            b = len(y)
            loss_sum += loss.item() * b
            xent_sum += xent.item() * b
            wrong += int((logits.detach().argmax(1) != y).sum())
        step_seconds += time.perf_counter() - pass_start
        set_train_mode(model, False)
        val_xent, val_err = evaluate(net, val)
        record = EpochRecord(epoch=epoch, train_loss=loss_sum / n_train, train_xent=xent_sum / n_train,
                             train_err=wrong / n_train, val_xent=val_xent, val_err=val_err, lr=cfg.lr * factor)
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if stopping.update(record):
            best_state = trainable_state(model)
        if stopping.stopped:
            break
    train_seconds = time.perf_counter() - start
    load_state_strict(model, best_state)
    set_train_mode(model, False)
    return FitResult(history, stopping.best_epoch, stopping.status, best_state, train_seconds, start_state,
                     step_seconds=step_seconds, images_trained=(len(history) - 1) * n_train)

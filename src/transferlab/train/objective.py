"""The training objective: which loss terms a run minimises, and how the report writes them.

Both trainers (``training.fit`` for any trainable suffix, ``training.fit_linear_probes`` for many
heads at once) compute their loss here, so the formula exists once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Anchor = tuple[torch.Tensor, torch.Tensor]  # (a fine-tuned backbone tensor, its pretrained value)


@dataclass(frozen=True)
class Objective:
    """``loss = CE_s + (l2 / n_train) * sum(W_head ** 2) + l2sp * sum ||w - w_pretrained||^2``.

    CE_s is the mean cross-entropy against labels smoothed by `label_smoothing` (plain cross-entropy
    when 0); the head bias is not penalised; the L2-SP term (Li et al. 2018) pulls every fine-tuned
    backbone tensor toward its pretrained value, which the caller passes explicitly (`anchors`). The
    cross-entropy recorded as ``train_xent`` is always the plain one.
    """

    l2: float
    n_train: int
    label_smoothing: float = 0.0
    l2sp: float = 0.0

    @property
    def head_l2_scale(self) -> float:
        return self.l2 / self.n_train

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
             anchors: list[Anchor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, plain mean cross-entropy) of one minibatch."""
        xent = F.cross_entropy(logits, labels)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing) if self.label_smoothing else xent
        if self.l2:
            loss = loss + self.head_l2_scale * head_weight.pow(2).sum()
        if self.l2sp and anchors:
            loss = loss + self.l2sp * l2sp_penalty(anchors)
        return loss, xent

    def describe(self) -> str:
        return describe_objective((self.l2,), self.label_smoothing, self.l2sp)


def l2sp_penalty(anchors: list[Anchor]) -> torch.Tensor:
    """sum over tensors of ||w - w_pretrained||^2."""
    return torch.stack([(w - w0).pow(2).sum() for w, w0 in anchors]).sum()


def stacked_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-head (G,) mean cross-entropy of G heads' logits (G, B, C)."""
    g, b, c = logits.shape
    return F.cross_entropy(logits.reshape(g * b, c), labels.repeat(g), reduction="none").view(g, b).mean(1)


def stacked_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 l2_scales: list[float], label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (G,) loss and plain mean cross-entropy of G heads: logits (G, B, C), weights (G, C, D).

    Each head's penalty is its own reduction, with the same shapes whatever G is.
    """
    xent = stacked_xent(logits, labels)
    data_term = xent
    if label_smoothing:
        g, b, c = logits.shape
        data_term = F.cross_entropy(logits.reshape(g * b, c), labels.repeat(g), reduction="none",
                                    label_smoothing=label_smoothing).view(g, b).mean(1)
    penalty = torch.stack([s * w.pow(2).sum() for w, s in zip(weights.unbind(0), l2_scales)])
    return data_term + penalty, xent


def describe_objective(l2s: tuple[float, ...] = (1.0,), label_smoothing: float | tuple[float, ...] = 0.0,
                       l2sp: float | tuple[float, ...] = 0.0, smoothing_scope: str = "") -> str:
    """The formula the report prints: exactly the terms runs with these settings use (a tuple: the
    values a grid tries; a term whose values are all 0 is left out). `smoothing_scope` says which runs
    smooth labels (a sweep's probes never do)."""
    smooth = tuple(v for v in (label_smoothing if isinstance(label_smoothing, tuple) else (label_smoothing,)) if v)
    sp = tuple(v for v in (l2sp if isinstance(l2sp, tuple) else (l2sp,)) if v)
    text = "loss = mean cross-entropy" + (f" ({smoothing_scope}labels smoothed by {' or '.join(f'{v:g}' for v in smooth)})" if smooth else "")
    if any(l2 > 0 for l2 in l2s):
        text += f" + (l2 / n_train) * sum(W_head ** 2)   (the head bias is not penalised; l2 in {', '.join(f'{v:g}' for v in l2s)})"
    if sp:
        text += f"\n     + A * sum over fine-tuned backbone tensors of ||w - w_pretrained||^2   (L2-SP, A in {', '.join(f'{v:g}' for v in sp)})"
    return text

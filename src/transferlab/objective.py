"""The training objective: which loss terms a run minimises, and how the report writes them.

Both trainers (``training.fit`` for any trainable suffix, ``training.fit_linear_probes`` for many
heads at once) compute their loss here, so the formula exists once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Objective:
    """``loss = mean cross-entropy + (l2 / n_train) * sum(W_head ** 2)`` (the head bias is not penalised)."""

    l2: float
    n_train: int

    @property
    def head_l2_scale(self) -> float:
        return self.l2 / self.n_train

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mean cross-entropy) of one minibatch."""
        xent = F.cross_entropy(logits, labels)
        if not self.l2:
            return xent, xent
        return xent + self.head_l2_scale * head_weight.pow(2).sum(), xent

    def describe(self) -> str:
        return describe_objective((self.l2,))


def stacked_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-head (G,) mean cross-entropy of G heads' logits (G, B, C)."""
    g, b, c = logits.shape
    return F.cross_entropy(logits.reshape(g * b, c), labels.repeat(g), reduction="none").view(g, b).mean(1)


def stacked_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 l2_scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (G,) loss and mean cross-entropy of G heads: logits (G, B, C), weights (G, C, D).

    Each head's penalty is its own reduction, with the same shapes whatever G is.
    """
    xent = stacked_xent(logits, labels)
    penalty = torch.stack([s * w.pow(2).sum() for w, s in zip(weights.unbind(0), l2_scales)])
    return xent + penalty, xent


def describe_objective(l2s: tuple[float, ...] = (1.0,)) -> str:
    """The formula the report prints: the terms runs with these L2 strengths use."""
    text = "loss = mean cross-entropy"
    if any(l2 > 0 for l2 in l2s):
        text += f" + (l2 / n_train) * sum(W_head ** 2)   (the head bias is not penalised; l2 in {', '.join(f'{v:g}' for v in l2s)})"
    return text

"""The new classifier head (its L2 penalty is part of ``objective``)."""

from __future__ import annotations

import math

import torch
from torch import nn


def new_head(in_features: int, n_classes: int, seed: int) -> nn.Linear:
    """A fresh ``Linear(in_features, n_classes)`` initialised from `seed` alone.

    Same distribution as PyTorch's default ``Linear`` init (uniform in +-1/sqrt(in_features)), drawn
    from a private generator so the global RNG state does not matter.
    """
    head = nn.Linear(in_features, n_classes)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    return head

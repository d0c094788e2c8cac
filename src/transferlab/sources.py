"""What a training loop iterates over: cached tensors (index lookups) or images decoded every pass."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .data import Preprocessing, Split, default_num_workers, image_loader
from .devices import Placement
from .utils import UserError


class BatchSource(Protocol):
    """Minibatches ``(inputs, labels)`` in a given order of item indices."""

    def __len__(self) -> int: ...

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class SplitInputs:
    """What the trainable suffix sees for one split: inputs, labels, and files that failed to decode."""

    inputs: torch.Tensor  # (N, ...) float32, on CPU
    labels: torch.Tensor  # (N,) int64
    bad_files: list[str]
    runtime: dict | None = None  # what computed `inputs` (PrefixRunner.describe()), when a frozen prefix did


class TensorSource:
    """Training inputs held as one tensor on the model's placement; minibatches are index lookups."""

    def __init__(self, item: SplitInputs, placement: Placement):
        self.inputs = placement.put(item.inputs)
        self.labels = placement.put(item.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = order.to(self.inputs.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.inputs[idx], self.labels[idx]


class ImageSource:
    """Training inputs decoded from image files for every batch (the uncached path).

    With `augment_seed` set, every pass over the data draws fresh augmented views, seeded by
    (augment_seed, pass number, image index): reproducible, and independent of the worker count.
    """

    def __init__(self, split: Split, pre: Preprocessing, placement: Placement, num_workers: int | None = None,
                 augment_seed: int | None = None):
        self.split, self.pre, self.placement = split, pre, placement
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment_seed = augment_seed
        self.passes = 0

    def __len__(self) -> int:
        return len(self.split)

    def augmented(self, seed: int) -> ImageSource:
        """The same images with augmented views seeded by `seed`."""
        return ImageSource(self.split, self.pre, self.placement, self.num_workers, augment_seed=seed)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        seed = None if self.augment_seed is None else self.augment_seed * 100_003 + self.passes
        self.passes += 1
        loader = image_loader(self.split, self.pre, batch_size, self.num_workers, batch_sampler=chunks, augment_seed=seed)
        for x, y, idx, ok in loader:
            if not bool(ok.all()):
                bad = [self.split.files[i] for i in idx[~ok].tolist()]
                raise UserError(f"image(s) cannot be decoded: {'; '.join(bad)}")
            yield self.placement.put(x), self.placement.put(y)

"""What a training loop iterates over: cached tensors (index lookups) or images decoded every pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from transferlab.core.devices import Placement
from transferlab.core.errors import UserError
from transferlab.data import DEFAULT_MIN_SCALE, Preprocessing, Split, default_num_workers, image_loader
from transferlab.data.loader import threaded_batches
from transferlab.features.shards import ShardedRows, StackedRows


def draw_seed(what: str, seed: int, n_pass: int) -> int:
    """A generator seed for `what` ("pick" a view, "map" crops) in pass `n_pass` of a run seeded by `seed`:
    a stream of its own, unrelated to the batch order's (seeded by `seed`) and to the views' crops."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{what}:{seed}:{n_pass}".encode()).digest()[:7], "little")


def view_seed(seed: int, view: int) -> int:
    """The augmentation seed of pass (or cached view) number `view` of a run seeded by `seed`.

    One rule for both paths: cached view v of ``--ft-augment views:K`` is exactly what the
    uncached ``--augment`` path shows in its pass v.
    """
    return seed * 100_003 + view


class BatchSource(Protocol):
    """Minibatches ``(inputs, labels)`` in a given order of item indices."""

    def __len__(self) -> int: ...

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class SplitInputs:
    """What the trainable suffix sees for one split: inputs, labels, and files that failed to decode."""

    inputs: torch.Tensor | ShardedRows | StackedRows  # (N, ...) float32 on CPU, or rows kept in memory-mapped cache shards
    labels: torch.Tensor  # (N,) int64
    bad_files: list[str]
    runtime: dict | None = None  # what computed `inputs` (PrefixRunner.describe()), when a frozen prefix did


def gather(inputs: torch.Tensor | ShardedRows, idx: torch.Tensor) -> torch.Tensor:
    """The rows at `idx`: an index lookup in memory, or a copy out of memory-mapped shards."""
    return inputs.rows(idx) if isinstance(inputs, ShardedRows) else inputs[idx.to(inputs.device)]


def rows_of(inputs: torch.Tensor | ShardedRows | StackedRows) -> torch.Tensor | ShardedRows:
    """`inputs` of one split's rows (N, ...), not a stack of views."""
    if isinstance(inputs, StackedRows):
        raise ValueError("expected one split's rows (N, ...), got a stack of views")
    return inputs


def stack_views(items: list[SplitInputs]) -> SplitInputs:
    """K views of a split, (K, N, ...): in memory, or a stack of memory-mapped shards when every view is streamed."""
    streamed = [it.inputs for it in items if isinstance(it.inputs, ShardedRows)]
    if len(streamed) == len(items):
        views: torch.Tensor | StackedRows = StackedRows(streamed)
    else:
        views = torch.stack([r.load() if isinstance(r, ShardedRows) else r for r in (rows_of(it.inputs) for it in items)])
    return SplitInputs(views, items[0].labels, items[0].bad_files, items[0].runtime)


class TensorSource:
    """Cached training inputs, held as one tensor on the model's placement or streamed from memory-mapped
    cache shards (the same rows in the same order either way); minibatches are index lookups."""

    def __init__(self, item: SplitInputs, placement: Placement):
        self.placement = placement
        # A whole cache keeps its layout (a channels_last copy would double it); shards stay on disk.
        rows = rows_of(item.inputs)
        self.inputs = rows if isinstance(rows, ShardedRows) else placement.store(rows)
        self.labels = placement.put(item.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = order.to(self.labels.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.placement.put(gather(self.inputs, idx)), self.labels[idx]


class ImageSource:
    """Training inputs decoded from image files for every batch (the uncached path).

    With `augment_seed` set, every pass over the data draws fresh augmented views, seeded by
    (augment_seed, pass number, image index): reproducible, and independent of how images are decoded.
    `num_workers` None decodes, on CPU, in threads of this process (one per model thread), taking turns with the
    model (``data.loader.threaded_batches``): worker processes would compete with the model's threads for
    the cores (a whole-network training pass ran 1.5x slower with 2 of them on 2 cores); elsewhere in
    min(4, cores) worker processes. A
    number is that many worker processes (0: in this process, serially).
    """

    def __init__(self, split: Split, pre: Preprocessing, placement: Placement, num_workers: int | None = None,
                 augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE):
        self.split, self.pre, self.placement = split, pre, placement
        self.num_workers = num_workers
        self.augment_seed, self.min_scale = augment_seed, min_scale
        self.passes = 0

    def __len__(self) -> int:
        return len(self.split)

    def augmented(self, seed: int, min_scale: float = DEFAULT_MIN_SCALE) -> ImageSource:
        """The same images with augmented views seeded by `seed`."""
        return ImageSource(self.split, self.pre, self.placement, self.num_workers, augment_seed=seed, min_scale=min_scale)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        seed = None if self.augment_seed is None else view_seed(self.augment_seed, self.passes)
        self.passes += 1
        loader: Iterable
        if self.num_workers is None and self.placement.device.type == "cpu":
            loader = threaded_batches(self.split, self.pre, chunks, augment_seed=seed, min_scale=self.min_scale)
        else:
            workers = default_num_workers() if self.num_workers is None else self.num_workers
            loader = image_loader(self.split, self.pre, batch_size, workers, batch_sampler=chunks, augment_seed=seed,
                                  min_scale=self.min_scale)
        for x, y, idx, ok in loader:
            if not bool(ok.all()):
                bad = [self.split.files[i] for i in idx[~ok].tolist()]
                raise UserError(f"image(s) cannot be decoded: {'; '.join(bad)}")
            yield self.placement.put(x), self.placement.put(y)


class ViewSource:
    """K cached augmented views of every training image; each pass shows one view per image.

    The view of each image is drawn anew every pass from a generator seeded by (seed, pass number):
    reproducible, and as cheap per epoch as a plain cached pass. `views` is (K, N, ...) in memory, or
    :class:`StackedRows` (one set of memory-mapped shards per view).
    """

    def __init__(self, views: torch.Tensor | ShardedRows | StackedRows, labels: torch.Tensor, placement: Placement, seed: int):
        if isinstance(views, ShardedRows):
            raise ValueError("views are (K, N, ...): a stack of ShardedRows, not one")
        self.placement = placement
        self.views = views if isinstance(views, StackedRows) else placement.store(views)
        self.labels = placement.put(labels)
        self.seed, self.passes = seed, 0

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(draw_seed("pick", self.seed, self.passes))
        self.passes += 1
        which = torch.randint(len(self.views), (len(self),), generator=gen).to(self.labels.device)
        order = order.to(self.labels.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.placement.put(self._pick(which[idx], idx)), self.labels[idx]

    def _pick(self, view: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.views, StackedRows):
            return self.views[view, idx]
        view, idx = view.cpu(), idx.cpu()  # the rows are copied out of files on the CPU, then put on the device
        out = torch.empty((len(idx), *self.views.views[0].row_shape))
        for v in view.unique().tolist():
            mask = view == v
            out[mask] = self.views.views[v].rows(idx[mask])
        return out


def crop_and_flip_maps(maps: torch.Tensor, gen: torch.Generator, min_scale: float) -> torch.Tensor:
    """Random square crops (`min_scale`-100% of the area) of spatial maps (B, C, H, W), resized back to
    (H, W) bilinearly, each mirrored with probability 1/2; every draw comes from `gen`."""
    import torch.nn.functional as F

    _b, _c, h, w = maps.shape
    out = []
    for m in maps:
        area = min_scale + (1 - min_scale) * torch.rand(1, generator=gen).item()
        ch, cw = max(1, round(h * area**0.5)), max(1, round(w * area**0.5))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = m[None, :, y0 : y0 + ch, x0 : x0 + cw]
        if (ch, cw) != (h, w):
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(3)
        out.append(crop)
    return torch.cat(out)


class MapAugmentSource:
    """Cached spatial activation maps, randomly cropped and mirrored in every batch (feature-level
    augmentation: free, and valid only where the cache holds maps, before global pooling)."""

    def __init__(self, item: SplitInputs, placement: Placement, seed: int, min_scale: float = DEFAULT_MIN_SCALE):
        if rows_of(item.inputs).dim() != 4:
            raise ValueError(f"map augmentation needs cached (N, C, H, W) maps, not shape {tuple(item.inputs.shape)}")
        self.plain = TensorSource(item, placement)
        self.seed, self.min_scale, self.passes = seed, min_scale, 0

    def __len__(self) -> int:
        return len(self.plain)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(draw_seed("map", self.seed, self.passes))
        self.passes += 1
        for x, y in self.plain.batches(order, batch_size):
            yield crop_and_flip_maps(x, gen, self.min_scale), y

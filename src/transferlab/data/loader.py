"""Batches of decoded images: a Dataset that turns one bad file into an ``ok=False`` item instead of an
error, the DataLoader around it (seeded workers), and the wrapper that puts SIGCHLD back after iterating."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import torch

from transferlab.data.decoding import BAD_IMAGE_ERRORS, load_rgb
from transferlab.data.splits import Split
from transferlab.data.transforms import DEFAULT_MIN_SCALE, Preprocessing, augmented_view, build_transform


def decode_threads() -> int:
    """Decoding threads beside a model on CPU: one per 4 cores (the model's threads take the rest), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def default_num_workers() -> int:
    """Decoding workers: enough to keep the model busy on a laptop."""
    return min(4, os.cpu_count() or 1)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy / random in each decoding worker from torch's per-worker seed (set by the loader's generator)."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ChildSignalSafeLoader:
    """Iterates a DataLoader's batches, then puts the process's SIGCHLD disposition back as it was.

    The first multi-worker DataLoader iterated in the main thread installs a process-wide Python
    SIGCHLD handler (torch's worker-failure check) and never removes it. From then on every child
    exit (a decoding worker, a sweep worker, a subprocess) interrupts some thread of the process;
    in our long-lived test process this went with heap corruption (segfaults inside malloc, 5 of 5
    full test runs; 3 of 3 passed once the handler was removed). This narrows the handler's life to
    the iteration itself; it is not restored if the iteration is closed off the main thread. Dead
    workers are still noticed without it, by the loader's own status checks (within about 5 s).
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD")
        before = signal.getsignal(signal.SIGCHLD) if main else None
        try:
            yield from self.loader
        finally:
            # `before` is None for a handler set outside Python: nothing we could put back.
            if before is not None and threading.current_thread() is threading.main_thread() \
                    and signal.getsignal(signal.SIGCHLD) is not before:
                signal.signal(signal.SIGCHLD, before)


def image_loader(split: Split, pre: Preprocessing, batch_size: int, num_workers: int, batch_sampler=None, pin: bool = False,
                 augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE) -> ChildSignalSafeLoader:
    """A DataLoader of ``(image, label, index, ok)`` in split order (or `batch_sampler`'s order)."""
    # Augmentations draw from per-item generators (see ImageDataset); the workers are seeded anyway
    # so nothing else they might randomise escapes the seed (pytorch#7068).
    dataset = ImageDataset(split, pre, augment_seed, min_scale)
    kwargs: dict = dict(num_workers=num_workers, pin_memory=pin, worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    if batch_sampler is not None:
        return ChildSignalSafeLoader(torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs))
    return ChildSignalSafeLoader(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs))


def threaded_batches(split: Split, pre: Preprocessing, batch_sampler: list[list[int]], threads: int | None = None, ahead: int = 2,
                     augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE):
    """``(image, label, index, ok)`` batches in `batch_sampler`'s order, decoded by `threads` threads of this
    process up to `ahead` batches before they are used: the decoding overlaps the model's work (PIL and
    the transforms release the GIL) without worker processes competing for the cores or pickling
    images (`threads` None: :func:`decode_threads`). Items are :class:`ImageDataset`'s, so the numbers
    equal the DataLoader's."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    dataset = ImageDataset(split, pre, augment_seed, min_scale)

    def load(indices: list[int]):
        return torch.utils.data.default_collate([dataset[i] for i in indices])

    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=threads or decode_threads(), thread_name_prefix="decode")
    try:
        for indices in batch_sampler:
            pending.append(pool.submit(load, indices))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: batches not started are dropped
        pool.shutdown(wait=True, cancel_futures=True)


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(image_tensor, label, index, ok)``; a file that fails to decode gives ``ok=False``
    and a zero image, so one bad file never stops a pass and every bad file can be reported.

    With ``augment_seed`` set, each item is an :func:`augmented_view` drawn from a generator seeded by
    (augment_seed, index): the same numbers whatever the number or order of loader workers.
    """

    def __init__(self, split: Split, pre: Preprocessing, augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE):
        self.split = split
        self.min_scale = min_scale
        self.pre = pre
        self.transform = build_transform(pre)
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.split.files[i], min_size=self.pre.resize_size)
            if self.augment_seed is None:
                x = self.transform(img)
            else:
                gen = torch.Generator().manual_seed(self.augment_seed * 1_000_003 + i)
                x = augmented_view(img, self.pre, gen, self.min_scale)
            ok = True
        except BAD_IMAGE_ERRORS:
            x = torch.zeros(3, self.pre.input_size, self.pre.input_size)
            ok = False
        return x, self.split.labels[i], i, ok

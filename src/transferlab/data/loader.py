"""Batches of decoded images: a Dataset that turns one bad file into an ``ok=False`` item instead of an
error, the DataLoader around it (seeded workers), the wrapper that puts SIGCHLD back after iterating, and
the in-process decoder that takes turns with a model on CPU (:func:`threaded_batches`)."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import torch

from transferlab.data.decoding import BAD_IMAGE_ERRORS, load_rgb
from transferlab.data.splits import Split
from transferlab.data.transforms import (
    DEFAULT_MIN_SCALE,
    Preprocessing,
    augmented_pixels,
    eval_pixels,
    normalise_into,
)


def decode_threads() -> int:
    """Helper threads that decode with the consumer on CPU (:func:`threaded_batches`): one per thread of the
    model's (``torch.get_num_threads()``, the cores this process was given) but the consumer's, at most 8
    (the GIL-bound part of decoding gains little from more)."""
    return max(0, min(8, torch.get_num_threads() - 1))


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


def consecutive_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 in order, cut into batches of `batch_size` (the last one shorter): a batch sampler."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def threaded_batches(split: Split, pre: Preprocessing, batch_sampler: list[list[int]], threads: int | None = None,
                     augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE):
    """``(image, label, index, ok)`` batches in `batch_sampler`'s order, decoded in this process by the
    consuming thread and `threads` helper threads (None: :func:`decode_threads`; 0: the consumer alone),
    without worker processes or pickled images. Items are :class:`ImageDataset`'s, so the numbers equal
    the DataLoader's.

    Decoding and the model take turns on the cores: when the consumer asks for a batch, it and the
    helpers decode that batch's images straight into the batch's tensor (a new one per batch, so a
    caller may keep it); while the consumer works on it, the helpers wait. Nothing is read ahead (slow
    network storage would show as decoding time). A model's threads on CPU use the cores well
    (EfficientNet-Lite0 in OpenVINO here: 173 img/s on one thread, 338 on two), so decoding beside
    them only slows them: with a helper decoding ahead, even at idle priority, extraction ran at
    0.71-0.77 of the runtime's speed on two cores; taking turns, 0.75-0.87.
    """
    return batches_in_turns(ImageDataset(split, pre, augment_seed, min_scale), batch_sampler, threads)


def batches_in_turns(dataset: ImageDataset, batch_sampler: list[list[int]], threads: int | None = None):
    """:func:`threaded_batches` of any `dataset` with ImageDataset's ``pre``, ``split`` (for the labels) and
    ``decode_into`` (which helper threads call concurrently: it must not share mutable state)."""
    pipeline = _DecodeTurns(dataset, batch_sampler)
    n_helpers = decode_threads() if threads is None else threads
    helpers = [threading.Thread(target=pipeline.help, name=f"decode-{k}", daemon=True) for k in range(n_helpers)]
    for t in helpers:
        t.start()
    try:
        for b in range(len(batch_sampler)):
            yield pipeline.batch(b)
    finally:  # also when the consumer stops early
        pipeline.close()
        for t in helpers:
            t.join()


class _DecodeTurns:
    """The items of one batch at a time, decoded by whichever thread claims them (the consumer and the
    helpers), each straight into the batch's tensor; helpers work only while the consumer waits."""

    def __init__(self, dataset: ImageDataset, batches: list[list[int]]):
        self.dataset, self.batches = dataset, batches
        self.turn: int | None = None  # the batch being decoded; None while the consumer uses one
        self.next_item = 0  # of batch `turn`, the first not claimed yet
        self.left = 0  # of batch `turn`, the items not decoded yet
        self.images = torch.empty(0)
        self.ok = torch.empty(0, dtype=torch.bool)
        self.error: BaseException | None = None
        self.closed = False
        self.cond = threading.Condition()

    def _claim(self) -> int | None:
        """The next item of this turn's batch (under the lock), or None."""
        if self.closed or self.error is not None or self.turn is None or self.next_item == len(self.batches[self.turn]):
            return None
        self.next_item += 1
        return self.next_item - 1

    def _decode(self, j: int) -> None:
        try:
            self.ok[j] = self.dataset.decode_into(self.batches[self.turn][j], self.images[j])  # type: ignore[index]
        except BaseException as e:  # a defect, not a bad image (those are ok=False): the consumer raises it
            with self.cond:
                self.error = self.error or e
                self.cond.notify_all()
        with self.cond:
            self.left -= 1
            if self.left == 0:
                self.cond.notify_all()

    def help(self) -> None:
        while True:
            with self.cond:
                j = self._claim()
                while j is None and not self.closed:
                    self.cond.wait()
                    j = self._claim()
            if j is None:
                return
            self._decode(j)

    def batch(self, b: int):
        indices = self.batches[b]
        size = self.dataset.pre.input_size
        with self.cond:
            self.images = torch.empty(len(indices), 3, size, size, dtype=torch.float32)
            self.ok = torch.zeros(len(indices), dtype=torch.bool)
            self.turn, self.next_item, self.left = b, 0, len(indices)
            self.cond.notify_all()
        while True:
            with self.cond:
                j = self._claim()
                while j is None and self.left and self.error is None:
                    self.cond.wait()  # the batch's last items are with helpers
                if self.error is not None:
                    raise self.error
                if j is None:
                    self.turn = None
                    break
            self._decode(j)
        labels = torch.tensor([self.dataset.split.labels[i] for i in indices])
        return self.images, labels, torch.tensor(indices), self.ok

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(image_tensor, label, index, ok)``; a file that fails to decode gives ``ok=False``
    and a zero image, so one bad file never stops a pass and every bad file can be reported. Image
    tensors are float32 with :func:`build_transform`'s numbers (computed as pixels, then normalised in place).

    With ``augment_seed`` set, each item is an :func:`augmented_view` drawn from a generator seeded by
    (augment_seed, index): the same numbers whatever the number or order of loader workers.
    """

    def __init__(self, split: Split, pre: Preprocessing, augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE):
        self.split = split
        self.min_scale = min_scale
        self.pre = pre
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.split)

    def pixels(self, i: int) -> np.ndarray | None:
        """Item `i`'s view as ``(H, W, 3)`` uint8 pixels; None if its file does not decode."""
        try:
            img = load_rgb(self.split.files[i], min_size=self.pre.resize_size)
            if self.augment_seed is None:
                return eval_pixels(img, self.pre)
            gen = torch.Generator().manual_seed(self.augment_seed * 1_000_003 + i)
            return augmented_pixels(img, self.pre, gen, self.min_scale)
        except BAD_IMAGE_ERRORS:
            return None

    def decode_into(self, i: int, out: torch.Tensor) -> bool:
        """Write item `i`'s normalised view into `out` (``(3, size, size)`` float32; zeros for a bad file); whether it decoded."""
        pixels = self.pixels(i)
        if pixels is None:
            out.zero_()
            return False
        normalise_into(pixels, self.pre, out)
        return True

    def __getitem__(self, i: int):
        x = torch.empty(3, self.pre.input_size, self.pre.input_size, dtype=torch.float32)
        ok = self.decode_into(i, x)
        return x, self.split.labels[i], i, ok

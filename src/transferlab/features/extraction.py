"""Extraction: the frozen prefix over every image of a split, once, in split order; into memory or into the
shards of a cache entry (:class:`ExtractionJob`, computed here by :func:`extract_job` or on a cluster)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from transferlab.core.devices import Placement, keep_freed_memory
from transferlab.data import Preprocessing, Split, default_num_workers, image_loader
from transferlab.data.loader import consecutive_batches, threaded_batches
from transferlab.features import shards
from transferlab.features.runtimes import PrefixRunner, RuntimeFellBack, eager_runner


@torch.no_grad()
def extract(
    prefix: nn.Module,
    split: Split,
    pre: Preprocessing,
    placement: Placement,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    runner: PrefixRunner | None = None,
    augment: tuple[int, float] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Run `prefix` (eval mode) once over every image of `split`, with `runner` (default: eager PyTorch).

    With `augment` = (seed, min_scale) each image is a seeded random resized crop and flip
    (``data.augmented_view``) instead of the evaluation view.

    On CPU with `num_workers` None the images are decoded by threads of this process (one per runtime thread),
    taking turns with the runtime (``data.loader.threaded_batches``): worker processes, or decoding
    beside the runtime, would compete with its threads for the cores.

    Returns the float32 outputs on CPU, in split order, and the indices of files that failed to
    decode (their rows are zeros). On CUDA the pass uses pinned memory, channels_last and bf16
    autocast; outputs are stored in float32. If the runner's runtime fails midway, it falls back to
    eager PyTorch and the whole pass is redone, so one split never mixes two runtimes.

    Applies :func:`~transferlab.core.devices.keep_freed_memory` (in whichever process extracts: this
    one, a Ray actor): otherwise each batch's fresh 38 MB tensor is page-faulted in again by every
    decoding thread at once, and Lite0 extracted at 0.54-0.57 of the runtime's speed instead of 0.79.
    """
    keep_freed_memory()
    prefix.eval()
    runner = runner or eager_runner(prefix, placement, (1, 3, pre.input_size, pre.input_size))
    seed, min_scale = augment if augment is not None else (None, 1.0)
    loader: Iterable
    if num_workers is None and placement.device.type == "cpu":  # decoding takes turns with the runtime
        loader = threaded_batches(split, pre, consecutive_batches(len(split), batch_size), augment_seed=seed, min_scale=min_scale)
    else:
        workers = default_num_workers() if num_workers is None else num_workers
        loader = image_loader(split, pre, batch_size, workers, pin=placement.device.type == "cuda", augment_seed=seed,
                              min_scale=min_scale)
    out: torch.Tensor | None = None
    bad: list[int] = []
    what = split.name if augment is None else f"{split.name} view"
    bar = tqdm(total=len(split), desc=f"extract {what} ({runner.name})", unit="img", disable=not progress, leave=False)
    for x, _y, idx, ok in loader:
        try:
            y = runner(x)
        except RuntimeFellBack:
            bar.close()
            close = getattr(loader, "close", None)
            if close is not None:  # the decoding threads stop before the pass is redone
                close()
            return extract(prefix, split, pre, placement, batch_size, num_workers, progress, runner, augment)
        if out is None:
            out = torch.empty((len(split),) + tuple(y.shape[1:]), dtype=torch.float32)
        out[idx] = y
        bad += idx[~ok].tolist()
        bar.update(len(idx))
    bar.close()
    assert out is not None, "empty split"
    return out, sorted(bad)


@dataclass
class ExtractionJob:
    """One cache entry to compute: `split` through `prefix` by `runner`, into the shards `bounds` of `folder`."""

    prefix: nn.Module
    split: Split
    pre: Preprocessing
    placement: Placement
    runner: PrefixRunner
    folder: Path
    bounds: list[tuple[int, int]]
    row_shape: tuple[int, ...]
    batch_size: int = 64
    num_workers: int | None = None
    progress: bool = True
    augment: tuple[int, float] | None = None
    export_dir: Path | None = None  # where ONNX-based runtimes keep the prefix's export (the cache folder)
    export_key: str = ""


Extractor = Callable[[ExtractionJob], bool]  # computes a job's shards and manifest; False: its runner fell back


def extract_job(job: ExtractionJob) -> bool:
    """Extract `job` here, shard by shard, then write its manifest.

    Shards already there and intact (an interrupted extraction) are kept, not computed again. Returns
    False, leaving no manifest, when the runner fell back to another runtime midway: the shards
    so far were computed by the first one, so the caller starts over under the fallback's key.
    """
    folder, runner, split = job.folder, job.runner, job.split
    folder.mkdir(parents=True, exist_ok=True)
    runtime = runner.describe()
    entries = []
    for i, (start, stop) in enumerate(job.bounds):
        entry = shards.intact_shard(folder, i, (start, stop))
        if entry is None:
            part = split.subset(list(range(start, stop)))
            inputs, bad = extract(job.prefix, part, job.pre, job.placement, job.batch_size, job.num_workers, job.progress,
                                  runner, job.augment)
            if runner.describe() != runtime:
                shards.remove_entry(folder)
                return False
            entry = shards.write_shard(folder, i, inputs, torch.tensor(part.labels, dtype=torch.int64), start,
                                       [start + j for j in bad])
        entries.append(entry)
    write_entry_manifest(job, entries)
    return True


def write_entry_manifest(job: ExtractionJob, entries: list[dict]) -> None:
    """The manifest of `job`'s entry, once all its shards (`entries`, in order) are on disk."""
    shards.remove_shards_from(job.folder, len(job.bounds))
    shards.write_manifest(job.folder, entries, job.row_shape)


@torch.no_grad()
def output_shape(prefix: nn.Module, pre: Preprocessing, placement: Placement) -> tuple[int, ...]:
    """The shape of `prefix`'s output for one image (one dummy forward)."""
    prefix.eval()
    return tuple(prefix(placement.put(torch.zeros(1, 3, pre.input_size, pre.input_size))).shape[1:])

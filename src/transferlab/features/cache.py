"""One forward pass per image: run the frozen prefix of a backbone once and cache what it produces.

The backbone's chain of blocks is cut right before the first block that holds a trainable layer.
Everything before the cut is frozen and in eval mode, so its output is a fixed function of the image:
it is computed once per image (``extraction``: here, or on a cluster with ``cluster``), kept on disk
(``FeatureCache``, in shards: ``shards``), and training then runs only the suffix. For a linear probe the cut is the classifier, and the cached tensors are the
penultimate features. The uncached path (``sources.ImageSource``) decodes and runs everything every
epoch; it is kept for augmentation and for the equivalence tests.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from transferlab.core.devices import Placement
from transferlab.core.errors import UserError
from transferlab.core.hashing import stable_hash
from transferlab.data import DECODER, Preprocessing, Split, image_loader, split_fingerprint
from transferlab.data.loader import consecutive_batches, threaded_batches
from transferlab.data.splits import bad_image_policy
from transferlab.features import shards
from transferlab.features.extraction import ExtractionJob, Extractor, extract, extract_job, output_shape
from transferlab.features.runtimes import PrefixRunner, onnx_export_key, planned_runner, prepare_prefix_runner
from transferlab.features.sources import SplitInputs, rows_of
from transferlab.models import Backbone

log = logging.getLogger(__name__)

CACHE_FORMAT = 5  # 3: the key names the runtime and the decoder; 4: files by content digest; 5: shards and a manifest
AUGMENT_VERSION = 1  # of data.augmented_view (crop, aspect range, flip, per-image seed): change it with them


class Chain(nn.Module):
    """Runs a list of blocks in order (a slice of a backbone's chain; modules are shared, not copied)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        super().__init__()
        self.blocks = nn.ModuleList([module for _, module in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def default_ram_bytes() -> float:
    """A quarter of this machine's physical memory: the largest split of cached inputs loaded whole."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
    except (ValueError, OSError, AttributeError):
        return 4e9


class FeatureCache:
    """On-disk cache of a backbone prefix's outputs: one folder of shards per (split, key) (``features.shards``).

    The key covers everything that changes the numbers: backbone name and weights digest, where the
    chain is cut, the decoder and preprocessing, the image list with sizes, content digests and
    labels, the runtime that ran the prefix (name, version, precision) and the device type. An entry
    whose checksums do not match is reported, deleted and recomputed. A split of at most `ram_bytes`
    (default: a quarter of RAM) is loaded into memory; a larger one stays in its memory-mapped shards
    (:class:`ShardedRows`), streamed minibatch by minibatch. Shards hold about `shard_bytes` each.
    The images' digests are remembered in ``directory/digests/`` while a file is untouched
    (``transferlab.digests``). ``directory=None`` keeps nothing on disk (digests: in this process only).
    """

    def __init__(self, directory: str | os.PathLike | None, ram_bytes: float | None = None, shard_bytes: float = 64e6):
        self.directory = Path(directory).absolute() if directory is not None else None  # workers elsewhere get its paths
        self.ram_bytes = default_ram_bytes() if ram_bytes is None else ram_bytes
        self.shard_bytes = shard_bytes

    def sharing_memory(self, n: int) -> FeatureCache:
        """This cache for one of `n` entries held together (views of a split): each gets 1/n of the memory budget."""
        return FeatureCache(self.directory, self.ram_bytes / n, self.shard_bytes)

    @property
    def digest_memo_dir(self) -> Path | None:
        """Where the image files' content digests are remembered (None: in this process only)."""
        return self.directory / "digests" if self.directory is not None else None

    def key(self, backbone: Backbone, cut: str, split: Split, pre: Preprocessing, placement: Placement,
            runtime: PrefixRunner | None = None, augment: tuple[int, float] | None = None) -> str:
        """The cache key; `augment` = (seed, min_scale) for one augmented view of every image."""
        runtime = runtime or planned_runner("torch", placement)
        extra = {} if augment is None else {"augment": {"seed": augment[0], "min_scale": augment[1], "version": AUGMENT_VERSION}}
        return stable_hash(
            {
                **extra,
                "format": CACHE_FORMAT,
                "backbone": backbone.spec.name,
                "weights": backbone.weights_digest,
                "cut": cut,
                "decoder": DECODER,
                "preprocessing": dataclasses.asdict(pre),
                "files": split_fingerprint(split, self.digest_memo_dir),
                "runtime": [runtime.name, runtime.version],
                "precision": runtime.precision,
                "device": placement.device.type,
            },
            length=24,
        )

    def path(self, split: Split, key: str) -> Path:
        """The entry's folder (its shards and manifest)."""
        assert self.directory is not None
        return self.directory / f"{split.name}-{key}"

    def load(self, split: Split, key: str) -> SplitInputs | None:
        """The entry for (`split`, `key`), or None when there is none (or it was corrupt, and is now removed)."""
        if self.directory is None:
            return None
        folder = self.path(split, key)
        try:
            manifest = shards.read_manifest(folder)
            if manifest is None:
                return None
            shards.verify(folder, manifest)
            labels = shards.read_labels(folder, manifest)
            if not torch.equal(labels, torch.tensor(split.labels, dtype=torch.int64)):
                raise ValueError("labels do not match")
            rows = shards.ShardedRows.open(folder, manifest)
        except Exception as e:  # truncated, garbled or foreign files: never use them
            log.warning("feature cache %s is corrupt (%s); recomputing", folder, str(e)[:80])
            shards.remove_entry(folder)
            return None
        bad = sorted(i for entry in manifest["shards"] for i in entry["bad"])
        inputs = rows.load() if shards.entry_bytes(manifest) <= self.ram_bytes else rows
        return SplitInputs(inputs, labels, [split.files[i] for i in bad])

    def bounds(self, n_rows: int, row_shape: tuple[int, ...], batch_size: int) -> list[tuple[int, int]]:
        """The entry's shards, [start, stop) each."""
        return shards.shard_bounds(n_rows, 4 * math.prod(row_shape), self.shard_bytes, batch_size)


def find_bad_images(split: Split, pre: Preprocessing, num_workers: int | None = None, progress: bool = True) -> list[str]:
    """Decode every image of `split` once (for the uncached path) and return the files that fail; with
    `num_workers` None by the threads of this process (``data.loader.threaded_batches``), else by workers."""
    bad: list[str] = []
    bar = tqdm(total=len(split), desc=f"check {split.name}", unit="img", disable=not progress, leave=False)
    if num_workers is None:
        batches = threaded_batches(split, pre, consecutive_batches(len(split), 64))
    else:
        batches = image_loader(split, pre, 64, num_workers)
    for _x, _y, idx, ok in batches:
        bad += [split.files[i] for i in idx[~ok].tolist()]
        bar.update(len(idx))
    bar.close()
    return bad


def cached_split_inputs(
    backbone: Backbone,
    prefix: Chain,
    cut_name: str,
    split: Split,
    cache: FeatureCache,
    placement: Placement,
    on_bad_image: str = "error",
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    runtime: str = "torch",
    prepare_runner: Callable[[], PrefixRunner] | None = None,
    augment: tuple[int, float] | None = None,
    extractor: Extractor | None = None,
) -> tuple[SplitInputs, list[str], bool]:
    """The prefix's outputs for `split`, from the cache or computed once (by `runtime`) and stored.

    `prepare_runner` builds the runner on a cache miss (callers keep one per cut, so the splits
    share an exported session); a cache hit prepares nothing. Returns (inputs, skipped files,
    whether it was a cache hit); ``inputs.runtime`` says what computed them. With `augment` =
    (seed, min_scale) the images are one seeded augmented view each (cached under their own key).
    `extractor` computes a missing entry's shards (default: here, :func:`extract_job`; a cluster's:
    ``features.cluster``).
    """
    pre = backbone.spec.preprocessing
    runner = planned_runner(runtime, placement)
    key = cache.key(backbone, cut_name, split, pre, placement, runner, augment)
    item = cache.load(split, key)
    hit = item is not None
    if item is None:
        if prepare_runner is None:
            shape = (1, 3, pre.input_size, pre.input_size)
            key = onnx_export_key(backbone.spec.name, backbone.weights_digest, cut_name, shape)
            runner = prepare_prefix_runner(prefix, shape, runtime, placement, cache.directory, key)
        else:
            runner = prepare_runner()
        key = cache.key(backbone, cut_name, split, pre, placement, runner, augment)  # eager PyTorch if the runtime fell back
        item = cache.load(split, key)
        hit = item is not None
    while item is None:
        if cache.directory is None:
            inputs, bad_index = extract(prefix, split, pre, placement, batch_size, num_workers, progress, runner, augment)
            key = cache.key(backbone, cut_name, split, pre, placement, runner, augment)  # it may have fallen back midway
            item = SplitInputs(inputs, torch.tensor(split.labels, dtype=torch.int64), [split.files[i] for i in bad_index])
            break
        row_shape = output_shape(prefix, pre, placement)
        bounds = cache.bounds(len(split), row_shape, batch_size)
        export_key = onnx_export_key(backbone.spec.name, backbone.weights_digest, cut_name, (1, 3, pre.input_size, pre.input_size))
        job = ExtractionJob(prefix, split, pre, placement, runner, cache.path(split, key), bounds, row_shape, batch_size,
                            num_workers, progress, augment, cache.directory, export_key)
        if (extractor or extract_job)(job):
            item = cache.load(split, key)
            if item is None:
                where = "" if extractor is None else ": --cache-dir must be on storage every node of the cluster sees"
                raise UserError(f"the feature cache entry {cache.path(split, key)} cannot be read back after it was written{where}")
        else:  # the runtime fell back midway: start over under the fallback's key
            key = cache.key(backbone, cut_name, split, pre, placement, runner, augment)
            item = cache.load(split, key)
    item.runtime = runner.describe()
    keep = bad_image_policy(split, item.bad_files, on_bad_image)
    if len(keep) < len(split):
        rows = rows_of(item.inputs)
        rows = rows.select(keep) if isinstance(rows, shards.ShardedRows) else rows[keep]
        item = SplitInputs(rows, item.labels[keep], item.bad_files, item.runtime)
    return item, list(item.bad_files), hit


@torch.no_grad()
def run_frozen(blocks: nn.Module, inputs: torch.Tensor | shards.ShardedRows, placement: Placement, batch_size: int = 256) -> torch.Tensor:
    """Run frozen `blocks` (eval mode) over cached activations: deeper cached inputs from shallower ones."""
    blocks.eval()
    outs = [blocks(placement.put(inputs[i : i + batch_size])).float().cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def estimate_cache_bytes(prefix: nn.Module, pre: Preprocessing, n_images: int, placement: Placement) -> int:
    """Bytes needed to hold `prefix`'s float32 output for `n_images` images (one dummy forward on `placement`)."""
    return math.prod(output_shape(prefix, pre, placement)) * 4 * n_images

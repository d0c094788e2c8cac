"""One forward pass per image: run the frozen prefix of a backbone once and cache what it produces.

The backbone's chain of blocks is cut right before the first block that holds a trainable layer.
Everything before the cut is frozen and in eval mode, so its output is a fixed function of the image:
it is computed once per image (``extract``), kept on disk (``FeatureCache``), and training then runs
only the suffix. For a linear probe the cut is the classifier, and the cached tensors are the
penultimate features. The uncached path (``sources.ImageSource``) decodes and runs everything every
epoch; it is kept for augmentation and for the equivalence tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from transferlab.core.devices import Placement
from transferlab.core.files import atomic_write_bytes
from transferlab.core.hashing import stable_hash
from transferlab.data import DECODER, Preprocessing, Split, default_num_workers, image_loader, split_fingerprint
from transferlab.data.loader import threaded_batches
from transferlab.data.splits import bad_image_policy
from transferlab.features.runtimes import PrefixRunner, RuntimeFellBack, eager_runner, onnx_export_key, planned_runner, prepare_prefix_runner
from transferlab.features.sources import SplitInputs
from transferlab.models import Backbone

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # 3: the key names the runtime that ran the prefix, and the decoder; 4: files by content digest
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

    On CPU with `num_workers` None the images are decoded by a thread of this process, a few batches
    ahead of the runtime (worker processes would compete with the runtime's threads for the cores).

    Returns the float32 outputs on CPU, in split order, and the indices of files that failed to
    decode (their rows are zeros). On CUDA the pass uses pinned memory, channels_last and bf16
    autocast; outputs are stored in float32. If the runner's runtime fails midway, it falls back to
    eager PyTorch and the whole pass is redone, so one split never mixes two runtimes.
    """
    prefix.eval()
    runner = runner or eager_runner(prefix, placement, (1, 3, pre.input_size, pre.input_size))
    seed, min_scale = augment if augment is not None else (None, 1.0)
    loader: Iterable
    if num_workers is None and placement.device.type == "cpu":  # decoding threads overlap the runtime (see ImageSource)
        chunks = [list(range(i, min(i + batch_size, len(split)))) for i in range(0, len(split), batch_size)]
        loader = threaded_batches(split, pre, chunks, augment_seed=seed, min_scale=min_scale)
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


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


class FeatureCache:
    """On-disk cache of a backbone prefix's outputs, one safetensors file per (split, key).

    The key covers everything that changes the numbers: backbone name and weights digest, where the
    chain is cut, the decoder and preprocessing, the image list with sizes, content digests and
    labels, the runtime that ran the prefix (name, version, precision) and the device type. A file
    whose checksum does not match is reported, deleted and recomputed. The images' digests are
    remembered in ``directory/digests/`` while a file is untouched (``transferlab.digests``).
    ``directory=None`` keeps nothing on disk (digests are remembered in this process only).
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory is not None else None

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
        assert self.directory is not None
        return self.directory / f"{split.name}-{key}.safetensors"

    def load(self, split: Split, key: str) -> SplitInputs | None:
        if self.directory is None:
            return None
        path = self.path(split, key)
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                inputs, labels = f.get_tensor("inputs"), f.get_tensor("labels")
            if meta.get("inputs_sha256") != _tensor_digest(inputs) or meta.get("labels_sha256") != _tensor_digest(labels):
                raise ValueError("checksum mismatch")
            bad = json.loads(meta["bad_files"])
        except Exception as e:  # truncated, garbled or foreign file: never use it
            log.warning("feature cache %s is corrupt (%s); recomputing", path, str(e)[:80])
            path.unlink(missing_ok=True)
            return None
        return SplitInputs(inputs, labels, bad)

    def save(self, split: Split, key: str, item: SplitInputs) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save

        meta = {
            "inputs_sha256": _tensor_digest(item.inputs),
            "labels_sha256": _tensor_digest(item.labels),
            "bad_files": json.dumps(item.bad_files),
        }
        data = save({"inputs": item.inputs.contiguous(), "labels": item.labels.contiguous()}, metadata=meta)
        atomic_write_bytes(self.path(split, key), data)


def find_bad_images(split: Split, pre: Preprocessing, num_workers: int | None = None, progress: bool = True) -> list[str]:
    """Decode every image of `split` once (for the uncached path) and return the files that fail."""
    workers = default_num_workers() if num_workers is None else num_workers
    bad: list[str] = []
    bar = tqdm(total=len(split), desc=f"check {split.name}", unit="img", disable=not progress, leave=False)
    for _x, _y, idx, ok in image_loader(split, pre, 64, workers):
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
) -> tuple[SplitInputs, list[str], bool]:
    """The prefix's outputs for `split`, from the cache or computed once (by `runtime`) and stored.

    `prepare_runner` builds the runner on a cache miss (callers keep one per cut, so the splits
    share an exported session); a cache hit prepares nothing. Returns (inputs, skipped files,
    whether it was a cache hit); ``inputs.runtime`` says what computed them. With `augment` =
    (seed, min_scale) the images are one seeded augmented view each (cached under their own key).
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
    if item is None:
        inputs, bad_index = extract(prefix, split, pre, placement, batch_size, num_workers, progress, runner, augment)
        key = cache.key(backbone, cut_name, split, pre, placement, runner, augment)  # it may have fallen back midway
        labels = torch.tensor(split.labels, dtype=torch.int64)
        item = SplitInputs(inputs, labels, [split.files[i] for i in bad_index])
        cache.save(split, key, item)
    item.runtime = runner.describe()
    keep = bad_image_policy(split, item.bad_files, on_bad_image)
    if len(keep) < len(split):
        item = SplitInputs(item.inputs[keep], item.labels[keep], item.bad_files, item.runtime)
    return item, list(item.bad_files), hit


@torch.no_grad()
def run_frozen(blocks: nn.Module, inputs: torch.Tensor, placement: Placement, batch_size: int = 256) -> torch.Tensor:
    """Run frozen `blocks` (eval mode) over cached activations: deeper cached inputs from shallower ones."""
    blocks.eval()
    outs = [blocks(placement.put(inputs[i : i + batch_size])).float().cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def estimate_cache_bytes(prefix: nn.Module, pre: Preprocessing, n_images: int, placement: Placement) -> int:
    """Bytes needed to hold `prefix`'s float32 output for `n_images` images (one dummy forward on `placement`)."""
    prefix.eval()
    y = prefix(placement.put(torch.zeros(1, 3, pre.input_size, pre.input_size)))
    return y.numel() * 4 * n_images

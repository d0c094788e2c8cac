"""One forward pass per image: run the frozen prefix of a backbone once and cache what it produces.

The backbone's chain of blocks is cut right before the first block that holds a trainable layer.
Everything before the cut is frozen and in eval mode, so its output is a fixed function of the image:
it is computed once per image (``extract``), kept on disk (``FeatureCache``), and training then runs
only the suffix. For a linear probe the cut is the classifier, and the cached tensors are the
penultimate features. ``ImageSource`` is the uncached path (decode and run everything every epoch),
kept for augmentation and for the equivalence tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone
from .data import ImageDataset, Preprocessing, Split, describe_bad_image
from .runtimes import PrefixRunner, RuntimeFellBack, eager_runner, onnx_export_key, planned_runner, prepare_prefix_runner
from .utils import UserError, atomic_write_bytes, stable_hash

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the key names the runtime that ran the prefix


class Chain(nn.Module):
    """Runs a list of blocks in order (a slice of a backbone's chain; modules are shared, not copied)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        super().__init__()
        self.blocks = nn.ModuleList([module for _, module in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def first_trainable_block(chain: list[tuple[str, nn.Module]]) -> int:
    """Index of the first block that holds a trainable parameter (where a cache must stop)."""
    for i, (_, module) in enumerate(chain):
        if any(p.requires_grad for p in module.parameters()):
            return i
    raise ValueError("no block holds a trainable parameter")


def default_num_workers() -> int:
    """Decoding workers for extraction: enough to keep the model busy on a laptop."""
    return min(4, os.cpu_count() or 1)


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


@dataclass
class SplitInputs:
    """What the trainable suffix sees for one split: inputs, labels, and files that failed to decode."""

    inputs: torch.Tensor  # (N, ...) float32, on CPU
    labels: torch.Tensor  # (N,) int64
    bad_files: list[str]
    runtime: dict | None = None  # what computed `inputs` (PrefixRunner.describe()), when it was a frozen prefix


def _seed_worker(worker_id: int) -> None:
    """Seed numpy / random in each decoding worker from torch's per-worker seed (set by the loader's generator)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader(split: Split, pre: Preprocessing, batch_size: int, num_workers: int, batch_sampler=None, pin=False,
            augment_seed: int | None = None):
    # Augmentations draw from per-item generators (see ImageDataset); the workers are seeded anyway
    # so nothing else they might randomise escapes the seed (pytorch#7068).
    dataset = ImageDataset(split, pre, augment_seed)
    kwargs = dict(num_workers=num_workers, pin_memory=pin, worker_init_fn=_seed_worker,
                  generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


@torch.no_grad()
def extract(
    prefix: nn.Module,
    split: Split,
    pre: Preprocessing,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    runner: PrefixRunner | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Run `prefix` (eval mode) once over every image of `split`, through `runner` (default: eager PyTorch).

    Returns the float32 outputs on CPU, in split order, and the indices of files that failed to
    decode (their rows are zeros). On CUDA the pass uses pinned memory, channels_last and bf16
    autocast; outputs are stored in float32. If the runner's runtime fails midway, it falls back to
    eager PyTorch and the whole pass is redone, so one split never mixes two runtimes.
    """
    prefix.eval()
    runner = runner or eager_runner(prefix, device, (1, 3, pre.input_size, pre.input_size))
    workers = default_num_workers() if num_workers is None else num_workers
    cuda = device.type == "cuda"
    loader = _loader(split, pre, batch_size, workers, pin=cuda)
    out: torch.Tensor | None = None
    bad: list[int] = []
    bar = tqdm(total=len(split), desc=f"extract {split.name} ({runner.name})", unit="img", disable=not progress, leave=False)
    for x, _y, idx, ok in loader:
        try:
            y = runner(x)
        except RuntimeFellBack:
            bar.close()
            return extract(prefix, split, pre, device, batch_size, num_workers, progress, runner)
        if out is None:
            out = torch.empty((len(split),) + tuple(y.shape[1:]), dtype=torch.float32)
        out[idx] = y
        bad += idx[~ok].tolist()
        bar.update(len(idx))
    bar.close()
    assert out is not None, "empty split"
    return out, sorted(bad)


def _file_fingerprint(split: Split) -> list:
    rows = []
    for path in split.files:
        try:
            st = os.stat(path)
            rows.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            rows.append([path, -1, -1])
    return rows


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


class FeatureCache:
    """On-disk cache of a backbone prefix's outputs, one safetensors file per (split, key).

    The key covers everything that changes the numbers: backbone name and weights digest, where the
    chain is cut, preprocessing, the image list with sizes and modification times, labels, precision
    and device type. A file whose checksum does not match is reported, deleted and recomputed.
    ``directory=None`` keeps nothing on disk.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory is not None else None

    def key(self, backbone: Backbone, cut: str, split: Split, pre: Preprocessing, device: torch.device,
            runtime: PrefixRunner | None = None) -> str:
        runtime = runtime or planned_runner("torch", device)
        return stable_hash(
            {
                "format": CACHE_FORMAT,
                "backbone": backbone.spec.name,
                "weights": backbone.weights_digest,
                "cut": cut,
                "preprocessing": dataclasses.asdict(pre),
                "files": _file_fingerprint(split),
                "labels": list(split.labels),
                "precision": runtime.precision,
                "device": device.type,
                "runtime": [runtime.name, runtime.version],  # features of two runtimes are never mixed
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


def bad_image_policy(split: Split, bad_files: list[str], on_bad_image: str) -> list[int]:
    """Indices of `split` to keep. 'error': one UserError listing every bad file; 'skip': drop them (logged)."""
    if not bad_files:
        return list(range(len(split)))
    if on_bad_image == "error":
        listing = "; ".join(f"{p} ({describe_bad_image(p)})" for p in bad_files)
        raise UserError(
            f"{len(bad_files)} image(s) in split '{split.name}' cannot be decoded: {listing} "
            "(fix or remove them, or pass --on-bad-image skip)"
        )
    for p in bad_files:
        log.warning("skipping unreadable image %s", p)
    bad = set(bad_files)
    return [i for i, f in enumerate(split.files) if f not in bad]


def find_bad_images(split: Split, pre: Preprocessing, num_workers: int | None = None, progress: bool = True) -> list[str]:
    """Decode every image of `split` once (for the uncached path) and return the files that fail."""
    workers = default_num_workers() if num_workers is None else num_workers
    bad: list[str] = []
    bar = tqdm(total=len(split), desc=f"check {split.name}", unit="img", disable=not progress, leave=False)
    for _x, _y, idx, ok in _loader(split, pre, 64, workers):
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
    device: torch.device,
    on_bad_image: str = "error",
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    runtime: str = "torch",
) -> tuple[SplitInputs, list[str], bool]:
    """The prefix's outputs for `split`, from the cache or computed once (by `runtime`) and stored.

    Returns (inputs, skipped files, whether it was a cache hit). A cache hit prepares no runtime.
    """
    pre = backbone.spec.preprocessing
    runner = planned_runner(runtime, device)
    key = cache.key(backbone, cut_name, split, pre, device, runner)
    item = cache.load(split, key)
    hit = item is not None
    if item is None:
        shape = (1, 3, pre.input_size, pre.input_size)
        runner = prepare_prefix_runner(prefix, shape, runtime, device, cache.directory,
                                       onnx_export_key(backbone.spec.name, backbone.weights_digest, cut_name, shape))
        key = cache.key(backbone, cut_name, split, pre, device, runner)  # eager PyTorch if the runtime fell back
        item = cache.load(split, key)
        hit = item is not None
    if item is None:
        inputs, bad_index = extract(prefix, split, pre, device, batch_size, num_workers, progress, runner)
        key = cache.key(backbone, cut_name, split, pre, device, runner)  # it may have fallen back midway
        labels = torch.tensor(split.labels, dtype=torch.int64)
        item = SplitInputs(inputs, labels, [split.files[i] for i in bad_index])
        cache.save(split, key, item)
    item.runtime = runner.describe()
    keep = bad_image_policy(split, item.bad_files, on_bad_image)
    if len(keep) < len(split):
        item = SplitInputs(item.inputs[keep], item.labels[keep], item.bad_files, item.runtime)
    return item, list(item.bad_files), hit


@torch.no_grad()
def run_frozen(blocks: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Run frozen `blocks` (eval mode) over cached activations: deeper cached inputs from shallower ones."""
    blocks.eval()
    outs = [blocks(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def estimate_cache_bytes(prefix: nn.Module, pre: Preprocessing, n_images: int) -> int:
    """Bytes needed to hold `prefix`'s float32 output for `n_images` images (one dummy forward)."""
    prefix.eval()
    y = prefix(torch.zeros(1, 3, pre.input_size, pre.input_size))
    return y.numel() * 4 * n_images


class TensorSource:
    """Training inputs held as one tensor; minibatches are index lookups (no DataLoader)."""

    def __init__(self, item: SplitInputs, device: torch.device):
        self.inputs = item.inputs.to(device)
        self.labels = item.labels.to(device)

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

    def __init__(self, split: Split, pre: Preprocessing, device: torch.device, num_workers: int | None = None,
                 augment_seed: int | None = None):
        self.split, self.pre, self.device = split, pre, device
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment_seed = augment_seed
        self.passes = 0

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        seed = None if self.augment_seed is None else self.augment_seed * 100_003 + self.passes
        self.passes += 1
        for x, y, idx, ok in _loader(self.split, self.pre, batch_size, self.num_workers, batch_sampler=chunks, augment_seed=seed):
            if not bool(ok.all()):
                bad = [self.split.files[i] for i in idx[~ok].tolist()]
                raise UserError(f"image(s) cannot be decoded: {'; '.join(bad)}")
            yield x.to(self.device), y.to(self.device)

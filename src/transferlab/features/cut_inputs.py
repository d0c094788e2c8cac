"""The inputs of a cut: what the trainable layers of one backbone see on one set of splits.

For each number of trainable layers, :class:`CutInputs` plans where the backbone's chain is cut
(``freezing.plan_cut``), computes or loads the frozen prefix's outputs once per split (or once at the
shared fine-tuning cut, running the blocks in between), and serves the train, val and test sources
and the augmented train views. A :class:`CutSnapshot` carries one cut's cached inputs to a worker,
which then trains without extracting anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferlab.core.devices import Placement, keep_freed_memory
from transferlab.data import ImageSplits, Split
from transferlab.data.splits import bad_image_policy
from transferlab.features.cache import Chain, estimate_cache_bytes, find_bad_images
from transferlab.features.cut_plan import AT_INPUT, cache_refusal, n_images, parse_feature_augment, refuse_feature_augment, shared_base
from transferlab.features.cut_setup import Setup, ViewsKey, split_inputs_at
from transferlab.features.engine import EngineConfig
from transferlab.features.extraction import Extractor
from transferlab.features.sources import BatchSource, ImageSource, SplitInputs, TensorSource, stack_views, view_seed
from transferlab.models import Backbone
from transferlab.models.freezing import Cut, plan_cut
from transferlab.models.heads import new_head

log = logging.getLogger(__name__)


@dataclass
class CutSnapshot:
    """What a worker needs to train one cut without extracting anything: its cached inputs, on CPU (picklable)."""

    n_trainable_layers: int
    train: SplitInputs
    val: SplitInputs
    views: dict[ViewsKey, SplitInputs] = field(default_factory=dict)  # augmented train views (--ft-augment views:K)


class CutInputs:
    """The inputs of every cut of one (backbone, splits), sharing one frozen forward pass per image."""

    def __init__(self, backbone: Backbone, splits: ImageSplits, engine: EngineConfig, cache_dir: str | Path | None,
                 on_bad_image: str = "error", share_cut_layers: int | None = None, layer_order: str = "forward", extractor: Extractor | None = None):
        # `extractor` computes missing cache entries (None: here; features.cluster: on a Ray cluster)
        self.backbone, self.splits, self.engine, self.extractor = backbone, splits, engine, extractor
        self.layer_order = layer_order  # which layers "the last k" are (freezing.ordered_layers)
        self.placement = Placement.of(engine.device, engine.dtype)
        keep_freed_memory()  # training and extraction allocate the same large tensors step after step
        self.cache, self.on_bad_image = engine.feature_cache(cache_dir), on_bad_image
        # With LP-then-FT, cache only at the fine-tuning cut and derive shallower cuts' inputs from it,
        # so each image still goes through the backbone once.
        self.share_cut_layers = share_cut_layers
        self.n_classes = len(splits.classes)
        # Skipped files per split: listed but missing (skipped when the splits were made), then undecodable.
        self.skipped_files: dict[str, list[str]] = {name: list(files) for name, files in splits.missing_files.items()}
        self.timings: dict[str, float] = {}
        self._setups: dict[int, Setup] = {}
        self._origins: dict[int, str | None] = {}
        # The backbone as every cut sees it: a head for these classes, on the engine's device.
        backbone.reset_classifier(new_head(backbone.feature_dim, self.n_classes, seed=0))
        backbone.model.to(self.placement.device, self.placement.dtype)
        backbone.model.to(memory_format=torch.channels_last)  # as Placement.put gives it images

    def setup(self, n_trainable_layers: int) -> Setup:
        """The cut and train/val inputs for `n_trainable_layers` (computed on first use, then kept)."""
        if n_trainable_layers not in self._setups:
            self._setups[n_trainable_layers] = self._make_setup(n_trainable_layers)
        return self._setups[n_trainable_layers]

    def _make_setup(self, k: int) -> Setup:
        cut, notice = plan_cut(self.backbone, k, self.layer_order), ""
        if self.engine.use_cache:
            prefix = Chain(self.backbone.chain()[: cut.index])
            notice = cache_refusal(self.backbone, cut, lambda: estimate_cache_bytes(
                prefix, self.backbone.spec.preprocessing, n_images(self.splits), self.placement), self.engine.cache_max_gb)
            if notice:
                log.warning(notice)
        # Training from the image (the whole network): nothing frozen runs before it, nothing to cache.
        cached = self.engine.use_cache and not notice and cut.index > 0
        setup = Setup(cut, cached, notice, self._shared_base(cut) if cached else None)
        for split in (self.splits.train, self.splits.val):
            setup.sources[split.name] = self._source(split, setup)
        return setup

    def _shared_base(self, cut: Cut) -> int | None:
        # Cuts derived from a shared base are computed into memory: the base must fit the memory budget too.
        return shared_base(self.backbone, cut, self.share_cut_layers, self.layer_order, n_images(self.splits), self.placement,
                           min(self.engine.cache_max_gb, self.cache.ram_bytes / 1e9))

    def _source(self, split: Split, setup: Setup) -> BatchSource:
        start = time.perf_counter()
        source: BatchSource
        if setup.cached:
            source = TensorSource(self._cached_item(split, setup), self.placement)
        else:
            pre = self.backbone.spec.preprocessing
            bad = find_bad_images(split, pre, self.engine.num_workers, self.engine.progress)
            keep = bad_image_policy(split, bad, self.on_bad_image)
            if bad:
                self._record_skipped(split.name, bad)
                split = split.subset(keep)
            source = ImageSource(split, pre, self.placement, self.engine.num_workers)
        _add_time(self.timings, f"inputs_{split.name}_s", start)
        return source

    def _cached_item(self, split: Split, setup: Setup, augment: tuple[int, float] | None = None, n_views: int = 1) -> SplitInputs:
        cache = self.cache if n_views == 1 else self.cache.sharing_memory(n_views)  # K views share the memory budget
        item, skipped = split_inputs_at(self.backbone, setup, split, cache, self.placement, self.engine, self.on_bad_image, augment,
                                        self.extractor)
        if skipped:
            self._record_skipped(split.name, skipped)
        return item

    def _record_skipped(self, split_name: str, files: list[str]) -> None:
        """Add undecodable `files` to the split's skipped files (after its missing ones; each file once)."""
        known = self.skipped_files.setdefault(split_name, [])
        known += [f for f in dict.fromkeys(files) if f not in set(known)]

    def views(self, n_trainable_layers: int, n_views: int, seed: int, min_scale: float) -> SplitInputs:
        """`n_views` seeded augmented views of every training image at the cut, stacked (K, N, ...).

        View v is cached on its own (keyed by its seed and `min_scale`), so views:2 reuses views:4's
        first two files; it equals pass v of the uncached ``--augment`` path with the same seed.
        """
        setup = self.setup(n_trainable_layers)
        key = (n_views, seed, min_scale)
        if key not in setup.views:
            self.check_feature_augment(f"views:{n_views}", n_trainable_layers)
            start = time.perf_counter()
            items = [self._cached_item(self.splits.train, setup, (view_seed(seed, v), min_scale), n_views) for v in range(n_views)]
            _add_time(self.timings, "inputs_views_s", start)
            setup.views[key] = stack_views(items)
        return setup.views[key]

    def cache_origin(self, n_trainable_layers: int) -> str | None:
        """The chain block whose input the frozen prefix computes for `n_trainable_layers` (the cut, or the shared
        fine-tuning cut it is derived from); None when uncached. Planned without extracting anything."""
        if not self.engine.use_cache:
            return None
        if n_trainable_layers not in self._origins:
            cut = plan_cut(self.backbone, n_trainable_layers, self.layer_order)
            base = self._shared_base(cut)
            self._origins[n_trainable_layers] = None if cut.index == 0 else self.backbone.chain()[cut.index if base is None else base][0]
        return self._origins[n_trainable_layers]

    def check_feature_augment(self, feature_augment: str, n_trainable_layers: int) -> None:
        """A ConfigError now if `feature_augment` cannot run for `n_trainable_layers` (rather than in every run)."""
        if (parse_feature_augment(feature_augment) or ("none",))[0] == "none":
            return
        setup = self.setup(n_trainable_layers)
        train = setup.sources["train"]
        shape = tuple(train.inputs.shape[1:]) if isinstance(train, TensorSource) else ()
        uncached = "" if setup.cached else setup.notice or (AT_INPUT if setup.cut.index == 0 else "drop --no-cache")
        refuse_feature_augment(feature_augment, uncached, setup.cut.name, shape, len(train), self.engine.cache_max_gb)

    def split_source(self, n_trainable_layers: int, split: Split | None) -> BatchSource | None:
        """`split`'s inputs at the cut (the test split, an extra test set), computed on first use; None for no split."""
        if split is None:
            return None
        setup = self.setup(n_trainable_layers)
        if split.name not in setup.sources:
            setup.sources[split.name] = self._source(split, setup)
        return setup.sources[split.name]

    def net(self, n_trainable_layers: int) -> torch.nn.Module:
        """What maps these inputs to logits: the chain after the cut, or the whole chain."""
        setup = self.setup(n_trainable_layers)
        chain = self.backbone.chain()  # rebuilt: the head module is replaced by every run
        return Chain(chain[setup.cut.index :] if setup.cached else chain)

    def snapshot(self, n_trainable_layers: int, views_keys: list[ViewsKey] | None = None) -> CutSnapshot | None:
        """The cut's cached train/val inputs on CPU and its train views for `views_keys` (computed now where
        missing; None: the views computed so far), to ship to workers; None when uncached."""
        setup = self.setup(n_trainable_layers)
        if not setup.cached:
            return None
        train, val = setup.sources["train"], setup.sources["val"]
        assert isinstance(train, TensorSource) and isinstance(val, TensorSource)
        views = {key: self.views(n_trainable_layers, *key) for key in (list(setup.views) if views_keys is None else views_keys)}
        return CutSnapshot(n_trainable_layers, _on_cpu(train), _on_cpu(val), views)

    def adopt(self, snapshot: CutSnapshot) -> None:
        """Use `snapshot`'s inputs (cached elsewhere, by a coordinating process) for its cut: no extraction here."""
        cut = plan_cut(self.backbone, snapshot.n_trainable_layers, self.layer_order)
        sources: dict[str, BatchSource] = {name: TensorSource(item, self.placement)
                                           for name, item in (("train", snapshot.train), ("val", snapshot.val))}
        self._setups[snapshot.n_trainable_layers] = Setup(cut, True, "", sources=sources, views=dict(snapshot.views))


def _on_cpu(source: TensorSource) -> SplitInputs:
    """A cached source's inputs as float32 on CPU, to ship (streamed shards ship as their paths)."""
    return SplitInputs(source.inputs.float().cpu(), source.labels.cpu(), [])


def _add_time(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start

"""One cut's setup (:class:`Setup`) and a split's inputs at it: the frozen prefix's outputs, loaded from the
cache or computed once, by one runtime for all the splits of a setup, and run on from a shared earlier cut."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transferlab.core.devices import Placement
from transferlab.core.errors import UserError
from transferlab.data import Split
from transferlab.features.cache import Chain, FeatureCache, cached_split_inputs, run_frozen
from transferlab.features.engine import EngineConfig
from transferlab.features.extraction import Extractor
from transferlab.features.runtimes import PrefixRunner, onnx_export_key, prepare_prefix_runner
from transferlab.features.sources import BatchSource, SplitInputs, rows_of
from transferlab.models import Backbone
from transferlab.models.freezing import Cut

log = logging.getLogger(__name__)

ViewsKey = tuple[int, int, float]  # (K, seed, min_scale) of a set of augmented train views


@dataclass
class Setup:
    """The cut and the training inputs for one number of trainable layers."""

    cut: Cut
    cached: bool  # inputs are the frozen prefix's cached outputs (else images, whole model every epoch)
    notice: str  # why caching was turned off, if it was
    base: int | None = None  # cached at this earlier (fine-tuning) block instead, then run up to the cut
    sources: dict[str, BatchSource] = field(default_factory=dict)
    views: dict[ViewsKey, SplitInputs] = field(default_factory=dict)  # (K, seed, min_scale) -> (K, N, ...) train views
    runner: PrefixRunner | None = None  # what runs the frozen prefix on a cache miss (prepared once, shared by the splits)
    runtime: dict | None = None  # what computed the cached inputs (PrefixRunner.describe())

    @property
    def cut_name(self) -> str:
        return self.cut.name


def split_inputs_at(backbone: Backbone, setup: Setup, split: Split, cache: FeatureCache, placement: Placement,
                    engine: EngineConfig, on_bad_image: str, augment: tuple[int, float] | None = None,
                    extractor: Extractor | None = None) -> tuple[SplitInputs, list[str]]:
    """The inputs at `setup`'s cut for `split` (one augmented view each with `augment` = (seed, min_scale)) and the
    files that could not be decoded, from the cache or computed once by the frozen prefix (at the setup's
    shared base, then run up to the cut). The first split fixes the setup's runtime: a later one that fell
    back to another runtime is recomputed the way the first was."""
    chain, base = backbone.chain(), setup.base
    at = setup.cut.index if base is None else base
    prefix, cut_name = Chain(chain[:at]), chain[at][0]

    def prepare_runner() -> PrefixRunner:
        if setup.runner is None:
            pre = backbone.spec.preprocessing
            shape = (1, 3, pre.input_size, pre.input_size)
            key = onnx_export_key(backbone.spec.name, backbone.weights_digest, cut_name, shape)
            setup.runner = prepare_prefix_runner(prefix, shape, engine.runtime, placement, cache.directory, key)
        return setup.runner

    def load(runtime: str) -> tuple[SplitInputs, list[str]]:
        item, skipped, _hit = cached_split_inputs(
            backbone, prefix, cut_name, split, cache, placement, on_bad_image,
            num_workers=engine.num_workers, progress=engine.progress, runtime=runtime,
            prepare_runner=prepare_runner, augment=augment, extractor=extractor,
        )
        return item, skipped

    # Later splits look for what the first one was computed by, so one setup's splits share a runtime.
    item, skipped = load(setup.runtime["name"] if setup.runtime else engine.runtime)
    if not _same_runtime(setup.runtime, item.runtime):
        # The runtime failed on this split and fell back: compute it the way the others were.
        log.warning("%s: recomputing split %s with %s, as the other splits were", cut_name, split.name, setup.runtime)
        setup.runner = None
        item, skipped = load(setup.runtime["name"] if setup.runtime else "torch")
        if not _same_runtime(setup.runtime, item.runtime):
            raise UserError(f"split {split.name} cannot be computed by {(setup.runtime or {}).get('name')} as the other "
                            f"splits were ({(item.runtime or {}).get('notice')}); pass --runtime torch, or remove {cache.directory}")
    setup.runtime = setup.runtime or item.runtime
    if base is not None:
        item = SplitInputs(run_frozen(Chain(chain[base : setup.cut.index]), rows_of(item.inputs), placement), item.labels, item.bad_files)
    return item, skipped


def _same_runtime(held: dict | None, runtime: dict | None) -> bool:
    """Whether `runtime` computed what a setup holding `held` holds (one runtime per setup, never a mix)."""
    def what(r: dict | None) -> tuple:
        return (r or {}).get("name"), (r or {}).get("version"), (r or {}).get("precision")

    return held is None or what(held) == what(runtime)

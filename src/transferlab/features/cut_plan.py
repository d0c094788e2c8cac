"""A cut planned before anything is extracted: whether its input would be cached, at which shared
fine-tuning cut, and whether a feature-level augmentation (``--ft-augment``) can run on it.

The same rules serve a sweep's preflight (every backbone checked before anything is written) and
:class:`~transferlab.features.cut_inputs.CutInputs` (which then extracts), so both refuse with the
same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from transferlab.core.devices import Placement
from transferlab.core.errors import ConfigError
from transferlab.data import ImageSplits
from transferlab.features.cache import Chain, estimate_cache_bytes
from transferlab.features.engine import EngineConfig, over_budget
from transferlab.models import Backbone
from transferlab.models.freezing import Cut, plan_cut


def parse_feature_augment(text: str) -> tuple[str, int] | None:
    """("none", 0), ("map", 0) or ("views", K) from a --ft-augment value; None if it is not one."""
    if text in ("none", "map"):
        return text, 0
    kind, _, k = text.partition(":")
    if kind == "views" and k.isdigit() and int(k) >= 1:
        return "views", int(k)
    return None


def n_images(splits: ImageSplits) -> int:
    """Images of every split, the test split included: what a cache holds."""
    return sum(len(s) for s in (splits.train, splits.val, splits.test) if s is not None)


AT_INPUT = "the trainable part starts at the image, so nothing before it is cached"


def cache_refusal(backbone: Backbone, cut: Cut, need_bytes: Callable[[], float], max_gb: float) -> str:
    """Why the input of `cut` is not cached (the notice's words), or ''; `need_bytes` is asked only for a cut
    after the first block."""
    if cut.index == 0 and len(backbone.chain()) <= 2:  # nothing frozen comes before the first trainable block
        return (f"{backbone.spec.name} has no blocks to cut between (chain: features, head): "
                "fine-tuning runs the whole model every epoch, uncached")
    if cut.index:
        need = need_bytes()
        if need > max_gb * 1e9:
            return f"cache for the input of {cut.name} would take {over_budget(need, max_gb)}; running the full model every epoch"
    return ""


def shared_base(backbone: Backbone, cut: Cut, share_cut_layers: int | None, layer_order: str, n_images: int,
                placement: Placement, max_gb: float) -> int | None:
    """The chain index of the fine-tuning cut (`share_cut_layers` trainable) to cache at instead of `cut`, when
    it is earlier and its input for `n_images` images fits the budget; None otherwise."""
    if share_cut_layers is None:
        return None
    base = plan_cut(backbone, share_cut_layers, layer_order).index
    if base >= cut.index or base == 0:  # at the input there is no frozen pass to share, only images
        return None
    need = estimate_cache_bytes(Chain(backbone.chain()[:base]), backbone.spec.preprocessing, n_images, placement)
    return base if need <= max_gb * 1e9 else None


def refuse_feature_augment(feature_augment: str, uncached: str, cut_name: str, shape: tuple[int, ...], n_train: int,
                           max_gb: float) -> None:
    """A ConfigError if `feature_augment` cannot run on a cut whose input is not cached (`uncached` says why)
    or has `shape` per image (float32) for `n_train` training images. Views where the images are decoded
    every epoch anyway (uncached, e.g. a cut at the input: the whole network trains) are drawn on the fly,
    fresh every epoch, as ``--augment`` draws them: nothing to cache, nothing to refuse."""
    kind, n_views = parse_feature_augment(feature_augment) or ("none", 0)
    if kind == "none" or (kind == "views" and uncached):
        return
    if uncached:
        raise ConfigError("feature_augment", feature_augment, f"needs the cached path ({uncached}; or --ft-augment none)")
    if kind == "map" and len(shape) != 3:
        raise ConfigError("feature_augment", "map", f"needs cached spatial maps before global pooling; the input of "
                          f"{cut_name} is {shape} (train more layers, or use views:K)")
    need = math.prod(shape) * 4 * n_train * n_views
    if need > max_gb * 1e9:
        raise ConfigError("feature_augment", feature_augment, f"would hold {over_budget(need, max_gb, ' of views')}; "
                          "fewer views, a larger budget, or --ft-augment none")


def check_feature_augment_planned(backbone: Backbone, splits: ImageSplits, engine: EngineConfig, feature_augment: str,
                                  n_trainable_layers: int, layer_order: str = "forward") -> None:
    """The refusals of ``CutInputs.check_feature_augment``, planned before any image is read: the cut, whether
    its input would be cached, and that input's shape from one dummy forward. It counts the training images
    before the bad-image policy drops any, so it never accepts what the extracted check refuses. Side-effect
    free: nothing is extracted or kept, the modules' train/eval modes are restored."""
    if (parse_feature_augment(feature_augment) or ("none",))[0] == "none":
        return
    cut = plan_cut(backbone, n_trainable_layers, layer_order)
    size = backbone.spec.preprocessing.input_size
    modes = {m: m.training for m in backbone.model.modules()}
    try:
        prefix = Chain(backbone.chain()[: cut.index]).eval()  # eval: batch norm must not update its statistics
        with torch.no_grad():
            shape = tuple(prefix(Placement.of(engine.device, engine.dtype).put(torch.zeros(1, 3, size, size))).shape[1:])
    finally:
        for module, training in modes.items():
            module.training = training
    need = math.prod(shape) * 4 * n_images(splits)  # float32, as cached
    uncached = ("drop --no-cache" if not engine.use_cache else AT_INPUT if cut.index == 0
                else cache_refusal(backbone, cut, lambda: need, engine.cache_max_gb))
    refuse_feature_augment(feature_augment, uncached, cut.name, shape, len(splits.train), engine.cache_max_gb)

"""A backbone and a data folder made ready for many runs that share one forward pass per image.

A :class:`Workbench` loads nothing itself: it is given a backbone and splits, and for each number
of trainable layers it plans where the backbone's chain is cut (``freezing.plan_cut``), computes or
loads the frozen prefix's outputs once per split, and then serves any number of training runs that
each start from the pristine pretrained weights and a head initialised from the run's seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferlab.core.devices import Placement
from transferlab.core.errors import ConfigError, UserError
from transferlab.core.fields import option
from transferlab.data import ImageSplits, Split
from transferlab.features.cache import Chain, FeatureCache, bad_image_policy, cached_split_inputs, estimate_cache_bytes, find_bad_images, run_frozen
from transferlab.features.runtimes import RUNTIMES, PrefixRunner, onnx_export_key, prepare_prefix_runner
from transferlab.features.sources import BatchSource, ImageSource, MapAugmentSource, SplitInputs, TensorSource, ViewSource, view_seed
from transferlab.models import Backbone
from transferlab.models.freezing import Cut, FreezePlan, frozen_digest, layer_of, load_state_strict, plan_cut, set_train_mode, trainable_state_keys
from transferlab.models.heads import new_head
from transferlab.train.training import EpochRecord, FitResult, TrainConfig, fit, parse_feature_augment, predict_proba, wise_interpolate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How runs are executed; none of these change the numbers on CPU."""

    device: str = option("auto", "auto | cpu | cuda")
    dtype: str = option("float32", "numeric type of the model: float32, or float64 for reference checks", choices=("float32", "float64"))
    use_cache: bool = option(True, "run the frozen backbone on every image every epoch", flag="--no-cache", invert=True)
    cache_dir: str | None = option(None, "feature cache folder (default: OUT/cache)")
    cache_max_gb: float = option(4.0, "largest activation cache to keep in memory")
    num_workers: int | None = option(None, "image decoding workers (default: min(4, cores))", flag="--workers")
    progress: bool = option(True, "no progress bars", flag="--no-progress", invert=True)
    runtime: str = option("auto", "what runs the frozen layers: auto (OpenVINO, else ONNX Runtime, else PyTorch on CPU; "
                          "PyTorch on CUDA), torch, compile, onnxruntime, openvino", choices=RUNTIMES)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A ConfigError naming the field for a value that cannot work (checked on construction)."""
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 0):
            raise ConfigError("num_workers", self.num_workers, "must be 0 (decode in this process) or a positive number of workers")
        if isinstance(self.cache_max_gb, bool) or not isinstance(self.cache_max_gb, (int, float)) \
                or not math.isfinite(self.cache_max_gb) or self.cache_max_gb < 0:
            raise ConfigError("cache_max_gb", self.cache_max_gb, "must be a finite number of GB, 0 or more")


def size_text(n_bytes: float) -> str:
    """`n_bytes` in kB, MB or GB with 3 significant digits, rounded up: a size said to exceed a limit does."""
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0)) if n_bytes >= s or s == 1.0)
    x = n_bytes / scale
    if unit == "B":
        return f"{math.ceil(x)} B"
    digits = 2 - math.floor(math.log10(x))  # decimals that leave 3 significant digits
    step = 10.0 ** -digits
    return f"{math.ceil(x / step) * step:.{max(0, digits)}f} {unit}"


def _over_budget(need: float, max_gb: float, what: str = "") -> str:
    """'31.3 MB{what} > --cache-max-gb 0.02 (20 MB)': both sides in one unit, the need rounded up."""
    shown = size_text(need)
    unit = shown.split()[1]
    scale = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1.0}[unit]
    return f"{shown}{what} > --cache-max-gb {max_gb:g} ({max_gb * 1e9 / scale:g} {unit})"


class FrozenWeightsChanged(RuntimeError):
    """A parameter or buffer that should be frozen changed during training (MoCo's linear-eval check)."""


@dataclass
class Setup:
    """The cut and the training inputs for one number of trainable layers."""

    cut: Cut
    cached: bool  # inputs are the frozen prefix's cached outputs (else images, whole model every epoch)
    notice: str  # why caching was turned off, if it was
    base: int | None = None  # cached at this earlier (fine-tuning) block instead, then run up to the cut
    sources: dict[str, BatchSource] = field(default_factory=dict)
    views: dict[tuple[int, int, float], SplitInputs] = field(default_factory=dict)  # (K, seed, min_scale) -> (K, N, ...) train views
    runner: PrefixRunner | None = None  # what runs the frozen prefix on a cache miss (prepared once, shared by the splits)
    runtime: dict | None = None  # what computed the cached inputs (PrefixRunner.describe())

    @property
    def cut_name(self) -> str:
        return self.cut.name


@dataclass
class TestEvaluation:
    """The chosen model's predictions on the test split (computed once)."""

    accuracy: float
    probs: torch.Tensor  # (N, C) float64
    labels: list[int]
    files: list[str]


class Workbench:
    """Runs on one (backbone, data folder), sharing one frozen forward pass per image between them."""

    def __init__(
        self,
        backbone: Backbone,
        splits: ImageSplits,
        engine: EngineConfig,
        cache_dir: str | Path | None,
        on_bad_image: str = "error",
        share_cut_layers: int | None = None,
        layer_order: str = "forward",
    ):
        self.backbone = backbone
        self.layer_order = layer_order  # which layers "the last k" are (freezing.ordered_layers)
        self.splits = splits
        self.engine = engine
        self.placement = Placement.of(engine.device, engine.dtype)
        self.cache = FeatureCache(cache_dir)
        self.on_bad_image = on_bad_image
        # With LP-then-FT, cache only at the fine-tuning cut and derive shallower cuts' inputs from it,
        # so each image still goes through the backbone once.
        self.share_cut_layers = share_cut_layers
        self.n_classes = len(splits.classes)
        # Skipped files per split: listed but missing (skipped when the splits were made), then undecodable.
        self.skipped_files: dict[str, list[str]] = {name: list(files) for name, files in splits.missing_files.items()}
        self.timings: dict[str, float] = {}
        self._setups: dict[int, Setup] = {}
        self._origins: dict[int, str] = {}
        backbone.reset_classifier(new_head(backbone.feature_dim, self.n_classes, seed=0))
        backbone.model.to(self.placement.device, self.placement.dtype)
        if self.placement.device.type == "cuda":
            backbone.model.to(memory_format=torch.channels_last)
        self._pristine = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    # -- inputs for a number of trainable layers ---------------------------------------------------
    def setup(self, n_trainable_layers: int) -> Setup:
        """The cut and train/val inputs for `n_trainable_layers` (computed on first use, then kept)."""
        if n_trainable_layers not in self._setups:
            self._setups[n_trainable_layers] = self._make_setup(n_trainable_layers)
        return self._setups[n_trainable_layers]

    def _make_setup(self, k: int) -> Setup:
        cut = plan_cut(self.backbone, k, self.layer_order)
        chain = self.backbone.chain()
        cached, notice = self.engine.use_cache, ""
        if cached and cut.index == 0 and len(chain) <= 2:
            cached = False  # nothing frozen comes before the first trainable block: no prefix to cache
            notice = (f"{self.backbone.spec.name} has no blocks to cut between (chain: features, head): "
                      "fine-tuning runs the whole model every epoch, uncached")
            log.warning(notice)
        if cached and cut.index:
            need = estimate_cache_bytes(Chain(chain[: cut.index]), self.backbone.spec.preprocessing, self._n_images(), self.placement)
            if need > self.engine.cache_max_gb * 1e9:
                cached = False
                notice = (f"cache for the input of {cut.name} would take {_over_budget(need, self.engine.cache_max_gb)}; "
                          "running the full model every epoch")
                log.warning(notice)
        setup = Setup(cut, cached, notice, self._shared_base(cut) if cached else None)
        for split in (self.splits.train, self.splits.val):
            setup.sources[split.name] = self._source(split, setup)
        return setup

    def _same_runtime(self, setup: Setup, runtime: dict | None) -> bool:
        """Whether `runtime` computed what `setup` already holds (one runtime per setup, never a mix)."""
        def what(r: dict | None) -> tuple:
            return (r or {}).get("name"), (r or {}).get("version"), (r or {}).get("precision")

        return setup.runtime is None or what(setup.runtime) == what(runtime)

    def _n_images(self) -> int:
        return sum(len(s) for s in (self.splits.train, self.splits.val, self.splits.test) if s is not None)

    def _shared_base(self, cut: Cut) -> int | None:
        """The fine-tuning cut to cache at instead of `cut`, when it is earlier and fits the memory budget."""
        if self.share_cut_layers is None:
            return None
        base = plan_cut(self.backbone, self.share_cut_layers, self.layer_order).index
        if base >= cut.index:
            return None
        chain = self.backbone.chain()
        need = estimate_cache_bytes(Chain(chain[:base]), self.backbone.spec.preprocessing, self._n_images(), self.placement)
        return base if need <= self.engine.cache_max_gb * 1e9 else None

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
        key = f"inputs_{split.name}_s"
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start
        return source

    def _cached_item(self, split: Split, setup: Setup, augment: tuple[int, float] | None = None) -> SplitInputs:
        """The inputs at `setup`'s cut for `split` (one augmented view each with `augment` = (seed, min_scale)),
        from the cache or computed once by the frozen prefix."""
        chain, base = self.backbone.chain(), setup.base
        at = setup.cut.index if base is None else base
        prefix, cut_name = Chain(chain[:at]), chain[at][0]

        def prepare_runner() -> PrefixRunner:
            if setup.runner is None:
                pre = self.backbone.spec.preprocessing
                shape = (1, 3, pre.input_size, pre.input_size)
                key = onnx_export_key(self.backbone.spec.name, self.backbone.weights_digest, cut_name, shape)
                setup.runner = prepare_prefix_runner(prefix, shape, self.engine.runtime, self.placement, self.cache.directory, key)
            return setup.runner

        def load(runtime: str) -> tuple[SplitInputs, list[str]]:
            item, skipped, _hit = cached_split_inputs(
                self.backbone, prefix, cut_name, split, self.cache, self.placement, self.on_bad_image,
                num_workers=self.engine.num_workers, progress=self.engine.progress, runtime=runtime,
                prepare_runner=prepare_runner, augment=augment,
            )
            return item, skipped

        # Later splits look for what the first one was computed by, so one setup's splits share a runtime.
        item, skipped = load(setup.runtime["name"] if setup.runtime else self.engine.runtime)
        if not self._same_runtime(setup, item.runtime):
            # The runtime failed on this split and fell back: compute it the way the others were.
            log.warning("%s: recomputing split %s with %s, as the other splits were", cut_name, split.name, setup.runtime)
            setup.runner = None
            item, skipped = load(setup.runtime["name"] if setup.runtime else "torch")
            if not self._same_runtime(setup, item.runtime):
                raise UserError(f"split {split.name} cannot be computed by {(setup.runtime or {}).get('name')} as the other "
                                f"splits were ({(item.runtime or {}).get('notice')}); pass --runtime torch, or remove {self.cache.directory}")
        setup.runtime = setup.runtime or item.runtime
        if base is not None:
            derived = run_frozen(Chain(chain[base : setup.cut.index]), item.inputs, self.placement)
            item = SplitInputs(derived, item.labels, item.bad_files)
        if skipped:
            self._record_skipped(split.name, skipped)
        return item

    def _record_skipped(self, split_name: str, files: list[str]) -> None:
        """Add undecodable `files` to the split's skipped files (after its missing ones; each file once)."""
        known = self.skipped_files.setdefault(split_name, [])
        seen = set(known)
        known += [f for f in files if f not in seen]

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
            items = [self._cached_item(self.splits.train, setup, (view_seed(seed, v), min_scale)) for v in range(n_views)]
            self.timings["inputs_views_s"] = self.timings.get("inputs_views_s", 0.0) + time.perf_counter() - start
            setup.views[key] = SplitInputs(torch.stack([it.inputs for it in items]), items[0].labels, items[0].bad_files, items[0].runtime)
        return setup.views[key]

    def cache_origin(self, n_trainable_layers: int) -> str | None:
        """The chain block whose input the frozen prefix computes for `n_trainable_layers` (the cut, or the shared
        fine-tuning cut it is derived from); None when uncached. Planned without extracting anything."""
        if not self.engine.use_cache:
            return None
        if n_trainable_layers not in self._origins:
            cut = plan_cut(self.backbone, n_trainable_layers, self.layer_order)
            base = self._shared_base(cut)
            self._origins[n_trainable_layers] = self.backbone.chain()[cut.index if base is None else base][0]
        return self._origins[n_trainable_layers]

    def check_feature_augment(self, feature_augment: str, n_trainable_layers: int) -> None:
        """A ConfigError now if `feature_augment` cannot run for `n_trainable_layers` (rather than in every run)."""
        kind, n_views = parse_feature_augment(feature_augment) or ("none", 0)
        if kind == "none":
            return
        setup = self.setup(n_trainable_layers)
        if not setup.cached:
            raise ConfigError("feature_augment", feature_augment, f"needs the cached path ({setup.notice or 'drop --no-cache'}; "
                              "or --ft-augment none)")
        train = setup.sources["train"]
        assert isinstance(train, TensorSource)
        if kind == "map" and train.inputs.dim() != 4:
            raise ConfigError("feature_augment", "map", f"needs cached spatial maps before global pooling; the input of "
                              f"{setup.cut.name} is {tuple(train.inputs.shape[1:])} (train more layers, or use views:K)")
        need = train.inputs[0].numel() * 4 * len(train) * n_views
        if need > self.engine.cache_max_gb * 1e9:
            raise ConfigError("feature_augment", feature_augment, f"would hold {_over_budget(need, self.engine.cache_max_gb, ' of views')}; "
                              "fewer views, a larger budget, or --ft-augment none")

    def check_feature_augment_planned(self, feature_augment: str, n_trainable_layers: int) -> None:
        """The refusals of :meth:`check_feature_augment`, planned before any image is read (a sweep checks every
        backbone before it writes anything): the cut, whether its input would be cached, and that input's
        shape from one dummy forward. It counts the training images before the bad-image policy drops any, so
        it never accepts what check_feature_augment refuses. Side-effect free: nothing is extracted or kept,
        the modules' train/eval modes are restored."""
        kind, n_views = parse_feature_augment(feature_augment) or ("none", 0)
        if kind == "none":
            return
        cut = plan_cut(self.backbone, n_trainable_layers, self.layer_order)
        chain = self.backbone.chain()
        size = self.backbone.spec.preprocessing.input_size
        modes = {m: m.training for m in self.model.modules()}
        try:
            prefix = Chain(chain[: cut.index]).eval()  # eval: batch norm must not update its statistics
            with torch.no_grad():
                shape = tuple(prefix(self.placement.put(torch.zeros(1, 3, size, size))).shape[1:])
        finally:
            for module, training in modes.items():
                module.training = training
        per_image = math.prod(shape) * 4  # float32, as cached
        budget = self.engine.cache_max_gb
        uncached = ""  # why _make_setup would not cache this cut, in its words
        if not self.engine.use_cache:
            uncached = "drop --no-cache"
        elif cut.index == 0 and len(chain) <= 2:
            uncached = (f"{self.backbone.spec.name} has no blocks to cut between (chain: features, head): "
                        "fine-tuning runs the whole model every epoch, uncached")
        elif cut.index and per_image * self._n_images() > budget * 1e9:
            uncached = (f"cache for the input of {cut.name} would take {_over_budget(per_image * self._n_images(), budget)}; "
                        "running the full model every epoch")
        if uncached:
            raise ConfigError("feature_augment", feature_augment, f"needs the cached path ({uncached}; or --ft-augment none)")
        if kind == "map" and len(shape) != 3:
            raise ConfigError("feature_augment", "map", f"needs cached spatial maps before global pooling; the input of "
                              f"{cut.name} is {shape} (train more layers, or use views:K)")
        need = per_image * len(self.splits.train) * n_views
        if need > budget * 1e9:
            raise ConfigError("feature_augment", feature_augment, f"would hold {_over_budget(need, budget, ' of views')}; "
                              "fewer views, a larger budget, or --ft-augment none")

    def train_source(self, cfg: TrainConfig, n_trainable_layers: int) -> BatchSource:
        """What `cfg` trains on: plain inputs, or their augmented views (``--augment``, ``--ft-augment``)."""
        setup = self.setup(n_trainable_layers)
        train = setup.sources["train"]
        kind, n_views = parse_feature_augment(cfg.feature_augment) or ("none", 0)
        if cfg.augment:
            if not isinstance(train, ImageSource):
                raise ConfigError("augment", True, "needs the backbone to run on every image every epoch (--no-cache)")
            return train.augmented(cfg.seed, cfg.augment_min_scale)
        if kind == "views":
            views = self.views(n_trainable_layers, n_views, cfg.seed, cfg.augment_min_scale)
            return ViewSource(views.inputs, views.labels, self.placement, cfg.seed)
        if kind == "map":
            self.check_feature_augment("map", n_trainable_layers)
            assert isinstance(train, TensorSource)
            return MapAugmentSource(SplitInputs(train.inputs, train.labels, []), self.placement, cfg.seed, cfg.augment_min_scale)
        return train

    def inputs(self, n_trainable_layers: int) -> dict[str, SplitInputs] | None:
        """The cached train/val inputs for `n_trainable_layers` on CPU (to ship to workers); None when uncached."""
        setup = self.setup(n_trainable_layers)
        if not setup.cached:
            return None
        out = {}
        for name in ("train", "val"):
            src = setup.sources[name]
            assert isinstance(src, TensorSource)
            out[name] = SplitInputs(src.inputs.float().cpu(), src.labels.cpu(), [])
        return out

    def adopt_inputs(self, n_trainable_layers: int, inputs: dict[str, SplitInputs],
                     views: dict[tuple[int, int, float], SplitInputs] | None = None) -> None:
        """Use inputs (and augmented train views) cached elsewhere, by a coordinating process, for
        `n_trainable_layers`: no extraction here."""
        cut = plan_cut(self.backbone, n_trainable_layers, self.layer_order)
        sources: dict[str, BatchSource] = {name: TensorSource(item, self.placement) for name, item in inputs.items()}
        self._setups[n_trainable_layers] = Setup(cut, True, "", sources=sources, views=dict(views or {}))

    def net(self, n_trainable_layers: int) -> torch.nn.Module:
        """What maps this workbench's inputs to logits: the chain after the cut, or the whole chain."""
        setup = self.setup(n_trainable_layers)
        chain = self.backbone.chain()  # rebuilt: the head module is replaced by every run
        return Chain(chain[setup.cut.index :] if setup.cached else chain)

    # -- runs ------------------------------------------------------------------------------------
    def reset(self, seed: int, n_trainable_layers: int = 1) -> torch.nn.Linear:
        """Pristine pretrained weights everywhere, a fresh head initialised from `seed`, the last layers trainable."""
        self.model.load_state_dict(self._pristine)
        head = new_head(self.backbone.feature_dim, self.n_classes, seed).to(self.placement.device, self.placement.dtype)
        self.backbone.reset_classifier(head)
        FreezePlan(n_trainable_layers, self.layer_order).apply(self.backbone)
        return head

    def run(self, cfg: TrainConfig, n_trainable_layers: int, start_state: dict | None = None,
            on_epoch: Callable[[EpochRecord], None] | None = None) -> FitResult:
        """One training run from pristine weights (plus `start_state`, e.g. a probe's best trainable state).

        The frozen part's digest is compared before and after: a change fails the run.
        """
        if cfg.layer_order != self.layer_order:
            raise ValueError(f"run with layer_order={cfg.layer_order} on a workbench ordering layers by {self.layer_order}")
        setup = self.setup(n_trainable_layers)
        head = self.reset(cfg.seed, n_trainable_layers)
        if start_state is not None:
            load_state_strict(self.model, {k: v.to(self.placement.device) for k, v in start_state.items()})
        train = self.train_source(cfg, n_trainable_layers)
        frozen_before = frozen_digest(self.model)
        # The L2-SP anchors: pretrained values of the fine-tuned backbone tensors (not the new head).
        head_prefix = self.backbone.classifier_name + "."
        pretrained = {n: self._pristine[n] for n, p in self.model.named_parameters()
                      if p.requires_grad and not n.startswith(head_prefix)} if cfg.l2sp else None
        net = self.net(n_trainable_layers)
        wise = start_state is not None and bool(cfg.wise_alphas) and tuple(cfg.wise_alphas) != (1.0,)  # (1,): no interpolation
        # With interpolation, a = 0 is the start: early stopping picks the best trained epoch (>= 1).
        result = fit(self.model, net, head, train, setup.sources["val"], cfg, on_epoch, pretrained, first_candidate=int(wise))
        if wise and result.status == "done":
            result = wise_interpolate(self.model, net, setup.sources["val"], result, cfg.wise_alphas, cfg.select)
        if frozen_digest(self.model) != frozen_before:
            raise FrozenWeightsChanged("a frozen parameter or buffer changed during training")
        return dataclasses.replace(result, start_state=None)  # the start is the caller's already

    def load_trained(self, n_trainable_layers: int, state: dict) -> None:
        """Put a run's trained state (e.g. a FitResult's best_state) into the model for evaluation."""
        self.reset(seed=0, n_trainable_layers=n_trainable_layers)
        required = set(trainable_state_keys(self.model))
        load_state_strict(self.model, {k: v.to(self.placement.device) for k, v in state.items()}, required)

    def evaluate_test(self, n_trainable_layers: int) -> TestEvaluation | None:
        """The current model on the test split: accuracy and per-image probabilities (None without a test split)."""
        test = self.splits.test
        if test is None:
            return None
        setup = self.setup(n_trainable_layers)
        if "test" not in setup.sources:
            setup.sources["test"] = self._source(test, setup)
        source = setup.sources["test"]
        set_train_mode(self.model, False)
        probs = predict_proba(self.net(n_trainable_layers), source)  # one pass over the test split
        bad = set(self.skipped_files.get("test", []))
        kept = [i for i, f in enumerate(test.files) if f not in bad]
        labels = [test.labels[i] for i in kept]
        wrong = int((probs.argmax(1) != torch.tensor(labels)).sum())
        accuracy = 1.0 - wrong / len(labels)
        return TestEvaluation(accuracy, probs, labels, [test.files[i] for i in kept])

    def trainable_param_count(self, n_trainable_layers: int) -> int:
        """Parameters trained for `n_trainable_layers` (the head included)."""
        layers = set(plan_cut(self.backbone, n_trainable_layers, self.layer_order).trainable_layers)
        return sum(p.numel() for name, p in self.model.named_parameters() if layer_of(name) in layers)

"""Runs on one (data folder, backbone): the Workbench that shares caches between runs, and `probe`.

A :class:`Workbench` loads the backbone once, decides where its chain is cut for a given number of
trainable layers, computes (or loads) the frozen prefix's outputs once per split, and then serves
any number of training runs that each start from the pristine pretrained weights and a head
initialised from the run's seed. `probe` is one such run with its files written out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbones import DEFAULT_BACKBONE, DEFAULT_MODEL_DIR, Backbone, load_backbone
from .data import ImageSplits, Split, load_splits
from .features import (
    Chain,
    FeatureCache,
    ImageSource,
    SplitInputs,
    TensorSource,
    bad_image_policy,
    cached_split_inputs,
    find_bad_images,
    estimate_cache_bytes,
    first_trainable_block,
    resolve_device,
    run_frozen,
)
from .freezing import FreezePlan, frozen_digest, set_train_mode, trainable_parameters
from .heads import new_head
from .training import FitResult, TrainConfig, evaluate, fit, fit_linear_probes
from .utils import UserError, check_writable_dir

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("error", "skip")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split."""

    data: str
    val_split: str = "val"
    test_split: str = "test"
    valid_frac: float = 0.2
    split_seed: int = 0
    max_per_class: int | None = None
    on_bad_image: str = "error"

    def load(self) -> ImageSplits:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise UserError(f"--on-bad-image {self.on_bad_image}: expected error or skip")
        return load_splits(self.data, self.val_split, self.test_split, self.valid_frac, self.split_seed, self.max_per_class)


@dataclass(frozen=True)
class EngineConfig:
    """How runs are executed; none of these change the numbers on CPU."""

    device: str = "auto"
    use_cache: bool = True
    cache_dir: str | None = None  # None: <out>/cache
    cache_max_gb: float = 4.0
    num_workers: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class ProbeConfig:
    """Everything that defines one probe / fine-tuning run; saved in run.json."""

    data: DataConfig
    backbone: str = DEFAULT_BACKBONE
    model_dir: str = DEFAULT_MODEL_DIR
    weights: str | None = None
    n_trainable_layers: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


class Workbench:
    """A backbone and a data folder made ready for many runs that share one forward pass per image."""

    def __init__(
        self,
        backbone: Backbone,
        splits: ImageSplits,
        engine: EngineConfig,
        cache_dir: str | Path | None,
        on_bad_image: str = "error",
        share_cut_layers: int | None = None,
    ):
        self.backbone = backbone
        # With LP-then-FT, cache only at the fine-tuning cut and derive shallower cuts' inputs from it,
        # so each image still goes through the backbone once.
        self.share_cut_layers = share_cut_layers
        self.base_index: int | None = None
        self.splits = splits
        self.engine = engine
        self.device = resolve_device(engine.device)
        self.cache = FeatureCache(cache_dir)
        self.on_bad_image = on_bad_image
        self.n_classes = len(splits.classes)
        self.skipped_files: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}
        backbone.reset_classifier(new_head(backbone.feature_dim, self.n_classes, seed=0))
        backbone.model.to(self.device)
        if self.device.type == "cuda":
            backbone.model.to(memory_format=torch.channels_last)
        self._pristine = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
        self._n_trainable: int | None = None
        self._sources: dict[str, object] = {}
        self.cached = False
        self.notice = ""

    # -- setting up a number of trainable layers ------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    def prepare(self, n_trainable_layers: int) -> list[str]:
        """Freeze all but the last `n_trainable_layers` layers and build the train/val inputs for that cut."""
        trainable = FreezePlan(n_trainable_layers).apply(self.model)
        if self._n_trainable == n_trainable_layers:
            return trainable
        self._n_trainable = n_trainable_layers
        chain = self.backbone.chain()
        cut = self.cut_index = first_trainable_block(chain)
        self.cut_name = chain[cut][0]
        self.prefix = Chain(chain[:cut])
        self.cached = self.engine.use_cache
        self.notice = ""
        if self.cached:
            need = estimate_cache_bytes(self.prefix, self.backbone.spec.preprocessing, self._n_images()) if cut else 0
            if need > self.engine.cache_max_gb * 1e9:
                self.cached = False
                self.notice = (
                    f"cache for the input of {self.cut_name} would take {need / 1e9:.1f} GB "
                    f"> --cache-max-gb {self.engine.cache_max_gb:g}; running the full model every epoch"
                )
                log.warning(self.notice)
        self.base_index = self._shared_base(chain, cut) if self.cached else None
        self._sources = {}
        for split in (self.splits.train, self.splits.val):
            self._sources[split.name] = self._source(split)
        return trainable

    def _n_images(self) -> int:
        return sum(len(s) for s in (self.splits.train, self.splits.val, self.splits.test) if s is not None)

    def _shared_base(self, chain, cut: int) -> int | None:
        """The fine-tuning cut to cache at instead of `cut`, when it is earlier and fits the memory budget."""
        if self.share_cut_layers is None or self.share_cut_layers == self._n_trainable:
            return None
        FreezePlan(self.share_cut_layers).apply(self.model)
        base = first_trainable_block(chain)
        FreezePlan(self._n_trainable).apply(self.model)
        if base >= cut:
            return None
        need = estimate_cache_bytes(Chain(chain[:base]), self.backbone.spec.preprocessing, self._n_images())
        return base if need <= self.engine.cache_max_gb * 1e9 else None

    def _cached_item(self, split: Split) -> tuple[SplitInputs, list[str]]:
        chain = self.backbone.chain()
        start = self.cut_index if self.base_index is None else self.base_index
        item, skipped, _hit = cached_split_inputs(
            self.backbone, Chain(chain[:start]), chain[start][0], split, self.cache, self.device,
            self.on_bad_image, num_workers=self.engine.num_workers, progress=self.engine.progress,
        )
        if self.base_index is not None:
            item = SplitInputs(run_frozen(Chain(chain[self.base_index : self.cut_index]), item.inputs, self.device), item.labels, item.bad_files)
        return item, skipped

    def export_inputs(self) -> dict[str, SplitInputs]:
        """The cached train/val inputs of the current cut, on CPU (to ship to workers)."""
        if not self.cached:
            raise ValueError("export_inputs needs cached inputs")
        return {name: SplitInputs(src.inputs.cpu(), src.labels.cpu(), []) for name, src in self._sources.items() if name in ("train", "val")}

    def adopt_inputs(self, n_trainable_layers: int, inputs: dict[str, SplitInputs]) -> None:
        """Use inputs cached elsewhere (by a coordinating process) for `n_trainable_layers`: no extraction here."""
        FreezePlan(n_trainable_layers).apply(self.model)
        self._n_trainable = n_trainable_layers
        chain = self.backbone.chain()
        self.cut_index = first_trainable_block(chain)
        self.cut_name = chain[self.cut_index][0]
        self.prefix = Chain(chain[: self.cut_index])
        self.cached, self.notice = True, ""
        self._sources = {name: TensorSource(item, self.device) for name, item in inputs.items()}

    def _source(self, split: Split):
        start = time.perf_counter()
        if self.cached:
            item, skipped = self._cached_item(split)
            if skipped:
                self.skipped_files[split.name] = skipped
            source = TensorSource(item, self.device)
        else:
            pre = self.backbone.spec.preprocessing
            bad = find_bad_images(split, pre, self.engine.num_workers, self.engine.progress)
            keep = bad_image_policy(split, bad, self.on_bad_image)
            if bad:
                self.skipped_files[split.name] = bad
                split = split.subset(keep)
            source = ImageSource(split, pre, self.device, self.engine.num_workers)
        self.timings[f"inputs_{split.name}_s"] = self.timings.get(f"inputs_{split.name}_s", 0.0) + time.perf_counter() - start
        return source

    @property
    def net(self) -> torch.nn.Module:
        """What maps this workbench's inputs to logits: the chain after the cut, or the whole chain."""
        chain = self.backbone.chain()  # rebuilt: the head module is replaced by every run
        return Chain(chain[self.cut_index:] if self.cached else chain)

    # -- runs ------------------------------------------------------------------------------------
    def reset(self, seed: int) -> torch.nn.Linear:
        """Pristine pretrained weights everywhere, and a fresh head initialised from `seed`."""
        self.model.load_state_dict(self._pristine)
        head = new_head(self.backbone.feature_dim, self.n_classes, seed).to(self.device)
        self.backbone.reset_classifier(head)
        FreezePlan(self._n_trainable or 1).apply(self.model)
        return head

    def run(self, cfg: TrainConfig, n_trainable_layers: int, start_state: dict | None = None, on_epoch=None) -> FitResult:
        """One training run from pristine weights (plus `start_state`, e.g. a probe's best trainable state)."""
        self.prepare(n_trainable_layers)
        head = self.reset(cfg.seed)
        if start_state is not None:
            self.model.load_state_dict({k: v.to(self.device) for k, v in start_state.items()}, strict=False)
            head = self.backbone.classifier
        train = self._sources["train"]
        if cfg.augment:
            if self.cached:
                raise UserError("--augment needs the backbone to run on every image every epoch (--no-cache)")
            train = ImageSource(train.split, train.pre, self.device, train.num_workers, augment_seed=cfg.seed)
        return fit(self.model, self.net, head, train, self._sources["val"], cfg, on_epoch)

    def run_probes(self, cfgs: list[TrainConfig], on_epoch=None) -> list[FitResult]:
        """Linear probes (k = 1) for many configs; on cached features, heads sharing a seed train together."""
        self.prepare(1)
        if not self.cached:
            return [self.run(cfg, 1, on_epoch=on_epoch) for cfg in cfgs]
        results: list[FitResult | None] = [None] * len(cfgs)
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(cfgs):
            groups.setdefault((c.seed, c.epochs, c.batch_size, c.optimizer, c.momentum), []).append(i)
        for members in groups.values():
            seed = cfgs[members[0]].seed
            heads = [new_head(self.backbone.feature_dim, self.n_classes, seed).to(self.device) for _ in members]
            batch = fit_linear_probes(
                heads, self._sources["train"], self._sources["val"], [cfgs[i] for i in members], self.backbone.classifier_name, on_epoch
            )
            for i, r in zip(members, batch):
                results[i] = r
        return results  # type: ignore[return-value]

    def load_trained(self, n_trainable_layers: int, state: dict) -> None:
        """Put a run's trained state (e.g. a FitResult's best_state) into the model for evaluation."""
        self.prepare(n_trainable_layers)
        self.reset(seed=0)
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)

    def test_accuracy(self) -> float | None:
        """Accuracy of the current model on the test split (computed on demand, once per call)."""
        if self.splits.test is None:
            return None
        source = self._sources.get("test")
        if source is None:
            source = self._sources["test"] = self._source(self.splits.test)
        set_train_mode(self.model, False)
        _xent, err = evaluate(self.net, source)
        return 1.0 - err

    def trainable_param_count(self) -> int:
        return sum(p.numel() for p in trainable_parameters(self.model).values())


def build_workbench(cfg: ProbeConfig, out: Path) -> Workbench:
    """Validate inputs, load splits and backbone, and return a Workbench (no heavy compute yet)."""
    splits = cfg.data.load()
    backbone = load_backbone(cfg.backbone, model_dir=cfg.model_dir, weights=cfg.weights)
    cache_dir = cfg.engine.cache_dir if cfg.engine.cache_dir is not None else out / "cache"
    return Workbench(backbone, splits, cfg.engine, cache_dir, cfg.data.on_bad_image)


def run_record(cfg: ProbeConfig, bench: Workbench, result: FitResult, trainable: list[str], test_acc, seconds: dict) -> dict:
    """The JSON-ready record of a finished run."""
    best = result.best
    spec = bench.backbone.spec
    return {
        "config": dataclasses.asdict(cfg),
        "backbone": {
            "name": spec.name, "zoo": spec.zoo, "arch": spec.arch, "source": spec.source,
            "source_top1": spec.source_top1, "weights": bench.backbone.weights,
            "weights_digest": bench.backbone.weights_digest,
            "preprocessing": dataclasses.asdict(spec.preprocessing),
        },
        "data": bench.splits.summary(),
        "skipped_files": bench.skipped_files,
        "status": result.status,
        "n_trainable_layers": cfg.n_trainable_layers,
        "trainable_layers": trainable,
        "trainable_params": bench.trainable_param_count(),
        "cached": bench.cached,
        "cache_cut": bench.cut_name,
        "notice": bench.notice,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "epochs_run": result.history[-1]["epoch"],
        "val_xent": best["val_xent"],
        "val_err": best["val_err"],
        "test_acc": test_acc,
        "timings": {**seconds, **bench.timings},
        "device": str(bench.device),
    }


def run_probe(cfg: ProbeConfig, out: str | Path) -> dict:
    """Train one probe (or last-k-layers fine-tune) and write run.json, head.safetensors and curves.png.

    Returns the run record (also in ``out/run.json``).
    """
    from safetensors.torch import save

    from .reporting.figures import plot_curves
    from .utils import atomic_write_bytes, write_json

    t0 = time.perf_counter()
    cfg.train.validate()
    if cfg.train.augment and cfg.engine.use_cache:
        log.warning("--augment: every epoch sees new views of the images, so the backbone runs on every image every epoch (no cache)")
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, use_cache=False))
    out = check_writable_dir(out)
    bench = build_workbench(cfg, out)
    t_load = time.perf_counter()
    trainable = bench.prepare(cfg.n_trainable_layers)
    t_inputs = time.perf_counter()
    bench.reset(cfg.train.seed)
    frozen_before = frozen_digest(bench.model)
    bar = tqdm(total=cfg.train.epochs + 1, desc="epochs", unit="ep", disable=not cfg.engine.progress, leave=False)

    def on_epoch(record: dict) -> None:
        bar.update(1)
        bar.set_postfix(val_xent=f"{record['val_xent']:.4f}", val_err=f"{record['val_err']:.3f}", refresh=False)

    result = bench.run(cfg.train, cfg.n_trainable_layers, on_epoch=on_epoch)
    bar.close()
    if frozen_digest(bench.model) != frozen_before:
        raise RuntimeError("a frozen parameter or buffer changed during training")
    t_fit = time.perf_counter()
    test_acc = bench.test_accuracy() if result.status == "done" else None
    if test_acc is not None:  # per-image test predictions of that same evaluation, for the per-class insight
        from .predict import source_probabilities
        from .reporting.insight import insight_page, write_test_predictions

        probs, labels = source_probabilities(bench.net, bench._sources["test"])
        skipped = set(bench.skipped_files.get("test", []))
        write_test_predictions(out / "test_predictions.json", bench.splits.classes, [f for f in bench.splits.test.files if f not in skipped], labels, probs)
        atomic_write_bytes(out / "insight.html", insight_page(out / "test_predictions.json", out / "insight", bench.backbone.spec.name).encode())
    t_test = time.perf_counter()
    seconds = {
        "load_s": t_load - t0, "inputs_s": t_inputs - t_load, "fit_s": t_fit - t_inputs,
        "train_loop_s": result.train_seconds, "test_s": t_test - t_fit, "total_s": t_test - t0,
    }
    record = run_record(cfg, bench, result, trainable, test_acc, seconds)
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.best_state.items()}
    atomic_write_bytes(out / "head.safetensors", save(tensors, metadata={"backbone": bench.backbone.spec.name}))
    write_json(out / "run.json", record)
    title = f"{bench.backbone.spec.name}  lr={cfg.train.lr:g} l2={cfg.train.l2:g} seed={cfg.train.seed}  k={cfg.n_trainable_layers}"
    plot_curves(result.history, result.best_epoch, out / "curves.png", title)
    return record


def probe(
    data: str,
    out: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    *,
    lr: float = 1e-3,
    l2: float = 0.0,
    seed: int = 0,
    epochs: int = 100,
    patience: int = 15,
    batch_size: int = 64,
    optimizer: str = "adam",
    train_bn: bool = False,
    augment: bool = False,
    n_trainable_layers: int = 1,
    model_dir: str = DEFAULT_MODEL_DIR,
    weights: str | None = None,
    val_split: str = "val",
    test_split: str = "test",
    valid_frac: float = 0.2,
    split_seed: int = 0,
    max_per_class: int | None = None,
    on_bad_image: str = "error",
    device: str = "auto",
    use_cache: bool = True,
    cache_dir: str | None = None,
    cache_max_gb: float = 4.0,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Python twin of ``transferlab probe``: train one probe on `data`, write outputs to `out`, return the record."""
    cfg = ProbeConfig(
        data=DataConfig(data, val_split, test_split, valid_frac, split_seed, max_per_class, on_bad_image),
        backbone=backbone,
        model_dir=model_dir,
        weights=weights,
        n_trainable_layers=n_trainable_layers,
        train=TrainConfig(lr, l2, seed, epochs, patience, batch_size, optimizer, train_bn=train_bn, augment=augment),
        engine=EngineConfig(device, use_cache, cache_dir, cache_max_gb, num_workers, progress),
    )
    return run_probe(cfg, out)

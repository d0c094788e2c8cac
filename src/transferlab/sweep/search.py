"""Grid search and LP-then-FT over backbones, resumable through the ledger.

For every backbone: probe every (lr, l2, seed) on cached features (heads sharing a schedule train in
one batched pass), choose on validation only (lowest val cross-entropy, then val error, then grid
order), evaluate the test split once for the chosen probe. With LP-then-FT, fine-tune the last
`ft_layers` layers starting exactly from the chosen probe, over `ft_lrs`, choose on validation, test once.

Every run is a ledger row keyed by a hash of everything that defines its numbers, the images
included; a re-run skips finished rows and redoes the rest. Both phases go through one path: plan
the runs, execute the missing ones as tasks on an executor (in-process, worker processes or Ray),
choose and test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from transferlab.core.devices import resolve_device
from transferlab.core.errors import ConfigError, UserError
from transferlab.core.fields import option
from transferlab.core.files import FolderLock, atomic_write_bytes, check_writable_dir, write_json
from transferlab.core.hashing import stable_hash
from transferlab.core.predictions import sweep_predictions_path, write_test_predictions
from transferlab.data import DataConfig, ImageSplits, describe_data_change
from transferlab.features.cache import FeatureCache
from transferlab.features.workbench import EngineConfig, Workbench
from transferlab.models import CATALOGUE, DEFAULT_MODEL_DIR, Backbone, check_weights_available, get_spec, load_backbone, with_source
from transferlab.models.freezing import layer_names, layers_of_last_blocks
from transferlab.sweep.executors import Executor, InProcessExecutor, ProcessExecutor, RayExecutor
from transferlab.sweep.ledger import Ledger, Method, RunRow
from transferlab.sweep.tasks import Task, make_tasks
from transferlab.train.objective import describe_objective
from transferlab.train.training import EpochRecord, FitResult, TrainConfig, parse_feature_augment, selection_key

log = logging.getLogger(__name__)
# What the sweep says it does (its plan, the time left): INFO records the CLI shows without --verbose.
progress_log = logging.getLogger("transferlab.progress")

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class SweepConfig:
    """A whole study: data, backbones x sources, the LP grid and the optional LP-then-FT phase.

    `train` is the base of every run; each probe takes its lr, l2 and seed from the grid.
    """

    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    backbones: tuple[str, ...] = option(("efficientnet_lite0",), "comma list of architectures")
    sources: tuple[str, ...] = option(("imagenet1k",), "comma list of source data sets: imagenet1k,cub")
    lrs: tuple[float, ...] = option((1e-4, 1e-3, 1e-2), "comma list of probe learning rates", flag="--lr")
    l2s: tuple[float, ...] = option((0.0, 1e-2, 1.0), "comma list of L2 strengths", flag="--l2")
    seeds: tuple[int, ...] = option((0, 1), "comma list of seeds")
    lpft: bool = option(False, "LP-then-FT from the chosen probe")
    # The fine-tuning grid: every combination of these lists is one run from the chosen probe.
    ft_blocks: tuple[int, ...] = option((), "comma list: LP-then-FT trains the last N blocks of the chain holding "
                                        "parameters, the head counting as one (all their layers); with neither this nor "
                                        "--ft-layers: 4")
    ft_layers: tuple[int, ...] = option((), "comma list: LP-then-FT trains the last k layers (see --layer-order)")
    ft_lrs: tuple[float, ...] = option((3e-5, 1e-4), "comma list of fine-tuning learning rates (the head's; see "
                                       "--ft-backbone-lr-mult)", flag="--ft-lr")
    ft_augment: tuple[str, ...] = option(("none",), "comma list of fine-tuning augmentations: none, views:K, map "
                                         "(see the probe's --ft-augment)")
    ft_l2sp: tuple[float, ...] = option((0.0,), "comma list of L2-SP strengths for fine-tuning: + A * sum ||w - w_pretrained||^2")
    ft_label_smoothing: tuple[float, ...] = option((0.0,), "comma list of label smoothings for fine-tuning (probes train without)",
                                                   flag="--label-smoothing")
    ft_epochs: int = option(10, "fine-tuning epochs")
    ft_patience: int = option(5, "fine-tuning early-stopping patience")
    ft_lr_schedule: str = option("cosine", "fine-tuning learning rate over the run: constant, or cosine decay to 0 "
                                 "(--lr-schedule is the probes')", choices=("constant", "cosine"))
    ft_warmup_epochs: int = option(1, "fine-tuning linear warmup epochs (--warmup-epochs is the probes')")
    ft_backbone_lr_mult: float = option(0.3, "fine-tuned backbone layers learn at the fine-tuning lr times this "
                                        "(the head at the lr)")
    ft_wise: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75, 1.0), "after fine-tuning, the weight interpolations "
                                        "(1-a)*probe + a*fine-tuned tried on validation (WiSE-FT; 1 alone: none)")
    ft_train_bn: bool = option(False, "fine-tuned batch-norm layers use batch statistics")
    model_dir: str = option(DEFAULT_MODEL_DIR, "folder with official pytorchcv .pth files")
    backbone_info: dict[str, dict] | None = option(None, "per backbone name, overrides of what the library says: "
                                                   "{NAME: {source: ..., source_top1: ...}} (YAML, or JSON on the command line)")

    GRID_FIELDS = ("lr", "l2", "seed")  # TrainConfig fields the grid sets
    # TrainConfig fields a sweep does not take from the command line: the probe's head has no batch norm,
    # and the fine-tuning grid sets the rest from its own lists.
    NOT_SWEPT = GRID_FIELDS + ("train_bn", "feature_augment", "label_smoothing", "l2sp", "wise_alphas", "backbone_lr_mult")
    DEFAULT_FT_BLOCKS = 4

    def probe_configs(self) -> list[TrainConfig]:
        """The LP grid in a fixed order (seed, lr, l2): the order also breaks validation ties."""
        return [dataclasses.replace(self.train, lr=lr, l2=l2, seed=seed)
                for seed in self.seeds for lr in self.lrs for l2 in self.l2s]

    def ft_units(self) -> list[tuple[str, int]]:
        """What fine-tuning trains, in grid order: ("blocks", N) for each --ft-blocks, else ("layers", k)."""
        if not self.ft_blocks and not self.ft_layers:
            return [("blocks", self.DEFAULT_FT_BLOCKS)]
        return [("blocks", n) for n in self.ft_blocks] + [("layers", k) for k in self.ft_layers]

    def finetune_configs(self, probe: TrainConfig) -> list[TrainConfig]:
        """The fine-tuning grid from the chosen probe's config, in a fixed order (lr, augment, L2-SP,
        label smoothing; the outer loop over units is the caller's): the order also breaks validation ties."""
        base = dataclasses.replace(probe, train_bn=self.ft_train_bn, wise_alphas=tuple(self.ft_wise),
                                   lr_schedule=self.ft_lr_schedule, warmup_epochs=self.ft_warmup_epochs,
                                   backbone_lr_mult=self.ft_backbone_lr_mult, epochs=self.ft_epochs, patience=self.ft_patience)
        return [dataclasses.replace(base, lr=lr, feature_augment=aug, l2sp=l2sp, label_smoothing=ls)
                for lr in self.ft_lrs for aug in self.ft_augment for l2sp in self.ft_l2sp for ls in self.ft_label_smoothing]

    def validate(self) -> None:
        for name in ("lrs", "l2s", "seeds", "backbones", "sources"):
            if not getattr(self, name):
                raise ConfigError(name, "", "needs at least one value")
        for cfg in self.probe_configs():
            cfg.validate()
        if self.lpft:
            self._validate_finetuning()
            for cfg in self.finetune_configs(self.probe_configs()[0]):
                cfg.validate()
        for name, info in (self.backbone_info or {}).items():
            if not isinstance(info, dict) or set(info) - {"source", "source_top1"}:
                raise ConfigError("backbone_info", name, "expected a mapping with keys source and/or source_top1")
            top1 = info.get("source_top1")
            if top1 is not None and not (isinstance(top1, (int, float)) and 0 <= top1 <= 100):
                raise ConfigError("backbone_info", name, f"source_top1 {top1!r} must be a percentage")
        if self.lpft:
            if self.ft_blocks and self.train.layer_order != "forward":
                raise ConfigError("ft_blocks", ",".join(map(str, self.ft_blocks)), "counts blocks in forward order "
                                  "(drop --layer-order definition)")
            for unit, n in self.ft_units():
                if n < 1:
                    raise ConfigError(f"ft_{unit}", n, "must be at least 1")
            for lr in self.ft_lrs:
                if not (math.isfinite(lr) and lr > 0):
                    raise ConfigError("ft_lrs", lr, "must be a positive number")



    def _validate_finetuning(self) -> None:
        """ConfigErrors naming the sweep's own --ft-* flags (before the runs' configs are checked)."""
        for name in ("ft_lrs", "ft_augment", "ft_l2sp", "ft_label_smoothing", "ft_wise"):
            if not getattr(self, name):
                raise ConfigError(name, "", "needs at least one value")
        checks: list[tuple[bool, str, object, str]] = [(self.ft_epochs >= 0, "ft_epochs", self.ft_epochs, "must be zero or positive"),
                  (self.ft_patience >= 1, "ft_patience", self.ft_patience, "must be at least 1"),
                  (0 <= self.ft_warmup_epochs <= self.ft_epochs, "ft_warmup_epochs", self.ft_warmup_epochs,
                   "must be in [0, --ft-epochs]"),
                  (math.isfinite(self.ft_backbone_lr_mult) and self.ft_backbone_lr_mult >= 0, "ft_backbone_lr_mult",
                   self.ft_backbone_lr_mult, "must be zero or positive")]
        checks += [(parse_feature_augment(a) is not None, "ft_augment", a, "expected none, map or views:K with K >= 1")
                   for a in self.ft_augment]
        checks += [(math.isfinite(a) and a >= 0, "ft_l2sp", a, "must be zero or positive") for a in self.ft_l2sp]
        checks += [(0 <= e < 1, "ft_label_smoothing", e, "must be in [0, 1)") for e in self.ft_label_smoothing]
        checks += [(0 <= a <= 1, "ft_wise", a, "every a must be in [0, 1]") for a in self.ft_wise]
        for ok, name, value, reason in checks:
            if not ok:
                raise ConfigError(name, value, reason)


@dataclass(frozen=True)
class ExecutorConfig:
    """Where runs execute; results are the same wherever they run."""

    kind: str = option("local", "where runs execute", flag="--executor", choices=("local", "ray"))
    jobs: int = option(1, "local worker processes (1: in this process)")
    ray_address: str | None = option(None, "Ray cluster ('auto' or ray://host:port); default: a private local instance")
    cpus_per_run: float = option(1.0, "CPUs each Ray task requests")
    gpus_per_run: float | None = option(None, "GPUs each Ray task requests (default: 0 on CPU, 0.25 on CUDA)")


def make_executor(cfg: ExecutorConfig, out: Path, device: str, on_epoch=None) -> Executor:
    """The executor `cfg` names; tasks run on `device` wherever they execute."""
    if cfg.kind == "local":
        local: Executor = InProcessExecutor(on_epoch) if cfg.jobs == 1 else ProcessExecutor(cfg.jobs)
        return local
    if cfg.kind == "ray":
        gpus = cfg.gpus_per_run
        if gpus is None:  # several runs share one GPU; each task sees it only if it asks for a share
            gpus = 0.25 if resolve_device(device).type == "cuda" else 0.0
        return RayExecutor(out, cfg.ray_address, cfg.cpus_per_run, gpus)
    raise ConfigError("kind", cfg.kind, "expected local or ray")


def resolve_backbones(cfg: SweepConfig) -> tuple[list[str], dict[str, str]]:
    """Backbone names to run (architecture x source) and the skipped ones with the reason."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    for arch in cfg.backbones:
        prefixed = ":" in arch  # timm:/torchvision:/hf: names carry their own source
        candidates = [arch] if arch.endswith("_cub") or prefixed else [with_source(arch, s) for s in cfg.sources]
        for name in candidates:
            if name in names or name in skipped:
                continue
            if prefixed:
                try:
                    get_spec(name)
                except ConfigError as e:
                    raise ConfigError("backbones", e.value, e.reason) from None
                except UserError:
                    raise
                except Exception as e:  # a model folder that is there but unreadable is bad input too
                    raise unreadable_backbone(name, "cannot be read", e) from None
            elif name not in CATALOGUE:
                try:
                    get_spec(name.removesuffix("_cub"))  # unknown architecture: an error with suggestions
                except ConfigError as e:
                    raise ConfigError("backbones", e.value, e.reason) from None
                skipped[name] = "no published weights for this architecture and source"
                continue
            reason = check_weights_available(name, cfg.model_dir)
            if reason:
                skipped[name] = f"weights {reason} in {cfg.model_dir}"
            else:
                names.append(name)
    return names, skipped


def numerics_identity(engine: EngineConfig) -> dict:
    """What of the engine changes a run's numbers: device type, dtype and the runtime of the frozen layers
    (name, version, precision). Not: workers, progress bars, cache folders, the executor."""
    from transferlab.core.devices import Placement
    from transferlab.features.runtimes import planned_runner

    placement = Placement.of(engine.device, engine.dtype)
    runner = planned_runner(engine.runtime, placement)
    return {"device": placement.device.type, "dtype": engine.dtype, "runtime": [runner.name, runner.version, runner.precision],
            "cached": engine.use_cache}


def run_hash(method: Method, backbone: str, weights_digest: str, data_digest: str, data: DataConfig,
             train: TrainConfig, k: int, start: str | None = None, numerics: dict | None = None) -> str:
    """Identity of one run: everything that changes its numbers (the images and the numerics too)."""
    return stable_hash(
        {"method": method, "backbone": backbone, "weights": weights_digest, "images": data_digest,
         "data": dataclasses.asdict(data), "train": dataclasses.asdict(train), "n_trainable_layers": k, "start": start,
         "numerics": numerics or {}},
        length=20,
    )


def choose(rows: list[RunRow], order: list[str], select: str = "val_xent") -> RunRow | None:
    """Among the runs whose hash is in `order`, the finished, non-diverged one that is best under `select`
    (val_xent: lowest val xent, ties by val err; val_err: the reverse), then by position in `order`."""
    done = [r for r in rows if r["hash"] in order and r["status"] == "done" and (r["metrics"] or {}).get("val_xent") is not None]
    if not done:
        return None
    return min(done, key=lambda r: (*selection_key(select, r["metrics"]["val_xent"], r["metrics"]["val_err"]),  # type: ignore[index]
                                    order.index(r["hash"])))


def claim_folder(ledger: Ledger, out: Path, data: DataConfig, splits: ImageSplits, force: bool,
                 memo_dir: Path | None = None) -> str:
    """Refuse (or with `force`, start over) when `out`'s ledger is about other data or other images.

    Records the data's identity and fingerprint (content digests remembered in `memo_dir`); returns
    the images' digest (part of every run hash).
    """
    identity = stable_hash(dataclasses.asdict(data))
    fingerprint = splits.fingerprint(memo_dir)
    previous_identity = ledger.get_meta("identity")
    previous_fingerprint = ledger.get_meta("data_fingerprint")
    problem = ""
    if previous_identity is not None and previous_identity != identity:
        problem = "holds the ledger of a different sweep (other data or splits)"
    elif previous_fingerprint is not None and previous_fingerprint != fingerprint:
        problem = f"the images changed since its sweep ran: {describe_data_change(previous_fingerprint, fingerprint)}"
    if problem:
        if not force:
            raise ConfigError("out", out, f"{problem}; use another folder, or pass --force to start over")
        log.warning("--force: %s %s; starting over", out, problem)
        ledger.start_over()
        shutil.rmtree(out / "runs", ignore_errors=True)
    ledger.set_meta("identity", identity)
    ledger.set_meta("data_fingerprint", fingerprint)
    return stable_hash(fingerprint)


def check_ft_grid(cfg: SweepConfig, name: str, backbone: Backbone, splits: ImageSplits) -> None:
    """A ConfigError, before anything is written, for a fine-tuning grid that `backbone` cannot run:
    --ft-layers / --ft-blocks beyond it, or an --ft-augment whose cache it would not have (a cut with
    spatial maps for map, views within --cache-max-gb). Planned from one dummy forward: no image is read."""
    n_layers = len(layer_names(backbone.model))
    for unit, n in cfg.ft_units():
        if unit == "blocks":
            layers_of_last_blocks(backbone, n)
        elif n > n_layers:
            raise ConfigError("ft_layers", n, f"{name} has only {n_layers} layers")
    if all(augment == "none" for augment in cfg.ft_augment):
        return
    ft_ks = ft_layer_counts(cfg, backbone)
    bench = Workbench(backbone, splits, cfg.engine, None, cfg.data.on_bad_image, share_cut_layers=max(ft_ks.values()),
                      layer_order=cfg.train.layer_order)
    for k in dict.fromkeys(ft_ks.values()):
        for augment in cfg.ft_augment:
            try:
                bench.check_feature_augment_planned(augment, k)
            except ConfigError as e:
                raise ConfigError("ft_augment", e.value, f"{e.reason} ({name})") from None


def load_checked(name: str, model_dir: str) -> Backbone:
    """Backbone `name` with its weights; a file that is there but cannot be read is a UserError naming
    the backbone (it is the user's input, like a missing file), not an internal error."""
    try:
        return load_backbone(name, model_dir)
    except UserError:
        raise
    except Exception as e:
        raise unreadable_backbone(name, "its weights cannot be loaded", e) from None


def unreadable_backbone(name: str, what: str, error: Exception) -> UserError:
    """One line naming the backbone and the first line of why its files could not be used."""
    first = str(error).splitlines()[0][:200] if str(error) else ""
    return UserError(f"--backbones {name}: {what} ({type(error).__name__}: {first})")


def preflight(cfg: SweepConfig, names: list[str], splits: ImageSplits) -> None:
    """Everything a sweep can refuse, for every backbone, before anything is written: each backbone's
    weights load (a broken file is refused while the folder still shows its previous choices), and
    with LP-then-FT its fine-tuning grid fits it (:func:`check_ft_grid`, on that same loaded backbone)."""
    if cfg.lpft:
        check_ft_augment_path(cfg)
    for name in names:
        backbone = load_checked(name, cfg.model_dir)
        if cfg.lpft:
            check_ft_grid(cfg, name, backbone, splits)


def check_ft_augment_path(cfg: SweepConfig) -> None:
    """A ConfigError, before anything runs, for feature augmentation with no cache to augment."""
    if cfg.engine.use_cache:
        return
    for augment in cfg.ft_augment:
        if augment != "none":
            raise ConfigError("ft_augment", augment, "needs the cached path (drop --no-cache; or --ft-augment none)")


def ft_layer_counts(cfg: SweepConfig, backbone) -> dict[str, int]:
    """{unit text ("blocks:2", "layers:3"): number of trainable layers} of the fine-tuning grid on `backbone`."""
    return {f"{unit}:{n}": (layers_of_last_blocks(backbone, n) if unit == "blocks" else n) for unit, n in cfg.ft_units()}


@dataclass(frozen=True)
class PlannedRun:
    """One run of a phase: its ledger hash, its training config and how many layers it trains."""

    hash: str
    cfg: TrainConfig
    k: int
    unit: str = "layers:1"  # what the grid said: "layers:k" or "blocks:N"


@dataclass(frozen=True)
class PhasePlan:
    """How many runs a phase of one backbone plans and how many the ledger already holds finished
    (`done` None: not known yet, as for LP-FT before its probe is chosen)."""

    method: Method
    total: int
    done: int | None

    @property
    def to_run(self) -> int:
        """Runs left to execute (all of them while `done` is unknown)."""
        return self.total - (self.done or 0)

    def text(self) -> str:
        """'LP 8 runs (8 done, 0 to run)'; 'LP-FT 2 runs (after the probe is chosen)'."""
        counts = "after the probe is chosen" if self.done is None else f"{self.done} done, {self.to_run} to run"
        return f"{self.method} {self.total} run{'s' if self.total != 1 else ''} ({counts})"


def plan_line(backbone: str, phases: list[PhasePlan]) -> str:
    """One backbone's line of the plan: 'efficientnet_lite0: LP 8 runs (8 done, 0 to run), LP-FT 2 runs (...)'."""
    return f"{backbone}: " + ", ".join(p.text() for p in phases)


def progress_desc(backbone: str, method: Method) -> str:
    """The progress bar's description while a phase runs: 'efficientnet_lite0 LP'."""
    return f"{backbone} {method}"


def time_left_text(elapsed_s: float, runs_executed: int, runs_left: int) -> str | None:
    """A rough time left, from the elapsed time per executed run so far ('about 3 min left'); None without
    an executed run to measure by or with nothing left to run."""
    if runs_executed <= 0 or runs_left <= 0:
        return None
    seconds = elapsed_s / runs_executed * runs_left
    if seconds < 60:
        return "under a minute left"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"


class Sweep:
    """Coordinates one sweep: the only writer of the ledger, holding the output folder's lock."""

    def __init__(self, cfg: SweepConfig, out: str | Path, force: bool = False, command: str = "",
                 executor: ExecutorConfig = ExecutorConfig()):
        cfg.validate()
        if cfg.train.augment and cfg.engine.use_cache:
            # New views every epoch: probes and fine-tuning both run the backbone on every image (as `probe` does).
            log.warning("--augment: every epoch sees new views of the images, so the backbone runs on every image every epoch (no cache)")
            cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, use_cache=False))
        self.cfg, self.executor_cfg, self.command = cfg, executor, command
        self.out = check_writable_dir(out)
        self.lock = FolderLock(self.out)
        try:
            self.ledger = Ledger(self.out / LEDGER_FILE)
        except BaseException:
            self.lock.release()  # sweep() never gets an object to close: give the folder back now
            raise
        self.cache_dir = cfg.engine.cache_dir if cfg.engine.cache_dir is not None else self.out / "cache"
        self.splits: ImageSplits | None = None
        self.data_digest = ""
        self.executor: Executor | None = None
        self.bar: tqdm | None = None
        self.force = force
        self.numerics: dict = {}
        self.runs_executed = 0  # runs this invocation executed (not skipped as finished): the time estimate's unit

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.ledger.close()
        self.lock.release()

    # -- the whole study --------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run (or resume) every phase for every backbone, then write the summary and the report."""
        cfg = self.cfg
        # Everything that can be refused is checked, for every backbone, before the ledger, sweep.json or
        # anything else is written: a refused re-run keeps the folder's previous choices.
        self.splits = splits = cfg.data.load()
        names, skipped = resolve_backbones(cfg)
        preflight(cfg, names, splits)
        self.numerics = numerics_identity(cfg.engine)
        self.executor = make_executor(self.executor_cfg, self.out, cfg.engine.device, self._on_epoch)
        self.data_digest = claim_folder(self.ledger, self.out, cfg.data, splits, self.force,
                                        FeatureCache(self.cache_dir).digest_memo_dir)
        self.ledger.set_meta("config", dataclasses.asdict(cfg))
        self.ledger.set_meta("grid", stable_hash(dataclasses.asdict(cfg)))  # choices of other grids are not shown
        self.ledger.set_meta("command", self.command)
        write_json(self.out / "sweep.json", {"config": dataclasses.asdict(cfg), "executor": dataclasses.asdict(self.executor_cfg),
                                             "command": self.command})
        for name, reason in skipped.items():
            log.warning("skipping %s: %s", name, reason)
        self.ledger.set_meta("backbones", names)
        self.ledger.set_meta("skipped_backbones", skipped)
        self.ledger.set_meta("data_summary", splits.summary())
        ft_terms = (cfg.ft_label_smoothing, cfg.ft_l2sp) if cfg.lpft else ((0.0,), (0.0,))
        self.ledger.set_meta("objective", describe_objective(cfg.l2s, *ft_terms, smoothing_scope="fine-tuning: "))
        self.ledger.set_meta("select", cfg.train.select)
        self.ledger.set_meta("numerics", self.numerics)
        plans = self._announce_plan(names)
        self.bar = tqdm(total=sum(p.total for phases in plans.values() for p in phases), desc="runs", unit="run",
                        disable=not cfg.engine.progress)
        started = time.perf_counter()
        try:
            with logging_redirect_tqdm() if cfg.engine.progress else contextlib.nullcontext():  # log lines above the bar
                for i, name in enumerate(names):
                    self._run_backbone(name)
                    left = sum(p.to_run for later in names[i + 1:] for p in plans[later])
                    estimate = time_left_text(time.perf_counter() - started, self.runs_executed, left)
                    if estimate:
                        # one decimal below 10 s (never "0 s"); 9.95 rounds to "10.0", so it is whole seconds from there
                        per_run = (time.perf_counter() - started) / self.runs_executed
                        progress_log.info("%s finished; %s (%d run(s) to go, from %s s per run so far)", name, estimate,
                                          left, f"{per_run:.1f}" if per_run < 9.95 else f"{per_run:.0f}")
        finally:
            self.bar.close()
        from transferlab.reporting.report import build_report

        return build_report(self.out)

    def _workbench(self, name: str) -> tuple[Workbench, dict[str, int]]:
        """The backbone `name` loaded in a Workbench, and the fine-tuning grid's {unit: layers} on it."""
        cfg = self.cfg
        assert self.splits is not None
        backbone = load_checked(name, cfg.model_dir)
        ft_ks = ft_layer_counts(cfg, backbone)
        # Cache once, at the deepest fine-tuning cut; shallower cuts' inputs are derived from it.
        bench = Workbench(backbone, self.splits, cfg.engine, self.cache_dir, cfg.data.on_bad_image,
                          share_cut_layers=max(ft_ks.values()) if cfg.lpft else None, layer_order=cfg.train.layer_order)
        return bench, ft_ks

    def plan(self, name: str) -> list[PhasePlan]:
        """What each phase of backbone `name` runs and what the ledger already holds. LP-FT's runs start
        from the chosen probe: its done count is known once every planned probe is finished."""
        bench, ft_ks = self._workbench(name)
        probes = self._probe_runs(bench)
        phases = [PhasePlan("LP", len(probes), sum(self.ledger.is_finished(p.hash) for p in probes))]
        if self.cfg.lpft:
            # blocks:N and layers:k naming the same layers are one run (as _finetune_runs plans them)
            total = len(set(ft_ks.values())) * len(self.cfg.finetune_configs(self.cfg.probe_configs()[0]))
            done = None
            if phases[0].to_run == 0:
                chosen = choose(self.ledger.runs(name, "LP"), [p.hash for p in probes], self.cfg.train.select)
                if chosen is None:  # every probe diverged: nothing to fine-tune from
                    total, done = 0, 0
                else:
                    ft = self._finetune_runs(bench, chosen["hash"], ft_ks)
                    total, done = len(ft), sum(self.ledger.is_finished(p.hash) for p in ft)
            phases.append(PhasePlan("LP-FT", total, done))
        return phases

    def _announce_plan(self, names: list[str]) -> dict[str, list[PhasePlan]]:
        """Plan every backbone and say so: the totals, then one line per backbone."""
        plans = {name: self.plan(name) for name in names}
        totals = {m: sum(p.total for phases in plans.values() for p in phases if p.method == m) for m in ("LP", "LP-FT")}
        n_runs = sum(totals.values())
        per_phase = ", ".join(f"{m} {n}" for m, n in totals.items() if m == "LP" or self.cfg.lpft)
        progress_log.info("sweep plan: %d backbone(s), %d run(s) (%s)", len(names), n_runs, per_phase)
        for name, phases in plans.items():
            progress_log.info("%s", plan_line(name, phases))
        return plans

    def _run_backbone(self, name: str) -> None:
        """Both phases of one backbone: the probes, then (with LP-FT) fine-tuning from the chosen probe."""
        cfg = self.cfg
        bench, ft_ks = self._workbench(name)
        spec = bench.backbone.spec
        info = {"source": spec.source, "source_top1": spec.source_top1, "arch": spec.arch}
        self.ledger.set_meta(f"backbone_info:{name}", {**info, **(cfg.backbone_info or {}).get(name, {})})
        self.ledger.set_meta(f"skipped_files:{name}", {})
        if cfg.lpft:
            for k in dict.fromkeys(ft_ks.values()):
                for augment in cfg.ft_augment:
                    try:  # check_ft_grid planned this; the set-up is the final word, before any run
                        bench.check_feature_augment(augment, k)
                    except ConfigError as e:
                        raise ConfigError("ft_augment", e.value, f"{e.reason} ({name})") from None
        probe_hash = self._phase(bench, "LP", self._probe_runs(bench))
        if cfg.lpft and probe_hash is not None:
            self._phase(bench, "LP-FT", self._finetune_runs(bench, probe_hash, ft_ks), start=probe_hash)
        else:
            self.ledger.set_plan(name, "LP-FT", [])
            self.ledger.unchoose(name, "LP-FT")
        if bench.skipped_files:
            self.ledger.set_meta(f"skipped_files:{name}", bench.skipped_files)

    def _on_epoch(self, record: EpochRecord) -> None:
        if self.bar is not None:
            self.bar.set_postfix(val_xent=f"{record['val_xent']:.4f}", val_err=f"{record['val_err']:.3f}")

    # -- what each phase runs ---------------------------------------------------------------------
    def _hash(self, bench: Workbench, method: Method, cfg: TrainConfig, k: int, start: str | None = None) -> str:
        # Where the cached inputs come from changes the numbers (the runtime runs the prefix up to that
        # block, eager PyTorch the rest): part of the run's identity.
        numerics = {**self.numerics, "cached_at": bench.cache_origin(k)} if self.numerics.get("cached") else self.numerics
        self.ledger.set_meta(f"numerics:{bench.backbone.spec.name}:{k}", numerics)  # what export checks a hash with
        return run_hash(method, bench.backbone.spec.name, bench.backbone.weights_digest, self.data_digest, self.cfg.data, cfg, k,
                        start, numerics)

    def _probe_runs(self, bench: Workbench) -> list[PlannedRun]:
        return [PlannedRun(self._hash(bench, "LP", c, 1), c, 1) for c in self.cfg.probe_configs()]

    def _finetune_runs(self, bench: Workbench, probe_hash: str, ft_ks: dict[str, int]) -> list[PlannedRun]:
        probe = self.ledger.run(probe_hash)
        assert probe is not None
        cfgs = self.cfg.finetune_configs(TrainConfig.from_dict(probe["config"]))
        planned: dict[str, PlannedRun] = {}  # blocks:N and layers:k may name the same layers: one run
        for unit, k in ft_ks.items():
            for c in cfgs:
                h = self._hash(bench, "LP-FT", c, k, probe_hash)
                planned.setdefault(h, PlannedRun(h, c, k, unit))
        return list(planned.values())

    # -- one path for every phase -----------------------------------------------------------------
    def _phase(self, bench: Workbench, method: Method, planned: list[PlannedRun], start: str | None = None) -> str | None:
        """Execute the unfinished runs of `planned`, then choose on validation and test once; the chosen hash."""
        assert self.bar is not None and self.executor is not None
        self.ledger.set_plan(bench.backbone.spec.name, method, [p.hash for p in planned])  # what the report reads
        self.bar.set_description(progress_desc(bench.backbone.spec.name, method))
        todo = [p for p in planned if not self.ledger.is_finished(p.hash)]
        self.bar.update(len(planned) - len(todo))
        start_state = None if start is None or not todo else _load_params(self.out, start)
        for k in dict.fromkeys(p.k for p in todo):  # one cut at a time, in grid order
            runs = [p for p in todo if p.k == k]
            units = make_tasks(bench, self.executor, k, [p.cfg for p in runs], start_state, self.cfg.data.on_bad_image)
            self._execute(bench, method, k, [([runs[i] for i in members], task) for members, task in units])
        return self._choose_and_test(bench, method, planned)

    def _execute(self, bench: Workbench, method: Method, k: int, units: list[tuple[list[PlannedRun], Task]]) -> None:
        """Run every unit; each of its runs ends done, diverged or failed (error stored), and the sweep goes on.

        A unit's runs are marked running when it is submitted, and no more units are in flight than the
        executor has room for: an interruption leaves only those unfinished.
        """
        ex, name = self.executor, bench.backbone.spec.name
        assert ex is not None and self.bar is not None
        n_params = bench.trainable_param_count(k)
        runtime = bench.setup(k).runtime  # what computed the cached inputs (None: the uncached path)
        waiting = list(units)
        in_flight: dict[object, list[PlannedRun]] = {}
        while waiting or in_flight:
            while waiting and (ex.capacity is None or len(in_flight) < ex.capacity):
                runs, task = waiting.pop(0)
                for p in runs:
                    self.ledger.mark_running(p.hash, name, method, dataclasses.asdict(p.cfg))
                in_flight[ex.submit(task)] = runs
            handle = ex.wait_any(list(in_flight))
            runs = in_flight.pop(handle)
            try:
                results: list[FitResult] = ex.result(handle)
            except Exception as e:  # a bug, out of memory, a dead worker: record it, keep going
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                for p in runs:
                    self.ledger.fail(p.hash, error)
                log.warning("%s %s: %d run(s) failed (%s); re-run the same command to retry them", name, method, len(runs), error)
            else:
                for p, result in zip(runs, results):
                    self._record(p, result, n_params, runtime)
            self.runs_executed += len(runs)
            self.bar.update(len(runs))

    def _record(self, p: PlannedRun, result: FitResult, n_params: int, runtime: dict | None) -> None:
        _save_params(self.out, p.hash, result.best_state)  # parameters first: a 'done' row always has its file
        val_xent, val_err = result.val_metrics  # of the returned weights (after interpolation, if any)
        metrics = {"best_epoch": result.best_epoch, "epochs_run": result.history[-1]["epoch"], "val_xent": val_xent,
                   "val_err": val_err, "trainable_params": n_params, "n_trainable_layers": p.k, "unit": p.unit,
                   "wise_alpha": result.wise_alpha, "wise": result.wise, "runtime": runtime,
                   # the best epoch's own numbers (before interpolation), as the history and the curves show them
                   "epoch_val_xent": result.best["val_xent"], "epoch_val_err": result.best["val_err"]}
        self.ledger.finish(p.hash, result.status, metrics, list(result.history), {"train_loop_s": result.train_seconds})

    def _choose_and_test(self, bench: Workbench, method: Method, planned: list[PlannedRun]) -> str | None:
        name = bench.backbone.spec.name
        hashes = [p.hash for p in planned]
        if not all(self.ledger.is_finished(h) for h in hashes):
            log.warning("%s %s: some runs failed or are unfinished; re-run the same command to finish them before choosing",
                        name, method)
            self.ledger.unchoose(name, method)
            return None
        chosen = choose(self.ledger.runs(name, method), hashes, self.cfg.train.select)
        if chosen is None:
            log.warning("%s %s: every run diverged; nothing to test", name, method)
            self.ledger.unchoose(name, method)
            return None
        h = chosen["hash"]
        self.ledger.choose(name, method, h)
        k = next(p.k for p in planned if p.hash == h)
        if chosen["test_acc"] is None and bench.splits.test is not None:
            bench.load_trained(k, _load_params(self.out, h))
            test = bench.evaluate_test(k)
            assert test is not None
            # Per-image predictions of this one evaluation: the report's per-class insight reads them.
            write_test_predictions(sweep_predictions_path(self.out, h), bench.splits.classes, test.files, test.labels,
                                   test.probs.numpy())
            self.ledger.record_test(h, test.accuracy)
        return h


def _save_params(out: Path, run_hash_: str, state: dict) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(out / "runs" / f"{run_hash_}.safetensors", save(tensors))


def _load_params(out: Path, run_hash_: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "runs" / f"{run_hash_}.safetensors"))


def sweep(cfg: SweepConfig, out: str | Path, force: bool = False, command: str = "",
          executor: ExecutorConfig = ExecutorConfig()) -> list[dict]:
    """Run (or resume) a sweep into `out`; returns the summary rows (also summary.json/csv, report.html)."""
    s = Sweep(cfg, out, force, command, executor)
    try:
        return s.run()
    finally:
        s.close()

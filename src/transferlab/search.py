"""Grid search and LP-then-FT over backbones, resumable through the ledger.

For every backbone: probe every (lr, l2, seed) on cached features (heads sharing a seed train in one
batched pass), choose on validation only (lowest val cross-entropy, then val error, then grid order),
evaluate the test split once for the chosen probe. With LP-then-FT, fine-tune the last `ft_layers`
layers starting exactly from the chosen probe, over `ft_lrs`, choose on validation, test once.

Every run is a ledger row keyed by a hash of everything that defines its numbers; a re-run skips
finished rows and redoes the rest. The unit of work for probes is the whole seed group, so batched
numerics never depend on what an interrupted run had already finished.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .backbones import DEFAULT_MODEL_DIR, CATALOGUE, check_weights_available, get_spec, load_backbone, with_source
from .freezing import layer_names
from .executors import finetune_task, make_executor, probe_group_task
from .ledger import Ledger
from .study import DataConfig, EngineConfig, Workbench
from .training import FitResult, TrainConfig
from .utils import UserError, atomic_write_bytes, check_writable_dir, stable_hash, write_json

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class SweepConfig:
    """A whole study: data, backbones x sources, the LP grid and the optional LP-then-FT phase."""

    data: DataConfig
    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    sources: tuple[str, ...] = ("imagenet1k",)
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    l2s: tuple[float, ...] = (0.0, 1e-2, 1.0)
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 100
    patience: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    lpft: bool = False
    ft_layers: int = 3
    ft_lrs: tuple[float, ...] = (1e-5, 1e-4)
    ft_train_bn: bool = False
    model_dir: str = DEFAULT_MODEL_DIR
    engine: EngineConfig = field(default_factory=EngineConfig)

    def probe_configs(self) -> list[TrainConfig]:
        """The LP grid in a fixed order (seed, lr, l2): the order also breaks validation ties."""
        return [
            TrainConfig(lr, l2, seed, self.epochs, self.patience, self.batch_size, self.optimizer)
            for seed in self.seeds for lr in self.lrs for l2 in self.l2s
        ]

    def validate(self) -> None:
        for name, values in (("--lr", self.lrs), ("--l2", self.l2s), ("--seeds", self.seeds), ("--backbones", self.backbones), ("--sources", self.sources)):
            if not values:
                raise UserError(f"{name}: needs at least one value")
        for cfg in self.probe_configs():
            cfg.validate()
        if self.lpft:
            if self.ft_layers < 1:
                raise UserError(f"--ft-layers {self.ft_layers}: must be at least 1")
            for lr in self.ft_lrs:
                if not (math.isfinite(lr) and lr > 0):
                    raise UserError(f"--ft-lr {lr}: must be a positive number")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where runs execute; results are the same wherever they run."""

    kind: str = "local"  # "local" | "ray"
    jobs: int = 1  # local worker processes (1: in the coordinating process)
    ray_address: str | None = None  # None: a private local Ray instance; "auto" or "ray://host:port": a cluster
    cpus_per_run: float = 1
    gpus_per_run: float = 0


def resolve_backbones(cfg: SweepConfig) -> tuple[list[str], dict[str, str]]:
    """Backbone names to run (architecture x source) and the skipped ones with the reason."""
    names, skipped = [], {}
    for arch in cfg.backbones:
        candidates = [arch] if arch.endswith("_cub") else [with_source(arch, s) for s in cfg.sources]
        for name in candidates:
            if name in names or name in skipped:
                continue
            if name not in CATALOGUE:
                base = name[: -len("_cub")] if name.endswith("_cub") else name
                get_spec(base)  # unknown architecture: a UserError with suggestions
                skipped[name] = "no published weights for this architecture and source"
                continue
            reason = check_weights_available(name, cfg.model_dir)
            if reason:
                skipped[name] = f"weights {reason} in {cfg.model_dir}"
            else:
                names.append(name)
    return names, skipped


def run_hash(method: str, backbone: str, weights_digest: str, data: DataConfig, train: TrainConfig, k: int, start: str | None = None) -> str:
    """Identity of one run: everything that changes its numbers (not the engine)."""
    return stable_hash(
        {"method": method, "backbone": backbone, "weights": weights_digest, "data": dataclasses.asdict(data),
         "train": dataclasses.asdict(train), "n_trainable_layers": k, "start": start},
        length=20,
    )


def _metrics(result: FitResult, trainable_params: int, k: int) -> dict:
    best = result.best
    return {"best_epoch": result.best_epoch, "epochs_run": result.history[-1]["epoch"], "val_xent": best["val_xent"],
            "val_err": best["val_err"], "trainable_params": trainable_params, "n_trainable_layers": k}


def _save_params(out: Path, run_hash_: str, state: dict) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(out / "runs" / f"{run_hash_}.safetensors", save(tensors))


def _load_params(out: Path, run_hash_: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "runs" / f"{run_hash_}.safetensors"))


def choose(rows: list[dict], order: list[str]) -> dict | None:
    """Among the runs whose hash is in `order`, the finished, non-diverged one with the lowest val xent
    (ties: val err, then position in `order`)."""
    done = [r for r in rows if r["hash"] in order and r["status"] == "done" and r["metrics"]["val_xent"] is not None]
    if not done:
        return None
    return min(done, key=lambda r: (r["metrics"]["val_xent"], r["metrics"]["val_err"], order.index(r["hash"])))


class Sweep:
    """Coordinates one sweep: the only writer of the ledger."""

    def __init__(self, cfg: SweepConfig, out: str | Path, force: bool = False, command: str = "",
                 executor: ExecutorConfig = ExecutorConfig()):
        cfg.validate()
        self.cfg = cfg
        self.executor_cfg = executor
        self.out = check_writable_dir(out)
        self.ledger = Ledger(self.out / LEDGER_FILE)
        identity = stable_hash(dataclasses.asdict(cfg.data))
        previous = self.ledger.get_meta("identity")
        if previous is not None and previous != identity:
            if not force:
                raise UserError(
                    f"--out {self.out}: holds the ledger of a different sweep (other data or splits); "
                    "use another folder or pass --force to add to it"
                )
            with self.ledger.db:
                self.ledger.db.execute("DELETE FROM choices")
        self.ledger.set_meta("identity", identity)
        self.ledger.set_meta("config", dataclasses.asdict(cfg))
        self.ledger.set_meta("command", command)
        write_json(self.out / "sweep.json", {"config": dataclasses.asdict(cfg), "executor": dataclasses.asdict(executor), "command": command})
        self.executor = None
        self.cache_dir = cfg.engine.cache_dir if cfg.engine.cache_dir is not None else self.out / "cache"

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.ledger.close()

    # -- the whole study --------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg = self.cfg
        splits = cfg.data.load()
        names, skipped = resolve_backbones(cfg)
        for name, reason in skipped.items():
            log.warning("skipping %s: %s", name, reason)
        self.ledger.set_meta("backbones", names)
        self.ledger.set_meta("skipped_backbones", skipped)
        self.ledger.set_meta("data_summary", splits.summary())
        if cfg.lpft:
            self._check_ft_layers(names)
        e = self.executor_cfg
        self.executor = make_executor(e.kind, self.out, e.jobs, e.ray_address, e.cpus_per_run, e.gpus_per_run)
        self.task_device = "cuda" if e.gpus_per_run > 0 else "cpu"
        n_runs = len(names) * (len(cfg.probe_configs()) + (len(cfg.ft_lrs) if cfg.lpft else 0))
        bar = tqdm(total=n_runs, desc="runs", unit="run", disable=not cfg.engine.progress, position=0)
        self.epoch_bar = tqdm(desc="epochs", unit="ep", disable=not cfg.engine.progress, position=1, leave=False)
        try:
            for name in names:
                bench = Workbench(load_backbone(name, cfg.model_dir), splits, cfg.engine, self.cache_dir, cfg.data.on_bad_image,
                                  share_cut_layers=cfg.ft_layers if cfg.lpft else None)
                spec = bench.backbone.spec
                self.ledger.set_meta(f"backbone_info:{name}", {"source": spec.source, "source_top1": spec.source_top1, "arch": spec.arch})
                self.ledger.set_meta(f"skipped_files:{name}", {})
                probe_hash = self._probe_phase(name, bench, bar)
                if cfg.lpft and probe_hash is not None:
                    self._finetune_phase(name, bench, probe_hash, bar)
                if bench.skipped_files:
                    self.ledger.set_meta(f"skipped_files:{name}", bench.skipped_files)
        finally:
            bar.close()
            self.epoch_bar.close()
        from .reporting.report import build_report

        return build_report(self.out)

    def _check_ft_layers(self, names: list[str]) -> None:
        for name in names:
            n_layers = len(layer_names(load_backbone(name, pretrained=False).model))
            if self.cfg.ft_layers > n_layers:
                raise UserError(f"--ft-layers {self.cfg.ft_layers}: {name} has only {n_layers} layers")

    def _gather(self, tasks: dict, name: str):
        """Yield (key, result) as tasks finish; a task whose worker died leaves its runs 'running'."""
        ex = self.executor
        while tasks:
            done, _ = ex.wait_any(list(tasks))
            for handle in done:
                key = tasks.pop(handle)
                try:
                    yield key, ex.result(handle)
                except Exception as e:  # worker died or task raised: the runs stay unfinished
                    log.warning("%s: a run failed in its worker (%s: %s); it stays unfinished for the next run",
                                name, type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "")

    def _on_epoch(self, record: dict) -> None:
        self.epoch_bar.update(1)
        self.epoch_bar.set_postfix(val_xent=f"{record['val_xent']:.4f}", val_err=f"{record['val_err']:.3f}", refresh=False)

    def _record(self, h: str, result: FitResult, params: int, k: int) -> None:
        _save_params(self.out, h, result.best_state)  # parameters first: a 'done' row always has its file
        self.ledger.finish(h, result.status, _metrics(result, params, k), result.history, {"train_loop_s": result.train_seconds})

    # -- phase 1: linear probes -----------------------------------------------------------------
    def _probe_phase(self, name: str, bench: Workbench, bar) -> str | None:
        cfg, digest = self.cfg, bench.backbone.weights_digest
        cfgs = cfg.probe_configs()
        hashes = [run_hash("LP", name, digest, cfg.data, c, 1) for c in cfgs]
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(cfgs):
            groups.setdefault(c.seed, []).append(i)
        pending = []
        for members in groups.values():
            if all(self.ledger.is_finished(hashes[i]) for i in members):
                bar.update(len(members))
            else:
                pending.append(members)
        params = bench.backbone.feature_dim * bench.n_classes + bench.n_classes
        if pending:
            bench.prepare(1)  # extraction (or a cache load) only when there is something to train
            if self.executor is None or not bench.cached:
                for members in pending:
                    for i in members:
                        self.ledger.mark_running(hashes[i], name, "LP", dataclasses.asdict(cfgs[i]))
                    self.epoch_bar.reset()
                    results = bench.run_probes([cfgs[i] for i in members], on_epoch=self._on_epoch)
                    for i, result in zip(members, results):
                        self._record(hashes[i], result, params, 1)
                    bar.update(len(members))
            else:
                ex = self.executor
                inputs = bench.export_inputs()
                train_ref, val_ref = ex.put(inputs["train"]), ex.put(inputs["val"])
                tasks = {}
                for members in pending:
                    for i in members:
                        self.ledger.mark_running(hashes[i], name, "LP", dataclasses.asdict(cfgs[i]))
                    handle = ex.submit(probe_group_task, bench.backbone.feature_dim, bench.n_classes, bench.backbone.classifier_name,
                                       train_ref, val_ref, [cfgs[i] for i in members], self.task_device, ex.threads)
                    tasks[handle] = members
                for members, results in self._gather(tasks, name):
                    for i, result in zip(members, results):
                        self._record(hashes[i], result, params, 1)
                    bar.update(len(members))
        if not all(self.ledger.is_finished(h) for h in hashes):
            log.warning("%s: some probes are unfinished; re-run the same command to finish them before choosing", name)
            return None
        chosen = choose(self.ledger.runs(name, "LP"), hashes)
        if chosen is None:
            log.warning("%s: every probe diverged or failed; nothing to test", name)
            return None
        self.ledger.choose(name, "LP", chosen["hash"])
        if self.ledger.run(chosen["hash"])["test_acc"] is None:
            bench.load_trained(1, _load_params(self.out, chosen["hash"]))
            self.ledger.set_test_acc(chosen["hash"], bench.test_accuracy())
        return chosen["hash"]

    # -- phase 2: fine-tune the last layers from the chosen probe ---------------------------------
    def _finetune_phase(self, name: str, bench: Workbench, probe_hash: str, bar) -> None:
        cfg, digest, k = self.cfg, bench.backbone.weights_digest, self.cfg.ft_layers
        probe = self.ledger.run(probe_hash)
        probe_cfg = probe["config"]
        start_state = _load_params(self.out, probe_hash)
        ft_cfgs = [TrainConfig(lr, probe_cfg["l2"], probe_cfg["seed"], cfg.epochs, cfg.patience, cfg.batch_size, cfg.optimizer,
                               train_bn=cfg.ft_train_bn) for lr in cfg.ft_lrs]
        hashes = [run_hash("LP-FT", name, digest, cfg.data, c, k, start=probe_hash) for c in ft_cfgs]
        todo = [(h, c) for h, c in zip(hashes, ft_cfgs) if not self.ledger.is_finished(h)]
        bar.update(len(hashes) - len(todo))
        if todo:
            bench.prepare(k)
            if self.executor is None or not bench.cached:
                for h, c in todo:
                    self.ledger.mark_running(h, name, "LP-FT", dataclasses.asdict(c))
                    self.epoch_bar.reset()
                    try:
                        result = bench.run(c, k, start_state=start_state, on_epoch=self._on_epoch)
                    except (RuntimeError, ValueError) as e:  # e.g. out of memory: record, keep going
                        self.ledger.fail(h, f"{type(e).__name__}: {e}")
                        log.warning("%s LP-FT lr=%g failed: %s", name, c.lr, e)
                    else:
                        self._record(h, result, bench.trainable_param_count(), k)
                    bar.update(1)
            else:
                ex = self.executor
                bench.reset(seed=0)  # ship pristine weights
                n_params = bench.trainable_param_count()
                refs = [ex.put(x) for x in (bench.backbone, bench.splits, bench.export_inputs(), start_state)]
                tasks = {}
                for h, c in todo:
                    self.ledger.mark_running(h, name, "LP-FT", dataclasses.asdict(c))
                    tasks[ex.submit(finetune_task, refs[0], refs[1], k, refs[2], c, refs[3], self.task_device, ex.threads)] = h
                for h, result in self._gather(tasks, name):
                    self._record(h, result, n_params, k)
                    bar.update(1)
        if not all(self.ledger.is_finished(h) for h in hashes):
            log.warning("%s: some fine-tuning runs are unfinished; re-run the same command to finish them", name)
            return
        chosen = choose(self.ledger.runs(name, "LP-FT"), hashes)
        if chosen is None:
            log.warning("%s: no fine-tuning run finished; nothing to test", name)
            return
        self.ledger.choose(name, "LP-FT", chosen["hash"])
        if self.ledger.run(chosen["hash"])["test_acc"] is None:
            bench.load_trained(k, _load_params(self.out, chosen["hash"]))
            self.ledger.set_test_acc(chosen["hash"], bench.test_accuracy())


def sweep(cfg: SweepConfig, out: str | Path, force: bool = False, command: str = "",
          executor: ExecutorConfig = ExecutorConfig()) -> list[dict]:
    """Run (or resume) a sweep into `out`; returns the summary rows (also summary.json/csv, report.html)."""
    s = Sweep(cfg, out, force, command, executor)
    try:
        return s.run()
    finally:
        s.close()


"""One probe (or last-k-layers fine-tune): configs in, run.json / head.safetensors / test_predictions.json out
(its report is built from them by the caller: ``transferlab.api.run_probe``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from transferlab.core.fields import option
from transferlab.core.files import atomic_write_bytes, check_writable_dir, created_dirs_removed_on_failure, write_json
from transferlab.core.hashing import stable_hash
from transferlab.data import DataConfig
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.models import DEFAULT_BACKBONE, DEFAULT_MODEL_DIR, load_backbone
from transferlab.train.config import TrainConfig
from transferlab.train.limits import probe_warnings
from transferlab.train.objective import Objective
from transferlab.train.observer import Observers, RunEnd, RunInfo, RunObserver
from transferlab.train.results import EpochRecord, FitResult
from transferlab.train.session import RunSession

__all__ = ["CutInputs", "DataConfig", "EngineConfig", "ProbeConfig", "RunSession", "train_probe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    """Everything that defines one probe / fine-tuning run; saved in run.json."""

    data: DataConfig
    backbone: str = option(DEFAULT_BACKBONE, "backbone name (see `transferlab backbones`)")
    model_dir: str = option(DEFAULT_MODEL_DIR, "folder with official pytorchcv .pth files")
    weights: str | None = option(None, "local checkpoint (.safetensors or .pth) for the --backbone architecture")
    n_trainable_layers: int = option(1, "train the last k layers (1 = linear probe)")
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def build_session(cfg: ProbeConfig, out: Path) -> RunSession:
    """Validate inputs, load splits and backbone, and return a RunSession on their CutInputs (no heavy compute yet)."""
    splits = cfg.data.load()
    backbone = load_backbone(cfg.backbone, model_dir=cfg.model_dir, weights=cfg.weights)
    cache_dir = cfg.engine.cache_dir if cfg.engine.cache_dir is not None else out / "cache"
    return RunSession(CutInputs(backbone, splits, cfg.engine, cache_dir, cfg.data.on_bad_image, layer_order=cfg.train.layer_order))


def run_record(cfg: ProbeConfig, session: RunSession, result: FitResult, test_acc: float | None, seconds: dict,
               command: str | None = None) -> dict:
    """The JSON-ready record of a finished run; `command` is what reproduces it (the command line, or the
    ``transferlab.probe(...)`` call), None when unknown."""
    best = result.best
    inputs = session.inputs
    spec = inputs.backbone.spec
    k = cfg.n_trainable_layers
    setup = inputs.setup(k)
    return {
        "config": dataclasses.asdict(cfg),
        "command": command,
        "backbone": {
            "name": spec.name, "zoo": spec.zoo, "arch": spec.arch, "source": spec.source,
            "source_top1": spec.source_top1, "weights": inputs.backbone.weights,
            "weights_digest": inputs.backbone.weights_digest,
            "preprocessing": dataclasses.asdict(spec.preprocessing),
        },
        "data": inputs.splits.summary(),
        "data_digest": stable_hash(inputs.splits.fingerprint(inputs.cache.digest_memo_dir)),
        "skipped_files": inputs.skipped_files,
        "status": result.status,
        "objective": Objective(cfg.train.l2, 1, cfg.train.label_smoothing, cfg.train.l2sp).describe(),
        "n_trainable_layers": k,
        "trainable_layers": list(setup.cut.trainable_layers),
        "trainable_params": session.trainable_param_count(k),
        "cached": setup.cached,
        "cache_cut": setup.cut.name,
        "notice": setup.notice,
        "runtime": setup.runtime,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "epochs_run": result.history[-1]["epoch"],
        "val_xent": best["val_xent"],
        "val_err": best["val_err"],
        "test_acc": test_acc,
        # where the run sits at a limit of what it was allowed (the best epoch at the epoch cap)
        "warnings": probe_warnings(result.best_epoch, cfg.train.epochs, result.history[-1]["epoch"], cfg.train.patience) if result.status == "done" else [],
        "timings": {**seconds, **inputs.timings},
        "device": str(inputs.placement.device),
    }


# Everything a probe writes into OUT (its cache/ aside). A re-run replaces the whole set, so a folder never
# shows one run's record beside another run's test predictions or insight (a run without a test split,
# or a diverged one, writes fewer of them).
RUN_OUTPUTS = ("run.json", "head.safetensors", "curves.png", "report.html", "test_predictions.json", "insight.html", "insight")


def run_outputs_in(out: Path) -> list[Path]:
    """The outputs of the run in `out` that exist, in :data:`RUN_OUTPUTS` order."""
    return [out / name for name in RUN_OUTPUTS if (out / name).exists()]


def feature_cache_in(out: Path, cache_dir: str | None) -> Path | None:
    """The feature cache folder a probe with ``cache_dir`` (None: ``out/cache``) used, when it exists inside
    `out` (the probe wrote it there; one elsewhere is the user's shared cache, not an output of this run)."""
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    if not cache.is_dir():
        return None
    return cache if cache.resolve().is_relative_to(out.resolve()) else None


def clear_run_outputs(out: Path) -> None:
    """Remove the outputs of an earlier run from `out` (run.json first: a half-cleared folder is no run)."""
    import shutil

    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class ProbeProgress(RunObserver):
    """The probe's epoch bar."""

    def __init__(self, epochs: int, enabled: bool):
        self.bar = tqdm(total=epochs + 1, desc="epochs", unit="ep", disable=not enabled, leave=False)

    def epoch(self, run_id: str, record: EpochRecord) -> None:
        self.bar.update(1)
        self.bar.set_postfix(val_xent=f"{record['val_xent']:.4f}", val_err=f"{record['val_err']:.3f}", refresh=False)

    def run_end(self, run_id: str, end: RunEnd) -> None:
        self.bar.close()


def train_probe(cfg: ProbeConfig, out: str | Path, command: str | None = None, observers: Sequence[RunObserver] = ()) -> dict:
    """Train one probe (or last-k-layers fine-tune) and write run.json and head.safetensors (and with a test
    split test_predictions.json). An earlier run's outputs in `out` (its report included) are kept until
    this run has its results, then all removed (:data:`RUN_OUTPUTS`).

    `command` (the command line or Python call that reproduces the run) goes into run.json and the report.
    `observers` see the run's events (its id: the output folder); the epoch bar is one of them.
    Returns the run record (also in ``out/run.json``). A failure leaves no new, empty `out` behind.
    """
    with created_dirs_removed_on_failure():
        return _run_probe(cfg, out, command, observers)


def _run_probe(cfg: ProbeConfig, out: str | Path, command: str | None, observers: Sequence[RunObserver]) -> dict:
    from safetensors.torch import save

    t0 = time.perf_counter()
    cfg.train.validate()
    if cfg.train.augment and cfg.engine.use_cache:
        log.warning("--augment: every epoch sees new views of the images, so the backbone runs on every image every epoch (no cache)")
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, use_cache=False))
    out = check_writable_dir(out)
    session = build_session(cfg, out)
    t_load = time.perf_counter()
    session.inputs.setup(cfg.n_trainable_layers)
    t_inputs = time.perf_counter()
    watch = Observers([ProbeProgress(cfg.train.epochs, cfg.engine.progress), *observers])
    run_id, k = str(out), cfg.n_trainable_layers
    watch.run_start(RunInfo(run_id, session.inputs.backbone.spec.name, "probe", cfg.train, k, f"layers:{k}"))
    result = session.run(cfg.train, k, on_epoch=lambda record: watch.epoch(run_id, record))
    val_xent, val_err = result.val_metrics
    watch.run_end(run_id, RunEnd(result.status, {"best_epoch": result.best_epoch, "val_xent": val_xent, "val_err": val_err},
                                 result=result))
    t_fit = time.perf_counter()
    test = session.evaluate_test(cfg.n_trainable_layers) if result.status == "done" else None
    # Only now, with this run's results in hand, does the folder stop showing the previous run's.
    clear_run_outputs(out)
    if test is not None:  # the per-image predictions of that one evaluation, for the per-class insight
        from transferlab.core.predictions import write_test_predictions

        write_test_predictions(out / "test_predictions.json", session.inputs.splits.classes, test.files, test.labels, test.probs.numpy())
    t_test = time.perf_counter()
    seconds = {
        "load_s": t_load - t0, "inputs_s": t_inputs - t_load, "fit_s": t_fit - t_inputs,
        "train_loop_s": result.train_seconds, "test_s": t_test - t_fit, "total_s": t_test - t0,
    }
    record = run_record(cfg, session, result, None if test is None else test.accuracy, seconds, command)
    if test is not None:
        watch.test(run_id, test.accuracy)
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.best_state.items()}
    atomic_write_bytes(out / "head.safetensors", save(tensors, metadata={"backbone": session.inputs.backbone.spec.name}))
    write_json(out / "run.json", record)
    return record

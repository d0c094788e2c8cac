"""One probe (or last-k-layers fine-tune) as a command: configs in, run.json / head.safetensors / curves / report out."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from transferlab.core.errors import ConfigError
from transferlab.core.fields import build_config, check_keywords, config_fields, field_doc, keyword_signature, option, path_argument
from transferlab.core.files import atomic_write_bytes, check_writable_dir, created_dirs_removed_on_failure, write_json
from transferlab.core.hashing import stable_hash
from transferlab.data import DataConfig
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.models import DEFAULT_BACKBONE, DEFAULT_MODEL_DIR, load_backbone
from transferlab.reporting.probe_report import probe_warnings
from transferlab.train.config import TrainConfig
from transferlab.train.objective import Objective
from transferlab.train.results import EpochRecord, FitResult
from transferlab.train.session import RunSession

__all__ = ["CutInputs", "DataConfig", "EngineConfig", "ProbeConfig", "RunSession", "probe", "run_probe"]

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


def run_probe(cfg: ProbeConfig, out: str | Path, command: str | None = None) -> dict:
    """Train one probe (or last-k-layers fine-tune) and write run.json, head.safetensors, curves.png and
    report.html (and with a test split test_predictions.json, insight.html, insight/). An earlier run's outputs in
    `out` are kept until this run has its results, then all replaced (:data:`RUN_OUTPUTS`).

    `command` (the command line or Python call that reproduces the run) goes into run.json and the report.
    Returns the run record (also in ``out/run.json``). A failure leaves no new, empty `out` behind.
    """
    with created_dirs_removed_on_failure():
        return _run_probe(cfg, out, command)


def _run_probe(cfg: ProbeConfig, out: str | Path, command: str | None) -> dict:
    from safetensors.torch import save

    from transferlab.reporting.probe_report import build_probe_report

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
    bar = tqdm(total=cfg.train.epochs + 1, desc="epochs", unit="ep", disable=not cfg.engine.progress, leave=False)

    def on_epoch(record: EpochRecord) -> None:
        bar.update(1)
        bar.set_postfix(val_xent=f"{record['val_xent']:.4f}", val_err=f"{record['val_err']:.3f}", refresh=False)

    result = session.run(cfg.train, cfg.n_trainable_layers, on_epoch=on_epoch)
    bar.close()
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
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.best_state.items()}
    atomic_write_bytes(out / "head.safetensors", save(tensors, metadata={"backbone": session.inputs.backbone.spec.name}))
    write_json(out / "run.json", record)
    build_probe_report(out)  # curves.png, the insight and report.html, from run.json and test_predictions.json alone
    return record


def probe(data: str | os.PathLike, out: str | os.PathLike, backbone: str = DEFAULT_BACKBONE, **fields: Any) -> dict:
    """Python twin of ``transferlab probe``: train one probe on `data`, write outputs to `out`, return the record.

    Keyword arguments are the config fields below (those of ``ProbeConfig`` and its ``DataConfig``,
    ``TrainConfig`` and ``EngineConfig``), by name and with their types: ``probe(data, out, lr=1e-3)``;
    any real number is a float and any integral one an int (``np.float32``, ``np.int64``), stored as
    the plain Python number. An unknown name, a sweep-only one or a value of the wrong type raises a
    ConfigError naming the field (and close names).
    """
    data_text, out_text = path_argument("data", data), path_argument("out", out)
    if not isinstance(backbone, str):
        raise ConfigError("backbone", repr(backbone), f"expected str, got {type(backbone).__name__}")
    checked = check_keywords(PROBE_FIELDS, fields, _sweep_options())
    call = ", ".join([repr(data_text), repr(out_text), f"backbone={backbone!r}", *(f"{k}={v!r}" for k, v in checked.items())])
    return run_probe(build_config(ProbeConfig, {**checked, "data": data_text, "backbone": backbone}), out_text,
                     command=f"transferlab.probe({call})")


def _sweep_options() -> dict[str, str]:
    """{field: what a probe says of it} for the fields only ``transferlab sweep`` has (``ft_blocks``, ``seeds``)."""
    from transferlab.cli.sweep import SWEEP_FLAGS

    return {fl.field: f"is a sweep option (transferlab sweep {fl.flag}), not a probe field"
            for fl in SWEEP_FLAGS if fl.field not in PROBE_FIELDS}


PROBE_FIELDS = config_fields(ProbeConfig)
probe.__signature__ = keyword_signature(probe, PROBE_FIELDS, skip=("data",))  # type: ignore[attr-defined]
probe.__doc__ = f"{probe.__doc__}\n    Fields:\n{field_doc({k: v for k, v in PROBE_FIELDS.items() if k not in ('data', 'backbone')})}\n"

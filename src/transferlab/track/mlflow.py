"""MLflow as a run observer: a sweep is a parent run, every ledger run a nested run; a probe is one run.

Each run is tagged with its run hash (a probe: its output folder), backbone, method and data fingerprint;
its params are its whole TrainConfig by field name plus n_trainable_layers and unit; its epoch metrics
have step = epoch; its final metrics and its status are set when it ends, its test accuracy only where
the test split was read. Runs are found again by their hash tag under the folder's parent run, so a
re-run logs nothing twice: a finished MLflow run is skipped, one left running by a killed sweep is set
FAILED and its re-run logged anew. The ledger holds everything a run's MLflow record needs, so what the
events missed (runs finished by an earlier command, a tracker that was down) is pushed from it when the
command ends, or later by ``transferlab track OUT`` (``track.push``).

Every call goes through :func:`_guarded`: a tracking failure turns tracking off with one warning line
and never reaches the sweep. The only module importing mlflow (lazily, when tracking starts).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from transferlab.core.hashing import stable_hash
from transferlab.sweep.ledger import Ledger
from transferlab.track.config import Kind
from transferlab.train.observer import RunEnd, RunInfo, RunObserver
from transferlab.train.results import EpochRecord

log = logging.getLogger(__name__)

TAG = "transferlab."
HASH, BACKBONE, METHOD, DATA, KIND, FOLDER, STATUS = (TAG + n for n in ("run_hash", "backbone", "method", "data_fingerprint",
                                                                       "kind", "folder", "status"))
EPOCH_METRICS = ("train_loss", "train_xent", "train_err", "val_xent", "val_err", "lr")
# A run's numbers when it ended, by their MLflow names: val_xent / val_err of the returned weights (after
# WiSE-FT, if any) are final_*, so that they do not join the epoch curves of the same name.
FINAL_METRICS = {"best_epoch": "best_epoch", "epochs_run": "epochs_run", "val_xent": "final_val_xent", "val_err": "final_val_err",
                 "epoch_val_xent": "best_epoch_val_xent", "epoch_val_err": "best_epoch_val_err",
                 "trainable_params": "trainable_params", "wise_alpha": "wise_alpha"}
SWEEP_ARTIFACTS = ("summary.json", "summary.csv", "report.html", "sweep.json", "figures")
PROBE_ARTIFACTS = ("run.json", "report.html", "curves.png")
MAX_BATCH = 1000  # metrics per log_batch request (MLflow's limit)

F = TypeVar("F", bound=Callable[..., Any])


def default_uri(out: Path) -> str:
    """The local store of a folder: OUT/mlflow.db (MLflow 3 refuses plain mlruns/ folders as a tracking store)."""
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def _guarded(method: F) -> F:
    """`method` unless tracking is off; a failure turns it off with one warning line instead of raising."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.off:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            self.off = True
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            log.warning("MLflow tracking at %s stopped (%s: %s); the %s goes on, and re-running the same command or "
                        "`transferlab track %s` pushes what is missing", self.uri, type(e).__name__, first, self.kind, self.out)
            return None

    return call  # type: ignore[return-value]


class Store:
    """One experiment of an MLflow tracking store, and the runs of one output folder in it."""

    def __init__(self, uri: str, experiment: str, out: Path):
        # A server that is down is said at once, not after minutes of retries (the user's settings win); what
        # a lost request missed is pushed from the folder later.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # its database set-up talks at INFO (mlflow sets its level on import)
            if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:  # a local store keeps its artifacts beside its database, not in the working directory
            local = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri() if uri.startswith("sqlite:///") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=local)
        self.folder = stable_hash(str(out.resolve()))  # the folder's tag: plain hex, no quoting in filters

    def search(self, where: str) -> list[Any]:
        """Every active run of the experiment matching the filter `where`, oldest first."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{FOLDER}` = '{self.folder}' and {where}",
                                           max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def by_hash(self, where: str) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for run in self.search(where):
            out.setdefault(run.data.tags.get(HASH, ""), []).append(run)
        return out

    def sweep_parent(self, out: Path) -> str:
        """The folder's sweep run (made on first use), set running again."""
        found = self.search(f"tags.`{KIND}` = 'sweep'")
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep {out.name}",
                                     tags={KIND: "sweep", FOLDER: self.folder, TAG + "out": str(out.resolve())})
        return run.info.run_id

    def new_run(self, tags: dict[str, str], config: Mapping[str, Any], k: int, unit: str) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, tags={FOLDER: self.folder, **tags},
                                     run_name=f"{tags[BACKBONE]} {tags[METHOD]} {tags[HASH][-12:]}")
        params = {**{k: _param(v) for k, v in config.items()}, "n_trainable_layers": str(k), "unit": unit}
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id

    def log_epochs(self, run_id: str, records: Iterable[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # non-finite values (a diverged epoch) are left out, as the ledger's JSON leaves them out: live and pushed runs agree
        metrics = [Metric(name, float(r[name]), now, int(r["epoch"])) for r in records for name in EPOCH_METRICS
                   if r.get(name) is not None and math.isfinite(r[name])]
        for i in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH])

    def end_run(self, run_id: str, status: str, metrics: Mapping[str, Any], train_seconds: float | None, error: str | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finals = {FINAL_METRICS[k]: v for k, v in metrics.items() if k in FINAL_METRICS and isinstance(v, (int, float)) and math.isfinite(v)}
        if train_seconds is not None:
            finals["train_loop_s"] = train_seconds
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in finals.items()])
        self.client.set_tag(run_id, STATUS, status)
        if error:
            self.client.set_tag(run_id, TAG + "error", error[:5000])
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")

    def mark_interrupted(self, run_id: str, status: str = "FAILED") -> None:
        self.client.set_tag(run_id, STATUS, "interrupted")
        self.client.set_terminated(run_id, status)

    def log_model(self, run_id: str, model_dir: Path, classes: list[str]) -> None:
        """An exported model folder as the run's MLflow pyfunc model (artifact ``model``; ``track.pyfunc`` loads it)."""
        import tempfile

        import mlflow.pyfunc
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        from transferlab.core.version import __version__
        from transferlab.track.pyfunc import INPUT_COLUMN, LABEL_COLUMN

        signature = ModelSignature(Schema([ColSpec("string", INPUT_COLUMN)]),
                                   Schema([ColSpec("string", LABEL_COLUMN), *(ColSpec("double", c) for c in classes)]))
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it asks for an input example: the signature says what goes in
            mlflow.pyfunc.save_model(str(Path(tmp) / "model"), loader_module="transferlab.track.pyfunc", data_path=str(model_dir),
                                     signature=signature, metadata={"classes": classes},
                                     pip_requirements=[f"transferlab=={__version__}", "pandas"])  # not inferred: no trial load
            self.client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")

    def log_artifacts(self, run_id: str, folder: Path, names: Iterable[str]) -> None:
        for name in names:
            path = folder / name
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), name)
            elif path.is_file():
                self.client.log_artifact(run_id, str(path))


def _param(value: Any) -> str:
    """A config value as an MLflow param: a tuple as the comma list its flag takes."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


class MlflowTracker(RunObserver):
    """The runs of one probe or sweep in MLflow (``--track mlflow``); connects on the first event."""

    def __init__(self, out: Path, kind: Kind, uri: str | None = None, experiment: str = "transferlab"):
        self.out, self.kind, self.uri, self.experiment = Path(out), kind, uri or default_uri(Path(out)), experiment
        self.off = False
        self.store: Store | None = None
        self.parent: str | None = None
        self.data_fingerprint: str | None = None
        self.finished: dict[str, str] = {}  # run hash -> its finished MLflow run
        self.live: dict[str, str] = {}  # run hash -> its MLflow run, in flight

    def _connect(self) -> Store:
        if self.store is None:
            store = Store(self.uri, self.experiment, self.out)
            if self.kind == "sweep":
                self.parent = store.sweep_parent(self.out)
                self.data_fingerprint = _ledger_fingerprint(self.out)
                known = store.by_hash(f"tags.`mlflow.parentRunId` = '{self.parent}' and attributes.status = 'FINISHED'")
                self.finished = {h: runs[0].info.run_id for h, runs in known.items()}
            self.store = store
        return self.store

    @_guarded
    def run_start(self, run: RunInfo) -> None:
        store = self._connect()
        if self.kind == "sweep" and run.run_id in self.finished:
            return  # logged by an earlier command: not twice
        tags = {HASH: run.run_id, BACKBONE: run.backbone, METHOD: run.method, KIND: "sweep-run" if self.parent else "probe"}
        if self.parent is not None:
            tags["mlflow.parentRunId"] = self.parent
            for stale in store.search(f"tags.`{HASH}` = '{run.run_id}' and attributes.status = 'RUNNING'"):
                store.mark_interrupted(stale.info.run_id)  # left running by a killed sweep
        if self.data_fingerprint is not None:
            tags[DATA] = self.data_fingerprint
        self.live[run.run_id] = store.new_run(tags, dataclasses.asdict(run.config), run.n_trainable_layers, run.unit)

    @_guarded
    def epoch(self, run_id: str, record: EpochRecord) -> None:
        if run_id in self.live:
            self._connect().log_epochs(self.live[run_id], [record])

    @_guarded
    def run_end(self, run_id: str, end: RunEnd) -> None:
        if run_id not in self.live:
            return
        mlflow_id = self.live.pop(run_id)
        seconds = end.result.train_seconds if end.result is not None else None
        status = "failed" if end.error is not None or end.result is None else end.status
        self._connect().end_run(mlflow_id, status, end.metrics, seconds, end.error)
        if status != "failed":
            self.finished[run_id] = mlflow_id

    @_guarded
    def test(self, run_id: str, accuracy: float) -> None:
        if run_id in self.finished:  # else the run was logged by no command yet: close() pushes it with its accuracy
            self._connect().client.log_metric(self.finished[run_id], "test_acc", accuracy)

    @_guarded
    def close(self, interrupted: bool = False, push: Callable[[MlflowTracker], None] | None = None) -> None:
        """End the command's tracking: `push` what is missing from the folder and attach its report
        (``track.push.push_missing``), or, when `interrupted`, mark the runs in flight and the sweep killed."""
        if interrupted:
            if self.store is not None:
                for mlflow_id in [*self.live.values(), *([self.parent] if self.parent else [])]:
                    self.store.mark_interrupted(mlflow_id, "KILLED")
            return
        if push is not None:
            push(self)

    def connect(self) -> Store:
        """The store, connected (and the sweep's parent run found or made) on first use."""
        return self._connect()


def _ledger_fingerprint(out: Path) -> str | None:
    """The data digest of every run hash in `out` (``sweep.store.claim_folder``), None before the sweep claimed it."""
    if not (out / "ledger.sqlite").is_file():
        return None
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        fingerprint = ledger.get_meta("data_fingerprint")
    finally:
        ledger.close()
    return None if fingerprint is None else stable_hash(fingerprint)

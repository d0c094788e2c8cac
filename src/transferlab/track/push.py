"""What MLflow lacks of a folder, pushed from its files: a sweep's finished ledger runs, their test accuracies,
the choices, the report and the chosen model; a probe's record, report and model (``transferlab track OUT``).

The ledger (a probe: run.json) holds everything a run's MLflow record needs, so a run logged from it here
has the same params, curves and final metrics as one logged live by the tracker."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from transferlab.core.errors import UserError
from transferlab.core.hashing import stable_hash
from transferlab.sweep.ledger import FINISHED, METHODS, Ledger, RunRow
from transferlab.sweep.manifest import read_manifest
from transferlab.sweep.select import pick_choice, sweep_choices
from transferlab.track.mlflow import BACKBONE, DATA, HASH, KIND, METHOD, PROBE_ARTIFACTS, SWEEP_ARTIFACTS, TAG, MlflowTracker, Store, default_uri

MODEL_ARTIFACT = "model"

log = logging.getLogger(__name__)


def push_sweep(store: Store, parent: str, out: Path) -> int:
    """Log every finished ledger run of `out` that has no finished MLflow run under `parent` (a stale running
    one is set FAILED), the test accuracies missing, the choices, the report and the model export takes;
    end the sweep's run. Returns how many runs it logged."""
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        rows: list[RunRow] = ledger.runs()
        fingerprint = ledger.get_meta("data_fingerprint")
        chosen = {(b, m): ledger.choice(b, m) for b in {r["backbone"] for r in rows} for m in METHODS}
        choices = sweep_choices(ledger)
        exported = pick_choice(choices, None, None, str(out), read_manifest(ledger).select)["hash"] if choices else None
    finally:
        ledger.close()
    have = store.by_hash(f"tags.`mlflow.parentRunId` = '{parent}'")
    logged, finished = 0, dict[str, str]()
    try:
        logged = _push_runs(store, parent, rows, have, fingerprint, finished)
        for (backbone, method), h in chosen.items():
            tag = re.sub(r"[^\w./ -]", "_", f"{TAG}chosen.{backbone}.{method}")
            if h is not None:
                store.client.set_tag(parent, tag, h)
            elif tag in store.client.get_run(parent).data.tags:  # a choice of an earlier grid: not this sweep's
                store.client.delete_tag(parent, tag)
        if (out / "sweep.json").is_file():
            _tag_command(store, parent, json.loads((out / "sweep.json").read_text()).get("command"))
        store.log_artifacts(parent, out, SWEEP_ARTIFACTS)
        if exported is not None and exported in finished:
            try:
                log_exported_model(store, finished[exported], out, exported)
                store.client.set_tag(parent, TAG + "model_run", finished[exported])
            except Exception as e:  # the runs are logged all the same; the model waits for `transferlab track OUT`
                log.warning("MLflow: the model export takes could not be logged (%s: %s)", type(e).__name__, str(e)[:160])
    finally:
        store.client.set_terminated(parent, "FINISHED")
    return logged


def _push_runs(store: Store, parent: str, rows: list[RunRow], have: dict, fingerprint, finished: dict) -> int:
    """Log the finished ledger runs MLflow lacks under `parent`; a child left RUNNING by a command that is
    over (killed) is set FAILED. Fills `finished` {hash: MLflow run id}; returns how many runs it logged."""
    logged = 0
    for row in rows:
        if row["status"] not in FINISHED:
            for stale in (r for r in have.get(row["hash"], []) if r.info.status == "RUNNING"):
                store.mark_interrupted(stale.info.run_id)
            continue
        runs = have.get(row["hash"], [])
        done = next((r for r in runs if r.info.status == "FINISHED"), None)
        if done is None:
            for stale in (r for r in runs if r.info.status == "RUNNING"):
                store.mark_interrupted(stale.info.run_id)
            metrics = row["metrics"] or {}
            tags = {HASH: row["hash"], BACKBONE: row["backbone"], METHOD: row["method"], KIND: "sweep-run", "mlflow.parentRunId": parent,
                    **({DATA: stable_hash(fingerprint)} if fingerprint is not None else {})}
            run_id = store.new_run(tags, row["config"], metrics.get("n_trainable_layers", 1), metrics.get("unit", "layers:1"))
            store.log_epochs(run_id, row["history"] or [])
            store.end_run(run_id, row["status"], metrics, (row["timings"] or {}).get("train_loop_s"), None)
            logged += 1
        else:
            run_id = done.info.run_id
        finished[row["hash"]] = run_id
        if row["test_acc"] is not None and (done is None or "test_acc" not in done.data.metrics):
            store.client.log_metric(run_id, "test_acc", row["test_acc"])
    return logged


def push_probe(store: Store, out: Path, run_id: str | None) -> int:
    """Attach a probe's record, report and model to its MLflow run (`run_id`; None: log the run from run.json
    unless a run of this very record is there already). Returns how many runs it logged."""
    record = json.loads((out / "run.json").read_text())
    digest = stable_hash(record)
    logged = 0
    if run_id is None:
        if store.search(f"tags.`{TAG}record` = '{digest}'"):
            return 0
        tags = {HASH: str(out), BACKBONE: record["backbone"]["name"], METHOD: "probe", KIND: "probe"}
        run_id = store.new_run(tags, record["config"]["train"], record["n_trainable_layers"], f"layers:{record['n_trainable_layers']}")
        store.log_epochs(run_id, record["history"])
        store.end_run(run_id, record["status"], record, record["timings"].get("train_loop_s"), None)
        if record["test_acc"] is not None:
            store.client.log_metric(run_id, "test_acc", record["test_acc"])
        logged = 1
    store.client.set_tag(run_id, DATA, record["data_digest"])
    store.client.set_tag(run_id, TAG + "record", digest)
    _tag_command(store, run_id, record.get("command"))
    store.log_artifacts(run_id, out, PROBE_ARTIFACTS)
    if record["status"] == "done":
        log_exported_model(store, run_id, out, None)
    return logged


def _tag_command(store: Store, run_id: str, command: str | None) -> None:
    """The command that reproduces the folder, as a tag and as the run's description in the MLflow UI."""
    if command:
        store.client.set_tag(run_id, TAG + "command", command[:5000])
        store.client.set_tag(run_id, "mlflow.note.content", f"`{command[:5000]}`")


def log_exported_model(store: Store, run_id: str, out: Path, run_hash: str | None) -> None:
    """The network ``transferlab export OUT`` writes, as run `run_id`'s MLflow model (artifact ``model``:
    a pyfunc model with a signature naming the classes), unless the run has one already."""
    if store.client.list_artifacts(run_id, MODEL_ARTIFACT):
        return
    from transferlab.deploy.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        config = export_model(out, Path(tmp) / "export")
        if run_hash is not None and config["provenance"]["run_hash"] != run_hash:  # the folder changed under us
            return
        store.log_model(run_id, Path(tmp) / "export", list(config["classes"]))


def push_folder(out: Path, uri: str | None = None, experiment: str = "transferlab") -> int:
    """``transferlab track OUT``: push what MLflow lacks of the sweep or probe in `out`; how many runs it logged.
    A tracker that cannot be reached is a UserError naming the URI."""
    if not (out / "ledger.sqlite").is_file() and not (out / "run.json").is_file():
        raise UserError(f"{out}: neither a sweep's ledger.sqlite nor a probe's run.json here")
    uri = uri or default_uri(out)
    try:
        store = Store(uri, experiment, out)
        if (out / "ledger.sqlite").is_file():
            return push_sweep(store, store.sweep_parent(out), out)
        return push_probe(store, out, None)
    except Exception as e:
        if isinstance(e, UserError):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"--track-uri {uri}: {first}") from None


def push_missing(tracker: MlflowTracker) -> None:
    """What the events of a finished command did not carry, from its folder: a sweep's runs finished by an
    earlier command (or while the tracker was down), its report and figures; a probe's record."""
    store = tracker.connect()
    if tracker.kind == "sweep":
        assert tracker.parent is not None
        push_sweep(store, tracker.parent, tracker.out)
    else:
        push_probe(store, tracker.out, tracker.finished.get(str(tracker.out)))

"""--track mlflow, read back by a real outside client: a real MLflow server on loopback (started and stopped here)
and MlflowClient. A sweep is one parent run with one nested run per ledger run; re-running, a SIGKILL and
resume, --jobs 2 and a tracker that was down all end with the same MLflow content, each run logged once."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import require, write_image_folder
from transferlab.cli.main import main
from transferlab.core.hashing import stable_hash
from transferlab.sweep.ledger import Ledger
from transferlab.train.config import TrainConfig

mlflow_tracking = require("mlflow.tracking")  # CI installs it (the test extra); elsewhere a missing one skips

GRID = ["--backbones", "efficientnet_lite0", "--lr", "1e-3,3e-2", "--l2", "0,1", "--seeds", "0,1",
        "--epochs", "6", "--patience", "3", "--ft-epochs", "6", "--ft-patience", "3", "--lpft", "--ft-lr", "1e-4,1e-3",
        "--ft-layers", "3", "--device", "cpu", "--workers", "0", "--no-progress"]
EPOCH_METRICS = ("train_loss", "train_xent", "train_err", "val_xent", "val_err", "lr")
TIMED = ("train_loop_s",)  # differs between two executions of the same run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on loopback (sqlite store, proxied artifacts): its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One image folder for every sweep here, so that they share their run hashes."""
    counts = {"train": {c: 8 for c in "abc"}, "val": {c: 3 for c in "abc"}, "test": {c: 3 for c in "abc"}}
    return write_image_folder(tmp_path_factory.mktemp("track") / "data", counts)


def sweep(data, out, *extra):
    return main(["sweep", "--data", str(data), "--out", str(out), *GRID, "--track", "mlflow", *extra])


def parent_and_children(uri, experiment, out):
    client = mlflow_tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("transferlab.kind") == "sweep" and r.data.tags.get("transferlab.out") == str(out.resolve())]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def content(uri, experiment, out):
    """{run hash: what MLflow holds of its finished run} (timings left out); every hash has one finished run."""
    client, _, children = parent_and_children(uri, experiment, out)
    finished = [r for r in children if r.info.status == "FINISHED"]
    hashes = [r.data.tags["transferlab.run_hash"] for r in finished]
    assert len(hashes) == len(set(hashes)), "a run logged twice"
    return {r.data.tags["transferlab.run_hash"]: {
        "tags": {k: v for k, v in r.data.tags.items() if k.startswith("transferlab.") and k != "transferlab.folder"},
        "params": r.data.params,
        "finals": {k: v for k, v in r.data.metrics.items() if k not in EPOCH_METRICS and k not in TIMED},
        "curves": {m: [(p.step, p.value) for p in client.get_metric_history(r.info.run_id, m)] for m in EPOCH_METRICS},
    } for r in finished}


def ledger_rows(out):
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        return {r["hash"]: r for r in ledger.runs()}, stable_hash(ledger.get_meta("data_fingerprint"))
    finally:
        ledger.close()


@pytest.fixture(scope="module")
def tracked(server, data, tmp_path_factory):
    """A sweep tracked on the server (folder, experiment, its MLflow content)."""
    out = tmp_path_factory.mktemp("tracked") / "sweep"
    assert sweep(data, out, "--track-uri", server, "--track-experiment", "main") == 0
    return out, content(server, "main", out)


@pytest.mark.slow
def test_a_sweep_is_a_parent_run_with_one_nested_run_per_ledger_run(server, tracked):
    out, runs = tracked
    rows, fingerprint = ledger_rows(out)
    assert len(rows) == 10 and set(runs) == set(rows)  # 8 probes, 2 fine-tuning runs
    for h, run in runs.items():
        row = rows[h]
        assert run["tags"]["transferlab.backbone"] == "efficientnet_lite0" and run["tags"]["transferlab.method"] == row["method"]
        assert run["tags"]["transferlab.data_fingerprint"] == fingerprint and run["tags"]["transferlab.status"] == row["status"]
        # params: the whole TrainConfig by field name, plus what the run trains
        assert set(run["params"]) == {f.name for f in dataclasses.fields(TrainConfig)} | {"n_trainable_layers", "unit"}
        assert run["params"]["lr"] == str(row["config"]["lr"]) and run["params"]["n_trainable_layers"] == str(row["metrics"]["n_trainable_layers"])
        # one point per epoch, step = epoch (epoch 0 has no training numbers)
        history = row["history"]
        assert run["curves"]["val_xent"] == [(r["epoch"], pytest.approx(r["val_xent"])) for r in history]
        assert [s for s, _ in run["curves"]["train_loss"]] == [r["epoch"] for r in history[1:]]
        # the head's learning rate at each epoch's last step (after warmup and the schedule), as the ledger has it
        assert run["curves"]["lr"] == [(r["epoch"], pytest.approx(r["lr"])) for r in history[1:]]
        assert run["finals"]["final_val_xent"] == pytest.approx(row["metrics"]["val_xent"])
        assert run["finals"]["best_epoch"] == row["metrics"]["best_epoch"]
        # the test accuracy only where the test split was read: the two chosen runs
        assert run["finals"].get("test_acc") == (None if row["test_acc"] is None else pytest.approx(row["test_acc"]))
    assert sum("test_acc" in r["finals"] for r in runs.values()) == 2
    client, parent, _ = parent_and_children(server, "main", out)
    assert parent.info.status == "FINISHED" and parent.data.tags["transferlab.command"].startswith("transferlab sweep --data")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "report.html", "figures"} <= names
    assert any(a.path.endswith(".png") for a in client.list_artifacts(parent.info.run_id, "figures"))
    chosen = {v for k, v in parent.data.tags.items() if k.startswith("transferlab.chosen.")}
    assert chosen == {h for h, r in rows.items() if r["test_acc"] is not None}


@pytest.mark.slow
def test_re_running_the_same_command_logs_nothing_twice(server, data, tracked):
    out, runs = tracked
    assert sweep(data, out, "--track-uri", server, "--track-experiment", "main") == 0
    _, parent, children = parent_and_children(server, "main", out)
    assert len(children) == 10 and parent.info.status == "FINISHED"
    assert content(server, "main", out) == runs


@pytest.mark.slow
def test_two_worker_processes_log_the_same_content(server, data, tracked, tmp_path):
    out = tmp_path / "jobs2"
    assert sweep(data, out, "--jobs", "2", "--track-uri", server, "--track-experiment", "main") == 0
    assert content(server, "main", out) == tracked[1]


@pytest.mark.slow
def test_ray_tasks_log_the_same_content(server, data, tracked, tmp_path, monkeypatch):
    ray = require("ray")
    init = ray.init
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray, "init", lambda *a, **kw: init(*a, **(kw if "address" in kw else {**kw, "num_cpus": 2})))
    out = tmp_path / "ray"
    assert sweep(data, out, "--executor", "ray", "--track-uri", server, "--track-experiment", "main") == 0
    assert content(server, "main", out) == tracked[1]


def predict_with_mlflow(uri, run_id, paths):
    """What an outside client gets: ``mlflow.pyfunc.load_model(runs:/RUN/model).predict`` on image paths."""
    import mlflow
    import pandas as pd

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    return model, model.predict(pd.DataFrame({"image": [str(p) for p in paths]}))


@pytest.mark.slow
def test_the_model_export_takes_is_an_mlflow_model_that_predicts_as_the_test_evaluation(server, tracked):
    from transferlab.core.predictions import read_test_predictions, sweep_predictions_path

    out, runs = tracked
    client, parent, children = parent_and_children(server, "main", out)
    model_run = client.get_run(parent.data.tags["transferlab.model_run"])
    h = model_run.data.tags["transferlab.run_hash"]
    recorded = read_test_predictions(sweep_predictions_path(out, h))
    model, table = predict_with_mlflow(server, model_run.info.run_id, recorded["files"])
    classes = recorded["classes"]
    assert [c.name for c in model.metadata.signature.outputs.inputs] == ["label", *classes]
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["image"]
    assert table[classes].to_numpy() == pytest.approx(recorded["probs"], abs=1e-5)  # the test evaluation's own numbers
    accuracy = (table["label"].to_numpy() == [classes[i] for i in recorded["labels"]]).mean()
    assert accuracy == pytest.approx(model_run.data.metrics["test_acc"])
    assert sum(bool(client.list_artifacts(r.info.run_id, "model")) for r in children) == 1


KILL_SECOND_RUN = """
import os, signal, sys
from transferlab.cli.main import main
from transferlab.train.session import RunSession
original, calls = RunSession.run, []
def run(self, *args, on_epoch=None, **kwargs):
    calls.append(1)
    def report(record):
        on_epoch(record)
        if len(calls) == 2 and record["epoch"] == 2:  # the second fine-tuning run, two epochs in
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, on_epoch=report if on_epoch else None, **kwargs)
RunSession.run = run
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_logs_every_run_once(server, data, tracked, tmp_path):
    out = tmp_path / "killed"
    args = ["sweep", "--data", str(data), "--out", str(out), *GRID, "--track", "mlflow", "--track-uri", server, "--track-experiment", "kill"]
    proc = subprocess.run([sys.executable, "-c", KILL_SECOND_RUN, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _, _, children = parent_and_children(server, "kill", out)
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 9 + ["RUNNING"]
    killed = next(r for r in children if r.info.status == "RUNNING")
    assert len(mlflow_tracking.MlflowClient(server).get_metric_history(killed.info.run_id, "val_xent")) == 3  # epochs 0-2 arrived
    assert sweep(data, out, "--track-uri", server, "--track-experiment", "kill") == 0
    client, _, children = parent_and_children(server, "kill", out)
    assert sorted(r.info.status for r in children) == ["FAILED"] + ["FINISHED"] * 10
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert content(server, "kill", out) == tracked[1]


@pytest.mark.slow
def test_a_tracker_that_is_down_costs_one_warning_and_track_pushes_later(server, data, tracked, tmp_path, caplog):
    out = tmp_path / "down"
    with caplog.at_level(logging.WARNING):
        assert sweep(data, out, "--track-uri", f"http://127.0.0.1:{free_port()}") == 0
    said = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(said) == 1 and "the sweep goes on" in said[0] and f"transferlab track {out}" in said[0]
    assert (out / "report.html").is_file()
    assert main(["track", str(out), "--track-uri", server, "--track-experiment", "late"]) == 0
    assert content(server, "late", out) == tracked[1]
    assert main(["track", str(out), "--track-uri", server, "--track-experiment", "late"]) == 0  # nothing twice
    assert len(parent_and_children(server, "late", out)[2]) == 10


@pytest.mark.slow
def test_a_probe_is_one_run_in_the_folders_own_store(data, tmp_path, capsys):
    import json

    out = tmp_path / "probe"
    assert main(["probe", "--data", str(data), "--out", str(out), "--epochs", "4", "--device", "cpu", "--workers", "0",
                 "--no-progress", "--track", "mlflow"]) == 0
    record = json.loads((out / "run.json").read_text())
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = mlflow_tracking.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["transferlab.method"] == "probe"
    assert run.data.tags["transferlab.data_fingerprint"] == record["data_digest"]
    assert run.data.params["epochs"] == "4" and run.data.params["n_trainable_layers"] == "1"
    assert run.data.tags["transferlab.command"] == record["command"]
    assert len(client.get_metric_history(run.info.run_id, "val_xent")) == len(record["history"]) == 5
    assert run.data.metrics["test_acc"] == pytest.approx(record["test_acc"])
    assert {"run.json", "report.html", "curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert main(["track", str(out)]) == 0 and "0 run(s) pushed" in capsys.readouterr().out
    paths = sorted((data / "test").rglob("*.png"))
    _, table = predict_with_mlflow(uri, run.info.run_id, paths)
    assert (table["label"].to_numpy() == [p.parent.name for p in paths]).mean() == pytest.approx(record["test_acc"])


@pytest.mark.slow
def test_a_bad_tracking_uri_never_fails_the_probe(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["probe", "--data", str(data), "--out", str(tmp_path / "p"), "--epochs", "2", "--device", "cpu",
                     "--workers", "0", "--no-progress", "--track", "mlflow", "--track-uri", "nonsense://nowhere"]) == 0
    said = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(said) == 1 and "nonsense://nowhere" in said[0]
    assert main(["track", str(tmp_path / "p"), "--track-uri", "nonsense://nowhere"]) == 2


def test_only_track_mlflow_imports_mlflow_and_only_when_tracking_starts():
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "transferlab"
    importing = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "mlflow" for n in names):
                importing.add(str(path.relative_to(src)))
    assert importing == {"track/mlflow.py"}
    code = "import sys, transferlab.cli.main, transferlab.track, transferlab.track.mlflow; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

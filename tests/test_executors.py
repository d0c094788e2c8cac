"""Runs spread over worker processes or a local Ray instance give the same summary as in-process runs."""

import json

import pytest

from conftest import require
from transferlab.cli.main import main
from transferlab.sweep.tasks import ProbeGroupTask

GRID = ["--backbones", "efficientnet_lite0", "--lr", "1e-3,1e-2,3e-2", "--l2", "0,1e-2,1", "--seeds", "0,1",
        "--lpft", "--ft-lr", "1e-4,1e-3", "--ft-augment", "none,views:2", "--epochs", "5", "--ft-epochs", "5",
        "--device", "cpu", "--workers", "0", "--no-progress"]


def run_sweep(data, out, *extra):
    assert main(["sweep", "--data", str(data), "--out", str(out), *GRID, *extra]) == 0
    return (out / "summary.json").read_bytes()


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory):
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("exec")
    data = write_image_folder(root / "data", {s: {c: n for c in "abc"} for s, n in (("train", 8), ("val", 3), ("test", 3))})
    return data, run_sweep(data, root / "local")


@pytest.mark.slow
def test_ray_executor_matches_local(local_summary, tmp_path, monkeypatch):
    ray = require("ray")

    data, expected = local_summary
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray, "init", _with_two_cpus(ray.init))
    out = tmp_path / "r"
    assert run_sweep(data, out, "--executor", "ray") == expected
    assert not ray.is_initialized()
    assert json.loads((out / "sweep.json").read_text())["executor"]["kind"] == "ray"


@pytest.mark.slow
def test_process_executor_matches_local(local_summary, tmp_path):
    data, expected = local_summary
    assert run_sweep(data, tmp_path / "p", "--jobs", "2") == expected


def test_ray_missing_is_one_line_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "d", {"train": {"a": 4, "b": 4}})
    monkeypatch.setattr(builtins, "__import__", no_ray)
    code = main(["sweep", "--data", str(data), "--out", str(tmp_path / "o"), "--executor", "ray", "--lr", "1e-3",
                 "--l2", "0", "--seeds", "0", "--epochs", "1", "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'transferlab[ray]'" in err and len(err.strip().splitlines()) == 1


def _with_two_cpus(init):
    def wrapped(*args, **kwargs):
        if "address" not in kwargs:
            kwargs["num_cpus"] = 2
        return init(*args, **kwargs)

    return wrapped


class ProbeGroupTaskDyingOnSeed1(ProbeGroupTask):
    """A probe task whose worker process dies (like an OOM kill) for seed 1."""

    def __call__(self, on_epoch=None):
        import os

        if self.cfgs[0].seed == 1:
            os._exit(1)
        return super().__call__(on_epoch)


@pytest.mark.slow
def test_a_dead_worker_fails_its_runs_and_a_rerun_redoes_them(local_summary, tmp_path, monkeypatch):
    import transferlab.sweep.tasks as tasks
    from transferlab.sweep.ledger import Ledger

    data, expected = local_summary
    out = tmp_path / "p"
    monkeypatch.setattr(tasks, "ProbeGroupTask", ProbeGroupTaskDyingOnSeed1)
    assert main(["sweep", "--data", str(data), "--out", str(out), *GRID, "--jobs", "2"]) == 0
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    runs = ledger.runs(method="LP")
    # The dead worker breaks the pool: its runs, and any that were running beside them, end failed.
    assert {r["status"] for r in runs} <= {"done", "failed"}
    failed = [r for r in runs if r["status"] == "failed"]
    assert {r["config"]["seed"] for r in failed} >= {1} and all("BrokenProcessPool" in r["error"] for r in failed)
    assert ledger.choice("efficientnet_lite0", "LP") is None
    assert json.loads((out / "summary.json").read_text()) == []
    ledger.close()
    monkeypatch.undo()
    assert run_sweep(data, out, "--jobs", "2") == expected

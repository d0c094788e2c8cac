"""Specifications of the sweep's parts, each on its own: run identity, choosing on validation, testing once,
the folder's claim on its data, the manifest, and the ledger recorder's order of writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from transferlab.core.errors import ConfigError, UserError
from transferlab.data import DataConfig
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import BackboneRecord, SweepManifest, read_backbone, read_manifest, require_manifest, write_backbone, write_manifest
from transferlab.sweep.observers import LedgerRecorder
from transferlab.sweep.plan import PlannedRun, run_hash
from transferlab.sweep.select import choose, choose_and_test, pick_choice
from transferlab.sweep.store import claim_folder
from transferlab.train.config import TrainConfig
from transferlab.train.observer import RunEnd, RunInfo
from transferlab.train.results import EpochRecord, FitResult


def row(h: str, val_xent: float | None, val_err: float | None, status: str = "done") -> dict:
    return {"hash": h, "status": status, "metrics": None if val_xent is None else {"val_xent": val_xent, "val_err": val_err}}


def test_a_run_hash_changes_with_everything_that_changes_numbers_and_nothing_else():
    base = dict(method="LP", backbone="b", weights_digest="w", data_digest="d", data=DataConfig("x"), train=TrainConfig(),
                k=1, start=None, numerics={"device": "cpu"})
    h = run_hash(**base)
    assert len(h) == 20 and run_hash(**base) == h
    changed = [("method", "LP-FT"), ("backbone", "c"), ("weights_digest", "v"), ("data_digest", "e"),
               ("data", DataConfig("y")), ("train", TrainConfig(lr=0.5)), ("k", 2), ("start", "s"), ("numerics", {"device": "cuda"})]
    assert all(run_hash(**{**base, key: value}) != h for key, value in changed)


def test_choose_takes_the_lowest_selection_key_then_grid_order_and_skips_diverged_runs():
    rows = [row("a", 0.5, 0.2), row("b", 0.4, 0.3), row("c", 0.4, 0.1), row("d", 0.1, 0.0, "diverged"), row("e", None, None)]
    order = ["a", "b", "c", "d", "e"]
    assert choose(rows, order)["hash"] == "c"  # lowest xent 0.4, the tie broken by the lower error
    assert choose(rows, order, "val_err")["hash"] == "c"
    assert choose([row("x", 0.4, 0.1), row("y", 0.4, 0.1)], ["y", "x"])["hash"] == "y"  # a full tie: grid order
    assert choose(rows, ["a", "b"], "val_err")["hash"] == "a"  # only the runs of this grid
    assert choose([row("d", 0.1, 0.0, "diverged")], ["d"]) is None


def test_export_picks_among_the_choices_by_the_sweeps_criterion():
    choices = [{"backbone": "m", "method": "LP", "val_xent": 0.3, "val_err": 0.1},
               {"backbone": "m", "method": "LP-FT", "val_xent": 0.2, "val_err": 0.2}]
    assert pick_choice(choices, None, None, "out")["method"] == "LP-FT"
    assert pick_choice(choices, None, None, "out", "val_err")["method"] == "LP"
    assert pick_choice(choices, "m", "LP", "out")["method"] == "LP"
    with pytest.raises(UserError, match="out: no chosen run for other"):
        pick_choice(choices, "other", None, "out")
    with pytest.raises(ConfigError, match="method=PT: expected LP, FT or LP-FT"):
        pick_choice(choices, None, "PT", "out")


class FakeSession:
    """What choose_and_test uses of a RunSession, counting test evaluations."""

    def __init__(self, with_test: bool = True):
        self.inputs = SimpleNamespace(splits=SimpleNamespace(test=object() if with_test else None, classes=["a", "b"]))
        self.evaluations = 0

    def load_trained(self, k, state):
        self.loaded = (k, sorted(state))

    def evaluate_split(self, k, split):
        self.evaluations += 1
        return SimpleNamespace(accuracy=0.75, files=["x.png", "y.png"], labels=[0, 1],
                               probs=torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64))


def finished(ledger: Ledger, recorder: LedgerRecorder, h: str, val_xent: float) -> None:
    recorder.run_start(RunInfo(h, "m", "LP", TrainConfig(), 1))
    result = FitResult([EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=val_xent, val_err=0.1)],
                       0, "done", {"output.weight": torch.zeros(2, 3)})
    recorder.run_end(h, RunEnd("done", {"val_xent": val_xent, "val_err": 0.1}, result=result))


def test_the_chosen_run_is_tested_once_and_a_choice_waits_for_every_run(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    recorder = LedgerRecorder(ledger, tmp_path)
    planned = [PlannedRun("h1", TrainConfig(), 1), PlannedRun("h2", TrainConfig(), 1)]
    finished(ledger, recorder, "h1", 0.3)
    session = FakeSession()
    assert choose_and_test(ledger, session, "m", "LP", planned, "val_xent", tmp_path, recorder) is None  # h2 not run
    assert session.evaluations == 0 and ledger.choice("m", "LP") is None
    finished(ledger, recorder, "h2", 0.2)
    for _ in range(2):  # a re-run chooses again but never tests again
        assert choose_and_test(ledger, session, "m", "LP", planned, "val_xent", tmp_path, recorder) == "h2"
    assert session.evaluations == 1 and ledger.test_evaluations() == 1 and ledger.run("h2")["test_acc"] == 0.75
    assert session.loaded == (1, ["output.weight"])
    assert (tmp_path / "predictions" / "h2.json").is_file()
    ledger.close()


def test_the_recorder_saves_parameters_before_a_run_is_done_and_records_failures(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    recorder = LedgerRecorder(ledger, tmp_path)
    recorder.run_start(RunInfo("h", "m", "LP", TrainConfig(lr=0.5), 1))
    assert ledger.status("h") == "running" and TrainConfig.from_dict(ledger.run("h")["config"]) == TrainConfig(lr=0.5)
    seen = []
    real_finish = ledger.finish
    monkeypatch.setattr(ledger, "finish", lambda *a, **k: (seen.append((tmp_path / "runs" / "h.safetensors").is_file()), real_finish(*a, **k)))
    finished(ledger, recorder, "h", 0.3)
    assert seen == [True] and ledger.status("h") == "done"
    recorder.run_start(RunInfo("g", "m", "LP", TrainConfig(), 1))
    recorder.run_end("g", RunEnd("failed", {}, "RuntimeError: out of memory"))
    assert ledger.status("g") == "failed" and ledger.run("g")["error"] == "RuntimeError: out of memory"
    ledger.close()


def test_a_folder_is_claimed_for_one_data_config_and_one_set_of_images(tmp_path, tiny_folder):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    data = DataConfig(str(tiny_folder))
    splits = data.load()
    digest = claim_folder(ledger, tmp_path, data, splits, force=False)
    assert claim_folder(ledger, tmp_path, data, splits, force=False) == digest  # the same data: the same claim
    other = DataConfig(str(tiny_folder), valid_frac=0.3)
    with pytest.raises(ConfigError, match="holds the ledger of a different sweep"):
        claim_folder(ledger, tmp_path, other, other.load(), force=False)
    (tmp_path / "runs").mkdir()
    claim_folder(ledger, tmp_path, other, other.load(), force=True)
    assert not (tmp_path / "runs").exists()
    ledger.close()


def test_the_manifest_and_backbone_records_read_back_as_written(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert read_manifest(ledger) == SweepManifest()
    manifest = SweepManifest(grid={"lp": {"lr": [0.1, 0.01], "epochs": [5]}}, backbones=["m"], select="val_err",
                             data_summary={"test": {"n": 12}})
    write_manifest(ledger, manifest)
    write_backbone(ledger, "m", BackboneRecord(source="imagenet1k", source_top1=75.1, numerics={"1": {"device": "cpu"}}))
    back = read_manifest(ledger)
    assert back == manifest and back.value("lp", "epochs") == 5 and back.value("lp", "lr") is None and back.n_test == 12
    assert read_backbone(ledger, "m").numerics == {"1": {"device": "cpu"}} and read_backbone(ledger, "x") == BackboneRecord()
    ledger.close()


def test_a_ledger_with_runs_but_no_manifest_is_refused_with_what_to_do(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    require_manifest(ledger, "out")  # an empty ledger is fine
    ledger.mark_running("h", "m", "LP", {})
    with pytest.raises(UserError, match="out: its ledger was written by an earlier transferlab.*re-run its sweep command"):
        require_manifest(ledger, "out")
    ledger.close()

"""Real photos and real pretrained weights: the numbers a researcher would check first."""

import json

import transferlab
from conftest import shared_dataset
from transferlab.cli import main


def test_efficientnet_lite0_probe_on_birds10(tmp_path):
    record = transferlab.probe(str(shared_dataset("birds10")), tmp_path, "efficientnet_lite0", progress=False)
    assert record["status"] == "done"
    assert record["data"]["train"]["per_class"] == [40] * 10 and record["data"]["test"]["n"] == 100
    assert record["test_acc"] >= 0.95  # scikit-learn logistic regression on the same features: 0.98


def test_efficientnet_lite0_probe_on_hymenoptera_tests_on_val(tmp_path):
    record = transferlab.probe(str(shared_dataset("hymenoptera")), tmp_path, "efficientnet_lite0",
                               test_split="val", progress=False)
    assert record["data"]["test"]["n"] == 153 and record["data"]["val"]["source"].startswith("carved")
    assert record["test_acc"] >= 0.90  # logistic regression: 0.935


def test_demo_runs_offline_and_learns(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "probe" / "run.json").read_text())
    assert record["test_acc"] >= 0.8  # ten digit classes: chance is 0.1
    assert "outputs:" in capsys.readouterr().out

"""Real photos and real pretrained weights: the numbers a researcher would check first."""

import json

import pytest

import transferlab
from conftest import shared_dataset
from transferlab.cli.main import main


@pytest.mark.slow
def test_efficientnet_lite0_probe_on_birds10(tmp_path):
    record = transferlab.probe(str(shared_dataset("birds10")), tmp_path, "efficientnet_lite0", progress=False)
    assert record["status"] == "done"
    assert record["data"]["train"]["per_class"] == [40] * 10 and record["data"]["test"]["n"] == 100
    assert record["test_acc"] >= 0.95  # scikit-learn logistic regression on the same features: 0.98


@pytest.mark.slow
def test_efficientnet_lite0_probe_on_hymenoptera_tests_on_val(tmp_path):
    record = transferlab.probe(str(shared_dataset("hymenoptera")), tmp_path, "efficientnet_lite0",
                               test_split="val", progress=False)
    assert record["data"]["test"]["n"] == 153 and record["data"]["val"]["source"].startswith("carved")
    assert record["test_acc"] >= 0.90  # logistic regression: 0.935


@pytest.mark.slow
def test_demo_runs_offline_and_learns(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "probe" / "run.json").read_text())
    assert record["test_acc"] >= 0.8  # ten digit classes: chance is 0.1
    assert "outputs:" in capsys.readouterr().out


@pytest.mark.slow
def test_birds10_chosen_lpft_model_exported_predicts_its_recorded_test_accuracy(tmp_path, capsys):
    """Issue 12 on real photos: export a sweep's chosen LP-FT run, predict birds10's test folder with it
    (exactly the recorded test accuracy), and its ONNX file gives the same probabilities within 1e-4."""
    import csv

    import numpy as np

    from conftest import require
    from transferlab.sweep.ledger import Ledger

    ort = require("onnxruntime")
    data, out, model = shared_dataset("birds10"), tmp_path / "sweep", tmp_path / "model"
    assert main(["sweep", "--data", str(data), "--out", str(out), "--backbones", "efficientnet_lite0", "--lr", "1e-2",
                 "--l2", "1e-2", "--seeds", "0", "--epochs", "30", "--lpft", "--ft-lr", "1e-4", "--no-progress"]) == 0
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    recorded = ledger.run(ledger.choice("efficientnet_lite0", "LP-FT"))["test_acc"]
    ledger.close()
    assert main(["export", str(out), "--out", str(model), "--method", "LP-FT", "--format", "both"]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data), "--split", "test", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 100 and sum(r["predicted"] == r["label"] for r in rows) / 100 == recorded
    clf = transferlab.load_classifier(model, device="cpu")
    probs, _ = clf.predict_proba([r["path"] for r in rows])
    from transferlab.data import build_transform, load_rgb

    transform = build_transform(clf.preprocessing)
    x = np.stack([transform(load_rgb(r["path"], min_size=clf.preprocessing.resize_size)).numpy() for r in rows])
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(["probabilities"], {"image": x})[0]
    assert np.abs(onnx_probs - probs).max() <= 1e-4 and (onnx_probs.argmax(1) == probs.argmax(1)).all()


@pytest.mark.slow
def test_birds10_probe_accuracy_is_identical_with_the_default_runtime_and_eager_pytorch(tmp_path):
    from conftest import require

    require("openvino")  # the default install's runtime
    records = {runtime: transferlab.probe(str(shared_dataset("birds10")), tmp_path / runtime, "efficientnet_lite0",
                                          runtime=runtime, progress=False)
               for runtime in ("auto", "torch")}
    assert records["auto"]["runtime"]["name"] == "openvino" and records["torch"]["runtime"]["name"] == "torch"
    assert records["auto"]["test_acc"] == records["torch"]["test_acc"]

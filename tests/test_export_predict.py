"""Export a probe or a sweep's chosen run, then predict with it: same numbers as the run's test evaluation."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require, run_readme_snippet, write_image_folder
from transferlab.cli.main import main
from transferlab.core.errors import UserError

FAST = ["--device", "cpu", "--workers", "0", "--no-progress"]
COUNTS = {"train": {c: 8 for c in "abc"}, "val": {c: 3 for c in "abc"}, "test": {c: 3 for c in "abc"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "birds", COUNTS, size=32)


@pytest.fixture(scope="module")
def probe_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "lp"
    assert main(["probe", "--data", str(data), "--epochs", "4", "--lr", "1e-3", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def model_dir(probe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["export", str(probe_dir), "--out", str(out), "--format", "both"]) == 0
    return out


def _label_from_folder(path: str) -> str:
    return Path(path).parent.name


@pytest.mark.slow
def test_predict_on_the_test_folder_reproduces_the_probe_test_accuracy(probe_dir, model_dir, data, tmp_path):
    record = json.loads((probe_dir / "run.json").read_text())
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(model_dir), str(data / "test"), "--out", str(preds), "--top-k", "2", *FAST[:-1]]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 9 and list(rows[0])[:3] == ["path", "predicted", "probability"]
    assert list(rows[0])[3:] == ["class_1", "prob_1", "class_2", "prob_2"]
    correct = sum(r["predicted"] == _label_from_folder(r["path"]) for r in rows)
    assert correct / len(rows) == record["test_acc"]
    # The probabilities are those of the probe's own test evaluation (stored per image).
    stored = json.loads((probe_dir / "test_predictions.json").read_text())
    by_file = dict(zip(stored["files"], stored["probs"]))
    for r in rows:
        p = by_file[r["path"]]
        assert float(r["probability"]) == pytest.approx(max(p), abs=1e-6)
        assert r["predicted"] == stored["classes"][int(np.argmax(p))]


def test_load_classifier_from_model_dir_run_dir_and_pil_images_agree(probe_dir, model_dir, data):
    import transferlab

    files = sorted(str(p) for p in (data / "test").rglob("*.png"))[::3]
    a = transferlab.load_classifier(model_dir, device="cpu")
    b = transferlab.load_classifier(probe_dir, device="cpu")
    assert a.classes == b.classes == ("a", "b", "c")
    pa, _ = a.predict_proba(files)
    pb, _ = b.predict_proba(files)
    pil, _ = a.predict_proba([Image.open(f) for f in files])
    np.testing.assert_allclose(pa, pb, atol=1e-6)
    np.testing.assert_allclose(pa, pil, atol=1e-6)
    rows = a.predict(files[:2], top_k=5)
    assert [len(r.top_k) for r in rows] == [3, 3]  # top-k is capped at the number of classes
    assert rows[0].probability == rows[0].top_k[0][1] and rows[0].predicted == rows[0].top_k[0][0]
    assert sum(p for _, p in rows[0].top_k) == pytest.approx(1.0, abs=1e-6)


def test_predict_on_cpu_decodes_in_turns_in_this_process_with_the_loader_numbers(model_dir, data, monkeypatch, tmp_path):
    """By default on CPU no worker process starts (they would fight the model's threads for the cores):
    helper threads take turns with the model, and the probabilities are bit-identical to the DataLoader's."""
    import transferlab

    monkeypatch.setattr("transferlab.data.loader.decode_threads", lambda: 2)  # helpers on a 1-core runner too
    files = sorted(str(p) for p in (data / "test").rglob("*.png"))
    clf = transferlab.load_classifier(model_dir, device="cpu")
    assert clf.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # as training runs it
    loader_probs, loader_kept = clf.predict_proba(files, batch_size=4, num_workers=0)

    def no_loader(*args, **kwargs):
        raise AssertionError("predict built a DataLoader")

    monkeypatch.setattr(torch.utils.data, "DataLoader", no_loader)
    probs, kept = clf.predict_proba(files, batch_size=4)
    assert kept == loader_kept == list(range(len(files)))
    assert np.array_equal(probs, loader_probs)
    pil_probs, _ = clf.predict_proba([Image.open(f) for f in files], batch_size=4)  # decoded by this thread alone
    assert np.array_equal(pil_probs, loader_probs)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    probs, kept = clf.predict_proba(files[:2] + [str(broken)] + files[2:], batch_size=4, on_bad_image="skip")
    assert kept == [0, 1] + list(range(3, len(files) + 1)) and np.array_equal(probs, loader_probs)
    with pytest.raises(UserError, match=f"1 image\\(s\\) cannot be decoded: {re.escape(str(broken))} \\("):
        clf.predict_proba([str(broken)] + files)


def test_config_records_classes_preprocessing_and_provenance(probe_dir, model_dir):
    record = json.loads((probe_dir / "run.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architecture"] == "tf_efficientnet_lite0" and cfg["zoo"] == "timm"
    assert cfg["classes"] == ["a", "b", "c"] and cfg["num_classes"] == 3
    assert cfg["preprocessing"]["input_size"] == 224 and cfg["preprocessing"]["resize_size"] == 256
    prov = cfg["provenance"]
    assert prov["backbone_weights_digest"] == record["backbone"]["weights_digest"]
    assert prov["metrics"]["test_acc"] == record["test_acc"] and prov["metrics"]["val_xent"] == record["val_xent"]
    assert prov["transferlab_version"] and prov["run_hash"] and prov["data"]["fingerprint"]
    assert set(cfg["files"]) == {"safetensors", "onnx"}


def test_onnx_gives_the_pytorch_probabilities_with_a_dynamic_batch(model_dir, data):
    ort = require("onnxruntime")
    import transferlab

    clf = transferlab.load_classifier(model_dir, device="cpu")
    files = sorted(str(p) for p in (data / "test").rglob("*.png"))
    from transferlab.data import build_transform, load_rgb

    transform = build_transform(clf.preprocessing)
    x = torch.stack([transform(load_rgb(f, min_size=clf.preprocessing.resize_size)) for f in files]).numpy()
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    torch_probs, _ = clf.predict_proba(files)
    for batch in (x[:1], x):  # batch 1 and batch 9 from one file
        logits, probs = session.run(["logits", "probabilities"], {"image": batch})
        assert probs.shape == (len(batch), 3) and logits.shape == (len(batch), 3)
        assert np.abs(probs - torch_probs[: len(batch)]).max() < 1e-4
        assert (probs.argmax(1) == torch_probs[: len(batch)].argmax(1)).all()


def test_the_readme_snippet_loads_the_model_without_transferlab(model_dir, data):
    import transferlab

    image = sorted((data / "test" / "b").glob("*.png"))[0]
    name, prob = run_readme_snippet(model_dir, image)
    row = transferlab.load_classifier(model_dir, device="cpu").predict([image])[0]
    assert name == row.predicted and prob == pytest.approx(row.probability, abs=1e-5)


def test_trained_tensors_must_fit_the_model_exactly(probe_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from transferlab.deploy.trained import load_trained_tensors

    net = torch.nn.Sequential()
    net.add_module("classifier", torch.nn.Linear(4, 3))
    good = {"classifier.weight": torch.ones(3, 4), "classifier.bias": torch.zeros(3)}
    load_trained_tensors(net, good, "run", "classifier")
    assert torch.equal(net.classifier.weight, torch.ones(3, 4))
    with pytest.raises(UserError, match=r"run: trained tensor classifier.weight has shape \(2, 4\), the model needs \(3, 4\)"):
        load_trained_tensors(net, {**good, "classifier.weight": torch.ones(2, 4)}, "run", "classifier")
    with pytest.raises(UserError, match="trained tensor blocks.9.weight is not a tensor of the model"):
        load_trained_tensors(net, {**good, "blocks.9.weight": torch.ones(1)}, "run", "classifier")
    with pytest.raises(UserError, match="the trained tensors lack classifier.bias, classifier.weight"):
        load_trained_tensors(net, {}, "run", "classifier")
    # Through the CLI: a head with the wrong number of classes is one line, exit 2.
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(probe_dir / "run.json", bad / "run.json")
    head = load_file(str(probe_dir / "head.safetensors"))
    save_file({"classifier.weight": head["classifier.weight"][:2].contiguous(), "classifier.bias": head["classifier.bias"][:2].contiguous()},
              str(bad / "head.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "transferlab", "export", str(bad), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert re.search(r"head.safetensors: trained tensor classifier.(weight|bias) has shape \(2,( 1280)?\), the model needs \(3,( 1280)?\)",
                     proc.stderr)


def test_predict_lists_undecodable_files_and_exits_2_unless_skipped(model_dir, data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(data / "test" / "a", folder / "a")
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "a" / "empty.png").write_bytes(b"")
    (folder / "a" / ".hidden.png").write_bytes(b"")  # hidden: ignored, like training
    (folder / "a" / "notes.txt").write_text("ignored")
    assert main(["predict", "--model", str(model_dir), str(folder), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 image(s) cannot be decoded" in err
    assert "broken.jpg" in err and "empty.png (empty file)" in err
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(model_dir), str(folder), "--on-bad-image", "skip", "--out", str(out), *FAST]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["top_k"]) == 3 for r in rows)
    assert "skipped 2 undecodable image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["nowhere.jpg"], "nowhere.jpg: no such file or folder"),
    (["--top-k", "0", "IMG"], "--top-k 0: must be at least 1"),
    (["IMG", "--out", "preds.txt"], "--out preds.txt: expected a .csv or .jsonl file name"),
])
def test_predict_errors_are_one_line_exit_2(model_dir, data, args, needle, capsys):
    image = str(sorted((data / "test" / "a").glob("*.png"))[0])
    args = [image if a == "IMG" else a for a in args]
    assert main(["predict", "--model", str(model_dir), *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_export_and_predict_a_sweeps_chosen_run(data, probe_dir, tmp_path, capsys):
    import transferlab
    from transferlab.sweep.ledger import Ledger

    out = tmp_path / "sweep"
    # Same data, backbone and cut as the probe: its feature cache serves the sweep (no second extraction).
    assert main(["sweep", "--data", str(data), "--out", str(out), "--backbones", "efficientnet_lite0", "--lr", "1e-3,1e-2",
                 "--l2", "0", "--seeds", "0", "--epochs", "2", "--cache-dir", str(probe_dir / "cache"), *FAST]) == 0
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    chosen = ledger.run(ledger.choice("efficientnet_lite0", "LP"))
    ledger.close()
    model = tmp_path / "m"
    assert main(["export", str(out), "--out", str(model)]) == 0  # default: the chosen run with the lowest val xent
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["provenance"]["run_hash"] == chosen["hash"] and cfg["provenance"]["method"] == "LP"
    assert cfg["provenance"]["backbone_weights_verified"] is True
    assert cfg["provenance"]["metrics"]["test_acc"] == chosen["test_acc"]
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data), "--split", "test", *FAST]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert len(rows) == 9 and sum(r["predicted"] == r["label"] for r in rows) / 9 == chosen["test_acc"]
    assert f"accuracy {chosen['test_acc']:.4f}" in captured.err
    assert main(["export", str(out), "--out", str(model), "--method", "LP-FT"]) == 2
    assert "no chosen run for LP-FT (chosen runs: efficientnet_lite0/LP)" in capsys.readouterr().err
    # The sweep stored the per-image predictions of its one test evaluation: they give its test accuracy,
    # and the exported model predicts the same probabilities on the same files.
    from transferlab.core.predictions import read_test_predictions, sweep_predictions_path

    stored = read_test_predictions(sweep_predictions_path(out, chosen["hash"]))
    assert (stored["probs"].argmax(1) == stored["labels"]).mean() == chosen["test_acc"]
    clf = transferlab.load_classifier(model, device="cpu")
    probs, _ = clf.predict_proba(stored["files"])
    assert abs(probs - stored["probs"]).max() < 1e-4
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Per-class insight (test)" in page and "efficientnet_lite0 LP (test)" in page
    assert (out / "insight" / "efficientnet_lite0_LP" / "confusion_matrix.csv").is_file()

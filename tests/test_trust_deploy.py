"""Issue 19, items 6, 7, 8 and 10 (part): a folder shows one run, predict is the training path, a model
folder is enough on its own and says exactly how to feed it, a failed command leaves nothing half-made."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_readme_snippet, write_image_folder, write_tiny_hf_vit
from transferlab.cli.main import main

FAST = ["--device", "cpu", "--workers", "0", "--no-progress"]
COUNTS = {"train": {c: 8 for c in "abc"}, "val": {c: 3 for c in "abc"}, "test": {c: 3 for c in "abc"}}
# Split settings other than the defaults: the run's test split is the val/ folder, its validation set is
# carved from at most 5 train images per class drawn with seed 3.
SPLIT_FLAGS = ["--test-split", "val", "--max-per-class", "5", "--split-seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "birds", COUNTS, size=32)


@pytest.fixture(scope="module")
def probe_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "lp"
    assert main(["probe", "--data", str(data), "--epochs", "4", "--lr", "1e-2", "--out", str(out), *SPLIT_FLAGS, *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def model_dir(probe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["export", str(probe_dir), "--out", str(out)]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("transferlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 6. a reused probe folder shows the last run only ------------------------------------------------
def test_a_probe_without_test_split_into_a_used_folder_leaves_no_earlier_test_outputs(probe_dir, data, tmp_path):
    out = tmp_path / "reused"
    shutil.copytree(probe_dir, out, ignore=shutil.ignore_patterns("cache"))
    for name in ("test_predictions.json", "insight.html", "insight"):
        assert (out / name).exists()  # the first run had a test split
    assert main(["probe", "--data", str(data), "--epochs", "2", "--out", str(out), "--test-split", "none",
                 "--cache-dir", str(probe_dir / "cache"), *FAST]) == 0
    for name in ("test_predictions.json", "insight.html", "insight"):
        assert not (out / name).exists(), name
    record = json.loads((out / "run.json").read_text())
    assert record["test_acc"] is None and "test" not in record["data"]
    assert {p.name for p in out.iterdir()} == {"run.json", "head.safetensors", "curves.png", "report.html"}


# -- 7. predict is the training path ---------------------------------------------------------------
def _exif_rotated_jpeg(path: Path) -> Path:
    """1200 x 900 stored, EXIF orientation 6 (shown 900 x 1200): large enough to be decoded at 1/2 scale."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(900, 1200, 3)).astype(np.uint8)
    arr[:, :600, 0] = 255  # left half red: upright or not changes what the centre crop sees
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=90)
    return path


def _sixteen_bit_png(path: Path) -> Path:
    """A 16-bit grey PNG using the whole range (its 8-bit view is v * 255 / 65535)."""
    ramp = np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return path


def test_a_pil_image_opened_from_a_path_predicts_as_the_path(model_dir, tmp_path):
    import transferlab

    files = [str(_exif_rotated_jpeg(tmp_path / "portrait.jpg")), str(_sixteen_bit_png(tmp_path / "deep.png"))]
    clf = transferlab.load_classifier(model_dir, device="cpu")
    by_path, _ = clf.predict_proba(files)
    by_pil, _ = clf.predict_proba([Image.open(f) for f in files])
    # The path is the training path (load_rgb): the PIL image must go through the same steps.
    assert np.abs(by_pil - by_path).max() < 1e-6, np.abs(by_pil - by_path).max(axis=1)


def test_predict_never_changes_the_callers_images(model_dir, tmp_path):
    import transferlab

    path = str(_exif_rotated_jpeg(tmp_path / "portrait.jpg"))
    clf = transferlab.load_classifier(model_dir, device="cpu")
    by_path, _ = clf.predict_proba([path])
    lazy, loaded = Image.open(path), Image.open(path)
    loaded.load()
    size, lazy_tile = lazy.size, list(lazy.tile)
    by_lazy, _ = clf.predict_proba([lazy])
    clf.predict_proba([loaded])
    assert lazy.size == size and lazy.tile == lazy_tile  # not drafted nor decoded behind the caller's back
    assert loaded.size == size and loaded.mode == "RGB"
    assert np.abs(by_lazy - by_path).max() < 1e-6


def test_predict_workers_and_batch_size_are_checked_like_every_flag(model_dir, data, capsys):
    image = str(next((data / "test" / "a").iterdir()))
    for flag, value in (("--workers", "-1"), ("--batch-size", "0")):
        assert main(["predict", "--model", str(model_dir), image, flag, value, "--device", "cpu", "--no-progress"]) == 2
        assert one_error_line(capsys).startswith(f"transferlab: error: {flag} {value}: must be")


def test_predict_data_on_a_labels_csv_with_missing_files_follows_on_bad_image(data, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    rows = [(str(f), f.parent.name, split) for split in ("train", "test") for f in sorted((data / split).rglob("*.png"))]
    rows += [(str(tmp_path / "gone1.png"), "a", "test"), (str(tmp_path / "gone2.png"), "b", "train")]
    labels.write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    out = tmp_path / "run"
    assert main(["probe", "--data", str(labels), "--epochs", "2", "--out", str(out), "--on-bad-image", "skip", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--data", str(labels), "--out", str(tmp_path / "p.csv"), *FAST]) == 2
    assert "2 listed file(s)" in one_error_line(capsys)
    assert main(["predict", "--model", str(out), "--data", str(labels), "--on-bad-image", "skip",
                 "--out", str(tmp_path / "p.csv"), *FAST]) == 0
    assert f"accuracy {record['test_acc']:.4f}" in capsys.readouterr().err


def _predict_data(model, data, split, capsys, tmp_path):
    out = tmp_path / f"{split}.csv"
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data), "--split", split, "--out", str(out), *FAST]) == 0
    return list(csv.DictReader(out.open())), capsys.readouterr().err


@pytest.mark.parametrize("which", ["model_dir", "probe_dir"])
def test_predict_data_rebuilds_the_runs_own_splits(which, request, probe_dir, data, capsys, tmp_path):
    model = request.getfixturevalue(which)
    record = json.loads((probe_dir / "run.json").read_text())
    stored = json.loads((probe_dir / "test_predictions.json").read_text())
    rows, err = _predict_data(model, data, "test", capsys, tmp_path)
    # The run's test split was the val/ folder (--test-split val): 3 images of each of 3 classes.
    assert [r["path"] for r in rows] == stored["files"]
    assert all(Path(r["path"]).parts[-3] == "val" for r in rows) and len(rows) == 9
    correct = sum(r["predicted"] == r["label"] for r in rows)
    assert correct / len(rows) == record["test_acc"]
    assert f"accuracy {record['test_acc']:.4f}" in err
    # Its validation set: carved from train/, round(5 * 0.2) = 1 image of each class's 5 drawn with seed 3.
    rows, _ = _predict_data(model, data, "val", capsys, tmp_path)
    assert len(rows) == 3 and all(Path(r["path"]).parts[-3] == "train" for r in rows)
    assert record["data"]["val"]["n"] == 3 and record["data"]["train"]["n"] == 12
    rows, _ = _predict_data(model, data, "train", capsys, tmp_path)
    assert len(rows) == 12 and not {r["path"] for r in rows} & set(stored["files"])


def test_predict_data_refuses_a_model_without_split_settings(model_dir, data, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["provenance"]["data"]["config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    assert main(["predict", "--model", str(bare), "--data", str(data), *FAST]) == 2
    line = one_error_line(capsys)
    assert f"--model {bare}: its record lacks the run's split settings" in line and "val_split" in line


# -- 8. a model folder is enough on its own and says how to feed it ----------------------------------
@pytest.fixture
def hf_folder(tmp_path):
    """A tiny HF ViT (squash preprocessing), as in test_zoos."""
    return write_tiny_hf_vit(tmp_path / "hf_vit")


def test_an_hf_export_predicts_after_the_original_model_folder_is_gone(hf_folder, data, tmp_path):
    import transferlab

    run, model = tmp_path / "run", tmp_path / "model"
    assert main(["probe", "--data", str(data), "--backbone", f"hf:{hf_folder}", "--epochs", "3", "--lr", "1e-2",
                 "--out", str(run), *FAST]) == 0
    assert main(["export", str(run), "--out", str(model)]) == 0
    files = sorted(str(p) for p in (data / "test").rglob("*.png"))
    before, _ = transferlab.load_classifier(run, device="cpu").predict_proba(files)
    shutil.rmtree(hf_folder)
    shutil.rmtree(run)
    after, _ = transferlab.load_classifier(model, device="cpu").predict_proba(files)
    assert np.abs(after - before).max() < 1e-6
    cfg = json.loads((model / "config.json").read_text())
    pre = cfg["preprocessing"]
    # ViT's processor squashes to 32 x 32: that is what config.json tells a client, and nothing of a crop.
    assert pre["resize_mode"] == "squash" and pre["squash"] is True and pre["resize_size"] == pre["input_size"] == 32
    assert any("resize to 32x32" in step for step in pre["steps"]) and not any("center crop" in step for step in pre["steps"])


def test_config_json_spells_out_every_preprocessing_step(model_dir):
    pre = json.loads((model_dir / "config.json").read_text())["preprocessing"]
    assert pre["resize_mode"] == "short_side_then_center_crop" and pre["jpeg_draft"] == [256, 256]
    text = " ".join(pre["steps"])
    for needle in ("img.draft('RGB', (256, 256))", "img.reduce(min(width, height) // 512)", "v / 65535 * 255 + 0.5",
                   "exif_transpose", "alpha dropped", "Image.Resampling.BICUBIC", "short side is 256",
                   "center crop 224x224", "antialiased", "(x - mean) / std"):
        assert needle in text, needle
    assert set(pre["client_differences"]) == {"opencv_bicubic", "no_draft"}


@pytest.mark.parametrize("squash", [False, True])
def test_the_readme_snippet_follows_config_json(model_dir, tmp_path, squash):
    """The README's lines without transferlab give predict's numbers on a large EXIF-rotated JPEG (reduced-scale
    decoding) and a 16-bit PNG, for both resize modes config.json can name."""
    import transferlab

    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    if squash:  # the same network fed as a squash model (HF ViT style): predict follows config.json too
        cfg = json.loads((model / "config.json").read_text())
        cfg["preprocessing"].update(squash=True, resize_mode="squash", resize_size=224, jpeg_draft=[224, 224])
        (model / "config.json").write_text(json.dumps(cfg))
    clf = transferlab.load_classifier(model, device="cpu")
    assert clf.preprocessing.squash is squash
    for image in (_exif_rotated_jpeg(tmp_path / "portrait.jpg"), _sixteen_bit_png(tmp_path / "deep.png")):
        row = clf.predict([image])[0]
        name, prob = run_readme_snippet(model, image)
        assert name == row.predicted and prob == pytest.approx(row.probability, abs=1e-5), image.name


# -- 10. failures leave nothing half-made ------------------------------------------------------------
def test_export_both_without_the_onnx_extra_exits_2_and_writes_no_model_folder(probe_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    out = tmp_path / "models" / "m"
    assert main(["export", str(probe_dir), "--out", str(out), "--format", "both"]) == 2
    assert "--format onnx needs the onnx extra" in one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "models").exists()


def test_a_failed_export_keeps_the_earlier_model_folder_and_a_new_one_drops_stale_files(probe_dir, model_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    from transferlab.deploy import export

    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    (out / "notes.txt").write_text("mine")
    config = (out / "config.json").read_bytes()
    weights = (out / "model.safetensors").read_bytes()
    # A run with other trained tensors: the same network with its head zeroed.
    other = tmp_path / "other"
    shutil.copytree(probe_dir, other, ignore=shutil.ignore_patterns("cache"))
    from safetensors.torch import load_file, save_file

    head = load_file(str(other / "head.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in head.items()}, str(other / "head.safetensors"))

    def broken(module, example_shape, path, **options):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(export, "require_onnx", lambda: None, raising=False)
    monkeypatch.setattr(export, "export_onnx", broken)
    assert main(["export", str(other), "--out", str(out), "--format", "both"]) == 2
    capsys.readouterr()
    assert (out / "config.json").read_bytes() == config and (out / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]  # no staging left
    # An export's files replace all of an earlier export's: no model.onnx of another network stays beside them.
    (out / "model.onnx").write_bytes(b"an earlier export's network")
    earlier = json.loads(config)
    earlier["files"]["onnx"] = "model.onnx"  # as a --format both export lists it
    (out / "config.json").write_text(json.dumps(earlier))
    monkeypatch.undo()
    assert main(["export", str(other), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").read_bytes() != weights


def test_an_export_into_a_folder_that_holds_no_export_keeps_every_file_of_the_user(probe_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "notes.txt").write_text("precious")
    (out / "model.onnx").write_text("the user's own file")
    assert main(["export", str(probe_dir), "--out", str(out)]) == 0
    assert (out / "hf" / "notes.txt").read_text() == "precious" and (out / "model.onnx").read_text() == "the user's own file"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["probe", "sweep"])
def test_a_failed_command_leaves_no_output_folder_it_created(command, tmp_path, capsys):
    missing = tmp_path / "missing_folder"
    new_out = tmp_path / "new" / "out"
    assert main([command, "--data", str(missing), "--out", str(new_out), *FAST]) == 2
    assert "no such folder" in one_error_line(capsys)
    assert not new_out.exists() and not new_out.parent.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main([command, "--data", str(missing), "--out", str(existing), *FAST]) == 2
    assert existing.is_dir()  # not this command's to remove

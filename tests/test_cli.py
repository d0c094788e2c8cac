import json
import subprocess
import sys

import pytest

from transferlab.cli.main import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "transferlab", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_probe_writes_record_parameters_and_curves(tiny_folder, tmp_path):
    out = tmp_path / "run"
    code = main(["probe", "--data", str(tiny_folder), "--backbone", "efficientnet_lite0", "--epochs", "5",
                 "--lr", "1e-2", "--device", "cpu", "--workers", "0", "--no-progress", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["trainable_params"] == 1280 * 3 + 3
    assert record["trainable_layers"] == ["classifier"]
    assert [h["epoch"] for h in record["history"]][:2] == [0, 1]
    assert 0 <= record["best_epoch"] <= 5 and record["test_acc"] is not None
    assert record["config"]["train"]["lr"] == 1e-2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    head = load_file(str(out / "head.safetensors"))
    assert set(head) == {"classifier.weight", "classifier.bias"} and tuple(head["classifier.weight"].shape) == (3, 1280)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lr", "-1"], "--lr -1.0: must be a positive number"),
        (["--l2", "-0.5"], "--l2 -0.5: must be zero or positive"),
        (["--patience", "0"], "--patience 0: must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--backbone", "resnet100"], "--backbone resnet100: unknown backbone"),
        (["--n-trainable-layers", "999"], "--n-trainable-layers 999: must be between 1 and"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tiny_folder, tmp_path, flags, needle, capsys):
    code = main(["probe", "--data", str(tiny_folder), "--out", str(tmp_path / "o"), "--no-progress", "--workers", "0", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_missing_weights_exit_2_names_the_file(tiny_folder, tmp_path):
    code, out, err = run_cli("probe", "--data", str(tiny_folder), "--backbone", "mobilenet_wd4",
                             "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "o"))
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("transferlab: error:") and "mobilenet_wd4-2249-1ad5e8fe.pth" in last
    assert "Traceback" not in err


def test_backbones_json_lists_the_catalogue():
    code, out, err = run_cli("backbones", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["resnet10"]["source_top1"] == 67.57 and rows["resnet10_cub"]["source"] == "cub"
    assert rows["efficientnet_lite0"]["weights"] == "present" and rows["efficientnet_lite2"]["input_size"] == 260
    assert rows["resnet10"]["params"] == 5418792

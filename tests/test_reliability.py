"""Bad input, divergence, unwritable output, determinism, and real kills of a running sweep."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from transferlab.cli.main import main
from transferlab.data import load_rgb

FAST = ["--epochs", "3", "--device", "cpu", "--workers", "0", "--no-progress"]


def probe(data, out, *extra):
    return main(["probe", "--data", str(data), "--out", str(out), *FAST, *extra])


def one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if line.startswith("transferlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def two_class(tmp_path):
    return write_image_folder(tmp_path / "data", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}})


def test_missing_train_folder(tmp_path, capsys):
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    line = one_line_error(capsys, probe(tmp_path / "data", tmp_path / "o"))
    assert "missing" in line and str(tmp_path / "data" / "train") in line


def test_empty_class_folder_is_named(two_class, tmp_path, capsys):
    (two_class / "train" / "c").mkdir()
    line = one_line_error(capsys, probe(two_class, tmp_path / "o"))
    assert str(two_class / "train" / "c") in line


@pytest.mark.parametrize("where", ["val", "train"])
def test_class_only_in_one_split(two_class, tmp_path, capsys, where):
    write_image_folder(two_class, {where: {"zebra": 2}}, seed=5)
    line = one_line_error(capsys, probe(two_class, tmp_path / "o"))
    assert "zebra" in line and "differ" in line


def test_too_few_images_to_carve_validation(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {"train": {"a": 5, "b": 1}})
    line = one_line_error(capsys, probe(root, tmp_path / "o"))
    assert str(root / "train" / "b") in line and "at least 2" in line


def _break_images(root: Path) -> list[Path]:
    zero = root / "train" / "a" / "zero.jpg"
    zero.write_bytes(b"")
    good = (root / "train" / "a" / "img_000.png").read_bytes()
    truncated = root / "train" / "b" / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    corrupt = root / "val" / "a" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    return [zero, truncated, corrupt]


@pytest.mark.parametrize("no_cache", [False, True])
def test_bad_images_are_all_listed_at_once_or_skipped(two_class, tmp_path, capsys, no_cache):
    bad = _break_images(two_class)
    extra = ["--no-cache"] if no_cache else []
    line = one_line_error(capsys, probe(two_class, tmp_path / "o", *extra))
    assert "--on-bad-image skip" in line
    # train/ and val/ are read before any training: both splits' bad files are named before work starts
    assert str(bad[0]) in line and str(bad[1]) in line
    assert probe(two_class, tmp_path / "o2", "--on-bad-image", "skip", *extra) == 0
    record = json.loads((tmp_path / "o2" / "run.json").read_text())
    skipped = sorted(f for files in record["skipped_files"].values() for f in files)
    assert skipped == sorted(map(str, bad))
    assert record["status"] == "done"


def test_awkward_but_valid_files_all_work(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    a, b = root / "train" / "a", root / "train" / "b"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))
    rgb.convert("L").save(a / "grey.png")
    rgb.convert("RGBA").save(a / "rgba.png")
    rgb.convert("CMYK").save(a / "cmyk.jpg")
    rgb.convert("P").save(b / "palette.bmp")
    Image.fromarray(np.linspace(0, 65535, 3000).astype(np.uint16).reshape(50, 60)).save(b / "sixteen.png")
    rgb.resize((8, 8)).save(b / "tiny.webp")
    rgb.save(b / "ünï cødé with spaces.JPG")
    Image.new("RGB", (8000, 6000), (10, 200, 30)).save(a / "huge.jpg", quality=50)
    (a / "notes.txt").write_text("not an image")
    (a / ".DS_Store").write_bytes(b"\0")
    os.symlink(b / "tiny.webp", a / "linked.webp")
    elsewhere = write_image_folder(tmp_path / "other", {"x": {"c": 2}})
    os.symlink(elsewhere / "x" / "c", a / "linked_folder")
    Image.new("RGB", (6000, 4000), (200, 10, 30)).save(b / "huge.png")
    huge = load_rgb(str(a / "huge.jpg"), min_size=256)
    assert max(huge.size) <= 2000  # decoded at reduced scale (JPEG draft), never 8000x6000
    assert max(load_rgb(str(b / "huge.png"), min_size=256).size) <= 1000  # box-reduced right after decoding
    assert probe(root, tmp_path / "o") == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["data"]["train"]["per_class"] == [3 + 4 + 1 + 2, 3 + 5]
    assert record["data"]["ignored_files"] == 2


def test_unwritable_output_fails_before_any_work(two_class, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_line_error(capsys, probe(two_class, blocker / "out"))
    assert "--out" in line and str(blocker / "out") in line


def test_ft_layers_larger_than_the_model(two_class, tmp_path, capsys):
    code = main(["sweep", "--data", str(two_class), "--out", str(tmp_path / "o"), "--lpft", "--ft-layers", "500",
                 "--lr", "1e-3", "--l2", "0", "--seeds", "0", *FAST])
    line = one_line_error(capsys, code)
    assert "--ft-layers 500" in line and "layers" in line


def test_a_learning_rate_that_blows_up_is_diverged_not_fatal(two_class, tmp_path):
    out = tmp_path / "o"
    assert main(["sweep", "--data", str(two_class), "--out", str(out), "--lr", "1e-3,100", "--l2", "0",
                 "--seeds", "0", "--epochs", "5", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    con = sqlite3.connect(out / "ledger.sqlite")
    status = {json.loads(c)["lr"]: s for c, s in con.execute("SELECT config, status FROM runs")}
    assert status == {1e-3: "done", 100.0: "diverged"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["lr"] == 1e-3


@pytest.mark.slow
def test_same_command_twice_gives_identical_numbers(two_class, tmp_path):
    args = ["--lr", "1e-3,1e-2", "--l2", "0,1", "--seeds", "0,1", "--lpft", "--ft-lr", "1e-3",
            "--epochs", "4", "--ft-epochs", "4", "--device", "cpu", "--no-progress"]  # default workers: seeded decoding in parallel
    for name in ("a", "b"):
        assert main(["sweep", "--data", str(two_class), "--out", str(tmp_path / name), *args]) == 0
    assert (tmp_path / "a" / "summary.json").read_bytes() == (tmp_path / "b" / "summary.json").read_bytes()
    for name in ("a", "b"):
        assert probe(two_class, tmp_path / f"p{name}", "--seed", "4") == 0
    history = [json.loads((tmp_path / f"p{n}" / "run.json").read_text())["history"] for n in ("a", "b")]
    assert history[0] == history[1]


# -- real kills ------------------------------------------------------------------------------------
KILL_GRID = ["--lr", "1e-3,1e-2", "--l2", "0,1", "--seeds", "0,1", "--lpft", "--ft-lr", "1e-4,1e-3",
             "--epochs", "25", "--patience", "25", "--ft-epochs", "25", "--ft-patience", "25", "--device", "cpu", "--workers", "0", "--no-progress"]


def _ledger_rows(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT method, status FROM runs").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # locked or schema not written yet
        return []


def _run_until(data: Path, out: Path, condition, timeout: float = 300) -> bool:
    """Start a sweep process and SIGKILL it once `condition(rows)` holds; False if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "sweep", "--data", str(data), "--out", str(out), *KILL_GRID],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition(_ledger_rows(out / "ledger.sqlite")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait()
    return False


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_gives_the_same_summary(two_class, tmp_path):
    full = tmp_path / "full"
    assert main(["sweep", "--data", str(two_class), "--out", str(full), *KILL_GRID]) == 0
    out = tmp_path / "killed"
    kill_points = [
        lambda rows: any(s == "running" for m, s in rows),  # inside the first probe group
        lambda rows: sum(s == "done" for m, s in rows if m == "LP") >= 4,  # after a group, before or inside the next
        lambda rows: any(m == "LP-FT" and s == "running" for m, s in rows),  # during fine-tuning
    ]
    killed = 0
    for condition in kill_points:
        killed += _run_until(two_class, out, condition)
        con = sqlite3.connect(out / "ledger.sqlite")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    assert killed >= 2  # on a very fast machine a late point may come after the run has finished
    # Every run the ledger calls done has a complete parameter file (written by atomic rename first).
    from safetensors.torch import load_file

    con = sqlite3.connect(out / "ledger.sqlite")
    for (run_hash,) in con.execute("SELECT hash FROM runs WHERE status IN ('done', 'diverged')"):
        assert load_file(str(out / "runs" / f"{run_hash}.safetensors"))
    con.close()
    assert main(["sweep", "--data", str(two_class), "--out", str(out), *KILL_GRID]) == 0
    assert (out / "summary.json").read_bytes() == (full / "summary.json").read_bytes()


def test_disk_full_during_a_run_is_one_line_and_exit_2(two_class, tmp_path, capsys, monkeypatch):
    import errno

    import transferlab.train.probe_run as study

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "run.json"))

    monkeypatch.setattr(study, "run_record", full)
    line = one_line_error(capsys, probe(two_class, tmp_path / "o"))
    assert "No space left on device" in line and "run.json" in line


@pytest.mark.slow
def test_sigint_exits_130_with_one_line_and_resumes(two_class, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "sweep", "--data", str(two_class), "--out", str(out), *KILL_GRID],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(s == "done" for _, s in _ledger_rows(out / "ledger.sqlite")):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before it could be interrupted")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert main(["sweep", "--data", str(two_class), "--out", str(out), *KILL_GRID]) == 0
    statuses = {s for _, s in _ledger_rows(out / "ledger.sqlite")}
    assert statuses == {"done"}

"""--data labels.csv: the same splits as the equivalent folder, and errors that name the line and column."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import write_image_folder
from transferlab.cli.main import main
from transferlab.core.errors import UserError
from transferlab.data import load_splits

COUNTS = {"train": {c: 6 for c in ("a", "b", "c")}, "val": {c: 2 for c in ("a", "b", "c")}, "test": {c: 2 for c in ("a", "b", "c")}}


def write_csv(path: Path, rows: list, header: str = "path,label,split") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def rows_for(root: Path, splits=("train", "val", "test"), with_split=True) -> list:
    """One CSV row per image of the folder tree, paths relative to `root`."""
    rows = []
    for split in splits:
        for f in sorted((root / split).rglob("*.png")):
            rel = f.relative_to(root).as_posix()
            rows.append([rel, f.parent.name, split] if with_split else [rel, f.parent.name])
    return rows


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "data", COUNTS, size=24)


def _same_splits(a, b):
    assert a.classes == b.classes
    for name in ("train", "val", "test"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert [os.path.realpath(f) for f in x.files] == [os.path.realpath(f) for f in y.files], name
            assert x.labels == y.labels, name


def test_a_csv_gives_the_same_splits_as_the_folder(folder):
    csv_path = write_csv(folder / "labels.csv", rows_for(folder)[::-1])  # row order does not matter
    _same_splits(load_splits(csv_path), load_splits(folder))


def test_without_val_rows_validation_is_carved_as_for_folders(folder, tmp_path):
    csv_path = write_csv(folder / "labels.csv", rows_for(folder, ("train", "test")))
    no_val = tmp_path / "noval"
    shutil.copytree(folder / "train", no_val / "train")
    shutil.copytree(folder / "test", no_val / "test")
    for kwargs in ({}, {"valid_frac": 0.5, "split_seed": 3}, {"max_per_class": 4}):
        from_csv, from_folder = load_splits(csv_path, **kwargs), load_splits(no_val, **kwargs)
        assert [Path(f).name for f in from_csv.val.files] == [Path(f).name for f in from_folder.val.files]
        assert [Path(f).parent.name for f in from_csv.train.files] == [Path(f).parent.name for f in from_folder.train.files]
        assert len(from_csv.val) == len(from_folder.val) and from_csv.test is not None


def test_no_split_column_means_all_train_and_relative_paths_follow_the_csv(folder, tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    rows = [["../data/" + r[0], r[1]] for r in rows_for(folder, ("train",), with_split=False)]
    splits = load_splits(write_csv(sub / "labels.csv", rows, header="path,label"))
    assert splits.test is None and len(splits.train) + len(splits.val) == 18 and len(splits.val) == 3
    assert all(os.path.isabs(f) and os.path.isfile(f) for f in splits.train.files)


@pytest.mark.parametrize("edit, needle", [
    (lambda rows: rows.__setitem__(3, ["train/a/missing.png", "a", "train"]), "line 5, column path: no such file"),
    (lambda rows: rows.__setitem__(2, [rows[2][0], "", "train"]), "line 4, column label: empty label"),
    (lambda rows: rows.__setitem__(6, [rows[6][0], rows[6][1], "holdout"]), "line 8, column split: unknown split value 'holdout'"),
    (lambda rows: rows.__setitem__(0, ["", "a", "train"]), "line 2, column path: empty"),
    (lambda rows: rows.append(list(rows[0])), "line 32, column path: train/a/img_000.png is listed again (first on line 2)"),
    (lambda rows: rows.__setitem__(-1, [rows[-1][0], "heron", "test"]), "line 31, column label: class 'heron' of split 'test' has no train rows"),
])
def test_errors_name_the_line_and_column(folder, edit, needle):
    rows = rows_for(folder)  # 18 train, 6 val, 6 test rows on lines 2..31
    edit(rows)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_splits(write_csv(folder / "labels.csv", rows))


def test_a_class_missing_from_a_split_and_a_missing_column_are_named(folder):
    rows = [r for r in rows_for(folder) if not (r[2] == "test" and r[1] == "c")]
    with pytest.raises(UserError, match="column split: split 'test' has no rows of class\\(es\\) c"):
        load_splits(write_csv(folder / "labels.csv", rows))
    with pytest.raises(UserError, match="line 1: missing column 'label'"):
        load_splits(write_csv(folder / "labels.csv", [["train/a/img_000.png"]], header="path"))
    with pytest.raises(UserError, match="no such file"):
        load_splits(folder / "nothing.csv")


def test_probe_trains_on_a_csv_and_its_bad_image_policy_is_the_folders(folder, tmp_path, capsys):
    rows = rows_for(folder)
    csv_path = write_csv(folder / "labels.csv", rows)
    out = tmp_path / "run"
    fast = ["--device", "cpu", "--workers", "0", "--no-progress", "--epochs", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main(["probe", "--data", str(csv_path), "--out", str(out), *fast]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["root"] == str(csv_path.resolve()) and record["data"]["test"]["n"] == 6
    assert (out / "test_predictions.json").is_file()
    (folder / "test" / "a" / "img_000.png").write_bytes(b"broken")
    capsys.readouterr()
    assert main(["probe", "--data", str(csv_path), "--out", str(tmp_path / "run2"), *fast]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) in split 'test' cannot be decoded" in err and "img_000.png" in err

"""A single probe's report (issue 22, items 2 and 4): report.html with the verdict for one run, warnings at the
epoch cap in run.json and the terminal, every output listed, and `transferlab report PROBE_OUT` rebuilding it."""

import contextlib
import html
import io
import json
import re
import shlex
import shutil

import numpy as np
import pytest

from conftest import write_image_folder
from transferlab.cli.main import main

CLASSES = ("a", "b<i>", "c&d")  # names that must reach the page escaped
FAST = ["--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_report") / "data"
    counts = {split: {c: n for c in CLASSES} for split, n in (("train", 8), ("val", 3), ("test", 3))}
    return write_image_folder(root, counts)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # outside OUT: OUT then holds the run's outputs only


@pytest.fixture(scope="module")
def probe(data, cache, tmp_path_factory):
    """A 2-epoch probe whose best epoch is its last (the class colours are easy: validation keeps improving)."""
    out = tmp_path_factory.mktemp("probe") / "out"
    stdout = io.StringIO()  # capsys is per test; this fixture runs once for the module
    with contextlib.redirect_stdout(stdout):
        code = main(PROBE_ARGS(data, out, cache))
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["best_epoch"] == 2 and record["config"]["train"]["epochs"] == 2  # the situation under test
    return out, record, stdout.getvalue()


def PROBE_ARGS(data, out, cache) -> list[str]:
    return ["probe", "--data", str(data), "--epochs", "2", "--lr", "1e-2", "--out", str(out), "--cache-dir", str(cache), *FAST]


def wilson_reference(correct: int, n: int) -> tuple[float, float]:
    """The library's reference for the Wilson score interval (scipy)."""
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def listed_outputs(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith("outputs: "))
    return line.removeprefix("outputs: ").split(", ")


def test_a_probe_at_its_epoch_cap_warns_in_run_json_and_the_terminal(probe):
    out, record, stdout = probe
    warning = "best epoch 2 of 2: not converged, raise --epochs"
    assert record["warnings"] == [warning]
    assert f"warning: {warning}" in stdout.splitlines()


def test_the_report_holds_the_wilson_interval_of_the_stored_predictions(probe):
    out, record, _ = probe
    page = (out / "report.html").read_text()
    predictions = json.loads((out / "test_predictions.json").read_text())
    labels, probs = np.array(predictions["labels"]), np.array(predictions["probs"])
    n, correct = len(labels), int((probs.argmax(1) == labels).sum())
    assert n == 9 and correct / n == record["test_acc"]
    low, high = wilson_reference(correct, n)
    assert f"95% Wilson interval [{100 * low:.1f}%, {100 * high:.1f}%]" in page
    assert f"Test accuracy {100 * correct / n:.1f}%</b> ({correct} of {n} test images)" in page
    assert f"{n} test images: one image = {100 / n:.2g} points." in page  # 9 images: 11 points each
    assert "warning: best epoch 2 of 2: not converged, raise --epochs" in page
    # Curves, per-class insight (confusion matrix, reliability), config and data are on the page, inline.
    assert page.count("data:image/png;base64,") == 3 and not re.search(r"src=['\"](?!data:)", page)
    for needle in ("Learning curves", "Per-class insight", "Configuration", "<td>lr</td><td>0.01</td>", "<td>test</td><td>test/</td>"):
        assert needle in page, needle
    # Class names are escaped everywhere, never markup.
    assert "b<i>" not in page and "c&d" not in page and html.escape("b<i>") in page and html.escape("c&d") in page


def test_the_command_lists_exactly_the_outputs_that_exist(probe):
    out, _, stdout = probe
    existing = {f"{p}/" if p.is_dir() else str(p) for p in out.iterdir()}
    assert listed_outputs(stdout) == [str(out / "run.json"), str(out / "head.safetensors"), str(out / "curves.png"),
                                      str(out / "report.html"), str(out / "test_predictions.json"),
                                      str(out / "insight.html"), f"{out / 'insight'}/"]
    assert set(listed_outputs(stdout)) == existing


def test_report_rebuilds_a_probe_folder(probe, tmp_path, capsys):
    out, _, _ = probe
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("report.html", "curves.png", "insight.html"):
        (copy / name).unlink()
    shutil.rmtree(copy / "insight")
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {copy / 'report.html'}"
    # From run.json and test_predictions.json alone, the same page and figures again.
    assert (copy / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert (copy / "curves.png").read_bytes() == (out / "curves.png").read_bytes()
    assert (copy / "insight" / "per_class.csv").read_bytes() == (out / "insight" / "per_class.csv").read_bytes()


def test_report_accepts_no_progress_as_the_other_commands_do(probe, tmp_path, capsys):
    out, _, _ = probe
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {copy / 'report.html'}"
    assert (copy / "report.html").read_bytes() == (out / "report.html").read_bytes()


def test_report_of_a_folder_that_is_neither_a_sweep_nor_a_probe_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"transferlab: error: {tmp_path}: neither a sweep's ledger.sqlite nor a probe's run.json here"


def test_a_probe_without_test_split_reports_without_test_numbers(data, cache, tmp_path, capsys):
    out = tmp_path / "no_test"  # with its feature cache in OUT/cache/ (no --cache-dir)
    assert main(["probe", "--data", str(data), "--epochs", "3", "--patience", "1", "--lr", "1e-2", "--test-split", "none",
                 "--out", str(out), *FAST]) == 0
    stdout = capsys.readouterr().out
    assert listed_outputs(stdout) == [str(out / n) for n in ("run.json", "head.safetensors", "curves.png", "report.html")] + [
        f"{out / 'cache'}/ (feature cache)"]
    assert {p.name for p in out.iterdir()} == {"run.json", "head.safetensors", "curves.png", "report.html", "cache"}
    page = (out / "report.html").read_text()
    assert "No test split" in page and "Wilson" not in page and "Per-class insight" not in page
    assert "test split is evaluated" not in page  # there is none to evaluate
    record = json.loads((out / "run.json").read_text())
    best, run = record["best_epoch"], record["epochs_run"]
    if best < 3:  # patience 1: one epoch without improvement stops the run
        assert record["warnings"] == [] and run == best + 1
        assert f"Early stopping ended the run at epoch {run}, 1 epoch(s) after the best (--patience 1)." in page
    else:
        assert record["warnings"] == ["best epoch 3 of 3: not converged, raise --epochs"]


def test_the_report_says_whether_early_stopping_or_the_epoch_cap_ended_the_run(probe):
    from transferlab.reporting.probe_report import render_probe_html

    _, record, _ = probe

    def page(best, run, cap, patience):
        train = dict(record["config"]["train"], epochs=cap, patience=patience)
        changed = dict(record, best_epoch=best, epochs_run=run, warnings=[], config=dict(record["config"], train=train))
        return render_probe_html(changed, b"", None)

    # best 99 of 100 (the hymenoptera probe): no warning, but the cap ended the run, 1 epoch after the best
    assert ("The epoch cap ended the run (epoch 100 of --epochs 100), 1 epoch(s) after the best, before early "
            "stopping (--patience 15) would have.") in page(99, 100, 100, 15)
    assert "Early stopping ended the run at epoch 40, 15 epoch(s) after the best (--patience 15)." in page(25, 40, 100, 15)
    # 15 epochs without improvement at the cap: early stopping would have stopped there too
    assert "Early stopping ended the run at epoch 100, 15 epoch(s)" in page(85, 100, 100, 15)


def test_the_report_says_how_to_reproduce_the_run_and_when_the_test_split_is_evaluated(probe, data, cache):
    out, record, _ = probe
    command = "transferlab " + shlex.join(PROBE_ARGS(data, out, cache))  # the command line as the user typed it
    assert record["command"] == command
    page = (out / "report.html").read_text()
    assert f"<h2>Reproduce</h2><pre>{html.escape(command)}</pre>" in page
    assert page.index("<h2>Timings</h2>") < page.index("<h2>Reproduce</h2>")  # last, as in the sweep's report
    assert "The test split is evaluated once, for the best epoch's weights." in page


def test_a_record_without_a_command_has_no_reproduce_section(probe):
    from transferlab.reporting.probe_report import render_probe_html

    _, record, _ = probe
    older = {k: v for k, v in record.items() if k != "command"}  # run.json written before commands were recorded
    assert "Reproduce" not in render_probe_html(older, b"", None)
    assert "<pre>transferlab.probe(&#x27;d&#x27;)</pre>" in render_probe_html(dict(record, command="transferlab.probe('d')"), b"", None)


def test_the_feature_cache_is_listed_only_when_it_is_inside_out(tmp_path):
    from transferlab.train.probe_run import feature_cache_in

    out = tmp_path / "out"
    out.mkdir()
    assert feature_cache_in(out, None) is None  # no OUT/cache/ written
    (out / "cache").mkdir()
    assert feature_cache_in(out, None) == out / "cache"
    (out / "mine").mkdir()
    assert feature_cache_in(out, str(out / "mine")) == out / "mine"  # --cache-dir inside OUT
    (tmp_path / "shared").mkdir()
    assert feature_cache_in(out, str(tmp_path / "shared")) is None  # the user's cache elsewhere is no output of the run

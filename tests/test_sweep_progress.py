"""A sweep that says what it does (issue 22, item 5): the plan with what is already done, a time estimate after
the first backbone, the backbone and phase in the progress bar, and LP-FT rows that show the fine-tuning choice."""

import json
import logging
import re
import subprocess
import sys

from transferlab.cli.main import main
from transferlab.cli.sweep import n_test_images, summary_lines
from transferlab.reporting.verdict import wilson_interval
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import SweepManifest, write_manifest
from transferlab.sweep.plan import PhasePlan, plan_line, progress_desc, time_left_text
from transferlab.train.session import RunSession

# 2 probes (lr 1e-3, 3e-2) and 2 fine-tuning runs (ft lr 1e-4, 2e-4): grids with no value in common.
GRID = ["--backbones", "efficientnet_lite0", "--lr", "1e-3,3e-2", "--l2", "0", "--seeds", "0", "--epochs", "3",
        "--patience", "3", "--lpft", "--ft-lr", "1e-4,2e-4", "--ft-layers", "3", "--ft-epochs", "2",
        "--device", "cpu", "--workers", "0"]
FRESH = "efficientnet_lite0: LP 2 runs (0 done, 2 to run), LP-FT 2 runs (after the probe is chosen)"


def progress_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transferlab.progress"]


# -- the pieces, by hand ---------------------------------------------------------------------------
def test_time_left_is_the_elapsed_time_per_executed_run_times_the_runs_left():
    assert time_left_text(120.0, 10, 15) == "about 3 min left"        # 12 s per run x 15 = 180 s
    assert time_left_text(100.0, 10, 5) == "under a minute left"      # 50 s
    assert time_left_text(36.0, 1, 100) == "about 60 min left"        # 3600 s
    assert time_left_text(36.0, 1, 250) == "about 2.5 h left"         # 9000 s (from 90 min on: hours)
    assert time_left_text(30.0, 0, 5) is None and time_left_text(30.0, 3, 0) is None


def test_plan_lines_and_progress_description():
    phases = [PhasePlan("LP", 8, 8), PhasePlan("LP-FT", 2, 1)]
    assert plan_line("efficientnet_lite0", phases) == "efficientnet_lite0: LP 8 runs (8 done, 0 to run), LP-FT 2 runs (1 done, 1 to run)"
    assert PhasePlan("LP-FT", 2, None).text() == "LP-FT 2 runs (after the probe is chosen)"
    assert PhasePlan("LP-FT", 2, None).to_run == 2 and PhasePlan("LP", 1, 0).text() == "LP 1 run (0 done, 1 to run)"
    assert progress_desc("efficientnet_lite0", "LP") == "efficientnet_lite0 LP"


def test_summary_lines_show_the_fine_tuning_choice_the_interval_and_the_warnings():
    low, high = wilson_interval(98, 100)
    lp = {"backbone": "lite0", "method": "LP", "lr": 1e-3, "l2": 0.01, "seed": 1, "val_xent": 0.5, "val_err": 0.1,
          "test_acc": 0.98, "test_acc_ci_low": low, "test_acc_ci_high": high, "rank": 2, "diff_vs_best": -0.01,
          "ci_low_vs_best": -0.03, "ci_high_vs_best": 0.01, "p_vs_best": 1.0, "warnings": ["--lr 0.001 is at the bottom of its grid: extend the grid"]}
    ft = {"backbone": "lite0", "method": "LP-FT", "lr": 3e-5, "l2": 0.01, "seed": 1, "val_xent": 0.4, "val_err": 0.1,
          "test_acc": 0.99, "ft_unit": "blocks:4", "ft_augment": "views:4", "ft_l2sp": 0.0, "label_smoothing": 0.1,
          "wise_alpha": 0.5}
    lp_line, warning, ft_line = summary_lines([lp, ft])
    assert lp_line.startswith("#2 lite0") and "lr=0.001 " in lp_line and "l2=0.01 " in lp_line and "seed=1 " in lp_line
    assert f"test_acc=0.9800 [{low:.4f}, {high:.4f}]" in lp_line and "[0.9300, 0.9945]" in lp_line  # 98 of 100 by hand
    assert lp_line.endswith("vs best -1.0 pt [-3.0, +1.0], McNemar p = 1")
    assert warning == "    warning: --lr 0.001 is at the bottom of its grid: extend the grid"
    assert "ft_lr=3e-05 " in ft_line and "unit=blocks:4 augment=views:4 a=0.5 smoothing=0.1" in ft_line
    assert "l2=" not in ft_line and "seed=" not in ft_line and "l2sp" not in ft_line  # the probe's, and an unused term
    assert ft_line.endswith("test_acc=0.9900")  # a row without the report's verdict keys still prints


def _row(backbone, method, rank, val_xent, val_err):
    return {"backbone": backbone, "method": method, "lr": 1e-3, "l2": 0.0, "seed": 0, "val_xent": val_xent, "val_err": val_err,
            "test_acc": 0.9, "select": "val_err", "rank": rank}


def test_summary_lines_are_best_first_then_what_export_takes_and_what_one_image_is_worth():
    rows = [_row("lite0", "LP", 3, 0.30, 0.20), _row("lite1", "LP", 1, 0.50, 0.05), _row("lite2", "LP", None, 0.10, 0.30),
            _row("lite1", "LP-FT", 2, 0.20, 0.10), _row("lite3", "LP", None, 0.40, 0.40)]
    for r in rows[3:4]:
        r.update(ft_unit="blocks:1", ft_augment="none", wise_alpha=1.0)
    lines = summary_lines(rows, n_test=300)
    # by rank (1, 2, 3), then the unranked rows in sweep order (lite2 before lite3)
    assert [line.split()[:3] for line in lines[:5]] == [["#1", "lite1", "LP"], ["#2", "lite1", "LP-FT"], ["#3", "lite0", "LP"],
                                                        ["lite2", "LP", "lr=0.001"], ["lite3", "LP", "lr=0.001"]]
    # the rows' select is val_err: the #1 row has the lowest val_err (0.05), not the lowest val_xent (lite2's 0.10)
    assert lines[5] == ("export takes #1 lite1 LP (lowest val_err 0.0500 among the chosen models; "
                        "the test split played no part in the choice)")
    assert lines[6] == "300 test images: one image = 0.33 points."  # 100 / 300 = 0.333..., two significant digits
    assert len(lines) == 7


def test_summary_lines_without_a_ranked_best_or_a_test_count_add_nothing():
    rows = [_row("lite0", "LP", None, 0.3, 0.2), _row("lite1", "LP", None, 0.2, 0.1)]
    assert [line.split()[0] for line in summary_lines(rows)] == ["lite0", "lite1"]  # sweep order, no export or resolution line
    assert summary_lines([]) == []


def test_the_test_image_count_comes_from_the_ledger_data_summary(tmp_path):
    assert n_test_images(tmp_path) is None  # no ledger
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert n_test_images(tmp_path) is None  # a ledger without a data summary
    write_manifest(ledger, SweepManifest(data_summary={"train": {"n": 24}, "val": {"n": 9}}))
    assert n_test_images(tmp_path) is None  # no test split
    write_manifest(ledger, SweepManifest(data_summary={"train": {"n": 24}, "val": {"n": 9}, "test": {"n": 9}}))
    ledger.close()
    assert n_test_images(tmp_path) == 9
    (tmp_path / "ledger.sqlite").write_bytes(b"not a database")
    assert n_test_images(tmp_path) is None


# -- whole sweeps -----------------------------------------------------------------------------------
def test_a_fresh_sweep_prints_its_plan_the_phase_in_the_bar_and_lpft_rows_with_their_own_lr(tiny_folder, tmp_path):
    """The CLI as a user runs it: default logging (no -v), progress bar on (stderr)."""
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "transferlab", "sweep", "--data", str(tiny_folder), "--out", str(out), *GRID],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.replace("\r", "\n")
    assert "transferlab: sweep plan: 1 backbone(s), 4 run(s) (LP 2, LP-FT 2)" in err.splitlines()
    assert f"transferlab: {FRESH}" in err.splitlines()
    assert re.search(r"^efficientnet_lite0 LP: +\d+%", err, re.M) and re.search(r"^efficientnet_lite0 LP-FT: +\d+%", err, re.M)
    rows = json.loads((out / "summary.json").read_text())
    ft = next(r for r in rows if r["method"] == "LP-FT")
    assert ft["lr"] in (1e-4, 2e-4)  # the fine-tuning grid's lr, the one the row reports
    ft_line = next(line for line in proc.stdout.splitlines() if " LP-FT " in line)
    assert f"ft_lr={ft['lr']:<8g} unit={ft['ft_unit']} augment=views:4 a={ft['wise_alpha']:g}" in ft_line
    assert "l2=" not in ft_line and "seed=" not in ft_line
    # best first, then what export takes (the rank-1 row of summary.json) and the tiny folder's 9 test images
    stdout = proc.stdout.splitlines()
    best = next(r for r in rows if r["rank"] == 1)
    assert stdout[0].startswith(f"#1 {best['backbone']:20s} {best['method']:6s} ")
    assert [int(line.split()[0][1:]) for line in stdout if line.startswith("#")] == sorted(r["rank"] for r in rows)
    assert (f"export takes #1 efficientnet_lite0 {best['method']} (lowest val_xent {best['val_xent']:.4f} among the chosen "
            "models; the test split played no part in the choice)") in stdout
    assert stdout[-2] == "9 test images: one image = 11 points."  # 100 / 9 = 11.1: two significant digits
    assert stdout[-1].startswith("outputs: ")


def test_a_resumed_sweep_counts_what_is_done_in_each_phase(tiny_folder, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="transferlab.progress")
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(tiny_folder), "--out", str(out), *GRID, "--no-progress"]
    original = RunSession.run
    calls = {"n": 0}

    def interrupt_the_second_fine_tuning_run(self, *a, **kw):  # probes train batched; each FT run is one call
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(RunSession, "run", interrupt_the_second_fine_tuning_run)
    assert main(args) == 130
    assert FRESH in progress_messages(caplog)
    monkeypatch.setattr(RunSession, "run", original)
    caplog.clear()
    assert main(args) == 0
    assert "efficientnet_lite0: LP 2 runs (2 done, 0 to run), LP-FT 2 runs (1 done, 1 to run)" in progress_messages(caplog)
    caplog.clear()
    assert main(args) == 0
    assert "efficientnet_lite0: LP 2 runs (2 done, 0 to run), LP-FT 2 runs (2 done, 0 to run)" in progress_messages(caplog)
    assert not any("left" in m for m in progress_messages(caplog))  # one backbone, nothing to estimate


def test_the_time_left_is_estimated_after_the_first_backbone(tiny_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="transferlab.progress")
    out = tmp_path / "two"
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(out), "--backbones", "efficientnet_lite0,efficientnet_lite1",
                 "--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "2", "--device", "cpu", "--workers", "0",
                 "--no-progress"]) == 0
    messages = progress_messages(caplog)
    assert messages[:3] == ["sweep plan: 2 backbone(s), 2 run(s) (LP 2)",
                            "efficientnet_lite0: LP 1 run (0 done, 1 to run)", "efficientnet_lite1: LP 1 run (0 done, 1 to run)"]
    estimates = [m for m in messages if " left" in m]
    assert len(estimates) == 1  # after lite0, none after the last backbone
    found = re.fullmatch(r"efficientnet_lite0 finished; (under a minute|about \d+ min) left \(1 run\(s\) to go, "
                         r"from (\d+(?:\.\d)?) s per run so far\)", estimates[0])
    assert found, estimates[0]
    per_run = found.group(2)  # one decimal below 10 s (never "0 s"), whole seconds from there
    assert ("." in per_run) == (float(per_run) < 10) and float(per_run) > 0

"""reporting.summary: one row per chosen (backbone, method), each part from its definition, and the two files.

Ledgers are built by hand (a few runs with known metrics), so every value follows from the definitions in
summary.py's docstrings: the best metric per grid value, the seeds of the chosen hyperparameters within the
planned runs only, limit warnings against the sweep's grids, sweep order, the SUMMARY_KEYS columns.
"""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import without_torch
from transferlab.reporting.summary import SUMMARY_KEYS, grid_scores, planned_runs, row_warnings, summary_rows, write_summary
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import BackboneRecord, SweepManifest, write_backbone, write_manifest

SRC = Path(__file__).resolve().parents[1] / "src"
LP_GRID = {"lr": [1e-3, 1e-2], "l2": [0.0, 1e-2]}
FT_GRID = {"lr": [1e-4, 1e-3], "l2sp": [0.0], "label_smoothing": [0.0]}


def cell(lr, xent=None, status="done", **cfg):
    """A ledger row as grid_scores reads it: config, status and (when done) the metrics."""
    return {"config": {"lr": lr, **cfg}, "status": status, "metrics": {"val_xent": xent, "val_err": xent} if status == "done" else None}


def add_run(ledger, run_hash, backbone, method, cfg, val_err, val_xent=0.5, layers=1, best_epoch=3):
    ledger.mark_running(run_hash, backbone, method, cfg)
    metrics = {"best_epoch": best_epoch, "epochs_run": 6, "val_xent": val_xent, "val_err": val_err, "n_trainable_layers": layers,
               "trainable_params": 10}
    ledger.finish(run_hash, "done", metrics, [{"epoch": e, "train_err": 0.1} for e in range(7)], {})


def test_grid_scores_keep_the_best_finished_metric_per_grid_value():
    runs = [cell(0.1, 0.5, l2=0.0), cell(0.1, 0.4, l2=0.01), cell(0.01, 0.3, l2=0.0), cell(1.0, status="failed", l2=0.0),
            cell(1.0, status="diverged", l2=0.01)]
    assert grid_scores(runs, "LP", "val_xent") == {"--lr": {0.1: 0.4, 0.01: 0.3}, "--l2": {0.0: 0.3, 0.01: 0.4}}
    # Fine-tuning: L2-SP and label smoothing absent from a run's config count as 0.
    assert grid_scores([cell(1e-4, 0.2), cell(1e-3, 0.1, l2sp=0.1)], "LP-FT", "val_err") == {
        "--ft-lr": {1e-4: 0.2, 1e-3: 0.1}, "--ft-l2sp": {0.0: 0.2, 0.1: 0.1}, "--label-smoothing": {0.0: 0.1}}
    assert grid_scores(None, "LP", "val_xent") is None  # no plan recorded: no scores


def test_row_warnings_read_each_phases_own_flags_and_grids():
    manifest = SweepManifest(grid={"lp": LP_GRID, "ft": FT_GRID})
    # LP: best epoch 10 of the run's 10 epochs (--epochs); lr 1e-2 the top of --lr (l2 0 is a floor, not an edge).
    probe = {"lr": 1e-2, "l2": 0.0, "epochs": 10, "patience": 3}
    assert row_warnings(manifest, "LP", probe, {"best_epoch": 10, "epochs_run": 10}) == [
        "best epoch 10 of 10: not converged, raise --epochs", "--lr 0.01 is at the top of its grid: extend the grid"]
    chosen = {"lr": 1e-3, "l2": 0.0, "epochs": 5, "patience": 2}
    # LP-FT: the top of --ft-lr (the ft phase's grid, not the probe's), and the flag of its epochs is --ft-epochs.
    assert row_warnings(manifest, "LP-FT", chosen, {"best_epoch": 5, "epochs_run": 5}) == [
        "best epoch 5 of 5: not converged, raise --ft-epochs", "--ft-lr 0.001 is at the top of its grid: extend the grid"]
    # With the grid's scores an edge within 1% of its inner neighbour (0.499 against 0.500) is no warning...
    scores = {"--ft-lr": {1e-4: 0.500, 1e-3: 0.499}}
    assert row_warnings(manifest, "LP-FT", chosen, {"best_epoch": 2, "epochs_run": 4}, scores) == []
    # ...and a kept probe (a = 0) is.
    assert row_warnings(manifest, "LP-FT", chosen, {"best_epoch": 2, "wise_alpha": 0.0}, scores) == [
        "interpolation a = 0: fine-tuning did not help; the probe stands"]


def test_planned_runs_are_the_plans_rows_in_plan_order(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert planned_runs(ledger, "m", "LP") is None  # no plan recorded
    for h in ("h1", "h2", "other"):
        add_run(ledger, h, "m", "LP", {"lr": 0.1, "l2": 0.0, "seed": 0}, 0.1)
    ledger.set_plan("m", "LP", ["h2", "h1", "never-run"])
    assert [r["hash"] for r in planned_runs(ledger, "m", "LP") or []] == ["h2", "h1"]
    ledger.close()


def test_summary_rows_one_per_choice_in_sweep_order_with_seed_statistics_of_the_plan_only(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    write_manifest(ledger, SweepManifest(grid={"lp": LP_GRID}, select="val_xent", backbones=["m", "unchosen", "n"]))
    write_backbone(ledger, "m", BackboneRecord(source="imagenet1k", source_top1=70.0))
    errs = [0.10, 0.20, 0.30]  # the chosen hyperparameters over three seeds
    for seed, err in enumerate(errs):
        add_run(ledger, f"m{seed}", "m", "LP", {"lr": 1e-3, "l2": 0.0, "seed": seed}, err)
    add_run(ledger, "m-other-lr", "m", "LP", {"lr": 1e-2, "l2": 0.0, "seed": 0}, 0.05, val_xent=0.6)  # another cell: not a seed of the choice
    add_run(ledger, "m-old-grid", "m", "LP", {"lr": 1e-3, "l2": 0.0, "seed": 7}, 0.90)  # same config, not in this grid's plan
    ledger.set_plan("m", "LP", ["m0", "m1", "m2", "m-other-lr"])
    ledger.choose("m", "LP", "m0")
    ledger.record_test("m0", 0.75)
    add_run(ledger, "n-lp", "n", "LP", {"lr": 1e-2, "l2": 0.0, "seed": 0}, 0.2, val_xent=0.4)
    ledger.choose("n", "LP", "n-lp")  # no plan: a ledger from before plans were recorded
    ledger.record_test("n-lp", 0.8)
    rows = summary_rows(ledger)
    ledger.close()
    assert all(tuple(r) == SUMMARY_KEYS for r in rows)
    assert [(r["backbone"], r["method"]) for r in rows] == [("m", "LP"), ("n", "LP")]  # "unchosen" has no row
    m, n = rows
    assert (m["source"], m["source_top1"], m["lr"], m["seed"], m["test_acc"], m["select"]) == ("imagenet1k", 70.0, 1e-3, 0, 0.75, "val_xent")
    assert (m["n_seeds"], m["val_err_seed_mean"]) == (3, pytest.approx(statistics.fmean(errs)))
    assert m["val_err_seed_std"] == pytest.approx(statistics.stdev(errs))
    assert (n["source"], n["n_seeds"], n["val_err_seed_mean"], n["val_err_seed_std"]) == (None, None, None, None)
    # Ranked by val_xent: n (0.4) before m (0.5). Probes have no fine-tuning columns and no LP comparison.
    assert (n["rank"], m["rank"]) == (1, 2)
    assert all(r[k] is None for r in rows for k in ("ft_unit", "ft_augment", "ft_l2sp", "wise_alpha", "diff_vs_lp", "p_mcnemar"))
    # lr 1e-3 is the bottom of --lr, and the plan's best val xent there (0.5) beats 0.6 at lr 1e-2 by more than 1%.
    assert m["warnings"] == ["--lr 0.001 is at the bottom of its grid (val xent 0.5 there, 0.6 at 0.01): extend the grid"]


def test_write_summary_writes_the_rows_as_json_and_csv_with_joined_warnings(tmp_path):
    rows = [dict.fromkeys(SUMMARY_KEYS, None) | {"backbone": "m", "method": "LP", "lr": 0.001, "warnings": ["one", "two"]},
            dict.fromkeys(SUMMARY_KEYS, None) | {"backbone": "m", "method": "LP-FT", "warnings": []}]
    write_summary(tmp_path, rows)
    assert json.loads((tmp_path / "summary.json").read_text()) == rows
    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SUMMARY_KEYS
    assert [(r["backbone"], r["method"], r["lr"], r["warnings"]) for r in table] == [("m", "LP", "0.001", "one; two"), ("m", "LP-FT", "", "")]


def test_the_sweep_report_builds_with_torch_blocked(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    ledger = Ledger(out / "ledger.sqlite")
    write_manifest(ledger, SweepManifest(grid={"lp": LP_GRID}, backbones=["m"]))
    add_run(ledger, "m0", "m", "LP", {"lr": 1e-3, "l2": 0.0, "seed": 0}, 0.1)
    ledger.set_plan("m", "LP", ["m0"])
    ledger.choose("m", "LP", "m0")
    ledger.record_test("m0", 0.5)
    ledger.close()
    code = without_torch(
        "from transferlab.reporting.report import build_report\n"
        f"rows = build_report({str(out)!r})\n"
        "assert [(r['backbone'], r['method']) for r in rows] == [('m', 'LP')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "report.html").is_file() and (out / "figures" / "grid_m.png").is_file()

"""The summary rows of a sweep, one per (backbone, method) chosen on validation, and summary.json / summary.csv.

Each row holds the chosen run's hyperparameters and metrics, what the fine-tuning grid chose, the chosen
hyperparameters' validation error over the grid's seeds, LP-FT against LP on the same test images, the
verdict numbers (rank, Wilson interval, paired test against the best) and the limit warnings. Read from
the ledger alone (and the chosen runs' stored test predictions); no torch.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from transferlab.core.files import atomic_write_bytes, write_json
from transferlab.reporting.extra_sets import extra_columns, extra_keys
from transferlab.reporting.verdict import ModelPredictions, limit_warnings, verdict_numbers
from transferlab.sweep.ledger import METHODS, Ledger, Method, RunRow
from transferlab.sweep.manifest import SweepManifest, read_backbone, read_manifest

SUMMARY_KEYS = (
    "backbone", "source", "source_top1", "method", "lr", "l2", "seed", "n_trainable_layers",
    "trainable_params", "best_epoch", "val_xent", "val_err", "test_acc",
    # the Wilson score 95% interval of test_acc (reporting/verdict.py)
    "test_acc_ci_low", "test_acc_ci_high",
    # the selection metric, and this row's place under it (1 = the best: what `export` takes)
    "select", "rank",
    # FT and LP-FT rows: what the fine-tuning grid chose (unit "blocks:N" / "layers:k"; wise_alpha 1 = not interpolated)
    "ft_unit", "ft_augment", "ft_l2sp", "label_smoothing", "wise_alpha",
    # the chosen hyperparameters over every seed of the grid (validation only: the test split is read once)
    "n_seeds", "val_err_seed_mean", "val_err_seed_std",
    # FT and LP-FT rows: the row against LP on the same test images (reporting/compare.py)
    "diff_vs_lp", "ci_low", "ci_high", "p_mcnemar",
    # every row but the best: this row against the best (rank 1) on the same test images; n_differ_vs_best:
    # the images where the two disagree on correctness (McNemar's discordant pairs)
    "diff_vs_best", "ci_low_vs_best", "ci_high_vs_best", "p_vs_best", "n_differ_vs_best",
    # where a choice sits at a limit of what was tried (verdict.limit_warnings); "; "-joined in summary.csv
    "warnings",
)


def finished_run(ledger: Ledger, run_hash: str) -> dict[str, Any]:
    """A finished run's row (metrics and history present) as a plain dict."""
    row = ledger.run(run_hash)
    if row is None:
        raise KeyError(run_hash)
    return dict(row)


def summary_rows(ledger: Ledger, out: Path | None = None) -> list[dict]:
    """One row per (backbone, method) chosen on validation, in sweep order (`out`: the sweep folder,
    where the chosen runs' test predictions are), with its rank under the selection metric, the test
    accuracy's 95% interval, the paired test against the best and the limit warnings (SUMMARY_KEYS)."""
    rows = []
    manifest = read_manifest(ledger)
    select = manifest.select
    for name in manifest.backbones:
        info = read_backbone(ledger, name)
        for method in METHODS:
            run_hash = ledger.choice(name, method)
            if run_hash is None:
                continue
            run = finished_run(ledger, run_hash)
            cfg, m = run["config"], run["metrics"]
            rows.append({
                "backbone": name, "source": info.source, "source_top1": info.source_top1,
                "method": method, "lr": cfg["lr"], "l2": cfg["l2"], "seed": cfg["seed"],
                "n_trainable_layers": m["n_trainable_layers"], "trainable_params": m["trainable_params"],
                "best_epoch": m["best_epoch"], "val_xent": m["val_xent"], "val_err": m["val_err"],
                "test_acc": run["test_acc"], "select": cfg.get("select", "val_xent"),
                **_finetuning(method, cfg, m), **_over_seeds(ledger, name, method, cfg, m),
                **_against_lp(ledger, out, name, method, run_hash), **extra_columns(ledger, out, manifest, name, method),
                "warnings": row_warnings(manifest, method, cfg, m, grid_scores(planned_runs(ledger, name, method), method, select),
                                         select),
            })
    numbers = verdict_numbers(rows, chosen_predictions(ledger, out, rows), select)
    keys = SUMMARY_KEYS + extra_keys(manifest)
    return [{k: {**r, **n}[k] for k in keys} for r, n in zip(rows, numbers)]


def chosen_predictions(ledger: Ledger, out: Path | None, rows: list[dict]) -> list[ModelPredictions | None]:
    """Per summary row: the chosen run's stored per-image test predictions (None where there are none)."""
    from transferlab.core.predictions import read_test_predictions, sweep_predictions_path

    found: list[ModelPredictions | None] = []
    for r in rows:
        run_hash = ledger.choice(r["backbone"], r["method"])
        path = sweep_predictions_path(out, run_hash) if out is not None and run_hash is not None else None
        if path is None or not path.is_file():
            found.append(None)
            continue
        d = read_test_predictions(path)
        found.append(ModelPredictions(tuple(d["files"]), d["labels"], d["probs"].argmax(1)))
    return found


_FT_GRID_FIELDS = {"--ft-lr": "lr", "--ft-l2sp": "l2sp", "--label-smoothing": "label_smoothing"}
GRID_FIELDS = {"LP": {"--lr": "lr", "--l2": "l2"}, "FT": _FT_GRID_FIELDS, "LP-FT": _FT_GRID_FIELDS}


def grid_scores(runs: list[RunRow] | None, method: Method, select: str) -> dict[str, dict[float, float]] | None:
    """{flag: {value: the best `select` metric over the finished runs at that value}} of one phase's grid
    (None without the grid's planned runs): what tells whether a grid edge beats its inner neighbour."""
    if runs is None:
        return None
    scores: dict[str, dict[float, float]] = {}
    for flag, field in GRID_FIELDS[method].items():
        per_value: dict[float, float] = {}
        for r in runs:
            metric = (r["metrics"] or {}).get(select) if r["status"] == "done" else None
            value = r["config"].get(field, 0.0)
            if metric is not None and value is not None:
                per_value[float(value)] = min(metric, per_value.get(float(value), math.inf))
        scores[flag] = per_value
    return scores


def row_warnings(manifest: SweepManifest, method: Method, cfg: dict, metrics: dict, scores: dict | None = None,
                 select: str = "val_xent") -> list[str]:
    """The limit warnings of one chosen run (verdict.limit_warnings) against the sweep's grids (the
    manifest's): the probe's epoch cap and lr / l2 grids, or the fine-tuning's epoch cap, lr, L2-SP and
    label-smoothing grids and its weight interpolation; `scores` (grid_scores) decide whether a grid
    edge is worth a warning. The epoch cap and patience are the run's own."""
    if method == "LP":
        lp = manifest.phase("lp")
        return limit_warnings(metrics.get("best_epoch"), cfg.get("epochs"), "--epochs",
                              {"--lr": cfg.get("lr"), "--l2": cfg.get("l2")},
                              {"--lr": lp.get("lr") or [], "--l2": lp.get("l2") or []},
                              epochs_run=metrics.get("epochs_run"), patience=cfg.get("patience"),
                              scores=scores, metric=select)
    ft = manifest.phase("ft")
    return limit_warnings(metrics.get("best_epoch"), cfg.get("epochs"), "--ft-epochs",
                          {"--ft-lr": cfg.get("lr"), "--ft-l2sp": cfg.get("l2sp", 0.0), "--label-smoothing": cfg.get("label_smoothing", 0.0)},
                          {"--ft-lr": ft.get("lr") or [], "--ft-l2sp": ft.get("l2sp") or [],
                           "--label-smoothing": ft.get("label_smoothing") or []},
                          metrics.get("wise_alpha"), epochs_run=metrics.get("epochs_run"),
                          patience=cfg.get("patience"), scores=scores, metric=select)


def _finetuning(method: Method, cfg: dict, metrics: dict) -> dict:
    """What the fine-tuning grid chose (None for probes)."""
    if method == "LP":
        return {"ft_unit": None, "ft_augment": None, "ft_l2sp": None, "label_smoothing": cfg.get("label_smoothing"), "wise_alpha": None}
    return {"ft_unit": metrics.get("unit", f"layers:{metrics['n_trainable_layers']}"), "ft_augment": cfg.get("feature_augment", "none"),
            "ft_l2sp": cfg.get("l2sp", 0.0), "label_smoothing": cfg.get("label_smoothing", 0.0), "wise_alpha": metrics.get("wise_alpha")}


def planned_runs(ledger: Ledger, name: str, method: Method) -> list[RunRow] | None:
    """The ledger rows of the runs the current grid planned for (name, method), in grid order (None: no plan
    of this grid is recorded). Rows of other grids in the folder are never among them."""
    hashes = ledger.plan(name, method)
    if hashes is None:
        return None
    return [row for row in map(ledger.run, hashes) if row is not None]


def _over_seeds(ledger: Ledger, name: str, method: Method, chosen_cfg: dict, chosen_metrics: dict | None = None) -> dict:
    """Validation error of the chosen hyperparameters across the current grid's seeds: mean and sample std."""
    runs = planned_runs(ledger, name, method)
    if runs is None:  # a ledger written before plans were recorded: which rows were this grid's is unknown
        return {"n_seeds": None, "val_err_seed_mean": None, "val_err_seed_std": None}
    layers = (chosen_metrics or {}).get("n_trainable_layers")

    def same_but_seed(cfg: dict) -> bool:  # a field one of the two runs predates held its default then: not compared
        return all(cfg[k] == chosen_cfg[k] for k in (set(cfg) & set(chosen_cfg)) - {"seed"})

    errs = [r["metrics"]["val_err"] for r in runs
            if r["status"] == "done" and r["metrics"] and same_but_seed(r["config"])
            and r["metrics"].get("n_trainable_layers") == layers]
    return {"n_seeds": len(errs), "val_err_seed_mean": statistics.fmean(errs) if errs else None,
            "val_err_seed_std": statistics.stdev(errs) if len(errs) > 1 else None}


def _against_lp(ledger: Ledger, out: Path | None, name: str, method: Method, run_hash: str) -> dict:
    """For an FT or LP-FT row: the paired comparison with the chosen probe on the test images (None elsewhere)."""
    empty = {"diff_vs_lp": None, "ci_low": None, "ci_high": None, "p_mcnemar": None}
    lp_hash = ledger.choice(name, "LP")
    if method == "LP" or lp_hash is None or out is None:
        return empty
    from transferlab.core.predictions import read_test_predictions, sweep_predictions_path
    from transferlab.reporting.compare import paired_comparison

    paths = sweep_predictions_path(out, lp_hash), sweep_predictions_path(out, run_hash)
    if not all(p.is_file() for p in paths):
        return empty
    lp, ft = (read_test_predictions(p) for p in paths)
    if lp["files"] != ft["files"]:
        return empty
    c = paired_comparison(lp["labels"], lp["probs"].argmax(1), ft["probs"].argmax(1))
    return {"diff_vs_lp": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_mcnemar": c.p_mcnemar}


def write_summary(out: Path, rows: list[dict]) -> None:
    """Write the summary rows to ``out/summary.json`` and ``out/summary.csv`` (columns SUMMARY_KEYS; a row's
    warnings "; "-joined in the CSV)."""
    write_json(out / "summary.json", rows)
    _write_csv(out / "summary.csv", rows)


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else SUMMARY_KEYS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([dict(r, warnings="; ".join(r["warnings"])) for r in rows])
    atomic_write_bytes(path, buf.getvalue().encode())

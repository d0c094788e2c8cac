"""Summary files, figures and the self-contained HTML report of a sweep, rebuilt from its ledger alone."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from transferlab.core.errors import UserError
from transferlab.core.files import atomic_write_bytes, safe_filename, write_json
from transferlab.reporting import figures
from transferlab.reporting.verdict import (
    METRIC_TEXT,
    ModelPredictions,
    comparison_sentence,
    export_sentence,
    limit_warnings,
    model_name,
    resolution_sentence,
    verdict_numbers,
)
from transferlab.sweep.ledger import METHODS, Ledger, Method, RunRow

SUMMARY_KEYS = (
    "backbone", "source", "source_top1", "method", "lr", "l2", "seed", "n_trainable_layers",
    "trainable_params", "best_epoch", "val_xent", "val_err", "test_acc",
    # the Wilson score 95% interval of test_acc (reporting/verdict.py)
    "test_acc_ci_low", "test_acc_ci_high",
    # the selection metric, and this row's place under it (1 = the best: what `export` takes)
    "select", "rank",
    # LP-FT rows: what the fine-tuning grid chose (unit "blocks:N" / "layers:k"; wise_alpha 1 = not interpolated)
    "ft_unit", "ft_augment", "ft_l2sp", "label_smoothing", "wise_alpha",
    # the chosen hyperparameters over every seed of the grid (validation only: the test split is read once)
    "n_seeds", "val_err_seed_mean", "val_err_seed_std",
    # LP-FT rows: LP-FT against LP on the same test images (reporting/compare.py)
    "diff_vs_lp", "ci_low", "ci_high", "p_mcnemar",
    # every row but the best: this row against the best (rank 1) on the same test images; n_differ_vs_best:
    # the images where the two disagree on correctness (McNemar's discordant pairs)
    "diff_vs_best", "ci_low_vs_best", "ci_high_vs_best", "p_vs_best", "n_differ_vs_best",
    # where a choice sits at a limit of what was tried (verdict.limit_warnings); "; "-joined in summary.csv
    "warnings",
)
# The columns of the report's compact table (the full table, every key, is in a collapsible section).
COMPACT_KEYS = ("backbone", "method", "lr", "l2", "seed", "n_trainable_layers", "best_epoch", "val_xent", "val_err",
                "test_acc", "ft_unit", "ft_augment", "wise_alpha", "n_seeds")


def _run(ledger: Ledger, run_hash: str) -> dict[str, Any]:
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
    config = ledger.get_meta("config", {})
    select = ledger.get_meta("select", "val_xent")
    for name in ledger.get_meta("backbones", []):
        info = ledger.get_meta(f"backbone_info:{name}", {})
        for method in METHODS:
            run_hash = ledger.choice(name, method)
            if run_hash is None:
                continue
            run = _run(ledger, run_hash)
            cfg, m = run["config"], run["metrics"]
            rows.append({
                "backbone": name, "source": info.get("source"), "source_top1": info.get("source_top1"),
                "method": method, "lr": cfg["lr"], "l2": cfg["l2"], "seed": cfg["seed"],
                "n_trainable_layers": m["n_trainable_layers"], "trainable_params": m["trainable_params"],
                "best_epoch": m["best_epoch"], "val_xent": m["val_xent"], "val_err": m["val_err"],
                "test_acc": run["test_acc"], "select": cfg.get("select", "val_xent"),
                **_finetuning(method, cfg, m), **_over_seeds(ledger, name, method, cfg, m),
                **_against_lp(ledger, out, name, method, run_hash),
                "warnings": row_warnings(config, method, cfg, m, grid_scores(planned_runs(ledger, name, method), method, select),
                                         select),
            })
    numbers = verdict_numbers(rows, chosen_predictions(ledger, out, rows), select)
    return [{k: {**r, **n}[k] for k in SUMMARY_KEYS} for r, n in zip(rows, numbers)]


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


GRID_FIELDS = {"LP": {"--lr": "lr", "--l2": "l2"}, "LP-FT": {"--ft-lr": "lr", "--ft-l2sp": "l2sp", "--label-smoothing": "label_smoothing"}}


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


def row_warnings(config: dict, method: Method, cfg: dict, metrics: dict, scores: dict | None = None,
                 select: str = "val_xent") -> list[str]:
    """The limit warnings of one chosen run (verdict.limit_warnings) against the sweep's `config` (the
    ledger's meta "config"): the probe's epoch cap and lr / l2 grids, or the fine-tuning's epoch cap,
    lr, L2-SP and label-smoothing grids and its weight interpolation; `scores` (grid_scores) decide
    whether a grid edge is worth a warning."""
    if method == "LP":
        return limit_warnings(metrics.get("best_epoch"), (config.get("train") or {}).get("epochs"), "--epochs",
                              {"--lr": cfg.get("lr"), "--l2": cfg.get("l2")},
                              {"--lr": config.get("lrs") or [], "--l2": config.get("l2s") or []},
                              epochs_run=metrics.get("epochs_run"), patience=(config.get("train") or {}).get("patience"),
                              scores=scores, metric=select)
    return limit_warnings(metrics.get("best_epoch"), config.get("ft_epochs"), "--ft-epochs",
                          {"--ft-lr": cfg.get("lr"), "--ft-l2sp": cfg.get("l2sp", 0.0), "--label-smoothing": cfg.get("label_smoothing", 0.0)},
                          {"--ft-lr": config.get("ft_lrs") or [], "--ft-l2sp": config.get("ft_l2sp") or [],
                           "--label-smoothing": config.get("ft_label_smoothing") or []},
                          metrics.get("wise_alpha"), epochs_run=metrics.get("epochs_run"),
                          patience=config.get("ft_patience"), scores=scores, metric=select)


def _finetuning(method: Method, cfg: dict, metrics: dict) -> dict:
    """What the fine-tuning grid chose (None for probes)."""
    if method != "LP-FT":
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
    same = {k: v for k, v in chosen_cfg.items() if k != "seed"}
    layers = (chosen_metrics or {}).get("n_trainable_layers")
    errs = [r["metrics"]["val_err"] for r in runs
            if r["status"] == "done" and r["metrics"] and {k: v for k, v in r["config"].items() if k != "seed"} == same
            and r["metrics"].get("n_trainable_layers") == layers]
    return {"n_seeds": len(errs), "val_err_seed_mean": statistics.fmean(errs) if errs else None,
            "val_err_seed_std": statistics.stdev(errs) if len(errs) > 1 else None}


def _against_lp(ledger: Ledger, out: Path | None, name: str, method: Method, run_hash: str) -> dict:
    """For an LP-FT row: the paired comparison with the chosen probe on the test images (None elsewhere)."""
    empty = {"diff_vs_lp": None, "ci_low": None, "ci_high": None, "p_mcnemar": None}
    lp_hash = ledger.choice(name, "LP")
    if method != "LP-FT" or lp_hash is None or out is None:
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


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_KEYS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([dict(r, warnings="; ".join(r["warnings"])) for r in rows])
    atomic_write_bytes(path, buf.getvalue().encode())


def _img(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure{style}><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(alt)}</figcaption></figure>')


def _plural(n: int | str, word: str) -> str:
    """'1 layer', '3 layers'."""
    return f"{n} {word}" if str(n) == "1" else f"{n} {word}s"


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def _grid_cells(ledger: Ledger, name: str, lrs: list, l2s: list) -> list[dict]:
    """One cell per planned probe of the current grid: lr, l2, status, and val_err / val_xent when done."""
    return [dict(lr=r["config"]["lr"], l2=r["config"]["l2"], status=r["status"],
                 val_err=(r["metrics"] or {}).get("val_err") if r["status"] == "done" else None,
                 val_xent=(r["metrics"] or {}).get("val_xent") if r["status"] == "done" else None)
            for r in planned_runs(ledger, name, "LP") or [] if r["config"]["lr"] in lrs and r["config"]["l2"] in l2s]


Figure = tuple[str, Path, bool]  # caption, PNG, small (shown side by side with the next small ones)


def _draw(ledger: Ledger, out: Path, rows: list[dict]) -> list[Figure]:
    """Write every figure; return (caption, path, small) in report order: the transfer figure, the
    grids side by side, then each backbone's curves. File names come from safe_filename: a backbone name
    never leads a file out of OUT/figures."""
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    config = ledger.get_meta("config", {})
    select = ledger.get_meta("select", "val_xent")
    made: list[Figure] = []
    grids: list[Figure] = []
    if rows:
        plot_rows = [dict(r, arch=r["backbone"].removesuffix("_cub")) for r in rows]
        figures.plot_transfer(plot_rows, fig_dir / "transfer.png")
        unplaced = sorted({r["backbone"] for r in rows if r.get("source_top1") is None})
        left_out = f"; not drawn, their source top-1 being unknown: {', '.join(unplaced)}" if unplaced else ""
        made.append(("Target test accuracy (bars: 95% Wilson interval) vs source top-1 accuracy, one panel per source data set; "
                     f"points of one backbone are spread sideways so none hides another{left_out}", fig_dir / "transfer.png", False))
    for name in ledger.get_meta("backbones", []):
        file_name = safe_filename(name)
        lp_hash = ledger.choice(name, "LP")
        lp = _run(ledger, lp_hash) if lp_hash is not None else None
        if lp is not None:
            c = lp["config"]
            path = fig_dir / f"curves_{file_name}.png"
            figures.plot_curves(lp["history"], lp["metrics"]["best_epoch"], path,
                                f"{name}: chosen probe lr={c['lr']:g} l2={c['l2']:g} seed={c['seed']}")
            made.append((f"{name}: learning curves of the chosen probe (star: the best epoch, whose weights were kept)", path, False))
        lrs, l2s = list(config.get("lrs", [])), list(config.get("l2s", []))
        cells = _grid_cells(ledger, name, lrs, l2s)
        if cells:  # also without a choice: the figure then says which cells failed, diverged or did not run
            path = fig_dir / f"grid_{file_name}.png"
            label = figures.METRIC_LABELS.get(select, select)
            chosen = (lp["config"]["lr"], lp["config"]["l2"]) if lp is not None else None
            figures.plot_grid(cells, lrs, l2s, path, f"{name}: best {label} over seeds", metric=select, chosen=chosen)
            grids.append((f"{name}: {label} (the selection metric, --select {select}) over the lr x l2 grid; "
                          "red outline: the chosen probe", path, True))
        if lp is None:
            continue
        ft_hash = ledger.choice(name, "LP-FT")
        if ft_hash is not None:
            ft = _run(ledger, ft_hash)
            path = fig_dir / f"lpft_{file_name}.png"
            figures.plot_lpft(lp["history"], lp["metrics"]["best_epoch"], ft["history"], ft["metrics"]["best_epoch"], path,
                              f"{name}: LP, then fine-tune the last {_plural(ft['metrics']['n_trainable_layers'], 'layer')} "
                              f"(lr={ft['config']['lr']:g})")
            made.append((f"{name}: LP, then FT from the best probe (each phase on its own epoch axis and y range)", path, False))
    return made[:1] + grids + made[1:] if rows else grids + made


def _lpft_verdict(ledger: Ledger, rows: list[dict]) -> list[str]:
    """One HTML line per backbone with both choices tested: what LP-then-FT did (names and values escaped)."""
    e = html.escape
    lines = []
    by = {(r["backbone"], r["method"]): r for r in rows}
    for (name, method), lp in by.items():
        ft = by.get((name, "LP-FT"))
        if method != "LP" or ft is None or lp["test_acc"] is None or ft["test_acc"] is None:
            continue
        delta = 100 * (ft["test_acc"] - lp["test_acc"])
        verdict = "improved" if delta > 0 else "lowered" if delta < 0 else "did not change"
        lp_run = _run(ledger, ledger.choice(name, "LP") or "")
        lp_train_err = lp_run["history"][lp["best_epoch"]]["train_err"] if lp["best_epoch"] else None
        why = "" if lp_train_err is None else f"; the probe's train error at its best epoch was {lp_train_err:.3f}"
        noise = ""
        if ft["p_mcnemar"] is not None and ft["ci_low"] == ft["ci_high"] == 0:
            noise = " Paired on the same test images: right and wrong on exactly the same images, nothing to tell apart."
        elif ft["p_mcnemar"] is not None:
            real = ft["ci_low"] > 0 or ft["ci_high"] < 0
            noise = (f" Paired on the same test images: 95% bootstrap interval [{100 * ft['ci_low']:+.1f}, {100 * ft['ci_high']:+.1f}] "
                     f"points, McNemar p = {ft['p_mcnemar']:.3g}: {'more than' if real else 'within'} noise.")
        unit, n = (ft["ft_unit"] or f"layers:{ft['n_trainable_layers']}").split(":")
        layers = _plural(ft["n_trainable_layers"], "layer")
        if ft["n_trainable_layers"] == 1:  # the head is the last layer: nothing of the backbone trains
            what = "only the head (the probe's own layer; no backbone weight)"
        elif unit == "blocks":
            what = f"the last {e(_plural(n, 'block'))} ({layers})"
        else:
            what = f"the last {e(_plural(n, 'layer'))}"
        how = f"augmentation {e(str(ft['ft_augment']))}, L2-SP {ft['ft_l2sp']:g}, label smoothing {ft['label_smoothing']:g}"
        if ft["wise_alpha"] is None or ft["wise_alpha"] == 1:
            wise = "" if ft["wise_alpha"] is None else ", not interpolated with the probe (validation chose a = 1)"
        elif ft["wise_alpha"] == 0:
            wise = ", interpolation a = 0: validation chose the probe itself"
        else:
            wise = f", weights interpolated with the probe's at a = {ft['wise_alpha']:g}"
        lines.append(
            f"{e(name)}: fine-tuning {what} from the best probe ({how}{wise}) {verdict} test accuracy "
            f"({100 * lp['test_acc']:.1f}% &rarr; {100 * ft['test_acc']:.1f}%, {delta:+.1f} points; "
            f"val xent {lp['val_xent']:.4f} &rarr; {ft['val_xent']:.4f}, val err {lp['val_err']:.4f} &rarr; {ft['val_err']:.4f}, "
            f"best FT epoch {ft['best_epoch']} before interpolation{why}).{noise}"
        )
    return lines


def _optimizers(ledger: Ledger, rows: list[dict]) -> str:
    """What trained the chosen runs, from their own configs ("Adam", "SGD with momentum 0.9"; per method when
    they differ); the sweep's config when nothing was chosen."""
    def describe(cfg: dict) -> str:
        if cfg.get("optimizer", "adam") == "sgd":
            return f"SGD with momentum {cfg.get('momentum', 0.9):g}"
        return "Adam"

    by_method: dict[str, set[str]] = {}
    for r in rows:
        run_hash = ledger.choice(r["backbone"], r["method"])
        if run_hash is not None:
            by_method.setdefault(r["method"], set()).add(describe(_run(ledger, run_hash)["config"]))
    if not by_method:
        return describe(ledger.get_meta("config", {}).get("train", {}))
    texts = {method: " / ".join(sorted(names)) for method, names in by_method.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{method}: {text}" for method, text in texts.items())


CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    ".wide{overflow-x:auto;max-width:100%}.wide table{font-size:85%}.wide td{white-space:nowrap}"  # scrolls inside its box
    "tr.best td{background:#eef6ee;font-weight:bold}td.model{text-align:left}"
    ".verdict{border:2px solid #8ab58a;border-radius:6px;padding:0 1em .5em;margin-bottom:2em}"
    ".warn{color:#8a4b00}details{margin:.6em 0}summary{cursor:pointer}"
    "figure{margin:1em 0}figcaption{color:#555;font-size:90%}.row{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}"
    "code,pre{background:#f6f6f6;padding:2px 4px;white-space:pre-wrap;word-break:break-all}"
)


def _pct_interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" [{100 * low:.1f}, {100 * high:.1f}]"


def verdict_html(rows: list[dict], select: str, n_test: int | None) -> str:
    """The report's opening section: the chosen models ranked by the selection metric, each one's test
    accuracy with its 95% interval and its paired test against the best, the test set's resolution, what
    ``export`` takes, one quotable sentence per comparison and the limit warnings (names escaped)."""
    e = html.escape
    criterion = METRIC_TEXT.get(select, select)
    parts = ['<section class="verdict" id="verdict"><h2>Verdict: which model, and is the difference real?</h2>']
    if not rows:
        parts.append("<p>No model was chosen yet: no (backbone, method) has a finished run of this grid.</p></section>")
        return "\n".join(parts)
    ordered = sorted(rows, key=lambda r: r["rank"])
    best = ordered[0]
    parts.append(f"<p>Ranked by {e(criterion)} (--select {e(select)}), the rule that chose every epoch, configuration and "
                 "interpolation; the test split played no part in the ranking. Test accuracy with its 95% Wilson interval; "
                 "every other model against the best on the same test images: the accuracy difference with its 95% paired "
                 "bootstrap interval and McNemar's exact p.</p>")
    parts.append("<table><tr><th>rank</th><th>model</th><th>val xent</th><th>val err</th><th>test acc % [95% CI]</th>"
                 "<th>vs best, points [95% CI]</th><th>McNemar p</th><th>limits</th></tr>")
    for r in ordered:
        acc = "–" if r["test_acc"] is None else f"{100 * r['test_acc']:.1f}{_pct_interval(r['test_acc_ci_low'], r['test_acc_ci_high'])}"
        if r is best:
            vs, p = "best", ""
        elif r["diff_vs_best"] is None:
            vs, p = "not paired", "–"
        else:
            vs = f"{100 * r['diff_vs_best']:+.1f} [{100 * r['ci_low_vs_best']:+.1f}, {100 * r['ci_high_vs_best']:+.1f}]"
            p = f"{r['p_vs_best']:.2g}"
        limits = f'<span class="warn">{len(r["warnings"])} warning(s)</span>' if r["warnings"] else "none"
        parts.append(f'<tr{" class=best" if r is best else ""}><td>{r["rank"]}</td><td class="model">{e(model_name(r))}</td>'
                     f"<td>{e(_fmt(r['val_xent']))}</td><td>{e(_fmt(r['val_err']))}</td><td>{acc}</td><td>{vs}</td><td>{p}</td>"
                     f"<td>{limits}</td></tr>")
    parts.append("</table>")
    if n_test:
        parts.append(f"<p>{e(resolution_sentence(n_test))}</p>")
    if best.get(select) is not None:
        parts.append(f"<p><b>{e(export_sentence(best, select))}</b></p>")
    sentences = [comparison_sentence(r, best) for r in ordered[1:]]
    if sentences:
        parts.append("<ul>" + "".join(f"<li>{e(t)}</li>" for t in sentences) + "</ul>")
    warned = [r for r in ordered if r["warnings"]]
    if warned:
        parts.append("<p>Limits reached (a choice at the edge of what was tried):</p><ul class=warn>"
                     + "".join(f"<li>{e(model_name(r))}: {e('; '.join(r['warnings']))}</li>" for r in warned) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _n_test(ledger: Ledger, predictions: list[ModelPredictions | None], rows: list[dict]) -> int | None:
    """Test images behind the verdict: those of the best model's stored predictions, else the data summary's."""
    for r, pred in zip(rows, predictions):
        if r["rank"] == 1 and pred is not None:
            return len(pred.labels)
    test = ledger.get_meta("data_summary", {}).get("test") or {}
    return test.get("n")


def _table(rows: list[dict], keys: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[k]))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    return "; ".join(v) if isinstance(v, list) else _fmt(v, ".4g")


def render_html(ledger: Ledger, rows: list[dict], made: list[Figure], insights: str = "",
                predictions: list[ModelPredictions | None] | None = None) -> str:
    """The whole report page: the verdict first, then the LP vs LP-FT comparison, the chosen
    hyperparameters (compact; every column in a collapsible section), loss, data, figures, per-class insight."""
    data = ledger.get_meta("data_summary", {})
    command = ledger.get_meta("command", "")
    skipped = ledger.get_meta("skipped_backbones", {})
    select = ledger.get_meta("select", "val_xent")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title><style>{CSS}</style></head><body>",
             "<h1>transferlab report</h1>",
             verdict_html(rows, select, _n_test(ledger, predictions or [None] * len(rows), rows)),
             "<h2>Test accuracy: LP vs LP-then-FT</h2><table><tr><th>backbone</th><th>source</th><th>source top-1</th>"
             "<th>LP test acc % [95% CI]</th><th>LP-FT test acc % [95% CI]</th></tr>"]
    by = {(r["backbone"], r["method"]): r for r in rows}

    def acc(r: dict) -> str:
        return "–" if r.get("test_acc") is None else f"{100 * r['test_acc']:.1f}{_pct_interval(r['test_acc_ci_low'], r['test_acc_ci_high'])}"

    for name in dict.fromkeys(r["backbone"] for r in rows):
        lp, ft = by.get((name, "LP"), {}), by.get((name, "LP-FT"), {})
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(lp.get('source')))}</td><td>{html.escape(_fmt(lp.get('source_top1'), '.2f'))}</td>"
            f"<td>{acc(lp)}</td><td>{acc(ft)}</td></tr>"
        )
    parts.append("</table>")
    verdicts = _lpft_verdict(ledger, rows)
    if verdicts:
        parts.append("<h3>What LP-then-FT did</h3><ul>" + "".join(f"<li>{v}</li>" for v in verdicts) + "</ul>")
    parts.append("<h2>Chosen hyperparameters (on validation only)</h2><div class=wide>" + _table(rows, COMPACT_KEYS) + "</div>"
                 f"<details><summary>Every column of summary.json ({len(SUMMARY_KEYS)})</summary><div class=wide>"
                 + _table(rows, SUMMARY_KEYS) + "</div></details>")
    criterion = {"val_xent": "validation cross-entropy (ties: validation error)",
                 "val_err": "validation error (ties: validation cross-entropy)"}.get(select, select)
    parts.append(f"<h2>Loss</h2><pre>{html.escape(ledger.get_meta('objective', ''))}</pre><p>"
                 f"{html.escape(_optimizers(ledger, rows))}, minibatches. "
                 f"Selection criterion (--select {html.escape(select)}): {html.escape(criterion)}. It chose the early-stopping epoch (whose "
                 "weights are restored), the configuration of each grid and the weight interpolation after fine-tuning; "
                 "the test split is evaluated once, for each chosen configuration.</p>")
    parts.append(f"<h2>Data</h2><p>{html.escape(str(data.get('root', '')))}: {html.escape(str(data.get('n_classes', '?')))} classes</p>"
                 "<table><tr><th>split</th><th>source</th><th>images</th><th>per class (min–max)</th></tr>")
    for split in ("train", "val", "test"):
        if split in data:
            pc = data[split]["per_class"]
            parts.append(f"<tr><td>{split}</td><td>{html.escape(str(data[split]['source']))}</td><td>{html.escape(str(data[split]['n']))}</td>"
                         f"<td>{html.escape(str(min(pc)))}–{html.escape(str(max(pc)))}</td></tr>")
    parts.append("</table><p>Classes: " + html.escape(", ".join(data.get("classes", []))) + "</p>")
    bad = {name: ledger.get_meta(f"skipped_files:{name}", {}) for name in ledger.get_meta("backbones", [])}
    bad_files = sorted({f for per_split in bad.values() for files in per_split.values() for f in files})
    if bad_files:
        parts.append(f"<p>Skipped {len(bad_files)} unreadable image(s) (--on-bad-image skip): "
                     + html.escape(", ".join(bad_files)) + "</p>")
    if skipped:
        parts.append("<h2>Skipped backbones</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in skipped.items()) + "</ul>")
    parts.append("<h2>Figures</h2>")
    k = 0
    while k < len(made):
        caption, path, small = made[k]
        if not small:
            parts.append(_img(path, caption))
            k += 1
            continue
        row = []
        while k < len(made) and made[k][2]:
            row.append(_img(made[k][1], made[k][0], width=370))
            k += 1
        parts.append("<div class=row>" + "".join(row) + "</div>")
    parts.append(insights)
    parts.append(f"<h2>Reproduce</h2><pre>{html.escape(command)}</pre></body></html>")
    return "\n".join(parts)


def same_predictions(a: dict, b: dict, atol: float = 1e-6) -> bool:
    """Whether two stored prediction files say the same thing: same images and labels, the same predicted
    class for every image and probabilities within `atol` (LP-FT that kept the probe, a = 0, is the probe)."""
    import numpy as np

    return same_predicted_classes(a, b) and bool(np.abs(a["probs"] - b["probs"]).max(initial=0.0) <= atol)


def same_predicted_classes(a: dict, b: dict) -> bool:
    """Whether two stored prediction files predict the same class for every one of the same images: their
    per-class numbers, confusion matrices and misclassified images are then identical (calibration may not be)."""
    import numpy as np

    return (a["files"] == b["files"] and a["classes"] == b["classes"] and np.array_equal(a["labels"], b["labels"])
            and a["probs"].shape == b["probs"].shape and np.array_equal(a["probs"].argmax(1), b["probs"].argmax(1)))


def _insights(ledger: Ledger, out: Path, rows: list[dict]) -> str:
    """Per-class insight of every chosen run whose per-image test predictions were stored, each in a
    collapsible section. Runs that predict the same class for every test image (same_predicted_classes)
    share one section that names them all: its per-class numbers, confusion matrix and misclassified images
    are theirs alike, and where their probabilities differ, each one's calibration error is given. Every
    run's own files are still written, to insight/<backbone>_<method>/."""
    from transferlab.core.predictions import read_test_predictions, sweep_predictions_path
    from transferlab.reporting.insight import insight, insight_html

    groups: list[tuple[dict, list[tuple[dict, Path, dict]]]] = []  # (first predictions, [(row, file, predictions)])
    for r in rows:
        run_hash = ledger.choice(r["backbone"], r["method"])
        path = sweep_predictions_path(out, run_hash) if run_hash else None
        if path is None or not path.is_file():
            continue
        pred = read_test_predictions(path)
        twin = next((g for g in groups if same_predicted_classes(g[0], pred)), None)
        if twin is not None:
            twin[1].append((r, path, pred))
        else:
            groups.append((pred, [(r, path, pred)]))
    parts = []
    for first, members in groups:
        names = " and ".join(model_name(r) for r, _, _ in members)
        fragment = ""
        for r, path, _pred in members:
            folder = out / "insight" / f"{safe_filename(r['backbone'])}_{r['method']}"  # METHODS are plain names
            own = insight_html(path, folder, names if len(members) == 1 else model_name(r))
            fragment = fragment or own  # the section shows the first model's figures
        r0 = members[0][0]
        same = ""
        if len(members) > 1:
            identical = all(same_predictions(first, pred) for _, _, pred in members[1:])
            same = (f" (identical test predictions: this section applies to {len(members)} models)" if identical else
                    f" (the same predicted class on every test image: the per-class numbers apply to {len(members)} models)")
            if not identical:
                eces = ", ".join(f"{model_name(r)} {insight(path)['ece']:.4f}" for r, path, _ in members)
                fragment = (f"<p>Calibration differs: the reliability diagram below is {html.escape(model_name(r0))}'s; "
                            f"expected calibration error of each: {html.escape(eces)}.</p>") + fragment
        acc = "" if r0["test_acc"] is None else f": test accuracy {100 * r0['test_acc']:.1f}%"
        is_best = any(r["rank"] == 1 for r, _, _ in members)  # the chosen model's section is open
        parts.append(f"<details{' open' if is_best else ''}><summary>{html.escape(names)}{acc}{html.escape(same)}; per-class recall and precision, "
                     f"confusion matrix, reliability, misclassified images</summary>{fragment}</details>")
    return ("<h2>Per-class insight (test)</h2>\n" + "\n".join(parts) + "\n") if parts else ""


def build_report(out: str | Path) -> list[dict]:
    """Write summary.json, summary.csv, figures/*.png and report.html from ``out/ledger.sqlite``."""
    out = Path(out)
    path = out / "ledger.sqlite"
    if not path.is_file():
        raise UserError(f"{out}: no ledger.sqlite here (is it a sweep's output folder?)")
    ledger = Ledger(path, readonly=True)
    try:
        rows = summary_rows(ledger, out)
        write_json(out / "summary.json", rows)
        _write_csv(out / "summary.csv", rows)
        made = _draw(ledger, out, rows)
        page = render_html(ledger, rows, made, _insights(ledger, out, rows), chosen_predictions(ledger, out, rows))
        atomic_write_bytes(out / "report.html", page.encode())
    finally:
        ledger.close()
    # The folder shows this report's figures and insight only, not those of an earlier grid or backbone list.
    _prune(out / "figures", {path.name for _caption, path, _small in made}, files=True)
    _prune(out / "insight", {f"{safe_filename(r['backbone'])}_{r['method']}" for r in rows}, files=False)
    return rows


def _prune(folder: Path, keep: set[str], files: bool) -> None:
    """Remove the report's own outputs in `folder` (PNG files, or insight folders) not named in `keep`."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if files and entry.is_file() and entry.suffix == ".png":
            entry.unlink()
        elif not files and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)

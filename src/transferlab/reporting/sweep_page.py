"""The HTML page of a sweep's report: the verdict first, then LP against LP-then-FT, the chosen
hyperparameters, the loss, the data, the figures (inline), the per-class insight and the command to
reproduce it. Every name and value from the ledger reaches the page escaped."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from transferlab.reporting.extra_sets import extra_sets_html
from transferlab.reporting.summary import SUMMARY_KEYS, finished_run
from transferlab.reporting.sweep_figures import Figure, plural
from transferlab.reporting.verdict import (
    METRIC_TEXT,
    ModelPredictions,
    comparison_sentence,
    export_sentence,
    model_name,
    resolution_sentence,
)
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import read_backbone, read_manifest

# The columns of the report's compact table (the full table, every key, is in a collapsible section).
COMPACT_KEYS = ("backbone", "method", "lr", "l2", "seed", "n_trainable_layers", "best_epoch", "val_xent", "val_err",
                "test_acc", "ft_unit", "ft_augment", "wise_alpha", "n_seeds")


def _img(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure{style}><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(alt)}</figcaption></figure>')


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


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
        lp_run = finished_run(ledger, ledger.choice(name, "LP") or "")
        lp_train_err = lp_run["history"][lp["best_epoch"]]["train_err"] if lp["best_epoch"] else None
        why = "" if lp_train_err is None else f"; the probe's train error at its best epoch was {lp_train_err:.3f}"
        noise = ""
        if ft["p_mcnemar"] is not None and ft["ci_low"] == ft["ci_high"] == 0:
            noise = " Paired on the same test images: right and wrong on exactly the same images, nothing to tell apart."
        elif ft["p_mcnemar"] is not None:
            real = ft["ci_low"] > 0 or ft["ci_high"] < 0
            noise = (f" Paired on the same test images: 95% bootstrap interval [{100 * ft['ci_low']:+.1f}, {100 * ft['ci_high']:+.1f}] "
                     f"points, McNemar p = {ft['p_mcnemar']:.3g}: {'more than' if real else 'within'} noise.")
        unit, n = (ft["ft_unit"] or f"layers:{ft['n_trainable_layers']}").split(":", 1)
        layers = plural(ft["n_trainable_layers"], "layer")
        if ft["n_trainable_layers"] == 1:  # the head is the last layer: nothing of the backbone trains
            what = "only the head (the probe's own layer; no backbone weight)"
        elif unit == "blocks" and n == "all":
            what = f"every block, the whole network ({layers})"
        elif unit == "blocks" and n.startswith("from:"):
            what = f"the blocks from block {e(n[5:])} on ({layers})"
        elif unit == "blocks":
            what = f"the last {e(plural(n, 'block'))} ({layers})"
        else:
            what = f"the last {e(plural(n, 'layer'))}"
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
        decay = cfg.get("weight_decay", 0.0)
        decay_text = f", weight decay {decay:g} on backbone weights" if decay else ""
        layers = f", layer-wise lr decay {cfg['layer_decay']:g}" if cfg.get("layer_decay", 1.0) != 1.0 else ""
        if cfg.get("optimizer", "adam") == "sgd":
            nesterov = "Nesterov " if cfg.get("nesterov") else ""
            return f"SGD with {nesterov}momentum {cfg.get('momentum', 0.9):g}{decay_text}{layers}"
        if cfg.get("optimizer") == "adamw":
            return f"AdamW (decoupled{decay_text or ', no weight decay'}){layers}"
        return f"Adam{decay_text}{layers}"

    by_method: dict[str, set[str]] = {}
    for r in rows:
        run_hash = ledger.choice(r["backbone"], r["method"])
        if run_hash is not None:
            by_method.setdefault(r["method"], set()).add(describe(finished_run(ledger, run_hash)["config"]))
    if not by_method:
        return describe({k: v[0] for k, v in read_manifest(ledger).phase("lp").items() if len(v) == 1})
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
    test = read_manifest(ledger).data_summary.get("test") or {}
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
    manifest = read_manifest(ledger)
    columns = tuple(rows[0]) if rows else SUMMARY_KEYS  # with extra test sets, their columns too
    data, command, skipped, select = manifest.data_summary, manifest.command, manifest.skipped_backbones, manifest.select
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title><style>{CSS}</style></head><body>",
             "<h1>transferlab report</h1>",
             verdict_html(rows, select, _n_test(ledger, predictions or [None] * len(rows), rows))]
    with_ft = any(r["method"] == "FT" for r in rows)  # FT columns only where the sweep ran FT (--ft)
    parts.append(("<h2>Test accuracy: LP vs FT vs LP-then-FT</h2>" if with_ft else "<h2>Test accuracy: LP vs LP-then-FT</h2>")
                 + "<table><tr><th>backbone</th><th>source</th><th>source top-1</th><th>LP test acc % [95% CI]</th>"
                 + ("<th>FT test acc % [95% CI]</th>" if with_ft else "") + "<th>LP-FT test acc % [95% CI]</th></tr>")
    by = {(r["backbone"], r["method"]): r for r in rows}

    def acc(r: dict) -> str:
        return "–" if r.get("test_acc") is None else f"{100 * r['test_acc']:.1f}{_pct_interval(r['test_acc_ci_low'], r['test_acc_ci_high'])}"

    for name in dict.fromkeys(r["backbone"] for r in rows):
        lp, ft = by.get((name, "LP"), {}), by.get((name, "LP-FT"), {})
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(lp.get('source')))}</td><td>{html.escape(_fmt(lp.get('source_top1'), '.2f'))}</td>"
            f"<td>{acc(lp)}</td>" + (f"<td>{acc(by.get((name, 'FT'), {}))}</td>" if with_ft else "") + f"<td>{acc(ft)}</td></tr>"
        )
    parts.append("</table>")
    if manifest.ood:
        parts.append(extra_sets_html(manifest, rows))
    verdicts = _lpft_verdict(ledger, rows)
    if verdicts:
        parts.append("<h3>What LP-then-FT did</h3><ul>" + "".join(f"<li>{v}</li>" for v in verdicts) + "</ul>")
    parts.append("<h2>Chosen hyperparameters (on validation only)</h2><div class=wide>" + _table(rows, COMPACT_KEYS) + "</div>"
                 f"<details><summary>Every column of summary.json ({len(columns)})</summary><div class=wide>"
                 + _table(rows, columns) + "</div></details>")
    criterion = {"val_xent": "validation cross-entropy (ties: validation error)",
                 "val_err": "validation error (ties: validation cross-entropy)"}.get(select, select)
    parts.append(f"<h2>Loss</h2><pre>{html.escape(manifest.objective)}</pre><p>"
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
    bad = {name: read_backbone(ledger, name).skipped_files for name in manifest.backbones}
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

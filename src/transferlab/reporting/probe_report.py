"""The report of a single probe (or last-k-layers fine-tune): ``OUT/report.html``, rebuilt from its files alone.

Inputs: ``OUT/run.json`` (the run record) and, when the run had a test split, ``OUT/test_predictions.json``
(the per-image predictions of its one test evaluation). Outputs: ``curves.png`` (drawn from the record's
history), the per-class insight (``insight/`` and ``insight.html``) and one self-contained page,
``report.html`` (images inline), opening on the verdict for the run: its test accuracy with a 95% Wilson
interval recomputed from the predictions, the test set's resolution, and the warnings where a choice
sits at a limit. Torch-free, like the rest of ``reporting``; every name and value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core.errors import UserError
from transferlab.core.files import atomic_write_bytes
from transferlab.reporting.verdict import resolution_sentence, wilson_interval
from transferlab.train.limits import probe_warnings

RECORD_FILE = "run.json"
PREDICTIONS_FILE = "test_predictions.json"
REPORT_FILE = "report.html"


def is_probe_folder(out: str | Path) -> bool:
    """Whether `out` holds a probe's run record."""
    return (Path(out) / RECORD_FILE).is_file()


def read_record(out: str | Path) -> dict:
    """The run record ``out/run.json``; a UserError naming the file when it is missing or unreadable."""
    path = Path(out) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (is {out} a probe's output folder?)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable run record ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(record, dict) or "history" not in record or "backbone" not in record:
        raise UserError(f"{path}: not a transferlab run record (no history or backbone)")
    return record


def curves_title(record: Mapping[str, Any]) -> str:
    """The title of a probe's curves figure: backbone, lr, l2, seed and the number of trainable layers."""
    train = record["config"]["train"]
    return (f"{record['backbone']['name']}  lr={train['lr']:g} l2={train['l2']:g} seed={train['seed']}  "
            f"k={record['n_trainable_layers']}")


def accuracy_with_interval(predictions_file: str | Path) -> dict:
    """The test verdict of one run from its stored predictions: images, correct ones (prediction = argmax,
    ties to the lower label), accuracy and its 95% Wilson interval (None for an empty test set)."""
    from transferlab.core.predictions import read_test_predictions

    d = read_test_predictions(predictions_file)
    n = int(len(d["labels"]))
    correct = int((np.argmax(d["probs"], axis=1) == d["labels"]).sum()) if n else 0
    low, high = wilson_interval(correct, n) if n else (None, None)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci_low": low, "ci_high": high}


def build_probe_report(out: str | Path) -> Path:
    """Write ``curves.png``, the per-class insight (with a test split) and ``report.html`` into `out` from
    its ``run.json`` and ``test_predictions.json``; returns the report's path."""
    from transferlab.reporting import figures
    from transferlab.reporting.insight import insight_html

    out = Path(out)
    record = read_record(out)
    figures.plot_curves(record["history"], record["best_epoch"], out / "curves.png", curves_title(record))
    predictions = out / PREDICTIONS_FILE
    numbers, insight = None, ""
    if predictions.is_file():
        numbers = accuracy_with_interval(predictions)
        insight = insight_html(predictions, out / "insight", record["backbone"]["name"])
        atomic_write_bytes(out / "insight.html", _insight_page(insight, record["backbone"]["name"]).encode())
    page = render_probe_html(record, (out / "curves.png").read_bytes(), numbers, insight)
    atomic_write_bytes(out / REPORT_FILE, page.encode())
    return out / REPORT_FILE


# -- the page -------------------------------------------------------------------------------------
STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    "figure{margin:1em 0}figcaption{color:#555;font-size:90%}code,pre{background:#f6f6f6;padding:2px 4px;"
    "white-space:pre-wrap;word-break:break-all}.verdict{border-left:4px solid #2b6cb0;padding:.2em 1em;background:#f5f9fd}"
    ".warn{color:#9c4400}.groups{display:flex;flex-wrap:wrap;gap:0 2em}table.kv td{text-align:left}"
    "table.kv td:last-child{max-width:420px;word-break:break-all}"
)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _value(v: Any) -> str:
    """A config value as the page shows it: JSON for lists and null, else its text (escaped by the caller)."""
    if v is None or isinstance(v, (list, tuple, dict, bool)):
        return json.dumps(v)
    return format(v, "g") if isinstance(v, float) else str(v)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] | None = None) -> str:
    e = html.escape
    head = f"<tr><th>{e(header[0])}</th><th>{e(header[1])}</th></tr>" if header else ""
    return "<table class='kv'>" + head + "".join(f"<tr><td>{e(k)}</td><td>{e(_value(v))}</td></tr>" for k, v in rows) + "</table>"


def _verdict(record: Mapping[str, Any], numbers: dict | None) -> list[str]:
    e = html.escape
    train = record["config"]["train"]
    name = record["backbone"]["name"]
    status = record.get("status", "done")
    lines = []
    if numbers is not None and numbers["n"]:
        lines.append(f"<p><b>Test accuracy {_pct(numbers['accuracy'])}</b> ({numbers['correct']} of {numbers['n']} test images), "
                     f"95% Wilson interval [{_pct(numbers['ci_low'])}, {_pct(numbers['ci_high'])}].</p>")
        lines.append(f"<p>{e(resolution_sentence(numbers['n']))}</p>")
    elif status != "done":
        lines.append(f"<p><b>The run {e(str(status))}</b>: no test evaluation.</p>")
    else:
        lines.append("<p><b>No test split</b>: no test accuracy (validation numbers only).</p>")
    select = train.get("select", "val_xent")
    lines.append(f"<p>{e(name)}, {record['n_trainable_layers']} trainable layer(s) ({record['trainable_params']:,} parameters): "
                 f"best epoch {record['best_epoch']} of the {record.get('epochs_run', '?')} run (--epochs {train['epochs']}, "
                 f"--patience {train['patience']}, early stopping on {e(select)}), val cross-entropy {_fmt(record.get('val_xent'))}, "
                 f"val error {_fmt(record.get('val_err'))}."
                 + (" The test split is evaluated once, for the best epoch's weights." if numbers is not None else "") + "</p>")
    warnings = record.get("warnings")
    if warnings is None:  # a record written before warnings were recorded
        warnings = probe_warnings(record.get("best_epoch"), train.get("epochs"), record.get("epochs_run"), train.get("patience"))
    if warnings:
        lines.append("<ul class='warn'>" + "".join(f"<li>warning: {e(w)}</li>" for w in warnings) + "</ul>")
    elif status == "done":
        lines.append(f"<p>No warnings. {e(_what_stopped(record))}</p>")
    return lines


def _what_stopped(record: Mapping[str, Any]) -> str:
    """Whether early stopping or the epoch cap ended the run (a best epoch just below the cap is no warning,
    but the reader should know the cap, not early stopping, ended the run)."""
    train = record["config"]["train"]
    best, run, cap = record.get("best_epoch"), record.get("epochs_run"), train["epochs"]
    if best is None or run is None:
        return ""
    if run < cap or run - best >= train["patience"]:
        return f"Early stopping ended the run at epoch {run}, {run - best} epoch(s) after the best (--patience {train['patience']})."
    return (f"The epoch cap ended the run (epoch {run} of --epochs {cap}), {run - best} epoch(s) after the best, "
            f"before early stopping (--patience {train['patience']}) would have.")


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}"


def _config_groups(record: Mapping[str, Any]) -> str:
    cfg = record["config"]
    model = [(k, v) for k, v in cfg.items() if not isinstance(v, dict)]
    groups = [("model", model)] + [(name, list(cfg[name].items())) for name in ("data", "train", "engine") if isinstance(cfg.get(name), dict)]
    return "<div class='groups'>" + "".join(f"<div><h3>{html.escape(title)}</h3>{_table(rows)}</div>" for title, rows in groups) + "</div>"


def _model(record: Mapping[str, Any]) -> str:
    e = html.escape
    b = record["backbone"]
    runtime = record.get("runtime") or {}
    rows: list[tuple[str, Any]] = [
        ("backbone", b["name"]), ("zoo / architecture", f"{b.get('zoo')} / {b.get('arch')}"),
        ("source", f"{b.get('source')} (top-1 {_value(b.get('source_top1'))})"), ("weights", b.get("weights")),
        ("weights digest", b.get("weights_digest")), ("trainable parameters", f"{record['trainable_params']:,}"),
        ("frozen layers cached", f"{record.get('cached')} (cut: {record.get('cache_cut')})"),
        ("frozen layers run by", " ".join(str(runtime.get(k, "")) for k in ("name", "version", "precision")).strip() or "eager PyTorch"),
        ("device", record.get("device")),
    ]
    parts = [_table(rows)]
    for notice in (record.get("notice"), runtime.get("notice")):
        if notice:
            parts.append(f"<p>{e(str(notice))}</p>")
    layers = record.get("trainable_layers", [])
    parts.append(f"<details><summary>{len(layers)} trainable layer(s)</summary><pre>{e(chr(10).join(layers))}</pre></details>")
    parts.append(f"<p>Loss:</p><pre>{e(str(record.get('objective', '')))}</pre>")
    return "\n".join(parts)


def _data(record: Mapping[str, Any]) -> str:
    e = html.escape
    data = record.get("data", {})
    parts = [f"<p>{e(str(data.get('root', '')))}: {e(str(data.get('n_classes', '?')))} classes</p>",
             "<table><tr><th>split</th><th>source</th><th>images</th><th>per class (min–max)</th></tr>"]
    for split in ("train", "val", "test"):
        if split in data:
            pc = data[split]["per_class"]
            span = f"{min(pc)}–{max(pc)}" if pc else "–"
            parts.append(f"<tr><td>{split}</td><td>{e(str(data[split]['source']))}</td><td>{e(str(data[split]['n']))}</td>"
                         f"<td>{e(span)}</td></tr>")
    parts.append("</table><p>Classes: " + e(", ".join(map(str, data.get("classes", [])))) + "</p>")
    skipped = sorted({f for files in (record.get("skipped_files") or {}).values() for f in files})
    if skipped:
        parts.append(f"<p>Skipped {len(skipped)} unreadable image(s) (--on-bad-image skip): {e(', '.join(skipped))}</p>")
    if data.get("ignored_files"):
        parts.append(f"<p>{e(str(data['ignored_files']))} file(s) in the folders are not images and were ignored.</p>")
    return "\n".join(parts)


def render_probe_html(record: Mapping[str, Any], curves_png: bytes, numbers: dict | None, insight: str = "") -> str:
    """The self-contained page of one run: the verdict, the curves, the model, the data, the config,
    the per-class insight (`insight`, an HTML fragment), the timings and the command that reproduces it."""
    e = html.escape
    name = record["backbone"]["name"]
    curves = base64.b64encode(curves_png).decode()
    timings = [(k, f"{v:.2f} s") for k, v in (record.get("timings") or {}).items() if isinstance(v, (int, float))]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>transferlab probe: {e(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>transferlab probe: {e(name)}</h1>",
        "<h2>Verdict</h2><div class='verdict'>", *_verdict(record, numbers), "</div>",
        "<h2>Learning curves</h2>",
        f"<figure><img alt='learning curves' src='data:image/png;base64,{curves}'><figcaption>Train loss, train error, val "
        "cross-entropy and val error per epoch (epoch 0: the untrained head); the star marks the best epoch, whose weights "
        "were kept.</figcaption></figure>",
        "<h2>Model</h2>", _model(record),
        "<h2>Data</h2>", _data(record),
        "<h2>Configuration</h2>", _config_groups(record),
    ]
    if insight:
        parts += ["<h2>Per-class insight (test)</h2>", insight]
    parts += ["<h2>Timings</h2>", _table(timings)]
    if record.get("command"):  # records written before the command was recorded have none
        parts.append(f"<h2>Reproduce</h2><pre>{e(str(record['command']))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _insight_page(fragment: str, title: str) -> str:
    """``insight.html``: the insight fragment as a page of its own (the wrapper of insight.insight_page, around a
    fragment already made, so the figures and thumbnails are drawn once for both pages)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or 'transferlab')} insight</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
            f"img{{max-width:100%}}</style></head><body>\n{fragment}\n</body></html>\n")

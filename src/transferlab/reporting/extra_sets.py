"""The chosen models on the sweep's extra (out-of-distribution) test sets: each row's accuracy there with its
95% Wilson interval, and the paired comparison with LP of the same backbone on the same images."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from transferlab.core.predictions import ood_predictions_path, read_test_predictions
from transferlab.reporting.compare import paired_comparison
from transferlab.reporting.verdict import wilson_interval
from transferlab.sweep.ledger import Ledger, Method
from transferlab.sweep.manifest import SweepManifest

SUFFIXES = ("acc", "ci_low", "ci_high", "diff_vs_lp", "ci_low_vs_lp", "ci_high_vs_lp", "p_vs_lp")


def extra_keys(manifest: SweepManifest) -> tuple[str, ...]:
    """The summary columns of the extra test sets, ``ood_<name>_acc`` and its interval and paired numbers
    (none without extra sets, so such a sweep's summary has exactly the columns it always had)."""
    return tuple(f"ood_{name}_{s}" for name in manifest.ood for s in SUFFIXES)


def extra_columns(ledger: Ledger, out: Path | None, manifest: SweepManifest, backbone: str, method: Method) -> dict:
    """The extra-set columns of one summary row (None where a number is not there)."""
    values: dict = {}
    h, lp = ledger.choice(backbone, method), ledger.choice(backbone, "LP")
    for name, info in manifest.ood.items():
        row = dict.fromkeys((f"ood_{name}_{s}" for s in SUFFIXES), None)
        mine = _predictions(ledger, out, name, info["digest"], h)
        if mine is not None:
            labels, pred = mine
            correct = int((pred == labels).sum())
            row[f"ood_{name}_acc"] = correct / len(labels)
            row[f"ood_{name}_ci_low"], row[f"ood_{name}_ci_high"] = wilson_interval(correct, len(labels))
            theirs = _predictions(ledger, out, name, info["digest"], lp) if method != "LP" else None
            if theirs is not None and np.array_equal(theirs[0], labels):
                c = paired_comparison(labels, theirs[1], pred)
                row.update({f"ood_{name}_diff_vs_lp": c.diff, f"ood_{name}_ci_low_vs_lp": c.ci_low,
                            f"ood_{name}_ci_high_vs_lp": c.ci_high, f"ood_{name}_p_vs_lp": c.p_mcnemar})
        values.update(row)
    return values


def _predictions(ledger: Ledger, out: Path | None, name: str, digest: str, run_hash: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, predicted classes) of a run's evaluation on the set's current images; None where there is none."""
    if out is None or run_hash is None or ledger.ood_accuracy(run_hash, name, digest) is None:
        return None
    path = ood_predictions_path(out, name, digest, run_hash)
    if not path.is_file():
        return None
    d = read_test_predictions(path)
    return d["labels"], d["probs"].argmax(1)


def extra_sets_html(manifest: SweepManifest, rows: list[dict]) -> str:
    """The in-distribution vs out-of-distribution table: one line per (backbone, method), the test split's
    accuracy and each extra set's, with 95% intervals and (FT, LP-FT) the paired difference from LP."""
    if not manifest.ood:
        return ""
    e = html.escape

    def cell(acc, low, high, diff=None, p=None) -> str:
        if acc is None:
            return "<td>n/a</td>"
        text = f"{100 * acc:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
        if diff is not None:
            text += f"<br><small>vs LP {100 * diff:+.1f} pt, McNemar p = {p:.2g}</small>"
        return f"<td>{text}</td>"

    head = "".join(f"<th>{e(n)} ({info.get('n', '?')} images) %</th>" for n, info in manifest.ood.items())
    lines = [f"<h2>In distribution vs out of distribution</h2><p>Every chosen model was evaluated once on each set below, after "
             f"every choice was made; no choice read them.</p><table><tr><th>backbone</th><th>method</th><th>test %</th>{head}</tr>"]
    for r in rows:
        cells = cell(r.get("test_acc"), r.get("test_acc_ci_low"), r.get("test_acc_ci_high"))
        for n in manifest.ood:
            cells += cell(r.get(f"ood_{n}_acc"), r.get(f"ood_{n}_ci_low"), r.get(f"ood_{n}_ci_high"),
                          r.get(f"ood_{n}_diff_vs_lp"), r.get(f"ood_{n}_p_vs_lp"))
        lines.append(f"<tr><td>{e(r['backbone'])}</td><td>{e(r['method'])}</td>{cells}</tr>")
    return "\n".join(lines) + "</table>"

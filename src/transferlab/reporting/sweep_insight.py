"""The per-class insight sections of a sweep's report: one collapsible section per chosen run with stored
test predictions, runs that predict the same class for every test image sharing one; each run's own
insight files go to OUT/insight/<backbone>_<method>/."""

from __future__ import annotations

import html
from pathlib import Path

from transferlab.core.files import safe_filename
from transferlab.reporting.verdict import model_name
from transferlab.sweep.ledger import Ledger


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


def insight_sections(ledger: Ledger, out: Path, rows: list[dict]) -> str:
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

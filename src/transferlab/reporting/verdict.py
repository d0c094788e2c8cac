"""Which (backbone, method) is best, and is the difference real? The answer a report opens on.

Pure numbers from stored results (numpy and scipy, no torch):
- the ranking of the chosen models by the selection metric (what ``export`` takes first), ties by
  the other metric, then sweep order;
- every model's test accuracy with a 95% Wilson score interval;
- every other model against the best on the same test images: the paired difference, its bootstrap
  interval and McNemar's exact p (``compare.paired_comparison``);
- warnings where a choice sits at a limit: the best epoch at the epoch cap, a chosen value at the
  edge of its grid, a weight interpolation that kept the probe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from transferlab.reporting.compare import paired_comparison
from transferlab.train.limits import EDGE_MARGIN, limit_warnings

__all__ = ["EDGE_MARGIN", "limit_warnings"]  # the limits of a run are the trainer's; the verdict shows them

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(n_correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion n_correct / n (95% for the default z).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n correct:
    centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n <= 0:
        raise ValueError("an accuracy interval needs at least one image")
    p = n_correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def selection_order(select: str, val_xent: float | None, val_err: float | None) -> tuple[float, float]:
    """The sort key of the selection metric (`select`), ties by the other; missing values sort last."""
    xent = math.inf if val_xent is None else val_xent
    err = math.inf if val_err is None else val_err
    return (err, xent) if select == "val_err" else (xent, err)


@dataclass(frozen=True)
class ModelPredictions:
    """One model's single test evaluation: the files, their labels and its predicted labels."""

    files: tuple[str, ...]
    labels: np.ndarray
    predicted: np.ndarray


def rank(rows: Sequence[Mapping], select: str) -> list[int]:
    """Indices of `rows` (each with val_xent, val_err) from best to worst under `select`, ties by position."""
    return sorted(range(len(rows)), key=lambda i: (*selection_order(select, rows[i].get("val_xent"), rows[i].get("val_err")), i))


def verdict_numbers(rows: Sequence[Mapping], predictions: Sequence[ModelPredictions | None], select: str) -> list[dict]:
    """Per row (same order as `rows`): rank, test accuracy interval and the paired test against the best.

    Keys: ``rank`` (1 = best under `select`), ``test_acc_ci_low``, ``test_acc_ci_high`` (None without
    test predictions), and for every row but the best ``diff_vs_best`` (this row's accuracy minus the
    best's), ``ci_low_vs_best``, ``ci_high_vs_best``, ``p_vs_best`` and ``n_differ_vs_best`` (the
    discordant images: right for one of the two, wrong for the other; None when the two were not tested
    on the same images).
    """
    order = rank(rows, select)
    best = order[0] if order else None
    out = []
    for i, pred in enumerate(predictions):
        entry: dict = {"rank": order.index(i) + 1, "test_acc_ci_low": None, "test_acc_ci_high": None,
                       "diff_vs_best": None, "ci_low_vs_best": None, "ci_high_vs_best": None, "p_vs_best": None,
                       "n_differ_vs_best": None}
        if pred is not None and len(pred.labels):
            correct = int((pred.predicted == pred.labels).sum())
            entry["test_acc_ci_low"], entry["test_acc_ci_high"] = wilson_interval(correct, len(pred.labels))
        ref = predictions[best] if best is not None else None
        if i != best and pred is not None and ref is not None and ref.files == pred.files and len(pred.labels):
            c = paired_comparison(ref.labels, ref.predicted, pred.predicted)
            entry.update(diff_vs_best=c.diff, ci_low_vs_best=c.ci_low, ci_high_vs_best=c.ci_high, p_vs_best=c.p_mcnemar,
                         n_differ_vs_best=c.only_a_right + c.only_b_right)
        out.append(entry)
    return out


def model_name(row: Mapping) -> str:
    return f"{row['backbone']} {row['method']}"


def comparison_sentence(row: Mapping, best: Mapping) -> str:
    """One quotable sentence on `row` against the best, from the paired numbers in `row`: which way the
    difference goes, on how many images the two disagree, its interval and McNemar's p, and the verdict."""
    if row.get("diff_vs_best") is None:
        return f"{model_name(row)} was not tested on the same images as {model_name(best)}: no paired comparison."
    differ = row.get("n_differ_vs_best")
    if differ == 0:
        return (f"{model_name(row)} and {model_name(best)} are right and wrong on exactly the same test images: "
                "this test set cannot tell them apart (no discordant image; the paired interval is 0 by construction).")
    diff, low, high, p = (100 * row["diff_vs_best"], 100 * row["ci_low_vs_best"], 100 * row["ci_high_vs_best"], row["p_vs_best"])
    way = "above" if diff > 0 else "below" if diff < 0 else "level with"
    size = f"{abs(diff):.1f} pt " if diff else ""
    images = "" if differ is None else f"{differ} discordant image{'s' if differ != 1 else ''}, "
    numbers = f"{images}95% CI [{low:+.1f}, {high:+.1f}] pt, McNemar p = {p:.2g}"
    head = f"{model_name(row)} is {size}{way} {model_name(best)} on this test set ({numbers})"
    if low > 0:
        return f"{head}: better, though validation ranked it lower."
    if high < 0:
        return f"{head}: a real difference."
    return f"{head}: they cannot be told apart."


METRIC_TEXT = {"val_xent": "validation cross-entropy", "val_err": "validation error"}


def export_sentence(best: Mapping, select: str) -> str:
    """Which model ``transferlab export`` takes from the sweep folder, and why."""
    other = "val_err" if select == "val_xent" else "val_xent"
    return (f"transferlab export takes {model_name(best)}: the lowest {METRIC_TEXT.get(select, select)} "
            f"({best[select]:.4f}) among the chosen models (--select {select}; ties: {METRIC_TEXT[other]}); "
            "the test split played no part in that choice.")


def resolution_sentence(n_test: int) -> str:
    """'300 test images: one image = 0.33 points' (100 images: '= 1 point')."""
    step = 100 / n_test
    points = f"{step:.2g}" if step < 10 else f"{step:.0f}"  # 2 significant digits, never '1e+02'
    return f"{n_test} test image{'s' if n_test != 1 else ''}: one image = {points} point{'' if points == '1' else 's'}."

"""Matplotlib figures drawn from run records (plain dicts), written as PNG files.

Every plotting function saves its PNG and returns the (closed) matplotlib figure, so a caller or a
test can read back what was drawn: axes limits, scales, marker positions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from transferlab.core.files import atomic_write_bytes

CURVE_PANELS = (
    ("train_loss", "train loss (xent + L2)"),
    ("train_err", "train error"),
    ("val_xent", "val cross-entropy"),
    ("val_err", "val error"),
)
LOG_RATIO = 10.0  # a positive curve whose max / min exceeds this is drawn on a log axis
MIN_ACCURACY_SPAN = 10.0  # points: an accuracy axis never zooms in further (one image must not look like a gap)
CONSTANT_RANGE = 1e-3  # colour range of a grid whose cells all hold one value: [v, v + this]
METHOD_MARKERS = {"LP": "o", "FT": "s", "LP-FT": "^"}
METRIC_LABELS = {"val_err": "val error", "val_xent": "val cross-entropy"}


def _plain(text: str) -> str:
    """`text` as matplotlib should print it: a backbone name with '$' is not mathtext."""
    return text.replace("$", r"\$")


def _save(fig: Figure, path: str | Path) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None and math.isfinite(h[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def wants_log(values: Sequence[float], ratio: float = LOG_RATIO) -> bool:
    """Whether a curve needs a log axis: all values positive and max / min above `ratio` (losses spanning
    decades are flat on a linear axis after the first epochs)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > ratio


def plot_curves(history: Sequence[Mapping[str, Any]], best_epoch: int, path: str | Path, title: str = "") -> Figure:
    """Four panels (train loss, train err, val xent, val err) per epoch; a star marks the early stop;
    the loss panels go on a log axis where the loss spans more than a decade (:func:`wants_log`)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2), layout="constrained")
    best = next((h for h in history if h["epoch"] == best_epoch), None)
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        xs, ys = _series(history, key)
        ax.plot(xs, ys, "-", color="C0" if key.startswith("train") else "C1", lw=1.5)
        if best is not None and best.get(key) is not None:
            ax.plot([best_epoch], [best[key]], "*", color="C3", ms=14, label=f"best epoch {best_epoch}")
            ax.legend(loc="best", fontsize=8)
        if key in ("train_loss", "val_xent") and wants_log(ys):
            ax.set_yscale("log")
            label += " (log)"
        ax.set_xlabel("epoch")
        _no_negative_axis(ax, ys)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(_plain(title), fontsize=11)
    return _save(fig, path)


def plot_lpft(lp_history: Sequence[Mapping[str, Any]], lp_best: int, ft_history: Sequence[Mapping[str, Any]], ft_best: int,
              path: str | Path, title: str = "") -> Figure:
    """LP, then FT from the restored best probe: for val cross-entropy and val error, one panel per phase,
    each on its own epoch axis ("epochs since the start of that phase"; FT epoch 0 is the best probe) and
    its own y range, so that a short fine-tuning phase and its small changes are as legible as the probe's
    curve; a dashed line in the FT panel marks the best probe's value (where FT started)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2), layout="constrained")
    for pair, (key, label) in enumerate((("val_xent", "val cross-entropy"), ("val_err", "val error"))):
        ax_lp, ax_ft = axes[2 * pair], axes[2 * pair + 1]
        xs, ys = _series(lp_history, key)
        fx, fy = _series(ft_history, key)
        ax_lp.plot(xs, ys, "-", color="C0", label="LP")
        best_lp = next((h for h in lp_history if h["epoch"] == lp_best), None)
        if best_lp is not None and best_lp.get(key) is not None:
            ax_lp.plot([lp_best], [best_lp[key]], "*", color="C3", ms=12, label=f"best probe (epoch {lp_best})")
            ax_ft.axhline(best_lp[key], color="grey", ls="--", lw=1, label=f"best probe: {best_lp[key]:.4g}")
        ax_ft.plot(fx, fy, "-o", color="C2", ms=4, label="FT")
        best_ft = next((h for h in ft_history if h["epoch"] == ft_best), None)
        if best_ft is not None and best_ft.get(key) is not None:
            ax_ft.plot([ft_best], [best_ft[key]], "*", color="C3", ms=12, label=f"FT best (epoch {ft_best}): {best_ft[key]:.4g}")
        lp_label = label
        if key == "val_xent" and wants_log(ys):
            ax_lp.set_yscale("log")
            lp_label += " (log)"
        ax_lp.set_xlabel("LP epoch")
        ax_ft.set_xlabel("FT epoch (0 = the best probe)")
        ax_lp.set_title(f"{lp_label}: LP", fontsize=10)
        ax_ft.set_title(f"{label}: then FT", fontsize=10)
        for ax, values in ((ax_lp, ys), (ax_ft, fy)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="best")
            _no_negative_axis(ax, values)
        level = [v for v in fy if v is not None] or [0.0]
        at_least_span(ax_ft, FT_MIN_SPAN_XENT * abs(sum(level) / len(level)) if key == "val_xent" else FT_MIN_SPAN_ERR)
    if title:
        fig.suptitle(_plain(title), fontsize=11)
    return _save(fig, path)


# The fine-tuning panels' smallest y span: 10% of the cross-entropy's level, 2 points of error; a change in
# the fourth digit then looks like one, not like a cliff.
FT_MIN_SPAN_XENT = 0.10
FT_MIN_SPAN_ERR = 0.02


def at_least_span(ax, span: float) -> None:
    """Widen a linear y axis to at least `span` around its middle (never below 0): an axis must not zoom to noise."""
    bottom, top = ax.get_ylim()
    if ax.get_yscale() != "linear" or span <= 0 or top - bottom >= span:
        return
    middle = (top + bottom) / 2
    low = max(0.0, middle - span / 2) if bottom >= 0 else middle - span / 2
    ax.set_ylim(low, low + span)


def _no_negative_axis(ax, values: Sequence[float]) -> None:
    """A flat curve of errors at 0 must not get a y axis from -0.04: start it at 0 (a curve that only
    touches 0 keeps matplotlib's small margin below, so its markers stay whole)."""
    bottom, top = ax.get_ylim()
    if ax.get_yscale() == "linear" and values and min(values) == max(values) >= 0 > bottom:
        ax.set_ylim(0.0, top)


def accuracy_ylim(lows: Sequence[float], highs: Sequence[float], min_span: float = MIN_ACCURACY_SPAN) -> tuple[float, float]:
    """y limits (percent) of an accuracy axis: the intervals' span plus a 5% margin, or `min_span` points
    around their middle, whichever is larger, kept inside [0, 100] (shifted, not cut, where possible)."""
    if not lows or not highs:
        return 0.0, 100.0
    lo, hi = min(lows), max(highs)
    span = max(min_span, (hi - lo) * 1.1)
    centre = (lo + hi) / 2
    bottom, top = centre - span / 2, centre + span / 2
    if top > 100:
        bottom, top = bottom - (top - 100), 100.0
    if bottom < 0:
        bottom, top = 0.0, min(100.0, top - bottom)
    return bottom, top


def dodge(xs: Sequence[float], min_sep: float) -> list[float]:
    """Positions near `xs` (in the order of `xs`), no two closer than `min_sep`, order kept (ties: input
    order). Points too close form a cluster spaced `min_sep` apart and centred on their mean; clusters
    that then overlap merge, until none does."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], i))
    clusters = [[i] for i in order]

    def start(members: list[int]) -> float:
        return sum(xs[i] for i in members) / len(members) - min_sep * (len(members) - 1) / 2

    merged = True
    while merged:
        merged = False
        for k in range(len(clusters) - 1):
            a, b = clusters[k], clusters[k + 1]
            if start(b) - (start(a) + min_sep * (len(a) - 1)) < min_sep * (1 - 1e-9):
                clusters[k : k + 2] = [a + b]
                merged = True
                break
    placed = [0.0] * len(xs)
    for members in clusters:
        for k, i in enumerate(members):
            placed[i] = start(members) + k * min_sep
    return placed


def plot_transfer(rows: list[dict], path: str | Path) -> Figure:
    """Target test accuracy vs source top-1 accuracy, one panel per source data set.

    Colour: the architecture (`arch`); marker: the method (circle LP, square FT, triangle LP-FT); error bars: the
    95% interval of the test accuracy (`test_acc_ci_low` / `test_acc_ci_high`, when present). Points of
    one panel are spread horizontally (:func:`dodge`) so that no marker hides another, and the y axis
    spans at least 10 points (:func:`accuracy_ylim`). One legend entry per method and per architecture.
    """
    sources = sorted({r["source"] for r in rows if r.get("source_top1") is not None})
    if not sources:
        sources = ["(none)"]
    fig, axes = plt.subplots(1, len(sources), figsize=(6.2 * len(sources), 3.8), squeeze=False)
    archs = sorted({r["arch"] for r in rows if r.get("source_top1") is not None})  # only what is drawn has a legend entry
    colours = {a: f"C{i % 10}" for i, a in enumerate(archs)}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m not in METHOD_MARKERS, m))
    width_in = 4.6  # of one panel's axes, roughly: marker separation in data units follows from it
    marker_pt = 8
    for ax, source in zip(axes[0], sources):
        pts = [r for r in rows if r["source"] == source and r.get("source_top1") is not None and r.get("test_acc") is not None]
        pts.sort(key=lambda r: (r["source_top1"], r["arch"], methods.index(r["method"])))
        xs = [float(r["source_top1"]) for r in pts]
        placed: list[float] = []
        if xs:
            span = max(max(xs) - min(xs), 1.0)
            pad = 0.2 * span + 0.5
            x_range = span + 2 * pad
            min_sep = 1.6 * (marker_pt / 72) / width_in * x_range
            placed = dodge(xs, min_sep)
            pad = max(pad, (max(placed) - max(xs)) + min_sep, (min(xs) - min(placed)) + min_sep)
            ax.set_xlim(min(xs) - pad, max(xs) + pad)
        lows, highs = [], []
        for r, x in zip(pts, placed):
            acc = 100 * r["test_acc"]
            low, high = r.get("test_acc_ci_low"), r.get("test_acc_ci_high")
            yerr = None
            if low is not None and high is not None:
                yerr = [[acc - 100 * low], [100 * high - acc]]
                lows.append(100 * low)
                highs.append(100 * high)
            else:
                lows.append(acc)
                highs.append(acc)
            ax.errorbar([x], [acc], yerr=yerr, fmt=METHOD_MARKERS.get(r["method"], "s"), ms=marker_pt, color=colours[r["arch"]],
                        mec="k", mew=0.8, ecolor=colours[r["arch"]], elinewidth=1.2, capsize=3, zorder=3)
        ax.set_ylim(*accuracy_ylim(lows, highs))
        ax.set_xlabel(_plain(f"source top-1 accuracy on {source} (%)"))
        ax.set_ylabel("target test accuracy (%), 95% interval")
        ax.set_title(_plain(f"source: {source}"), fontsize=10)
        ax.grid(alpha=0.3)
    handles: list[Artist] = [Line2D([], [], ls="", marker=METHOD_MARKERS.get(m, "s"), ms=8, color="#bbbbbb", mec="k", label=m) for m in methods]
    handles += [Patch(color=colours[a], label=_plain(a)) for a in archs]
    if handles:
        axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return _save(fig, path)


def _best(cells: list[dict], metric: str = "val_err") -> float | None:
    values = [c[metric] for c in cells if c.get(metric) is not None and c.get("status", "done") == "done"]
    return min(values) if values else None


def grid_cell_text(cells: list[dict], metric: str = "val_err") -> str:
    """What one (lr, l2) cell of the grid figure says: the best `metric` over its done runs, else
    why there is none: "failed" (an error; re-running retries), "diverged", or "not run" (no run, or one
    still marked running: an interrupted sweep redoes it)."""
    best = _best(cells, metric)
    if best is not None:
        return f"{best:.3f}"
    statuses = {c.get("status") for c in cells}
    return "failed" if "failed" in statuses else "diverged" if "diverged" in statuses else "not run"


def colour_range(values: Sequence[float]) -> tuple[float, float]:
    """(vmin, vmax) of a heatmap: the values' range; one value throughout gets [v, v + 1e-3] (a constant
    grid, e.g. all zero, must not get a made-up range around it); no value at all: [0, 1]."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    return (lo, lo + CONSTANT_RANGE) if hi - lo <= 0 else (lo, hi)


def plot_grid(cells: list[dict], lrs: list[float], l2s: list[float], path: str | Path, title: str = "",
              metric: str = "val_err", chosen: tuple[float, float] | None = None) -> Figure:
    """Heatmap of the best `metric` (over seeds; the sweep's selection metric, val_err or val_xent) for
    each (lr, l2); `cells` are runs, each with lr, l2, status and the metric, and a cell without a done
    run says why (grid_cell_text). The colour range is :func:`colour_range` of the cells' values. The
    `chosen` (lr, l2) cell is outlined in red: the probe the sweep chose."""
    import numpy as np

    by_cell: dict[tuple[int, int], list[dict]] = {}
    for c in cells:
        by_cell.setdefault((l2s.index(c["l2"]), lrs.index(c["lr"])), []).append(c)
    texts = {(i, j): grid_cell_text(by_cell.get((i, j), []), metric) for i in range(len(l2s)) for j in range(len(lrs))}
    grid = np.full((len(l2s), len(lrs)), np.nan)
    for (i, j), members in by_cell.items():
        best = _best(members, metric)
        if best is not None:
            grid[i, j] = best
    vmin, vmax = colour_range(grid[np.isfinite(grid)].tolist())
    fig, ax = plt.subplots(figsize=(1.3 * len(lrs) + 2.4, 0.8 * len(l2s) + 1.4))
    cmap = matplotlib.colormaps["viridis_r"]
    im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(l2s)), [f"{v:g}" for v in l2s])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("l2")
    for (i, j), text in texts.items():
        shade = (grid[i, j] - vmin) / (vmax - vmin) if np.isfinite(grid[i, j]) else 0.0
        ax.text(j, i, text, ha="center", va="center", color="w" if shade > 0.5 else "k", fontsize=9)  # readable on its cell
    if chosen is not None and chosen[0] in lrs and chosen[1] in l2s:
        j, i = lrs.index(chosen[0]), l2s.index(chosen[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5, label="chosen"))
    label = METRIC_LABELS.get(metric, metric)
    fig.colorbar(im, ax=ax, label=f"{label} (best over seeds)")
    ax.set_title(_plain(title) if title else label, fontsize=10)
    return _save(fig, path)

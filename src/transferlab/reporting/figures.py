"""Matplotlib figures drawn from run records (plain dicts), written as PNG files."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ..utils import atomic_write_bytes  # noqa: E402

CURVE_PANELS = (
    ("train_loss", "train loss (xent + L2)"),
    ("train_err", "train error"),
    ("val_xent", "val cross-entropy"),
    ("val_err", "val error"),
)


def _plain(text: str) -> str:
    """`text` as matplotlib should print it: a backbone name with '$' is not mathtext."""
    return text.replace("$", r"\$")


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(history: Sequence[Mapping[str, Any]], best_epoch: int, path: str | Path, title: str = "") -> None:
    """Four panels (train loss, train err, val xent, val err) per epoch; a star marks the early stop."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        xs, ys = _series(history, key)
        ax.plot(xs, ys, "-", color="C0" if key.startswith("train") else "C1", lw=1.5)
        best = next((h for h in history if h["epoch"] == best_epoch), None)
        if best is not None and best.get(key) is not None:
            ax.plot([best_epoch], [best[key]], "*", color="C3", ms=14, label=f"best epoch {best_epoch}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(_plain(title), fontsize=11)
    _save(fig, path)


def plot_lpft(lp_history: Sequence[Mapping[str, Any]], lp_best: int, ft_history: Sequence[Mapping[str, Any]], ft_best: int,
              path: str | Path, title: str = "") -> None:
    """LP until its early stop, then FT from the restored best probe, on one continuous epoch axis."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    offset = lp_best
    for ax, key, label in ((axes[0], "val_xent", "val cross-entropy"), (axes[1], "val_err", "val error")):
        xs, ys = _series([h for h in lp_history if h["epoch"] <= lp_best], key)
        ax.plot(xs, ys, "-", color="C0", label="LP (until its early stop)")
        fx, fy = _series(ft_history, key)
        ax.plot([x + offset for x in fx], fy, "-", color="C2", label="FT (from best probe)")
        ax.axvline(offset, color="grey", ls=":", lw=1)
        best = next((h for h in ft_history if h["epoch"] == ft_best), None)
        if best is not None:
            ax.plot([ft_best + offset], [best[key]], "*", color="C3", ms=14, label=f"FT best (epoch {ft_best})")
        ax.set_xlabel("epoch (LP, then FT)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(_plain(title), fontsize=11)
    _save(fig, path)


def plot_transfer(rows: list[dict], path: str | Path) -> None:
    """Target test accuracy vs source top-1 accuracy, one panel per source data set, one marker per architecture."""
    sources = sorted({r["source"] for r in rows if r.get("source_top1") is not None})
    if not sources:
        sources = ["(none)"]
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.2), squeeze=False)
    markers = "osD^vP*Xh<>"
    archs = sorted({r["arch"] for r in rows})
    for ax, source in zip(axes[0], sources):
        for i, arch in enumerate(archs):
            pts = [r for r in rows if r["source"] == source and r["arch"] == arch and r.get("test_acc") is not None]
            for r in pts:
                colour = "C0" if r["method"] == "LP" else "C2"
                ax.scatter(r["source_top1"], 100 * r["test_acc"], marker=markers[i % len(markers)], s=70,
                           color=colour, edgecolor="k", label=_plain(f"{arch} ({r['method']})"))
        ax.set_xlabel(_plain(f"source top-1 accuracy on {source} (%)"))
        ax.set_ylabel("target test accuracy (%)")
        ax.set_title(_plain(f"source: {source}"), fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def _best_val_err(cells: list[dict]) -> float | None:
    errs = [c["val_err"] for c in cells if c.get("val_err") is not None and c.get("status", "done") == "done"]
    return min(errs) if errs else None


def grid_cell_text(cells: list[dict]) -> str:
    """What one (lr, l2) cell of the grid figure says: the best validation error over its done runs, else
    why there is none: "failed" (an error; re-running retries), "diverged", or "not run" (no run, or one
    still marked running: an interrupted sweep redoes it)."""
    best = _best_val_err(cells)
    if best is not None:
        return f"{best:.3f}"
    statuses = {c.get("status") for c in cells}
    return "failed" if "failed" in statuses else "diverged" if "diverged" in statuses else "not run"


def plot_grid(cells: list[dict], lrs: list[float], l2s: list[float], path: str | Path, title: str = "") -> None:
    """Heatmap of the best validation error (over seeds) for each (lr, l2); `cells` are runs, each with lr,
    l2, status and val_err, and a cell without a done run says why (grid_cell_text)."""
    import numpy as np

    by_cell: dict[tuple[int, int], list[dict]] = {}
    for c in cells:
        by_cell.setdefault((l2s.index(c["l2"]), lrs.index(c["lr"])), []).append(c)
    texts = {(i, j): grid_cell_text(by_cell.get((i, j), [])) for i in range(len(l2s)) for j in range(len(lrs))}
    grid = np.full((len(l2s), len(lrs)), np.nan)
    for (i, j), members in by_cell.items():
        best = _best_val_err(members)
        if best is not None:
            grid[i, j] = best
    fig, ax = plt.subplots(figsize=(1.6 * len(lrs) + 2.2, 1.0 * len(l2s) + 1.6))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(l2s)), [f"{v:g}" for v in l2s])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("l2")
    for (i, j), text in texts.items():
        ax.text(j, i, text, ha="center", va="center", color="w", fontsize=9)
    fig.colorbar(im, ax=ax, label="val error")
    ax.set_title(_plain(title) if title else "validation error", fontsize=10)
    _save(fig, path)

"""Where a run sits at a limit of what it was allowed: the best epoch at the epoch cap, a chosen value at
the edge of its grid, a weight interpolation that kept its start. Plain numbers in, sentences out (no torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

EDGE_MARGIN = 0.01  # a grid edge matters when it beats its inner neighbour by more than 1% of the metric


def limit_warnings(best_epoch: int | None, epoch_cap: int | None, epochs_flag: str,
                   chosen: Mapping[str, object], grids: Mapping[str, Sequence], wise_alpha: float | None = None,
                   epochs_run: int | None = None, patience: int | None = None,
                   scores: Mapping[str, Mapping[float, float]] | None = None, metric: str = "val_xent") -> list[str]:
    """Warnings where a choice sits at a limit of what was tried.

    Not converged: the best epoch is the last (`best_epoch` = `epoch_cap`), or the cap, not early
    stopping, ended the run (`epochs_run` = `epoch_cap`) with the best epoch in its last tenth and
    within `patience` (best epoch 99 of 100): a run whose best epoch is 3 of 15 has had 12 epochs to
    improve and did not. A grid edge: the chosen value is the largest (or smallest non-zero) of its
    grid; with `scores` ({flag: {value: best `metric` over the grid's runs at that value}}) only when
    it beats its inner neighbour by more than EDGE_MARGIN (relative), with both numbers said, since a
    difference in the fourth digit says nothing about what lies beyond the grid. A grid of one value
    has no edge. `wise_alpha` 0 means the interpolation kept the probe.
    """
    warnings = []
    if best_epoch is not None and epoch_cap is not None and epoch_cap > 0:
        window = min(patience if patience else epoch_cap, math.ceil(epoch_cap / 10))
        if best_epoch >= epoch_cap:
            warnings.append(f"best epoch {best_epoch} of {epoch_cap}: not converged, raise {epochs_flag}")
        elif epochs_run is not None and epochs_run >= epoch_cap and epoch_cap - best_epoch < window:
            warnings.append(f"best epoch {best_epoch} of {epoch_cap}, and the epoch cap, not early stopping, ended the run: "
                            f"not converged, raise {epochs_flag}")
    label = {"val_xent": "val xent", "val_err": "val err"}.get(metric, metric)
    for flag, values in grids.items():
        tried = sorted({float(v) for v in values})
        value = chosen.get(flag)
        if len(tried) < 2 or value is None:
            continue
        v = float(value)  # type: ignore[arg-type]
        if v == tried[-1]:
            where, inner = "top", tried[-2]
        elif v == tried[0] and v > 0:  # zero (no regularisation) is a floor, not an edge
            where, inner = "bottom", tried[1]
        else:
            continue
        by_value = (scores or {}).get(flag)
        if by_value is None or v not in by_value or inner not in by_value:
            warnings.append(f"{flag} {v:g} is at the {where} of its grid: extend the grid")
        elif by_value[inner] - by_value[v] > EDGE_MARGIN * abs(by_value[inner]):
            warnings.append(f"{flag} {v:g} is at the {where} of its grid ({label} {by_value[v]:.4g} there, {by_value[inner]:.4g} "
                            f"at {inner:g}): extend the grid")
    if wise_alpha == 0:
        warnings.append("interpolation a = 0: fine-tuning did not help; the probe stands")
    return warnings


def probe_warnings(best_epoch: int | None, epochs: int | None, epochs_run: int | None = None,
                   patience: int | None = None) -> list[str]:
    """A probe's limit warnings: the epoch cap, not early stopping, ended it (its best epoch at the cap,
    or within `patience` of it) means it had not converged; a single run has no grid, so no grid edges."""
    return limit_warnings(best_epoch, epochs, "--epochs", {}, {}, epochs_run=epochs_run, patience=patience)

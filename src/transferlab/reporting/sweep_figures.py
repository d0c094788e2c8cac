"""The figures of a sweep's report: the transfer figure, each backbone's probe grid, learning curves and
LP-then-FT curves, written to OUT/figures with the captions the page shows under them."""

from __future__ import annotations

from pathlib import Path

from transferlab.core.files import safe_filename
from transferlab.reporting import figures
from transferlab.reporting.summary import finished_run, planned_runs
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import read_manifest


def plural(n: int | str, word: str) -> str:
    """'1 layer', '3 layers'."""
    return f"{n} {word}" if str(n) == "1" else f"{n} {word}s"


def _grid_cells(ledger: Ledger, name: str, lrs: list, l2s: list) -> list[dict]:
    """One cell per planned probe of the current grid: lr, l2, status, and val_err / val_xent when done."""
    return [dict(lr=r["config"]["lr"], l2=r["config"]["l2"], status=r["status"],
                 val_err=(r["metrics"] or {}).get("val_err") if r["status"] == "done" else None,
                 val_xent=(r["metrics"] or {}).get("val_xent") if r["status"] == "done" else None)
            for r in planned_runs(ledger, name, "LP") or [] if r["config"]["lr"] in lrs and r["config"]["l2"] in l2s]


Figure = tuple[str, Path, bool]  # caption, PNG, small (shown side by side with the next small ones)


def draw_figures(ledger: Ledger, out: Path, rows: list[dict]) -> list[Figure]:
    """Write every figure; return (caption, path, small) in report order: the transfer figure, the
    grids side by side, then each backbone's curves. File names come from safe_filename: a backbone name
    never leads a file out of OUT/figures."""
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    manifest = read_manifest(ledger)
    select = manifest.select
    made: list[Figure] = []
    grids: list[Figure] = []
    if rows:
        plot_rows = [dict(r, arch=r["backbone"].removesuffix("_cub")) for r in rows]
        figures.plot_transfer(plot_rows, fig_dir / "transfer.png")
        unplaced = sorted({r["backbone"] for r in rows if r.get("source_top1") is None})
        left_out = f"; not drawn, their source top-1 being unknown: {', '.join(unplaced)}" if unplaced else ""
        made.append(("Target test accuracy (bars: 95% Wilson interval) vs source top-1 accuracy, one panel per source data set; "
                     f"points of one backbone are spread sideways so none hides another{left_out}", fig_dir / "transfer.png", False))
    for name in manifest.backbones:
        file_name = safe_filename(name)
        lp_hash = ledger.choice(name, "LP")
        lp = finished_run(ledger, lp_hash) if lp_hash is not None else None
        if lp is not None:
            c = lp["config"]
            path = fig_dir / f"curves_{file_name}.png"
            figures.plot_curves(lp["history"], lp["metrics"]["best_epoch"], path,
                                f"{name}: chosen probe lr={c['lr']:g} l2={c['l2']:g} seed={c['seed']}")
            made.append((f"{name}: learning curves of the chosen probe (star: the best epoch, whose weights were kept)", path, False))
        lrs, l2s = list(manifest.phase("lp").get("lr", [])), list(manifest.phase("lp").get("l2", []))
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
            ft = finished_run(ledger, ft_hash)
            path = fig_dir / f"lpft_{file_name}.png"
            figures.plot_lpft(lp["history"], lp["metrics"]["best_epoch"], ft["history"], ft["metrics"]["best_epoch"], path,
                              f"{name}: LP, then fine-tune the last {plural(ft['metrics']['n_trainable_layers'], 'layer')} "
                              f"(lr={ft['config']['lr']:g})")
            made.append((f"{name}: LP, then FT from the best probe (each phase on its own epoch axis and y range)", path, False))
    return made[:1] + grids + made[1:] if rows else grids + made

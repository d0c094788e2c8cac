"""reporting.sweep_figures: which figures a sweep's report draws, from which runs, in which order, under which names.

The plotting functions themselves are tested in test_report_verdict.py; here they are stubs that record their
arguments, so what is checked is the choice of figures, their data and their order (transfer figure, grids side
by side, then each backbone's curves) as draw_figures' docstring says.
"""

import pytest

from transferlab.core.files import safe_filename
from transferlab.reporting import figures
from transferlab.reporting.sweep_figures import draw_figures, plural
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import SweepManifest, write_manifest

HOSTILE = "hf:../x"  # not a plain file name


@pytest.fixture
def drawn(monkeypatch):
    """Replace the four plots with stubs that write an empty PNG and record (plot, path, data)."""
    calls = []

    def stub(kind, data_of):
        def plot(*args, **kwargs):
            path = next(a for a in args if hasattr(a, "suffix"))
            path.write_bytes(b"")
            calls.append((kind, path.name, data_of(args, kwargs)))
        return plot

    monkeypatch.setattr(figures, "plot_transfer", stub("transfer", lambda a, k: [r["arch"] for r in a[0]]))
    monkeypatch.setattr(figures, "plot_curves", stub("curves", lambda a, k: a[1]))
    monkeypatch.setattr(figures, "plot_grid", stub("grid", lambda a, k: (sorted((c["lr"], c["l2"], c["status"]) for c in a[0]), k["chosen"])))
    monkeypatch.setattr(figures, "plot_lpft", stub("lpft", lambda a, k: (a[1], a[3])))
    return calls


def add_run(ledger, run_hash, backbone, method, cfg, status="done", best_epoch=2, layers=1):
    ledger.mark_running(run_hash, backbone, method, cfg)
    if status == "done":
        ledger.finish(run_hash, "done", {"best_epoch": best_epoch, "val_xent": 0.5, "val_err": 0.1, "n_trainable_layers": layers},
                      [{"epoch": e} for e in range(4)], {})
    else:
        ledger.fail(run_hash, "boom")


def make_ledger(path, choose=True):
    """Backbone `HOSTILE`: a 2 x 1 LP grid (one cell failed) and, when `choose`, LP and LP-FT chosen;
    backbone "plain": no run at all."""
    ledger = Ledger(path)
    write_manifest(ledger, SweepManifest(grid={"lp": {"lr": [0.1, 0.01], "l2": [0.0]}}, backbones=[HOSTILE, "plain"]))
    add_run(ledger, "lp1", HOSTILE, "LP", {"lr": 0.1, "l2": 0.0, "seed": 0})
    add_run(ledger, "lp2", HOSTILE, "LP", {"lr": 0.01, "l2": 0.0, "seed": 0}, status="failed")
    add_run(ledger, "off-grid", HOSTILE, "LP", {"lr": 5.0, "l2": 0.0, "seed": 0})  # planned, but not in the grid's lr x l2
    ledger.set_plan(HOSTILE, "LP", ["lp1", "lp2", "off-grid"])
    add_run(ledger, "ft", HOSTILE, "LP-FT", {"lr": 1e-4, "l2": 0.0, "seed": 0}, best_epoch=3, layers=3)
    if choose:
        ledger.choose(HOSTILE, "LP", "lp1")
        ledger.choose(HOSTILE, "LP-FT", "ft")
    return ledger


def test_plural():
    assert (plural(1, "layer"), plural("1", "block"), plural(0, "layer"), plural(3, "block")) == ("1 layer", "1 block", "0 layers", "3 blocks")


def test_figures_come_in_report_order_with_safe_file_names(tmp_path, drawn):
    ledger = make_ledger(tmp_path / "ledger.sqlite")
    rows: list[dict] = [{"backbone": HOSTILE, "source_top1": None}, {"backbone": "x_cub", "source_top1": 70.0}]
    made = draw_figures(ledger, tmp_path, rows)
    ledger.close()
    stem = safe_filename(HOSTILE)
    assert [(p.parent, p.name, small) for _, p, small in made] == [
        (tmp_path / "figures", "transfer.png", False), (tmp_path / "figures", f"grid_{stem}.png", True),
        (tmp_path / "figures", f"curves_{stem}.png", False), (tmp_path / "figures", f"lpft_{stem}.png", False)]
    assert "/" not in stem and all(p.is_file() for _, p, _ in made)
    by_kind = {kind: data for kind, _, data in drawn}
    assert by_kind["transfer"] == [HOSTILE, "x"]  # arch: the name without its "_cub" suffix
    # The grid: the planned cells inside lr x l2 (failed ones too), the chosen probe outlined.
    assert by_kind["grid"] == ([(0.01, 0.0, "failed"), (0.1, 0.0, "done")], (0.1, 0.0))
    assert by_kind["curves"] == 2 and by_kind["lpft"] == (2, 3)  # the best epochs of the chosen runs
    captions = [caption for caption, _, _ in made]
    assert captions[0].endswith(f"not drawn, their source top-1 being unknown: {HOSTILE}")
    label = figures.METRIC_LABELS["val_xent"]  # the default --select
    assert captions[1] == f"{HOSTILE}: {label} (the selection metric, --select val_xent) over the lr x l2 grid; red outline: the chosen probe"


def test_without_a_choice_only_the_grids_are_drawn(tmp_path, drawn):
    ledger = make_ledger(tmp_path / "ledger.sqlite", choose=False)
    made = draw_figures(ledger, tmp_path, [])
    ledger.close()
    assert [(p.name, small) for _, p, small in made] == [(f"grid_{safe_filename(HOSTILE)}.png", True)]
    assert [(kind, data) for kind, _, data in drawn] == [("grid", ([(0.01, 0.0, "failed"), (0.1, 0.0, "done")], None))]

"""A sweep's report shows its own grid only, a refused re-run writes nothing, names never reach HTML or
paths raw, and a failed set-up gives the folder back (issue 19: items 2, 3, 9, 10a, 10e, 10f)."""

import dataclasses
import html
import json
import sqlite3
import statistics

import pytest

from conftest import write_tiny_hf_vit
from transferlab.cli.main import main
from transferlab.sweep.ledger import Ledger

NAME = "efficientnet_lite0"
FAST = ["--backbones", NAME, "--device", "cpu", "--workers", "0", "--no-progress"]


def sweep(data, out, *extra):
    return main(["sweep", "--data", str(data), "--out", str(out), *FAST, *extra])


def summary(out):
    return json.loads((out / "summary.json").read_text())


def tables(out):
    """Every row of every ledger table, to compare a folder before and after a command."""
    db = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in ("meta", "runs", "choices", "test_evaluations")}
    finally:
        db.close()


def test_seed_statistics_and_grid_cells_come_from_this_grids_runs_only(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "s"
    grid = ["--lr", "1e-3", "--l2", "0", "--epochs", "2"]
    assert sweep(tiny_folder, out, *grid, "--seeds", "0,1,2") == 0
    assert summary(out)[0]["n_seeds"] == 3
    # Fewer seeds into the same folder: seed 2's run stays in the ledger but is not this grid's.
    assert sweep(tiny_folder, out, *grid, "--seeds", "0,1") == 0
    row = summary(out)[0]
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        errs = [r["metrics"]["val_err"] for r in ledger.runs(NAME, "LP")
                if r["config"]["seed"] in (0, 1) and r["config"]["epochs"] == 2]
    finally:
        ledger.close()
    assert len(errs) == 2 and errs[0] != errs[1]  # seeds 0 and 1 of lr 1e-3, l2 0: the definition by hand
    assert row["n_seeds"] == 2
    assert row["val_err_seed_mean"] == pytest.approx(statistics.fmean(errs), abs=1e-12)
    assert row["val_err_seed_std"] == pytest.approx(statistics.stdev(errs), abs=1e-12)

    # Another epoch count: the grid figure draws this grid's runs, not the old runs of the same (lr, l2).
    from transferlab.reporting import figures

    drawn = []
    real_plot_grid = figures.plot_grid
    monkeypatch.setattr(figures, "plot_grid", lambda cells, *a, **k: (drawn.append(cells), real_plot_grid(cells, *a, **k)))
    assert sweep(tiny_folder, out, "--lr", "1e-3", "--l2", "0", "--epochs", "1", "--seeds", "0,1") == 0
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        this_grid = sorted((r["config"]["lr"], r["config"]["l2"], r["metrics"]["val_err"]) for r in ledger.runs(NAME, "LP")
                           if r["config"]["epochs"] == 1)
    finally:
        ledger.close()
    assert len(this_grid) == 2
    assert sorted((c["lr"], c["l2"], c["val_err"]) for c in drawn[-1]) == this_grid
    # The report is rebuilt from the ledger alone, with the same numbers.
    before = (out / "summary.json").read_bytes()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.json").read_bytes() == before
    assert summary(out)[0]["n_seeds"] == 2


def test_a_refused_rerun_writes_nothing_and_keeps_the_choices(tiny_folder, tmp_path, capsys):
    out = tmp_path / "s"
    grid = ["--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "2", "--lpft", "--ft-layers", "2", "--ft-lr", "1e-4",
            "--ft-epochs", "1", "--ft-wise", "1"]
    assert sweep(tiny_folder, out, *grid) == 0
    rows, ledger_before, sweep_json = summary(out), tables(out), (out / "sweep.json").read_bytes()
    assert [r["method"] for r in rows] == ["LP", "LP-FT"]
    capsys.readouterr()
    # The cut's input (1280x7x7 floats, 42 images) fits 0.02 GB; its 4 views of 24 training images (24 MB) do not.
    fresh_cache = tmp_path / "fresh_cache"
    assert sweep(tiny_folder, out, *grid, "--ft-augment", "views:4", "--cache-max-gb", "0.02", "--cache-dir", str(fresh_cache)) == 2
    err = capsys.readouterr().err
    assert "--ft-augment views:4" in err and "of views" in err and NAME in err
    assert tables(out) == ledger_before  # not one meta key, run, choice or test evaluation changed
    assert (out / "sweep.json").read_bytes() == sweep_json
    assert not fresh_cache.exists() or not any(fresh_cache.rglob("*"))  # refused before any image was extracted
    assert main(["report", str(out)]) == 0
    assert summary(out) == rows
    from transferlab.sweep.select import pick_choice, sweep_choices

    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        assert pick_choice(sweep_choices(ledger), NAME, "LP-FT", str(out))["hash"] == ledger.choice(NAME, "LP-FT")
    finally:
        ledger.close()


@pytest.mark.slow
def test_the_planned_views_check_refuses_exactly_what_the_set_up_check_refuses(tiny_folder):
    from transferlab.core.errors import ConfigError
    from transferlab.data import DataConfig
    from transferlab.features.cut_inputs import CutInputs
    from transferlab.features.cut_plan import check_feature_augment_planned
    from transferlab.features.engine import EngineConfig
    from transferlab.models import load_backbone

    splits = DataConfig(data=str(tiny_folder)).load()
    engine = EngineConfig(device="cpu", num_workers=0, progress=False)
    train = CutInputs(load_backbone(NAME, pretrained=False), splits, engine, None).setup(2).sources["train"]
    views_bytes = train.inputs[0].numel() * 4 * len(train) * 4  # the definition: float32 inputs x images x K
    for budget_gb in (views_bytes / 1e9 * 0.99, views_bytes / 1e9 * 1.01, 1e-6):  # 1e-6: not even the cut's cache fits
        said = {}
        limited = dataclasses.replace(engine, cache_max_gb=budget_gb)
        for check in ("check_feature_augment", "check_feature_augment_planned"):
            backbone = load_backbone(NAME, pretrained=False)
            try:
                if check == "check_feature_augment":
                    CutInputs(backbone, splits, limited, None).check_feature_augment("views:4", 2)
                else:
                    check_feature_augment_planned(backbone, splits, limited, "views:4", 2)
                said[check] = None
            except ConfigError as e:
                said[check] = str(e)
        # 1e-6: not even the cut's cache fits, so the images are decoded every epoch and views drawn on the fly
        cut_cached = budget_gb > 1e-6
        assert (said["check_feature_augment"] is not None) == (cut_cached and budget_gb * 1e9 < views_bytes), budget_gb
        assert said["check_feature_augment_planned"] == said["check_feature_augment"]  # the same refusal, word for word


def test_a_failed_set_up_gives_the_folder_back(tiny_folder, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "ledger.sqlite").write_bytes(b"this is not a database\n" * 200)
    assert sweep(tiny_folder, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "1") == 2
    assert "ledger.sqlite" in capsys.readouterr().err  # one line naming the file
    (out / "ledger.sqlite").unlink()
    # The same process sweeps into the folder again: it is not told the folder is in use by itself.
    assert sweep(tiny_folder, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "1") == 0


@pytest.mark.slow
def test_the_loss_section_names_the_optimizer_the_runs_used(tiny_folder, tmp_path):
    out = tmp_path / "s"
    assert sweep(tiny_folder, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "1", "--optimizer", "sgd",
                 "--momentum", "0.5") == 0
    loss = (out / "report.html").read_text().split("<h2>Loss</h2>")[1].split("<h2>")[0]
    assert "SGD with momentum 0.5" in loss and "Adam" not in loss


def test_grid_cells_say_failed_diverged_or_not_run(tmp_path, monkeypatch):
    import matplotlib.axes

    from transferlab.reporting import figures

    said = {}
    real_text = matplotlib.axes.Axes.text

    def text(self, x, y, s, *args, **kwargs):
        said[(y, x)] = s  # (row: l2, column: lr)
        return real_text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    cells = [dict(lr=1, l2=0, status="done", val_err=0.25), dict(lr=1, l2=0, status="failed", val_err=None),
             dict(lr=2, l2=0, status="failed", val_err=None), dict(lr=2, l2=0, status="diverged", val_err=None),
             dict(lr=3, l2=0, status="diverged", val_err=None), dict(lr=1, l2=1, status="running", val_err=None)]
    figures.plot_grid(cells, [1, 2, 3], [0, 1], tmp_path / "grid.png")
    assert said == {(0, 0): "0.250", (0, 1): "failed", (0, 2): "diverged", (1, 0): "not run", (1, 1): "not run", (1, 2): "not run"}


EVIL = "hf:/x/vit<img src=x onerror=alert(1)>"
CLIMBER = "hf:../../../../m"


@pytest.mark.slow
def test_backbone_names_are_escaped_in_html_and_never_lead_files_out_of_the_folder(tiny_folder, tmp_path, monkeypatch):
    """Two hostile names stand for efficientnet_lite0 (monkeypatched), through a whole LP-then-FT sweep."""
    import transferlab.sweep.coordinator as coordinator
    import transferlab.sweep.preflight as preflight

    real_load = preflight.load_backbone

    def load_renamed(name, *args, **kwargs):
        backbone = real_load(NAME, *args, **kwargs)
        backbone.spec = dataclasses.replace(backbone.spec, name=name)
        return backbone

    monkeypatch.setattr(coordinator, "resolve_backbones", lambda cfg: ([EVIL, CLIMBER], {}))
    monkeypatch.setattr(preflight, "load_backbone", load_renamed)
    top = tmp_path / "d1" / "d2" / "d3" / "d4"
    out = top / "out"
    assert sweep(tiny_folder, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "2", "--lpft", "--ft-layers", "2",
                 "--ft-lr", "1e-4", "--ft-epochs", "1", "--ft-wise", "1") == 0
    assert main(["report", str(out)]) == 0
    assert {r["backbone"] for r in summary(out)} == {EVIL, CLIMBER}
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert html.escape(EVIL) in page.split("<h3>What LP-then-FT did</h3>")[1]  # the verdict line names it, escaped
    # Nothing was written outside OUT, and every file name under OUT is one plain component.
    outside = [p for p in (tmp_path / "d1").rglob("*") if p.is_file() and out not in p.parents]
    assert outside == []
    from transferlab.core.files import safe_filename

    for name in (EVIL, CLIMBER):
        for figure in ("curves", "grid", "lpft"):
            assert (out / "figures" / f"{figure}_{safe_filename(name)}.png").is_file()
        assert (out / "insight" / f"{safe_filename(name)}_LP-FT" / "confusion_matrix.csv").is_file()
    assert all(set(p.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.-+LPFT") for p in out.rglob("*"))


def test_safe_filename_keeps_plain_names_and_gives_every_other_name_its_own_file():
    from transferlab.core.files import safe_filename

    assert safe_filename(NAME) == NAME  # figures/curves_efficientnet_lite0.png as before
    names = [EVIL, CLIMBER, "hf:../m", "hf:.._m", "hf_.._m", "A", "a", "..", ".", "", "x" * 300, "x" * 301]
    files = [safe_filename(n) for n in names]
    assert len(set(files)) == len(names)  # case-insensitively too: all lower-case
    assert len({f.lower() for f in files}) == len(names)
    for f in files:
        assert "/" not in f and "\\" not in f and not f.startswith(".") and f not in ("", ".", "..") and len(f) <= 100


def test_a_backbone_whose_weights_do_not_load_is_refused_before_anything_is_written(tiny_folder, tmp_path, capsys):
    broken = write_tiny_hf_vit(tmp_path / "hf_broken", layers=1)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # present, but not a safetensors file
    out = tmp_path / "s"
    grid = ["--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "1"]
    assert sweep(tiny_folder, out, *grid) == 0
    rows, ledger_before = summary(out), tables(out)
    capsys.readouterr()
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(out), "--backbones", f"{NAME},hf:{broken}", *grid,
                 "--device", "cpu", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--backbones hf:{broken}: its weights cannot be loaded" in err[0]
    assert tables(out) == ledger_before
    assert main(["report", str(out)]) == 0 and summary(out) == rows

"""A sweep's report opens on the verdict, its numbers match hand computations, limits are flagged and the
figures are readable (issue 22: items 1, 2, 3).

Most tests build a sweep folder by hand (a ledger and per-image prediction files with known correct
counts), so every number has a value derived from its definition; one test runs a tiny real sweep.
"""

import csv
import html
import json
import re

import numpy as np
import pytest
from scipy.stats import binomtest

from transferlab.core.predictions import sweep_predictions_path, write_test_predictions
from transferlab.reporting import figures
from transferlab.reporting.report import build_report
from transferlab.reporting.summary import SUMMARY_KEYS
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import BackboneRecord, SweepManifest, read_manifest, write_backbone, write_manifest

N, CLASSES = 50, ["a", "b", "c", "d", "e"]
LABELS = np.arange(N) % len(CLASSES)
FILES = [f"/nowhere/test/{CLASSES[k]}/img_{i:03d}.png" for i, k in enumerate(LABELS)]
ALPHA, BETA = "alpha", "beta<b onmouseover=x>"  # a hostile name: must reach the page escaped
GRID = {"lp": {"lr": [1e-3, 1e-2], "l2": [0.0, 1e-2], "epochs": [10], "patience": [3]},
        "ft": {"lr": [1e-4], "l2sp": [0.0], "label_smoothing": [0.0], "wise_alphas": [(0.0, 1.0)], "epochs": [5], "patience": [3]}}


def probs_for(correct: np.ndarray) -> np.ndarray:
    """One-hot-ish probabilities: the true class where `correct`, else the next class."""
    predicted = np.where(correct, LABELS, (LABELS + 1) % len(CLASSES))
    probs = np.full((N, len(CLASSES)), 0.05)
    probs[np.arange(N), predicted] = 0.8
    return probs


# beta LP: 40 of 50 right (wrong: images 0-9). alpha: 45 of 50 (wrong: 0-1 and 10-12). Against beta, alpha
# alone is right on images 2-9 (8) and beta alone on 10-12 (3): 40 + 8 - 3 = 45.
BETA_RIGHT = ~np.isin(np.arange(N), np.arange(10))
ALPHA_RIGHT = ~np.isin(np.arange(N), [0, 1, 10, 11, 12])


def history(epochs: int, best: int, start: float = 2.0) -> list[dict]:
    """Epoch 0 (before training) to `epochs`, val xent falling to `best` then rising."""
    rows = []
    for e in range(epochs + 1):
        xent = start / (1 + e) if e <= best else start / (1 + best) * (1 + 0.05 * (e - best))
        rows.append({"epoch": e, "train_loss": start / (1 + e) ** 2, "train_err": 0.5 / (1 + e), "val_xent": xent,
                     "val_err": 0.1})
    return rows


def make_sweep(out, select="val_xent"):
    """A finished sweep folder: beta LP, alpha LP and alpha LP-FT (a = 0: the probe's own predictions)."""
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.sqlite")
    ledger.set_meta("grid", "g1")
    write_manifest(ledger, SweepManifest(grid=GRID, select=select, backbones=[ALPHA, BETA], command="transferlab sweep ...",
                                         objective="loss = xent",
                                         data_summary={"root": "/nowhere", "n_classes": 5, "classes": CLASSES,
                                                       "test": {"source": "test/", "n": N, "per_class": [10] * 5}}))
    write_backbone(ledger, ALPHA, BackboneRecord(source="imagenet1k", source_top1=75.0))
    write_backbone(ledger, BETA, BackboneRecord(source="imagenet1k", source_top1=75.2))
    lp, ft = {"epochs": 10, "patience": 3}, {"epochs": 5, "patience": 3}  # each run's own epoch cap and patience
    runs = [  # hash, backbone, method, config, best epoch, epochs run, val_xent, val_err, correct, wise_alpha
        ("b-lp", BETA, "LP", {"lr": 1e-2, "l2": 0.0, "seed": 0, **lp}, 10, 10, 0.10, 0.05, BETA_RIGHT, None),
        ("a-lp", ALPHA, "LP", {"lr": 1e-3, "l2": 1e-2, "seed": 0, **lp}, 4, 7, 0.20, 0.04, ALPHA_RIGHT, None),
        ("a-ft", ALPHA, "LP-FT", {"lr": 1e-4, "l2": 1e-2, "seed": 0, "l2sp": 0.0, "label_smoothing": 0.0, **ft}, 5, 5, 0.30, 0.04,
         ALPHA_RIGHT, 0.0),
    ]
    for run_hash, name, method, cfg, best, epochs, xent, err, correct, wise in runs:
        ledger.mark_running(run_hash, name, method, {**cfg, "select": select})
        metrics = {"best_epoch": best, "epochs_run": epochs, "val_xent": xent, "val_err": err, "n_trainable_layers": 1 if method == "LP" else 3,
                   "trainable_params": 6405, "wise_alpha": wise, "unit": "layers:3" if method == "LP-FT" else None}
        ledger.finish(run_hash, "done", metrics, history(epochs, best), {})
        ledger.record_test(run_hash, float(correct.mean()))
        ledger.set_plan(name, method, [run_hash])
        ledger.choose(name, method, run_hash)
        write_test_predictions(sweep_predictions_path(out, run_hash), CLASSES, FILES, LABELS, probs_for(correct))
    ledger.close()
    return out


def test_summary_numbers_match_hand_computations(tmp_path):
    out = make_sweep(tmp_path / "s")
    rows = build_report(out)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(rows)) and all(tuple(r) == SUMMARY_KEYS for r in saved)
    by = {(r["backbone"], r["method"]): r for r in saved}
    beta, alpha, alpha_ft = by[(BETA, "LP")], by[(ALPHA, "LP")], by[(ALPHA, "LP-FT")]
    # Ranked by val_xent: beta LP (0.10), alpha LP (0.20), alpha LP-FT (0.30).
    assert (beta["rank"], alpha["rank"], alpha_ft["rank"]) == (1, 2, 3)
    # Wilson 95% intervals, from scipy's implementation of the definition.
    for row, k in ((beta, 40), (alpha, 45), (alpha_ft, 45)):
        ci = binomtest(k, N).proportion_ci(confidence_level=0.95, method="wilson")
        assert (row["test_acc_ci_low"], row["test_acc_ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
        assert row["test_acc"] == k / N
    # The best has no comparison with itself.
    assert [beta[k] for k in ("diff_vs_best", "ci_low_vs_best", "ci_high_vs_best", "p_vs_best")] == [None] * 4
    # alpha against beta: +5 images of 50; McNemar on 8 images alpha alone got right and 3 beta alone got right:
    # two-sided exact p = 2 * P(X <= 3), X ~ Binomial(11, 1/2) = 2 * (1 + 11 + 55 + 165) / 2048.
    for row in (alpha, alpha_ft):
        assert row["diff_vs_best"] == pytest.approx(0.10, abs=1e-12)
        assert row["p_vs_best"] == pytest.approx(2 * (1 + 11 + 55 + 165) / 2048, abs=1e-12)
        assert row["ci_low_vs_best"] < 0.10 < row["ci_high_vs_best"]
    # The paired bootstrap interval by hand: 10,000 resamples of the images, seeded as compare.py documents.
    rng = np.random.default_rng(0)
    diffs = np.concatenate([ALPHA_RIGHT[idx].mean(1) - BETA_RIGHT[idx].mean(1)
                            for idx in (rng.integers(0, N, size=(1000, N)) for _ in range(10))])
    assert (alpha["ci_low_vs_best"], alpha["ci_high_vs_best"]) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    # summary.csv holds the same columns, the warnings joined by "; ".
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SUMMARY_KEYS
    assert [r["warnings"] for r in table] == ["; ".join(r["warnings"]) for r in saved]
    assert float(table[1]["p_vs_best"]) == pytest.approx(alpha["p_vs_best"])


def test_limits_are_flagged_per_row(tmp_path):
    saved = build_report(make_sweep(tmp_path / "s"))
    warnings = {(r["backbone"], r["method"]): r["warnings"] for r in saved}
    # beta LP: best epoch 10 of --epochs 10, lr 1e-2 the top of --lr 1e-3,1e-2 (l2 0 is a floor, not an edge).
    assert warnings[(BETA, "LP")] == ["best epoch 10 of 10: not converged, raise --epochs",
                                      "--lr 0.01 is at the top of its grid: extend the grid"]
    # alpha LP: best epoch 4, stopped early at 7 (patience 3); lr 1e-3 at the bottom of --lr, l2 1e-2 at the top of --l2.
    assert warnings[(ALPHA, "LP")] == ["--lr 0.001 is at the bottom of its grid: extend the grid",
                                       "--l2 0.01 is at the top of its grid: extend the grid"]
    # alpha LP-FT: best epoch 5 of --ft-epochs 5 (not --epochs), one --ft-lr (no edge), a = 0.
    assert warnings[(ALPHA, "LP-FT")] == ["best epoch 5 of 5: not converged, raise --ft-epochs",
                                          "interpolation a = 0: fine-tuning did not help; the probe stands"]


def test_the_ranking_follows_select_and_export_takes_the_top_row(tmp_path):
    from transferlab.sweep.select import pick_choice, sweep_choices

    for select, order in (("val_xent", [BETA, ALPHA, ALPHA]), ("val_err", [ALPHA, ALPHA, BETA])):
        out = make_sweep(tmp_path / select, select)
        saved = sorted(build_report(out), key=lambda r: r["rank"])
        assert [r["backbone"] for r in saved] == order
        if select == "val_err":  # alpha LP and LP-FT tie on val_err 0.04: the lower val_xent (LP) first
            assert [r["method"] for r in saved[:2]] == ["LP", "LP-FT"]
        ledger = Ledger(out / "ledger.sqlite", readonly=True)
        try:
            picked = pick_choice(sweep_choices(ledger), None, None, str(out), read_manifest(ledger).select)
        finally:
            ledger.close()
        assert (picked["backbone"], picked["method"]) == (saved[0]["backbone"], saved[0]["method"])
        page = (out / "report.html").read_text()
        verdict = page.split("<h2>", 2)[1]
        assert html.escape(f"transferlab export takes {saved[0]['backbone']} {saved[0]['method']}") in verdict


def test_the_page_opens_on_the_verdict_with_details_and_escaped_names(tmp_path):
    out = make_sweep(tmp_path / "s")
    build_report(out)
    page = (out / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[0].startswith("Verdict")
    verdict = page.split("<h2>")[1].split("<h2>")[0]
    e = html.escape
    assert "50 test images: one image = 2 points." in verdict
    # alpha LP 45 right vs beta LP 40 of 50: 8 images only alpha gets right, 3 only beta: 11 discordant
    assert e(f"{ALPHA} LP is 10.0 pt above {BETA} LP on this test set (11 discordant images, 95% CI [") in verdict
    assert e("they cannot be told apart.") in verdict
    assert "McNemar p = 0.23" in verdict  # 464 / 2048 = 0.2266
    assert e("best epoch 10 of 10: not converged, raise --epochs") in verdict
    assert "<b onmouseover" not in page and e(BETA) in verdict
    # Verdict rows in rank order, with the test accuracy's interval in points.
    assert verdict.index(e(BETA)) < verdict.index(f"{ALPHA} LP<") < verdict.index(f"{ALPHA} LP-FT<")
    ci = binomtest(40, N).proportion_ci(method="wilson")
    assert f"80.0 [{100 * ci.low:.1f}, {100 * ci.high:.1f}]" in verdict
    # The hyper-parameter table: compact on the page, every column of summary.json inside <details>.
    chosen = page.split("<h2>Chosen hyperparameters")[1].split("<h2>")[0]
    compact, full = chosen.split("<details>")
    assert "<th>diff_vs_best</th>" not in compact and "<th>best_epoch</th>" in compact
    assert all(f"<th>{k}</th>" in full for k in SUMMARY_KEYS)
    assert "<summary>Every column of summary.json" in full and "<div class=wide>" in full  # scrolls in its box, not the page
    # alpha LP-FT kept the probe (a = 0): one per-class section for both, and each run's files still written.
    insight = page.split("<h2>Per-class insight (test)</h2>")[1]
    assert insight.count("; per-class recall and precision, confusion matrix") == 2  # one collapsible section each
    assert f"{ALPHA} LP and {ALPHA} LP-FT" in insight and "this section applies to 2 models" in insight
    assert insight.count("confusion matrix on the test split".capitalize()) == 2
    assert (out / "insight" / f"{ALPHA}_LP" / "per_class.csv").is_file() and (out / "insight" / f"{ALPHA}_LP-FT" / "per_class.csv").is_file()
    # The best model's section is the open one.
    assert re.search(r"<details open><summary>" + re.escape(e(BETA)), insight)


# -- figures --------------------------------------------------------------------------------------
def test_accuracy_axis_spans_ten_points_or_the_intervals_inside_0_100():
    assert figures.accuracy_ylim([93.0], [99.4]) == pytest.approx((90.0, 100.0))  # 10 points around 96.2, shifted under 100
    assert figures.accuracy_ylim([40.0], [90.0]) == pytest.approx((37.5, 92.5))  # 50 points + 10%
    assert figures.accuracy_ylim([0.0], [3.0]) == pytest.approx((0.0, 10.0))
    assert figures.accuracy_ylim([1.0], [99.0]) == pytest.approx((0.0, 100.0))


def test_transfer_figure_has_error_bars_and_markers_that_never_hide_each_other(tmp_path):
    rows = [dict(source="imagenet1k", source_top1=top1, arch=arch, method=method, test_acc=acc,
                 test_acc_ci_low=acc - 0.05, test_acc_ci_high=min(1.0, acc + 0.02))
            for arch, top1 in (("lite0", 75.1), ("lite1", 75.15), ("lite2", 77.6)) for method, acc in (("LP", 0.98), ("LP-FT", 0.98))]
    fig = figures.plot_transfer(rows, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high - low >= 10 and 0 <= low and high <= 100
    assert low <= 93.0 and high >= 100.0  # every interval is inside the axis
    # One error bar per point, from the interval; one legend entry per method and per architecture.
    assert len(ax.containers) == 6
    bars = [c.lines[2][0].get_segments()[0] for c in ax.containers]
    assert sorted(round(s[0][1], 6) for s in bars) == [93.0] * 6 and sorted(round(s[1][1], 6) for s in bars) == [100.0] * 6
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["LP", "LP-FT", "lite0", "lite1", "lite2"]
    # Marker centres in pixels: no two closer than a marker's width (8 pt at 110 dpi), LP left of LP-FT.
    fig.canvas.draw()
    centres = [ax.transData.transform((c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0])) for c in ax.containers]
    marker_px = 8 / 72 * fig.dpi
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.hypot(*(centres[i] - centres[j])) >= marker_px
    assert [c.lines[0].get_marker() for c in ax.containers] == ["o", "^"] * 3


def test_dodge_spreads_close_points_and_keeps_far_ones():
    assert figures.dodge([1.0, 1.0, 5.0], 0.5) == pytest.approx([0.75, 1.25, 5.0])
    placed = figures.dodge([1.0, 1.1, 1.2, 1.25, 3.0], 0.3)
    assert all(b - a >= 0.3 - 1e-12 for a, b in zip(placed, placed[1:]))
    assert np.mean(placed[:4]) == pytest.approx(np.mean([1.0, 1.1, 1.2, 1.25]))


def test_loss_curves_go_log_when_they_span_decades(tmp_path):
    hist = history(20, 19)  # train loss 2 -> 2/441 (x441), val xent 2 -> 0.1 (x20), errors linear
    fig = figures.plot_curves(hist, 19, tmp_path / "c.png")
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear", "log", "linear"]
    flat = [dict(h, train_loss=1.0 - 0.01 * h["epoch"], val_xent=0.5 + 0.001 * h["epoch"]) for h in hist]
    assert [ax.get_yscale() for ax in figures.plot_curves(flat, 3, tmp_path / "f.png").axes] == ["linear"] * 4


def test_lpft_figure_gives_fine_tuning_its_own_panels(tmp_path):
    lp, ft = history(30, 25), [dict(h, val_err=0.0) for h in history(2, 1, start=0.09)]
    ft[0]["val_xent"] = lp[25]["val_xent"]
    fig = figures.plot_lpft(lp, 25, ft, 1, tmp_path / "l.png", "x")
    ax_lp, ax_ft, err_lp, err_ft = fig.axes
    assert ax_ft.get_xlim()[0] <= 0 and ax_ft.get_xlim()[1] < 3  # FT epochs from 0: its own axis, not 25..27
    assert ax_lp.get_xlim()[1] >= 30
    width = [ax.get_position().width for ax in fig.axes]
    assert min(width) > 0.8 * max(width)  # the two FT epochs get a panel as wide as the 30 probe epochs
    assert "FT epoch" in ax_ft.get_xlabel() and ax_lp.get_xlabel() == "LP epoch"
    assert err_ft.get_ylim()[0] >= 0  # a flat error curve gets no negative axis


def test_grid_colours_by_the_selection_metric_with_a_sane_range_for_a_constant_grid(tmp_path):
    cells = [dict(lr=lr, l2=l2, status="done", val_err=0.0, val_xent=0.1 * (i + 1))
             for i, (lr, l2) in enumerate([(1, 0), (2, 0), (1, 1), (2, 1)])]
    fig = figures.plot_grid(cells, [1, 2], [0, 1], tmp_path / "g.png", metric="val_xent")
    image = fig.axes[0].images[0]
    assert np.asarray(image.get_array()).ravel().tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert image.get_clim() == pytest.approx((0.1, 0.4))
    assert "val cross-entropy" in fig.axes[1].get_ylabel()
    flat = figures.plot_grid(cells, [1, 2], [0, 1], tmp_path / "e.png", metric="val_err")
    assert flat.axes[0].images[0].get_clim() == pytest.approx((0.0, 1e-3))  # all zero: [v, v + 1e-3], not -0.1..0.1
    assert [t.get_text() for t in flat.axes[0].texts] == ["0.000"] * 4


# -- a real sweep ---------------------------------------------------------------------------------
def test_a_tiny_sweep_stores_the_verdict_numbers_and_export_takes_its_top_row(tiny_folder, tmp_path):
    from transferlab.cli.main import main
    from transferlab.core.predictions import read_test_predictions

    out = tmp_path / "s"
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(out), "--backbones", "efficientnet_lite0",
                 "--lr", "1e-4,1e-2", "--l2", "0", "--seeds", "0", "--epochs", "2", "--lpft", "--ft-layers", "2",
                 "--ft-lr", "1e-4", "--ft-epochs", "1", "--ft-wise", "0", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        hashes = [ledger.choice(r["backbone"], r["method"]) for r in rows]
    finally:
        ledger.close()
    stored = [read_test_predictions(sweep_predictions_path(out, h)) for h in hashes]
    # Every row's Wilson interval from its stored predictions.
    for row, pred in zip(rows, stored):
        k, n = int((pred["probs"].argmax(1) == pred["labels"]).sum()), len(pred["labels"])
        assert row["test_acc"] == pytest.approx(k / n)
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert (row["test_acc_ci_low"], row["test_acc_ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # The paired numbers of the other row against the best, from the stored predictions.
    best = next(i for i, r in enumerate(rows) if r["rank"] == 1)
    other = 1 - best
    right = [p["probs"].argmax(1) == p["labels"] for p in stored]
    only_best, only_other = int((right[best] & ~right[other]).sum()), int((right[other] & ~right[best]).sum())
    p = 1.0 if only_best + only_other == 0 else binomtest(only_other, only_best + only_other).pvalue
    assert rows[other]["diff_vs_best"] == pytest.approx(right[other].mean() - right[best].mean(), abs=1e-12)
    assert rows[other]["p_vs_best"] == pytest.approx(p, abs=1e-12)
    # The limits: 2 probe epochs and 1 fine-tuning epoch are caps; the grids by their definitions.
    lp, ft = (next(r for r in rows if r["method"] == m) for m in ("LP", "LP-FT"))
    expected_lp = ([f"best epoch {lp['best_epoch']} of 2: not converged, raise --epochs"] if lp["best_epoch"] == 2 else [])
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        xent = {r["config"]["lr"]: r["metrics"]["val_xent"] for r in ledger.runs(lp["backbone"], "LP") if r["status"] == "done"}
    finally:
        ledger.close()
    # an edge is flagged when it beats its neighbour by more than 1%, with both numbers (one seed, one l2: one run per lr)
    inner = {0.01: 0.0001, 0.0001: 0.01}[lp["lr"]]
    where = "top" if lp["lr"] == 0.01 else "bottom"
    assert xent[inner] - xent[lp["lr"]] > 0.01 * xent[inner]
    expected_lp += [f"--lr {lp['lr']:g} is at the {where} of its grid (val xent {xent[lp['lr']]:.4g} there, {xent[inner]:.4g} "
                    f"at {inner:g}): extend the grid"]
    assert lp["warnings"] == expected_lp
    assert lp["best_epoch"] == 2 and lp["lr"] == 0.01  # this data set learns to the cap at the top lr: both are flagged
    expected_ft = ["best epoch 1 of 1: not converged, raise --ft-epochs"] if ft["best_epoch"] == 1 else []
    assert ft["warnings"] == expected_ft + ["interpolation a = 0: fine-tuning did not help; the probe stands"]
    # transferlab export takes the report's top row.
    assert main(["export", str(out), "--out", str(tmp_path / "model")]) == 0
    provenance = json.loads((tmp_path / "model" / "config.json").read_text())["provenance"]
    assert provenance["run_hash"] == hashes[best] and provenance["method"] == rows[best]["method"]
    page = (out / "report.html").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", page)[0].startswith("Verdict")
    assert html.escape(f"transferlab export takes efficientnet_lite0 {rows[best]['method']}") in page.split("<h2>")[1]
    # --ft-wise 0: LP-FT is the probe itself, its stored predictions are the probe's and the page shows them once.
    assert np.array_equal(stored[0]["probs"].argmax(1), stored[1]["probs"].argmax(1))
    assert np.abs(stored[0]["probs"] - stored[1]["probs"]).max() <= 1e-6
    assert "efficientnet_lite0 LP and efficientnet_lite0 LP-FT" in page and "this section applies to 2 models" in page


def test_a_rebuilt_report_leaves_no_figure_or_insight_of_another_grid(tmp_path):
    out = make_sweep(tmp_path / "s")
    build_report(out)
    drawn = sorted(p.name for p in (out / "figures").iterdir())
    insight = sorted(p.name for p in (out / "insight").iterdir())
    (out / "figures" / "curves_gone_backbone.png").write_bytes(b"an earlier grid's figure")
    (out / "insight" / "gone_backbone_LP").mkdir()
    (out / "figures" / "notes.txt").write_text("not the report's")
    build_report(out)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(drawn + ["notes.txt"])
    assert sorted(p.name for p in (out / "insight").iterdir()) == insight


def test_the_fine_tuning_panels_do_not_zoom_to_noise(tmp_path):
    lp = history(10, 9)
    ft = [dict(epoch=e, train_loss=None, train_xent=None, train_err=None, val_xent=0.05076 - 0.00007 * e, val_err=0.02)
          for e in range(3)]  # a 0.3% change of val xent, a flat val error
    fig = figures.plot_lpft(lp, 9, ft, 2, tmp_path / "l.png")
    ax_ft, err_ft = fig.axes[1], fig.axes[3]
    low, high = ax_ft.get_ylim()
    assert high - low >= 0.10 * 0.05069 - 1e-12  # at least 10% of the level
    low, high = err_ft.get_ylim()
    assert high - low >= 0.02 - 1e-12 and low >= 0  # at least 2 points of error


def test_a_model_without_source_top1_gets_no_legend_entry_for_a_point_not_drawn(tmp_path):
    rows = [dict(source="imagenet1k", source_top1=75.1, arch="lite0", method="LP", test_acc=0.9),
            dict(source="unknown", source_top1=None, arch="hf:x", method="LP", test_acc=0.97)]
    fig = figures.plot_transfer(rows, tmp_path / "t.png")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["LP", "lite0"]


def test_class_names_are_not_read_as_maths_in_the_confusion_matrix(monkeypatch):
    from transferlab.reporting import insight

    drawn = []
    monkeypatch.setattr(insight, "_png", lambda fig: drawn.append(fig) or b"")
    insight.plot_confusion(np.eye(2, dtype=int), ["$x^2$", "p$_{low}$q"], "a $b$ model")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [r"\$x^2\$", r"p\$_{low}\$q"]
    assert ax.get_title() == r"a \$b\$ model"


def test_models_with_the_same_predicted_classes_share_one_per_class_section_with_each_ones_calibration(tmp_path):
    out = make_sweep(tmp_path / "s")
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        ft_hash = ledger.choice(ALPHA, "LP-FT")
    finally:
        ledger.close()
    # alpha LP-FT: the same predicted class as alpha LP on every image, with other confidences (0.6, not 0.8)
    predicted = np.where(ALPHA_RIGHT, LABELS, (LABELS + 1) % len(CLASSES))
    probs = np.full((N, len(CLASSES)), 0.1)
    probs[np.arange(N), predicted] = 0.6
    write_test_predictions(sweep_predictions_path(out, ft_hash), CLASSES, FILES, LABELS, probs)
    build_report(out)
    page = (out / "report.html").read_text()
    insight = page.split("Per-class insight (test)</h2>")[1]
    assert insight.count("<details") - insight.count("<details><summary>Per-class recall") == 2  # beta's, and alpha's shared one
    assert html.escape("the same predicted class on every test image: the per-class numbers apply to 2 models") in insight
    # ECE by hand: one confidence level per model, so one bin: |accuracy - confidence| = |0.9 - 0.8| and |0.9 - 0.6|
    assert f"{ALPHA} LP 0.1000, {ALPHA} LP-FT 0.3000" in html.unescape(insight)


def test_the_grid_outlines_the_chosen_probe(tmp_path):
    cells = [dict(lr=lr, l2=l2, status="done", val_xent=x, val_err=0.1) for (lr, l2), x in
             {(1e-3, 0.0): 0.5, (1e-2, 0.0): 0.3, (1e-3, 1.0): 0.6, (1e-2, 1.0): 0.4}.items()]
    fig = figures.plot_grid(cells, [1e-3, 1e-2], [0.0, 1.0], tmp_path / "g.png", metric="val_xent", chosen=(1e-2, 0.0))
    outlined = [p for p in fig.axes[0].patches if p.get_label() == "chosen"]
    assert len(outlined) == 1 and outlined[0].get_xy() == (0.5, -0.5)  # column lr 1e-2 (j = 1), row l2 0 (i = 0)

"""reporting.sweep_page: the sweep report's HTML page, section by section, from hand-made summary rows.

The rows carry every SUMMARY_KEYS column with values chosen here, so each line of the page is checked
against what the module docstring and the section docstrings promise: the verdict in rank order with the
best marked, the LP-then-FT line, the optimizer that trained the chosen runs, the section order, small
figures side by side, every name escaped.
"""

import base64
import html
import re

from transferlab.reporting.summary import SUMMARY_KEYS
from transferlab.reporting.sweep_page import render_html, verdict_html
from transferlab.reporting.verdict import resolution_sentence
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import SweepManifest, write_manifest

HOSTILE = "net<script>"


def row(backbone, method, rank, **values):
    """A summary row: every column None but those given."""
    base = dict.fromkeys(SUMMARY_KEYS) | {"backbone": backbone, "method": method, "rank": rank, "warnings": [], "val_xent": 0.1 * rank,
                                          "val_err": 0.05 * rank, "select": "val_xent"}
    return base | values


def test_a_verdict_without_choices_says_so():
    page = verdict_html([], "val_xent", None)
    assert page.startswith('<section class="verdict" id="verdict">') and "No model was chosen yet" in page


def test_the_verdict_lists_models_in_rank_order_with_the_best_marked_and_names_escaped():
    rows = [row("b", "LP", 3, test_acc=0.7),  # no paired comparison with the best
            row(HOSTILE, "LP", 1, test_acc=0.9, test_acc_ci_low=0.85, test_acc_ci_high=0.95),
            row("a", "LP-FT", 2, test_acc=0.8, diff_vs_best=-0.1, ci_low_vs_best=-0.2, ci_high_vs_best=-0.01, p_vs_best=0.012,
                n_differ_vs_best=12, warnings=["w1", "w2"])]
    page = verdict_html(rows, "val_xent", 200)
    table_rows = re.findall(r"<tr(?: class=best)?><td>(\d)</td>", page)
    assert table_rows == ["1", "2", "3"]
    assert f'<tr class=best><td>1</td><td class="model">{html.escape(HOSTILE)} LP</td>' in page and "<script>" not in page
    assert "<td>90.0 [85.0, 95.0]</td><td>best</td>" in page
    assert "<td>-10.0 [-20.0, -1.0]</td><td>0.012</td>" in page
    assert "<td>not paired</td><td>–</td>" in page
    assert '<span class="warn">2 warning(s)</span>' in page
    assert html.escape(resolution_sentence(200)) in page
    assert "a LP-FT: w1; w2" in page  # the limits list, one line per model with warnings


def test_the_page_has_its_sections_in_order_and_small_figures_side_by_side(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    write_manifest(ledger, SweepManifest(backbones=["m"], command="transferlab sweep --data x", objective="loss = xent",
                                         grid={"lp": {"lr": [0.1, 0.01], "optimizer": ["sgd"], "momentum": [0.5]}}))
    pngs = {}
    for name in ("big", "small1", "small2", "big2"):
        pngs[name] = tmp_path / f"{name}.png"
        pngs[name].write_bytes(name.encode())
    made = [("Big one", pngs["big"], False), ("Small one", pngs["small1"], True), ("Small two", pngs["small2"], True),
            ("Last", pngs["big2"], False)]
    page = render_html(ledger, [], made, insights="<h2>Per-class insight (test)</h2>")
    ledger.close()
    assert re.findall(r"<h2>(.*?)</h2>", page) == [
        "Verdict: which model, and is the difference real?", "Test accuracy: LP vs LP-then-FT", "Chosen hyperparameters (on validation only)",
        "Loss", "Data", "Figures", "Per-class insight (test)", "Reproduce"]
    # Nothing chosen: the optimizer is the one the probe grid fixes.
    assert "<pre>loss = xent</pre><p>SGD with momentum 0.5, minibatches." in page
    figures = page.split("<h2>Figures</h2>")[1]
    img = {name: base64.b64encode(name.encode()).decode() for name in pngs}
    found = re.search(r"<div class=row>(.*?)</div>", figures)
    assert found is not None
    side_by_side = found.group(1)
    assert img["small1"] in side_by_side and img["small2"] in side_by_side and img["big"] not in side_by_side
    assert figures.index(img["big"]) < figures.index("<div class=row>") < figures.index(img["big2"])
    assert page.endswith("<h2>Reproduce</h2><pre>transferlab sweep --data x</pre></body></html>")


def test_the_lpft_line_and_the_optimizers_come_from_the_chosen_runs(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    write_manifest(ledger, SweepManifest(backbones=[HOSTILE]))

    def chosen(run_hash, method, cfg):
        ledger.mark_running(run_hash, HOSTILE, method, cfg)
        ledger.finish(run_hash, "done", {}, [{"epoch": e, "train_err": 0.25 * e} for e in range(3)], {})
        ledger.choose(HOSTILE, method, run_hash)

    chosen("lp", "LP", {"optimizer": "sgd", "momentum": 0.8})
    chosen("ft", "LP-FT", {})
    lp = row(HOSTILE, "LP", 2, test_acc=0.80, best_epoch=2, n_trainable_layers=1)
    ft = row(HOSTILE, "LP-FT", 1, test_acc=0.90, best_epoch=4, n_trainable_layers=7, ft_unit="blocks:2", ft_augment="none", ft_l2sp=0.1,
             label_smoothing=0.0, wise_alpha=0.5, p_mcnemar=0.01, ci_low=0.02, ci_high=0.18)
    page = render_html(ledger, [lp, ft], [])
    ledger.close()
    line = page.split("<h3>What LP-then-FT did</h3><ul><li>")[1].split("</li>")[0]
    assert line.startswith(f"{html.escape(HOSTILE)}: fine-tuning the last 2 blocks (7 layers) from the best probe "
                           "(augmentation none, L2-SP 0.1, label smoothing 0, weights interpolated with the probe's at a = 0.5) improved")
    assert "(80.0% &rarr; 90.0%, +10.0 points;" in line
    assert "the probe's train error at its best epoch was 0.500" in line  # history[2] of the chosen probe
    assert "95% bootstrap interval [+2.0, +18.0] points, McNemar p = 0.01: more than noise." in line
    # The two methods trained with different optimizers: each is named.
    assert "LP: SGD with momentum 0.8; LP-FT: Adam, minibatches." in page

"""The verdict's numbers against hand computations and the libraries' references."""

import numpy as np
import pytest

from transferlab.reporting.compare import paired_comparison
from transferlab.reporting.verdict import ModelPredictions, comparison_sentence, limit_warnings, rank, resolution_sentence, verdict_numbers, wilson_interval


def test_wilson_interval_matches_the_formula_and_scipy():
    # 98 of 100 by hand: centre (0.98 + z^2/200) / (1 + z^2/100), half-width z sqrt(0.98*0.02/100 + z^2/40000) / (1 + z^2/100)
    low, high = wilson_interval(98, 100)
    assert (low, high) == pytest.approx((0.929988, 0.994498), abs=1e-6)
    from scipy.stats import binomtest

    for k, n in [(0, 20), (7, 20), (20, 20), (2999, 3000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_rank_follows_the_selection_metric_then_the_other_then_position():
    rows = [{"val_xent": 0.5, "val_err": 0.1}, {"val_xent": 0.4, "val_err": 0.2}, {"val_xent": 0.4, "val_err": 0.1},
            {"val_xent": 0.4, "val_err": 0.1}]
    assert rank(rows, "val_xent") == [2, 3, 1, 0]
    assert rank(rows, "val_err") == [2, 3, 0, 1]


def test_every_model_is_compared_with_the_best_on_the_same_images():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    files = tuple(f"f{i}" for i in range(10))
    best = ModelPredictions(files, labels, labels.copy())                        # 10 of 10
    worse = ModelPredictions(files, labels, np.where(np.arange(10) < 3, 1 - labels, labels))  # 7 of 10
    rows = [{"val_xent": 0.9, "val_err": 0.3}, {"val_xent": 0.1, "val_err": 0.0}]
    numbers = verdict_numbers(rows, [worse, best], "val_xent")
    assert [n["rank"] for n in numbers] == [2, 1]
    assert numbers[1]["diff_vs_best"] is None and numbers[1]["p_vs_best"] is None
    ref = paired_comparison(labels, best.predicted, worse.predicted)
    assert numbers[0]["diff_vs_best"] == pytest.approx(-0.3) and numbers[0]["n_differ_vs_best"] == 3
    assert (numbers[0]["ci_low_vs_best"], numbers[0]["ci_high_vs_best"], numbers[0]["p_vs_best"]) == (ref.ci_low, ref.ci_high, ref.p_mcnemar)
    assert numbers[0]["p_vs_best"] == pytest.approx(2 * 0.5**3)  # McNemar: 3 discordant images, all one way
    assert (numbers[0]["test_acc_ci_low"], numbers[0]["test_acc_ci_high"]) == wilson_interval(7, 10)
    # Other images: no paired test.
    other = ModelPredictions(tuple(f"g{i}" for i in range(10)), labels, labels)
    assert verdict_numbers(rows, [other, best], "val_xent")[0]["p_vs_best"] is None


def test_sentences_say_whether_a_difference_is_real():
    best = {"backbone": "lite2", "method": "LP"}
    tied = {"backbone": "lite0", "method": "LP", "diff_vs_best": -0.01, "ci_low_vs_best": -0.03, "ci_high_vs_best": 0.01,
            "p_vs_best": 1.0, "n_differ_vs_best": 3}
    assert comparison_sentence(tied, best) == ("lite0 LP is 1.0 pt below lite2 LP on this test set (3 discordant images, "
                                               "95% CI [-3.0, +1.0] pt, McNemar p = 1): they cannot be told apart.")
    worse = dict(tied, ci_high_vs_best=-0.005, p_vs_best=0.012)
    assert comparison_sentence(worse, best).endswith("McNemar p = 0.012): a real difference.")
    better = dict(tied, diff_vs_best=0.02, ci_low_vs_best=0.005, ci_high_vs_best=0.04)
    assert comparison_sentence(better, best).startswith("lite0 LP is 2.0 pt above lite2 LP")
    assert comparison_sentence(better, best).endswith(": better, though validation ranked it lower.")
    same = dict(tied, diff_vs_best=0.0, ci_low_vs_best=0.0, ci_high_vs_best=0.0, n_differ_vs_best=0)
    assert "right and wrong on exactly the same test images" in comparison_sentence(same, best)
    assert resolution_sentence(300) == "300 test images: one image = 0.33 points."
    assert resolution_sentence(100) == "100 test images: one image = 1 point."
    assert resolution_sentence(1) == "1 test image: one image = 100 points."  # not '1e+02'
    assert resolution_sentence(7) == "7 test images: one image = 14 points."


def test_limits_are_flagged_at_the_epoch_cap_the_grid_edges_and_a_kept_probe():
    grids = {"--lr": [1e-4, 1e-3, 1e-2], "--l2": [0.0, 0.01, 1.0], "--seeds": [0]}
    assert limit_warnings(12, 100, "--epochs", {"--lr": 1e-3, "--l2": 0.01}, grids) == []
    warnings = limit_warnings(100, 100, "--epochs", {"--lr": 1e-2, "--l2": 0.0}, grids, wise_alpha=0.0)
    assert warnings == ["best epoch 100 of 100: not converged, raise --epochs",
                        "--lr 0.01 is at the top of its grid: extend the grid",
                        "interpolation a = 0: fine-tuning did not help; the probe stands"]
    assert limit_warnings(3, 100, "--epochs", {"--lr": 1e-4}, grids) == ["--lr 0.0001 is at the bottom of its grid: extend the grid"]


def test_a_run_the_epoch_cap_ended_within_its_patience_is_not_converged():
    # best 99 of 100, patience 15: early stopping would have waited until epoch 114, so the cap ended it
    assert limit_warnings(99, 100, "--epochs", {}, {}, epochs_run=100, patience=15) == [
        "best epoch 99 of 100, and the epoch cap, not early stopping, ended the run: not converged, raise --epochs"]
    # best 85 of 100, patience 15: early stopping ends it at epoch 100 itself
    assert limit_warnings(85, 100, "--epochs", {}, {}, epochs_run=100, patience=15) == []
    # stopped early at 40 of 100
    assert limit_warnings(25, 100, "--epochs", {}, {}, epochs_run=40, patience=15) == []


def test_a_grid_edge_is_flagged_only_where_it_beats_its_neighbour_by_more_than_one_percent():
    grids = {"--lr": [1e-3, 1e-2], "--l2": [0.0, 0.01]}
    scores = {"--lr": {1e-3: 0.138, 1e-2: 0.0757}, "--l2": {0.0: 0.075881, 0.01: 0.075723}}  # l2: 0.2% apart, noise
    assert limit_warnings(3, 100, "--epochs", {"--lr": 1e-2, "--l2": 0.01}, grids, scores=scores) == [
        "--lr 0.01 is at the top of its grid (val xent 0.0757 there, 0.138 at 0.001): extend the grid"]


def test_an_early_best_epoch_is_no_warning_even_when_early_stopping_could_not_trigger():
    # --epochs 15 --patience 15: the cap always ends the run; best epoch 3 had 12 epochs to improve and did not
    assert limit_warnings(3, 15, "--epochs", {}, {}, epochs_run=15, patience=15) == []
    assert limit_warnings(14, 15, "--epochs", {}, {}, epochs_run=15, patience=15) == [
        "best epoch 14 of 15, and the epoch cap, not early stopping, ended the run: not converged, raise --epochs"]

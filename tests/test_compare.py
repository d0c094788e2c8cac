"""Paired LP vs LP-FT statistics, against hand computations on tiny made-up predictions."""

import math

import numpy as np
import pytest

from transferlab.reporting.compare import mcnemar_exact_p, paired_bootstrap_ci, paired_comparison


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    # 1 discordant image for a, 5 for b: P(X <= 1) + P(X >= 5) for X ~ Bin(6, 1/2) = (1 + 6 + 6 + 1) / 64.
    assert mcnemar_exact_p(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(3, 3) == pytest.approx(1.0)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 8) == pytest.approx(2 / 256)


def test_paired_comparison_counts_discordant_images_and_the_difference():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    a = np.array([0, 1, 2, 1, 0, 2, 0, 1])  # wrong on images 3, 4
    b = np.array([0, 1, 2, 0, 1, 0, 0, 2])  # wrong on images 5, 7
    c = paired_comparison(labels, a, b, n_resamples=2000)
    assert (c.n, c.acc_a, c.acc_b, c.diff) == (8, 6 / 8, 6 / 8, 0.0)
    assert (c.only_a_right, c.only_b_right) == (2, 2) and c.p_mcnemar == pytest.approx(1.0)
    assert c.ci_low <= 0.0 <= c.ci_high


def test_bootstrap_interval_of_an_identical_pair_is_a_point_and_of_a_constant_gap_is_that_gap():
    right = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    assert paired_bootstrap_ci(right, right, n_resamples=500) == (0.0, 0.0)
    # b right everywhere, a right nowhere: every resample's difference is exactly 1.
    assert paired_bootstrap_ci(np.zeros(5, bool), np.ones(5, bool), n_resamples=500) == (1.0, 1.0)


def test_bootstrap_interval_matches_the_normal_approximation_on_a_large_sample():
    rng = np.random.default_rng(1)
    n = 3000
    a = rng.random(n) < 0.88
    b = a.copy()
    flip = rng.choice(n, 90, replace=False)
    b[flip] = ~b[flip]
    low, high = paired_bootstrap_ci(a, b, seed=0)
    d = b.astype(float) - a.astype(float)
    se = d.std(ddof=1) / math.sqrt(n)
    assert low == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se + 1e-3)
    assert high == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se + 1e-3)
    assert paired_bootstrap_ci(a, b, seed=0) == (low, high)  # seeded: the same interval again

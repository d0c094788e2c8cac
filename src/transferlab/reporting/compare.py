"""Is a difference between two classifiers on the same test images more than noise?

Paired statistics on per-image correctness (numpy and scipy only, no torch):
- the accuracy difference ``acc_b - acc_a``;
- a 95% paired bootstrap interval for it: resample test images with replacement (10,000 times, a
  seeded generator), the same resample for both classifiers, percentile interval;
- McNemar's exact test: among the discordant images (right for one, wrong for the other), the
  count where b is right is Binomial(n_discordant, 1/2) under "no difference"; two-sided p-value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedComparison:
    """b against a on the same images: difference in accuracy, its 95% interval, McNemar's p."""

    n: int
    acc_a: float
    acc_b: float
    diff: float  # acc_b - acc_a
    ci_low: float
    ci_high: float
    only_a_right: int  # discordant images a got right and b wrong
    only_b_right: int
    p_mcnemar: float

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact_p(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact McNemar p-value (1.0 when there is no discordant image)."""
    from scipy.stats import binomtest

    n = only_a_right + only_b_right
    if n == 0:
        return 1.0
    return float(binomtest(only_b_right, n, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap_ci(correct_a: np.ndarray, correct_b: np.ndarray, n_resamples: int = N_RESAMPLES,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of acc_b - acc_a over `n_resamples` paired resamples of the images."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    n = len(a)
    for start in range(0, n_resamples, 1000):  # chunks bound the memory of the index matrix
        idx = rng.integers(0, n, size=(min(1000, n_resamples - start), n))
        diffs[start : start + len(idx)] = b[idx].mean(1) - a[idx].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return float(low), float(high)


def paired_comparison(labels, pred_a, pred_b, n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Compare predictions `pred_b` with `pred_a` against `labels` (same images, same order)."""
    labels, pred_a, pred_b = np.asarray(labels), np.asarray(pred_a), np.asarray(pred_b)
    if not (len(labels) == len(pred_a) == len(pred_b)) or len(labels) == 0:
        raise ValueError("paired comparison needs the same, non-empty set of images for both classifiers")
    ra, rb = pred_a == labels, pred_b == labels
    only_a, only_b = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    low, high = paired_bootstrap_ci(ra, rb, n_resamples, seed)
    return PairedComparison(len(labels), float(ra.mean()), float(rb.mean()), float(rb.mean() - ra.mean()), low, high,
                            only_a, only_b, mcnemar_exact_p(only_a, only_b))

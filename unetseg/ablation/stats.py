"""Paired comparisons of two variants over the same validation cases.

Each case's score is first averaged over seeds, so the unit of the test is the
case; the difference is ``variant - reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import fisher_exact, wilcoxon


def bootstrap_ci(
    differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``differences`` (cases resampled with replacement)."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1.0 when every difference is zero."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    if not np.any(d):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparison(variant: Sequence[float], reference: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean difference, its 95 % bootstrap CI and the Wilcoxon p-value of ``variant - reference``.

    Args:
        variant, reference: one score per case, same case order; NaN pairs are dropped.
    """
    v, r = np.asarray(variant, dtype=float), np.asarray(reference, dtype=float)
    if v.shape != r.shape:
        raise ValueError(f"paired scores need the same cases, got {v.shape} and {r.shape}")
    d = v - r
    d = d[np.isfinite(d)]
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"mean_diff": float(d.mean()) if d.size else float("nan"), "ci_low": lo, "ci_high": hi,
            "wilcoxon_p": wilcoxon_p(d), "cases": int(d.size)}


def rate_difference_p(hits_a: int, total_a: int, hits_b: int, total_b: int) -> float:
    """Two-sided Fisher exact p that ``hits_a / total_a`` and ``hits_b / total_b`` come from the same rate."""
    if min(total_a, total_b) == 0:
        return float("nan")
    return float(fisher_exact([[hits_a, total_a - hits_a], [hits_b, total_b - hits_b]]).pvalue)

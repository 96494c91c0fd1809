"""Paired comparisons of two variants over the same validation cases and seeds.

Case level (:func:`paired_comparison`): each case's score is first averaged
over seeds, so the unit of the test is the case and seed-to-seed variation is
left out. Seed level (:func:`t_interval`, :func:`hierarchical_bootstrap_ci`):
the unit is the trained network. :func:`holm` adjusts a family of p-values.
The difference is always ``variant - reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import fisher_exact, t, wilcoxon


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
    p = wilcoxon_p(d)
    return {"mean_diff": float(d.mean()) if d.size else float("nan"), "ci_low": lo, "ci_high": hi,
            "wilcoxon_p": p, "cases": int(d.size), "p_floor": exact_p_floor(int(d.size)),
            "at_floor": bool(d.size and np.isclose(p, exact_p_floor(int(d.size)), rtol=1e-6, atol=0))}


def exact_p_floor(n: int) -> float:
    """Smallest two-sided p the exact signed-rank test can give with ``n`` paired differences: ``2 / 2**n``.

    Reached when every difference has the same sign; a p at this floor says
    "all n agree", not how small the true p is.
    """
    return 2.0 / 2.0**n if n > 0 else float("nan")


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` with its Student-t confidence interval (``n - 1`` degrees of freedom).

    Non-finite values are dropped. Returns ``{"mean", "low", "high", "n", "dof", "t_p"}``, where ``t_p`` is the
    two-sided one-sample t-test p of mean 0; the interval and p are NaN for fewer than 2 values, the interval
    collapses to the mean when all values are equal.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n, "dof": max(n - 1, 0), "t_p": float("nan")}
    se = float(v.std(ddof=1) / np.sqrt(n))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * t.sf(abs(mean) / se, n - 1)) if se > 0 else (1.0 if mean == 0 else 0.0)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "dof": n - 1, "t_p": p}


def hierarchical_bootstrap_ci(differences: np.ndarray, confidence: float = 0.95, resamples: int = 10_000,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean paired difference, resampling seeds, then cases within each drawn seed.

    Args:
        differences: ``(seeds, cases)``: variant minus reference for the same seed and case; NaN
            entries (a case undefined for that seed) are left out of the means.
    Returns:
        ``(low, high)``; NaN when no difference is finite.
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 2:
        raise ValueError(f"differences must be (seeds, cases), got shape {d.shape}")
    if not np.isfinite(d).any():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, d.shape[0], size=(resamples, d.shape[0]))
    cases = rng.integers(0, d.shape[1], size=(resamples, d.shape[0], d.shape[1]))
    drawn = d[seeds[:, :, None], cases]
    finite = np.isfinite(drawn)
    means = np.where(finite, drawn, 0).sum(axis=(1, 2)) / np.maximum(finite.sum(axis=(1, 2)), 1)
    means = means[finite.any(axis=(1, 2))]
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (NaN stays NaN and does not count as a test).

    The k-th smallest of m p-values becomes ``max over j <= k of (m - j + 1) p_(j)``, capped at 1; rejecting
    where the adjusted p < alpha controls the family-wise error rate at alpha.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return [float(x) for x in out]


def rate_difference_p(hits_a: int, total_a: int, hits_b: int, total_b: int) -> float:
    """Two-sided Fisher exact p that ``hits_a / total_a`` and ``hits_b / total_b`` come from the same rate."""
    if min(total_a, total_b) == 0:
        return float("nan")
    return float(fisher_exact([[hits_a, total_a - hits_a], [hits_b, total_b - hits_b]]).pvalue)

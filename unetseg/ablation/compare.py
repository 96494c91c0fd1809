"""Scores of a study's runs and comparisons between two variants, with the case and with the seed as the unit.

A run's ``per_case.json`` gives one score per validation case; a variant has
one run per seed. :func:`compare` pairs a variant with its reference twice:

- case level: each case averaged over seeds, then case by case (bootstrap CI
  and Wilcoxon p over cases; seed-to-seed variation left out);
- seed level: seed k of the variant minus seed k of the reference (the same
  data order and augmentation), a Student-t interval over those per-seed
  differences (``n_seeds - 1`` degrees of freedom), and a seed x case
  hierarchical bootstrap (resample seeds, then cases within each seed).

Runs that never learnt a class (:func:`collapsed_classes`) stay in every
statistic; :func:`compare` names them so the report can flag each cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unetseg.ablation.stats import hierarchical_bootstrap_ci, holm, paired_comparison, t_interval
from unetseg.runlog import as_float

# A run whose mean Dice over the validation cases stays below this for a foreground class never learnt
# that class (it predicts background, or the other class, there): a failed optimisation, reported apart.
COLLAPSE_DICE = 0.1

PerCase = dict[str, Any]  # a run's per_case.json
SeedRuns = dict[int, PerCase]  # one variant: {seed: per_case}


def nanmean(values: Any) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    a = np.asarray(values, dtype=float)
    finite = a[np.isfinite(a)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample std (ddof 1; 0 for one value) over finite values, and the values themselves."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0, "per_seed": [float(x) for x in v]}


def case_scores(per_case: PerCase, key: str) -> dict[str, float]:
    """Per case id: ``dice_<class>`` / ``hd95_<class>``, or ``mean_dice`` (mean over foreground classes)."""
    names = per_case["class_names"][1:]
    out = {}
    for row in per_case["cases"]:
        if key == "mean_dice":
            out[row["case_id"]] = nanmean([row[f"dice_{n}"] for n in names])
        else:
            out[row["case_id"]] = as_float(row[key])
    return out


def seed_mean(per_case: PerCase, key: str) -> float:
    """One seed's score: ``mean_dice`` is the mean over classes of the per-class case means (as in ``summarize``)."""
    names = per_case["class_names"][1:]
    if key == "mean_dice":
        return nanmean([seed_mean(per_case, f"dice_{n}") for n in names])
    return nanmean(list(case_scores(per_case, key).values()))


def seed_averaged_cases(per_cases: Sequence[PerCase], key: str) -> dict[str, float]:
    """Per case id, the score averaged over seeds (NaN seeds skipped)."""
    tables = [case_scores(p, key) for p in per_cases]
    return {i: nanmean([t[i] for t in tables]) for i in tables[0]}


def collapsed_classes(per_case: PerCase) -> list[str]:
    """Foreground classes whose seed mean Dice is below :data:`COLLAPSE_DICE` (NaN counts as not collapsed)."""
    return [c for c in per_case["class_names"][1:] if seed_mean(per_case, f"dice_{c}") < COLLAPSE_DICE]


def collapsed_seeds(runs: SeedRuns) -> list[int]:
    """Seeds whose run collapsed on any class."""
    return sorted(s for s, p in runs.items() if collapsed_classes(p))


def healthy_mean_dice(runs: SeedRuns) -> dict[str, Any]:
    """Mean Dice over the seeds whose run did not collapse: ``{"mean", "std", "per_seed", "seeds"}``."""
    kept = {s: p for s, p in runs.items() if not collapsed_classes(p)}
    return {**mean_std([seed_mean(p, "mean_dice") for p in kept.values()]), "seeds": sorted(kept)}


def seed_case_differences(a: SeedRuns, b: SeedRuns, key: str) -> tuple[list[int], np.ndarray]:
    """Seeds both variants ran and their per-case differences ``a - b``: ``(seeds, (len(seeds), cases))``.

    Cases are ``a``'s validation cases that ``b`` also scored, in ``a``'s order.
    """
    seeds = [s for s in sorted(a) if s in b]
    tables = {s: (case_scores(a[s], key), case_scores(b[s], key)) for s in seeds}
    ids = [i for i in tables[seeds[0]][0] if i in tables[seeds[0]][1]] if seeds else []
    return seeds, np.array([[tables[s][0][i] - tables[s][1][i] for i in ids] for s in seeds], dtype=float)


def compare(a: SeedRuns, b: SeedRuns, key: str) -> dict[str, Any]:
    """Variant ``a`` against reference ``b``, case by case and seed by seed.

    Returns :func:`paired_comparison` over their shared cases, each case averaged
    over seeds (so its CI and p leave out seed-to-seed variation), plus
    ``seeds`` (those both ran), ``seed_diffs`` (``seed_mean(a[s]) - seed_mean(b[s])`` for each),
    ``seed_level`` (:func:`t_interval` of ``seed_diffs`` plus ``boot_low``/``boot_high``, the
    :func:`hierarchical_bootstrap_ci` of the per-seed, per-case differences; for ``mean_dice`` a case's
    score is its mean over classes, so the bootstrap's centre can differ slightly from the t-interval's)
    and ``collapsed`` (the collapsed seeds of each side, all of them kept in every statistic).
    """
    ca, cb = seed_averaged_cases(list(a.values()), key), seed_averaged_cases(list(b.values()), key)
    ids = [i for i in ca if i in cb]
    seeds, diffs = seed_case_differences(a, b, key)
    seed_diffs = [float(seed_mean(a[s], key) - seed_mean(b[s], key)) for s in seeds]
    low, high = hierarchical_bootstrap_ci(diffs) if seeds else (float("nan"), float("nan"))
    return {**paired_comparison([ca[i] for i in ids], [cb[i] for i in ids]), "seeds": seeds,
            "seed_diffs": seed_diffs, "seed_level": {**t_interval(seed_diffs), "boot_low": low, "boot_high": high},
            "collapsed": {"variant": collapsed_seeds(a), "reference": collapsed_seeds(b)}}


def apply_holm(comparisons: Sequence[dict[str, Any]], family: str) -> None:
    """Add ``holm_p`` (Holm-adjusted Wilcoxon p over ``comparisons``), ``holm_family`` and ``holm_tests`` (the
    number of tests adjusted over) to each, in place."""
    adjusted = holm([c["wilcoxon_p"] for c in comparisons])
    tests = int(sum(np.isfinite(c["wilcoxon_p"]) for c in comparisons))
    for c, p in zip(comparisons, adjusted):
        c.update(holm_p=p, holm_family=family, holm_tests=tests)

"""The generated sentences of a study report ("What the numbers say"), from ``summary.json``'s numbers alone.

A difference is called only when the 95 % CI over cases excludes 0 and the Holm-adjusted Wilcoxon p < 0.05, and
each sentence says whether the seed-level interval agrees (:func:`_verdict`); no value is typed in by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from unetseg.ablation.tables import (
    boot_text,
    cmp_text,
    comparison_flag,
    ms,
    p_text,
    percent,
    seed_diffs_text,
    seed_level_text,
)


def _seed_agreement(c: dict[str, Any]) -> str:
    """How many seeds, compared seed by seed, point the way of the case-level difference."""
    diffs = c["seed_diffs"]
    if not diffs:
        return ""
    lower = sum(d < 0 for d in diffs)
    higher = sum(d > 0 for d in diffs)
    return f"; seed by seed {seed_diffs_text(c)}: {lower} of {len(diffs)} lower, {higher} higher"


MIN_CASES = 6  # fewer paired cases than this: no verdict (Wilcoxon cannot reach p < 0.05 below 6)


def _verdict(c: dict[str, Any]) -> str:
    """A difference counts only when the 95 % CI over cases excludes 0 and the Holm-adjusted Wilcoxon p < 0.05,
    over enough cases; the seed-level t-interval says whether it also holds with the trained network as the unit."""
    if c["cases"] < MIN_CASES or not (np.isfinite(c["ci_low"]) and np.isfinite(c["ci_high"])):
        return f"too few cases to judge ({c['cases']})"
    significant = c["holm_p"] < 0.05
    if c["ci_low"] > 0 and significant:
        case = "higher (CI above 0, Holm p < 0.05)"
    elif c["ci_high"] < 0 and significant:
        case = "lower (CI below 0, Holm p < 0.05)"
    else:
        return "not distinguishable from 0 at this budget"
    s = c["seed_level"]
    if not np.isfinite(s["low"]):
        return case
    excluded = s["low"] > 0 or s["high"] < 0
    return case + ("; the seed-level t-interval excludes 0 too" if excluded else
                   "; with seeds as the unit the t-interval contains 0")


def _with_seeds(c: dict[str, Any]) -> str:
    """The seed-level figures of a comparison, as a clause."""
    return (f"; seeds as the unit: {seed_level_text(c)} (t, {c['seed_level']['dof']} dof), seed × case bootstrap "
            f"{boot_text(c)}")


def _collapse_note(t: dict[str, Any], name: str) -> str:
    """A clause on ``name``'s collapsed seeds and its mean Dice without them ("" when none collapsed)."""
    healthy = t[name]["mean_dice_without_collapsed"]
    dropped = len(t[name]["seeds"]) - len(healthy["seeds"])
    if not dropped:
        return ""
    return (f" `{name}` has {dropped} collapsed seed(s); over its other seeds its mean Dice is "
            f"{ms(healthy)} (all seeds: {ms(t[name]['mean_dice'])}).")


def _comparison_findings(summary: dict[str, Any]) -> list[str]:
    """One sentence per variant against its reference, in the order of the argument, then the extra pairs."""
    t = summary["variants"]
    out = []

    def about(name: str, what: str) -> None:
        if name in t and "vs_reference" in t[name]:
            c = t[name]["vs_reference"]["mean_dice"]
            out.append(f"- {what}: mean Dice {cmp_text(c)} vs `{t[name]['reference']}`, "
                       f"Wilcoxon p = {p_text(c, long=True)}, Holm {c['holm_p']:.2g}, over {c['cases']} cases — "
                       f"{_verdict(c)}{_seed_agreement(c)}{_with_seeds(c)}."
                       + _collapse_note(t, name) + _collapse_note(t, t[name]["reference"]))

    about("noskip", "Removing every long skip")
    levels = sorted((n for n in t if n.startswith("skip_off_L")), key=lambda n: t[n]["vs_reference"]["mean_dice"]["mean_diff"])
    for name in levels:
        about(name, f"Removing only the level-{name.removeprefix('skip_off_L')} long skip")
    about("add", "Merging long skips by addition instead of concatenation")
    about("residual", "Adding residual short skips (long skips kept)")
    about("residual_noskip", "Removing long skips from the residual network")
    for name in summary.get("extra_variants", []):
        about(name, f"`{name}` ({t[name]['description']})")
    for label, c in summary["extra_comparisons"].items():
        out.append(f"- `{label}`: mean Dice {cmp_text(c)}, Wilcoxon p = {p_text(c, long=True)}, Holm {c['holm_p']:.2g} — "
                   f"{_verdict(c)}{_seed_agreement(c)}{_with_seeds(c)}.")
    return out


def _healthy_gap(gap: float | None) -> str:
    """A depth gap without collapsed runs (None: strict JSON's NaN, every seed of an arm collapsed)."""
    return f"{gap:+.3f}" if gap is not None and math.isfinite(gap) else "n/a (an arm has no run without a collapsed class)"


def _depth_findings(rows: list[dict[str, Any]]) -> list[str]:
    """The skip minus no-skip gap by depth: per case, with seeds as the unit, and without collapsed runs."""
    if not rows:
        return []
    gaps = [(r["depth"], r["gap"]["mean_diff"]) for r in rows]
    text = ", ".join(f"depth {d}: {g:+.3f}" for d, g in gaps)
    widening = all(b[1] > a[1] for a, b in zip(gaps, gaps[1:]))
    seeds = "; ".join(f"depth {r['depth']}: {seed_level_text(r['gap'])}{comparison_flag(r['gap'])}" for r in rows)
    healthy = ", ".join(f"depth {r['depth']}: {_healthy_gap(r['gap_without_collapsed'])}" for r in rows)
    trend = ("One depth only: no trend to read." if len(gaps) < 2 else
             "The point estimates grow with depth, as the degradation story predicts." if widening else
             "The point estimates do **not** grow with depth, contrary to the degradation story.")
    return [f"- Skip minus no-skip gap by depth (per-case mean; CIs in the depth figure): {text}. " + trend,
            f"- The same gaps with seeds as the unit (mean of per-seed differences, 95 % t-interval): {seeds}.",
            f"- The same gap between seed means with collapsed runs left out: {healthy}."]


def _collapse_finding(collapse: dict[str, Any]) -> str:
    """Which runs collapsed, and how often with and without long skips."""
    if not collapse["runs"]:
        return f"- No run collapsed (every class's mean Dice >= {collapse['threshold']} in every run)."
    listed = ", ".join(f"`{r['variant']}` seed {r['seed']} ({', '.join(r['classes'])})" for r in collapse["runs"])
    (a, na), (b, nb) = collapse["with_long_skips"], collapse["without_long_skips"]
    return (f"- Collapsed runs (a class's mean Dice < {collapse['threshold']} at the end of the budget): {listed}. "
            f"{a} of {na} runs with long skips and {b} of {nb} without; Fisher exact p = "
            f"{collapse['fisher_p']:.2g}. Table cells and paired comparisons keep these runs and mark them "
            "(†s<k>); a class such a run never predicts has no HD95 there, so that cell's mean leaves the run "
            "out and says so ([k/n seeds]).")


def _gradient_findings(summary: dict[str, Any]) -> list[str]:
    """First-layer / head gradient ratios per variant, then the same-layer comparisons."""
    out = [f"- Gradient flow (`{g['variant']}`, {g['pair']}): first-layer / head gradient-norm ratio "
           f"early {ms(g['early_first_over_head'])}, late {ms(g['late_first_over_head'])}; weakest layer early "
           f"{'/'.join(sorted(set(g['early_weakest_layer'])))} at {ms(g['early_weakest_over_head'])} of the head's norm."
           for g in summary["gradients"]]
    return out + [_same_layer_finding(g) for g in summary["same_layer_gradients"]]


def _lesion_findings(lesions: dict[str, Any]) -> list[str]:
    """Per lesioned variant: the long skip and the residual branches whose removal costs most (and least)."""
    out = []
    for name, les in lesions.items():
        if les["skips"]:
            worst = max(les["skips"], key=lambda k: les["skips"][k]["mean"])
            out.append(f"- Lesions of `{name}` (intact {ms(les['intact'])}): switching off the level-{worst} long skip "
                       f"costs the most Dice ({ms(les['skips'][worst])})"
                       + (f"; all long skips at once cost {ms(les['all_skips'])}." if les["all_skips"] else "."))
        if les["residuals"]:
            worst = max(les["residuals"], key=lambda k: les["residuals"][k]["mean"])
            least = min(les["residuals"], key=lambda k: les["residuals"][k]["mean"])
            out.append(f"- Residual-branch lesions of `{name}`: largest drop `{worst}` ({ms(les['residuals'][worst])}), "
                       f"smallest `{least}` ({ms(les['residuals'][least])}).")
    return out


def _landscape_findings(landscapes: dict[str, Any]) -> list[str]:
    """The loss at the weights and its rise half a unit away, per variant."""
    if not landscapes:
        return []
    text = "; ".join(f"`{n}` loss {d['loss_center']:.3f} at the weights, rise {d['sharpness_0.5']:+.3f} at |alpha| = 0.5"
                     for n, d in landscapes.items())
    return [f"- Loss landscape (1D, filter-normalised): {text}."]


def _landscape_spread_findings(summary: dict[str, Any]) -> list[str]:
    """The rise at |alpha| = 0.5 over seeds and directions, and each (with, without) pair's seed-level difference."""
    spread = summary.get("landscape_spread") or {}
    if not spread:
        return []
    text = "; ".join(f"`{n}` {ms(d['sharpness_0.5'])} ({len(d['seeds'])} seeds x {d['directions']} directions)"
                     for n, d in spread.items())
    out = [f"- Loss landscape over seeds (1D, rise at |alpha| = 0.5, mean over directions per seed, mean ± std over "
           f"seeds): {text}."]
    for p in summary.get("landscape_spread_pairs", []):
        out.append(f"- Rise without minus with (`{p['without']}` − `{p['with']}`), seed by seed: "
                   f"{', '.join(f'{d:+.3f}' for d in p['differences'])}; mean {p['mean']:+.3f}, 95 % t-interval "
                   f"[{p['low']:+.3f}, {p['high']:+.3f}] ({p['dof']} dof) — "
                   + ("the interval excludes 0." if p["low"] > 0 or p["high"] < 0 else "the interval contains 0."))
    return out


def _veit_findings(veit: dict[str, Any]) -> list[str]:
    """Dice against the number of same-width residual blocks deleted at test time, per variant."""
    return [f"- Deleting same-width residual blocks of `{name}` at test time (Veit et al. 2016, {len(v['blocks'])} "
            f"blocks, {len(v['seeds'])} seeds): mean Dice "
            + ", ".join(f"{p['k']} deleted {ms(p)}" for p in v["curve"]) + "." for name, v in veit.items()]


def findings(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers (no hand-typed values)."""
    return [*_comparison_findings(summary), *_depth_findings(summary["depth"]), _collapse_finding(summary["collapse"]),
            *_gradient_findings(summary), *_lesion_findings(summary["lesions"]),
            *_landscape_findings(summary["landscapes"]), *_landscape_spread_findings(summary),
            *_veit_findings(summary.get("veit") or {})]


def _same_layer_finding(g: dict[str, Any]) -> str:
    """One pair's same-layer gradient comparison as a sentence."""
    j, early = g["focus"], g["early_without_over_with"]
    ratios, layers = early["geo_mean"], g["layers"]
    lo, hi = int(np.argmin(ratios)), int(np.argmax(ratios))
    change = {k: ", ".join(percent(r[j]) for r in g["norm_change"][k]) for k in ("with", "without")}
    steps = sorted(set(g["norm_change_step"]["with"] + g["norm_change_step"]["without"]))
    text = (f"- Same layer, per element ({g['pair']}): early in training, at `{layers[j]}` (where `{g['with']}` gets its "
            f"least gradient per element in most seeds) `{g['without']}` gets {ratios[j]:.2f}x "
            f"({', '.join(f'{r[j]:.2f}' for r in early['per_seed'])} seed by seed) the gradient of `{g['with']}`; over "
            f"the {len(layers)} layers both have, the ratio runs from {ratios[lo]:.2f}x (`{layers[lo]}`) to "
            f"{ratios[hi]:.2f}x (`{layers[hi]}`). The weight norm of `{layers[j]}` changed by {change['with']} with "
            f"and {change['without']} without, from step 0 to step {'/'.join(map(str, steps))}")
    if g["weights_moved"]:
        moved = {k: ", ".join(f"{r[j]:.2f}" for r in g["weights_moved"][k]) for k in ("with", "without")}
        return text + f"; its weights moved {moved['with']} with and {moved['without']} without (‖w_end − w_init‖ / ‖w_init‖)."
    return (text + "; that change bounds from below how far the weights moved (‖w − w_0‖ / ‖w_0‖); these runs "
            "predate the runner's record of the distance itself (`analysis/weights_*.json`).")

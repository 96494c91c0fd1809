"""Markdown cells and tables of the study report, from ``summary.json``'s numbers only.

Two marks travel with the numbers into every cell they touch:

- ``†s<k>``: the cell includes run seed k, which collapsed (a class never
  learnt); ``†ref:s<k>`` the same for the reference variant of a comparison.
- ``[k/n seeds]``: a mean over fewer seeds than the variant ran, because the
  others' value is undefined (e.g. HD95 of a class a collapsed run never predicts).

A p-value at the exact signed-rank test's floor (``2 / 2**n``: every case
agrees) is written as that floor, not as a measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def header(cells: Sequence[str]) -> list[str]:
    return [row(cells), "|" + "---|" * len(cells)]


def ms(entry: dict[str, Any], digits: int = 3) -> str:
    """``mean ± std``, plus ``[k/n seeds]`` when some seeds' values are undefined."""
    if not np.isfinite(entry["mean"]):
        return "n/a"
    text = f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
    seeds = entry.get("per_seed", [])
    defined = sum(v is not None and np.isfinite(v) for v in seeds)
    return text + (f" [{defined}/{len(seeds)} seeds]" if defined < len(seeds) else "")


def interval(mean: float, low: float, high: float) -> str:
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def cmp_text(c: dict[str, Any]) -> str:
    """Case-level mean difference and its bootstrap CI."""
    return interval(c["mean_diff"], c["ci_low"], c["ci_high"])


def p_text(c: dict[str, Any], long: bool = False) -> str:
    """The Wilcoxon p, or its floor stated as such (``long``: in a sentence)."""
    p = c["wilcoxon_p"]
    if not np.isfinite(p):
        return "n/a"
    if c.get("at_floor"):
        n = c["cases"]
        return f"{p:.2g} (floor of the exact test with n={n}: 2/2^{n})" if long else f"{p:.2g} (floor 2/2^{n})"
    return f"{p:.2g}"


def holm_text(c: dict[str, Any]) -> str:
    return f"{c['holm_p']:.2g}" if np.isfinite(c.get("holm_p", float("nan"))) else "n/a"


def flag(seeds: Sequence[int], prefix: str = "") -> str:
    """``†s1`` (``†ref:s1`` with ``prefix="ref:"``) for collapsed seeds; empty when none."""
    return "".join(f" †{prefix}s{s}" for s in seeds)


def comparison_flag(c: dict[str, Any]) -> str:
    return flag(c["collapsed"]["variant"]) + flag(c["collapsed"]["reference"], "ref:")


def seed_diffs_text(c: dict[str, Any]) -> str:
    """Per-seed differences; a difference involving a collapsed run carries ``†``."""
    bad = set(c["collapsed"]["variant"]) | set(c["collapsed"]["reference"])
    return " ".join(f"{d:+.3f}" + ("†" if s in bad else "") for s, d in zip(c["seeds"], c["seed_diffs"])) or "n/a"


def seed_level_text(c: dict[str, Any]) -> str:
    """Mean per-seed difference with its t-interval."""
    s = c["seed_level"]
    return interval(s["mean"], s["low"], s["high"]) if np.isfinite(s["low"]) else f"{s['mean']:+.3f} (one seed)"


def boot_text(c: dict[str, Any]) -> str:
    s = c["seed_level"]
    return f"[{s['boot_low']:+.3f}, {s['boot_high']:+.3f}]" if np.isfinite(s["boot_low"]) else "n/a"


def results_table(summary: dict[str, Any]) -> list[str]:
    """Markdown lines of the results table (one row per variant)."""
    classes = summary["class_names"]
    lines = header(["variant", "compared with", "params"] + [f"Dice {c}" for c in classes] + [f"HD95 {c}" for c in classes]
                   + ["mean Dice", "Δ mean Dice vs reference [95 % CI]", "Wilcoxon p", "Holm p", "Δ per seed", "seeds"])
    for name, e in summary["variants"].items():
        cmp = e.get("vs_reference", {}).get("mean_dice")
        mark = flag(e["collapsed_seeds"])
        cells = [f"`{name}`", f"`{e['reference']}`" if e["reference"] else "—", f"{e['num_parameters']:,}"]
        cells += [ms(e["dice"][c]) + mark for c in classes] + [ms(e["hd95"][c], 2) + mark for c in classes]
        cells += [ms(e["mean_dice"]) + mark]
        cells += ([cmp_text(cmp) + comparison_flag(cmp), p_text(cmp), holm_text(cmp), seed_diffs_text(cmp)]
                  if cmp else ["—"] * 4)
        lines.append(row(cells + [str(len(e["seeds"]))]))
    return lines


def seed_level_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, comparison)`` of every mean-Dice comparison the report makes, results table first."""
    out = [(f"`{n}` vs `{e['reference']}`", e["vs_reference"]["mean_dice"])
           for n, e in summary["variants"].items() if "vs_reference" in e]
    out += [(f"`{label}`", c) for label, c in summary["extra_comparisons"].items()]
    return out + [(f"depth {r['depth']}: `{r['with']}` vs `{r['without']}`", r["gap"]) for r in summary["depth"]]


def seed_level_table(summary: dict[str, Any]) -> list[str]:
    """Every mean-Dice comparison with the case and with the seed as the unit, side by side."""
    lines = header(["comparison", "Δ per case [95 % bootstrap CI]", "Wilcoxon p", "Holm p (family)", "Δ per seed",
                    "seed-level Δ [95 % t-interval]", "seed × case bootstrap [95 %]", "t-test p"])
    for label, c in seed_level_rows(summary):
        s = c["seed_level"]
        lines.append(row([label, cmp_text(c) + comparison_flag(c), p_text(c), f"{holm_text(c)} ({c['holm_family']}, {c['holm_tests']} tests)",
                          seed_diffs_text(c), seed_level_text(c) + f" ({s['dof']} dof)", boot_text(c),
                          f"{s['t_p']:.2g}" if np.isfinite(s["t_p"]) else "n/a"]))
    return lines


def percent(x: float) -> str:
    return f"{100 * x:+.1f} %"


def same_layer_table(g: dict[str, Any]) -> list[str]:
    """One pair's layers: size, per-element gradient norms, their ratio seed by seed, and how far the weights moved."""
    w, wo = g["with"], g["without"]
    moved = g["weights_moved"]
    head = ["layer", "elements", f"early grad/√n `{w}`", f"early grad/√n `{wo}`", f"early `{wo}` / `{w}` (seeds)",
            f"late `{wo}` / `{w}`", f"weight-norm change `{w}`", f"weight-norm change `{wo}`"]
    head += [f"moved `{w}`", f"moved `{wo}`"] if moved else []
    lines = header(head)
    early, late = g["early_without_over_with"], g["late_without_over_with"]
    for j, layer in enumerate(g["layers"]):
        sizes = {g["numel"]["with"][j], g["numel"]["without"][j]}
        cells = [f"`{layer}`" + (" ←" if j == g["focus"] else ""),
                 " / ".join(f"{n:,}" for n in (g["numel"]["with"][j], g["numel"]["without"][j])) if len(sizes) > 1
                 else f"{g['numel']['with'][j]:,}",
                 f"{g['early_per_element']['with'][j]:.2e}", f"{g['early_per_element']['without'][j]:.2e}",
                 f"{early['geo_mean'][j]:.2f}x ({', '.join(f'{r[j]:.2f}' for r in early['per_seed'])})",
                 f"{late['geo_mean'][j]:.2f}x",
                 " ".join(percent(r[j]) for r in g["norm_change"]["with"]),
                 " ".join(percent(r[j]) for r in g["norm_change"]["without"])]
        if moved:
            cells += [" ".join(f"{r[j]:.2f}" for r in moved["with"]), " ".join(f"{r[j]:.2f}" for r in moved["without"])]
        lines.append(row(cells))
    return lines

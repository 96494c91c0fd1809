"""The study report: ``summary.json``, figures and ``report.md``, from a report folder alone.

Everything is recomputed from the small artefacts the runner copied there
(``runs/<variant>/seed<k>/{config.yaml, metrics.jsonl, gradients.jsonl,
per_case.json}``, ``analysis/*``, ``log.jsonl``, ``study.yaml``); nothing is
retrained and no number is typed in by hand.

Conventions: a variant's score per seed is the mean over validation cases
(HD95: over cases where prediction and truth both hold the class); the table
shows mean +- sample std over seeds. Paired comparisons average each case over
seeds first, then compare case by case with the reference variant; their CI
and p therefore leave out seed-to-seed variation, which the per-seed
differences (variant seed k minus reference seed k) show beside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from unetseg.ablation.figures import (
    plot_depth,
    plot_gradient_flow,
    plot_landscape_1d,
    plot_landscape_2d,
    plot_lesions,
    plot_qualitative,
    plot_training_curves,
    plot_variant_dice,
)
from unetseg.ablation.compare import (
    apply_holm,
    COLLAPSE_DICE,
    collapsed_classes,
    collapsed_seeds,
    compare,
    healthy_mean_dice,
    mean_std,
    seed_mean,
)
from unetseg.ablation.gradients import layer_sizes, ordered_layers, run_profiles, same_layer_comparison, short_name
from unetseg.ablation.runs import PER_CASE, run_dir
from unetseg.ablation.stats import rate_difference_p
from unetseg.ablation.study import StudySpec, resolved_study
from unetseg.ablation.tables import (
    boot_text,
    cmp_text,
    comparison_flag,
    ms,
    p_text,
    percent,
    results_table,
    same_layer_table,
    seed_diffs_text,
    seed_level_table,
    seed_level_text,
)
from unetseg.ablation.variants import Variant, build_variants, depth_names
from unetseg.runlog import read_jsonl, write_json

SUMMARY = "summary.json"
REPORT = "report.md"


# ---- reading a report folder ---------------------------------------------------------------


def _seed_runs(report_dir: Path, spec: StudySpec, variant: str) -> dict[int, Path]:
    """Seeds of ``variant`` that have a scored run in ``report_dir``."""
    return {s: run_dir(report_dir, variant, s) for s in spec.seeds if (run_dir(report_dir, variant, s) / PER_CASE).is_file()}


def _collapse_summary(variants: list[Variant], per_case: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Collapsed runs, and their count in runs with and without any long skip (with a Fisher exact p)."""
    runs = [{"variant": v.name, "seed": s, "long_skips": any(v.skips), "classes": collapsed_classes(p)}
            for v in variants for s, p in per_case[v.name].items()]
    collapsed = [r for r in runs if r["classes"]]
    counts = {flag: [sum(1 for r in collapsed if r["long_skips"] == flag), sum(1 for r in runs if r["long_skips"] == flag)]
              for flag in (True, False)}
    return {"threshold": COLLAPSE_DICE, "runs": collapsed, "with_long_skips": counts[True],
            "without_long_skips": counts[False], "fisher_p": rate_difference_p(*counts[True], *counts[False])}


# ---- the summary ---------------------------------------------------------------------------


def _budget(report_dir: Path, spec: StudySpec, variants: list[Variant], per_case: dict[str, Any]) -> dict[str, Any]:
    runs = _seed_runs(report_dir, spec, variants[0].name)
    cfg = yaml.safe_load((next(iter(runs.values())) / "config.yaml").read_text())
    split = json.loads((next(iter(runs.values())) / "split.json").read_text())
    t = cfg["train"]
    return {
        "dataset": cfg["data"]["dataset"], "base_config": spec.config,
        "epochs": t["epochs"], "steps_per_epoch": t["steps_per_epoch"], "batch_size": t["batch_size"],
        "total_steps": t["epochs"] * (t["steps_per_epoch"] or 0), "lr": t["lr"], "schedule": t["schedule"],
        "warmup_steps": t["warmup_steps"], "grad_log_every": t["grad_log_every"],
        "patch_size": cfg["data"]["patch_size"], "max_cases": cfg["data"]["max_cases"],
        "train_cases": len(split["train"]), "val_cases": len(split["val"]), "width": spec.width,
        "depth": spec.depth, "depths": spec.depths, "seeds": spec.seeds, "augment_strength": cfg["augment"]["strength"],
        "evaluated_checkpoint": per_case["checkpoint"],
    }


def _gradient_logs(report_dir: Path, spec: StudySpec, name: str) -> dict[int, list[dict]]:
    """``{seed: gradients.jsonl rows}`` of the variant's runs that logged gradients."""
    logs = {s: read_jsonl(r / "gradients.jsonl") for s, r in _seed_runs(report_dir, spec, name).items()}
    return {s: rows for s, rows in logs.items() if rows}


def _weights_moved(report_dir: Path, spec: StudySpec, name: str, seeds: list[int], layers: list[str]) -> list | None:
    """Relative distance ``||w_end - w_init|| / ||w_init||`` per seed and layer from ``analysis/weights_*.json``,
    or None when a seed's file is missing (runs made before the runner recorded it)."""
    files = [report_dir / "analysis" / f"weights_{name}_seed{s}.json" for s in seeds]
    if not all(f.is_file() for f in files):
        return None
    moved = [{r["layer"]: r["relative_distance"] for r in json.loads(f.read_text())["layers"]} for f in files]
    return [[m[n] for n in layers] for m in moved]


def _gradient_summary(report_dir: Path, spec: StudySpec, pairs: list[tuple[str, str, str]],
                      depth_of: dict[str, int], total_steps: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Profiles for the figure; per variant, the early first-layer / head gradient-norm ratio per seed; and per
    pair, the same named layers compared per element (:func:`same_layer_comparison`) with how far they moved."""
    figure_pairs, table, same_layer = [], [], []
    for title, with_name, without_name in pairs:
        curves, layers, logs = {}, None, {}
        for name in (with_name, without_name):
            logs[name] = _gradient_logs(report_dir, spec, name)
            if not logs[name]:
                break
            layers = layers or ordered_layers(next(iter(logs[name].values())), depth_of[name])
            profiles = [run_profiles(rows, layers, total_steps) for rows in logs[name].values()]
            curves[name] = {k: np.stack([p[k] for p in profiles]) for k in profiles[0]}
            first_over_head = [float(p["early_grad"][0] / p["early_grad"][-1]) for p in profiles]
            late_first_over_head = [float(p["late_grad"][0] / p["late_grad"][-1]) for p in profiles]
            weakest = [int(np.argmin(p["early_grad"])) for p in profiles]
            table.append({"pair": title, "variant": name, "early_first_over_head": mean_std(first_over_head),
                          "late_first_over_head": mean_std(late_first_over_head),
                          "early_weakest_layer": [short_name(layers[i]) for i in weakest],
                          "early_weakest_over_head": mean_std([float(p["early_grad"][i] / p["early_grad"][-1])
                                                                for p, i in zip(profiles, weakest)]),
                          "early_first_grad": mean_std([float(p["early_grad"][0]) for p in profiles])})
        if len(curves) == 2:
            figure_pairs.append({"title": title, "layers": [short_name(n) for n in layers], "curves": curves})
            sizes = {key: layer_sizes(yaml.safe_load((next(iter(_seed_runs(report_dir, spec, name).values()))
                                                      / "config.yaml").read_text()))
                     for key, name in (("with", with_name), ("without", without_name))}
            cmp = same_layer_comparison(logs[with_name], logs[without_name], layers, sizes, total_steps)
            moved = {key: _weights_moved(report_dir, spec, name, cmp["seeds"], layers)
                     for key, name in (("with", with_name), ("without", without_name))}
            same_layer.append({"pair": title, "with": with_name, "without": without_name, **cmp,
                               "weights_moved": moved if None not in moved.values() else None})
    return figure_pairs, table, same_layer


HOLM_KEYS = ("holm_p", "holm_family", "holm_tests")


def _holm_families(table: dict[str, Any], extra: dict[str, Any], depth_rows: list[dict], classes: list[str]) -> None:
    """Holm-adjust the Wilcoxon p-values in place, per table: the results table (every variant against its
    reference, on mean Dice and on each class when there are several; with one class its Dice is the mean
    Dice, one test) and the other comparisons (extra pairs, depth gaps not already in the results table)."""
    keys = ["mean_dice", *(f"dice_{c}" for c in classes)] if len(classes) > 1 else ["mean_dice"]
    apply_holm([e["vs_reference"][k] for e in table.values() if "vs_reference" in e for k in keys], "results table")
    for cmp in (e["vs_reference"] for e in table.values() if "vs_reference" in e and len(classes) == 1):
        cmp[f"dice_{classes[0]}"].update({k: cmp["mean_dice"][k] for k in HOLM_KEYS})
    others = list(extra.values())
    for r in depth_rows:
        same = table[r["without"]].get("vs_reference", {}).get("mean_dice") if table[r["without"]]["reference"] == r["with"] else None
        if same:  # the same cases and seeds, sign flipped: the same test
            r["gap"].update({k: same[k] for k in HOLM_KEYS})
        else:
            others.append(r["gap"])
    apply_holm(others, "other comparisons")


def invocation_spans(log: list[dict[str, Any]]) -> list[tuple[float, float, dict[str, Any] | None]]:
    """``(start, end, machine)`` of every invocation in ``log.jsonl``.

    A killed invocation has no closing ``invocation`` row; it ends at its last logged event.
    """
    spans: list[tuple[float, float, dict[str, Any] | None]] = []
    current: list[Any] | None = None
    for row in log:
        if row["event"] == "start":
            if current:
                spans.append(tuple(current))
            current = [row["time"], row["time"], row.get("machine")]
        elif current is not None:
            current[1] = row.get("end", row.get("time", current[1]))
            if row["event"] == "invocation":
                spans.append(tuple(current))
                current = None
    if current:
        spans.append(tuple(current))
    return spans


def summarize_study(report_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compute every number of the report from ``report_dir``.

    Returns:
        ``summary`` (JSON-ready, written to ``summary.json``) and ``plots``
        (arrays for the figures).
    """
    spec = resolved_study(yaml.safe_load((report_dir / "study.yaml").read_text()))
    variants = [v for v in build_variants(spec) if _seed_runs(report_dir, spec, v.name)]
    if not variants:
        raise FileNotFoundError(f"{report_dir}: no scored runs (runs/<variant>/seed<k>/{PER_CASE})")
    per_case = {v.name: {s: json.loads((r / PER_CASE).read_text()) for s, r in _seed_runs(report_dir, spec, v.name).items()}
                for v in variants}
    metrics = {v.name: {s: read_jsonl(r / "metrics.jsonl") for s, r in _seed_runs(report_dir, spec, v.name).items()}
               for v in variants}
    first = next(iter(per_case[variants[0].name].values()))
    classes = first["class_names"][1:]
    budget = _budget(report_dir, spec, variants, first)
    by_name = {v.name: v for v in variants}

    table: dict[str, Any] = {}
    for v in variants:
        pcs = list(per_case[v.name].values())
        entry: dict[str, Any] = {
            "description": v.description, "reference": v.reference, "depth": v.depth,
            "skips": list(v.skips), "seeds": sorted(per_case[v.name]), "num_parameters": pcs[0]["num_parameters"],
            "dice": {c: mean_std([seed_mean(p, f"dice_{c}") for p in pcs]) for c in classes},
            "hd95": {c: mean_std([seed_mean(p, f"hd95_{c}") for p in pcs]) for c in classes},
            "mean_dice": mean_std([seed_mean(p, "mean_dice") for p in pcs]),
            "train_seconds": [float(rows[-1]["elapsed_s"]) for rows in metrics[v.name].values()],
            "mean_dice_without_collapsed": healthy_mean_dice(per_case[v.name]),
            "collapsed_seeds": collapsed_seeds(per_case[v.name]),
        }
        if v.reference in by_name:
            entry["vs_reference"] = {key: compare(per_case[v.name], per_case[v.reference], key)
                                     for key in ["mean_dice", *(f"dice_{c}" for c in classes)]}
        table[v.name] = entry

    extra = {}
    if "residual_noskip" in by_name and "noskip" in by_name:
        extra["residual_noskip vs noskip"] = compare(per_case["residual_noskip"], per_case["noskip"], "mean_dice")
    if "residual_noskip" in by_name and "skip" in by_name:
        extra["residual_noskip vs skip"] = compare(per_case["residual_noskip"], per_case["skip"], "mean_dice")

    depth_rows = []
    for d in spec.depths:
        w, wo = depth_names(spec, d)
        if w in by_name and wo in by_name:
            depth_rows.append({"depth": d, "with": w, "without": wo,
                               "with_mean_dice": table[w]["mean_dice"], "without_mean_dice": table[wo]["mean_dice"],
                               "gap": compare(per_case[w], per_case[wo], "mean_dice"),
                               "gap_without_collapsed": table[w]["mean_dice_without_collapsed"]["mean"]
                               - table[wo]["mean_dice_without_collapsed"]["mean"]})
    _holm_families(table, extra, depth_rows, classes)

    pairs = [(f"{a} vs {b}", a, b) for a, b in spec.analysis.gradient_pairs if a in by_name and b in by_name]
    deepest = max(spec.depths) if spec.depths else spec.depth
    dw, dwo = depth_names(spec, deepest)
    if deepest != spec.depth and dw in by_name and dwo in by_name:
        pairs.append((f"depth {deepest}: {dw} vs {dwo}", dw, dwo))
    depth_of = {v.name: v.depth for v in variants}
    grad_pairs, grad_table, same_layer = _gradient_summary(report_dir, spec, pairs, depth_of, budget["total_steps"])

    lesions: dict[str, Any] = {}
    for name in spec.analysis.lesion_variants:
        files = [report_dir / "analysis" / f"lesion_{name}_seed{s}.json" for s in spec.seeds]
        found = [json.loads(f.read_text()) for f in files if f.is_file()]
        if not found:
            continue
        intact = [r["intact"]["mean_dice"] for r in found]
        lesions[name] = {
            "seeds": [s for s, f in zip(spec.seeds, files) if f.is_file()],
            "intact": mean_std(intact),
            "skips": {lvl: mean_std([r["intact"]["mean_dice"] - r["skips"][lvl]["mean_dice"] for r in found])
                      for lvl in found[0]["skips"]},
            "all_skips": mean_std([r["intact"]["mean_dice"] - r["all_skips"]["mean_dice"] for r in found])
            if found[0]["all_skips"] else None,
            "residuals": {b: mean_std([r["intact"]["mean_dice"] - r["residuals"][b]["mean_dice"] for r in found])
                          for b in found[0]["residuals"]},
        }

    landscapes = {}
    for name in spec.analysis.landscape_variants:
        path = report_dir / "analysis" / f"landscape_{name}_seed{spec.analysis.landscape_seed}.json"
        if path.is_file():
            landscapes[name] = json.loads(path.read_text())

    log = read_jsonl(report_dir / "log.jsonl")
    invocations = invocation_spans(log)
    train_s = [s for e in table.values() for s in e["train_seconds"]]
    timing = {
        "wall_seconds": float(sum(end - start for start, end, _ in invocations)),
        "invocations": len(invocations),
        "run_seconds": {"median": float(np.median(train_s)), "min": float(np.min(train_s)), "max": float(np.max(train_s)),
                        "total": float(np.sum(train_s))},
        "analysis_seconds": float(sum(r["seconds"] for r in log if r["event"] == "analysis")),
        "machine": invocations[-1][2] if invocations else None,
        "commands": sorted({r["command"] for r in log if r["event"] == "start" and r.get("command")}),
    }
    runs_found = sum(len(p) for p in per_case.values())
    summary = {
        "study": spec.name, "quick": spec.quick, "class_names": classes, "budget": budget,
        "runs_expected": len(build_variants(spec)) * len(spec.seeds), "runs_found": runs_found,
        "variants": table, "extra_comparisons": extra, "depth": depth_rows, "gradients": grad_table,
        "same_layer_gradients": same_layer,
        "lesions": lesions, "landscapes": landscapes, "timing": timing,
        "collapse": _collapse_summary(variants, per_case),
    }
    plots = {"metrics": metrics, "gradient_pairs": grad_pairs, "spec": spec}
    return summary, plots


# ---- figures -------------------------------------------------------------------------------


def draw_figures(report_dir: Path, summary: dict[str, Any], plots: dict[str, Any]) -> dict[str, str]:
    """Draw every figure whose inputs exist; returns ``{key: path relative to report_dir}``."""
    fig_dir = report_dir / "figures"
    spec: StudySpec = plots["spec"]
    table = summary["variants"]
    out: dict[str, Path] = {}
    names = list(table)
    out["dice"] = plot_variant_dice(names, [table[n]["mean_dice"]["per_seed"] for n in names], fig_dir / "dice_per_variant.png")
    groups = [(f"{a} vs {b}", {a: list(plots["metrics"][a].values()), b: list(plots["metrics"][b].values())})
              for a, b in [("skip", "noskip"), ("residual", "residual_noskip"), *[depth_names(spec, d) for d in spec.depths if d != spec.depth]]
              if a in table and b in table]
    if groups:
        out["curves"] = plot_training_curves(groups, fig_dir / "training_curves.png")
    if plots["gradient_pairs"]:
        out["gradients"] = plot_gradient_flow(plots["gradient_pairs"], fig_dir / "gradient_flow.png")
    if summary["depth"]:
        rows = summary["depth"]
        out["depth"] = plot_depth([r["depth"] for r in rows], [r["with_mean_dice"]["per_seed"] for r in rows],
                                  [r["without_mean_dice"]["per_seed"] for r in rows],
                                  [(r["gap"]["mean_diff"], r["gap"]["ci_low"], r["gap"]["ci_high"]) for r in rows],
                                  fig_dir / "depth.png")
    panels = []
    for name, lesion in summary["lesions"].items():
        if lesion["skips"]:
            labels = [f"long L{lvl}" for lvl in lesion["skips"]] + (["all long"] if lesion["all_skips"] else [])
            drops = [v["per_seed"] for v in lesion["skips"].values()] + ([lesion["all_skips"]["per_seed"]] if lesion["all_skips"] else [])
            panels.append((f"{name}: long skips", labels, np.array(drops).T))
        if lesion["residuals"]:
            panels.append((f"{name}: residual branches", [b.replace("encoder.", "enc").replace("decoder.", "dec") for b in lesion["residuals"]],
                           np.array([v["per_seed"] for v in lesion["residuals"].values()]).T))
    if panels:
        out["lesions"] = plot_lesions(panels, fig_dir / "lesions.png")
    seed = spec.analysis.landscape_seed
    npz = {n: np.load(report_dir / "analysis" / f"landscape_{n}_seed{seed}.npz") for n in summary["landscapes"]}
    if npz:
        out["landscape_1d"] = plot_landscape_1d({n: (z["alphas_1d"], z["loss_1d"]) for n, z in npz.items()},
                                                fig_dir / "landscape_1d.png")
        out["landscape_2d"] = plot_landscape_2d({n: (z["alphas_2d"], z["loss_2d"]) for n, z in npz.items()},
                                                fig_dir / "landscape_2d.png")
    qual = report_dir / "analysis" / "qualitative.npz"
    if qual.is_file():
        with np.load(qual) as z:
            out["qualitative"] = plot_qualitative(dict(z), fig_dir / "qualitative.png")
    return {k: str(p.relative_to(report_dir)) for k, p in out.items()}


# ---- markdown ------------------------------------------------------------------------------


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


def findings(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers (no hand-typed values)."""
    t = summary["variants"]
    out = []

    def about(name: str, what: str) -> None:
        if name in t and "vs_reference" in t[name]:
            c = t[name]["vs_reference"]["mean_dice"]
            out.append(f"- {what}: mean Dice {cmp_text(c)} vs `{t[name]['reference']}`, "
                       f"Wilcoxon p = {p_text(c, long=True)}, Holm {c['holm_p']:.2g}, over {c['cases']} cases — "
                       f"{_verdict(c)}{_seed_agreement(c)}{_with_seeds(c)}."
                       + _collapse_note(name) + _collapse_note(t[name]["reference"]))

    def _collapse_note(name: str) -> str:
        healthy = t[name]["mean_dice_without_collapsed"]
        dropped = len(t[name]["seeds"]) - len(healthy["seeds"])
        if not dropped:
            return ""
        return (f" `{name}` has {dropped} collapsed seed(s); over its other seeds its mean Dice is "
                f"{ms(healthy)} (all seeds: {ms(t[name]['mean_dice'])}).")

    about("noskip", "Removing every long skip")
    levels = sorted((n for n in t if n.startswith("skip_off_L")), key=lambda n: t[n]["vs_reference"]["mean_dice"]["mean_diff"])
    for name in levels:
        about(name, f"Removing only the level-{name.removeprefix('skip_off_L')} long skip")
    about("add", "Merging long skips by addition instead of concatenation")
    about("residual", "Adding residual short skips (long skips kept)")
    about("residual_noskip", "Removing long skips from the residual network")
    for label, c in summary["extra_comparisons"].items():
        out.append(f"- `{label}`: mean Dice {cmp_text(c)}, Wilcoxon p = {p_text(c, long=True)}, Holm {c['holm_p']:.2g} — "
                   f"{_verdict(c)}{_seed_agreement(c)}{_with_seeds(c)}.")
    if summary["depth"]:
        gaps = [(r["depth"], r["gap"]["mean_diff"]) for r in summary["depth"]]
        text = ", ".join(f"depth {d}: {g:+.3f}" for d, g in gaps)
        widening = all(b[1] > a[1] for a, b in zip(gaps, gaps[1:]))
        out.append(f"- Skip minus no-skip gap by depth (per-case mean; CIs in the depth figure): {text}. "
                   + ("The point estimates grow with depth, as the degradation story predicts."
                      if widening else "The point estimates do **not** grow with depth, contrary to the degradation story."))
        seeds = "; ".join(f"depth {r['depth']}: {seed_level_text(r['gap'])}{comparison_flag(r['gap'])}" for r in summary["depth"])
        out.append(f"- The same gaps with seeds as the unit (mean of per-seed differences, 95 % t-interval): {seeds}.")
        def healthy_gap(gap: float | None) -> str:  # None: strict JSON's NaN, every seed of an arm collapsed
            return f"{gap:+.3f}" if gap is not None and math.isfinite(gap) else "n/a (an arm has no run without a collapsed class)"

        healthy = ", ".join(f"depth {r['depth']}: {healthy_gap(r['gap_without_collapsed'])}" for r in summary["depth"])
        out.append(f"- The same gap between seed means with collapsed runs left out: {healthy}.")
    collapse = summary["collapse"]
    if collapse["runs"]:
        listed = ", ".join(f"`{r['variant']}` seed {r['seed']} ({', '.join(r['classes'])})" for r in collapse["runs"])
        (a, na), (b, nb) = collapse["with_long_skips"], collapse["without_long_skips"]
        out.append(f"- Collapsed runs (a class's mean Dice < {collapse['threshold']} at the end of the budget): {listed}. "
                   f"{a} of {na} runs with long skips and {b} of {nb} without; Fisher exact p = "
                   f"{collapse['fisher_p']:.2g}. Table cells and paired comparisons keep these runs and mark them "
                   "(†s<k>); a class such a run never predicts has no HD95 there, so that cell's mean leaves the run "
                   "out and says so ([k/n seeds]).")
    else:
        out.append(f"- No run collapsed (every class's mean Dice >= {collapse['threshold']} in every run).")
    for g in summary["gradients"]:
        out.append(f"- Gradient flow (`{g['variant']}`, {g['pair']}): first-layer / head gradient-norm ratio "
                   f"early {ms(g['early_first_over_head'])}, late {ms(g['late_first_over_head'])}; weakest layer early "
                   f"{'/'.join(sorted(set(g['early_weakest_layer'])))} at {ms(g['early_weakest_over_head'])} of the head's norm.")
    out += [_same_layer_finding(g) for g in summary["same_layer_gradients"]]
    for name, les in summary["lesions"].items():
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
    if summary["landscapes"]:
        text = "; ".join(f"`{n}` loss {d['loss_center']:.3f} at the weights, rise {d['sharpness_0.5']:+.3f} at |alpha| = 0.5"
                         for n, d in summary["landscapes"].items())
        out.append(f"- Loss landscape (1D, filter-normalised): {text}.")
    return out


def _family_size(summary: dict[str, Any]) -> int:
    first = next((e["vs_reference"]["mean_dice"] for e in summary["variants"].values() if "vs_reference" in e), None)
    return first["holm_tests"] if first else 0


def _same_layer_section(summary: dict[str, Any]) -> list[str]:
    """Per gradient pair, the layer-by-layer table."""
    if not summary["same_layer_gradients"]:
        return []
    lines = ["## Gradient flow, layer by layer", "",
             "The same named layer in the network with and without the feature, seed k against seed k. grad/√n: the "
             "layer's gradient L2 norm divided by the square root of its number of elements (a norm grows with the "
             "layer's size), averaged over the first (early) or last (late) 10 % of training and then over seeds; "
             "the ratio without / with is taken seed by seed (geometric mean, then each seed). Weight-norm change: "
             "(‖w‖ at the last logged step − ‖w‖ at step 0) / ‖w‖ at step 0, per seed; its absolute value is a lower "
             "bound on how far the weights moved, ‖w − w_0‖ / ‖w_0‖, which the \"moved\" columns give when the runs "
             "recorded it. ← marks the layer where the network with the feature gets the least gradient per element "
             "early in most seeds.", ""]
    for g in summary["same_layer_gradients"]:
        lines += [f"### {g['pair']}", "", *same_layer_table(g), ""]
        if not g["weights_moved"]:
            lines += ["These runs predate the runner's record of how far each layer's weights moved "
                      "(`analysis/weights_<variant>_seed<k>.json`); only the weight-norm change is known.", ""]
    return lines


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


def render_markdown(summary: dict[str, Any], figures: dict[str, str]) -> str:
    """The whole ``report.md``."""
    b, tm = summary["budget"], summary["timing"]
    m = tm["machine"] or {}
    name = summary["study"]
    command = f"unetseg ablate --config {name}" + (" --quick" if summary["quick"] else "") + " --data-root ../shared/data"
    lines = [f"# Skip-connection study: {name}" + (" (quick mode)" if summary["quick"] else ""), ""]
    if summary["quick"]:
        lines += ["> **Quick mode**: a tiny budget and a reduced matrix to exercise the pipeline; "
                  "the numbers say nothing about skip connections.", ""]
    if summary["runs_found"] < summary["runs_expected"]:
        lines += [f"> **Incomplete**: {summary['runs_found']} of {summary['runs_expected']} runs are scored so far.", ""]
    ran = "; ".join(f"`{c}`" for c in tm["commands"]) or "not recorded"
    lines += [
        "## How it was made", "",
        f"- Reproduce: `{command}` (resumable; finished runs are skipped; `--jobs 2` trains two runs at a time).",
        f"- Commands that produced these runs (`log.jsonl`): {ran}.",
        f"- Redraw this report from the committed artefacts, no training: `unetseg ablate --config {name}"
        + (" --quick" if summary["quick"] else "") + " --report-only --report-dir <this folder>`.",
        f"- Data: `{b['dataset']}`, {b['train_cases']} training / {b['val_cases']} validation cases"
        + (f" (first {b['max_cases']} cases)" if b["max_cases"] else "") + "; the same split for every run.",
        f"- Budget per run: {b['epochs']} epochs x {b['steps_per_epoch']} steps = {b['total_steps']} steps of batch "
        f"{b['batch_size']} ({b['patch_size']} patches), AdamW lr {b['lr']}, {b['schedule']} schedule with "
        f"{b['warmup_steps']} warm-up steps; width {b['width']} (doubling per level), depth {b['depth']}; "
        f"seeds {b['seeds']}; gradient norms logged every {b['grad_log_every']} steps.",
        f"- Scores: the final weights (`{b['evaluated_checkpoint']}`, no checkpoint selection) on every validation case; "
        "table cells are mean ± sample std over seeds of the per-seed case means; HD95 (mm for volumes, pixels for "
        "2D) over cases where prediction and truth both hold the class. Paired comparisons average each case over "
        "seeds, then compare case by case: mean difference, 95 % percentile-bootstrap CI (10,000 resamples), "
        "two-sided Wilcoxon signed-rank p. That CI and p leave out seed-to-seed variation; \"Δ per seed\" gives "
        "the variant's seed-k mean minus the reference's seed-k mean, for each seed.",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, {m.get('jobs', '?')} "
        f"parallel run(s) x {m.get('threads_per_job', '?')} thread(s), device {m.get('device', '?')}.",
        f"- Wall time: {tm['wall_seconds'] / 60:.1f} min over {tm['invocations']} invocation(s); training time per run "
        f"median {tm['run_seconds']['median']:.0f} s (min {tm['run_seconds']['min']:.0f}, max {tm['run_seconds']['max']:.0f}); "
        f"analyses {tm['analysis_seconds']:.0f} s.",
        "- Every number below is in `summary.json`, computed from `runs/<variant>/seed<k>/per_case.json` "
        "(and `metrics.jsonl`, `gradients.jsonl`, `analysis/*`) in this folder.",
        "", "## Results", "", *results_table(summary), "",
        "†s<k>: the cell includes seed k's run, which collapsed (a class's mean Dice < "
        f"{summary['collapse']['threshold']}); †ref:s<k>: the reference's seed k did. [k/n seeds]: a mean over the "
        "seeds where the value is defined. Holm p: the Wilcoxon p adjusted over this table's "
        f"{_family_size(summary)} tests (mean Dice and each class's Dice, every row). A p at the floor of the exact test (2/2^n: every case points the same way) is "
        "marked as such: it says all n cases agree, not how small the p is.", "",
        "## Seeds as the unit", "",
        "The paired CIs and p-values above treat the cases as the sample and the trained networks as fixed. Here "
        "each seed's network is the sample: Δ per seed is the variant's seed-k mean Dice minus the reference's "
        "seed-k mean Dice; the seed-level interval is their mean with a Student-t 95 % interval (n_seeds − 1 degrees "
        "of freedom) and the t-test p of a zero mean; the seed × case bootstrap (10,000 resamples) draws seeds with "
        "replacement, then cases within each drawn seed. With "
        f"{len(b['seeds'])} seeds the bootstrap can draw only {math.comb(2 * len(b['seeds']) - 1, len(b['seeds']))} "
        "different sets of seeds and understates the seed spread: read it beside the t-interval. Holm p here is "
        "adjusted within its family: the results table above, or the other comparisons (the extra pairs and the "
        "depth gaps that are not already a row of the results table).", "",
        *seed_level_table(summary), "",
        "## What the numbers say (generated)", "", *findings(summary), "",
        *_same_layer_section(summary),
    ]
    captions = {
        "dice": "Validation mean Dice per variant: bars = mean over seeds, dots = seeds.",
        "curves": "Training loss and validation mean Dice against steps, with (blue) and without (red) long skips; "
                  "lines = mean over seeds, bands = min-max over seeds.",
        "gradients": "Gradient flow: per-layer gradient L2 norm and its ratio to the weight norm, along the data path "
                     "(encoder shallow to deep, decoder coarse to fine, head), averaged over the first and the last "
                     "10 % of training steps; bands = min-max over seeds.",
        "depth": "Depth sweep: mean Dice with and without long skips at each depth, and the per-case gap with its 95 % CI.",
        "lesions": "Test-time lesions (Veit et al. 2016): Dice drop when one long skip or one residual branch is "
                   "switched off in a trained network (bars = mean over seeds, dots = seeds).",
        "landscape_1d": "1D filter-normalised random-direction slice of the loss (Li et al. 2018) around the final "
                        "weights, on a fixed set of training patches.",
        "landscape_2d": "2D filter-normalised slices: contours (top) and surfaces (bottom), same colour scale.",
        "qualitative": "The same validation slices: image, ground truth and each variant's prediction (seed "
                       f"{summary['budget']['seeds'][0]}).",
    }
    lines += ["## Figures", ""]
    for key, path in figures.items():
        lines += [f"![{key}]({path})", "", captions[key], ""]
    return "\n".join(lines)


def write_report(report_dir: str | Path) -> Path:
    """Recompute ``summary.json``, the figures and ``report.md`` in ``report_dir``; returns ``report.md``."""
    report_dir = Path(report_dir)
    summary, plots = summarize_study(report_dir)
    figures = draw_figures(report_dir, summary, plots)
    write_json(report_dir / SUMMARY, summary, indent=1)
    path = report_dir / REPORT
    path.write_text(render_markdown(summary, figures))
    return path

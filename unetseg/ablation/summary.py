"""Every number of a study report, computed from a report folder alone (``summary.json``).

The runner copies each run's small artefacts there (``runs/<variant>/seed<k>/{config.yaml, metrics.jsonl,
gradients.jsonl, per_case.json}``, ``analysis/*``, ``log.jsonl``, ``study.yaml``); :func:`summarize_study` reads
them and nothing else. Conventions: a variant's score per seed is the mean over validation cases (HD95: over cases
where prediction and truth both hold the class); table cells are mean +- sample std over seeds. Paired comparisons
average each case over seeds first, then compare case by case with the reference variant; their CI and p
therefore leave out seed-to-seed variation, which the per-seed differences and seed-level intervals show beside
them (:mod:`unetseg.ablation.compare`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

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
from unetseg.ablation.runs import PER_CASE, read_analyses, run_dir
from unetseg.ablation.stats import rate_difference_p, t_interval
from unetseg.ablation.study import StudySpec, resolved_study
from unetseg.ablation.variants import Variant, build_variants, depth_names
from unetseg.runlog import read_jsonl


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


def _budget(report_dir: Path, spec: StudySpec, variants: list[Variant], per_case: dict[str, Any]) -> dict[str, Any]:
    runs = _seed_runs(report_dir, spec, variants[0].name)
    cfg = yaml.safe_load((next(iter(runs.values())) / "config.yaml").read_text())
    split = json.loads((next(iter(runs.values())) / "split.json").read_text())
    t = cfg["train"]
    return {
        "dataset": cfg["data"]["dataset"], "base_config": spec.config,
        "epochs": t["epochs"], "steps_per_epoch": t["steps_per_epoch"], "batch_size": t["batch_size"],
        "total_steps": t["epochs"] * (t["steps_per_epoch"] or 0), "lr": t["lr"], "schedule": t["schedule"],
        "optimizer": t.get("optimizer", "adamw"), "momentum": t.get("momentum", 0.9),  # configs before SGD: AdamW
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
    records = read_analyses(report_dir, "weights", name, seeds)
    if len(records) < len(seeds):
        return None
    moved = [{r["layer"]: r["relative_distance"] for r in records[s]["layers"]} for s in seeds]
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


def _variant_entry(v: Variant, per_case: dict[int, dict[str, Any]], metrics: dict[int, list[dict]],
                   classes: list[str]) -> dict[str, Any]:
    """One row of the results table: the variant's scores over its seeds (mean +- std, per seed), size and time."""
    pcs = list(per_case.values())
    return {
        "description": v.description, "reference": v.reference, "depth": v.depth,
        "skips": list(v.skips), "seeds": sorted(per_case), "num_parameters": pcs[0]["num_parameters"],
        "dice": {c: mean_std([seed_mean(p, f"dice_{c}") for p in pcs]) for c in classes},
        "hd95": {c: mean_std([seed_mean(p, f"hd95_{c}") for p in pcs]) for c in classes},
        "mean_dice": mean_std([seed_mean(p, "mean_dice") for p in pcs]),
        "train_seconds": [float(rows[-1]["elapsed_s"]) for rows in metrics.values()],
        "mean_dice_without_collapsed": healthy_mean_dice(per_case),
        "collapsed_seeds": collapsed_seeds(per_case),
    }


def _results_table(variants: list[Variant], per_case: dict[str, Any], metrics: dict[str, Any],
                   classes: list[str]) -> dict[str, Any]:
    """``{variant: row}``, each row compared case by case with its reference (mean Dice and each class)."""
    names = {v.name for v in variants}
    table: dict[str, Any] = {}
    for v in variants:
        table[v.name] = _variant_entry(v, per_case[v.name], metrics[v.name], classes)
        if v.reference in names:
            table[v.name]["vs_reference"] = {key: compare(per_case[v.name], per_case[v.reference], key)
                                             for key in ["mean_dice", *(f"dice_{c}" for c in classes)]}
    return table


EXTRA_PAIRS = (("residual_noskip", "noskip"), ("residual_noskip", "skip"))  # compared beyond each row's reference


def _extra_comparisons(per_case: dict[str, Any]) -> dict[str, Any]:
    """The :data:`EXTRA_PAIRS` whose variants both ran, on mean Dice."""
    return {f"{a} vs {b}": compare(per_case[a], per_case[b], "mean_dice")
            for a, b in EXTRA_PAIRS if a in per_case and b in per_case}


def _depth_rows(spec: StudySpec, table: dict[str, Any], per_case: dict[str, Any]) -> list[dict[str, Any]]:
    """Per depth of the sweep with both arms run: the two seed means and the skip minus no-skip gap."""
    rows = []
    for d in spec.depths:
        w, wo = depth_names(spec, d)
        if w in table and wo in table:
            rows.append({"depth": d, "with": w, "without": wo,
                         "with_mean_dice": table[w]["mean_dice"], "without_mean_dice": table[wo]["mean_dice"],
                         "gap": compare(per_case[w], per_case[wo], "mean_dice"),
                         "gap_without_collapsed": table[w]["mean_dice_without_collapsed"]["mean"]
                         - table[wo]["mean_dice_without_collapsed"]["mean"]})
    return rows


def _gradient_pairs(spec: StudySpec, ran: set[str]) -> list[tuple[str, str, str]]:
    """``(title, with, without)`` of the gradient-flow comparisons: the study's pairs, and the deepest depth's."""
    pairs = [(f"{a} vs {b}", a, b) for a, b in spec.analysis.gradient_pairs if a in ran and b in ran]
    deepest = max(spec.depths) if spec.depths else spec.depth
    dw, dwo = depth_names(spec, deepest)
    if deepest != spec.depth and dw in ran and dwo in ran:
        pairs.append((f"depth {deepest}: {dw} vs {dwo}", dw, dwo))
    return pairs


def _lesion_summary(report_dir: Path, spec: StudySpec) -> dict[str, Any]:
    """Per lesioned variant: intact Dice and the drop when each long skip / residual branch is switched off."""
    lesions: dict[str, Any] = {}
    for name in spec.analysis.lesion_variants:
        records = read_analyses(report_dir, "lesion", name, spec.seeds)
        found = list(records.values())
        if not found:
            continue

        def drops(part: str) -> dict[str, Any]:
            return {k: mean_std([r["intact"]["mean_dice"] - r[part][k]["mean_dice"] for r in found]) for k in found[0][part]}

        lesions[name] = {
            "seeds": list(records),
            "intact": mean_std([r["intact"]["mean_dice"] for r in found]),
            "skips": drops("skips"),
            "all_skips": mean_std([r["intact"]["mean_dice"] - r["all_skips"]["mean_dice"] for r in found])
            if found[0]["all_skips"] else None,
            "residuals": drops("residuals"),
        }
    return lesions


def _landscapes(report_dir: Path, spec: StudySpec) -> dict[str, Any]:
    """The 1D/2D loss-landscape summaries of the study's landscape seed, per variant that has one."""
    seed = spec.analysis.landscape_seed
    found = {name: read_analyses(report_dir, "landscape", name, [seed]) for name in spec.analysis.landscape_variants}
    return {name: records[seed] for name, records in found.items() if records}


def _landscape_spread(report_dir: Path, spec: StudySpec) -> tuple[dict[str, Any], list[dict[str, Any]], dict]:
    """Per variant, the 1D slices along several directions of each seed in ``landscape_spread_seeds``: loss at the
    weights and rise at ``|alpha|`` = 0.5 (mean over directions per seed, then mean +- std over seeds); per gradient
    pair (with, without), the rise without minus with, seed by seed, with its t-interval; and the curves."""
    found: dict[str, dict[int, Any]] = {}
    for name in spec.analysis.landscape_variants:
        runs = read_analyses(report_dir, "landscape1d", name, spec.analysis.landscape_spread_seeds)
        if runs:
            found[name] = runs
    rise = {name: {s: float(np.mean(r["sharpness_0.5"])) for s, r in runs.items()} for name, runs in found.items()}
    table = {name: {"seeds": sorted(runs), "directions": len(next(iter(runs.values()))["losses"]),
                    "loss_center": mean_std([r["loss_center"] for r in runs.values()]),
                    "sharpness_0.5": mean_std(list(rise[name].values()))} for name, runs in found.items()}
    pairs = []
    for with_name, without in spec.analysis.gradient_pairs:
        common = sorted(set(rise.get(with_name, {})) & set(rise.get(without, {})))
        if common:
            diffs = [rise[without][s] - rise[with_name][s] for s in common]
            pairs.append({"with": with_name, "without": without, "seeds": common, "differences": diffs,
                          **t_interval(diffs)})
    curves = {name: (np.asarray(next(iter(runs.values()))["alphas"]),
                     np.concatenate([np.asarray(r["losses"]) for r in runs.values()])) for name, runs in found.items()}
    return table, pairs, curves


def _veit_summary(report_dir: Path, spec: StudySpec) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per variant of ``veit_variants``: for each number ``k`` of same-width blocks deleted, the mean Dice over the
    deleted sets of each seed, then mean +- std over seeds (Veit et al.'s Figure 3); and per variant the curves for
    the figure, ``(k (K,), Dice (seeds, K))``."""
    out: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in spec.analysis.veit_variants:
        runs = read_analyses(report_dir, "veit", name, spec.seeds)
        if runs:
            first = next(iter(runs.values()))
            out[name] = {"seeds": sorted(runs), "blocks": first["blocks"],
                         "curve": [{"k": point["k"], **mean_std([r["curve"][i]["mean"] for r in runs.values()])}
                                   for i, point in enumerate(first["curve"])]}
            curves[name] = (np.array([p["k"] for p in first["curve"]]),
                            np.array([[p["mean"] for p in r["curve"]] for r in runs.values()]))
    return out, curves


def _timing(report_dir: Path, table: dict[str, Any]) -> dict[str, Any]:
    """Wall time over the study's invocations, training time per run, analysis time, machine and commands."""
    log = read_jsonl(report_dir / "log.jsonl")
    invocations = invocation_spans(log)
    train_s = [s for e in table.values() for s in e["train_seconds"]]
    reused = [f"{v} seed {k} from {src}" for v, k, src in
              sorted({(r["variant"], r["seed"], r["from"]) for r in log if r["event"] == "run" and r["action"] == "reused"})]
    return {
        "wall_seconds": float(sum(end - start for start, end, _ in invocations)),
        "invocations": len(invocations),
        "run_seconds": {"median": float(np.median(train_s)), "min": float(np.min(train_s)), "max": float(np.max(train_s)),
                        "total": float(np.sum(train_s))},
        "analysis_seconds": float(sum(r["seconds"] for r in log if r["event"] == "analysis")),
        **({"reused_runs": reused} if reused else {}),  # runs copied by --reuse (absent from older reports)
        "machine": invocations[-1][2] if invocations else None,
        "commands": sorted({r["command"] for r in log if r["event"] == "start" and r.get("command")}),
    }


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
    runs = {v.name: _seed_runs(report_dir, spec, v.name) for v in variants}
    per_case = {name: {s: json.loads((r / PER_CASE).read_text()) for s, r in seeds.items()} for name, seeds in runs.items()}
    metrics = {name: {s: read_jsonl(r / "metrics.jsonl") for s, r in seeds.items()} for name, seeds in runs.items()}
    first = next(iter(per_case[variants[0].name].values()))
    classes = first["class_names"][1:]
    budget = _budget(report_dir, spec, variants, first)
    table = _results_table(variants, per_case, metrics, classes)
    extra = _extra_comparisons(per_case)
    depth_rows = _depth_rows(spec, table, per_case)
    _holm_families(table, extra, depth_rows, classes)
    grad_pairs, grad_table, same_layer = _gradient_summary(
        report_dir, spec, _gradient_pairs(spec, set(table)), {v.name: v.depth for v in variants}, budget["total_steps"])
    spread, spread_pairs, spread_curves = _landscape_spread(report_dir, spec)
    veit, veit_curves = _veit_summary(report_dir, spec)
    summary = {
        "study": spec.name, "quick": spec.quick, "class_names": classes, "budget": budget,
        "runs_expected": len(build_variants(spec)) * len(spec.seeds), "runs_found": sum(len(p) for p in per_case.values()),
        "variants": table, "extra_comparisons": extra, "depth": depth_rows, "gradients": grad_table,
        "same_layer_gradients": same_layer,
        "lesions": _lesion_summary(report_dir, spec), "landscapes": _landscapes(report_dir, spec),
        "landscape_spread": spread, "landscape_spread_pairs": spread_pairs, "veit": veit,
        "extra_variants": [e["name"] for e in spec.extra_variants if e["name"] in table],
        "timing": _timing(report_dir, table),
        "collapse": _collapse_summary(variants, per_case),
    }
    return summary, {"metrics": metrics, "gradient_pairs": grad_pairs, "spec": spec, "landscape_spread": spread_curves,
                     "veit": veit_curves}

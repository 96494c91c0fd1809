"""The study report: ``summary.json``, figures and ``report.md``, from a report folder alone.

Everything is recomputed from the small artefacts the runner copied there
(:mod:`unetseg.ablation.summary` computes the numbers, :mod:`unetseg.ablation.findings`
words them); nothing is retrained and no number is typed in by hand. This module
draws the figures and lays out the markdown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.ablation.figures import (
    plot_depth,
    plot_gradient_flow,
    plot_landscape_1d,
    plot_landscape_2d,
    plot_landscape_spread,
    plot_deletion_curves,
    plot_lesions,
    plot_qualitative,
    plot_training_curves,
    plot_variant_dice,
)
from unetseg.ablation.findings import findings
from unetseg.ablation.runs import analysis_path
from unetseg.ablation.study import StudySpec
from unetseg.ablation.summary import summarize_study
from unetseg.ablation.tables import results_table, same_layer_table, seed_level_table
from unetseg.ablation.variants import depth_names
from unetseg.runlog import write_json

SUMMARY = "summary.json"
REPORT = "report.md"


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
    npz = {n: np.load(analysis_path(report_dir, "landscape", n, seed, suffix=".npz")) for n in summary["landscapes"]}
    if npz:
        out["landscape_1d"] = plot_landscape_1d({n: (z["alphas_1d"], z["loss_1d"]) for n, z in npz.items()},
                                                fig_dir / "landscape_1d.png")
        out["landscape_2d"] = plot_landscape_2d({n: (z["alphas_2d"], z["loss_2d"]) for n, z in npz.items()},
                                                fig_dir / "landscape_2d.png")
    if summary.get("veit"):
        out["veit"] = plot_deletion_curves(plots["veit"], fig_dir / "deletion.png")
    if plots["landscape_spread"]:
        out["landscape_spread"] = plot_landscape_spread(plots["landscape_spread"], fig_dir / "landscape_spread.png")
    qual = report_dir / "analysis" / "qualitative.npz"
    if qual.is_file():
        with np.load(qual) as z:
            out["qualitative"] = plot_qualitative(dict(z), fig_dir / "qualitative.png")
    return {k: str(p.relative_to(report_dir)) for k, p in out.items()}


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


def _how_made(summary: dict[str, Any]) -> list[str]:
    """The "How it was made" section: commands, data, budget, scoring, machine and time."""
    b, tm = summary["budget"], summary["timing"]
    m = tm["machine"] or {}
    name = summary["study"]
    quick = " --quick" if summary["quick"] else ""
    ran = "; ".join(f"`{c}`" for c in tm["commands"]) or "not recorded"
    optimizer = "AdamW" if b["optimizer"] == "adamw" else f"SGD (Nesterov momentum {b['momentum']})"
    return [
        "## How it was made", "",
        f"- Reproduce: `unetseg ablate --config {name}{quick} --data-root <folder with the data sets>` (resumable; "
        "finished runs are skipped; `--jobs 2` trains two runs at a time).",
        f"- Commands that produced these runs (`log.jsonl`): {ran}.",
        f"- Redraw this report from the committed artefacts, no training: `unetseg ablate --config {name}"
        + quick + " --report-only --report-dir <this folder>`.",
        f"- Data: `{b['dataset']}`, {b['train_cases']} training / {b['val_cases']} validation cases"
        + (f" (first {b['max_cases']} cases)" if b["max_cases"] else "") + "; the same split for every run.",
        f"- Budget per run: {b['epochs']} epochs x {b['steps_per_epoch']} steps = {b['total_steps']} steps of batch "
        f"{b['batch_size']} ({b['patch_size']} patches), {optimizer} lr {b['lr']}, {b['schedule']} schedule with "
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
        *_reused_runs_line(tm.get("reused_runs", [])),
        "- Every number below is in `summary.json`, computed from `runs/<variant>/seed<k>/per_case.json` "
        "(and `metrics.jsonl`, `gradients.jsonl`, `analysis/*`) in this folder.",
    ]


def _reused_runs_line(reused: list[str]) -> list[str]:
    """The runs copied from another study's identical runs (``--reuse``), when there are any."""
    if not reused:
        return []
    return [f"- {len(reused)} run(s) copied, not retrained, from finished runs of another study with the same "
            f"training config and split (`--reuse`; retrained on the CPU, such a run repeats case for case): "
            f"{'; '.join(reused)}. Their training time, measured where they were trained, counts in the per-run "
            "figures, not in the wall time."]


def _results_and_seeds(summary: dict[str, Any]) -> list[str]:
    """The results table with its legend, and the seed-level section."""
    b = summary["budget"]
    return [
        "## Results", "", *results_table(summary), "",
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
        *seed_level_table(summary),
    ]


CAPTIONS = {  # per figure key; {seed} is the qualitative figure's seed
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
    "veit": "Test-time deletion of same-width residual blocks (Veit et al. 2016, Figure 3): validation mean Dice "
            "against the number of blocks deleted (each point the mean over up to veit_subsets sets of blocks); "
            "line = mean over seeds, band = min-max.",
    "landscape_spread": "1D filter-normalised slices of every seed's final weights along several random directions "
                        "each: line = mean over the curves, band = min-max.",
    "qualitative": "The same validation slices: image, ground truth and each variant's prediction (seed "
                   "{seed}).",
}


def render_markdown(summary: dict[str, Any], figures: dict[str, str]) -> str:
    """The whole ``report.md``."""
    name = summary["study"]
    lines = [f"# Skip-connection study: {name}" + (" (quick mode)" if summary["quick"] else ""), ""]
    if summary["quick"]:
        lines += ["> **Quick mode**: a tiny budget and a reduced matrix to exercise the pipeline; "
                  "the numbers say nothing about skip connections.", ""]
    if summary["runs_found"] < summary["runs_expected"]:
        lines += [f"> **Incomplete**: {summary['runs_found']} of {summary['runs_expected']} runs are scored so far.", ""]
    lines += [*_how_made(summary), "", *_results_and_seeds(summary), "",
              "## What the numbers say (generated)", "", *findings(summary), "", *_same_layer_section(summary),
              "## Figures", ""]
    for key, path in figures.items():
        lines += [f"![{key}]({path})", "", CAPTIONS[key].format(seed=summary["budget"]["seeds"][0]), ""]
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

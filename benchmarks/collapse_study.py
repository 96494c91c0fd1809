"""Does training collapse (a class never learnt)? Count it over seeds, with the recipe before and after the fix.

    python benchmarks/collapse_study.py --data-root ../shared/data

Every run is the hippocampus skip-connection study's recipe (the shipped
``hippocampus_2d`` config with the study's budget: 12 epochs of 100 steps of
32 slices, cosine schedule) stopped after ``--steps`` steps, validated every
100 steps. A run *collapsed* when a foreground class had validation Dice
below ``unetseg.train.COLLAPSE_DICE`` in each of its last two validations:
the rule ``unetseg train`` warns with. Networks: ``default`` is the shipped
``hippocampus_2d`` network (widths 16-128); the others are the study's width-8
variants of the same names (``skip``, ``depth3_skip``, ...), those where the
study saw collapses. Recipes: ``old`` is ReLU and MONAI's DiceCE with soft
Dice per sample and over every class (the shipped recipe before the fix);
``new`` is the shipped config as it is now: leaky ReLU, soft Dice summed over
the batch and over the foreground classes only. Both use the corrected
augmentation; nothing else differs.

Resumable: each finished run is a line of ``<out>/runs.jsonl``; a rerun skips
those. Run folders live in ``--work`` while they train and are deleted after. ``--table`` writes ``<out>/table.md`` from that file alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from unetseg.ablation.study import load_study
from unetseg.ablation.variants import base_config, build_variants, variant_config
from unetseg.config import Config, apply_overrides
from unetseg.runlog import read_jsonl
from unetseg.train import collapsed_classes, fit

# "new" is the shipped hippocampus_2d config as it is; "old" puts back the recipe before the fix.
RECIPES = {"old": ["model.act=relu", "train.dice_batch=false", "train.dice_background=true"], "new": []}
STEPS_PER_EPOCH = 100


def run_config(network: str, recipe: str, seed: int) -> Config:
    """The resolved config of one run: study budget, network, recipe, seed; validation every 100 steps."""
    spec = load_study("hippocampus_2d")
    budget = [*RECIPES[recipe], f"train.seed={seed}", "train.val_every=1", "train.grad_log_every=0"]
    if network == "default":
        cfg = apply_overrides(base_config(spec), budget)
    else:
        variant = {v.name: v for v in build_variants(spec)}[network]
        cfg = apply_overrides(variant_config(spec, variant, seed), budget)
    cfg.name = f"collapse-{network}-{recipe}-seed{seed}"
    return cfg


def train_one(network: str, recipe: str, seed: int, steps: int, work: Path, data_root: str | None) -> dict[str, Any]:
    """Train one run (in ``work``) to ``steps`` and return its row (per-validation Dice, collapsed classes, time)."""
    cfg = run_config(network, recipe, seed)
    run = work / f"{network}-{recipe}-seed{seed}"
    if run.exists():
        shutil.rmtree(run)  # an unfinished run restarts: it is minutes long
    t0 = time.perf_counter()
    fit(cfg, run, data_root=data_root, progress=False, stop_after_epoch=steps // STEPS_PER_EPOCH - 1)
    rows = read_jsonl(run / "metrics.jsonl")
    class_names = [k.removeprefix("val_dice_") for k in rows[-1] if k.startswith("val_dice_")]
    shutil.rmtree(run)  # checkpoints are not kept; the row below is the result
    return {
        "network": network, "recipe": recipe, "seed": seed, "steps": rows[-1]["step"],
        "val_dice": [{k: r[f"val_dice_{k}"] for k in class_names} | {"step": r["step"]} for r in rows],
        "collapsed": collapsed_classes(rows, ["background", *class_names]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per network and recipe, runs collapsed / runs, which classes, and mean Dice at the last step."""
    lines = ["| network | recipe | runs | collapsed | classes never learnt (seed) | mean Dice at last step, all runs |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(r["network"], r["recipe"]) for r in rows}, key=lambda k: (k[0] != "default", k[0], k[1] != "old"))
    for network, recipe in keys:
        group = sorted((r for r in rows if (r["network"], r["recipe"]) == (network, recipe)), key=lambda r: r["seed"])
        bad = [r for r in group if r["collapsed"]]
        which = ", ".join(f"{'+'.join(r['collapsed'])} ({r['seed']})" for r in bad) or "-"
        finals = [sum(v for k, v in r["val_dice"][-1].items() if k != "step") / (len(r["val_dice"][-1]) - 1) for r in group]
        lines.append(f"| {network} | {recipe} | {len(group)} | {len(bad)} | {which} | {sum(finals) / len(finals):.3f} |")
    steps = sorted({r["steps"] for r in rows})
    return "\n".join(lines) + f"\n\nSteps per run: {', '.join(map(str, steps))}.\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder holding Task04_Hippocampus (default: $UNETSEG_DATA_ROOT)")
    p.add_argument("--out", type=Path, default=Path("docs/collapse"), help="where runs.jsonl and table.md go")
    p.add_argument("--work", type=Path, default=Path("runs/collapse"), help="run folders while they train (deleted after)")
    p.add_argument("--networks", nargs="+", default=["default", "depth3_skip", "depth5_skip"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", type=int, default=10, help="seeds FIRST..N-1 per network and recipe")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (to split the seeds over processes)")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (multiple of 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--table", action="store_true", help="only redraw table.md from runs.jsonl")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    if not args.table:
        torch.set_num_threads(args.threads)
        done = {(r["network"], r["recipe"], r["seed"]) for r in read_jsonl(log)} if log.is_file() else set()
        todo = [(n, r, s) for s in range(args.first_seed, args.seeds) for n in args.networks for r in args.recipes
                if (n, r, s) not in done]
        for i, (network, recipe, seed) in enumerate(todo, 1):
            row = train_one(network, recipe, seed, args.steps, args.work, args.data_root)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(todo)}] {network} {recipe} seed {seed}: collapsed {row['collapsed'] or 'no'} "
                  f"({row['seconds']:.0f} s)", flush=True)
    text = table(read_jsonl(log))
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

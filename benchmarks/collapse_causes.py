"""Why did 3 of the study's 36 hippocampus runs never learn a class? Rerun them with one change at a time.

    git worktree add /tmp/unetseg-aa74eaf aa74eaf
    PYTHONPATH=/tmp/unetseg-aa74eaf python benchmarks/collapse_causes.py CHANGE [RUN ...] --data-root ../shared/data

Runs the study's own config (docs/ablation/hippocampus_2d_round1/runs/<variant>/seed<k>/config.yaml)
with the code the study ran (commit aa74eaf, put first on PYTHONPATH), to step 400, with
one change: ``none`` (unchanged: the run must repeat exactly), ``batch`` (soft Dice summed
over the batch), ``nobg`` (Dice over the foreground classes only), ``batch_nobg``,
``lr1e-3`` (a third of the learning rate), ``warmup200`` (200 warm-up steps instead of 50),
``leaky`` (leaky ReLU, slope 0.01), ``batch_nobg_leaky``. Appends one JSON line per run to
docs/collapse/causes.jsonl: validation Dice per class at steps 200 and 400 (the study
validated every 200 steps) and the training loss every 100 steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

import unetseg.train
from unetseg.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "docs" / "ablation" / "hippocampus_2d_round1" / "runs"
COLLAPSED = ["depth3_skip/seed2", "depth5_skip/seed2", "add/seed1"]
LOSS_ARGS = {"batch": {"batch": True}, "nobg": {"include_background": False},
             "batch_nobg": {"batch": True, "include_background": False},
             "batch_nobg_leaky": {"batch": True, "include_background": False}}
OVERRIDES = {"lr1e-3": ["train.lr=0.001"], "warmup200": ["train.warmup_steps=200"]}
CHANGES = ["none", *LOSS_ARGS, *OVERRIDES, "leaky"]


def apply_change(change: str) -> list[str]:
    """Patch the old code for ``change``; returns config overrides."""
    if change in LOSS_ARGS:
        args = LOSS_ARGS[change]
        unetseg.train.make_loss = lambda lambda_ce=1.0: DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=lambda_ce, **args)
    if "leaky" in change:  # the old blocks call torch.relu
        torch.relu = lambda x: F.leaky_relu(x, 0.01)
    return OVERRIDES.get(change, [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("change", choices=CHANGES)
    p.add_argument("runs", nargs="*", default=COLLAPSED, help="study runs as <variant>/seed<k>")
    p.add_argument("--data-root", default=None)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "collapse_causes", help="run folders (not committed)")
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = apply_change(args.change)
    for name in args.runs:
        cfg = apply_overrides(load_config(str(STUDY / name / "config.yaml")), overrides)
        out = args.work / args.change / name.replace("/", "-")
        unetseg.train.fit(cfg, out, data_root=args.data_root, progress=False, stop_after_epoch=3)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result = {"run": name, "change": args.change, "code": unetseg.train.__file__,
                  "train_loss": [round(r["train_loss"], 4) for r in rows],
                  "val_dice": {r["step"]: {k[9:]: r[k] for k in r if k.startswith("val_dice_")} for r in rows if "val_mean_dice" in r}}
        with (REPO / "docs" / "collapse" / "causes.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

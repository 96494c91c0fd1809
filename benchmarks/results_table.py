"""Print the README's results table from the shipped models' metrics.json files.

    python benchmarks/results_table.py

Each metrics.json is written by `unetseg export RUN --name NAME`, which runs
`unetseg evaluate` on the run's validation split and records the training
figures from the run's metrics.jsonl. The last row is the MONAI BasicUNet
baseline on the hippocampus models' split, from BASELINE (written by
`python benchmarks/basicunet_baseline.py`, its results.json copied there).
"""

from __future__ import annotations

import json
from pathlib import Path

from unetseg.infer import PRETRAINED_DIR, shipped_models

BASELINE = Path(__file__).resolve().parents[1] / "docs" / "baseline" / "basicunet_hippocampus.json"


def number(value: float | None, digits: int) -> str:
    """A figure with ``digits`` decimals; "n/a" for an undefined one (null in strict JSON)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    print("| model | val cases | mean Dice | per-class Dice | per-class HD95 | epochs | train wall time | time to Dice >= 0.85 |"
          " Dice with flip TTA (flips) | s/case plain / TTA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in shipped_models():
        m = json.loads((PRETRAINED_DIR / name / "metrics.json").read_text())
        t = m["training"]
        dice = ", ".join(f"{k} {number(v['dice_mean'], 3)}" for k, v in m["classes"].items())
        hd = ", ".join(f"{k} {number(v['hd95_mean'], 2)}" for k, v in m["classes"].items())
        reach = t.get("wall_time_to_val_dice_ge_0.85_s")
        reach_txt = "not reached" if reach is None else f"{reach / 60:.1f} min (epoch {t['first_epoch_val_dice_ge_0.85']})"
        tta = m.get("with_tta")
        tta_txt = "not recorded" if tta is None else f"{tta['mean_dice']:.4f} ({len(tta['tta_flips'])}: {tta['tta_flips']})"
        cost = "-" if tta is None else f"{m['seconds_per_case']:.2f} / {tta['seconds_per_case']:.2f}"
        print(f"| `{name}` | {m['num_cases']} | {m['mean_dice']:.4f} | {dice} | {hd} | {t['epochs']} | "
              f"{t['wall_time_s'] / 60:.1f} min | {reach_txt} | {tta_txt} | {cost} |")
    if BASELINE.is_file():
        print(baseline_row(json.loads(BASELINE.read_text())))


def baseline_row(record: dict) -> str:
    """The BasicUNet baseline's row: its last epoch's validation figures and its training time."""
    last = record["history"][-1]
    classes = [k.removeprefix("dice_") for k in last if k.startswith("dice_")]
    dice = ", ".join(f"{c} {last[f'dice_{c}']:.3f}" for c in classes)
    hd = ", ".join(f"{c} {number(last.get(f'hd95_{c}'), 2)}" for c in classes)
    reached = next((r for r in record["history"] if r["mean_dice"] >= 0.85), None)
    reach_txt = "not reached" if reached is None else f"{reached['elapsed_train_s'] / 60:.1f} min (epoch {reached['epoch']})"
    return (f"| MONAI BasicUNet baseline | {record['val_cases']} | {last['mean_dice']:.4f} | {dice} | {hd} | "
            f"{last['epoch']} | {last['elapsed_train_s'] / 60:.1f} min | {reach_txt} | - | - |")


if __name__ == "__main__":
    main()

"""Figures drawn from saved JSON / JSONL files only (never from live training state)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (empty list when it does not exist)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_training_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Train loss and validation Dice per epoch from a run's ``metrics.jsonl``."""
    rows = read_jsonl(metrics_path)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], marker="o", ms=3)
    ax_loss.set(xlabel="step", ylabel="train loss (Dice + CE)", title="training loss")
    val = [r for r in rows if "val_mean_dice" in r]
    for key in sorted({k for r in val for k in r if k.startswith("val_dice_")}):
        ax_dice.plot([r["step"] for r in val], [r[key] for r in val], marker=".", label=key.removeprefix("val_dice_"))
    ax_dice.plot([r["step"] for r in val], [r["val_mean_dice"] for r in val], "k-", lw=2, label="mean")
    ax_dice.set(xlabel="step", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    if val:
        ax_dice.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)

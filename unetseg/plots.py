"""Figures drawn from saved JSON / JSONL files only (never from live training state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from unetseg.runlog import read_jsonl


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **kwargs: Any):
    """``pyplot.subplots`` without pyplot: a :class:`Figure` and its axes, drawn without any GUI backend or global
    figure registry (importing unetseg never changes the caller's matplotlib backend)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def plot_training_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Train loss and validation Dice per epoch from a run's ``metrics.jsonl``."""
    rows = read_jsonl(metrics_path)
    fig, (ax_loss, ax_dice) = subplots(1, 2, figsize=(9, 3.4))
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
    return Path(png_path)

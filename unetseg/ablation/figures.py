"""Figures of a study, drawn only from saved artefacts (metrics, gradient logs, JSON / NPZ analyses).

Every function takes plain arrays or dicts that :mod:`unetseg.ablation.report`
reads from a report folder, writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from unetseg.plots import subplots

COLORS = {"with": "tab:blue", "without": "tab:red"}
CLASS_COLORS = np.array([[0, 0, 0], [0.95, 0.3, 0.2], [0.2, 0.6, 1.0], [0.3, 0.9, 0.3]])


def _save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _band(ax: Axes, x: np.ndarray, runs: np.ndarray, color: str, label: str) -> None:
    """Mean line and min-max band of ``runs (seeds, points)``."""
    ax.plot(x, np.nanmean(runs, axis=0), color=color, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(x, np.nanmin(runs, axis=0), np.nanmax(runs, axis=0), color=color, alpha=0.2)


def plot_training_curves(groups: Sequence[tuple[str, dict[str, list[list[dict]]]]], path: Path) -> Path:
    """Train loss and validation mean Dice against steps; one row per group, seeds shaded (min-max).

    Args:
        groups: ``(title, {label: [metrics rows of seed 0, of seed 1, ...]})``; the
            first label is drawn blue (with skips), the second red (without).
    """
    fig, axes = subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for (title, pair), (ax_loss, ax_dice) in zip(groups, axes):
        for color, (label, seeds) in zip(COLORS.values(), pair.items()):
            steps = np.array([r["step"] for r in seeds[0]])
            _band(ax_loss, steps, np.array([[r["train_loss"] for r in rows] for rows in seeds]), color, label)
            val_steps = np.array([r["step"] for r in seeds[0] if "val_mean_dice" in r])
            val = np.array([[r["val_mean_dice"] for r in rows if "val_mean_dice" in r] for rows in seeds])
            _band(ax_dice, val_steps, val, color, label)
        ax_loss.set(xlabel="step", ylabel="train loss (Dice + CE)", title=f"{title}: training loss")
        ax_dice.set(xlabel="step", ylabel="validation mean Dice", title=f"{title}: validation Dice", ylim=(0, 1))
        for ax in (ax_loss, ax_dice):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_variant_dice(names: Sequence[str], per_seed: Sequence[Sequence[float]], path: Path) -> Path:
    """Validation mean Dice of every variant: one dot per seed and the mean (bar)."""
    fig, ax = subplots(figsize=(max(6, 0.6 * len(names)), 3.6))
    x = np.arange(len(names))
    ax.bar(x, [np.mean(v) for v in per_seed], color="0.8", label="mean over seeds")
    for i, values in enumerate(per_seed):
        ax.plot([i] * len(values), values, "k.", ms=6)
    ax.set_xticks(x, names, rotation=45, ha="right")
    lo = min(min(v) for v in per_seed)
    ax.set(ylabel="validation mean Dice", ylim=(max(0.0, lo - 0.1), min(1.0, max(max(v) for v in per_seed) + 0.05)))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_gradient_flow(pairs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per-layer gradient norm and gradient/weight ratio against depth along the data path, early and late.

    Args:
        pairs: each ``{"title", "layers": [short names], "curves": {label: {"early_grad",
            "late_grad", "early_ratio", "late_ratio": (seeds, layers) arrays}}}``; first
            label blue (with skips), second red.
    """
    fig, axes = subplots(len(pairs), 4, figsize=(17, 3.4 * len(pairs)), squeeze=False)
    keys = [("early_grad", "gradient norm, early"), ("late_grad", "gradient norm, late"),
            ("early_ratio", "gradient / weight norm, early"), ("late_ratio", "gradient / weight norm, late")]
    for pair, row in zip(pairs, axes):
        x = np.arange(len(pair["layers"]))
        for ax, (key, title) in zip(row, keys):
            for color, (label, curves) in zip(COLORS.values(), pair["curves"].items()):
                _band(ax, x, np.asarray(curves[key]), color, label)
            ax.set_yscale("log")
            ax.set_title(f"{pair['title']}: {title}", fontsize=9)
            ax.set_xticks(x, pair["layers"], rotation=90, fontsize=6)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        row[0].set_ylabel("L2 norm (log)")
    return _save(fig, path, dpi=75)


def plot_depth(depths: Sequence[int], with_skip: Sequence[Sequence[float]], without_skip: Sequence[Sequence[float]],
               gap: Sequence[tuple[float, float, float]], path: Path) -> Path:
    """Mean Dice against depth with and without long skips (seeds as dots), and the gap with its 95 % CI.

    Args:
        with_skip, without_skip: per depth, the per-seed mean Dice values.
        gap: per depth ``(mean, ci_low, ci_high)`` of the per-case difference with - without.
    """
    fig, (ax, ax_gap) = subplots(1, 2, figsize=(9, 3.4))
    for values, color, label, dx in ((with_skip, COLORS["with"], "long skips", -0.05),
                                      (without_skip, COLORS["without"], "no long skips", 0.05)):
        ax.plot(depths, [np.mean(v) for v in values], "-o", color=color, label=label)
        for d, v in zip(depths, values):
            ax.plot([d + dx] * len(v), v, ".", color=color, alpha=0.6)
    ax.set(xlabel="levels (incl. bottleneck)", ylabel="validation mean Dice", title="depth sweep", xticks=list(depths))
    ax.legend(fontsize=8)
    g = np.asarray(gap, dtype=float)
    ax_gap.errorbar(depths, g[:, 0], yerr=[g[:, 0] - g[:, 1], g[:, 2] - g[:, 0]], fmt="o-", color="k", capsize=4)
    ax_gap.axhline(0, color="0.5", lw=1)
    ax_gap.set(xlabel="levels (incl. bottleneck)", ylabel="Dice(skip) - Dice(no skip)",
               title="gap per case, 95 % bootstrap CI", xticks=list(depths))
    for a in (ax, ax_gap):
        a.grid(alpha=0.3)
    return _save(fig, path)


def plot_lesions(panels: Sequence[tuple[str, list[str], np.ndarray]], path: Path) -> Path:
    """Dice drop when one path is switched off at test time.

    Args:
        panels: ``(title, labels, drops (seeds, paths))``; bars are the mean over seeds, dots the seeds.
    """
    widths = [max(3.2, 0.45 * len(p[1]) + 1.5) for p in panels]
    fig, axes = subplots(1, len(panels), figsize=(sum(widths), 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (title, labels, drops) in zip(axes[0], panels):
        drops = np.atleast_2d(drops)
        x = np.arange(len(labels))
        ax.bar(x, drops.mean(axis=0), color="tab:purple", alpha=0.6)
        for seed_drops in drops:
            ax.plot(x, seed_drops, "k.", ms=5)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("Dice drop (intact - lesioned)")
        ax.axhline(0, color="0.5", lw=1)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_landscape_1d(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """1D filter-normalised slices ``L(w + a d)``, one line per variant."""
    fig, ax = subplots(figsize=(5.5, 3.6))
    for (label, (alphas, losses)), color in zip(curves.items(), ["tab:blue", "tab:red", "tab:green", "tab:orange"]):
        ax.plot(alphas, losses, color=color, label=label)
    ax.set(xlabel="alpha (filter-normalised direction)", ylabel="loss on fixed training patches", title="1D slice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_landscape_spread(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """1D slices over seeds and directions: per variant ``(alphas (P,), losses (N, P))``, the mean line and the
    min-max band over the N curves."""
    fig, ax = subplots(figsize=(5.5, 3.6))
    for (label, (alphas, losses)), color in zip(curves.items(), ["tab:blue", "tab:red", "tab:green", "tab:orange"]):
        _band(ax, alphas, losses, color, label)
    ax.set(xlabel="alpha (filter-normalised direction)", ylabel="loss on fixed training patches",
           title="1D slices over seeds and directions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_deletion_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Veit et al.'s Figure 3: per variant ``(k (K,), dice (seeds, K))``, mean Dice against the number of
    same-width blocks deleted, with the min-max band over seeds."""
    fig, ax = subplots(figsize=(5.5, 3.6))
    for (label, (ks, dice)), color in zip(curves.items(), ["tab:blue", "tab:red", "tab:green", "tab:orange"]):
        _band(ax, ks, dice, color, label)
    ax.set(xlabel="same-width residual blocks deleted", ylabel="validation mean Dice", title="Test-time deletion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_landscape_2d(surfaces: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Contour (top row) and surface (bottom row) plots of 2D slices; one column per variant, shared levels."""
    n = len(surfaces)
    fig = Figure(figsize=(4.6 * n, 8))
    vmax = max(float(np.percentile(s, 95)) for _, s in surfaces.values())
    vmin = min(float(s.min()) for _, s in surfaces.values())
    levels = np.linspace(vmin, vmax, 15)
    for i, (label, (alphas, loss)) in enumerate(surfaces.items()):
        a, b = np.meshgrid(alphas, alphas, indexing="ij")
        ax = fig.add_subplot(2, n, i + 1)
        cs = ax.contour(b, a, loss, levels=levels, cmap="viridis")
        ax.clabel(cs, fontsize=6)
        ax.plot(0, 0, "k+")
        ax.set(xlabel="beta (d2)", ylabel="alpha (d1)", title=f"{label}: contour")
        ax3 = fig.add_subplot(2, n, n + i + 1, projection="3d")
        ax3.plot_surface(b, a, np.minimum(loss, vmax), cmap="viridis", vmin=vmin, vmax=vmax)
        ax3.set(xlabel="beta", ylabel="alpha", zlabel="loss", title=f"{label}: surface", zlim=(vmin, vmax))
    return _save(fig, path)


def _overlay(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 4)`` RGBA with transparent background."""
    rgba = np.zeros((*labels.shape, 4))
    rgba[..., :3] = CLASS_COLORS[np.clip(labels, 0, len(CLASS_COLORS) - 1)]
    rgba[..., 3] = (labels > 0) * 0.55
    return rgba


def plot_qualitative(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Rows = validation cases; columns = image, ground truth, then each variant's prediction (overlays)."""
    variants = [str(v) for v in arrays["variants"]]
    case_ids = [str(c) for c in arrays["case_ids"]]
    cols = 2 + len(variants)
    fig, axes = subplots(len(case_ids), cols, figsize=(2.6 * cols, 2.6 * len(case_ids)), squeeze=False)
    for i, (case_id, row) in enumerate(zip(case_ids, axes)):
        image = arrays[f"image_{i}"].astype(np.float32)
        cmap = "gray" if image.ndim == 2 else None
        panels = [("image", None), ("ground truth", arrays[f"truth_{i}"])]
        panels += [(v, arrays[f"pred_{v}_{i}"]) for v in variants]
        for ax, (title, labels) in zip(row, panels):
            ax.imshow(np.clip(image, 0, 1), cmap=cmap)
            if labels is not None:
                ax.imshow(_overlay(labels))
            ax.set_title(title if i == 0 else "", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(case_id[:16], fontsize=8)
    return _save(fig, path)

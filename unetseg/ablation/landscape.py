"""Filter-normalised random-direction slices of the loss landscape (Li et al., NeurIPS 2018).

Around trained weights ``w``, a direction ``d`` has, for every convolution
kernel, one random Gaussian entry per weight, rescaled filter by filter
(slices along dimension 0) to the norm of the same filter of ``w``; biases and
normalisation parameters get ``d = 0`` (Li et al.'s "ignore biasbn"). The 1D
slice is ``L(w + a d1)``, the 2D slice ``L(w + a d1 + b d2)``, on a fixed
subset of training patches, with the network in eval mode (batch-norm running
statistics of the trained network).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetseg.config import Config
from unetseg.data.datasets import Case, PatchDataset, training_samples
from unetseg.infer import Segmenter
from unetseg.losses import make_loss
from unetseg.runlog import write_json

Directions = dict[str, torch.Tensor]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> Directions:
    """A random direction shaped like ``model``'s parameters, filter-normalised.

    For a parameter ``w`` with ``ndim >= 2`` (shape ``(F, ...)``), ``d[f]`` is
    Gaussian scaled so ``||d[f]|| == ||w[f]||`` for each ``f``; parameters with
    ``ndim <= 1`` get zeros.
    """
    directions: Directions = {}
    for name, w in model.named_parameters():
        w = w.detach()
        if w.ndim <= 1:
            directions[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        w_norm = w.flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        scale = (w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.ndim - 1)))
        directions[name] = d * scale
    return directions


def fixed_patches(cases: Sequence[Case], cfg: Config, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training patches, the same for every variant of a study.

    Samples (slices or images) are taken evenly spaced over the cases' samples,
    padded / cropped to ``cfg.data.patch_size`` (crop positions from ``seed``),
    without augmentation.

    Returns:
        images ``(N, C, *patch)`` float32 and labels ``(N, 1, *patch)`` int64.
    """
    images, labels = training_samples(cases, cfg.model.spatial_dims, cfg.data.slice_axis)
    dataset = PatchDataset(images, labels, cfg.data.patch_size, transform=None, seed=seed)
    indices = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    pairs = [dataset[int(i)] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])[:, None]


@torch.no_grad()
def mean_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """The study's training loss (Dice + CE) averaged over batches of the fixed patches, eval mode."""
    loss_fn = make_loss()
    model.eval()
    total, n = 0.0, 0
    for x, y in zip(torch.split(images, batch_size), torch.split(labels, batch_size)):
        total += float(loss_fn(model(x), y)) * len(x)
        n += len(x)
    return total / n


@torch.no_grad()
def _set_weights(model: nn.Module, origin: Directions, steps: Sequence[tuple[float, Directions]]) -> None:
    for name, p in model.named_parameters():
        value = origin[name].clone()
        for coeff, direction in steps:
            value += coeff * direction[name]
        p.copy_(value)


def loss_slices(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    points_1d: int,
    points_2d: int,
    span: float,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """1D and 2D loss slices around the model's current weights (restored afterwards).

    Returns:
        ``alphas_1d (P1,)``, ``loss_1d (P1,)``, ``alphas_2d (P2,)``,
        ``loss_2d (P2, P2)`` with ``loss_2d[i, j] = L(w + a_i d1 + a_j d2)``,
        and ``loss_center`` (scalar) at the trained weights.
    """
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, generator)
    d2 = filter_normalized_direction(model, generator)
    origin = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        center = mean_loss(model, images, labels, batch_size)
        alphas_1d = np.linspace(-span, span, points_1d)
        loss_1d = _slice_1d(model, origin, d1, alphas_1d, images, labels, batch_size)
        alphas_2d = np.linspace(-span, span, points_2d)
        loss_2d = np.empty((points_2d, points_2d))
        for i, a in enumerate(alphas_2d):
            for j, b in enumerate(alphas_2d):
                _set_weights(model, origin, [(float(a), d1), (float(b), d2)])
                loss_2d[i, j] = mean_loss(model, images, labels, batch_size)
    finally:
        _set_weights(model, origin, [])
    return {"alphas_1d": alphas_1d, "loss_1d": loss_1d, "alphas_2d": alphas_2d, "loss_2d": loss_2d,
            "loss_center": np.float64(center)}


def _slice_1d(model: nn.Module, origin: Directions, direction: Directions, alphas: np.ndarray, images: torch.Tensor,
              labels: torch.Tensor, batch_size: int) -> np.ndarray:
    """``L(w + a d)`` at each ``a`` of ``alphas`` ``(P,)`` -> ``(P,)``; leaves the weights at the last point."""
    losses = np.empty(len(alphas))
    for i, a in enumerate(alphas):
        _set_weights(model, origin, [(float(a), direction)])
        losses[i] = mean_loss(model, images, labels, batch_size)
    return losses


def loss_along_directions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, points: int, span: float,
                          directions: int, seed: int = 0, batch_size: int = 32) -> dict[str, np.ndarray]:
    """1D slices along ``directions`` independent filter-normalised random directions (from ``seed``), the
    weights restored afterwards: ``alphas (P,)``, ``losses (D, P)`` and ``loss_center`` (scalar)."""
    generator = torch.Generator().manual_seed(seed)
    origin = {name: p.detach().clone() for name, p in model.named_parameters()}
    alphas = np.linspace(-span, span, points)
    try:
        center = mean_loss(model, images, labels, batch_size)
        losses = np.stack([_slice_1d(model, origin, filter_normalized_direction(model, generator), alphas, images,
                                     labels, batch_size) for _ in range(directions)])
    finally:
        _set_weights(model, origin, [])
    return {"alphas": alphas, "losses": losses, "loss_center": np.float64(center)}


def sharpness(alphas: np.ndarray, losses: np.ndarray, center: float, radius: float) -> float:
    """Mean loss rise over the centre value at ``+-radius`` along a 1D slice (interpolated)."""
    left, right = np.interp(-radius, alphas, losses), np.interp(radius, alphas, losses)
    return float((left + right) / 2 - center)


def landscape_of_run(
    run: Path, checkpoint: str, train_cases: Sequence[Case], cfg: Config, analysis: Any, out_stem: Path
) -> dict[str, Any]:
    """Slice the loss around a run's weights; write ``<out_stem>.npz`` (arrays) and ``<out_stem>.json`` (summary).

    Args:
        run: the run folder.
        checkpoint: file in it (``last.pt``: the final weights).
        train_cases: the run's training cases (the fixed patches come from them).
        cfg: the run's config (patch size, slice axis).
        analysis: an :class:`~unetseg.ablation.study.AnalysisSpec`.
        out_stem: output path without suffix.
    """
    model = Segmenter.from_checkpoint(run / checkpoint).model
    images, labels = fixed_patches(train_cases, cfg, analysis.landscape_samples)
    slices = loss_slices(model, images, labels, analysis.landscape_points_1d, analysis.landscape_points_2d,
                         analysis.landscape_span, seed=0, batch_size=analysis.landscape_batch_size)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_stem.with_suffix(".npz"), **slices)
    summary = {
        "run": str(run.relative_to(run.parents[2])),
        "checkpoint": checkpoint,
        "samples": int(len(images)),
        "direction_seed": 0,
        "loss_center": float(slices["loss_center"]),
        "sharpness_0.25": sharpness(slices["alphas_1d"], slices["loss_1d"], float(slices["loss_center"]), 0.25),
        "sharpness_0.5": sharpness(slices["alphas_1d"], slices["loss_1d"], float(slices["loss_center"]), 0.5),
        "loss_2d_max": float(slices["loss_2d"].max()),
    }
    write_json(out_stem.with_suffix(".json"), summary, indent=1)
    return summary


def landscape_spread_of_run(
    run: Path, checkpoint: str, train_cases: Sequence[Case], cfg: Config, analysis: Any, out_path: Path
) -> dict[str, Any]:
    """1D slices of one run's loss along ``analysis.landscape_directions`` random directions (the spread that one
    direction of :func:`landscape_of_run` cannot show); writes ``out_path`` (JSON) with every curve and the rise
    at ``|alpha|`` = 0.25 and 0.5 per direction.

    Args: as :func:`landscape_of_run`; the patches are the same fixed training patches.
    """
    model = Segmenter.from_checkpoint(run / checkpoint).model
    images, labels = fixed_patches(train_cases, cfg, analysis.landscape_samples)
    slices = loss_along_directions(model, images, labels, analysis.landscape_points_1d, analysis.landscape_span,
                                   analysis.landscape_directions, seed=1, batch_size=analysis.landscape_batch_size)
    center = float(slices["loss_center"])
    summary = {
        "run": str(run.relative_to(run.parents[2])),
        "checkpoint": checkpoint,
        "samples": int(len(images)),
        "direction_seed": 1,
        "loss_center": center,
        "alphas": slices["alphas"].tolist(),
        "losses": slices["losses"].tolist(),
        "sharpness_0.25": [sharpness(slices["alphas"], curve, center, 0.25) for curve in slices["losses"]],
        "sharpness_0.5": [sharpness(slices["alphas"], curve, center, 0.5) for curve in slices["losses"]],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, summary, indent=1)
    return summary

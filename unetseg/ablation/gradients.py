"""Per-layer gradient profiles from a run's ``gradients.jsonl`` (written by ``fit`` with ``train.grad_log_every``).

Layers are ordered along the data path: encoder levels shallow to deep
(``conv1``, ``conv2``), then decoder levels coarse to fine (``up``,
``block.conv1``, ``block.conv2``), then the head. Residual 1x1 shortcut
projections are off the main path and left out.

Comparing two networks, compare the same named layer (:func:`same_layer_ratios`)
per element (:func:`layer_sizes`): a gradient norm grows with the square root of
the layer's size, and different networks' weakest layers are different layers.
How far a layer's weights moved needs the weights themselves (``unetseg.ablation.weights``);
the logged weight norms give a lower bound (:func:`norm_change`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from unetseg.config import config_from_dict
from unetseg.data.datasets import dataset_info
from unetseg.infer import build_model
from unetseg.train import model_args

_ENC = re.compile(r"^encoder\.(\d+)\.(conv1|conv2)\.weight$")
_STAGE = re.compile(r"^stages\.(\d+)\.(\d+)\.(conv1|conv2)\.weight$")  # same-width blocks after encoder level i
_DEC = re.compile(r"^decoder\.(\d+)\.(up|block\.conv1|block\.conv2)\.weight$")
_DEC_ORDER = {"up": 0, "block.conv1": 1, "block.conv2": 2}


def path_position(layer: str, depth: int) -> tuple[int, ...] | None:
    """Sort key of a layer along the data path, or None for layers off the main path: encoder level by level (its
    block, then its same-width ``stages`` blocks), decoder coarse to fine, head."""
    if m := _ENC.match(layer):
        return (0, int(m.group(1)), int(m.group(2) == "conv2"))
    if m := _STAGE.match(layer):
        return (0, int(m.group(1)), 2 + 2 * int(m.group(2)) + int(m.group(3) == "conv2"))
    if m := _DEC.match(layer):
        return (1, (depth - 2 - int(m.group(1))) * 3 + _DEC_ORDER[m.group(2)])
    if layer == "head.weight":
        return (2, 0)
    return None


def short_name(layer: str) -> str:
    """``encoder.2.conv1.weight`` -> ``enc2.c1``; ``decoder.0.block.conv2.weight`` -> ``dec0.c2``."""
    s = layer.removesuffix(".weight").replace("encoder.", "enc").replace("decoder.", "dec")
    return s.replace(".block.conv", ".c").replace(".conv", ".c")


def ordered_layers(rows: Sequence[dict[str, Any]], depth: int) -> list[str]:
    """Main-path layer names logged in ``rows``, ordered along the data path."""
    names = {layer["layer"] for layer in rows[0]["layers"]}
    keyed = [(path_position(n, depth), n) for n in names]
    return [n for key, n in sorted((k, n) for k, n in keyed if k is not None)]


def phase_rows(rows: Sequence[dict[str, Any]], total_steps: int, phase: str, fraction: float = 0.1) -> list[dict]:
    """Logged rows in the first (``"early"``) or last (``"late"``) ``fraction`` of training (at least one row)."""
    if phase == "early":
        picked = [r for r in rows if r["step"] < fraction * total_steps]
        return picked or [rows[0]]
    if phase == "late":
        picked = [r for r in rows if r["step"] >= (1 - fraction) * total_steps]
        return picked or [rows[-1]]
    raise ValueError(f"phase must be 'early' or 'late', got {phase!r}")


def layer_profile(rows: Sequence[dict[str, Any]], layers: Sequence[str], key: str) -> np.ndarray:
    """Mean over ``rows`` of ``key`` (``grad_norm``, ``weight_norm`` or ``ratio``) per layer: ``(len(layers),)``."""
    values = np.full((len(rows), len(layers)), np.nan)
    index = {name: j for j, name in enumerate(layers)}
    for i, row in enumerate(rows):
        for layer in row["layers"]:
            if layer["layer"] in index:
                values[i, index[layer["layer"]]] = layer[key]
    return np.nanmean(values, axis=0)


def run_profiles(rows: Sequence[dict[str, Any]], layers: Sequence[str], total_steps: int) -> dict[str, np.ndarray]:
    """``early_grad``, ``late_grad``, ``early_ratio``, ``late_ratio`` profiles of one run (each ``(layers,)``)."""
    out = {}
    for phase in ("early", "late"):
        picked = phase_rows(rows, total_steps, phase)
        out[f"{phase}_grad"] = layer_profile(picked, layers, "grad_norm")
        out[f"{phase}_ratio"] = layer_profile(picked, layers, "ratio")
    return out


def layer_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Number of elements of every convolution kernel of the network a run's ``config.yaml`` describes."""
    cfg = config_from_dict(config, source="run config.yaml")
    model = build_model(model_args(cfg, dataset_info(cfg.data.dataset)))
    return {name: p.numel() for name, p in model.named_parameters() if p.ndim >= 4}


def norm_change(rows: Sequence[dict[str, Any]], layers: Sequence[str]) -> np.ndarray:
    """``(||w_last|| - ||w_0||) / ||w_0||`` per layer between the first and the last logged row: ``(len(layers),)``.

    The first row is logged before the first update, so ``w_0`` is the initial weight. By the triangle
    inequality the absolute value is a lower bound on the relative distance ``||w_last - w_0|| / ||w_0||``.
    """
    first, last = layer_profile(rows[:1], layers, "weight_norm"), layer_profile(rows[-1:], layers, "weight_norm")
    return (last - first) / first


def same_layer_ratios(numerator: np.ndarray, denominator: np.ndarray) -> dict[str, Any]:
    """Seed-by-seed ratios of one quantity in two networks, layer by layer.

    Args:
        numerator, denominator: ``(seeds, layers)``, row k of each from seed k, columns the same named layers.
    Returns:
        ``{"per_seed": (seeds, layers) list, "geo_mean", "min", "max": (layers,) lists}``. A gradient that
        underflowed to 0 in one seed makes that layer's geometric mean 0, as it should (no warning).
    """
    ratio = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore"):
        geo_mean = np.exp(np.log(ratio).mean(axis=0))
    return {"per_seed": ratio.tolist(), "geo_mean": geo_mean.tolist(),
            "min": ratio.min(axis=0).tolist(), "max": ratio.max(axis=0).tolist()}


def _mode(values: Sequence[int]) -> int:
    """The most frequent value (the first one seen among ties)."""
    return max(dict.fromkeys(values), key=list(values).count)


def same_layer_comparison(with_logs: dict[int, list[dict]], without_logs: dict[int, list[dict]], layers: Sequence[str],
                          sizes: dict[str, dict[str, int]], total_steps: int) -> dict[str, Any]:
    """The same named layers of a network with (``with``) and without (``without``) a feature, seed k against seed k.

    Args:
        with_logs, without_logs: ``{seed: gradients.jsonl rows}``; only seeds in both are used.
        layers: layer names along the data path (both networks have them).
        sizes: ``{"with": layer_sizes(...), "without": layer_sizes(...)}``.
        total_steps: the run's step budget (for the early / late windows).
    Returns:
        ``seeds``, ``layers`` (short names), ``numel``, per-element gradient norms (gradient norm /
        sqrt(elements)) averaged over seeds (``early_per_element``, ``late_per_element``), their seed-by-seed
        ratios without / with (:func:`same_layer_ratios`), ``norm_change`` per network ((seeds, layers), see
        :func:`norm_change`) with the step it reaches, and ``focus``: the layer where ``with`` gets the least
        gradient per element early, in most seeds.
    """
    seeds = [s for s in sorted(with_logs) if s in without_logs]
    out: dict[str, Any] = {"seeds": seeds, "layers": [short_name(n) for n in layers],
                           "numel": {k: [sizes[k][n] for n in layers] for k in ("with", "without")},
                           "early_per_element": {}, "late_per_element": {}, "norm_change": {}, "norm_change_step": {}}
    per_element = {}
    for key, logs in (("with", with_logs), ("without", without_logs)):
        root = np.sqrt(np.asarray(out["numel"][key], dtype=float))
        profiles = [run_profiles(logs[s], layers, total_steps) for s in seeds]
        for phase in ("early", "late"):
            per_element[key, phase] = np.stack([p[f"{phase}_grad"] for p in profiles]) / root
            out[f"{phase}_per_element"][key] = per_element[key, phase].mean(axis=0).tolist()
        out["norm_change"][key] = np.stack([norm_change(logs[s], layers) for s in seeds]).tolist()
        out["norm_change_step"][key] = [int(logs[s][-1]["step"]) for s in seeds]
    for phase in ("early", "late"):
        out[f"{phase}_without_over_with"] = same_layer_ratios(per_element["without", phase], per_element["with", phase])
    out["focus"] = int(_mode([int(np.argmin(row)) for row in per_element["with", "early"]]))
    return out

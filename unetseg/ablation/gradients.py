"""Per-layer gradient profiles from a run's ``gradients.jsonl`` (written by ``fit`` with ``train.grad_log_every``).

Layers are ordered along the data path: encoder levels shallow to deep
(``conv1``, ``conv2``), then decoder levels coarse to fine (``up``,
``block.conv1``, ``block.conv2``), then the head. Residual 1x1 shortcut
projections are off the main path and left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_ENC = re.compile(r"^encoder\.(\d+)\.(conv1|conv2)\.weight$")
_DEC = re.compile(r"^decoder\.(\d+)\.(up|block\.conv1|block\.conv2)\.weight$")
_DEC_ORDER = {"up": 0, "block.conv1": 1, "block.conv2": 2}


def path_position(layer: str, depth: int) -> tuple[int, int] | None:
    """Sort key of a layer along the data path, or None for layers off the main path."""
    if m := _ENC.match(layer):
        return (0, int(m.group(1)) * 2 + (m.group(2) == "conv2"))
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

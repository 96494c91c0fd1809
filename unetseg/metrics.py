"""Scores of predictions against ground truth: per-case Dice and HD95 per class, and their summary over cases.

Pure array functions (MONAI's metrics through :func:`unetseg.losses.case_metrics`), shared by ``unetseg
evaluate``, training's validation and the viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unetseg.losses import case_metrics


def score_case(
    prediction: np.ndarray, truth: np.ndarray, class_names: Sequence[str], spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """``dice_<class>`` and ``hd95_<class>`` of one prediction, per foreground class, as :func:`evaluate_cases` scores it.

    Args:
        prediction, truth: ``(*S)`` integer label maps of one shape.
        class_names: background first.
        spacing: voxel size per axis (the source's ``ImageMeta.spacing``; extra
            entries are ignored); HD95 is in pixels when None.
    """
    names = list(class_names)[1:]
    m = case_metrics(prediction, truth, len(class_names), None if spacing is None else tuple(spacing)[: truth.ndim])
    row = {f"dice_{n}": float(v) for n, v in zip(names, m["dice"])}
    row.update({f"hd95_{n}": float(v) for n, v in zip(names, m["hd95"])})
    return row


def summarize(rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Mean and std per foreground class over cases (NaNs skipped), and ``mean_dice`` over classes."""
    classes = {}
    for name in class_names[1:]:
        entry = {}
        for metric in ("dice", "hd95"):
            values = np.array([r[f"{metric}_{name}"] for r in rows], dtype=float)
            finite = values[np.isfinite(values)]
            entry[f"{metric}_mean"] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{metric}_std"] = float(finite.std()) if finite.size else float("nan")
            entry[f"{metric}_cases"] = int(finite.size)
        classes[name] = entry
    mean_dice = float(np.nanmean([c["dice_mean"] for c in classes.values()])) if classes else float("nan")
    summary: dict[str, Any] = {"num_cases": len(rows), "classes": classes, "mean_dice": mean_dice}
    if rows and "ap_iou_50_95" in rows[0]:
        ap = np.array([r["ap_iou_50_95"] for r in rows], dtype=float)
        error = np.array([r["objects_predicted"] - r["objects_true"] for r in rows], dtype=float)
        summary["instances"] = {"ap_iou_50_95_mean": float(ap.mean()), "ap_iou_50_95_std": float(ap.std()),
                                "count_error_mean": float(error.mean()), "count_abs_error_mean": float(np.abs(error).mean())}
    return summary

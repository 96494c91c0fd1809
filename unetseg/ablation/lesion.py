"""Test-time lesions (Veit et al., NeurIPS 2016): switch one path off in a trained network and re-score it.

Long skips are lesioned with :meth:`UNet.lesion_skips` (the encoder tensor is
replaced by zeros), residual branches with :meth:`UNet.lesion_residuals` (the
block keeps only its shortcut). Nothing is retrained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.data.datasets import Case
from unetseg.evaluate import evaluate_cases, summarize
from unetseg.infer import Segmenter
from unetseg.runlog import write_json


def _score(segmenter: Segmenter, cases: Sequence[Case]) -> dict[str, Any]:
    rows = evaluate_cases(segmenter, cases, progress=False)
    s = summarize(rows, segmenter.class_names)
    return {"mean_dice": s["mean_dice"], "dice": {k: v["dice_mean"] for k, v in s["classes"].items()},
            "case_mean_dice": [float(np.nanmean([r[f"dice_{n}"] for n in segmenter.class_names[1:]])) for r in rows]}


def lesion_study(checkpoint: Path, cases: Sequence[Case], out_path: Path) -> dict[str, Any]:
    """Score the intact network, then each long skip and each residual branch lesioned alone, and all long skips.

    Returns (and writes as JSON):
        ``{"checkpoint", "intact": score, "skips": {level: score}, "all_skips": score | None,
        "residuals": {block: score}}`` where ``score`` has ``mean_dice``,
        ``dice`` per class and ``case_mean_dice`` (per case, in ``cases`` order).
    """
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    model = segmenter.model
    result: dict[str, Any] = {"checkpoint": str(checkpoint.name), "case_ids": [c.case_id for c in cases]}
    result["intact"] = _score(segmenter, cases)
    result["skips"] = {}
    for level in model.skip_levels():
        model.lesion_skips([level])
        result["skips"][str(level)] = _score(segmenter, cases)
    if model.skip_levels():
        model.lesion_skips(model.skip_levels())
        result["all_skips"] = _score(segmenter, cases)
    else:
        result["all_skips"] = None
    model.lesion_skips([])
    result["residuals"] = {}
    for name in model.residual_blocks():
        model.lesion_residuals([name])
        result["residuals"][name] = _score(segmenter, cases)
    model.lesion_residuals([])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result, indent=1)
    return result

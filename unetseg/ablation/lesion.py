"""Test-time lesions (Veit et al., NeurIPS 2016): switch one path off in a trained network and re-score it.

Long skips are lesioned with :meth:`UNet.lesion_skips` (the encoder tensor is
replaced by zeros), residual branches with :meth:`UNet.lesion_residuals` (the
block keeps only its shortcut). Nothing is retrained.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.data.datasets import Case
from unetseg.evaluate import evaluate_cases, summarize
from unetseg.infer import Segmenter
from unetseg.model import UNet
from unetseg.runlog import write_json


@contextmanager
def lesioned(model: UNet, skips: Sequence[int] = (), residuals: Sequence[str] = ()) -> Iterator[UNet]:
    """``model`` with the given long-skip levels and residual branches switched off inside the block, and
    everything switched back on when it ends, however it ends (an exception in scoring included)."""
    model.lesion_skips(list(skips))
    model.lesion_residuals(list(residuals))
    try:
        yield model
    finally:
        model.lesion_skips([])
        model.lesion_residuals([])


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
        with lesioned(model, skips=[level]):
            result["skips"][str(level)] = _score(segmenter, cases)
    result["all_skips"] = None
    if model.skip_levels():
        with lesioned(model, skips=model.skip_levels()):
            result["all_skips"] = _score(segmenter, cases)
    result["residuals"] = {}
    for name in model.residual_blocks():
        with lesioned(model, residuals=[name]):
            result["residuals"][name] = _score(segmenter, cases)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result, indent=1)
    return result


def deletion_curve(checkpoint: Path, cases: Sequence[Case], out_path: Path, max_subsets: int = 10,
                   seed: int = 0) -> dict[str, Any]:
    """Veit et al. (2016), Figure 3: delete ``k`` of the same-width residual blocks (``stages.*``, identity
    shortcuts, see :class:`UNet`'s ``stage_blocks``) at once, for every ``k``, and score the network.

    For each ``k`` at most ``max_subsets`` distinct sets of ``k`` blocks are drawn (every set when there are fewer,
    from a generator seeded with ``seed``); a network that behaves as an ensemble of paths loses Dice smoothly
    with ``k``, a single deep path collapses after the first deletion.

    Returns (and writes as JSON):
        ``{"checkpoint", "blocks": [name, ...], "curve": [{"k", "deleted": [[name, ...], ...],
        "mean_dice": [per set], "mean", "std"}, ...]}``.
    """

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    model = segmenter.model
    blocks = [name for name in model.residual_blocks() if name.startswith("stages.")]
    if not blocks:
        raise ValueError(f"{checkpoint}: no same-width residual blocks (train with model.stage_blocks > 1 and "
                         "model.residual=true)")
    rng = np.random.default_rng(seed)
    curve = []
    for k in range(len(blocks) + 1):
        every = list(itertools.combinations(blocks, k))
        chosen = every if len(every) <= max_subsets else [every[i] for i in sorted(
            rng.choice(len(every), size=max_subsets, replace=False))]
        scores = []
        for deleted in chosen:
            with lesioned(model, residuals=deleted):
                scores.append(_score(segmenter, cases)["mean_dice"])
        curve.append({"k": k, "deleted": [list(d) for d in chosen], "mean_dice": scores,
                      "mean": float(np.mean(scores)), "std": float(np.std(scores))})
    result = {"checkpoint": str(checkpoint.name), "blocks": blocks, "curve": curve}
    write_json(out_path, result, indent=1)
    return result

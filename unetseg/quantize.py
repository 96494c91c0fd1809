"""``unetseg quantize``: calibrate a 2D model's int8 inference on its training images and measure what it costs.

The activation ranges of :class:`~unetseg.model.int8.Int8UNet` are taken on images the model was trained on (never
its validation images), then both the float32 and the int8 network segment every validation image of the
checkpoint's split; the calibration file (:func:`~unetseg.checkpoint.save_int8_calibration`, beside the checkpoint)
records the ranges, the images they came from, and both mean Dice scores, so whoever switches int8 on can see what
it costs before they do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetseg import __version__
from unetseg.checkpoint import Checkpoint, save_int8_calibration
from unetseg.data.datasets import Case, dataset_info, list_all_cases, load_cases
from unetseg.data.preprocess import volume_to_slices
from unetseg.errors import UnetsegError
from unetseg.evaluate import scored_cases, shared_training
from unetseg.infer import Segmenter, inference_network
from unetseg.metrics import score_case, summarize
from unetseg.model.int8 import activation_ranges
from unetseg.progress import progress_bar

CALIBRATION_IMAGES = 32  # training cases whose images (or volumes' slices) set the activation ranges


def network_inputs(cases: Sequence[Case], slice_axis: int) -> Iterator[torch.Tensor]:
    """The 2D inputs ``(C, H, W)`` a 2D network sees of normalised cases: each image, or each slice of a volume."""
    for case in cases:
        slices = volume_to_slices(case.image, slice_axis) if case.image.ndim == 4 else case.image[None]
        for image in slices:
            yield torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


def quantize(checkpoint: str | Path, data_root: str | Path | None, num_cases: int = CALIBRATION_IMAGES,
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Calibrate int8 inference for a checkpoint and write its calibration file; returns what the file records
    (without the ranges) plus ``path``.

    Args:
        checkpoint: a 2D model (path, run folder or shipped name) that records its data set and split.
        data_root: where its data set lies (``--data-root``).
        num_cases: training cases drawn (with ``seed``) for the ranges.

    Raises:
        UnetsegError: a network int8 does not support, a checkpoint without data set or split, ``num_cases`` under
            1, or training cases missing under the data root.
    """
    name = str(checkpoint)
    loaded = Checkpoint.load(checkpoint)
    float32 = Segmenter.from_payload(loaded)
    problem = float32.int8_problem()
    if problem:
        raise UnetsegError(f"{name}: {problem}")
    if loaded.dataset is None or not (loaded.split or {}).get("train"):
        raise UnetsegError(f"{name}: the checkpoint does not record its data set and training split; int8 "
                           "calibration reads images the model was trained on")
    if num_cases < 1:
        raise UnetsegError(f"--cases must be at least 1, got {num_cases}")
    every, info = list_all_cases(dataset_info(loaded.dataset), data_root)
    training = set(loaded.split["train"])
    pool = [ref for ref in every if ref.case_id in training]
    if len(pool) < min(num_cases, len(training)):
        raise UnetsegError(f"{name}: only {len(pool)} of its {len(training)} training cases are under the data "
                           f"root; point --data-root at its {loaded.dataset} data")
    chosen = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), min(num_cases, len(pool)),
                                                                         replace=False))]
    calibration = load_cases(chosen, info, float32.preprocessing.normalization, progress=progress)
    ranges = activation_ranges(inference_network(float32.model, portable=True),
                               network_inputs(calibration, float32.preprocessing.slice_axis))
    refs = scored_cases(every, info, loaded.dataset, "val", shared_training([loaded], [name]), name)
    validation = compare_on_cases(float32, Segmenter.from_payload(loaded, int8_ranges=ranges),
                                  load_cases(refs, info, float32.preprocessing.normalization, progress=progress),
                                  progress)
    record = {
        "calibration": {"dataset": loaded.dataset, "split": "train", "seed": seed,
                        "cases": [ref.case_id for ref in chosen]},
        "validation": validation,
        "unetseg_version": __version__, "torch_version": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
    }
    path = save_int8_calibration(checkpoint, ranges, record)
    return {**record, "path": str(path)}


def compare_on_cases(float32: Segmenter, int8: Segmenter, cases: Sequence[Case], progress: bool = True
                     ) -> dict[str, Any]:
    """Both segmenters on each labelled case: their mean Dice (as ``unetseg evaluate`` scores it) and the share of
    pixels (voxels) where their labels agree, on average and at the lowest case."""
    rows: dict[str, list[dict[str, Any]]] = {"float32": [], "int8": []}
    agreement = []
    for case in progress_bar(cases, enabled=progress, desc="validating", unit="case", leave=False):
        labels = {kind: seg.predict(case.image, normalized=True) for kind, seg in (("float32", float32),
                                                                                  ("int8", int8))}
        for kind, predicted in labels.items():
            rows[kind].append(score_case(predicted, case.label, float32.class_names, case.meta.spacing))
        agreement.append(float(np.mean(labels["float32"] == labels["int8"])))
    return {"cases": len(agreement),
            "mean_dice_float32": summarize(rows["float32"], float32.class_names)["mean_dice"],
            "mean_dice_int8": summarize(rows["int8"], float32.class_names)["mean_dice"],
            "label_agreement_mean": float(np.mean(agreement)),
            "label_agreement_min": float(np.min(agreement))}

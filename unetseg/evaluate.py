"""Evaluation: per-case Dice and HD95, their summary, and the files ``unetseg evaluate`` writes."""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unetseg.checkpoint import Checkpoint, Preprocessing
from unetseg.data.datasets import Case, CaseRef, DatasetInfo, dataset_info, list_all_cases, load_cases, unlabelled_note
from unetseg.errors import UnetsegError
from unetseg.ensemble import Ensemble, expand_checkpoints
from unetseg.infer import Segmenter, int8_calibration
from unetseg.instances import average_precision, split_instances
from unetseg.metrics import score_case, summarize
from unetseg.model import UNet
from unetseg.runlog import write_json
from unetseg.progress import progress_bar


def evaluate_cases(
    segmenter: Segmenter, cases: Sequence[Case], tta: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Predict each labelled case (whole volume or image) and score it.

    Returns one row per case: ``case_id``, then ``dice_<class>`` and
    ``hd95_<class>`` for each foreground class (HD95 in mm for NIfTI, pixels for 2D);
    for cases loaded with object labels (DSB nuclei, ``Case.instances``) and a
    one-class model also :func:`score_instances`' columns.
    """
    rows = []
    for case in progress_bar(cases, enabled=progress, desc="evaluating", unit="case", leave=False):
        prediction = segmenter.predict(case.image, tta=tta, normalized=True)
        row: dict[str, Any] = {"case_id": case.case_id}
        row.update(score_case(prediction, case.label, segmenter.class_names, case.meta.spacing))
        if case.instances is not None and segmenter.num_classes == 2:
            row.update(score_instances(prediction == 1, case.instances))
        rows.append(row)
    return rows


def network_predictor(
    model: UNet, preprocessing: Preprocessing, class_names: Sequence[str], device: str | torch.device = "cpu"
) -> Segmenter:
    """A predictor for :func:`evaluate_cases` of a network being trained: it predicts as the network's checkpoint
    will (the same preprocessing), and always with the network's current weights, in eval mode (the network itself
    keeps its mode)."""
    return Segmenter(model, preprocessing, class_names, device)


def score_instances(foreground: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The DSB2018 challenge score of one image (``ap_iou_50_95``, see :mod:`unetseg.instances`) and the nucleus
    counts (``objects_true``, ``objects_predicted``), the prediction split into objects by :func:`split_instances`."""
    predicted = split_instances(foreground)
    return {"ap_iou_50_95": average_precision(truth, predicted), "objects_true": int(len(np.unique(truth)) - 1),
            "objects_predicted": int(len(np.unique(predicted)) - 1)}


EVALUATION_FILES = ("per_case.csv", "summary.json")  # what write_evaluation writes into its folder


def write_evaluation(rows: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write :data:`EVALUATION_FILES` (``per_case.csv``, ``summary.json``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / EVALUATION_FILES[0]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case_id"])
        writer.writeheader()
        writer.writerows(rows)
    summary_path = out / EVALUATION_FILES[1]
    write_json(summary_path, summary)
    return csv_path, summary_path


def _number(value: float | None, digits: int) -> str:
    """A figure of a summary; ``n/a`` where it is undefined (NaN in memory, null once written as strict JSON: an
    HD95 of a class that no case both predicts and holds)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines of a summary (in memory, or read back from ``summary.json``)."""
    lines = [f"{summary['num_cases']} cases, mean foreground Dice {_number(summary['mean_dice'], 4)}"
             + (" (int8)" if summary.get("int8") else "")]
    for name, c in summary["classes"].items():
        lines.append(f"  {name:<12} Dice {_number(c['dice_mean'], 4)} +- {_number(c['dice_std'], 4)}   "
                     f"HD95 {_number(c['hd95_mean'], 3)} +- {_number(c['hd95_std'], 3)}")
    if "instances" in summary:
        i = summary["instances"]
        lines.append(f"  objects      DSB2018 score (mean AP, IoU 0.50-0.95) {i['ap_iou_50_95_mean']:.4f} +- "
                     f"{i['ap_iou_50_95_std']:.4f}   count error {i['count_error_mean']:+.1f} (mean |error| "
                     f"{i['count_abs_error_mean']:.1f}) per image")
    return "\n".join(lines)


def scored_cases(every: Sequence[CaseRef], info: DatasetInfo, dataset: str, split: str, trained: Checkpoint,
                 checkpoint: str) -> list[CaseRef]:
    """The labelled cases ``evaluate`` scores: with ``split == "val"`` exactly the checkpoint's validation cases
    (each must be under the data root), else every labelled one (saying, once, how many images lack a label).

    Args:
        every: every case of ``dataset`` under the data root, labelled or not.
        trained: what the checkpoints share of their training (:func:`shared_training`).
        checkpoint: the checkpoint name(s), for messages.
    """
    trained_on = trained.dataset
    refs = [r for r in every if r.label is not None]
    unlabelled = [r for r in every if r.label is None]
    if not refs:
        raise UnetsegError(f"none of the {len(every)} {dataset} images under the data root can be scored: "
                           f"{unlabelled_note(unlabelled, info)}" if unlabelled else
                           f"no labelled {dataset} cases under the data root; evaluate needs images with their masks "
                           "or label maps")
    if split == "val":
        if trained_on and dataset != trained_on:
            raise UnetsegError(
                f"{checkpoint}: its validation cases are {trained_on} cases, not {dataset}; "
                f"pass --dataset {trained_on}, or --split all to score every {dataset} case"
            )
        wanted = _validation_cases(trained)
        if not wanted:
            raise UnetsegError(f"{checkpoint}: the checkpoint stores no validation split; use --split all")
        refs = [r for r in refs if r.case_id in wanted]
        if len(refs) != len(wanted):
            lost = [r for r in unlabelled if r.case_id in wanted]
            raise UnetsegError(
                f"{len(wanted) - len(refs)} validation cases of {checkpoint} are missing under the data root"
                + (f"; {unlabelled_note(lost, info)}" if lost else "")
            )
    elif unlabelled:  # a mean over fewer cases than the folder holds is said so, in one line
        tqdm.write(f"warning: scoring {len(refs)} of {len(every)} {dataset} images: {unlabelled_note(unlabelled, info)}",
                   file=sys.stderr)
    return refs


def evaluate(
    checkpoint: str | Path | Sequence[str | Path],
    data_root: str | Path | None,
    dataset: str | None = None,
    split: str = "val",
    out_dir: str | Path = "evaluation",
    tta: bool = False,
    device: str = "cpu",
    progress: bool = True,
    int8: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint, or an ensemble of several, on labelled cases and write per-case CSV and summary JSON.

    Args:
        checkpoint: a checkpoint (path, run folder or shipped model name), or
            several: an :class:`~unetseg.ensemble.Ensemble` averaging their probabilities.
        dataset: the data set to score on; None: the one the checkpoint was trained on.
        progress: loading and scoring bars.
        split: ``"val"`` - the validation cases stored in the checkpoint (its
            training run's split); ``"all"`` - every labelled case under the root.
        int8: predict with each checkpoint's int8 calibration (``unetseg quantize``).

    Returns:
        The summary dict (also written to ``out_dir/summary.json``), with the
        flips averaged (``tta_flips``) and the prediction and scoring time per case.
    """
    if split not in ("val", "all"):
        raise UnetsegError(f"--split must be 'val' or 'all', got {split!r}")
    checkpoints = expand_checkpoints([checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint))
    loaded = [Checkpoint.load(c) for c in checkpoints]
    names = [str(c) for c in checkpoints]
    checkpoint = " + ".join(names)
    segmenter = (Segmenter.from_payload(loaded[0], device=device) if len(loaded) == 1
                 else Ensemble.from_payloads(loaded, names, device=device))
    if int8:
        members = segmenter.members if isinstance(segmenter, Ensemble) else [segmenter]
        for name, member in zip(checkpoints, members, strict=True):
            member.int8_ranges = int8_calibration(name, member)["ranges"]
    trained = shared_training(loaded, names, same_validation=split == "val")
    dataset = dataset or trained.dataset
    if dataset is None:
        raise UnetsegError(f"{checkpoint}: the checkpoint does not say which data set it was trained on; pass --dataset")
    every, info = list_all_cases(dataset_info(dataset), data_root)  # class names as the data's own manifest lists them
    if tuple(info.class_names) != segmenter.class_names:
        raise UnetsegError(
            f"{checkpoint} predicts {list(segmenter.class_names)} but {dataset} has {list(info.class_names)}"
        )
    refs = scored_cases(every, info, dataset, split, trained, checkpoint)
    cases = load_cases(refs, info, segmenter.preprocessing.normalization, progress=progress, instances=True)
    start = time.perf_counter()
    rows = evaluate_cases(segmenter, cases, tta=tta, progress=progress)
    seconds = time.perf_counter() - start
    summary = summarize(rows, info.class_names)
    summary.update({"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "tta": tta, "int8": int8,
                    "tta_flips": [list(f) for f in segmenter.tta_flips] if tta else [[]],
                    "seconds_per_case": seconds / max(1, len(rows))})
    write_evaluation(rows, summary, out_dir)
    return summary


def shared_training(
    checkpoints: Sequence[Checkpoint], names: Sequence[str], same_validation: bool = True
) -> Checkpoint:
    """The first checkpoint, once all are found to share its ``dataset`` (and, with
    ``same_validation``, its validation cases), for scoring them together.

    Raises :class:`UnetsegError` when they were trained on different data sets
    or validated on different cases: k-fold models each trained on the others'
    validation cases, so no validation split is unseen by all of them.
    """
    first = checkpoints[0]
    for name, other in zip(names[1:], checkpoints[1:]):
        if other.dataset != first.dataset:
            raise UnetsegError(f"{names[0]} and {name} were trained on different data sets "
                               f"({first.dataset} and {other.dataset})")
        if same_validation and _validation_cases(other) != _validation_cases(first):
            raise UnetsegError(
                f"{names[0]} and {name} were validated on different cases (k-fold models?): each trained on cases "
                "the other holds back, so their ensemble has no unseen validation split; score it with --split all "
                "on a --data-root of cases none of them trained on"
            )
    return first


def _validation_cases(checkpoint: Checkpoint) -> set[str]:
    return set((checkpoint.split or {}).get("val", []))


def read_per_case(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``per_case.csv`` that :func:`write_evaluation` wrote: ``case_id`` as text, counts as int,
    scores as float (``nan`` where undefined)."""

    def value(key: str, text: str) -> Any:
        if key == "case_id":
            return text
        try:
            return int(text)
        except ValueError:
            return float(text)

    with Path(path).open(newline="") as f:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]

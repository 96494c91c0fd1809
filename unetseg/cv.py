"""k-fold cross-validation: ``unetseg cv`` trains every fold, scores each on the cases it held out, pools them.

A cross-validation folder holds :data:`CV_MANIFEST` (the resolved config, the
number of folds, the command), one run folder per fold (``fold_<k>/``, as
``unetseg train`` writes it, with ``data.num_folds`` and ``data.fold`` set)
and, once every fold is trained, ``per_case.csv`` (every case scored by the
one fold model that did not train on it, with a ``fold`` column) and
``summary.json`` (those out-of-fold scores pooled, plus each fold's mean
Dice and their mean and standard deviation across folds).

Running the same command again continues: finished folds are kept, an
interrupted one is resumed from its ``last.pt``. The folder itself is a
checkpoint reference: ``unetseg predict --checkpoint CV_DIR`` averages the
fold models (:func:`unetseg.ensemble.fold_checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.checkpoint import Checkpoint
from unetseg.config import Config, apply_overrides, config_from_dict
from unetseg.errors import UnetsegError
from unetseg.ensemble import CV_MANIFEST, fold_dir, read_cv_manifest
from unetseg.evaluate import EVALUATION_FILES, evaluate, read_per_case, summarize, write_evaluation
from unetseg.runlog import dumps, write_json


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    """``cfg`` with ``data.num_folds = folds`` and ``data.fold = fold``."""
    return apply_overrides(cfg, [f"data.num_folds={folds}", f"data.fold={fold}"])


def check_cv_dir(out: Path, cfg: Config, folds: int) -> None:
    """Refuse ``out`` unless it is new, empty, or a cross-validation of the same config and folds (which is continued)."""
    manifest = out / CV_MANIFEST
    if manifest.is_file():
        earlier = read_cv_manifest(manifest)
        if earlier["folds"] != folds or not _same_config(earlier.get("config"), cfg):
            raise UnetsegError(f"{out} holds a cross-validation of other settings ({manifest}); rerun its own "
                               "command to continue it, or choose another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnetsegError(f"--out {out} is not empty and holds no {CV_MANIFEST}; choose a new or empty folder")


def _same_config(stored: Any, cfg: Config) -> bool:
    """Whether a manifest's stored config is ``cfg``; fields added to the config since the manifest was written
    count as their defaults (a folder started before them is continued), fields since removed as a difference."""
    if not isinstance(stored, dict):
        return False
    try:
        return _plain(config_from_dict(stored, source="cross-validation manifest")) == _plain(cfg)
    except UnetsegError:
        return False


def _plain(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON values (tuples as lists), as the manifest stores it."""
    return json.loads(dumps(dataclasses.asdict(cfg)))


def _finished(run: Path, epochs: int) -> bool:
    last = run / "last.pt"
    return last.is_file() and int(Checkpoint.load(last).epoch) + 1 >= epochs


def cross_validate(
    cfg: Config,
    folds: int,
    out: str | Path,
    data_root: str | Path | None = None,
    command: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``folds`` fold models of ``cfg`` (resumable), score each on its held-out cases, pool the scores.

    Args:
        cfg: the resolved configuration (its ``data.num_folds`` / ``data.fold`` are set per fold).
        folds: number of folds (>= 2); every labelled case is held out by exactly one fold.
        out: the cross-validation folder (see the module docstring).
        data_root: overrides ``cfg.data.root``.
        command: the command line, recorded in the manifest and each fold's ``command.txt``.

    Returns:
        The summary written to ``out/summary.json``: the pooled out-of-fold
        scores (as ``unetseg evaluate`` summarises), ``folds`` (each fold's
        mean Dice), ``fold_mean_dice_mean`` and ``fold_mean_dice_std``.
    """
    from unetseg.train import fit

    if folds < 2:
        raise UnetsegError(f"--folds must be at least 2, got {folds}")
    out = Path(out)
    check_cv_dir(out, cfg, folds)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / CV_MANIFEST).is_file():
        write_json(out / CV_MANIFEST, {"folds": folds, "config": _plain(cfg), "command": list(command or [])})
    rows: list[dict[str, Any]] = []
    per_fold = []
    for fold in range(folds):
        run, fold_cfg = fold_dir(out, fold), fold_config(cfg, folds, fold)
        if _finished(run, fold_cfg.train.epochs):
            print(f"fold {fold + 1}/{folds}: trained ({run})", file=sys.stderr, flush=True)
        else:
            print(f"fold {fold + 1}/{folds}: training into {run}", file=sys.stderr, flush=True)
            fit(fold_cfg, run, data_root=data_root, resume=(run / "last.pt").is_file(), command=command,
                progress=progress)
        scores = run / "evaluation"
        if not _up_to_date(scores, run / "best.pt"):
            evaluate(run, data_root, split="val", out_dir=scores, progress=progress)
        fold_rows = read_per_case(scores / EVALUATION_FILES[0])
        fold_summary = json.loads((scores / EVALUATION_FILES[1]).read_text())  # evaluate's own summary of these rows
        per_fold.append({"fold": fold, "num_cases": len(fold_rows), "mean_dice": fold_summary["mean_dice"]})
        rows.extend({"fold": fold, **r} for r in fold_rows)
    summary = summarize(rows, _class_names(fold_dir(out, 0)))
    fold_dice = np.array([f["mean_dice"] for f in per_fold], dtype=float)
    summary.update({"folds": per_fold, "fold_mean_dice_mean": float(fold_dice.mean()),
                    "fold_mean_dice_std": float(fold_dice.std()), "out_of_fold": True})
    write_evaluation(rows, summary, out)
    return summary


def _class_names(run: Path) -> list[str]:
    return list(Checkpoint.load(run / "best.pt").class_names)


def _up_to_date(scores: Path, checkpoint: Path) -> bool:
    """True when ``scores`` holds an evaluation written after ``checkpoint`` was last saved."""
    files = [scores / name for name in EVALUATION_FILES]
    return all(f.is_file() for f in files) and min(f.stat().st_mtime for f in files) >= checkpoint.stat().st_mtime


def format_cv_summary(summary: dict[str, Any]) -> str:
    """Lines for the terminal: each fold's mean Dice, their mean and spread, and the pooled out-of-fold summary."""
    from unetseg.evaluate import format_summary

    folds = ", ".join(f"fold {f['fold'] + 1}: {f['mean_dice']:.4f} ({f['num_cases']} cases)" for f in summary["folds"])
    return "\n".join([folds, f"across folds: mean Dice {summary['fold_mean_dice_mean']:.4f} +- "
                      f"{summary['fold_mean_dice_std']:.4f}", "out of fold, every case scored by the model that "
                      "held it out:", format_summary(summary)])

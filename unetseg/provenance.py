"""Where a trained model came from: its run's training figures and, for a fine-tune, what it started from.

``unetseg export`` writes these into a shipped model's ``metrics.json``
(``training``). A fine-tuned run (``train.init_from``) records its starting
point in ``init_from.json`` when its weights are read, so the record stays
true when the model it started from is later replaced under the same name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unetseg.checkpoint import resolve_checkpoint
from unetseg.config import load_config
from unetseg.errors import UnetsegError
from unetseg.runlog import read_epoch_log

INIT_FROM_FILE = "init_from.json"  # in a run folder: source_record of train.init_from, written when training starts


def training_record(run_dir: Path, threshold: float = 0.85) -> dict[str, Any]:
    """Figures from a run's ``metrics.jsonl``: epochs, wall time, best epoch, time to reach ``threshold``."""
    rows = read_epoch_log(run_dir / "metrics.jsonl")  # epochs counted from 1
    val = [r for r in rows if "val_mean_dice" in r]
    if not val:
        raise UnetsegError(f"{run_dir}: metrics.jsonl has no validation rows; is the run finished?")
    best = max(val, key=lambda r: r["val_mean_dice"])
    reached = next((r for r in val if r["val_mean_dice"] >= threshold), None)
    command = (run_dir / "command.txt").read_text().strip().splitlines() if (run_dir / "command.txt").is_file() else []
    return {
        "epochs": len(rows),
        "wall_time_s": rows[-1]["elapsed_s"],
        "best_epoch": best["epoch"],
        "best_val_mean_dice": best["val_mean_dice"],
        f"first_epoch_val_dice_ge_{threshold}": None if reached is None else reached["epoch"],
        f"wall_time_to_val_dice_ge_{threshold}_s": None if reached is None else reached["elapsed_s"],
        "mean_train_samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
        "command": command,
    }


MAX_CHAIN = 32  # fine-tunes followed back at most; a longer chain (or a loop) is cut with a note


def source_record(source: str, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """What the weights of ``source`` (a shipped or exported model, a run folder or a checkpoint, as
    ``train.init_from`` takes it) are, read now: the source as given and, for a model, its recorded mean Dice and
    training record; for a run folder, its :func:`training_history`; for anything else (or a run folder without
    a validated epoch yet) the source alone, with a ``note`` saying why."""
    try:
        folder = resolve_checkpoint(source).parent.resolve()
    except UnetsegError:
        return {"source": source, "note": "not found when read"}
    if (folder / "metrics.json").is_file():  # an exported or shipped model
        recorded = json.loads((folder / "metrics.json").read_text())
        return {"source": source, "mean_dice": recorded.get("mean_dice"), "training": recorded.get("training")}
    if (folder / "metrics.jsonl").is_file() and (folder / "config.yaml").is_file():  # a run folder
        if folder in _seen or len(_seen) >= MAX_CHAIN:
            return {"source": source, "note": "the chain of fine-tunes loops or is too long; cut here"}
        try:
            return {"source": source, "training": training_history(folder, _seen | {folder})}
        except UnetsegError as exc:  # e.g. no validated epoch yet
            return {"source": source, "note": str(exc)}
    return {"source": source}


def starting_point(run_dir: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any] | None:
    """Where a fine-tuned run started: its ``init_from.json`` (written when its weights were read), else, for runs
    made before that file, :func:`source_record` of its ``train.init_from`` read now. None for a run trained
    from scratch."""
    if (run_dir / INIT_FROM_FILE).is_file():
        return json.loads((run_dir / INIT_FROM_FILE).read_text())
    source = load_config(str(run_dir / "config.yaml")).train.init_from
    return source_record(source, _seen | {Path(run_dir).resolve()}) if source else None


def training_history(run_dir: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """:func:`training_record` of a run, with where it started (:func:`starting_point`) when it was fine-tuned:
    a chain of fine-tunes is recorded to its first run (at most :data:`MAX_CHAIN` runs; a loop is cut)."""
    training = training_record(run_dir)
    start = starting_point(run_dir, _seen)
    if start is not None:
        training["init_from"] = start
    return training

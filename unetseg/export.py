"""Turn a finished run into a shipped model: ``unetseg/pretrained/<name>/``.

The folder holds ``model.pt`` (weights + constructor arguments + preprocessing,
no optimiser state), ``config.yaml`` (the run's resolved config),
``metrics.json`` (``unetseg evaluate`` on the run's validation split without
and with flip TTA, plus the training figures), ``per_case.csv`` and ``per_case_tta.csv``, and the run's ``training_metrics.jsonl``
and ``curves.png``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from unetseg.checkpoint import PRETRAINED_DIR, Checkpoint
from unetseg.errors import UnetsegError
from unetseg.evaluate import evaluate
from unetseg.provenance import training_history
from unetseg.runlog import write_json

MAX_SHIPPED_BYTES = 10 * 1024 * 1024
FINISHED_RUN_FILES = ("best.pt", "config.yaml", "metrics.jsonl", "curves.png")  # what a finished run folder holds


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_model_name(name: str) -> str:
    """``name`` when it is a plain model name (a folder name: letters, digits, ``_ - .``; no ``..``), else raise."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise UnetsegError(
            f"--name {name!r} is not a plain model name; use letters, digits, '_', '-' and '.' "
            "(no folders, no '..'), e.g. hippocampus_2d"
        )
    return name


def export_run(
    run_dir: str | Path, name: str, data_root: str | Path | None = None, dest: str | Path = PRETRAINED_DIR,
    overwrite: bool = False,
) -> Path:
    """Copy a run's ``best.pt`` (weights only) into ``dest/name`` with config and evaluated metrics.

    ``name`` must be a plain model name (:func:`check_model_name`). An existing
    ``dest/name`` that holds files is refused unless ``overwrite``.
    """
    run_dir = Path(run_dir)
    target = Path(dest) / check_model_name(name)
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise UnetsegError(f"{target} already holds a model; pass --overwrite to replace it or choose another --name")
    if target.exists() and not target.is_dir():
        raise UnetsegError(f"{target} is a file, not a model folder; remove it or choose another --name")
    missing = [f for f in FINISHED_RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        raise UnetsegError(f"{run_dir}: not a finished unetseg run ({', '.join(missing)} missing); train it to the end "
                           "(or --resume it) and export again")
    # Before any file is written (a run without validation rows stops here), and before the model it started
    # from may be replaced by this one.
    training = training_history(run_dir)
    checkpoint = Checkpoint.load(run_dir / "best.pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built in a hidden folder beside the target and moved into place at the end, so a failure
    # leaves no half-written model (which `models` and the viewer would offer) and never mixes old and new files.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model_path = checkpoint.without_training_state().save(staging / "model.pt")
        size = model_path.stat().st_size
        if size > MAX_SHIPPED_BYTES:
            raise UnetsegError(f"{run_dir}: model is {size / 2**20:.1f} MB; shipped models must stay under "
                               f"{MAX_SHIPPED_BYTES / 2**20:.0f} MB (fewer channels, or keep it as a run folder)")
        shutil.copyfile(run_dir / "config.yaml", staging / "config.yaml")
        shutil.copyfile(run_dir / "metrics.jsonl", staging / "training_metrics.jsonl")
        shutil.copyfile(run_dir / "curves.png", staging / "curves.png")
        summary = {**record_evaluation(staging, data_root), "checkpoint": f"{name} (from {run_dir}/best.pt)",
                   "training": training}
        write_json(staging / "metrics.json", summary)
        if target.exists():  # only with overwrite (checked above)
            shutil.rmtree(target)
        staging.chmod(0o755)  # mkdtemp makes it private (0700); a shipped model is read by every user
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def record_evaluation(model_dir: str | Path, data_root: str | Path | None, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``model_dir/model.pt`` on its validation split without and with flip TTA.

    Writes ``per_case.csv`` and ``per_case_tta.csv`` into ``model_dir`` and
    returns the plain summary with the TTA summary under ``"with_tta"`` (each
    with its ``seconds_per_case``): what ``metrics.json`` records.
    """
    model_dir = Path(model_dir)
    model_path = model_dir / "model.pt"
    summaries = {}
    for tta, csv_name in ((False, "per_case.csv"), (True, "per_case_tta.csv")):
        with tempfile.TemporaryDirectory() as tmp:
            summaries[tta] = evaluate(model_path, data_root, None, "val", tmp, tta=tta, device="cpu", progress=progress)
            shutil.move(Path(tmp) / "per_case.csv", model_dir / csv_name)
    keep = ("num_cases", "classes", "mean_dice", "tta_flips", "seconds_per_case")
    return {**summaries[False], "with_tta": {k: summaries[True][k] for k in keep}}

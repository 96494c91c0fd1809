"""One run of a study: its folder, whether it is finished, and its per-case results.

A study's run folder is an ordinary ``fit`` run folder
(``<study>/runs/<variant>/seed<k>``) plus ``per_case.json``: the final
weights (``last.pt``, the end of the fixed budget; no checkpoint selection on
the validation cases) scored on every validation case by
:func:`unetseg.evaluate.evaluate_cases`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from unetseg.config import Config, config_from_dict, save_config
from unetseg.data.datasets import Case
from unetseg.errors import UnetsegError
from unetseg.evaluate import evaluate_cases, summarize
from unetseg.infer import Segmenter, load_checkpoint
from unetseg.runlog import read_jsonl, write_json

PER_CASE = "per_case.json"
FINAL_CHECKPOINT = "last.pt"
# Small files of a run folder that are committed (checkpoints and PNGs are not).
SMALL_FILES = ("config.yaml", "split.json", "metrics.jsonl", "gradients.jsonl", "command.txt", PER_CASE)


def run_dir(study_dir: str | Path, variant: str, seed: int) -> Path:
    """``<study_dir>/runs/<variant>/seed<seed>``."""
    return Path(study_dir) / "runs" / variant / f"seed{seed}"


def analysis_path(study_dir: str | Path, kind: str, variant: str, seed: int, suffix: str = ".json") -> Path:
    """``<study_dir>/analysis/<kind>_<variant>_seed<seed><suffix>``: one run's record of one analysis."""
    return Path(study_dir) / "analysis" / f"{kind}_{variant}_seed{seed}{suffix}"


def read_analyses(study_dir: str | Path, kind: str, variant: str, seeds: Sequence[int]) -> dict[int, Any]:
    """``{seed: record}`` of the :func:`analysis_path` JSON records of ``seeds`` that exist, in seed order."""
    paths = {s: analysis_path(study_dir, kind, variant, s) for s in seeds}
    return {s: json.loads(path.read_text()) for s, path in paths.items() if path.is_file()}


def trained_epochs(run: Path) -> int:
    """Epochs recorded in ``metrics.jsonl`` (0 when there is none)."""
    return len(read_jsonl(run / "metrics.jsonl"))


def saved_config(run: Path) -> dict[str, Any] | None:
    """A run folder's ``config.yaml`` as this code reads configs (fields added since take their defaults), or None."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    return config_from_dict(yaml.safe_load(path.read_text()), source=str(path)).to_dict()


def check_same_config(run: Path, cfg: Config) -> None:
    """Raise when ``run`` was started with a config other than ``cfg`` (a changed budget must not mix)."""
    saved = saved_config(run)
    if saved is not None and saved != cfg.to_dict():
        raise UnetsegError(
            f"{run} was trained with a different config than the study now asks for; "
            f"delete that folder or give the study another --out"
        )


def training_state(run: Path, cfg: Config) -> str:
    """``"done"`` (trained and scored), ``"trained"`` (needs scoring), ``"partial"`` (resume) or ``"new"``."""
    check_same_config(run, cfg)
    return _progress_state(run, cfg)


def _progress_state(run: Path, cfg: Config) -> str:
    last = run / FINAL_CHECKPOINT
    if not last.is_file():
        return "new"
    epoch = int(load_checkpoint(last)["epoch"])
    if epoch < cfg.train.epochs - 1:
        return "partial"
    return "done" if (run / PER_CASE).is_file() else "trained"


def finished_twin(study_dirs: Sequence[str | Path], seed: int, cfg: Config, split: dict[str, list[str]]) -> Path | None:
    """A finished, scored run of another study trained with exactly ``cfg`` but for its name, on the same ``split``
    (its ``split.json``: the data folder is not part of the config), or None.

    Training on the CPU repeats bit for bit (same config, same seed, same cases: the same weights and per-case
    scores; ``test_a_study_that_repeats_runs_of_another_reproduces_them_exactly``), so copying such a run is the
    same as training it again. Looks at ``<study_dir>/runs/*/seed<seed>`` of each folder in order.
    """
    wanted = {**cfg.to_dict(), "name": None}
    for study_dir in study_dirs:
        for run in sorted((Path(study_dir) / "runs").glob(f"*/seed{seed}")):
            saved = saved_config(run)
            if (saved is not None and {**saved, "name": None} == wanted and (run / "split.json").is_file()
                    and json.loads((run / "split.json").read_text()) == split and _progress_state(run, cfg) == "done"):
                return run
    return None


def adopt_twin(twin: Path, run: Path, cfg: Config) -> None:
    """Copy every file of the finished run ``twin`` into ``run`` (which must not exist yet), with ``cfg`` (this
    study's name) as its config and a line in ``command.txt`` saying where it came from.

    The copy is made in a sibling folder and renamed into place, so a kill leaves no half-copied run.
    """
    staging = run.with_name(f".{run.name}.copying")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in twin.iterdir():
        if path.is_file() and path.name != "config.yaml":
            shutil.copy2(path, staging / path.name)
    save_config(cfg, staging / "config.yaml")
    with open(staging / "command.txt", "a") as f:
        f.write(f"# copied by unetseg ablate --reuse from {twin} (trained there with the same config)\n")
    staging.rename(run)


def clear_partial_files(run: Path) -> None:
    """Remove logs a run killed before its first checkpoint left behind (so a fresh start does not append to them)."""
    for name in ("metrics.jsonl", "gradients.jsonl"):
        (run / name).unlink(missing_ok=True)


def count_parameters(segmenter: Segmenter) -> int:
    return sum(p.numel() for p in segmenter.model.parameters())


def score_run(run: Path, val_cases: Sequence[Case]) -> dict[str, Any]:
    """Score the run's final weights on ``val_cases`` and write ``per_case.json``.

    The validation cases must be the ones in the run's ``split.json``.

    Returns:
        ``{"checkpoint", "epoch", "num_parameters", "class_names", "summary", "cases": [row, ...]}``
        with rows as :func:`unetseg.evaluate.evaluate_cases` returns them.
    """
    split = json.loads((run / "split.json").read_text())
    if [c.case_id for c in val_cases] != split["val"]:
        raise UnetsegError(f"{run}: its validation cases differ from the study's; the split must be shared")
    checkpoint = load_checkpoint(run / FINAL_CHECKPOINT)
    segmenter = Segmenter.from_payload(checkpoint, device="cpu")
    rows = evaluate_cases(segmenter, val_cases, progress=False)
    payload = {
        "checkpoint": FINAL_CHECKPOINT,
        "epoch": int(checkpoint["epoch"]),
        "num_parameters": count_parameters(segmenter),
        "class_names": list(segmenter.class_names),
        "summary": summarize(rows, segmenter.class_names),
        "cases": rows,
    }
    write_json(run / PER_CASE, payload, indent=1)
    return payload


def read_per_case(run: Path) -> dict[str, Any]:
    """The ``per_case.json`` of a scored run."""
    path = run / PER_CASE
    if not path.is_file():
        raise UnetsegError(f"{path} missing; run the study (without --report-only) to score this run")
    return json.loads(path.read_text())

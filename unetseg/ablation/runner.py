"""The resumable study runner behind ``unetseg ablate``.

``run_study`` trains every variant x seed with :func:`unetseg.train.fit`
(resuming a run folder that has a ``last.pt`` short of the last epoch,
skipping finished ones), scores each run's final weights on the shared
validation cases, runs the post-training analyses (loss landscape, lesions,
qualitative slices, how far each run's weights moved) once each, copies the small artefacts into the report
folder, and writes the report from that folder alone.

Study folder (checkpoints; not committed)::

    <out>/study.yaml  log.jsonl  runs/<variant>/seed<k>/  analysis/

Report folder (committed under ``docs/ablation/<name>``)::

    study.yaml  log.jsonl  runs/<variant>/seed<k>/{config.yaml, split.json, metrics.jsonl,
    gradients.jsonl, command.txt, per_case.json}  analysis/*.json|npz  figures/*.png  summary.json  report.md
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

from unetseg.ablation.landscape import landscape_of_run, landscape_spread_of_run
from unetseg.ablation.lesion import deletion_curve, lesion_study
from unetseg.ablation.qualitative import qualitative_arrays
from unetseg.ablation.runs import (
    FINAL_CHECKPOINT,
    SMALL_FILES,
    adopt_twin,
    analysis_path,
    clear_partial_files,
    finished_twin,
    run_dir,
    score_run,
    training_state,
)
from unetseg.ablation.study import StudySpec, load_study, resolved_study, save_study
from unetseg.ablation.variants import Variant, build_variants, variant_config
from unetseg.ablation.weights import write_weight_change
from unetseg.data.datasets import Case, resolve_data_root
from unetseg.errors import UnetsegError
from unetseg.infer import Segmenter
from unetseg.runlog import append_jsonl
from unetseg.train import case_split, fit, prepare_data
from unetseg.progress import progress_bar

LOG = "log.jsonl"


def _append_log(study_dir: Path, row: dict[str, Any]) -> None:
    append_jsonl(study_dir / LOG, row)


def machine_info(jobs: int, threads: int) -> dict[str, Any]:
    """CPU model, core count, torch version and parallelism of this invocation."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "jobs": jobs, "threads_per_job": threads,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


# ---- training and scoring one run -------------------------------------------------------

def _val_cases(spec: StudySpec, variant: Variant, seed: int, data_root: str | None, progress: bool) -> list[Case]:
    """Validation cases of a run (the split every run shares), loaded for its scoring. Loaded per run, not kept
    in a module-level cache: next to a run's minutes of training it costs seconds (DSB masks come from the disk
    cache, :mod:`unetseg.data.cache`)."""
    return prepare_data(variant_config(spec, variant, seed), data_root, progress=progress)[3]


def _study_name(study_dir: Path) -> str | None:
    """The name in a study folder's ``study.yaml`` (None without one)."""
    path = study_dir / "study.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("name") if path.is_file() else None


def train_and_score(spec_dict: dict[str, Any], variant: Variant, seed: int, study_dir: str,
                    data_root: str | None, threads: int, progress: bool, reuse: Sequence[str] = ()) -> dict[str, Any]:
    """Bring one run to ``done``: train (or resume) with ``fit``, then score its final weights. A new run whose
    exact training config a finished run in one of the ``reuse`` study folders has is copied from there instead
    (:func:`unetseg.ablation.runs.finished_twin`).

    Top-level and picklable so a process pool can run it. Returns a log row.
    """
    torch.set_num_threads(threads)
    spec = resolved_study(spec_dict)
    cfg = variant_config(spec, variant, seed)
    run = run_dir(study_dir, variant.name, seed)
    state = training_state(run, cfg)
    t0 = time.perf_counter()
    twin = finished_twin(reuse, seed, cfg, case_split(cfg, data_root)[2]) if reuse and state == "new" else None
    if twin is not None:
        if run.exists():  # a run killed before its first checkpoint: nothing of it is kept
            shutil.rmtree(run)
        adopt_twin(twin, run, cfg)
        return {"event": "run", "variant": variant.name, "seed": seed, "action": "reused", "from": str(twin),
                "from_study": _study_name(twin.parents[2]),
                "seconds": round(time.perf_counter() - t0, 2), "time": time.time()}
    command = ["unetseg", "ablate", "--config", spec.name, *(["--quick"] if spec.quick else []),
               f"# variant {variant.name} seed {seed}"]
    if state == "new":
        if run.exists():
            clear_partial_files(run)
        fit(cfg, run, data_root=data_root, command=command, progress=progress)
    elif state == "partial":
        fit(cfg, run, data_root=data_root, resume=True, command=command, progress=progress)
    if state != "done":
        score_run(run, _val_cases(spec, variant, seed, data_root, progress))
    action = {"new": "trained", "partial": "resumed", "trained": "scored", "done": "skipped"}[state]
    return {"event": "run", "variant": variant.name, "seed": seed, "action": action,
            "seconds": round(time.perf_counter() - t0, 2), "time": time.time()}


# ---- post-training analyses ---------------------------------------------------------------


@dataclass
class StudyData:
    """The shared training and validation cases (loaded once, only when an analysis needs them)."""

    train: list[Case]
    val: list[Case]


def _load_study_data(spec: StudySpec, variants: list[Variant], data_root: str | None, progress: bool) -> StudyData:
    _, _, train, val = prepare_data(variant_config(spec, variants[0], spec.seeds[0]), data_root, progress=progress)
    return StudyData(train, val)


def weight_change_path(study_dir: Path, variant: str, seed: int) -> Path:
    """``<study_dir>/analysis/weights_<variant>_seed<k>.json``: how far a run's weights moved."""
    return analysis_path(study_dir, "weights", variant, seed)


def _log_analysis(study_dir: Path, label: str, t0: float, progress: bool) -> None:
    seconds = round(time.perf_counter() - t0, 2)
    _append_log(study_dir, {"event": "analysis", "name": label, "seconds": seconds, "time": time.time()})
    if progress:
        print(f"analysis {label}: {seconds:.1f} s", flush=True)


def record_weight_changes(spec: StudySpec, variants: list[Variant], study_dir: Path, progress: bool) -> None:
    """Every run's distance from its initial weights (:mod:`unetseg.ablation.weights`); skipped when its file exists."""
    for v in variants:
        for seed in spec.seeds:
            path = weight_change_path(study_dir, v.name, seed)
            if not path.is_file():
                t0 = time.perf_counter()
                path.parent.mkdir(parents=True, exist_ok=True)
                write_weight_change(run_dir(study_dir, v.name, seed), FINAL_CHECKPOINT,
                                    variant_config(spec, v, seed).train.seed, path)
                _log_analysis(study_dir, path.stem, t0, progress)


def _pending_analyses(spec: StudySpec, names: Collection[str], study_dir: Path) -> list[tuple[str, Any]]:
    """``(kind, arguments)`` of every analysis whose output file does not exist yet, in the order they run."""
    a = spec.analysis
    todo: list[tuple[str, Any]] = []

    def per_seed(kind: str, variants: Sequence[str], seeds: Sequence[int], prefix: str) -> None:
        for name in (n for n in variants if n in names):
            for seed in (s for s in seeds if s in spec.seeds):
                path = analysis_path(study_dir, prefix, name, seed)
                if not path.is_file():
                    todo.append((kind, (name, seed, path)))

    for name in (n for n in a.landscape_variants if n in names):
        stem = analysis_path(study_dir, "landscape", name, a.landscape_seed, suffix="")
        if not stem.with_suffix(".json").is_file():
            todo.append(("landscape", (name, stem)))
    per_seed("spread", a.landscape_variants, a.landscape_spread_seeds, "landscape1d")
    per_seed("lesion", a.lesion_variants, spec.seeds, "lesion")
    per_seed("veit", a.veit_variants, spec.seeds, "veit")
    qual = [n for n in a.qualitative_variants if n in names]
    qual_path = study_dir / "analysis" / "qualitative.npz"
    if qual and not qual_path.is_file():
        todo.append(("qualitative", (qual, qual_path)))
    return todo


def run_analyses(spec: StudySpec, variants: list[Variant], study_dir: Path, data_root: str | None,
                 progress: bool) -> None:
    """Weight distances, loss landscapes, lesion studies and qualitative predictions; each skipped when its file exists."""
    record_weight_changes(spec, variants, study_dir, progress)
    names = {v.name: v for v in variants}
    a = spec.analysis
    todo = _pending_analyses(spec, names, study_dir)
    if not todo:
        return
    data = _load_study_data(spec, variants, data_root, progress)
    for kind, args in todo:
        t0 = time.perf_counter()
        if kind == "landscape":
            name, stem = args
            cfg = variant_config(spec, names[name], a.landscape_seed)
            landscape_of_run(run_dir(study_dir, name, a.landscape_seed), FINAL_CHECKPOINT, data.train, cfg, a, stem)
            label = stem.name
        elif kind == "spread":
            name, seed, path = args
            landscape_spread_of_run(run_dir(study_dir, name, seed), FINAL_CHECKPOINT, data.train,
                                    variant_config(spec, names[name], seed), a, path)
            label = path.stem
        elif kind == "veit":
            name, seed, path = args
            deletion_curve(run_dir(study_dir, name, seed) / FINAL_CHECKPOINT, data.val, path, a.veit_subsets, seed)
            label = path.stem
        elif kind == "lesion":
            name, seed, path = args
            lesion_study(run_dir(study_dir, name, seed) / FINAL_CHECKPOINT, data.val, path)
            label = path.stem
        else:
            names_q, path = args
            segmenters = {n: Segmenter.from_checkpoint(run_dir(study_dir, n, spec.seeds[0]) / FINAL_CHECKPOINT)
                          for n in names_q}
            cfg = variant_config(spec, names[names_q[0]], spec.seeds[0])
            qualitative_arrays(segmenters, data.val[: a.qualitative_cases], cfg.data.slice_axis, a.qualitative_crop, path)
            label = path.stem
        _log_analysis(study_dir, label, t0, progress)


# ---- artefacts and the whole study -------------------------------------------------------


def export_artefacts(study_dir: Path, report_dir: Path) -> None:
    """Copy the study's small files (no checkpoints, no PNGs) into ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for name in ("study.yaml", LOG):
        if (study_dir / name).is_file():
            shutil.copy2(study_dir / name, report_dir / name)
    for run in sorted((study_dir / "runs").glob("*/seed*")):
        target = report_dir / run.relative_to(study_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
    if (study_dir / "analysis").is_dir():
        shutil.copytree(study_dir / "analysis", report_dir / "analysis", dirs_exist_ok=True)


def _check_study_file(spec: StudySpec, study_dir: Path) -> None:
    path = study_dir / "study.yaml"
    # the saved study as this code reads it (fields added since take their defaults), against the study given
    if path.is_file() and resolved_study(yaml.safe_load(path.read_text())).to_dict() != spec.to_dict():
        raise UnetsegError(
            f"{study_dir} holds a study with other settings (study.yaml differs); use another --out or delete it"
        )


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; else :class:`UnetsegError` saying what it should be."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise UnetsegError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. --shard 2/8 for the second of 8 "
                           "machines (a SLURM array: --shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT)")
    return k, n


def shard_tasks(tasks: list, shard: tuple[int, int] | None) -> list:
    """The tasks of shard ``(K, N)``: every N-th, starting with the K-th (all tasks when ``shard`` is None)."""
    if shard is None:
        return tasks
    k, n = shard
    return tasks[k - 1::n]


def _train_runs(spec: StudySpec, tasks: list[tuple[Variant, int]], study_dir: Path, root: str, jobs: int,
                threads: int, progress: bool, reuse: Sequence[str] = ()) -> None:
    """Train (or skip, when finished; or copy from a ``reuse`` study) each ``(variant, seed)`` run, ``jobs`` at a
    time in spawned processes of ``threads`` threads, logging each to ``log.jsonl`` as it ends."""
    spec_dict = spec.to_dict()
    runs_bar = progress_bar(enabled=progress, total=len(tasks), desc="runs", unit="run")

    def finished(row: dict[str, Any]) -> None:
        _append_log(study_dir, row)
        if progress:
            runs_bar.write(f"{row['variant']} seed {row['seed']}: {row['action']} ({row['seconds']:.0f} s)")
        runs_bar.update(1)

    if jobs <= 1:
        for v, s in tasks:
            finished(train_and_score(spec_dict, v, s, str(study_dir), root, threads, progress, reuse))
    else:  # parallel runs draw no bars of their own (they would overwrite each other); the runs bar counts them
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(train_and_score, spec_dict, v, s, str(study_dir), root, threads, False, reuse)
                       for v, s in tasks]
            for future in as_completed(futures):
                finished(future.result())
    runs_bar.close()


def run_study(spec: StudySpec, study_dir: str | Path, report_dir: str | Path, data_root: str | Path | None = None,
              jobs: int = 1, progress: bool = True, command: list[str] | None = None,
              shard: tuple[int, int] | None = None, reuse: Sequence[str | Path] = ()) -> Path | None:
    """Run (or continue) a whole study and write its report; returns the report's path.

    With ``shard = (K, N)`` only every N-th run (starting with the K-th) is trained, into the same
    ``study_dir``, and nothing else: N machines sharing the folder (a scheduler's job array) train the whole
    matrix between them, and the same call without ``shard`` afterwards keeps every finished run and does the
    analyses and the report. Returns None for a shard.

    Args:
        spec: the resolved study.
        study_dir: run folders with checkpoints (resumable).
        report_dir: small artefacts, figures, ``summary.json`` and ``report.md``.
        data_root: folder holding the data set folders.
        jobs: runs trained in parallel processes (each with ``cores // jobs`` threads,
            or ``$OMP_NUM_THREADS``).
        progress: a bar over the runs and a line per finished run (with ``jobs == 1``
            also each run's own epoch bars), and a line per analysis.
        command: the command line, recorded in ``log.jsonl`` and quoted by the report.
        reuse: other study folders; a run not yet started here whose exact training config (name aside) a
            finished run there has is copied, not retrained (logged as ``reused`` with its source).
    """
    from unetseg.ablation.report import write_report

    study_dir, report_dir = Path(study_dir), Path(report_dir)
    for folder in reuse:
        if not (Path(folder) / "runs").is_dir():
            raise UnetsegError(f"--reuse {folder}: not a study folder (no runs/ inside); pass a study's --out folder")
    root = str(resolve_data_root(data_root))
    study_dir.mkdir(parents=True, exist_ok=True)
    _check_study_file(spec, study_dir)
    save_study(spec, study_dir / "study.yaml")
    variants = build_variants(spec)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))
    start = time.time()
    _append_log(study_dir, {"event": "start", "time": start, "machine": machine_info(jobs, threads),
                            "command": " ".join(command) if command else None})
    tasks = shard_tasks([(v, s) for v in variants for s in spec.seeds], shard)
    _train_runs(spec, tasks, study_dir, root, jobs, threads, progress, [str(f) for f in reuse])
    if shard is not None:
        _append_log(study_dir, {"event": "shard", "shard": f"{shard[0]}/{shard[1]}", "runs": len(tasks), "start": start,
                                "end": time.time(), "machine": machine_info(jobs, threads)})
        return None
    run_analyses(spec, variants, study_dir, root, progress)
    _append_log(study_dir, {"event": "invocation", "start": start, "end": time.time(),
                            "seconds": round(time.time() - start, 2), "machine": machine_info(jobs, threads)})
    export_artefacts(study_dir, report_dir)
    return write_report(report_dir)


def ablate(config: str, quick: bool = False, out: str | None = None, report_dir: str | None = None,
           data_root: str | None = None, report_only: bool = False, jobs: int = 1, progress: bool = True,
           command: list[str] | None = None, shard: str | None = None, reuse: Sequence[str] = ()) -> Path | None:
    """What ``unetseg ablate`` does; returns the path of the written ``report.md``.

    Defaults: study folder ``runs/ablation/<name>[-quick]``; report folder
    ``docs/ablation/<name>`` for a full study, ``<out>/report`` for ``--quick``.
    ``report_only`` redraws figures and report from the report folder alone. ``shard`` (``"K/N"``) trains
    only that share of the runs and returns None (see :func:`run_study`).
    """
    from unetseg.ablation.report import write_report

    spec = load_study(config, quick=quick)
    study_dir = Path(out or f"runs/ablation/{spec.name}{'-quick' if quick else ''}")
    target = Path(report_dir or (study_dir / "report" if quick else f"docs/ablation/{spec.name}"))
    if report_only and (shard is not None or reuse):
        raise UnetsegError(f"{'--shard' if shard is not None else '--reuse'} is about training runs; it does not go "
                           "with --report-only")
    if report_only:
        if not (target / "study.yaml").is_file():
            raise UnetsegError(f"{target}: no study artefacts to report on; run the study first or pass --report-dir")
        found = _study_name(target)
        if found != spec.name:
            raise UnetsegError(f"{target} holds the study {found!r}, not {spec.name!r}; pass --config {found}")
        return write_report(target)
    if jobs < 1:
        raise UnetsegError(f"--jobs must be at least 1, got {jobs}")
    return run_study(spec, study_dir, target, data_root, jobs, progress, command,
                     shard=parse_shard(shard) if shard is not None else None, reuse=reuse)

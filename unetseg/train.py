"""Training: ``fit(cfg, out_dir)`` -> a self-describing run folder.

The run folder holds ``config.yaml`` (resolved), ``command.txt``,
``split.json``, ``metrics.jsonl`` (one line per epoch), ``best.pt`` and
``last.pt`` (written atomically), ``curves.png``, and ``gradients.jsonl`` when
gradient logging is on.

Under ``torchrun`` the same code runs DistributedDataParallel (gloo on CPU,
nccl on CUDA): each rank trains on its share of every epoch and validates its
share of the cases; metrics are gathered across ranks and rank 0 alone writes.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from unetseg import __version__
from unetseg.checkpoint import TRAINING_ENTRIES, Checkpoint, Preprocessing, TrainingState, build_model, model_arguments
from unetseg.config import Config, TrainConfig, apply_overrides, load_config, save_config
from unetseg.data.datasets import Case, CaseRef, DatasetInfo, PatchDataset, dataset_info, list_cases, load_cases, split_cases, training_samples
from unetseg.data.kinds import image_kind, kind_balanced_weights
from unetseg.data.transforms import build_augmentation, flip_combinations, resolve_flip_axes
from unetseg.errors import UnetsegError
from unetseg.eventlog import EVENT_DIR, EventLog
from unetseg.device import resolve_device
from unetseg.evaluate import evaluate_cases, network_predictor, summarize
from unetseg.losses import make_loss
from unetseg.model import UNet
from unetseg.plots import plot_training_curves
from unetseg.provenance import INIT_FROM_FILE, source_record
from unetseg.runlog import append_jsonl, read_epoch_log, write_json, write_jsonl
from unetseg.progress import progress_bar


@dataclass
class DistInfo:
    """Process-group facts; a single process has ``world_size == 1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def model_args(cfg: Config, info: DatasetInfo) -> dict[str, Any]:
    """Constructor arguments of the run's :class:`UNet` (stored in checkpoints)."""
    return model_arguments(cfg.model, info.in_channels, info.num_classes)


def preprocessing_settings(cfg: Config, info: DatasetInfo) -> Preprocessing:
    """What inference must do to an image before the network sees it."""
    return Preprocessing.from_config(cfg.data, info.in_channels)


def tta_flips(cfg: Config) -> tuple[tuple[int, ...], ...]:
    """The flips a model of ``cfg`` is trained with, as stored in its checkpoints for flip test-time augmentation."""
    return tuple(flip_combinations(resolve_flip_axes(cfg.augment, cfg.model.spatial_dims)))


COLLAPSE_DICE = 0.01  # validation Dice below this: the class is (next to) never predicted


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """``t.optimizer``: AdamW (``lr``, ``weight_decay``), or SGD with Nesterov momentum ``t.momentum`` (the
    plain-network setting of the skip-connection studies)."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0,
                               weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def collapsed_classes(history: Sequence[dict[str, Any]], class_names: Sequence[str], patience: int = 2) -> list[str]:
    """Foreground classes whose validation Dice was below :data:`COLLAPSE_DICE` in each of the last
    ``patience`` validations.

    Args:
        history: ``metrics.jsonl`` rows, oldest first (rows without validation are skipped).
        class_names: background first.
    """
    validated = [r for r in history if "val_mean_dice" in r][-patience:]
    if len(validated) < patience:
        return []
    def low(value: float | None) -> bool:  # None (strict JSON's undefined): the class was absent, not missed
        return value is not None and value < COLLAPSE_DICE

    return [k for k in class_names[1:] if all(low(r.get(f"val_dice_{k}", 1.0)) for r in validated)]


def check_kind_balance(kind_balance: float, world_size: int) -> None:
    """Refuse ``data.kind_balance`` > 0 with several processes: the distributed sampler draws every sample alike."""
    if kind_balance > 0 and world_size > 1:
        raise UnetsegError("data.kind_balance is not supported with several processes (torchrun): set it to 0")


def sampling_weights(images: Sequence[np.ndarray], kind_balance: float) -> np.ndarray | None:
    """Per-sample drawing weights for ``data.kind_balance`` > 0 (:func:`~unetseg.data.kinds.kind_balanced_weights`
    over :func:`~unetseg.data.kinds.image_kind` of each ``(C, *S)`` sample); None draws every sample alike."""
    if kind_balance <= 0:
        return None
    return kind_balanced_weights([image_kind(image) for image in images], kind_balance)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, time_progress: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine or poly(0.9) decay to 0.

    The decay follows whichever budget is further spent: the steps (``step / total_steps``) or the time
    (``time_progress``, the share of ``train.max_minutes`` used; 0 without a time budget).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_progress))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1 - progress) ** 0.9
    raise UnetsegError(f"train.schedule must be 'cosine' or 'poly', got {schedule!r}")


class TimeBudget:
    """``train.max_minutes`` as the learning-rate schedule and the stopping rule see it.

    The share of the budget a step has used is planned once per epoch, from the time already spent and the
    length of the last epoch, so it is a function of the step within the epoch (the same on every rank)
    rather than of the clock at each step. Without a budget every share is 0 and no epoch is the last.
    """

    def __init__(self, minutes: float | None) -> None:
        self.seconds = minutes * 60 if minutes else None
        self._start, self._per_step = 0.0, 0.0

    def plan_epoch(self, elapsed_s: float, last_epoch_s: float | None, steps: int) -> None:
        """Start an epoch of ``steps`` steps after ``elapsed_s`` seconds; the last one took ``last_epoch_s``."""
        if self.seconds:
            self._start = elapsed_s / self.seconds
            self._per_step = (last_epoch_s or 0.0) / self.seconds / max(1, steps)

    def progress(self, step_in_epoch: int) -> float:
        """Share of the budget used at a step of the current epoch (0 without a budget)."""
        return min(1.0, self._start + step_in_epoch * self._per_step) if self.seconds else 0.0

    def spent(self, elapsed_s: float, epoch_s: float) -> bool:
        """Whether another epoch as long as ``epoch_s`` would end past the budget."""
        return bool(self.seconds) and elapsed_s + epoch_s > self.seconds


def gradient_norms(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per-layer L2 norms of the gradient and the weight for every convolution kernel, in registration order.

    Registration order is encoder (shallow to deep), then decoder levels finest
    first, then the head; ``unetseg.ablation.gradients`` orders them along the data path.
    """
    rows = []
    for name, p in model.named_parameters():
        if p.ndim >= 4 and p.grad is not None:
            g, w = float(p.grad.norm()), float(p.detach().norm())
            rows.append({"layer": name.removeprefix("module."), "grad_norm": g, "weight_norm": w, "ratio": g / max(w, 1e-12)})
    return rows


RESUME_ENTRIES = ("optimizer", "scheduler", "epoch", "best_metric", "best_epoch")


# UNet's defaults: what a checkpoint saved before an argument existed was built with (act: ReLU, stage_blocks: 1).
UNET_DEFAULTS = {name: p.default for name, p in inspect.signature(UNet).parameters.items()
                 if p.default is not inspect.Parameter.empty}


def check_resumable(state: Checkpoint, args: dict[str, Any], path: Path) -> None:
    """Raise :class:`UnetsegError` unless ``last.pt`` holds a training state (not an exported or best-only
    checkpoint) of the network that the run folder's ``config.yaml`` describes (``args``)."""
    present = {*state.extra, *(TRAINING_ENTRIES if state.training else ()), *(("epoch",) if state.epoch is not None else ())}
    missing = [key for key in RESUME_ENTRIES if key not in present]
    if missing:
        raise UnetsegError(f"{path}: holds no training state ({', '.join(missing)} missing; a best.pt or exported "
                           "model copied over last.pt?); start a new run instead of --resume")
    changed = network_differences(state, args)
    if changed:
        raise UnetsegError(f"{path.parent / 'config.yaml'}: describes a different network than {path.name} "
                           f"({changed}); restore the run's config.yaml or start a new run")


def network_differences(state: Checkpoint, args: dict[str, Any]) -> str:
    """How the checkpoint's network differs from the one ``args`` build (``""`` when it does not)."""
    saved = {k: state.model_args.get(k, UNET_DEFAULTS.get(k)) for k in args}  # an argument added since: its default
    return ", ".join(f"{k}: {saved[k]} in the checkpoint, {args[k]} in the config" for k in sorted(args)
                     if saved[k] != args[k])


def initial_weights(init_from: str, args: dict[str, Any], preprocessing: Preprocessing, info: DatasetInfo,
                    split: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The weights of ``train.init_from`` for fine-tuning a run of network ``args`` on ``split``.

    Raises:
        UnetsegError: another network, other input preprocessing or classes, or a checkpoint whose training cases
            include this run's validation cases (its scores would be on cases it learnt). The check covers the
            split the checkpoint records (every run and shipped checkpoint of this version does; one without
            gets a warning), not the cases the weights it was itself fine-tuned from had learnt.
    """
    state = Checkpoint.load(init_from)
    where = f"train.init_from={init_from}"
    changed = network_differences(state, args)
    if changed:
        raise UnetsegError(f"{where}: a different network than this run's config ({changed}); "
                           "set model.* to match it or start from scratch")
    mine, theirs = preprocessing, state.preprocessing
    if (mine.normalization, mine.slice_axis, mine.in_channels) != (theirs.normalization, theirs.slice_axis,
                                                                   theirs.in_channels):
        raise UnetsegError(f"{where}: trained on other input (normalization, slice axis, channels: "
                           f"{theirs.normalization}, {theirs.slice_axis}, {theirs.in_channels}; this run: "
                           f"{mine.normalization}, {mine.slice_axis}, {mine.in_channels}); set data.* to match it")
    if tuple(state.class_names) != tuple(info.class_names):
        raise UnetsegError(f"{where}: classes {list(state.class_names)}, this run's data set has "
                           f"{list(info.class_names)}")
    if state.split is None:
        warnings.warn(f"{where}: the checkpoint records no split, so it cannot be checked that this run's "
                      "validation cases were not among its training cases", stacklevel=2)
    same_data = state.dataset in (None, info.name)
    learnt = sorted(set((state.split or {}).get("train", [])) & set(split["val"])) if same_data else []
    if learnt:
        raise UnetsegError(f"{where}: it was trained on {len(learnt)} of this run's validation cases (e.g. "
                           f"{learnt[0]}); fine-tune with the split it was trained with (data.split_seed, "
                           "data.val_fraction, data.num_folds/fold as in its config)")
    return state.state_dict


def _truncate_jsonl(path: Path, keep: Any) -> None:
    """Keep only the lines for which ``keep(row)`` is true (used on resume; epochs counted from 1, an older log's
    renumbered, see :func:`read_epoch_log`); a partial last line goes too."""
    if path.is_file():
        write_jsonl(path, [r for r in read_epoch_log(path) if keep(r)])


# What fit writes into a run folder (a folder holding only these, but no last.pt, is a run killed before its first
# checkpoint: it is restarted from scratch); temporary files of killed saves start with a dot.
RUN_FILES = frozenset({"config.yaml", "command.txt", "split.json", "metrics.jsonl", "gradients.jsonl", "curves.png",
                       INIT_FROM_FILE, EVENT_DIR})
RUN_LOGS = ("metrics.jsonl", "gradients.jsonl", "command.txt", "curves.png", INIT_FROM_FILE)
TEMP_PREFIXES = (".last.pt.", ".best.pt.", ".metrics.jsonl.", ".gradients.jsonl.")


def check_out_dir(out: Path, resume: bool) -> bool:
    """Refuse an ``--out`` folder that a run must not write into; True when it holds a killed run to restart.

    A new run needs a missing or empty folder, or one holding only an earlier
    run's files without a checkpoint (killed before its first ``last.pt``).
    A folder with a checkpoint needs ``resume``; a folder with anything else
    (e.g. the user's own ``config.yaml``) is refused, so nothing of theirs is
    overwritten.
    """
    if out.exists() and not out.is_dir():
        raise UnetsegError(f"--out {out} is a file, not a folder; give a folder for the run")
    last_path = out / "last.pt"
    if resume:
        if not last_path.is_file():
            raise UnetsegError(
                f"{out}: nothing to resume (no last.pt: the run stopped before its first checkpoint); "
                f"start it again without --resume, with --out {out}"
            )
        return False
    if last_path.exists():
        raise UnetsegError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    names = {p.name for p in out.iterdir() if not p.name.startswith(TEMP_PREFIXES)} if out.is_dir() else set()
    if not names:
        return False
    if "split.json" in names and names <= RUN_FILES:
        return True
    others = sorted(names - RUN_FILES) or sorted(names)
    raise UnetsegError(
        f"--out {out} holds files that are not a unetseg run ({', '.join(others[:5])}); "
        "choose a new or empty folder so nothing in it is overwritten"
    )


def clean_out_dir(out: Path, restart: bool) -> None:
    """Remove temporary files of killed saves; for a restarted run also the old logs, so nothing is appended to them."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(TEMP_PREFIXES) and p.is_file():
            p.unlink()
    if restart:
        for name in RUN_LOGS:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / EVENT_DIR, ignore_errors=True)


def _gather_rows(rows: list[dict[str, Any]], di: DistInfo) -> list[dict[str, Any]]:
    if di.world_size == 1:
        return rows
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(di.world_size)]
    dist.all_gather_object(gathered, rows)
    return sorted((r for part in gathered for r in part), key=lambda r: r["case_id"])


def _mean_across_ranks(value: float, di: DistInfo, device: torch.device) -> float:
    if di.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / di.world_size


def case_split(cfg: Config, data_root: str | Path | None) -> tuple[list[CaseRef], DatasetInfo, dict[str, list[str]], set[str]]:
    """The labelled cases a run of ``cfg`` uses and their split, without reading any image.

    Returns:
        ``(refs, info, split, held_out)``: the case references (``data.max_cases`` applied), the data set's info,
        ``{"train": ids, "val": ids}`` as ``split.json`` records it (``train.val_max_cases`` applied to ``val``),
        and every held-out id (no training on them, also those ``val_max_cases`` leaves unscored).
    """
    refs, info = list_cases(dataset_info(cfg.data.dataset), data_root or cfg.data.root)
    if cfg.data.max_cases:
        refs = refs[: cfg.data.max_cases]
    split = split_cases(
        [r.case_id for r in refs], cfg.data.val_fraction, cfg.data.split_seed, cfg.data.num_folds, cfg.data.fold
    )
    held_out = set(split["val"])
    if cfg.train.val_max_cases:
        split["val"] = [r.case_id for r in refs if r.case_id in held_out][: cfg.train.val_max_cases]
    return refs, info, split, held_out


def prepare_data(
    cfg: Config, data_root: str | Path | None, progress: bool = True,
    listed: tuple[list[CaseRef], DatasetInfo, dict[str, list[str]], set[str]] | None = None,
) -> tuple[DatasetInfo, dict[str, list[str]], list[Case], list[Case]]:
    """Load the data set, split it by case, and return info, split, train cases, val cases.

    ``listed``: what :func:`case_split` returned for ``cfg`` already, so the cases are not listed twice.
    """
    refs, info, split, held_out = listed or case_split(cfg, data_root)
    cases = load_cases(refs, info, cfg.data.normalization, progress=progress)
    scored = set(split["val"])
    train = [c for c in cases if c.case_id not in held_out]
    val = [c for c in cases if c.case_id in scored]
    return info, split, train, val


def fit(
    cfg: Config,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    resume: bool = False,
    command: Sequence[str] | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> Path:
    """Train ``cfg`` and write its run folder; returns the folder.

    Args:
        cfg: the resolved configuration.
        out_dir: run folder (created; must not hold a run unless ``resume``).
        data_root: overrides ``cfg.data.root``.
        resume: continue from ``out_dir/last.pt`` (model, optimiser, scheduler,
            epoch; data order and augmentation are re-derived from seed and epoch,
            so a resumed run matches an uninterrupted one on CPU).
        command: the command line, recorded in ``command.txt``.
        progress: show tqdm bars.
        stop_after_epoch: stop after this epoch (0-based) as if interrupted; the
            schedule still spans ``cfg.train.epochs`` and ``resume`` continues it.
    """
    out = Path(out_dir)
    device = resolve_device(cfg.train.device)
    di = init_distributed(device)
    if di.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", di.local_rank)
        torch.cuda.set_device(device)
    restart = check_out_dir(out, resume)

    torch.manual_seed(cfg.train.seed)
    listed = case_split(cfg, data_root)
    _, info, split, _ = listed
    check_kind_balance(cfg.data.kind_balance, di.world_size)  # before any image is read
    init, start = None, None  # checked before any image is read or the run folder is made: a refusal leaves nothing
    if cfg.train.init_from and not resume:
        init = initial_weights(cfg.train.init_from, model_args(cfg, info), preprocessing_settings(cfg, info),
                               info, split)
        start = source_record(cfg.train.init_from)  # what the weights were when read: the source may be replaced
    info, split, train_cases, val_cases = prepare_data(cfg, data_root, progress=progress and di.is_main, listed=listed)
    if di.is_main:
        start_run_folder(cfg, out, split, restart, command)
        if start is not None:
            write_json(out / INIT_FROM_FILE, start, indent=1)
    training = _Training(cfg, out, info, split, train_cases, val_cases, device, di, progress, resume, init)
    for epoch in range(training.start_epoch, cfg.train.epochs):
        row, out_of_time = training.epoch(epoch)
        if out_of_time and epoch < cfg.train.epochs - 1 and progress and di.is_main:
            tqdm.write(f"train.max_minutes={cfg.train.max_minutes} reached: stopped after epoch {epoch + 1} "
                       f"of {cfg.train.epochs}", file=sys.stderr)
        if out_of_time or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    training.events.close()
    if di.world_size > 1:
        dist.barrier()
    return out


def extend_run(run_dir: Path, epochs: int) -> Config:
    """Raise the run's ``train.epochs`` to ``epochs`` in its ``config.yaml`` (and return that config), so that
    ``fit(cfg, run_dir, resume=True)`` trains on from where it stopped.

    The learning-rate schedule is a function of the step and the total number of steps, so it is re-planned over
    the new total: a finished run's rate, decayed to about 0, rises again to what the longer schedule has at this
    step (a warm restart, as in SGDR) and decays to 0 at the new end. Warm-up is not repeated.
    """
    cfg = load_config(str(run_dir / "config.yaml"))
    if epochs <= cfg.train.epochs:
        raise UnetsegError(f"{run_dir} is planned for {cfg.train.epochs} epochs; --epochs with --resume extends a run, "
                           f"so give more than {cfg.train.epochs} (or --resume alone to continue it)")
    cfg = apply_overrides(cfg, [f"train.epochs={epochs}"], source=f"{run_dir}/config.yaml")
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def start_run_folder(cfg: Config, out: Path, split: dict[str, list[str]], restart: bool,
                     command: Sequence[str] | None) -> None:
    """Create the run folder (removing a killed run's leftovers) and write split, config and command."""
    out.mkdir(parents=True, exist_ok=True)
    clean_out_dir(out, restart)
    write_json(out / "split.json", split, indent=1)  # first: marks the folder as a run's
    save_config(cfg, out / "config.yaml")
    if command is not None:
        with (out / "command.txt").open("a") as f:
            f.write(" ".join(command) + "\n")


class _Training:
    """The state of one run between epochs: model, optimiser, schedule, data, history; :func:`fit` drives it."""

    def __init__(self, cfg: Config, out: Path, info: DatasetInfo, split: dict[str, list[str]], train_cases: list[Case],
                 val_cases: list[Case], device: torch.device, di: DistInfo, progress: bool, resume: bool,
                 init_weights: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg, self.out, self.info, self.split, self.val_cases = cfg, out, info, split, val_cases
        self.device, self.di, self.progress = device, di, progress
        self.args = model_args(cfg, info)
        self.model: UNet = build_model(self.args).to(device)
        images, labels = training_samples(train_cases, cfg.model.spatial_dims, cfg.data.slice_axis)
        transform = build_augmentation(cfg.augment, cfg.data.normalization, cfg.model.spatial_dims, seed=cfg.train.seed)
        self.dataset = PatchDataset(images, labels, cfg.data.patch_size, transform, seed=cfg.train.seed * 1000 + di.rank)
        self.sample_weights = sampling_weights(images, cfg.data.kind_balance)  # fit checked: one process
        t = cfg.train
        self.memory_format = (torch.channels_last if t.channels_last and cfg.model.spatial_dims == 2
                              else torch.contiguous_format)
        self.model.to(memory_format=self.memory_format)
        self.batches_per_epoch = t.steps_per_epoch or max(1, len(self.dataset) // (t.batch_size * di.world_size))
        total_steps = self.batches_per_epoch * t.epochs
        self.optimizer = make_optimizer(self.model, t)
        self.budget = TimeBudget(t.max_minutes)
        self.step_in_epoch = -1  # the schedule reads it: a step's share of the time budget is planned per epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, t.warmup_steps, t.schedule,
                                                self.budget.progress(self.step_in_epoch + 1))
        )
        self.start_epoch, self.best, self.best_epoch = 0, -1.0, -1
        self.net = DistributedDataParallel(self.model) if di.world_size > 1 else self.model
        self.loss_fn = make_loss(t.dice_ce_lambda_ce, t.dice_batch, t.dice_background)
        self.trained_flips = tta_flips(cfg)  # the mirrorings augmentation uses: what flip TTA may average
        self.preprocessing = preprocessing_settings(cfg, info)
        self.segmenter = network_predictor(self.model, self.preprocessing, info.class_names, device)
        self.history: list[dict[str, Any]] = []
        self.t_start = time.perf_counter()
        self.last_epoch_s: float | None = None
        if resume:
            self._resume()
        elif init_weights is not None:
            self.model.load_state_dict(init_weights)
        self.events = EventLog(out, t.tensorboard and di.is_main,
                               purge_step=self.start_epoch * self.batches_per_epoch + 1 if resume else None)

    def _resume(self) -> None:
        """Continue from ``last.pt``: weights, optimiser, schedule, best so far, logs cut back to its epoch."""
        last_path = self.out / "last.pt"
        state = Checkpoint.load(last_path)
        check_resumable(state, self.args, last_path)
        self.model.load_state_dict(state.state_dict)
        self.optimizer.load_state_dict(state.training.optimizer)
        self.scheduler.load_state_dict(state.training.scheduler)
        self.start_epoch, self.best, self.best_epoch = state.epoch + 1, state.training.best_metric, state.training.best_epoch
        start, epochs = self.start_epoch, self.cfg.train.epochs
        if self.di.is_main:
            _truncate_jsonl(self.out / "metrics.jsonl", lambda r: r.get("epoch", start) <= start)  # epochs 1..start
            _truncate_jsonl(self.out / "gradients.jsonl", lambda r: r.get("epoch", start) <= start)
        if self.progress and self.di.is_main:
            where = (f"at epoch {start + 1} of {epochs}" if start < epochs else
                     f"- it already finished its {epochs} epochs, nothing to train (to train longer: unetseg train "
                     f"--resume {self.out} --epochs N, with N > {epochs})")
            print(f"resuming {self.cfg.name} {where} (best validation Dice so far {self.best:.4f}, epoch "
                  f"{self.best_epoch + 1})", file=sys.stderr, flush=True)
        self.history = read_epoch_log(self.out / "metrics.jsonl")
        self.t_start = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        self.last_epoch_s = self.history[-1].get("epoch_s") if self.history else None

    def epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        """Train, validate when due, log and save one epoch; returns its metrics row and whether the time
        budget ends the run after it."""
        t_epoch_start = time.perf_counter()
        self.budget.plan_epoch(_mean_across_ranks(t_epoch_start - self.t_start, self.di, self.device),
                               self.last_epoch_s, self.batches_per_epoch)
        losses, train_time = self.train_steps(epoch)
        t, di = self.cfg.train, self.di
        row: dict[str, Any] = {
            "epoch": epoch + 1,  # counted from 1, as the console counts
            "step": (epoch + 1) * self.batches_per_epoch,
            "train_loss": _mean_across_ranks(float(np.mean(losses)), di, self.device),
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": len(losses) * t.batch_size * di.world_size / train_time,
        }
        # Out of time: this epoch becomes the last (validated, saved) when one more as long would end past it.
        now = time.perf_counter()
        out_of_time = _mean_across_ranks(float(self.budget.spent(now - self.t_start, now - t_epoch_start)),
                                         di, self.device) > 0
        if self.val_cases and ((epoch + 1) % t.val_every == 0 or epoch == t.epochs - 1 or out_of_time):
            self.validate(row)
        end = time.perf_counter()
        row["elapsed_s"] = end - self.t_start
        row["epoch_s"] = self.last_epoch_s = end - t_epoch_start
        improved = row.get("val_mean_dice", -1.0) > self.best or not self.val_cases
        if improved:
            self.best, self.best_epoch = row["val_mean_dice"], epoch
        self.history.append(row)
        if di.is_main:
            self.save(epoch, row, improved)
        return row, out_of_time

    def epoch_loader(self, epoch: int) -> DataLoader:
        """This epoch's batches: a seeded sample (with replacement when the epoch outnumbers the samples)."""
        t, di = self.cfg.train, self.di
        torch.manual_seed(t.seed * 100_003 + epoch)
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        n_samples = self.batches_per_epoch * t.batch_size
        if di.world_size > 1:
            sampler = DistributedSampler(self.dataset, di.world_size, di.rank, shuffle=True, seed=t.seed)
            sampler.set_epoch(epoch)
        elif self.sample_weights is not None:
            sampler = WeightedRandomSampler(self.sample_weights.tolist(), n_samples, replacement=True, generator=generator)
        else:
            sampler = RandomSampler(self.dataset, replacement=n_samples > len(self.dataset), num_samples=n_samples,
                                    generator=generator)
        return DataLoader(
            self.dataset,
            batch_size=t.batch_size,
            sampler=sampler,
            num_workers=t.num_workers,
            drop_last=True,
            worker_init_fn=lambda wid, e=epoch: self.dataset.set_epoch(e, wid + 1),
            persistent_workers=False,
        )

    def train_steps(self, epoch: int) -> tuple[list[float], float]:
        """One epoch of optimisation; returns the step losses and the seconds it took."""
        t, di, out = self.cfg.train, self.di, self.out
        use_amp = self.device.type == "cuda"
        self.net.train()
        losses: list[float] = []
        t_epoch = time.perf_counter()
        bar = progress_bar(self.epoch_loader(epoch), enabled=self.progress and di.is_main, total=self.batches_per_epoch,
                           desc=f"epoch {epoch + 1}/{t.epochs}", leave=False)
        for self.step_in_epoch, (x, y) in enumerate(bar):
            if self.step_in_epoch >= self.batches_per_epoch:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=self.memory_format)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = self.net(x)
            loss = self.loss_fn(logits.float(), y[:, None])
            if not torch.isfinite(loss.detach()):
                raise UnetsegError(
                    f"training loss became {float(loss.detach())} at epoch {epoch + 1}, step {self.step_in_epoch + 1}: "
                    f"lower train.lr (now {t.lr}) or check the data for NaN or infinite values; "
                    f"no checkpoint of this epoch was saved in {out}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            global_step = epoch * self.batches_per_epoch + self.step_in_epoch
            if t.grad_log_every and global_step % t.grad_log_every == 0 and di.is_main:
                append_jsonl(out / "gradients.jsonl", {"epoch": epoch + 1, "step": global_step,
                                                       "layers": gradient_norms(self.model)})
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            losses.append(float(loss.detach()))
            rate = (self.step_in_epoch + 1) * t.batch_size * di.world_size / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", samples_s=f"{rate:.0f}")
        return losses, time.perf_counter() - t_epoch

    def validate(self, row: dict[str, Any]) -> None:
        """Score the validation cases (each rank its share) into ``row``, with a warning when a class collapsed."""
        di, names = self.di, self.info.class_names
        self.model.eval()
        rows = _gather_rows(evaluate_cases(self.segmenter, self.val_cases[di.rank :: di.world_size], progress=False), di)
        summary = summarize(rows, names)
        row["val_mean_dice"] = summary["mean_dice"]
        row.update({f"val_dice_{k}": v["dice_mean"] for k, v in summary["classes"].items()})
        row.update({f"val_hd95_{k}": v["hd95_mean"] for k, v in summary["classes"].items()})
        collapsed = collapsed_classes([*self.history, row], names)
        if collapsed:
            row["warning"] = (f"validation Dice of {', '.join(collapsed)} below {COLLAPSE_DICE} for two validations in a row: "
                              "the network has stopped predicting it; model.act=leaky_relu with train.dice_background=false "
                              "got most such runs going (docs/collapse.md), or try another train.seed")

    def save(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        """Append the row to the logs, write best.pt (when improved) and last.pt atomically, redraw the curves."""
        out, cfg = self.out, self.cfg
        append_jsonl(out / "metrics.jsonl", row)
        self.events.epoch(row)
        checkpoint = Checkpoint(
            model_args=self.args, state_dict=self.model.state_dict(), preprocessing=self.preprocessing,
            class_names=tuple(self.info.class_names), tta_flips=self.trained_flips, dataset=cfg.data.dataset,
            split=self.split, epoch=epoch, metrics=row, config=cfg.to_dict(), unetseg_version=__version__,
        )
        if improved:
            checkpoint.save(out / "best.pt")
        training = TrainingState(self.optimizer.state_dict(), self.scheduler.state_dict(), self.best, self.best_epoch)
        replace(checkpoint, training=training).save(out / "last.pt")
        plot_training_curves(out / "metrics.jsonl", out / "curves.png")
        if self.progress:
            dice = f" val Dice {row['val_mean_dice']:.4f}" if "val_mean_dice" in row else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs} loss {row['train_loss']:.4f}{dice} "
                       f"({row['samples_per_s']:.0f} samples/s, {row['elapsed_s']:.0f} s)")
        if "warning" in row:
            tqdm.write(f"warning: epoch {epoch + 1}: {row['warning']}", file=sys.stderr)

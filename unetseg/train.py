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

import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from unetseg import __version__
from unetseg.checkpoint import TRAINING_ENTRIES, Checkpoint, Preprocessing, TrainingState, build_model, model_arguments
from unetseg.config import Config, save_config
from unetseg.data.datasets import Case, DatasetInfo, PatchDataset, dataset_info, list_cases, load_cases, split_cases, training_samples
from unetseg.data.transforms import build_augmentation, flip_combinations, resolve_flip_axes
from unetseg.errors import UnetsegError
from unetseg.eventlog import EVENT_DIR, EventLog
from unetseg.device import resolve_device
from unetseg.evaluate import evaluate_cases, network_predictor, summarize
from unetseg.losses import make_loss
from unetseg.model import UNet
from unetseg.plots import plot_training_curves
from unetseg.runlog import append_jsonl, read_jsonl, write_json, write_jsonl


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


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine or poly(0.9) decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1 - progress) ** 0.9
    raise UnetsegError(f"train.schedule must be 'cosine' or 'poly', got {schedule!r}")


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


def check_resumable(state: Checkpoint, args: dict[str, Any], path: Path) -> None:
    """Raise :class:`UnetsegError` unless ``last.pt`` holds a training state (not an exported or best-only
    checkpoint) of the network that the run folder's ``config.yaml`` describes (``args``)."""
    present = {*state.extra, *(TRAINING_ENTRIES if state.training else ()), *(("epoch",) if state.epoch is not None else ())}
    missing = [key for key in RESUME_ENTRIES if key not in present]
    if missing:
        raise UnetsegError(f"{path}: holds no training state ({', '.join(missing)} missing; a best.pt or exported "
                           "model copied over last.pt?); start a new run instead of --resume")
    saved = {k: state.model_args.get(k, "relu" if k == "act" else None) for k in args}  # no act: ReLU then
    changed = sorted(k for k in args if saved[k] != args[k])
    if changed:
        raise UnetsegError(f"{path.parent / 'config.yaml'}: describes a different network than {path.name} "
                           f"({', '.join(f'{k}: {saved[k]} in the checkpoint, {args[k]} in the config' for k in changed)}); "
                           "restore the run's config.yaml or start a new run")


def _truncate_jsonl(path: Path, keep: Any) -> None:
    """Keep only the lines for which ``keep(row)`` is true (used on resume); a partial last line goes too."""
    if path.is_file():
        write_jsonl(path, [r for r in read_jsonl(path) if keep(r)])


# What fit writes into a run folder (a folder holding only these, but no last.pt, is a run killed before its first
# checkpoint: it is restarted from scratch); temporary files of killed saves start with a dot.
RUN_FILES = frozenset({"config.yaml", "command.txt", "split.json", "metrics.jsonl", "gradients.jsonl", "curves.png",
                       EVENT_DIR})
RUN_LOGS = ("metrics.jsonl", "gradients.jsonl", "command.txt", "curves.png")
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


def prepare_data(
    cfg: Config, data_root: str | Path | None, progress: bool = True
) -> tuple[DatasetInfo, dict[str, list[str]], list[Case], list[Case]]:
    """Load the data set, split it by case, and return info, split, train cases, val cases."""
    refs, info = list_cases(dataset_info(cfg.data.dataset), data_root or cfg.data.root)
    if cfg.data.max_cases:
        refs = refs[: cfg.data.max_cases]
    split = split_cases(
        [r.case_id for r in refs], cfg.data.val_fraction, cfg.data.split_seed, cfg.data.num_folds, cfg.data.fold
    )
    val_ids = set(split["val"])
    cases = load_cases(refs, info, cfg.data.normalization, progress=progress)
    train = [c for c in cases if c.case_id not in val_ids]
    val = [c for c in cases if c.case_id in val_ids]
    if cfg.train.val_max_cases:
        val = val[: cfg.train.val_max_cases]
        split["val"] = [c.case_id for c in val]
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
    last_path = out / "last.pt"
    restart = check_out_dir(out, resume)

    torch.manual_seed(cfg.train.seed)
    info, split, train_cases, val_cases = prepare_data(cfg, data_root, progress=progress and di.is_main)
    if di.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_out_dir(out, restart)
        write_json(out / "split.json", split, indent=1)  # first: marks the folder as a run's
        save_config(cfg, out / "config.yaml")
        if command is not None:
            with (out / "command.txt").open("a") as f:
                f.write(" ".join(command) + "\n")

    args = model_args(cfg, info)
    model: UNet = build_model(args).to(device)
    images, labels = training_samples(train_cases, cfg.model.spatial_dims, cfg.data.slice_axis)
    transform = build_augmentation(cfg.augment, cfg.data.normalization, cfg.model.spatial_dims, seed=cfg.train.seed)
    dataset = PatchDataset(images, labels, cfg.data.patch_size, transform, seed=cfg.train.seed * 1000 + di.rank)
    batches_per_epoch = cfg.train.steps_per_epoch or max(1, len(dataset) // (cfg.train.batch_size * di.world_size))
    total_steps = batches_per_epoch * cfg.train.epochs

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.train.warmup_steps, cfg.train.schedule)
    )
    start_epoch, best, best_epoch = 0, -1.0, -1
    if resume:
        state = Checkpoint.load(last_path)
        check_resumable(state, args, last_path)
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(state.training.optimizer)
        scheduler.load_state_dict(state.training.scheduler)
        start_epoch, best, best_epoch = state.epoch + 1, state.training.best_metric, state.training.best_epoch
        if di.is_main:
            _truncate_jsonl(out / "metrics.jsonl", lambda r: r.get("epoch", start_epoch) < start_epoch)
            _truncate_jsonl(out / "gradients.jsonl", lambda r: r.get("epoch", start_epoch) < start_epoch)
        if progress and di.is_main:
            where = (f"at epoch {start_epoch + 1} of {cfg.train.epochs}" if start_epoch < cfg.train.epochs else
                     f"- it already finished its {cfg.train.epochs} epochs, nothing to train (to train longer, start a "
                     "new run with more epochs)")
            print(f"resuming {cfg.name} {where} (best validation Dice so far {best:.4f}, epoch {best_epoch + 1})",
                  file=sys.stderr, flush=True)
    net = DistributedDataParallel(model) if di.world_size > 1 else model
    loss_fn = make_loss(cfg.train.dice_ce_lambda_ce, cfg.train.dice_batch, cfg.train.dice_background)
    trained_flips = tta_flips(cfg)  # the mirrorings augmentation uses: what flip TTA may average
    preprocessing = preprocessing_settings(cfg, info)
    segmenter = network_predictor(model, preprocessing, info.class_names, device)
    use_amp = device.type == "cuda"
    history = read_jsonl(out / "metrics.jsonl") if resume else []
    t_start = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    events = EventLog(out, cfg.train.tensorboard and di.is_main,
                      purge_step=start_epoch * batches_per_epoch + 1 if resume else None)

    for epoch in range(start_epoch, cfg.train.epochs):
        torch.manual_seed(cfg.train.seed * 100_003 + epoch)
        dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
        n_samples = batches_per_epoch * cfg.train.batch_size
        if di.world_size > 1:
            sampler = DistributedSampler(dataset, di.world_size, di.rank, shuffle=True, seed=cfg.train.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, replacement=n_samples > len(dataset), num_samples=n_samples, generator=generator)
        loader = DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            num_workers=cfg.train.num_workers,
            drop_last=True,
            worker_init_fn=lambda wid, e=epoch: dataset.set_epoch(e, wid + 1),
            persistent_workers=False,
        )
        net.train()
        losses: list[float] = []
        t_epoch = time.perf_counter()
        bar = tqdm(loader, total=batches_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=not (progress and di.is_main))
        for step_in_epoch, (x, y) in enumerate(bar):
            if step_in_epoch >= batches_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y[:, None])
            if not torch.isfinite(loss.detach()):
                raise UnetsegError(
                    f"training loss became {float(loss.detach())} at epoch {epoch + 1}, step {step_in_epoch + 1}: "
                    f"lower train.lr (now {cfg.train.lr}) or check the data for NaN or infinite values; "
                    f"no checkpoint of this epoch was saved in {out}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            global_step = epoch * batches_per_epoch + step_in_epoch
            if cfg.train.grad_log_every and global_step % cfg.train.grad_log_every == 0 and di.is_main:
                append_jsonl(out / "gradients.jsonl", {"epoch": epoch, "step": global_step, "layers": gradient_norms(model)})
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            rate = (step_in_epoch + 1) * cfg.train.batch_size * di.world_size / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", samples_s=f"{rate:.0f}")
        train_time = time.perf_counter() - t_epoch
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": (epoch + 1) * batches_per_epoch,
            "train_loss": _mean_across_ranks(float(np.mean(losses)), di, device),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": len(losses) * cfg.train.batch_size * di.world_size / train_time,
        }
        is_last = epoch == cfg.train.epochs - 1
        if val_cases and ((epoch + 1) % cfg.train.val_every == 0 or is_last):
            model.eval()
            rows = _gather_rows(evaluate_cases(segmenter, val_cases[di.rank :: di.world_size], progress=False), di)
            summary = summarize(rows, info.class_names)
            row["val_mean_dice"] = summary["mean_dice"]
            row.update({f"val_dice_{k}": v["dice_mean"] for k, v in summary["classes"].items()})
            row.update({f"val_hd95_{k}": v["hd95_mean"] for k, v in summary["classes"].items()})
            collapsed = collapsed_classes([*history, row], info.class_names)
            if collapsed:
                row["warning"] = (f"validation Dice of {', '.join(collapsed)} below {COLLAPSE_DICE} for two validations in a row: "
                                  "the network has stopped predicting it; model.act=leaky_relu with train.dice_background=false "
                                  "got most such runs going (docs/collapse.md), or try another train.seed")
        row["elapsed_s"] = time.perf_counter() - t_start
        improved = row.get("val_mean_dice", -1.0) > best or not val_cases
        if improved:
            best, best_epoch = row["val_mean_dice"], epoch
        history.append(row)
        if di.is_main:
            append_jsonl(out / "metrics.jsonl", row)
            events.epoch(row)
            checkpoint = Checkpoint(
                model_args=args, state_dict=model.state_dict(), preprocessing=preprocessing,
                class_names=tuple(info.class_names), tta_flips=trained_flips, dataset=cfg.data.dataset,
                split=split, epoch=epoch, metrics=row, config=cfg.to_dict(), unetseg_version=__version__,
            )
            if improved:
                checkpoint.save(out / "best.pt")
            training = TrainingState(optimizer.state_dict(), scheduler.state_dict(), best, best_epoch)
            replace(checkpoint, training=training).save(last_path)
            plot_training_curves(out / "metrics.jsonl", out / "curves.png")
            if progress:
                dice = f" val Dice {row['val_mean_dice']:.4f}" if "val_mean_dice" in row else ""
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.train.epochs} loss {row['train_loss']:.4f}{dice} "
                    f"({row['samples_per_s']:.0f} samples/s, {row['elapsed_s']:.0f} s)"
                )
            if "warning" in row:
                tqdm.write(f"warning: epoch {epoch + 1}: {row['warning']}", file=sys.stderr)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    events.close()
    if di.world_size > 1:
        dist.barrier()
    return out

"""Glorot & Bengio's measurement on the project's networks: per-layer variance of pre-activations, of the
back-propagated gradient with respect to them, and of activations, skip vs no-skip, with and without batch norm.

Every arm is measured on the same batch of real hippocampus slices (32 axial
slices with hippocampus in them, from training cases, padded to 48x64) with
the training loss, one forward and backward pass (:mod:`unetseg.ablation.signal`):

- at initialisation (PyTorch's default initialisation, seeds 0-4) for the
  shipped 2D architecture (widths 16-32-64-128) and for a deeper network at
  constant width (6 levels of 16 maps, 22 convolutions on the path), each
  with batch norm and without normalisation ("none": plain convolutions with
  bias), with and without long skips;
- after training, for the shipped ``hippocampus_2d`` and ``hippocampus_2d_noskip``;
- with ``--study``, for every seed of a trained study's variants (``--study-variants``, default every variant
  of the study folder): the run's own initial weights (rebuilt from its seed, checked against the norms its
  ``gradients.jsonl`` logged at step 0) and its final weights (``last.pt``), so the plain networks of
  ``hippocampus_2d_plain`` are measured before and after training.

Writes ``signal.json`` (every row), ``signal.png`` and ``report.md`` into ``--out``.

    python benchmarks/signal_propagation.py --data-root ../shared/data [--out docs/ablation/signal]
        [--study runs/ablation/hippocampus_2d_plain]   # after: unetseg ablate --config hippocampus_2d_plain
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetseg.ablation.runs import FINAL_CHECKPOINT
from unetseg.ablation.signal import shrinkage, signal_profile
from unetseg.ablation.weights import checked_initial_model
from unetseg.data.datasets import dataset_info, list_cases, load_cases
from unetseg.data.preprocess import pad_to_shape, volume_to_slices
from unetseg.infer import Checkpoint, Segmenter, load_checkpoint
from unetseg.losses import make_loss
from unetseg.model import UNet
from unetseg.plots import subplots
from unetseg.runlog import write_json

SEEDS = range(5)
ARCHITECTURES = {"shipped 2D (16-32-64-128)": (16, 32, 64, 128), "deep, constant width (6 x 16)": (16,) * 6}
SLICE = (48, 64)


def real_batch(data_root: str, count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` axial slices with hippocampus in them from the shipped model's training cases, padded to 48x64."""
    split = load_checkpoint("hippocampus_2d")["split"]
    refs, info = list_cases(dataset_info("hippocampus"), data_root)
    train = [r for r in refs if r.case_id in set(split["train"])][:16]
    images, labels = [], []
    for case in load_cases(train, info, "percentile", progress=False):
        slices, masks = volume_to_slices(case.image, 2), volume_to_slices(case.label, 2)
        keep = masks.reshape(len(masks), -1).any(axis=1)
        images.append(pad_to_shape(slices[keep], SLICE))
        labels.append(pad_to_shape(masks[keep], SLICE))
    images_all, labels_all = np.concatenate(images), np.concatenate(labels)
    pick = np.random.default_rng(0).choice(len(images_all), size=count, replace=False)
    return torch.from_numpy(images_all[pick]), torch.from_numpy(labels_all[pick].astype(np.int64))


def study_arms(study: Path, variants: list[str] | None, images: torch.Tensor, labels: torch.Tensor,
               loss_fn: Any) -> list[dict[str, Any]]:
    """Each seed of each variant of a trained study folder (``<study>/runs/<variant>/seed<k>``): at its own initial
    weights and at its final weights. ``variants=None``: every variant folder."""
    names = [n for n in variants if (study / "runs" / n).is_dir()] if variants else sorted(
        p.name for p in (study / "runs").iterdir() if p.is_dir())
    arms = []
    for name in names:
        for run in sorted((study / "runs" / name).glob("seed*"), key=lambda p: int(p.name[4:])):
            saved = Checkpoint.load(run / FINAL_CHECKPOINT)
            seed, args = int(saved.config["train"]["seed"]), saved.model_args
            initial, _ = checked_initial_model(run, args, seed)
            trained = saved.build_model()  # the network the load built to check the weights
            for state, model in (("initialisation (run's seed)", initial), ("trained (study run)", trained)):
                arms.append({"architecture": f"{study.name}: {name}", "norm": args["norm"],
                             "skips": any(model.skips), "state": state, "seed": seed,
                             "rows": signal_profile(model, images, labels, loss_fn)})
    return arms


def measure(data_root: str, studies: Sequence[Path] = (), variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Every arm's profile: one entry per (architecture, norm, skips, seed or trained model)."""
    images, labels = real_batch(data_root)
    loss_fn = make_loss()
    arms = []
    for arch, channels in ARCHITECTURES.items():
        for norm in ("batch", "none"):
            for skips in (True, False):
                for seed in SEEDS:
                    torch.manual_seed(seed)
                    model = UNet(2, 1, 3, channels=channels, norm=norm, skips=skips, act="leaky_relu")
                    arms.append({"architecture": arch, "norm": norm, "skips": skips, "state": "initialisation",
                                 "seed": seed, "rows": signal_profile(model, images, labels, loss_fn)})
    for name in ("hippocampus_2d", "hippocampus_2d_noskip"):
        model = Segmenter.from_checkpoint(name).model
        arms.append({"architecture": next(iter(ARCHITECTURES)), "norm": "batch", "skips": model.skips[0],
                     "state": f"trained ({name})", "seed": None, "rows": signal_profile(model, images, labels, loss_fn)})
    return arms + [arm for study in studies for arm in study_arms(study, variants, images, labels, loss_fn)]


def summary_rows(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm (seeds pooled): the gradient and activation variance ratios, first layer over last, with their range."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for arm in arms:
        groups.setdefault((arm["architecture"], arm["norm"], arm["skips"], arm["state"]), []).append(arm)
    out = []
    for (arch, norm, skips, state), members in groups.items():
        grad = np.array([shrinkage(a["rows"]) for a in members])
        acts = [[r["act_var"] for r in a["rows"] if "act_var" in r] for a in members]
        act = np.array([v[0] / v[-1] for v in acts])  # first encoder block's output over the last decoder block's
        out.append({"architecture": arch, "norm": norm, "skips": skips, "state": state, "n": len(members),
                    "grad_ratio_median": float(np.median(grad)), "grad_ratio_min": float(grad.min()),
                    "grad_ratio_max": float(grad.max()), "act_ratio_median": float(np.median(act)),
                    "convolutions": len(members[0]["rows"])})
    return out


STUDY_STATES = ("initialisation (run's seed)", "trained (study run)")


def draw(arms: list[dict[str, Any]], path: Path) -> None:
    """Gradient variance along the path for seed 0 of each arm at initialisation, the trained shipped models and,
    with a study, its runs' lowest seed at initialisation and trained (one panel each)."""
    studied = any(arm["state"] in STUDY_STATES for arm in arms)
    titles = [*ARCHITECTURES, "trained"] + (list(STUDY_STATES) if studied else [])
    fig, axes = subplots(1, len(titles), figsize=(5 * len(titles), 3.8), squeeze=False)
    first_seed = min((arm["seed"] for arm in arms if arm["state"] in STUDY_STATES), default=None)
    for ax, title in zip(axes[0], titles):
        for arm in arms:
            if title in ARCHITECTURES:
                show = arm["state"] == "initialisation" and arm["architecture"] == title and arm["seed"] == 0
                label = f"{arm['norm']} norm, {'skips' if arm['skips'] else 'no skips'}"
            elif title == "trained":
                show, label = arm["state"].startswith("trained (hippocampus"), arm["state"]
            else:
                show, label = arm["state"] == title and arm["seed"] == first_seed, arm["architecture"]
            if show:
                ax.semilogy([r["grad_var"] for r in arm["rows"]], marker=".", label=label,
                            linestyle="-" if arm["skips"] else "--")
        names = {"trained": "trained shipped models (batch norm)"} | {
            state: f"study runs, seed {first_seed}: {state.split(' (')[0]}" for state in STUDY_STATES}
        ax.set(xlabel="convolution along the path (input -> output)", ylabel="Var(dL/dz)",
               title=names.get(title, title))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def report(summary: list[dict[str, Any]]) -> str:
    lines = ["# Signal propagation: Glorot & Bengio's measurement", "",
             "Redraw: `python benchmarks/signal_propagation.py --data-root ../shared/data` (writes this folder); the "
             "study rows also need `--study runs/ablation/<study>` for each study shown, after `unetseg ablate "
             "--config <study>` trained it.", "",
             "Ratio = the variance at the first convolution over the variance at the last (the 1x1 head for the "
             "gradient, the last decoder block for activations): how the back-propagated gradient dL/dz changes on "
             "its way from the output to the input (below 1: it vanishes), and how the forward signal changes from "
             "the first block to the last. Median over seeds 0-4 at initialisation (min-max in brackets); one "
             "measurement for each trained shipped model; study rows: median over the study's seeds, each run at its "
             "own initial weights and at its final weights. One batch of 32 real hippocampus slices, leaky ReLU, DiceCE loss.",
             "", "| network | normalisation | long skips | state | convolutions | gradient variance ratio "
             "(first / last) | activation variance ratio |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        spread = f" [{s['grad_ratio_min']:.2g}, {s['grad_ratio_max']:.2g}]" if s["n"] > 1 else ""
        lines.append(f"| {s['architecture']} | {s['norm']} | {'on' if s['skips'] else 'off'} | {s['state']} | "
                     f"{s['convolutions']} | {s['grad_ratio_median']:.3g}{spread} | {s['act_ratio_median']:.3g} |")
    lines += ["", "![gradient variance along the path](signal.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="docs/ablation/signal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--study", type=Path, nargs="+", default=[], help="trained study folders (unetseg ablate "
                        "--out): measure their runs at their initial and final weights")
    parser.add_argument("--study-variants", nargs="+", help="variants of --study to measure (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = measure(args.data_root, args.study, args.study_variants)
    summary = summary_rows(arms)
    write_json(out / "signal.json", {"summary": summary, "arms": arms})
    draw(arms, out / "signal.png")
    (out / "report.md").write_text(report(summary))
    print(report(summary))


if __name__ == "__main__":
    main()

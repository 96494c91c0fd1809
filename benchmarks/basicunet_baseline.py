"""The MONAI BasicUNet baseline, trained and scored side by side with the shipped hippocampus models.

A plain MONAI tutorial recipe on exactly the shipped ``hippocampus_2d``'s
split (its checkpoint's 166 training and 42 validation cases): BasicUNet
(2D, default features 32-32-64-128-256-32), every axial slice of the
training volumes padded to 64x64, no augmentation, DiceCELoss (softmax,
one-hot targets), Adam (lr 1e-3), batch 32, 12 epochs. Intensities get the
same percentile normalisation as ours, so the networks and recipes differ,
not the input. After each epoch the validation volumes are segmented slice
by slice and scored with ``unetseg evaluate``'s own Dice and HD95
(:func:`unetseg.evaluate.score_case`).

Resumable: each epoch's state goes to ``--out`` (``last.pt``) and a rerun
continues from it; ``results.json`` there holds the per-epoch figures.

    python benchmarks/basicunet_baseline.py --data-root ../shared/data [--out runs/basicunet_baseline] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from tqdm.auto import tqdm

from unetseg.data.datasets import Case, dataset_info, list_cases, load_cases
from unetseg.data.preprocess import pad_to_shape, round_up_to_multiple, volume_to_slices
from unetseg.evaluate import score_case
from unetseg.infer import load_checkpoint
from unetseg.runlog import write_json

SLICE_AXIS = 2  # axial, as the shipped 2D models
SLICE_SIZE = (64, 64)  # every hippocampus slice fits; BasicUNet needs multiples of 16


def training_slices(cases: list[Case]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice of ``cases`` padded to 64x64: images ``(N, 1, 64, 64)`` float32, labels ``(N, 1, 64, 64)`` int64."""
    images = np.concatenate([pad_to_shape(volume_to_slices(c.image, SLICE_AXIS), SLICE_SIZE) for c in cases])
    labels = np.concatenate([pad_to_shape(volume_to_slices(c.label, SLICE_AXIS), SLICE_SIZE) for c in cases])
    return torch.from_numpy(images), torch.from_numpy(labels[:, None].astype(np.int64))


def segment(model: torch.nn.Module, case: Case) -> np.ndarray:
    """Label map ``(X, Y, Z)`` of one normalised volume ``(1, X, Y, Z)``, slice by slice."""
    slices = volume_to_slices(case.image, SLICE_AXIS)  # (N, 1, H, W)
    size = round_up_to_multiple(slices.shape[2:], 16)
    with torch.inference_mode():
        logits = model(torch.from_numpy(pad_to_shape(slices, size)))
    labels = logits.argmax(dim=1).numpy()[:, : slices.shape[2], : slices.shape[3]]  # (N, H, W)
    return np.moveaxis(labels, 0, SLICE_AXIS)


def validate(model: torch.nn.Module, cases: list[Case], class_names: tuple[str, ...]) -> dict[str, float]:
    """Mean per-class Dice and HD95 over ``cases`` and ``mean_dice`` (the mean over foreground classes)."""
    model.eval()
    rows = [score_case(segment(model, c), c.label, class_names, c.meta.spacing) for c in cases]
    model.train()
    means = {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0]}
    means["mean_dice"] = float(np.mean([means[f"dice_{name}"] for name in class_names[1:]]))
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding Task04_Hippocampus")
    parser.add_argument("--out", default="runs/basicunet_baseline", help="state and results (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, help="stop each epoch after this many steps (a quick check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    split = load_checkpoint("hippocampus_2d")["split"]  # the shipped 2D models' split
    refs, info = list_cases(dataset_info("hippocampus"), args.data_root)
    by_id = {r.case_id: r for r in refs}
    train_cases = load_cases([by_id[i] for i in split["train"]], info, "percentile")
    val_cases = load_cases([by_id[i] for i in split["val"]], info, "percentile")
    images, labels = training_slices(train_cases)

    torch.manual_seed(args.seed)
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(info.class_names))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    state_file = out / "last.pt"
    history: list[dict[str, Any]] = []
    first_epoch, elapsed = 0, 0.0
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, first_epoch, elapsed = state["history"], state["epoch"], state["elapsed_s"]
        print(f"resuming {out} after epoch {first_epoch}")
    for epoch in range(first_epoch, args.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images))
        steps = range(0, len(order), args.batch_size)
        if args.max_steps:
            steps = steps[: args.max_steps]
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for i in bar:
            batch = order[i:i + args.batch_size]
            loss = loss_fn(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_s = time.perf_counter() - start
        elapsed += train_s
        row = {"epoch": epoch + 1, "train_s": train_s, "slices_per_s": len(steps) * args.batch_size / train_s,
               "elapsed_train_s": elapsed, **validate(model, val_cases, info.class_names)}
        history.append(row)
        print(f"epoch {epoch + 1}: val mean Dice {row['mean_dice']:.4f}, {row['slices_per_s']:.1f} slices/s")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "history": history, "epoch": epoch + 1, "elapsed_s": elapsed}, state_file)
        write_json(out / "results.json", {
            "recipe": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "threads", "max_steps")}
            | {"network": "monai BasicUNet(spatial_dims=2), default features", "slice_size": list(SLICE_SIZE),
               "loss": "DiceCELoss(to_onehot_y=True, softmax=True)", "optimizer": "Adam", "augmentation": None,
               "split": "the shipped hippocampus_2d checkpoint's", "train_slices": len(images),
               "parameters": sum(p.numel() for p in model.parameters())},
            "val_cases": len(val_cases), "history": history,
        })
    best = max(history, key=lambda r: r["mean_dice"])
    final = history[-1]
    print(f"BasicUNet baseline: final val mean Dice {final['mean_dice']:.4f} after {final['epoch']} epochs "
          f"({final['elapsed_train_s'] / 60:.1f} min of training); best {best['mean_dice']:.4f} at epoch {best['epoch']}")


if __name__ == "__main__":
    main()

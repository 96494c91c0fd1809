"""How far each layer's weights moved in training: ``||w_end - w_init|| / ||w_init||`` per convolution kernel.

Under AdamW a small gradient is not a small update, so a layer's gradient norm
says little about how much it learnt; the distance its weights travelled does.
Checkpoints keep only the final weights. ``fit`` seeds torch with
``train.seed`` and builds the network before drawing any other torch random
number, so the initial weights are rebuilt from the seed; the rebuilt kernels'
norms are checked against the norms ``gradients.jsonl`` logged at step 0
(before the first update), and a mismatch is refused rather than measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unetseg.errors import UnetsegError
from unetseg.infer import Checkpoint, build_model
from unetseg.model import UNet
from unetseg.runlog import read_jsonl, write_json

INIT_TOLERANCE = 1e-4  # relative error allowed between rebuilt and logged initial kernel norms


def initial_model(model_args: dict[str, Any], seed: int) -> UNet:
    """The network ``fit`` starts from with ``train.seed = seed`` (the caller's torch RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model_args)


def _kernels(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.ndim >= 4}


def check_initial_norms(initial: torch.nn.Module, logged: Sequence[dict[str, Any]], source: str) -> float:
    """Largest relative difference between ``initial``'s kernel norms and a ``gradients.jsonl`` row's.

    Raises:
        UnetsegError: above :data:`INIT_TOLERANCE` (the rebuilt network is not the one that was trained).
    """
    kernels = _kernels(initial)
    errors = [abs(float(kernels[r["layer"]].norm()) - r["weight_norm"]) / r["weight_norm"]
              for r in logged if r["layer"] in kernels]
    worst = max(errors, default=float("inf"))
    if worst > INIT_TOLERANCE:
        raise UnetsegError(f"{source}: the initial weights rebuilt from the seed do not match the logged step-0 norms "
                           f"(relative error {worst:.2g}); weight distances cannot be measured for this run")
    return worst


def checked_initial_model(run: Path, model_args: dict[str, Any], seed: int) -> tuple[UNet, float]:
    """The network ``run`` started from (:func:`initial_model`), checked against the kernel norms its
    ``gradients.jsonl`` logged at step 0, and the largest relative difference found.

    Raises:
        UnetsegError: no step-0 row to check against, or the norms differ (see :func:`check_initial_norms`).
    """
    initial = initial_model(model_args, seed)
    logged = read_jsonl(run / "gradients.jsonl")
    if not logged or logged[0]["step"] != 0:
        raise UnetsegError(f"{run}: gradients.jsonl has no step-0 row to check the rebuilt initial weights against; "
                           "train with train.grad_log_every > 0")
    return initial, check_initial_norms(initial, logged[0]["layers"], str(run / "gradients.jsonl"))


def weight_change(run: str | Path, checkpoint: str, seed: int) -> dict[str, Any]:
    """Per convolution kernel of ``run/checkpoint``: initial and final norm, distance and relative distance.

    Args:
        run: a run folder with the checkpoint and ``gradients.jsonl`` (its first row, step 0, checks the rebuild).
        checkpoint: file name of the final weights in ``run``.
        seed: the run's ``train.seed``.
    Returns:
        ``{"checkpoint", "epoch", "seed", "init_check", "layers": [{"layer", "init_norm", "final_norm",
        "distance", "relative_distance"}, ...]}`` (layers in registration order).
    """
    run = Path(run)
    saved = Checkpoint.load(run / checkpoint)
    initial, worst = checked_initial_model(run, saved.model_args, seed)
    end = _kernels(saved.build_model())  # the network the load built to check the weights: not built again
    rows = []
    for name, w0 in _kernels(initial).items():
        init_norm, distance = float(w0.norm()), float((end[name] - w0).norm())
        rows.append({"layer": name, "init_norm": init_norm, "final_norm": float(end[name].norm()),
                     "distance": distance, "relative_distance": distance / init_norm})
    return {"checkpoint": checkpoint, "epoch": int(saved.epoch), "seed": seed, "init_check": worst, "layers": rows}


def write_weight_change(run: str | Path, checkpoint: str, seed: int, path: str | Path) -> None:
    """:func:`weight_change` of a run, written to ``path`` as JSON."""
    write_json(path, weight_change(run, checkpoint, seed), indent=1)

"""Thin wrappers over MONAI's loss and metrics."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def make_loss(lambda_ce: float = 1.0, batch_dice: bool = True, background: bool = True) -> DiceCELoss:
    """MONAI Dice + cross-entropy on logits ``(B, K, *S)`` and labels ``(B, 1, *S)``.

    ``batch_dice`` sums each class's soft Dice terms over the whole batch (as
    nnU-Net does for 2D). Per sample (``False``), a class absent from a slice
    scores a perfect Dice term there when it is never predicted: with anterior
    absent from about 60 % of hippocampus slices, "never predict it" becomes a
    stable trap in which some runs stay for good. ``background=False`` leaves
    the background class out of the Dice term (cross-entropy still covers it).
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=lambda_ce, batch=batch_dice,
                      include_background=background)


def case_metrics(
    prediction: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Per-class Dice and HD95 of one case (foreground classes only).

    Args:
        prediction: ``(*S)`` integer labels.
        truth: ``(*S)`` integer labels, same shape.
        num_classes: classes including background.
        spacing: voxel size per axis (mm) for HD95; pixels when None.

    Returns:
        ``{"dice": (K-1,), "hd95": (K-1,)}``. Dice is NaN only where a class is
        absent from both (nothing to score; means over cases skip it with
        ``nanmean``); where the ground truth has no foreground of a class but
        the prediction has, Dice is 0 (every predicted voxel is a false
        positive), so painting everything never scores on empty cases. HD95 is
        NaN where a class is absent from either (MONAI's convention would give inf).
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != truth shape {truth.shape}")
    pred = one_hot(torch.as_tensor(prediction, dtype=torch.long)[None, None], num_classes)
    true = one_hot(torch.as_tensor(truth, dtype=torch.long)[None, None], num_classes)
    dice = compute_dice(pred, true, include_background=False, ignore_empty=True)[0].numpy()
    for k in range(1, num_classes):
        if not true[0, k].any() and pred[0, k].any():
            dice[k - 1] = 0.0  # MONAI's ignore_empty gives NaN here, which a nanmean would skip
    hd95 = np.full(num_classes - 1, np.nan)
    for k in range(1, num_classes):
        if pred[0, k].any() and true[0, k].any():
            with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                hd95[k - 1] = float(
                    compute_hausdorff_distance(
                        pred[:, k : k + 1], true[:, k : k + 1], include_background=True, percentile=95,
                        spacing=None if spacing is None else [float(s) for s in spacing],
                    )[0, 0]
                )
    return {"dice": dice.astype(float), "hd95": hd95}

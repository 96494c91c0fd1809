"""Which model serves an input: the rule the viewer uses to pick its default, and the benchmark with it.

A model's card (:func:`unetseg.infer.model_card`) says what it was made for (``input_kind``: ``"nifti"`` for
volumes, ``"image2d"`` for 2D images, None when its training data is unknown), whether it is a 3D network, and
its recorded validation metrics.
"""

from __future__ import annotations

import math
from typing import Any

from unetseg.checkpoint import shipped_models
from unetseg.infer import model_card


def suits(card: dict[str, Any], kind: str) -> bool:
    """Whether a model (its card) can serve this kind of input: made for it, or of unknown training data
    (then anything but a 3D network on a 2D image)."""
    if kind == "image2d" and card.get("spatial_dims") == 3:
        return False
    return card.get("input_kind") in (None, kind)


def validation_dice(card: dict[str, Any]) -> float:
    """The mean Dice in a model's ``metrics.json`` (its validation split, no TTA), or -inf when not recorded."""
    dice = (card.get("metrics") or {}).get("mean_dice")
    return float(dice) if isinstance(dice, (int, float)) and math.isfinite(dice) else -math.inf


def best_model(cards: dict[str, dict[str, Any]], kind: str) -> str | None:
    """Of the models made for a ``kind`` of input, the one with the highest validation Dice; None if none is.

    Models without recorded metrics rank last; ties go to the first listed.
    """
    made_for = [ref for ref, card in cards.items() if card.get("input_kind") == kind and suits(card, kind)]
    return max(made_for, key=lambda ref: validation_dice(cards[ref]), default=None)


def best_shipped_model(kind: str) -> str | None:
    """The shipped model the viewer picks by default for a ``kind`` of input (see :func:`best_model`)."""
    return best_model({name: model_card(name) for name in shipped_models()}, kind)

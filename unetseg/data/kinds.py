"""What a microscopy image shows, told from its intensities: fluorescence, brightfield or colour histology.

The 2018 Data Science Bowl mixes three kinds of image in unequal numbers (of
its 600 stage-1 training images, 494 grey on a dark background, 94 colour
histology, 12 grey on a bright background). :func:`image_kind` tells them
apart; :func:`kind_balanced_weights` turns the kinds into sampling weights so
that training can draw the rare kinds more often (``data.kind_balance``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from unetseg.data.preprocess import normalize_intensity

FLUORESCENCE = "grey, dark background (fluorescence)"
HISTOLOGY = "colour (histology)"
BRIGHTFIELD = "grey, bright background (brightfield)"

# On the percentile-normalised image ([0, 1] per channel). Over the 600 DSB stage-1 images the mean absolute
# difference between neighbouring channels is 0 for grey images and 0.11-0.42 for colour ones, and the median
# grey level is at most 0.50 for fluorescence and at least 0.89 for brightfield images.
COLOUR_DIFFERENCE = 0.05
BRIGHT_MEDIAN = 0.7


def image_kind(image: np.ndarray) -> str:
    """The kind of ``image (C, *S)`` (2D or 3D): :data:`HISTOLOGY` when it has three channels or more and the first
    three differ, else :data:`BRIGHTFIELD` when its median grey level is high, else :data:`FLUORESCENCE`.

    Raw or normalised intensities give the same answer: the image is percentile-normalised first. The thresholds
    were set on DSB2018's images; on other microscopy (dense fluorescence, noisy grey RGB) check the kinds it finds.
    """
    image = np.asarray(image)
    if image.ndim < 3:
        raise ValueError(f"image_kind needs a (C, *S) image with a channel axis, got shape {image.shape}")
    rgb = normalize_intensity(image[:3], "percentile")
    if len(rgb) == 3 and float(np.abs(np.diff(rgb, axis=0)).reshape(len(rgb) - 1, -1).mean(axis=1).sum()) > COLOUR_DIFFERENCE:
        return HISTOLOGY
    return BRIGHTFIELD if float(np.median(rgb.mean(axis=0))) > BRIGHT_MEDIAN else FLUORESCENCE


def kind_balanced_weights(kinds: Sequence[str], balance: float) -> np.ndarray:
    """Sampling weights, one per sample, proportional to ``(samples of its kind) ** -balance``.

    ``balance`` 0 weighs every sample alike; 1 gives every kind the same total weight; 0.5 (between)
    draws a kind in proportion to the square root of its count. The weights sum to 1.
    """
    if not kinds:
        raise ValueError("no samples to weigh")
    counts = Counter(kinds)
    weights = np.array([counts[k] ** -float(balance) for k in kinds], dtype=np.float64)
    return weights / weights.sum()

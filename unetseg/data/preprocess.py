"""Pure-numpy preprocessing: intensity normalisation, padding, cropping, slicing.

Arrays are channel-first images ``(C, *S)`` or label maps ``(*S)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from unetseg.errors import DataError

Normalization = Literal["zscore", "percentile"]
# Up to this share of NaN or infinite values an image is repaired (each filled from its nearest finite
# neighbour, with a NonFiniteWarning); beyond it there is too little left to fill from, and it is refused.
MAX_NON_FINITE_SHARE = 0.5


class NonFiniteWarning(UserWarning):
    """Some values of an image were NaN or infinite and were replaced (see :func:`replace_non_finite`)."""


def refuse_mostly_non_finite(image: np.ndarray, source: str | Path = "image") -> None:
    """Raise :class:`DataError` naming ``source`` when more than half of ``image``'s values are NaN or infinite.

    An int16 volume whose ``scl_slope`` is 3e38 decodes to infinities; an all-NaN volume holds nothing: neither
    can be repaired from its neighbours, and either would give a meaningless prediction.
    """
    if image.size == 0 or not np.issubdtype(image.dtype, np.floating):
        return
    bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if bad > MAX_NON_FINITE_SHARE * image.size:
        raise DataError(
            source, f"{bad:,} of {image.size:,} values are NaN or infinite, more than half, too many to fill in; "
            "check its intensity scaling (NIfTI scl_slope/scl_inter, DICOM RescaleSlope) or re-export it"
        )


def normalize_intensity(image: np.ndarray, method: Normalization = "zscore", source: str | Path | None = None) -> np.ndarray:
    """Normalise each channel of ``image (C, *S)`` on its own; returns float32 of the same shape.

    - ``"zscore"``: subtract the channel mean, divide by its standard deviation
      (per case, as nnU-Net does for MRI).
    - ``"percentile"``: clip to the 0.5th-99.5th percentiles, then rescale to
      ``[0, 1]`` (robust to a few very bright voxels; keeps intensities
      non-negative so gamma augmentation applies).
    A constant channel becomes all zeros. Non-finite values (NaN, inf) are
    first replaced by the nearest finite value of their channel, with a
    :class:`NonFiniteWarning` (see :func:`replace_non_finite`), so one bad
    voxel cannot wipe the channel; an image with more than half of its values
    non-finite raises :class:`DataError` (:func:`refuse_mostly_non_finite`).

    Args:
        source: the file the image came from, named in the warning and the error.
    """
    if method not in ("zscore", "percentile"):
        raise ValueError(f"normalization must be 'zscore' or 'percentile', got {method!r}")
    image = image.astype(np.float32)
    refuse_mostly_non_finite(image, "image" if source is None else source)
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        channel = replace_non_finite(channel, f"channel {c}" if source is None else f"{source}: channel {c}")
        if method == "percentile":
            lo, hi = (float(v) for v in np.percentile(channel, [0.5, 99.5]))
            out[c] = np.clip((channel - lo) / (hi - lo), 0.0, 1.0) if hi > lo else 0.0
            continue
        std = float(channel.std())
        out[c] = (channel - channel.mean()) / std if std > 0 else 0.0
    return out


def replace_non_finite(channel: np.ndarray, what: str = "image") -> np.ndarray:
    """``channel`` with each NaN or infinite value set to the nearest finite value (Euclidean, in voxels).

    Emits a :class:`NonFiniteWarning` saying how many values were replaced. A
    channel without any finite value becomes all zeros (images with most values
    non-finite are refused before, by :func:`normalize_intensity`). Returns the
    input itself when it is all finite.
    """
    finite = np.isfinite(channel)
    if finite.all():
        return channel
    bad = int(channel.size - finite.sum())
    warnings.warn(
        f"{what}: {bad:,} of {channel.size:,} values are NaN or infinite; replaced by the nearest finite value",
        NonFiniteWarning,
        stacklevel=3,
    )
    if not finite.any():
        return np.zeros_like(channel)
    from scipy.ndimage import distance_transform_edt

    nearest = distance_transform_edt(~finite, return_distances=False, return_indices=True)
    return channel[tuple(nearest)]


def pad_to_shape(array: np.ndarray, shape: Sequence[int], value: float = 0.0) -> np.ndarray:
    """Pad the trailing ``len(shape)`` axes of ``array`` at the high end up to ``shape``.

    Axes already at least as large are left alone (no cropping).
    """
    lead = array.ndim - len(shape)
    pad = [(0, 0)] * lead + [(0, max(0, t - s)) for s, t in zip(array.shape[lead:], shape)]
    if not any(p for _, p in pad):
        return array
    return np.pad(array, pad, mode="constant", constant_values=value)


def round_up_to_multiple(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Smallest shape >= ``shape`` whose sides are multiples of ``multiple``."""
    return tuple(-(-int(s) // multiple) * multiple for s in shape)


def volume_to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """Cut a volume into 2D slices along a spatial axis.

    Args:
        volume: ``(C, X, Y, Z)`` image or ``(X, Y, Z)`` label map.
        axis: spatial axis 0, 1 or 2 (X, Y or Z).

    Returns:
        ``(N, C, H, W)`` or ``(N, H, W)``, N the size of ``axis``.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    has_channels = volume.ndim == 4
    return np.moveaxis(volume, axis + int(has_channels), 0)


def slices_to_volume(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`volume_to_slices`: ``(N, C, H, W)`` -> ``(C, X, Y, Z)``; ``(N, H, W)`` -> ``(X, Y, Z)``."""
    has_channels = slices.ndim == 4
    return np.moveaxis(slices, 0, axis + int(has_channels))

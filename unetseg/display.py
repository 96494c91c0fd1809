"""Pure-numpy helpers for showing images and label maps: no widgets, no model.

The viewer (``apps/viewer.py``) calls these; so can notebooks. Images are
channel-first ``(C, *S)`` as :mod:`unetseg.data.io` returns them, label maps
``(*S)`` integers. Pictures are ``(H, W)`` grey or ``(H, W, 3)`` RGB; rendered
ones are uint8 RGB.

Volumes are shown in the closest RAS+ orientation (see :func:`to_ras`), so
"axial", "coronal" and "sagittal" mean the anatomical planes whatever the
file's voxel order, and slices are drawn in neurological convention: the
patient's right on the right, anterior (axial) or superior (coronal,
sagittal) at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from nibabel import orientations

PLANES = ("axial", "coronal", "sagittal")
# In RAS+ voxel order the plane normal is: sagittal -> axis 0 (R), coronal -> 1 (A), axial -> 2 (S).
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

# Class colours (RGB), background first: Okabe & Ito's colour-blind-safe set ("Color Universal Design", 2008),
# ordered so the first classes stay furthest apart under protanopia, deuteranopia and tritanopia.
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 159, 0],  # orange
        [86, 180, 233],  # sky blue
        [0, 158, 115],  # bluish green
        [240, 228, 66],  # yellow
        [0, 114, 178],  # blue
        [213, 94, 0],  # vermillion
        [204, 121, 167],  # reddish purple
    ],
    dtype=np.uint8,
)
# Error and disagreement colours: none is a class colour, so a colour means one thing across panels, and the three
# error kinds stay apart under colour-blindness too (tests/test_display.py simulates it).
FALSE_POSITIVE = (255, 0, 64)  # red: predicted foreground where the truth is background
FALSE_NEGATIVE = (0, 255, 255)  # cyan: truth foreground the prediction missed
WRONG_CLASS = (128, 0, 255)  # violet: foreground in both, but a different class
DISAGREEMENT = (0, 255, 128)  # spring green: two predictions differ (compare mode, flip-TTA uncertainty)
ERROR_KEY = "red false positive, cyan false negative, violet wrong class"


def class_colors(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB colours, background (black, never drawn) first.

    More classes than the palette holds reuse its foreground colours in turn.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    fg = PALETTE[1:]
    return np.concatenate([PALETTE[:1], fg[np.arange(num_classes - 1) % len(fg)]])


def hex_color(rgb: Sequence[int]) -> str:
    """``(230, 159, 0)`` -> ``"#e69f00"`` for legends."""
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def legend(class_names: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, hex colour)`` for each foreground class, in class order."""
    colors = class_colors(len(class_names))
    return [(name, hex_color(colors[k])) for k, name in enumerate(class_names) if k > 0]


def default_window(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """``(level, width)`` covering the ``low``-``high`` percentiles of ``image`` (width at least 1e-6)."""
    lo, hi = (float(v) for v in np.percentile(image, [low, high]))
    return (lo + hi) / 2, max(hi - lo, 1e-6)


def apply_window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map intensities to uint8 grey: ``level - width/2`` -> 0, ``level + width/2`` -> 255, clipped."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    scaled = (np.asarray(image, dtype=np.float32) - np.float32(level - width / 2)) / np.float32(width)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def channels_last(image: np.ndarray) -> np.ndarray:
    """Channel-first ``(1, H, W)`` -> ``(H, W)``; ``(3, H, W)`` -> ``(H, W, 3)``."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected (1, H, W) or (3, H, W), got shape {image.shape}")
    return image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)


def to_rgb(picture: np.ndarray) -> np.ndarray:
    """``(H, W)`` grey or ``(H, W, 3)`` uint8 -> ``(H, W, 3)`` uint8."""
    picture = np.asarray(picture)
    if picture.ndim == 2:
        return np.repeat(picture[..., None], 3, axis=2)
    if picture.ndim == 3 and picture.shape[2] == 3:
        return picture
    raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) picture, got shape {picture.shape}")


def blend(base: np.ndarray, mask: np.ndarray, color: Sequence[int], opacity: float) -> np.ndarray:
    """Paint ``color`` over ``base (H, W, 3)`` where ``mask``; ``opacity`` 0 keeps base, 1 is solid colour."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    out = base.astype(np.float32).copy()
    out[mask] = (1 - opacity) * out[mask] + opacity * np.asarray(color, dtype=np.float32)
    return np.round(out).astype(np.uint8)


def overlay(base: np.ndarray, labels: np.ndarray, num_classes: int, opacity: float = 0.5) -> np.ndarray:
    """Colour each foreground class of ``labels (H, W)`` over ``base`` (grey or RGB, see :func:`to_rgb`)."""
    rgb = to_rgb(base)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} != picture shape {rgb.shape[:2]}")
    colors = class_colors(num_classes)
    for k in range(1, num_classes):
        rgb = blend(rgb, labels == k, colors[k], opacity)
    return rgb


def error_masks(prediction: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Where a prediction is wrong, split by kind (boolean maps of the label shape).

    ``false_positive``: predicted foreground on true background;
    ``false_negative``: true foreground predicted as background;
    ``wrong_class``: foreground in both but different classes.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != truth shape {truth.shape}")
    pred_fg, true_fg = prediction > 0, truth > 0
    return {
        "false_positive": pred_fg & ~true_fg,
        "false_negative": true_fg & ~pred_fg,
        "wrong_class": pred_fg & true_fg & (prediction != truth),
    }


def error_overlay(base: np.ndarray, prediction: np.ndarray, truth: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """False positives, false negatives and wrong classes over ``base``, in the colours :data:`ERROR_KEY` names."""
    rgb = to_rgb(base)
    masks = error_masks(prediction, truth)
    for name, color in (("false_positive", FALSE_POSITIVE), ("false_negative", FALSE_NEGATIVE), ("wrong_class", WRONG_CLASS)):
        rgb = blend(rgb, masks[name], color, opacity)
    return rgb


def disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean map of where two label maps differ."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return a != b


def vote_disagreement(predictions: np.ndarray) -> np.ndarray:
    """Share of predictions that disagree with the majority label, per voxel.

    Args:
        predictions: ``(N, *S)`` label maps of the same image (e.g. one per
            flip of test-time augmentation).

    Returns:
        ``(*S)`` float32 in ``[0, 1 - 1/N]``: 0 where all N agree.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim < 2 or predictions.shape[0] < 2:
        raise ValueError(f"need (N >= 2, *S) predictions, got shape {predictions.shape}")
    n = predictions.shape[0]
    labels = np.unique(predictions)
    votes = np.stack([(predictions == k).sum(axis=0) for k in labels])
    return (1.0 - votes.max(axis=0) / n).astype(np.float32)


def heat_overlay(base: np.ndarray, value: np.ndarray, opacity: float = 0.6, color: Sequence[int] = DISAGREEMENT) -> np.ndarray:
    """Blend ``color`` over ``base`` in proportion to ``value`` in ``[0, 1]`` (0 leaves base unchanged)."""
    rgb = to_rgb(base).astype(np.float32)
    if value.shape != rgb.shape[:2]:
        raise ValueError(f"value shape {value.shape} != picture shape {rgb.shape[:2]}")
    alpha = (opacity * np.clip(value, 0.0, 1.0))[..., None]
    return np.round((1 - alpha) * rgb + alpha * np.asarray(color, dtype=np.float32)).astype(np.uint8)


def voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3: ``|det|`` of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def class_sizes(labels: np.ndarray, class_names: Sequence[str], affine: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Size of each foreground class.

    Volumes ``(X, Y, Z)`` with an affine give ``voxels`` and ``volume_mm3``;
    2D label maps give ``pixels`` (their files carry no physical size).
    """
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=len(class_names))
    rows = []
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        if labels.ndim == 3:
            if affine is None:
                raise ValueError("a volume needs its affine to give sizes in mm^3")
            rows.append({"class": name, "voxels": int(counts[k]), "volume_mm3": float(counts[k]) * voxel_volume(affine)})
        else:
            rows.append({"class": name, "pixels": int(counts[k])})
    return rows


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder and flip the last three axes of ``array`` to the closest RAS+ voxel order.

    Only for display: the array is a view where possible and the data are not resampled.
    Works on ``(X, Y, Z)`` label maps and ``(C, X, Y, Z)`` images.
    """
    ornt = orientations.io_orientation(np.asarray(affine, dtype=float))
    if array.ndim == 3:
        return orientations.apply_orientation(array, ornt)
    if array.ndim == 4:
        return np.stack([orientations.apply_orientation(c, ornt) for c in array])
    raise ValueError(f"expected (X, Y, Z) or (C, X, Y, Z), got shape {array.shape}")


def ras_spacing(spacing: Sequence[float], affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes reordered to match :func:`to_ras`."""
    ornt = orientations.io_orientation(np.asarray(affine, dtype=float))
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = float(spacing[axis])
    return out[0], out[1], out[2]


# The patient direction at the negative and positive end of each RAS+ world axis.
AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))


def direction_letter(vector: Sequence[float]) -> str:
    """The patient direction a world (RAS+) vector points to most: ``(0, -0.9, 0.2)`` -> ``"P"``."""
    vector = np.asarray(vector, dtype=float)
    axis = int(np.argmax(np.abs(vector)))
    return AXIS_LETTERS[axis][int(vector[axis] > 0)]


def edge_letters(affine: np.ndarray, shape: Sequence[int], plane: str) -> dict[str, str]:
    """Orientation markers of a :func:`plane_slice` picture of ``to_ras(array, affine)``: the patient direction at
    its ``left``, ``right``, ``top`` and ``bottom`` edge, read from the affine (``shape``: the array's ``(X, Y, Z)``).

    Picture columns run along one voxel axis of the reoriented volume and rows (bottom to top) along another; the
    world direction of each axis is a column of the reoriented affine.
    """
    affine = np.asarray(affine, dtype=float)
    ornt = orientations.io_orientation(affine)
    shown = affine @ orientations.inv_ornt_aff(ornt, tuple(shape)[-3:])  # the affine of to_ras(array)
    axis = PLANE_AXIS[_check_plane(plane)]
    horizontal, vertical = (a for a in range(3) if a != axis)
    right, up = direction_letter(shown[:3, horizontal]), direction_letter(shown[:3, vertical])
    return {"left": _opposite(right), "right": right, "top": up, "bottom": _opposite(up)}


def _opposite(letter: str) -> str:
    return next(pair[1 - pair.index(letter)] for pair in AXIS_LETTERS if letter in pair)


def mark_edges(picture: np.ndarray, letters: dict[str, str]) -> np.ndarray:
    """Write orientation ``letters`` (see :func:`edge_letters`) at the middle of each edge of an RGB picture.

    White with a black outline, sized to the picture (draw them after enlarging it for display).
    """
    from PIL import Image, ImageDraw, ImageFont

    height, width = picture.shape[:2]
    size = int(np.clip(min(height, width) // 14, 10, 28))
    image = Image.fromarray(to_rgb(picture))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    pad = max(2, size // 4)
    spots = {"left": ((pad, height / 2), "lm"), "right": ((width - pad, height / 2), "rm"),
             "top": ((width / 2, pad), "mt"), "bottom": ((width / 2, height - pad), "mb")}
    for edge, (xy, anchor) in spots.items():
        draw.text(xy, letters[edge], fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=max(1, size // 8),
                  stroke_fill=(0, 0, 0))
    return np.asarray(image)


def num_slices(shape: Sequence[int], plane: str) -> int:
    """How many slices a RAS+ volume of ``shape (X, Y, Z)`` has in ``plane``."""
    return int(shape[-3:][PLANE_AXIS[_check_plane(plane)]])


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One slice of a RAS+ volume ``(X, Y, Z)`` or ``(C, X, Y, Z)``, as a picture ``(H, W)`` / ``(C, H, W)``.

    Axial and coronal: patient right on the right; axial: anterior at the top;
    coronal and sagittal: superior at the top; sagittal: anterior on the right.
    """
    axis = PLANE_AXIS[_check_plane(plane)]
    n = volume.shape[volume.ndim - 3 + axis]
    if not 0 <= index < n:
        raise IndexError(f"slice {index} outside 0..{n - 1} of the {plane} plane")
    picture = np.take(volume, index, axis=volume.ndim - 3 + axis)  # (..., a, b), a horizontal, b vertical
    return np.flip(np.swapaxes(picture, -1, -2), axis=-2)


def pixel_aspect(spacing: Sequence[float], plane: str) -> tuple[float, float]:
    """``(row height, column width)`` in mm of a :func:`plane_slice` picture of a RAS+ volume."""
    axis = PLANE_AXIS[_check_plane(plane)]
    horizontal, vertical = (a for a in range(3) if a != axis)
    return float(spacing[vertical]), float(spacing[horizontal])


def zoom_box(shape: Sequence[int], zoom: float, centre: tuple[float, float] = (0.5, 0.5)) -> tuple[slice, slice]:
    """Rows and columns of an ``(H, W)`` picture to show at ``zoom`` x: ``1/zoom`` of each side (at least a pixel),
    centred at ``centre`` (row, column as fractions of the picture, 0.5 = the middle) and kept inside it."""
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    box = []
    for size, where in zip(shape[:2], centre):
        part = max(1, round(size / zoom))
        start = int(np.clip(round(where * size - part / 2), 0, size - part))
        box.append(slice(start, start + part))
    return box[0], box[1]


def upscale(picture: np.ndarray, target: int = 480, aspect: tuple[float, float] = (1.0, 1.0), max_factor: int = 16) -> np.ndarray:
    """Nearest-neighbour enlarge ``(H, W[, 3])`` so its longer side is about ``target`` pixels.

    ``aspect`` (row height, column width) stretches anisotropic pixels to their
    physical proportions. Pictures already that large are returned unchanged,
    unless they are so thin (a 1 x 10240 row) that shown ``target`` pixels long
    they would be under one pixel thick: Pillow cannot shrink them to the page
    ("height and width must be > 0"). Their short side is repeated to at least
    1/``target`` of the long side, after thinning a long side of more than
    ``target * max_factor`` pixels to every k-th pixel, so the result stays
    under ``target * max_factor**2`` pixels.
    """
    height, width = picture.shape[:2]
    if height == 0 or width == 0:
        return picture
    rows, cols = aspect
    unit = min(rows, cols)
    fy, fx = rows / unit, cols / unit
    scale = max(1.0, target / max(height * fy, width * fx))
    ry = int(min(max_factor, max(1, round(scale * fy))))
    rx = int(min(max_factor, max(1, round(scale * fx))))
    if min(height * ry, width * rx) * target < max(height * ry, width * rx):
        return _thicken(picture, target, ry, rx, max_factor)
    if ry == rx == 1:
        return picture
    return np.repeat(np.repeat(picture, ry, axis=0), rx, axis=1)


def _thicken(picture: np.ndarray, target: int, ry: int, rx: int, max_factor: int) -> np.ndarray:
    """A picture whose short side is under 1/``target`` of its long side, thickened for :func:`upscale`."""
    long_axis = 0 if picture.shape[0] * ry > picture.shape[1] * rx else 1
    longest = target * max_factor
    step = -(-picture.shape[long_axis] // longest)  # thin a very long side to at most target * max_factor pixels
    if step > 1:
        picture = picture[::step] if long_axis == 0 else picture[:, ::step]
    factors = [ry, rx]
    factors[long_axis] = 1 if step > 1 else factors[long_axis]
    long_side = picture.shape[long_axis] * factors[long_axis]
    short_axis = 1 - long_axis
    factors[short_axis] = max(factors[short_axis], -(-long_side // (target * picture.shape[short_axis])))
    return np.repeat(np.repeat(picture, factors[0], axis=0), factors[1], axis=1)


def _check_plane(plane: str) -> str:
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")
    return plane

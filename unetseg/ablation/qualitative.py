"""The same validation slices predicted by several trained variants, saved small so the figure can be redrawn.

For a volume the shown slice is the one (along the training slice axis) with
the most ground-truth foreground; a 2D image larger than ``crop`` is cropped
to ``crop x crop`` around its foreground centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unetseg.data.datasets import Case
from unetseg.data.preprocess import volume_to_slices
from unetseg.infer import Segmenter


def _crop_window(label: np.ndarray, crop: int) -> tuple[slice, slice]:
    """A ``crop x crop`` window (clipped to the image) centred on the foreground's centre of mass."""
    fg = np.argwhere(label > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(label.shape) // 2
    window = []
    for c, size in zip(centre, label.shape):
        start = int(np.clip(c - crop // 2, 0, max(0, size - crop)))
        window.append(slice(start, start + min(crop, size)))
    return window[0], window[1]


def pick_view(case: Case, slice_axis: int, crop: int) -> tuple[tuple, np.ndarray, np.ndarray]:
    """Index into the case's label (and its ``(*S)`` prediction), the shown image and label.

    Returns:
        ``index`` (a tuple usable on ``(*S)`` arrays), ``image (H, W)`` float32
        (first channel) or ``(H, W, 3)`` for RGB, and ``label (H, W)`` uint8.
    """
    label = case.label
    if label.ndim == 3:
        per_slice = volume_to_slices(label > 0, slice_axis).reshape(label.shape[slice_axis], -1).sum(axis=1)
        k = int(per_slice.argmax())
        index = tuple(k if axis == slice_axis else slice(None) for axis in range(3))
        image = case.image[(slice(None), *index)]
    else:
        index = _crop_window(label, crop)
        image = case.image[(slice(None), *index)]
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    return index, shown.astype(np.float32), label[index].astype(np.uint8)


def qualitative_arrays(
    segmenters: dict[str, Segmenter], cases: Sequence[Case], slice_axis: int, crop: int, out_path: Path
) -> dict[str, np.ndarray]:
    """Predict ``cases`` with every segmenter and save the shown views to ``out_path`` (NPZ).

    Saved arrays, for case ``i``: ``image_i``, ``truth_i`` and ``pred_<variant>_i``;
    plus ``case_ids`` and ``variants``.
    """
    arrays: dict[str, np.ndarray] = {
        "case_ids": np.array([c.case_id for c in cases]),
        "variants": np.array(list(segmenters)),
    }
    for i, case in enumerate(cases):
        index, image, truth = pick_view(case, slice_axis, crop)
        arrays[f"image_{i}"] = image.astype(np.float16)
        arrays[f"truth_{i}"] = truth
        for name, segmenter in segmenters.items():
            prediction = segmenter.predict(case.image, normalized=True)
            arrays[f"pred_{name}_{i}"] = prediction[index].astype(np.uint8)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    return arrays

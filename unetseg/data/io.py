"""Readers and writers, one per file format, behind one return contract.

Every reader returns ``(array, ImageMeta)``. Images come back channel-first
float32: ``(C, H, W)`` for 2D files, ``(C, X, Y, Z)`` for NIfTI volumes. Label
maps come back as int64 without a channel axis. Any file that cannot be used
raises :class:`~unetseg.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from unetseg.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class ImageMeta:
    """What a writer needs to save a prediction aligned with its source.

    Attributes:
        path: the source file.
        kind: ``"nifti"`` or ``"image2d"``.
        affine: 4x4 voxel-to-world matrix (identity for 2D files).
        spacing: voxel or pixel size per spatial axis, in mm for NIfTI (1.0 for 2D).
        header: the NIfTI header to copy into outputs, else ``None``.
    """

    path: Path
    kind: str
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple[float, ...] = (1.0, 1.0)
    header: nib.Nifti1Header | None = None


def file_kind(path: str | Path) -> str:
    """``"nifti"`` or ``"image2d"`` from the file name, else :class:`DataError`."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_2D_SUFFIXES):
        return "image2d"
    raise DataError(
        path, f"unsupported file type; use NIfTI ({', '.join(NIFTI_SUFFIXES)}) or {', '.join(IMAGE_2D_SUFFIXES)}"
    )


def _load_nifti(path: Path) -> tuple[np.ndarray, ImageMeta]:
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty; re-export or re-download it")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise DataError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc}); check it is complete") from None
    header = img.header.copy()
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    return data, ImageMeta(path=path, kind="nifti", affine=np.asarray(img.affine), spacing=spacing, header=header)


def read_nifti_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read a 3D NIfTI image. Returns ``(C=1, X, Y, Z)`` float32 and its metadata.

    A 4D file with a single volume is accepted; more volumes raise (this
    network takes one channel).
    """
    data, meta = _load_nifti(Path(path))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape}; pass a single 3D volume")
    return data.astype(np.float32)[None], meta


def read_nifti_label(path: str | Path, num_classes: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read a 3D NIfTI label map as int64 ``(X, Y, Z)``.

    Args:
        num_classes: when given, values outside ``0..num_classes-1`` raise.
    """
    data, meta = _load_nifti(Path(path))
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D label map, got shape {data.shape}")
    if not np.all(np.equal(np.mod(data, 1), 0)):
        raise DataError(path, "label map has non-integer values; labels must be class indices")
    labels = data.astype(np.int64)
    check_label_values(labels, num_classes, path)
    return labels, meta


def check_label_values(labels: np.ndarray, num_classes: int | None, path: str | Path) -> None:
    """Raise :class:`DataError` when ``labels`` holds values outside ``0..num_classes-1``."""
    if num_classes is None:
        return
    found = np.unique(labels)
    bad = found[(found < 0) | (found >= num_classes)]
    if bad.size:
        raise DataError(
            path, f"unknown label values {bad.tolist()}; expected 0..{num_classes - 1} as listed in dataset.json"
        )


def read_image_2d(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read a 2D image (PNG, JPEG, TIFF, BMP) as ``(C, H, W)`` float32.

    Grey images give ``C=1``; RGB ``C=3``; RGBA drops alpha (``C=3``). Other
    channel counts raise.
    """
    from skimage import io as skio

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty; re-export it")
    try:
        data = np.asarray(skio.imread(str(path)))
    except Exception as exc:  # scikit-image raises many types for corrupt files
        raise DataError(path, f"not a readable image ({type(exc).__name__}); check the file is complete") from None
    return image_to_channels_first(data, path), ImageMeta(path=path, kind="image2d")


def image_to_channels_first(data: np.ndarray, path: str | Path) -> np.ndarray:
    """``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` -> ``(C, H, W)`` float32 (alpha dropped)."""
    if data.ndim == 2:
        return data.astype(np.float32)[None]
    if data.ndim == 3 and data.shape[2] in (3, 4):
        return np.moveaxis(data[..., :3], -1, 0).astype(np.float32)
    raise DataError(
        path, f"expected a grey, RGB or RGBA 2D image, got array shape {data.shape}; convert it to PNG RGB or grey"
    )


def read_mask_2d(path: str | Path) -> np.ndarray:
    """Read a 2D mask image as bool ``(H, W)``: any non-zero pixel is foreground."""
    from skimage import io as skio

    try:
        data = np.asarray(skio.imread(str(path)))
    except Exception as exc:
        raise DataError(path, f"not a readable mask image ({type(exc).__name__})") from None
    if data.ndim == 3:
        data = data[..., 0]
    if data.ndim != 2:
        raise DataError(path, f"expected a 2D mask, got shape {data.shape}")
    return data > 0


def read_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read any supported image by its suffix; see :func:`read_nifti_image` and :func:`read_image_2d`."""
    return read_nifti_image(path) if file_kind(path) == "nifti" else read_image_2d(path)


def write_nifti_label(labels: np.ndarray, meta: ImageMeta, path: str | Path) -> Path:
    """Save an ``(X, Y, Z)`` label map with the source's affine and header (uint8 data)."""
    header = meta.header.copy() if meta.header is not None else None
    img = nib.Nifti1Image(labels.astype(np.uint8), meta.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def label_to_png_pixels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map -> uint8 pixels for a mask PNG.

    The encoding depends on the model, never on the image: a two-class model
    (background + one foreground) writes 0/255; a model with more classes
    writes the class index (0, 1, 2, ...), so every mask of a batch reads alike.
    """
    if num_classes <= 2:
        return (labels > 0).astype(np.uint8) * 255
    return labels.astype(np.uint8)


def write_png_mask(labels: np.ndarray, path: str | Path, num_classes: int) -> Path:
    """Save a ``(H, W)`` label map as PNG (see :func:`label_to_png_pixels`)."""
    from skimage import io as skio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(str(path), label_to_png_pixels(labels, num_classes), check_contrast=False)
    return path

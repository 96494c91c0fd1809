"""Readers and writers, one per file format, behind one return contract.

Every reader returns ``(array, ImageMeta)``. Images come back channel-first
float32: ``(C, H, W)`` for 2D files, ``(C, X, Y, Z)`` for NIfTI volumes. Label
maps come back as int64 without a channel axis. Any file that cannot be used
raises :class:`~unetseg.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from unetseg.data.preprocess import refuse_mostly_non_finite
from unetseg.errors import DataError, UnetsegError
from unetseg.limits import env_positive_number

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# The pixel budget: the most pixels (2D) or voxels (3D) a file may declare before it is decoded.
# A small compressed file can declare a huge array (a decompression bomb); every reader checks
# the size stated in the file's header against this budget first. See docs/reliability.md.
MAX_PIXELS_ENV = "UNETSEG_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2**27  # 134 million: a 512^3 volume or an 11585 x 11585 image
_budget_override: list[int] = []


def max_pixels() -> int:
    """The pixel budget in force: :func:`pixel_budget`'s value, else ``$UNETSEG_MAX_PIXELS``, else 2**27."""
    if _budget_override:
        return _budget_override[-1]
    return int(env_positive_number(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "pixels"))


@contextmanager
def pixel_budget(limit: int | None) -> Iterator[int]:
    """Use ``limit`` as the pixel budget inside the ``with`` block (None: keep the current one)."""
    if limit is not None and limit <= 0:
        raise UnetsegError(f"--max-pixels must be a positive number of pixels, got {limit}")
    if limit is None:
        yield max_pixels()
        return
    _budget_override.append(int(limit))
    try:
        yield int(limit)
    finally:
        _budget_override.pop()


def check_pixel_budget(path: str | Path, shape: Sequence[int], what: str = "image") -> None:
    """Refuse, before decoding, a file whose header declares more pixels than :func:`max_pixels`, or an axis of
    no pixels (a 20 x 0 x 16 volume has nothing to show or segment).

    ``shape`` is the declared size (spatial axes and frames; channels excluded).
    """
    dims = " x ".join(str(int(s)) for s in shape)
    if any(int(side) < 1 for side in shape):
        raise DataError(path, f"{what} declares {dims} pixels: an axis without pixels holds no image; "
                        "check the file is complete, or re-export it")
    count = 1
    for side in shape:
        count *= int(side)
    limit = max_pixels()
    if count > limit:
        raise DataError(
            path, f"{what} declares {dims} = {count:,} pixels, over the {limit:,} pixel budget; "
            f"downsample it, or raise the budget with --max-pixels or ${MAX_PIXELS_ENV}"
        )


@dataclass
class ImageMeta:
    """What a writer needs to save a prediction aligned with its source.

    Attributes:
        path: the source file.
        kind: what the array is and how its prediction is written: ``"nifti"`` for a volume in patient space
            (written as NIfTI; DICOM inputs too), ``"image2d"`` for a 2D image (written as PNG).
        affine: 4x4 voxel-to-world matrix (identity for 2D files).
        spacing: voxel or pixel size per spatial axis, in mm for NIfTI (1.0 for 2D).
        header: the NIfTI header to copy into outputs, else ``None``.
        source_format: the file format it was read from: ``"nifti"``, ``"dicom"`` or ``"image2d"``
            (None: the same as ``kind``).
    """

    path: Path
    kind: str
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple[float, ...] = (1.0, 1.0)
    header: nib.Nifti1Header | None = None
    source_format: str | None = None

    @property
    def file_format(self) -> str:
        """The format of the source file (``source_format``, else ``kind``)."""
        return self.source_format or self.kind


def file_kind(path: str | Path) -> str:
    """``"nifti"`` or ``"image2d"`` from the file name; ``"dicom"`` for a folder (a DICOM series), a DICOM file
    (:func:`unetseg.data.dicom.is_dicom_file`: by suffix or preamble) or a ``.zip`` file (of one series, as the
    viewer takes it); else :class:`DataError`.

    A DICOM input is read as a volume: its :class:`ImageMeta` has ``kind="nifti"`` (a volume, written as NIfTI)
    and ``source_format="dicom"``.
    """
    from unetseg.data.dicom import is_dicom_file

    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_2D_SUFFIXES):
        return "image2d"
    if Path(path).is_dir() or is_dicom_file(Path(path)) or name.endswith(".zip"):
        return "dicom"
    raise DataError(
        path, f"unsupported file type; use NIfTI ({', '.join(NIFTI_SUFFIXES)}), DICOM (.dcm, a folder or a .zip of one "
        f"series) or {', '.join(IMAGE_2D_SUFFIXES)}"
    )


def _load_nifti(path: Path) -> tuple[np.ndarray, ImageMeta]:
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty; re-export or re-download it")
    try:
        with _nibabel_quiet():
            img = nib.load(str(path))
        check_pixel_budget(path, img.header.get_data_shape(), "NIfTI header")
        _check_nifti_dtype(path, img.get_data_dtype())
        data = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError, OverflowError,
            zlib.error, gzip.BadGzipFile, ValueError) as exc:
        # nibabel's text may span lines ("... got 0 bytes from x.nii\n - could the file be damaged?"): one line here
        reason = " ".join(str(exc).split())
        fix = ("its header is invalid: re-save it (e.g. from ITK-SNAP or 3D Slicer)"
               if isinstance(exc, nib.spatialimages.HeaderDataError) else "check it is complete")
        raise DataError(path, f"not a readable NIfTI file ({type(exc).__name__}: {reason}); {fix}") from None
    header = img.header.copy()
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    check_geometry(path, affine, spacing, "the header's orientation (sform/qform affine)", "voxel sizes (pixdim)",
                   "fix the header (e.g. re-save the file from ITK-SNAP or 3D Slicer)")
    return data, ImageMeta(path=path, kind="nifti", affine=affine, spacing=spacing, header=header)


@contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Mute nibabel's header log ("sizeof_hdr should be 348; set sizeof_hdr to 348", ...): a line on stderr without
    the file's name; a header it cannot use raises, and becomes our one line."""
    logger = nib.imageglobals.logger
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _check_nifti_dtype(path: Path, dtype: np.dtype) -> None:
    """Refuse, from the header, voxels that are not plain numbers: RGB24/RGBA32 colour (a structured type) and
    complex numbers (casting them to float would silently drop the imaginary part)."""
    if dtype.kind in "biuf":
        return
    if dtype.kind == "c":
        raise DataError(path, f"voxels are complex numbers ({dtype}); save the magnitude or the real part as a "
                        "real-valued NIfTI")
    if dtype.names:
        raise DataError(path, f"voxels are colour ({''.join(dtype.names)}, one value per channel); this network "
                        "takes a grey volume: save one channel or the grey value as a NIfTI of numbers")
    raise DataError(path, f"voxels are of type {dtype}, not numbers; save the volume as a NIfTI of numbers")


def check_geometry(source: str | Path, affine: np.ndarray, spacing: Sequence[float], orientation: str, sizes: str,
                   fix: str) -> None:
    """Raise :class:`DataError` unless the ``(4, 4)`` voxel-to-world ``affine`` is finite and invertible and every
    voxel size is finite and positive; ``orientation`` and ``sizes`` name where the file keeps them."""
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(source, f"{orientation} is not finite or is singular, so the image has no usable orientation; {fix}")
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(source, f"{sizes} are not finite and positive ({', '.join(f'{v:g}' for v in spacing)}); {fix}")


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
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf, counted next
        image = data.astype(np.float32)[None]
    refuse_mostly_non_finite(image, path)
    return image, meta


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

    Grey images give ``C=1``; RGB ``C=3``; RGBA drops alpha (``C=3``). CMYK,
    YCbCr, LAB, HSV and palette images are converted to RGB. Multi-page files
    and other channel counts raise, as does a size over :func:`max_pixels`
    (checked from the header, before decoding).
    """
    path = Path(path)
    image = image_to_channels_first(read_pixels_2d(path), path)
    refuse_mostly_non_finite(image, path)
    return image, ImageMeta(path=path, kind="image2d")


_TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "P", "PA")


def read_pixels_2d(path: str | Path, what: str = "image", palette_indices: bool = False) -> np.ndarray:
    """The pixels of a single-page 2D image file, ``(H, W)`` or ``(H, W, C)``.

    The size is read from the header first (Pillow opens lazily; tifffile for
    TIFFs Pillow cannot open) and refused over :func:`max_pixels`; multi-page
    files are refused; colour modes other than grey/RGB/RGBA become RGB.

    Args:
        palette_indices: palette images (``P``, ``PA``) give their palette
            indices ``(H, W)`` (with alpha ``(H, W, 2)``) instead of the RGB
            colours they stand for: what masks and label maps mean by them.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError
    from skimage import io as skio

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty; re-export it")
    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # Pillow's own bomb check (error above twice this) agrees with the budget
    converted = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_2d_header(path, (img.height, img.width), int(getattr(img, "n_frames", 1)), what)
                if palette_indices and img.mode in ("P", "PA"):
                    converted = np.asarray(img)
                elif img.mode in _TO_RGB_MODES:
                    converted = np.asarray(img.convert("RGB"))
                elif img.mode == "1":
                    converted = np.asarray(img.convert("L"))
                elif img.mode == "LA":  # scikit-image reads a 3 or 4 rows high grey + alpha image as channels-first
                    converted = np.asarray(img)
    except Image.DecompressionBombError:
        raise DataError(path, f"{what} is over the {limit:,} pixel budget; downsample it, or raise the budget "
                        f"with --max-pixels or ${MAX_PIXELS_ENV}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if not path.name.lower().endswith((".tif", ".tiff")):
            raise DataError(path, f"not a readable {what} ({type(exc).__name__}); check the file is complete") from None
        _check_tiff_header(path, what)
    if converted is not None:
        return converted
    try:
        return np.asarray(skio.imread(str(path)))
    except Exception as exc:  # scikit-image raises many types for corrupt files
        raise DataError(path, f"not a readable {what} ({type(exc).__name__}); check the file is complete") from None


def _check_2d_header(path: Path, size: tuple[int, int], frames: int, what: str) -> None:
    check_pixel_budget(path, (*size, frames) if frames > 1 else size, what)
    if frames > 1:
        raise DataError(path, f"{what} holds {frames} pages or frames, not one grey, RGB or RGBA 2D image; "
                        "save the page to segment as a single-page file")


def _check_tiff_header(path: Path, what: str) -> None:
    """Budget and page checks for a TIFF that Pillow cannot open (tifffile reads only its tags)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            shape = tif.pages[0].shape
            samples = int(getattr(tif.pages[0], "samplesperpixel", 1))
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(path, f"not a readable {what} ({type(exc).__name__}); check the file is complete") from None
    spatial = shape[:-1] if samples > 1 and len(shape) > 2 else shape
    _check_2d_header(path, tuple(spatial), pages, what)


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
    """Read a 2D mask image as bool ``(H, W)`` by the rule of :func:`mask_from_pixels`."""
    return mask_from_pixels(read_pixels_2d(path, what="mask image", palette_indices=True), path)


def mask_from_pixels(pixels: np.ndarray, source: str | Path) -> np.ndarray:
    """The drawn region of a 2D mask's pixels as bool ``(H, W)``.

    - grey ``(H, W)`` and palette indices (see :func:`read_pixels_2d`): any non-zero value;
    - RGB: any non-zero channel, so blue or green on black is foreground (reading the red channel alone
      used to make such masks empty);
    - with alpha (grey + alpha, palette + alpha, RGBA): a visible (alpha > 0) and non-black pixel; when no
      visible pixel has a colour and the alpha varies, the alpha alone (> 0): a black or colourless drawing
      on a transparent background. An opaque all-black mask stays empty.
    """
    if pixels.ndim == 2:
        return pixels > 0
    if pixels.ndim != 3 or pixels.shape[2] not in (2, 3, 4):
        raise DataError(source, f"expected a 2D mask (grey, palette, RGB or RGBA), got shape {pixels.shape}")
    if pixels.shape[2] == 3:
        return np.any(pixels > 0, axis=2)
    visible = pixels[..., -1] > 0
    drawn = visible & np.any(pixels[..., :-1] > 0, axis=2)
    if not drawn.any() and visible.any() and not visible.all():
        return visible
    return drawn


def read_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read any supported image by its :func:`file_kind`; see :func:`read_nifti_image`, :func:`read_image_2d` and
    :func:`unetseg.data.dicom.read_dicom` (a DICOM file or series folder, as a volume)."""
    kind = file_kind(path)
    if kind == "dicom":
        from unetseg.data.dicom import read_dicom

        return read_dicom(path)
    return read_nifti_image(path) if kind == "nifti" else read_image_2d(path)


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

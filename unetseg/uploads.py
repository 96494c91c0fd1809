"""Uploaded files -> arrays: the viewer's input side, without any widget code.

A browser upload arrives as a file name and its bytes. :func:`read_upload`
and :func:`read_label_upload` check them (size, type, emptiness) and read
them with the package's readers, so every problem surfaces as one
:class:`~unetseg.errors.DataError` line naming the file and the fix.
Readers that need a path get a temporary file under
:func:`tempfile.gettempdir`, deleted straight after; nothing is written to
the working directory.
"""

from __future__ import annotations

import hashlib
import io as _io
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from unetseg.data import io
from unetseg.data.datasets import CaseRef, dataset_info, default_data_root, list_cases, read_dsb_mask  # noqa: F401
from unetseg.data.io import ImageMeta  # noqa: F401 (what a decoded upload's metadata is, for the viewer)
from unetseg.data.names import PUBLIC_DATASETS
from unetseg.data.dicom import (
    DICOM_SUFFIXES,
    MAX_ZIP_MEMBERS,
    is_dicom_bytes,
    is_zip_bytes,
    read_dicom_bytes,
    read_zip_member,
)
from unetseg.errors import DataError, UnetsegError
from unetseg.limits import env_positive_number

MAX_UPLOAD_ENV = "UNETSEG_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 100.0
SUPPORTED = "NIfTI (.nii, .nii.gz), DICOM (.dcm or a .zip of one series), PNG, JPG, TIF or BMP"
GZIP_MAGIC = b"\x1f\x8b"


def max_upload_bytes() -> int:
    """The upload size limit: ``$UNETSEG_MAX_UPLOAD_MB`` megabytes, else 100 MB."""
    mb = env_positive_number(MAX_UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB, "megabytes")
    return int(mb * 1_000_000)


def digest(data: bytes) -> str:
    """SHA-256 of the bytes: the cache key of an upload."""
    return hashlib.sha256(data).hexdigest()


def upload_kind(name: str, data: bytes) -> str:
    """``"nifti"``, ``"dicom"`` or ``"image2d"`` from the name, or from DICOM/zip magic bytes.

    Raises :class:`DataError` for anything else.
    """
    lower = name.lower()
    if lower.endswith(io.NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(io.IMAGE_2D_SUFFIXES):
        return "image2d"
    if lower.endswith((*DICOM_SUFFIXES, ".zip")) or is_dicom_bytes(data):
        return "dicom"
    if "." not in Path(name).name and is_zip_bytes(data):
        return "dicom"
    raise DataError(name, f"unsupported file type; upload {SUPPORTED}")


def check_bytes(name: str, data: bytes, max_bytes: int | None = None) -> None:
    """Reject empty uploads and uploads over the size limit."""
    limit = max_upload_bytes() if max_bytes is None else max_bytes
    if len(data) == 0:
        raise DataError(name, "file is empty (0 bytes); upload the complete file")
    if len(data) > limit:
        raise DataError(
            name, f"file is {len(data) / 1e6:.1f} MB, over the {limit / 1e6:g} MB upload limit "
            f"(set {MAX_UPLOAD_ENV} to raise it)"
        )


def _safe_suffix(name: str) -> str:
    lower = Path(name).name.lower()
    suffix = ".nii.gz" if lower.endswith(".nii.gz") else Path(lower).suffix
    return suffix if re.fullmatch(r"(\.[a-z0-9]{1,5}){1,2}", suffix or "") else ""


@contextmanager
def temporary_file(data: bytes, suffix: str) -> Iterator[Path]:
    """Write ``data`` to a fresh temporary folder under :func:`tempfile.gettempdir`; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="unetseg-upload-", dir=tempfile.gettempdir()) as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        yield path


def _nifti_suffix(data: bytes) -> str:
    """nibabel picks (de)compression by suffix; choose it from the bytes, so a mislabelled .nii.gz still reads."""
    return ".nii.gz" if data[:2] == GZIP_MAGIC else ".nii"


def _renamed(meta: io.ImageMeta, name: str) -> io.ImageMeta:
    return replace(meta, path=Path(Path(name).name or "upload"))


def read_upload(name: str, data: bytes, max_bytes: int | None = None) -> tuple[np.ndarray, io.ImageMeta]:
    """An uploaded image or volume -> ``(C, *S)`` float32 and its metadata.

    Volumes (NIfTI, DICOM) come back ``(1, X, Y, Z)``; 2D images ``(1|3, H, W)``.
    The meta's ``path`` is the upload's file name (no folder). Every problem
    raises :class:`DataError` naming the upload: unsupported type, empty,
    over the size limit, over the pixel budget (:func:`unetseg.data.io.max_pixels`,
    checked from the header before decoding), truncated or corrupt, 4D, wrong
    channel count.
    """
    check_bytes(name, data, max_bytes)
    kind = upload_kind(name, data)
    if kind == "dicom":
        image, meta = read_dicom_bytes(data, name, max_bytes if max_bytes is not None else max_upload_bytes())
    else:
        suffix = _nifti_suffix(data) if kind == "nifti" else _safe_suffix(name)
        with temporary_file(data, suffix) as path:
            try:
                if kind == "nifti":
                    image, meta = io.read_nifti_image(path)
                else:
                    image, meta = io.read_image_2d(path)
            except DataError as exc:
                raise DataError(name, _problem(exc, name)) from None
    if not np.all(np.isfinite(image)):
        raise DataError(name, "image holds NaN or infinite values; fix or re-export the file")
    return image, _renamed(meta, name)


def _problem(exc: DataError, name: str) -> str:
    """The message of a DataError about a temporary copy, on one line, with every mention of the temporary path
    (a reader's own text may quote it) replaced by the upload's file ``name``; the leading ``path: `` goes."""
    text = str(exc)
    prefix = f"{exc.path}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    return " ".join(text.replace(str(exc.path), Path(name).name).split())


def label_from_pixels(pixels: np.ndarray, num_classes: int, source: str | Path) -> np.ndarray:
    """A 2D label image's pixels (palette images as indices, see :func:`io.read_pixels_2d`) -> ``(H, W)`` int64.

    With two classes the drawn region is foreground, by the rule ``unetseg
    evaluate`` reads mask PNGs with (:func:`io.mask_from_pixels`: any non-zero
    grey value, palette index or colour channel; alpha for drawings on a
    transparent background). With more, grey values or palette indices are
    the class indices (transparent pixels are background); a colour image
    cannot hold them and is refused.
    """
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (2, 3, 4)):
        raise DataError(source, f"expected a 2D label image, got shape {pixels.shape}")
    if num_classes == 2:
        return io.mask_from_pixels(pixels, source).astype(np.int64)
    if pixels.ndim == 3:
        colour = pixels if pixels.shape[2] == 3 else pixels[..., :-1]
        if np.any(colour != colour[..., :1]):
            raise DataError(source, f"a colour label image cannot hold the class indices 0..{num_classes - 1}; "
                            "save each pixel's class index as a grey or palette PNG")
        visible = pixels[..., -1] > 0 if pixels.shape[2] in (2, 4) else True
        pixels = np.where(visible, colour[..., 0], 0)
    labels = pixels.astype(np.int64)
    io.check_label_values(labels, num_classes, source)
    return labels


def read_label_path(path: str | Path, image_shape: tuple[int, ...], num_classes: int, name: str | None = None) -> np.ndarray:
    """A ground-truth file or DSB ``masks/`` folder -> ``(*S)`` int64, checked against the image's shape.

    NIfTI label maps are read as ``unetseg evaluate`` reads them; a folder (or
    zip) of mask PNGs becomes their union, as for DSB2018.
    """
    path = Path(path)
    shown = name or path
    try:
        if path.is_dir():
            labels = read_dsb_mask(path)
            if num_classes != 2:
                raise DataError(shown, f"a folder of binary masks gives 2 classes; the model predicts {num_classes}")
        elif io.file_kind(path) == "nifti":
            labels, _ = io.read_nifti_label(path, num_classes)
        else:
            pixels = io.read_pixels_2d(path, what="label image", palette_indices=True)
            labels = label_from_pixels(pixels, num_classes, shown)
    except DataError as exc:
        raise DataError(shown, _problem(exc, shown)) from None
    if labels.shape != tuple(image_shape):
        raise DataError(shown, f"label shape {labels.shape} does not match the image shape {tuple(image_shape)}")
    return labels


def read_label_upload(
    name: str, data: bytes, image_shape: tuple[int, ...], num_classes: int, max_bytes: int | None = None
) -> np.ndarray:
    """An uploaded ground truth -> ``(*S)`` int64 labels matching ``image_shape``.

    Accepts a NIfTI label map, a mask image (PNG, TIF, ...), or a zip of mask
    PNGs (a DSB2018 ``masks/`` folder), united into one foreground.
    """
    check_bytes(name, data, max_bytes)
    lower = name.lower()
    if lower.endswith(".zip") or is_zip_bytes(data):
        limit = max_bytes if max_bytes is not None else max_upload_bytes()
        with tempfile.TemporaryDirectory(prefix="unetseg-upload-", dir=tempfile.gettempdir()) as tmp:
            _extract_masks(data, name, Path(tmp), limit)
            return read_label_path(tmp, image_shape, num_classes, name=name)
    if lower.endswith(io.NIFTI_SUFFIXES):
        suffix = _nifti_suffix(data)
    elif lower.endswith(io.IMAGE_2D_SUFFIXES):
        suffix = _safe_suffix(name)
    else:
        raise DataError(name, "unsupported label type; upload a NIfTI label map, a mask PNG/TIF, or a zip of mask PNGs")
    with temporary_file(data, suffix) as path:
        return read_label_path(path, image_shape, num_classes, name=name)


def _extract_masks(data: bytes, name: str, folder: Path, limit: int) -> None:
    """Write the PNG members of a zip, flattened and renamed, into ``folder``.

    Refused before anything is written: more than ``MAX_ZIP_MEMBERS`` files,
    or PNGs unpacking to more than ``limit`` bytes. An encrypted, corrupt or
    unreadably compressed member is one :class:`DataError` naming it.
    """
    try:
        archive = zipfile.ZipFile(_io.BytesIO(data))
        files = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(name, f"not a readable zip archive ({type(exc).__name__}); check the file is complete") from None
    with archive:
        if len(files) > MAX_ZIP_MEMBERS:
            raise DataError(name, f"zip holds {len(files)} files; the limit is {MAX_ZIP_MEMBERS}; "
                            "zip the masks of one image only")
        members = [m for m in files if m.filename.lower().endswith(".png")]
        if sum(m.file_size for m in members) > limit:
            raise DataError(name, f"zip unpacks to more than the {limit / 1e6:g} MB limit")
        for i, member in enumerate(members):
            (folder / f"mask_{i:05d}.png").write_bytes(read_zip_member(archive, member, name))
    if not members:
        raise DataError(name, "zip holds no mask PNGs; zip a DSB masks/ folder or upload one mask image")


def prediction_download(labels: np.ndarray, meta: io.ImageMeta, num_classes: int) -> tuple[str, bytes, str]:
    """The predicted label map as a file in memory: ``(file name, bytes, MIME type)``.

    Volumes become NIfTI with the source's affine and header; 2D images a PNG
    mask encoded for a model of ``num_classes`` classes (both by
    :func:`unetseg.outputs.write_prediction`, as ``unetseg predict`` writes them).
    """
    from unetseg.outputs import write_prediction

    with tempfile.TemporaryDirectory(prefix="unetseg-download-", dir=tempfile.gettempdir()) as tmp:
        path = write_prediction(labels, meta, tmp, num_classes)
        data = path.read_bytes()
    if path.name.endswith(".nii.gz"):
        return f"{path.name[: -len('.nii.gz')]}_prediction.nii.gz", data, "application/gzip"
    return f"{path.stem}_prediction.png", data, "image/png"


def list_samples(root: str | Path | None) -> dict[str, list[CaseRef]]:
    """Labelled sample cases under a data root, per data set (``hippocampus``, ``dsb2018``) that is there."""
    found: dict[str, list[CaseRef]] = {}
    for name in PUBLIC_DATASETS:
        try:
            refs, _ = list_cases(dataset_info(name), root)
        except UnetsegError:
            continue
        if refs:
            found[name] = refs
    return found


def read_sample(ref: CaseRef) -> tuple[str, bytes]:
    """A sample case's image file as ``(name, bytes)``, to go the same way as an upload."""
    return ref.image.name, ref.image.read_bytes()

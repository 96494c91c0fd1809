"""DICOM reader: one file, a folder or a zip of one series -> a volume and its affine.

The viewer (:mod:`unetseg.uploads`: a file's bytes or a zip) and ``unetseg
predict`` (:func:`read_dicom`: a file or a series folder) both stack slices
with :func:`volume_from_datasets`, so the same checks hold for both.

Same contract as the readers in :mod:`unetseg.data.io`: ``(1, X, Y, Z)``
float32 (rescale slope and intercept applied) and an :class:`ImageMeta`
whose affine maps voxels to RAS+ millimetres, as NIfTI does, so a
prediction saves as NIfTI aligned with the scan. The meta's ``kind`` is
``"nifti"`` ("a volume saved as NIfTI"); its ``header`` is None.

Voxel order: ``X`` runs along a DICOM row (increasing column index), ``Y``
down the columns (increasing row index), ``Z`` through the slices sorted by
their position along the slice normal (nibabel and dcm2niix use the same
convention before any reorientation).
"""

from __future__ import annotations

import io as _io
import lzma
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unetseg.data.io import (
    MAX_PIXELS_ENV,
    ImageMeta,
    check_geometry,
    check_pixel_budget,
    max_pixels,
)
from unetseg.data.preprocess import refuse_mostly_non_finite
from unetseg.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_ZIP_MEMBERS = 5000
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
# A deflated DICOM may inflate to at most this many bytes per pixel of the budget (16-bit pixels plus headers).
INFLATED_BYTES_PER_PIXEL = 4
DEFLATE_PIECE_BYTES = 1024
AES_METHOD = 99  # WinZip AES encryption, stored as a compression method Python's zipfile cannot read


def _check_inflated_size(data: bytes, source: str | Path) -> None:
    """Refuse a deflated-transfer-syntax file that inflates past the budget, before pydicom inflates it.

    The body is inflated 1 KB of input at a time and the output counted and thrown
    away, so the check itself never holds more than about 1 MB.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = _io.BytesIO(data)
    try:
        read_preamble(stream, True)
        syntax = str(_read_file_meta_info(stream).get("TransferSyntaxUID", ""))
    except Exception:  # not DICOM or a broken header: dcmread reports it with the usual message
        return
    if syntax != DEFLATED_SYNTAX:
        return
    limit = INFLATED_BYTES_PER_PIXEL * max_pixels()
    body = stream.read()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        # Bounded input pieces, not max_length: the loop ends with the input whatever zlib build runs it,
        # and deflate's ratio (at most ~1032:1) keeps each piece's output near 1 MB.
        for start in range(0, len(body), DEFLATE_PIECE_BYTES):
            total += len(inflater.decompress(body[start:start + DEFLATE_PIECE_BYTES]))
            if total > limit or inflater.eof:
                break
    except zlib.error:
        raise DataError(source, "deflated DICOM data is corrupt; check the file is complete") from None
    if total > limit:
        raise DataError(
            source, f"deflated DICOM inflates to over {limit / 1e6:.0f} MB ({INFLATED_BYTES_PER_PIXEL} bytes per pixel of "
            f"the {max_pixels():,} pixel budget); export it uncompressed, or raise ${MAX_PIXELS_ENV} or --max-pixels"
        )


def _number(ds, keyword: str, default: float, source: str | Path) -> float:
    """The numeric tag ``keyword`` of ``ds`` (``default`` when absent or empty), else one :class:`DataError` naming it."""
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):  # text such as 'abcdef', or several values where one belongs
        raise DataError(source, f"DICOM tag {keyword} holds {str(value)[:40]!r}, not a number; fix the tag or "
                        "re-export the file") from None


def _check_declared_pixels(datasets: Sequence, source: str | Path) -> None:
    """Rows x columns x frames of every dataset, from the header, against the pixel budget, and the pixel data's
    length against that header (both before any decoding)."""
    rows = cols = frames = 0
    for ds in datasets:
        try:
            r, c = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise DataError(source, "DICOM image has no valid Rows/Columns; check the file is complete") from None
        n = int(_number(ds, "NumberOfFrames", 1, source) or 1)
        rows, cols, frames = max(rows, r), max(cols, c), frames + n
    check_pixel_budget(source, (frames, rows, cols), "DICOM series" if len(datasets) > 1 else "DICOM image")
    for ds in datasets:
        _check_pixel_data_length(ds, source)


def _check_pixel_data_length(ds, source: str | Path) -> None:
    """Refuse uncompressed pixel data longer than the header declares (Rows x Columns x frames x samples x bits,
    plus the byte that pads it to an even length): a 64 x 64 one-frame 1-bit header over 20 MB of data would
    otherwise decode to 39,062 frames, past the pixel budget checked from the header."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        encapsulated = syntax is None or syntax.is_encapsulated
    except ValueError:  # not a transfer syntax pydicom knows: decoding reports it
        return
    if encapsulated or "PixelData" not in ds:
        return  # compressed frames are decoded one by one, never past NumberOfFrames (allow_excess_frames=False)
    bits = 1.0
    for keyword, default in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1),
                             ("BitsAllocated", 16)):
        bits *= _number(ds, keyword, default, source) or default
    declared = -(-int(bits) // 8)
    actual = len(ds.PixelData or b"")
    if actual > declared + declared % 2:
        raise DataError(
            source, f"DICOM pixel data holds {actual:,} bytes, more than the {declared:,} its header declares (Rows x "
            "Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated); fix those tags or re-export the file"
        )


def is_dicom_bytes(data: bytes) -> bool:
    """True when ``data`` starts with a DICOM preamble (``DICM`` at byte 128)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_zip_bytes(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def _is_zip_file(path: Path) -> bool:
    """True when the file ``path`` starts like a zip archive."""
    with path.open("rb") as f:
        return is_zip_bytes(f.read(4))


def _parse(data: bytes, source: str | Path, strict: bool):
    """A pydicom Dataset from bytes, or None when they are not DICOM image data (and not ``strict``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_inflated_size(data, source)
    try:
        ds = pydicom.dcmread(_io.BytesIO(data), force=not is_dicom_bytes(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if strict:
            raise DataError(source, f"not a readable DICOM file ({type(exc).__name__}); check the file is complete") from None
        return None
    if "PixelData" not in ds:
        if strict:
            raise DataError(source, "DICOM file holds no image (no PixelData); give an image file of the series")
        return None
    return ds


def _pixels(ds, source: str | Path) -> np.ndarray:
    """Rescaled pixels ``(frames, rows, cols)`` float32 of one dataset."""
    samples = int(_number(ds, "SamplesPerPixel", 1, source))
    if samples != 1:
        raise DataError(source, f"colour DICOM ({samples} samples per pixel); this viewer takes grey volumes")
    slope = _number(ds, "RescaleSlope", 1.0, source) or 1.0
    intercept = _number(ds, "RescaleIntercept", 0.0, source)
    try:
        ds.pixel_array_options(allow_excess_frames=False)  # never more frames than NumberOfFrames declares
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as exc:  # truncated data, unsupported compression, missing handlers
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise DataError(
            source, f"cannot decode the DICOM pixel data{hint}: {type(exc).__name__}; the file may be truncated, "
            "or compressed - export it uncompressed"
        ) from None
    with np.errstate(over="ignore", invalid="ignore"):  # a RescaleSlope of 3e38 overflows: refused after stacking
        pixels = pixels * slope + intercept
    return pixels[None] if pixels.ndim == 2 else pixels


def _floats(value, count: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (count,) else None


def _geometry(ds) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Orientation (6,), position (3,) and pixel spacing (row, col) of a single-frame dataset."""
    iop = _floats(getattr(ds, "ImageOrientationPatient", None), 6)
    ipp = _floats(getattr(ds, "ImagePositionPatient", None), 3)
    spacing = _floats(getattr(ds, "PixelSpacing", None), 2)
    return iop, ipp, spacing if spacing is not None else np.ones(2)


def _affine(iop: np.ndarray | None, origin: np.ndarray, pixel_spacing: np.ndarray, step: np.ndarray) -> np.ndarray:
    """RAS+ affine from DICOM (LPS) geometry; ``step`` is the vector between consecutive slices."""
    row_cos, col_cos = (iop[:3], iop[3:]) if iop is not None else (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]  # along a row: column index grows, spaced by the column spacing
    lps[:3, 1] = col_cos * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _slice_thickness(ds) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(getattr(ds, key))
        except (AttributeError, TypeError, ValueError):
            continue
        if value > 0:
            return value
    return 1.0


def _normal(iop: np.ndarray | None) -> np.ndarray:
    return np.cross(iop[:3], iop[3:]) if iop is not None else np.array([0.0, 0.0, 1.0])


def _multiframe_geometry(ds, frames: int):
    """Orientation, per-frame positions (sorted along the slice normal), pixel spacing and the frames' order (the
    stored index of each sorted frame) of an enhanced multi-frame file, or None when it does not say."""
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        iop = _floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient, 6)
        spacing = _floats(shared.PixelMeasuresSequence[0].PixelSpacing, 2)
        positions = np.array(
            [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in ds.PerFrameFunctionalGroupsSequence]
        )
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None
    if iop is None or spacing is None or positions.shape != (frames, 3):
        return None
    order = np.argsort(positions @ _normal(iop), kind="stable")
    return iop, positions[order], spacing, order


def frame_order(ds) -> np.ndarray:
    """The stored index of each of a DICOM file's frames along its volume's ``Z`` axis (see
    :func:`volume_from_datasets`): sorted by position for an enhanced multi-frame file, else as stored."""
    frames = int(_number(ds, "NumberOfFrames", 1, "DICOM file") or 1)
    geometry = _multiframe_geometry(ds, frames) if frames > 1 else None
    return geometry[3] if geometry is not None else np.arange(frames)


def volume_from_datasets(datasets: Sequence, source: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Stack DICOM datasets of one series into ``(1, X, Y, Z)`` float32 with a RAS+ affine.

    A single dataset may be multi-frame (its frames are the slices). Several
    datasets must be single-frame slices of one series with one size and
    orientation and distinct positions.
    """
    if not datasets:
        raise DataError(source, "no DICOM images found")
    _check_declared_pixels(datasets, source)
    if len(datasets) == 1:
        ds = datasets[0]
        pixels = _pixels(ds, source)  # (frames, rows, cols)
        frames = pixels.shape[0]
        geometry = _multiframe_geometry(ds, frames) if frames > 1 else None
        if geometry is not None:
            iop, positions, pixel_spacing, order = geometry
            pixels = pixels[order]
            step = (positions[-1] - positions[0]) / (frames - 1)
            origin = positions[0]
        else:
            iop, ipp, pixel_spacing = _geometry(ds)
            step = _normal(iop) * _slice_thickness(ds)
            origin = ipp if ipp is not None else np.zeros(3)
        slices = pixels
    else:
        datasets, positions = order_slices(datasets, source)
        iop, _, pixel_spacing = _geometry(datasets[0])
        stack = [_pixels(ds, source) for ds in datasets]
        shapes = {s.shape for s in stack}
        if len(shapes) != 1 or next(iter(shapes))[0] != 1:
            raise DataError(source, f"slices differ in size or are multi-frame ({sorted(shapes)}); give one "
                            "series of single-frame slices")
        slices = np.concatenate(stack)
        if positions is not None:
            gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
            if np.any(gaps < 1e-4):
                raise DataError(source, "two slices share one position; the files hold more than one series, or "
                                "duplicates")
            if gaps.max() > 1.1 * gaps.min():
                raise DataError(
                    source, f"slices are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm); missing slices?"
                )
            step = (positions[-1] - positions[0]) / (len(positions) - 1)
            origin = positions[0]
        else:
            step = _normal(iop) * _slice_thickness(datasets[0])
            origin = np.zeros(3)
    refuse_mostly_non_finite(slices, source)  # e.g. a RescaleSlope of 3e38: every pixel infinite
    volume = np.ascontiguousarray(np.transpose(slices, (2, 1, 0)))  # (frames, rows, cols) -> (X=cols, Y=rows, Z)
    affine = _affine(iop, origin, pixel_spacing, step)
    spacing = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))
    check_geometry(source, affine, spacing, "ImageOrientationPatient with ImagePositionPatient (the affine)",
                   "PixelSpacing and slice spacing", "fix those tags or re-export the series")
    return volume[None].astype(np.float32), ImageMeta(path=Path(source), kind="nifti", affine=affine, spacing=spacing,
                                                        source_format="dicom")


def order_slices(datasets: Sequence, source: str | Path) -> tuple[list, np.ndarray | None]:
    """Single-frame slices of one series in volume order (the ``Z`` axis of :func:`volume_from_datasets`): by
    position along the slice normal, else by InstanceNumber; also their positions (None without them)."""
    _check_one_series(datasets, source)
    geometries = [_geometry(ds) for ds in datasets]
    if any(g[1] is None for g in geometries):
        numbers = [_instance_number(ds, i, source) for i, ds in enumerate(datasets)]
        order = np.argsort(numbers, kind="stable")
        positions = None
    else:
        positions = np.array([g[1] for g in geometries])
        order = np.argsort(positions @ _normal(geometries[0][0]), kind="stable")
        positions = positions[order]
    return [datasets[i] for i in order], positions


def _instance_number(ds, index: int, source: str | Path) -> float:
    """The InstanceNumber that orders a slice without ImagePositionPatient (its place in the input when absent)."""
    try:
        return _number(ds, "InstanceNumber", index, source)
    except DataError:
        raise DataError(
            source, f"slice {index + 1} has no ImagePositionPatient and its InstanceNumber "
            f"{str(ds.InstanceNumber)[:40]!r} is not a number, so the slice order is unknown; fix those tags or "
            "re-export the series"
        ) from None


def _check_one_series(datasets: Sequence, source: str | Path) -> None:
    series = {str(getattr(ds, "SeriesInstanceUID", "")): getattr(ds, "SeriesNumber", None) for ds in datasets}
    if len(series) > 1:
        numbers = ", ".join(sorted({str(n) for n in series.values() if n not in (None, "")}))
        raise DataError(source, f"holds {len(series)} DICOM series{f' (SeriesNumber {numbers})' if numbers else ''}; "
                        "give the files of one series only (a zip or a folder per series)")
    orientations = {tuple(np.round(_geometry(ds)[0], 4)) for ds in datasets if _geometry(ds)[0] is not None}
    if len(orientations) > 1:
        raise DataError(source, "slices have different orientations; give one series only (a zip or a folder per "
                        "series)")


def datasets_from_zip(data: bytes, source: str | Path, max_bytes: int | None = None) -> list:
    """The DICOM image datasets in a zip (other members - DICOMDIR, notes - are skipped)."""
    try:
        archive = zipfile.ZipFile(_io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(source, f"not a readable zip archive ({type(exc).__name__}); check the file is complete") from None
    if len(members) > MAX_ZIP_MEMBERS:
        raise DataError(source, f"zip holds {len(members)} files; the limit is {MAX_ZIP_MEMBERS}")
    total = sum(m.file_size for m in members)
    if max_bytes is not None and total > max_bytes:
        raise DataError(source, f"zip unpacks to {total / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit")
    datasets = []
    with archive:
        for member in members:
            ds = _parse(read_zip_member(archive, member, source), f"{source}:{member.filename}", strict=False)
            if ds is not None:
                datasets.append(ds)
    if not datasets:
        raise DataError(source, "zip holds no DICOM images; zip the .dcm files of one series")
    return datasets


def read_zip_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, source: str | Path) -> bytes:
    """The bytes of one zip member, or one :class:`DataError` naming it: encrypted (zipfile raises RuntimeError),
    compressed by a method zipfile cannot read (NotImplementedError: AES, ...), or corrupt."""
    if member.flag_bits & 0x1 or member.compress_type == AES_METHOD:
        how = " (AES)" if member.compress_type == AES_METHOD else ""
        raise DataError(source, f"zip member {member.filename} is encrypted{how}; zip the files without a password")
    try:
        return archive.read(member)
    except NotImplementedError:
        raise DataError(source, f"zip member {member.filename} is compressed with method {member.compress_type}, which "
                        "cannot be read; zip the files with standard (deflate) compression") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(source, f"zip member {member.filename} is corrupt ({type(exc).__name__}); check the file "
                        "is complete") from None


def read_dicom_bytes(data: bytes, source: str | Path = "upload.dcm", max_bytes: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    """A single DICOM file's bytes, or a zip of one series -> ``(1, X, Y, Z)`` and meta."""
    if not data:
        raise DataError(source, "file is empty")
    if is_zip_bytes(data):
        return volume_from_datasets(datasets_from_zip(data, source, max_bytes), source)
    return volume_from_datasets([_parse(data, source, strict=True)], source)


def is_dicom_file(path: Path) -> bool:
    """True for a file named ``*.dcm``, ``*.dicom`` or ``*.ima``, or starting with the DICOM preamble."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return path.is_file()
    try:
        with path.open("rb") as f:
            return is_dicom_bytes(f.read(132))
    except OSError:  # a folder, a broken link, no permission
        return False


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (:func:`is_dicom_file`; subfolders are not searched), sorted."""
    return sorted(f for f in Path(folder).iterdir() if is_dicom_file(f))


def _check_file_bytes(files: Sequence[Path], source: str | Path) -> None:
    """Refuse files larger in all than the pixel budget can fill (:data:`INFLATED_BYTES_PER_PIXEL` bytes a pixel),
    before reading any: a folder or file that large would be held in memory before its headers are checked."""
    total = sum(f.stat().st_size for f in files)
    limit = INFLATED_BYTES_PER_PIXEL * max_pixels()
    if total > limit:
        raise DataError(
            source, f"holds {total:,} bytes of DICOM files, over the {limit:,} that the "
            f"{max_pixels():,} pixel budget allows ({INFLATED_BYTES_PER_PIXEL} bytes per pixel); give one series, or "
            f"raise ${MAX_PIXELS_ENV} or --max-pixels"
        )


def _series_files(path: Path) -> list[Path]:
    """The files of the DICOM input ``path``: a folder's DICOM files, or the file itself; checked by size."""
    if path.is_dir():
        files = dicom_files(path)
        if not files:
            raise DataError(path, "no DICOM files (*.dcm, *.dicom, *.ima, or starting with the DICOM preamble) directly "
                            "in this folder; give a folder holding the files of one series")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(path, "file not found")
    _check_file_bytes(files, path)
    return files


def read_dicom(path: str | Path, max_bytes: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read a DICOM file (one slice or a multi-frame volume), a zip of one series, or a folder holding one series.

    A folder's DICOM files are those of :func:`dicom_files`; others (notes, ``DICOMDIR`` without pixels) are
    skipped. Files larger in all than the pixel budget allows are refused before they are read, and a zip that
    unpacks to more than ``max_bytes`` (default: what the pixel budget allows, :data:`INFLATED_BYTES_PER_PIXEL`
    bytes a pixel) before it is unpacked.
    """
    path = Path(path)
    files = _series_files(path)
    if path.is_dir():
        parsed = (_parse(f.read_bytes(), f, strict=False) for f in files)
        return volume_from_datasets([ds for ds in parsed if ds is not None], path)
    return read_dicom_bytes(path.read_bytes(), path, _zip_budget(max_bytes))


def _zip_budget(max_bytes: int | None) -> int:
    """What a zip may unpack to: ``max_bytes``, or by default what the pixel budget allows."""
    return INFLATED_BYTES_PER_PIXEL * max_pixels() if max_bytes is None else max_bytes


def series_headers(path: str | Path) -> list:
    """The headers of the DICOM file, series folder or zip ``path`` read by :func:`read_dicom` (no pixel data,
    except from a zip), in the order of its volume's slices: what a DICOM-SEG of its prediction references."""
    import pydicom

    path = Path(path)
    files = _series_files(path)
    if path.is_file() and _is_zip_file(path):
        headers = [ds for ds in datasets_from_zip(path.read_bytes(), path, _zip_budget(None)) if "Rows" in ds]
        return headers if len(headers) == 1 else order_slices(headers, path)[0]
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - read_dicom skipped it (a folder) or refused it (a file) the same way
            continue
        if "Rows" in ds:
            headers.append(ds)
    if len(headers) == 1:
        return headers
    return order_slices(headers, path)[0]

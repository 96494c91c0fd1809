"""unetseg.data.dicom: series written with pydicom read back into a volume with the right affine."""

from __future__ import annotations

import io as pyio
import zipfile

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from unetseg import uploads
from unetseg.data.dicom import read_dicom, read_dicom_bytes
from unetseg.errors import DataError

ROWS, COLS, SLICES = 5, 7, 4
PIXEL_SPACING = (0.8, 0.6)  # (between rows, between columns) in mm
STEP = 2.5


def dicom_bytes(pixels, position, orientation=(1, 0, 0, 0, 1, 0), series="1.2.826.0.1.3680043.8.498.1", slope=2.0,
                intercept=-100.0, instance=1, samples=1, preamble=True, pixel_spacing=PIXEL_SPACING,
                thickness=STEP) -> bytes:
    """One MR slice as DICOM Part 10 bytes (uncompressed, explicit VR little endian); ``pixel_spacing`` is
    (between rows, between columns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series, "MR", instance
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = "1.2.826.0.1.3680043.8.498.2", "P001", "Test^Patient"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = thickness
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    buf = pyio.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


def oblique_orientation() -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines rotated 30 degrees about x and 20 about z."""
    a, b = np.radians(30), np.radians(20)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    r = rz @ rx
    return r[:, 0], r[:, 1]


@pytest.fixture
def series():
    """Slices of an oblique series (in shuffled order) with the raw pixels and geometry that made them."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 1000, (SLICES, ROWS, COLS))
    row_cos, col_cos = oblique_orientation()
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-40.0, 12.5, 7.0])
    positions = [origin + k * STEP * normal for k in range(SLICES)]
    files = {f"IM{k:04d}.dcm": dicom_bytes(raw[k], positions[k], (*row_cos, *col_cos), instance=k + 1) for k in range(SLICES)}
    return raw, row_cos, col_cos, positions, files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = pyio.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def test_zip_of_a_shuffled_oblique_series_gives_the_volume_and_the_dicom_geometry(series):
    raw, row_cos, col_cos, positions, files = series
    names = list(files)
    shuffled = {names[k]: files[names[k]] for k in (2, 0, 3, 1)}
    shuffled["DICOMDIR"] = b"not an image"
    volume, meta = read_dicom_bytes(zip_bytes(shuffled), "series.zip")
    assert volume.shape == (1, COLS, ROWS, SLICES) and volume.dtype == np.float32
    # voxel (i, j, k) = column i, row j of slice k, rescaled
    assert np.array_equal(volume[0], np.transpose(raw * 2.0 - 100.0, (2, 1, 0)))
    # DICOM PS3.3 C.7.6.2.1.1: world (LPS) = IPP_k + i * row_cos * col_spacing + j * col_cos * row_spacing
    for i, j, k in [(0, 0, 0), (6, 4, 3), (3, 1, 2)]:
        lps = positions[k] + i * row_cos * PIXEL_SPACING[1] + j * col_cos * PIXEL_SPACING[0]
        ras = meta.affine @ np.array([i, j, k, 1.0])
        assert ras[:3] == pytest.approx(lps * np.array([-1, -1, 1]), abs=1e-6)
    assert meta.spacing == pytest.approx((0.6, 0.8, STEP))
    assert meta.kind == "nifti" and meta.header is None


def test_folder_of_slices_reads_like_the_zip(series, tmp_path):
    raw, *_, files = series
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("ignored")
    volume, meta = read_dicom(tmp_path)
    zipped, zmeta = read_dicom_bytes(zip_bytes(files), "s.zip")
    assert np.array_equal(volume, zipped) and np.allclose(meta.affine, zmeta.affine)


def test_single_file_without_preamble_or_suffix_is_one_slice(series):
    raw, row_cos, col_cos, positions, _ = series
    data = dicom_bytes(raw[0], positions[0], (*row_cos, *col_cos), preamble=False)
    volume, meta = read_dicom_bytes(data, "IM0001.dcm")
    assert volume.shape == (1, COLS, ROWS, 1)
    assert meta.affine[:3, 2] == pytest.approx(np.cross(row_cos, col_cos) * STEP * np.array([-1, -1, 1]))


def test_dicom_upload_predicts_and_downloads_as_nifti_with_its_affine(series):
    import gzip

    import nibabel as nib

    *_, files = series
    image, meta = uploads.read_upload("series.zip", zip_bytes(files))
    assert meta.path.name == "series.zip"
    labels = (image[0] > 900).astype(np.int64)
    name, data, _ = uploads.prediction_download(labels, meta, num_classes=2)
    saved = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert name == "series_prediction.nii.gz"
    assert np.allclose(saved.affine, meta.affine, atol=1e-5) and np.array_equal(np.asarray(saved.dataobj), labels)


def test_bad_dicom_inputs_raise_clear_errors(series):
    raw, row_cos, col_cos, positions, files = series
    orientation = (*row_cos, *col_cos)
    one = files["IM0000.dcm"]
    other = dicom_bytes(raw[1], positions[1] + 100, orientation, series="1.2.3.4")
    duplicate = dicom_bytes(raw[1], positions[0], orientation)
    gap = {k: v for k, v in files.items() if k != "IM0002.dcm"}
    colour = dicom_bytes(np.zeros((ROWS, COLS, 3)), positions[0], orientation, samples=3)
    cases = [
        ("truncated.dcm", one[: len(one) - 30], "truncated"),
        ("empty.dcm", b"", "empty"),
        ("two.zip", zip_bytes({**files, "X.dcm": other}), "2 DICOM series"),
        ("dup.zip", zip_bytes({"a.dcm": one, "b.dcm": duplicate}), "share one position"),
        ("gap.zip", zip_bytes(gap), "unevenly spaced"),
        ("none.zip", zip_bytes({"readme.txt": b"hello"}), "no DICOM images"),
        ("broken.zip", zip_bytes(files)[:200], "not a readable zip"),
        ("colour.dcm", colour, "colour DICOM"),
    ]
    for name, data, expected in cases:
        with pytest.raises(DataError) as info:
            uploads.read_upload(name, data)
        assert str(info.value).startswith(name) and expected in str(info.value), (name, str(info.value))


def test_zip_unpacking_over_the_limit_is_refused(series):
    *_, files = series
    with pytest.raises(DataError, match="unpacks to"):
        read_dicom_bytes(zip_bytes(files), "s.zip", max_bytes=1000)


def zip_patched(files: dict[str, bytes], flag: int = 0, method: int | None = None) -> bytes:
    """:func:`zip_bytes` (stored members) with ``flag`` OR-ed into each member's general-purpose flags and its
    compression method set to ``method``, in the local headers and the central directory: zipfile cannot write
    encrypted members or methods it does not know, but archives from other tools hold them."""
    import struct

    raw = bytearray(zip_bytes(files))
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = raw.find(signature)
        while start != -1:
            struct.pack_into("<H", raw, start + flag_at, struct.unpack_from("<H", raw, start + flag_at)[0] | flag)
            if method is not None:
                struct.pack_into("<H", raw, start + method_at, method)
            start = raw.find(signature, start + 4)
    return bytes(raw)


ZIP_MEMBER_PROBLEMS = [
    (0x1, None, "zip member IM0000.dcm is encrypted; zip the files without a password"),
    (0, 99, "zip member IM0000.dcm is encrypted (AES); zip the files without a password"),
    (0, 98, ("zip member IM0000.dcm is compressed with method 98, which cannot be read; zip the files with standard "
             "(deflate) compression")),
]


@pytest.mark.parametrize("flag, method, message", ZIP_MEMBER_PROBLEMS, ids=["encrypted", "AES", "PPMd"])
def test_an_encrypted_or_unreadably_compressed_zip_member_is_one_error(series, flag, method, message):
    *_, files = series
    with pytest.raises(DataError) as info:  # RuntimeError and NotImplementedError from zipfile before
        uploads.read_upload("series.zip", zip_patched(files, flag, method))
    assert str(info.value) == f"series.zip: {message}"


def unplaced(data: bytes, instance: int | str) -> bytes:
    """A slice without ImagePositionPatient whose InstanceNumber is ``instance`` (text written over a number)."""
    import pydicom

    ds = pydicom.dcmread(pyio.BytesIO(data))
    del ds.ImagePositionPatient
    ds.InstanceNumber = 987654 if isinstance(instance, str) else instance
    buf = pyio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue().replace(b"987654", instance.ljust(6).encode()) if isinstance(instance, str) else buf.getvalue()


def test_text_in_a_numeric_dicom_tag_is_one_error_naming_the_tag(series):
    raw, _, _, positions, files = series
    slope = dicom_bytes(raw[0], positions[0], slope=7.7777).replace(b"7.7777", b"abcdef")
    with pytest.raises(DataError) as info:  # a ValueError from float() before
        uploads.read_upload("slope.dcm", slope)
    assert str(info.value) == "slope.dcm: DICOM tag RescaleSlope holds 'abcdef', not a number; fix the tag or re-export the file"
    # without positions the slices are stacked by InstanceNumber
    numbered = {f"IM{k}.dcm": unplaced(files[f"IM{k:04d}.dcm"], number) for k, number in ((2, 30), (0, 10), (1, 20))}
    volume, _ = read_dicom_bytes(zip_bytes(numbered), "numbered.zip")
    assert np.array_equal(volume[0], np.transpose(raw[:3] * 2.0 - 100.0, (2, 1, 0)))
    numbered["IM1.dcm"] = unplaced(files["IM0001.dcm"], "abc")
    with pytest.raises(DataError) as info:
        read_dicom_bytes(zip_bytes(numbered), "text.zip")
    assert str(info.value) == ("text.zip: slice 3 has no ImagePositionPatient and its InstanceNumber 'abc' is not a "
                               "number, so the slice order is unknown; fix those tags or re-export the series")


def test_a_rescale_slope_that_makes_every_pixel_infinite_is_refused(series):
    raw, *_ = series
    data = dicom_bytes(raw[0] + 2, (0, 0, 0), slope=3e38)  # 2 x 3e38 is past float32: inf
    with pytest.raises(DataError, match=f"huge.dcm: {ROWS * COLS} of {ROWS * COLS} values are NaN or infinite, more "
                       "than half, too many to fill in; check its intensity scaling"):
        uploads.read_upload("huge.dcm", data)


def test_compressed_frames_beyond_number_of_frames_are_not_decoded():
    """pydicom decodes every encoded frame by default (allow_excess_frames): only the declared ones are read."""
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(pyio.BytesIO(dicom_bytes(np.zeros((64, 64)), (0, 0, 0), slope=1.0, intercept=0.0)))
    ds.NumberOfFrames = 3
    ds.PixelData = np.arange(3 * 64 * 64, dtype=np.uint16).tobytes()
    ds.compress(RLELossless)
    ds.NumberOfFrames = 1  # the header declares one of the three encoded frames
    buf = pyio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    image, _ = read_dicom_bytes(buf.getvalue(), "rle.dcm")
    assert image.shape == (1, 64, 64, 1)
    assert np.array_equal(image[0, :, :, 0], np.arange(64 * 64).reshape(64, 64).T)

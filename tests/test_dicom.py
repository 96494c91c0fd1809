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
                intercept=-100.0, instance=1, samples=1, preamble=True) -> bytes:
    """One MR slice as DICOM Part 10 bytes (uncompressed, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series, "MR", instance
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = STEP
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

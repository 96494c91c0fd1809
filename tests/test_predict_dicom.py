"""``unetseg predict`` on DICOM: a real hippocampus volume written out as a DICOM series (pydicom), as one
multi-frame file and as one slice, predicted like its NIfTI; the DICOM-SEG read back with highdicom."""

from __future__ import annotations

import io as pyio
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage

from tests.test_dicom import dicom_bytes
from unetseg.cli import collect_inputs, main
from unetseg.data.dicom import read_dicom
from unetseg.errors import UnetsegError
from unetseg.outputs import check_prediction_paths, dicom_seg_path, prediction_path

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES = "1.2.826.0.1.3680043.8.498.10"


def series_files(volume: np.ndarray, affine: np.ndarray, series: str = SERIES) -> dict[str, bytes]:
    """The ``(X, Y, Z)`` integer ``volume`` as single-frame slices whose geometry is ``affine`` (RAS+, NIfTI's):
    slice ``k`` holds ``volume[:, :, k]`` with X along its rows (DICOM PS3.3 C.7.6.2)."""
    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    orientation = (*(lps[:3, 0] / spacing[0]), *(lps[:3, 1] / spacing[1]))
    return {f"IM{k:04d}.dcm": dicom_bytes(volume[:, :, k].T, lps[:3, 3] + k * lps[:3, 2], orientation, series=series,
                                          slope=1.0, intercept=0.0, instance=k + 1,
                                          pixel_spacing=(spacing[1], spacing[0]), thickness=spacing[2])
            for k in range(volume.shape[2])}


def write_series(folder: Path, files: dict[str, bytes], order=None) -> Path:
    folder.mkdir(parents=True)
    names = list(files)
    for name in (names if order is None else [names[i] for i in order]):
        (folder / name).write_bytes(files[name])
    return folder


def multiframe_bytes(files: dict[str, bytes], stored_order) -> bytes:
    """The slices as one enhanced multi-frame file, frames stored in ``stored_order``, each placed by its
    PlanePositionSequence (the reader sorts them along the slice normal)."""
    slices = [pydicom.dcmread(pyio.BytesIO(files[name])) for name in files]
    ds = pydicom.dcmread(pyio.BytesIO(next(iter(files.values()))))
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        del ds[keyword]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = slices[0].ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = slices[0].PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = slices[0].SliceThickness
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for k in stored_order:
        frame = Dataset()
        frame.PlanePositionSequence = [Dataset()]
        frame.PlanePositionSequence[0].ImagePositionPatient = slices[k].ImagePositionPatient
        ds.PerFrameFunctionalGroupsSequence.append(frame)
    ds.PixelData = b"".join(slices[k].PixelData for k in stored_order)
    buf = pyio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def case(data_root) -> tuple[Path, np.ndarray, np.ndarray]:
    """A real hippocampus image: its path, voxels (uint8 values as stored) and affine."""
    path = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    image = nib.load(str(path))
    return path, np.asarray(image.dataobj), image.affine


def labels_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_a_dicom_series_folder_a_multiframe_file_and_a_slice_predict_like_the_nifti(case, tmp_path):
    path, volume, affine = case
    files = series_files(volume, affine)
    write_series(tmp_path / "1.2.840.99", files, order=np.random.default_rng(0).permutation(len(files)))
    (tmp_path / "1.2.840.99" / "notes.txt").write_text("not DICOM: skipped")
    (tmp_path / "mf").mkdir()
    (tmp_path / "mf" / "volume.dcm").write_bytes(multiframe_bytes(files, stored_order=range(len(files))[::-1]))
    (tmp_path / "slice.DCM").write_bytes(files["IM0010.dcm"])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(path), str(tmp_path / "1.2.840.99"),
                 str(tmp_path / "mf" / "volume.dcm"), str(tmp_path / "slice.DCM"), "--out", str(out), "--quiet"]) == 0
    expected, expected_affine = labels_of(out / "hippocampus_001.nii.gz")
    assert {1, 2} <= set(np.unique(expected))  # both hippocampus classes found, so the comparison means something
    for name in ("1.2.840.99.nii.gz", "volume.nii.gz"):  # the folder's whole name; the file's without .dcm
        labels, labels_affine = labels_of(out / name)
        assert np.array_equal(labels, expected), name  # same voxels in the same order: same orientation
        assert np.allclose(labels_affine, expected_affine, atol=1e-5), name
    one, one_affine = labels_of(out / "slice.nii.gz")  # a single slice is a one-slice volume at its place
    assert one.shape == (*volume.shape[:2], 1)
    assert np.allclose(one_affine[:3, 3], (expected_affine @ [0, 0, 10, 1])[:3], atol=1e-5)
    assert (out / "labels_itksnap.txt").is_file()


@pytest.mark.parametrize("flip", [False, True], ids=["right-handed", "left-handed"])
def test_an_oblique_series_reads_back_to_the_same_voxels_in_the_same_place(case, tmp_path, flip):
    _, volume, _ = case
    a, b = np.radians(25), np.radians(-40)
    rotation = (np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
                @ np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]]))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 1.1, -2.5 if flip else 2.5])
    affine[:3, 3] = (-30.0, 12.0, 40.0)
    image, meta = read_dicom(write_series(tmp_path / "s", series_files(volume, affine)))
    assert (meta.kind, meta.file_format) == ("nifti", "dicom")  # a volume (written as NIfTI), read from DICOM
    if flip:  # slices are stacked along their normal: the volume comes back mirrored in Z, the affine with it
        assert np.array_equal(image[0], volume[:, :, ::-1])
        assert np.allclose(meta.affine @ [0, 0, volume.shape[2] - 1, 1], affine[:, 3], atol=1e-6)
    else:
        assert np.array_equal(image[0], volume) and np.allclose(meta.affine, affine, atol=1e-6)
    ras = nib.as_closest_canonical(nib.Nifti1Image(image[0], meta.affine))
    expected = nib.as_closest_canonical(nib.Nifti1Image(volume.astype(np.float32), affine))
    assert np.array_equal(ras.get_fdata(), expected.get_fdata()) and np.allclose(ras.affine, expected.affine, atol=1e-6)


def test_dicom_seg_references_the_series_and_holds_the_predicted_labels(case, tmp_path):
    import highdicom as hd  # the dicom-seg extra is part of the test extra
    path, volume, affine = case
    files = series_files(volume, affine)
    folder = write_series(tmp_path / "series", files)
    (tmp_path / "mf").mkdir()
    stored = np.random.default_rng(1).permutation(len(files))
    (tmp_path / "mf" / "volume.dcm").write_bytes(multiframe_bytes(files, stored_order=stored))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(folder), str(tmp_path / "mf" / "volume.dcm"),
                 "--out", str(out), "--dicom-seg", "--quiet"]) == 0
    labels, _ = labels_of(out / "series.nii.gz")
    seg = hd.seg.segread(out / "series_seg.dcm")
    uids = [pydicom.dcmread(folder / name).SOPInstanceUID for name in files]  # slice k is IM000k
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    assert np.array_equal(frames, np.transpose(labels, (2, 1, 0)))  # (slice, row, column) = (Z, Y, X)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["anterior", "posterior"]
    assert seg.StudyInstanceUID == pydicom.dcmread(folder / "IM0000.dcm").StudyInstanceUID
    assert seg.PatientID == "P001" and seg.SeriesInstanceUID != SERIES and seg.Modality == "SEG"
    # the multi-frame file's SEG frames follow its stored frame order
    mf = hd.seg.segread(out / "volume_seg.dcm")
    source_uid = pydicom.dcmread(tmp_path / "mf" / "volume.dcm").SOPInstanceUID
    frames = mf.get_pixels_by_source_frame(source_sop_instance_uid=source_uid,
                                           source_frame_numbers=list(range(1, len(files) + 1)),
                                           combine_segments=True, skip_overlap_checks=True)
    assert np.array_equal(frames, np.transpose(labels, (2, 1, 0))[stored])


def test_dicom_inputs_keep_every_refusal_and_say_how_to_fix_them(case, tmp_path, capsys, monkeypatch):
    path, volume, affine = case
    files = series_files(volume[:, :, :6], affine)
    good = write_series(tmp_path / "good", files)
    two = write_series(tmp_path / "two", {**files, "X.dcm": series_files(volume[:, :, :1], affine, "1.2.3")["IM0000.dcm"]})
    out = tmp_path / "out"
    # a folder of two series: one line, the batch goes on with the other input
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(two), str(good), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: {two}: holds 2 DICOM series" in err and "a folder per series" in err
    assert (out / "good.nii.gz").is_file() and not (out / "two.nii.gz").exists()
    # the pixel budget and the bytes it allows hold for predict
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(good), "--out", str(tmp_path / "o2"),
                 "--max-pixels", "10000"]) == 2
    assert "over the 10,000 pixel budget" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(good), "--out", str(tmp_path / "o3"),
                 "--max-pixels", "100"]) == 2
    assert "bytes of DICOM files, over the 400 that the 100 pixel budget allows" in capsys.readouterr().err
    # more pixel data than the header declares: refused before decoding, as in the viewer
    excess = pydicom.dcmread(good / "IM0000.dcm")
    excess.PixelData = excess.PixelData * 50
    excess.save_as(tmp_path / "excess.dcm")
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(tmp_path / "excess.dcm"), "--out",
                 str(tmp_path / "o4")]) == 2
    assert "more than the" in capsys.readouterr().err
    # never write into an input series folder; --dicom-seg needs a DICOM input
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(good), "--out", str(good)]) == 2
    assert f"is the DICOM series folder {good.resolve()}, an input" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(path), "--out", str(out), "--dicom-seg"]) == 2
    assert "none is given; leave --dicom-seg out" in capsys.readouterr().err
    # a source a DICOM-SEG cannot reference (no StudyInstanceUID): its NIfTI is written, the SEG is one error
    for f in good.iterdir():
        ds = pydicom.dcmread(f)
        del ds.StudyInstanceUID
        ds.save_as(f)
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(good), "--out", str(tmp_path / "o6"), "--dicom-seg",
                 "--quiet"]) == 2
    assert f"error: {good}: no DICOM-SEG written (AttributeError" in capsys.readouterr().err
    assert (tmp_path / "o6" / "good.nii.gz").is_file() and not (tmp_path / "o6" / "good_seg.dcm").exists()
    monkeypatch.setitem(sys.modules, "highdicom", None)  # not installed: refused before anything is predicted
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(good), "--out", str(tmp_path / "o5"), "--dicom-seg"]) == 2
    assert "pip install 'unetseg[dicom-seg]'" in capsys.readouterr().err and not (tmp_path / "o5").exists()


def test_series_folders_are_one_input_each_and_named_after_the_folder(tmp_path):
    study = tmp_path / "study"
    for name in ("1.2.840.7", "T1"):
        write_series(study / name, {"a": dicom_bytes(np.zeros((4, 4)), (0, 0, 0))})  # no suffix: found by preamble
    (study / "T1" / "scan.nii.gz").write_bytes(b"")
    assert collect_inputs([str(study / "1.2.840.7"), str(study / "T1")]) == [
        study / "1.2.840.7", study / "T1", study / "T1" / "scan.nii.gz"]
    with pytest.raises(UnetsegError, match=r"no NIfTI, DICOM or image files directly in this folder; subfolders are "
                       r"not searched: pass the DICOM series folders themselves, e.g. .*study/\*/"):
        collect_inputs([str(study)])
    out = tmp_path / "out"
    assert prediction_path(study / "1.2.840.7", "dicom", out) == out / "1.2.840.7.nii.gz"
    assert prediction_path(tmp_path / "IM1.dcm", "dicom", out) == out / "IM1.nii.gz"
    assert dicom_seg_path(study / "T1", out) == out / "T1_seg.dcm"
    (tmp_path / "T1.dcm").write_bytes(dicom_bytes(np.zeros((4, 4)), (0, 0, 0)))
    with pytest.raises(UnetsegError, match="would both be written to .*T1.nii.gz"):
        check_prediction_paths([study / "T1", tmp_path / "T1.dcm"], out)


def test_a_zip_of_a_series_predicts_like_its_folder_and_a_zip_bomb_is_refused_before_unpacking(case, tmp_path, capsys):
    path, volume, affine = case
    files = series_files(volume, affine)
    write_series(tmp_path / "T1", files)
    (tmp_path / "scans").mkdir()
    with zipfile.ZipFile(tmp_path / "scans" / "T1.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(f"DICOM/{name}", data)
    assert collect_inputs([str(tmp_path / "scans")]) == [tmp_path / "scans" / "T1.zip"]  # found in a folder too
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(tmp_path / "T1"), "--out", str(out), "--quiet"]) == 0
    expected, expected_affine = labels_of(out / "T1.nii.gz")
    assert {1, 2} <= set(np.unique(expected))
    zipped = tmp_path / "out_zip"
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(tmp_path / "scans"), "--out", str(zipped),
                 "--dicom-seg", "--quiet"]) == 0
    labels, labels_affine = labels_of(zipped / "T1.nii.gz")  # named after the zip, without .zip
    assert np.array_equal(labels, expected) and np.allclose(labels_affine, expected_affine, atol=1e-5)
    import highdicom as hd  # the zip's DICOM-SEG references the zipped slices, as a folder's does
    seg = hd.seg.segread(zipped / "T1_seg.dcm")
    uids = [pydicom.dcmread(tmp_path / "T1" / name).SOPInstanceUID for name in files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    assert np.array_equal(frames, np.transpose(labels, (2, 1, 0)))

    bomb = tmp_path / "bomb.zip"  # 64 MB of zeros deflates to about 64 KB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("IM0001.dcm", bytes(64 * 2**20))
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(bomb), "--out", str(tmp_path / "o"),
                 "--max-pixels", "1000000", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "bomb.zip: zip unpacks to 67.1 MB, over the 4 MB limit" in error and len(error.strip().splitlines()) == 1

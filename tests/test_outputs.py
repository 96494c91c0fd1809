"""What ``unetseg predict`` writes: probability maps and label description files beside the label maps."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unetseg.cli import main
from unetseg.outputs import ITKSNAP_LABELS, SLICER_COLORS, label_descriptions


@pytest.fixture(scope="module")
def volume_path(data_root):
    return sorted((data_root / "Task04_Hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[0]


def test_probabilities_of_a_volume_are_a_4d_nifti_in_the_inputs_space_whose_argmax_is_the_label_map(
    volume_path, tmp_path
):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "hippocampus_3d", str(volume_path), "--out", str(out), "--quiet",
                 "--save-probabilities"]) == 0
    stem = volume_path.name[: -len(".nii.gz")]
    probs = nib.load(out / f"{stem}_probabilities.nii.gz")
    labels = np.asarray(nib.load(out / f"{stem}.nii.gz").dataobj)
    source = nib.load(volume_path)
    values = np.asarray(probs.dataobj)
    assert values.dtype == np.float32 and values.shape == (*source.shape, 3)
    np.testing.assert_allclose(probs.affine, source.affine)
    np.testing.assert_allclose(values.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(values.argmax(axis=-1), labels)
    assert (labels > 0).any()


def test_probabilities_of_a_2d_image_are_an_npz_with_the_class_names(data_root, tmp_path):
    image = sorted((data_root / "dsb2018_stage1_train").glob("*/images/*.png"))[0]
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(image), "--out", str(out), "--quiet",
                 "--save-probabilities"]) == 0
    saved = np.load(out / f"{image.stem}_probabilities.npz")
    mask = np.asarray(Image.open(out / f"{image.stem}.png"))
    assert list(saved["class_names"]) == ["background", "nucleus"]
    assert saved["probabilities"].shape == (2, *mask.shape)
    np.testing.assert_array_equal(saved["probabilities"].argmax(axis=0) == 1, mask > 0)
    assert not (out / ITKSNAP_LABELS).exists()  # label descriptions go with NIfTI label maps only


def test_volume_predictions_come_with_itksnap_and_slicer_label_descriptions(volume_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(volume_path), "--out", str(out), "--quiet"]) == 0
    itksnap = (out / ITKSNAP_LABELS).read_text().splitlines()
    rows = [line.split() for line in itksnap if not line.startswith("#")]
    assert [r[0] for r in rows] == ["0", "1", "2"] and rows[1][-1] == '"anterior"' and rows[2][-1] == '"posterior"'
    assert all(len(r) >= 8 for r in rows)  # IDX R G B A VIS MSH LABEL
    slicer = [line.split() for line in (out / SLICER_COLORS).read_text().splitlines() if not line.startswith("#")]
    assert [r[:2] for r in slicer] == [["0", "background"], ["1", "anterior"], ["2", "posterior"]]
    assert all(len(r) == 6 for r in slicer) and rows[1][1:4] == slicer[1][2:5]  # the same colours in both
    # another volume into the same folder with the same model: the descriptions are already right
    other = tmp_path / "other.nii.gz"
    shutil.copy(volume_path, other)
    assert main(["predict", "--checkpoint", "hippocampus_3d", str(other), "--out", str(out), "--quiet"]) == 0


def test_label_descriptions_of_another_model_are_not_replaced_without_overwrite(volume_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / SLICER_COLORS).write_text(label_descriptions(["background", "tumour"])[SLICER_COLORS])
    assert main(["predict", "--checkpoint", "hippocampus_3d", str(volume_path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "describes other labels" in err and "--overwrite" in err
    assert not list(out.glob("*.nii.gz"))  # refused before anything was predicted
    assert main(["predict", "--checkpoint", "hippocampus_3d", str(volume_path), "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    assert "anterior" in (out / SLICER_COLORS).read_text()


def test_an_existing_probability_map_is_not_overwritten_without_overwrite(volume_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stem = volume_path.name[: -len(".nii.gz")]
    (out / f"{stem}_probabilities.nii.gz").write_bytes(b"earlier")
    assert main(["predict", "--checkpoint", "hippocampus_3d", str(volume_path), "--out", str(out), "--quiet",
                 "--save-probabilities"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / f"{stem}_probabilities.nii.gz").read_bytes() == b"earlier"

"""Ensembles: probabilities averaged over several checkpoints, in the API, ``predict`` and ``evaluate``."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from unetseg.cli import main
from unetseg.data import io
from unetseg.ensemble import Ensemble, load_predictor
from unetseg.errors import UnetsegError
from unetseg.infer import Segmenter


@pytest.fixture(scope="module")
def volume(data_root):
    """One real hippocampus volume ``(X, Y, Z)`` and its path."""
    path = sorted((data_root / "Task04_Hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    image, _ = io.read_image(path)
    return image[0], path


def test_an_ensemble_averages_its_members_probabilities_with_and_without_tta(volume):
    image, _ = volume
    members = [Segmenter.from_checkpoint("hippocampus_3d"), Segmenter.from_checkpoint("hippocampus_2d")]
    ensemble = Ensemble(members, ["hippocampus_3d", "hippocampus_2d"])
    for tta in (True, False):
        expected = np.mean([m.predict_proba(image, tta=tta) for m in members], axis=0)
        got = ensemble.predict_proba(image, tta=tta)
        assert got.shape == (3, *image.shape)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(ensemble.predict(image), expected.argmax(axis=0))  # without TTA, as the loop ends
    # the two models disagree somewhere, so the average is not just one of them
    assert (members[0].predict(image) != members[1].predict(image)).any()
    assert ensemble.spatial_dims == 3 and ensemble.num_classes == 3 and ensemble.dataset == "hippocampus"


def test_one_checkpoint_is_a_plain_segmenter_and_several_an_ensemble():
    assert type(load_predictor(["hippocampus_2d"])) is Segmenter
    assert isinstance(load_predictor(["hippocampus_2d", "hippocampus_2d_noskip"]), Ensemble)


def test_models_that_predict_or_read_differently_cannot_be_averaged():
    with pytest.raises(UnetsegError, match="hippocampus_2d and dsb2018_2d cannot be averaged: they predict different"):
        Ensemble.from_checkpoints(["hippocampus_2d", "dsb2018_2d"])
    first, other = Segmenter.from_checkpoint("hippocampus_2d"), Segmenter.from_checkpoint("hippocampus_2d_noskip")
    other.preprocessing = replace(other.preprocessing, normalization="zscore")
    with pytest.raises(UnetsegError, match="preprocessing differs \\(normalization 'percentile' and 'zscore'\\)"):
        Ensemble([first, other])


def test_predict_with_two_checkpoints_writes_the_ensemble_prediction(volume, tmp_path):
    image, path = volume
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", "hippocampus_3d", "--checkpoint", "hippocampus_2d", str(path),
                 "--out", str(out), "--quiet"])
    assert code == 0
    written, _ = io.read_image(out / path.name)
    expected = Ensemble.from_checkpoints(["hippocampus_3d", "hippocampus_2d"]).predict(image)
    np.testing.assert_array_equal(written[0].astype(np.int64), expected)


def test_evaluate_scores_an_ensemble_under_one_name(tiny_run, data_root, tmp_path):
    single, ensemble = tmp_path / "single", tmp_path / "ensemble"
    assert main(["evaluate", "--checkpoint", str(tiny_run), "--data-root", str(data_root), "--out", str(single),
                 "--quiet"]) == 0
    assert main(["evaluate", "--checkpoint", str(tiny_run), "--checkpoint", str(tiny_run / "best.pt"),
                 "--data-root", str(data_root), "--out", str(ensemble), "--quiet"]) == 0
    one, two = (json.loads((d / "summary.json").read_text()) for d in (single, ensemble))
    assert two["checkpoint"] == f"{tiny_run} + {tiny_run / 'best.pt'}"
    assert two["num_cases"] == one["num_cases"] >= 1
    assert two["mean_dice"] == pytest.approx(one["mean_dice"], abs=1e-6)  # a model averaged with itself is itself


def test_an_ensemble_of_models_validated_on_different_cases_has_no_val_split(tiny_run, data_root, tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(tiny_run), "--checkpoint", "hippocampus_2d",
                 "--data-root", str(data_root), "--out", str(tmp_path / "e"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "validated on different cases" in err and "--split all" in err
    assert not (tmp_path / "e").exists()

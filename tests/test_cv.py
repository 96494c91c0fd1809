"""``unetseg cv``: every fold trained and scored on the cases it held out, resumable, and its folds an ensemble."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from unetseg.cli import main
from unetseg.config import load_config
from unetseg.cv import check_cv_dir
from unetseg.data import io
from unetseg.ensemble import CV_MANIFEST, Ensemble, fold_checkpoints
from unetseg.errors import UnetsegError
from unetseg.infer import load_checkpoint
from unetseg.runlog import dumps

TINY = ["--set", "data.max_cases=8", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=3",
        "--set", "train.batch_size=8", "--set", "train.warmup_steps=1", "--set", "model.channels=[4, 8, 16]"]


@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("cv") / "cv"
    assert main(["cv", "--folds", "2", "--config", "hippocampus_2d", *TINY, "--data-root", str(data_root),
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_every_case_is_scored_once_by_the_fold_that_held_it_out(cv_dir):
    splits = [load_checkpoint(cv_dir / f"fold_{k}" / "best.pt")["split"] for k in range(2)]
    val = [set(s["val"]) for s in splits]
    assert not val[0] & val[1] and len(val[0] | val[1]) == 8
    assert all(not set(s["train"]) & set(s["val"]) for s in splits)
    with (cv_dir / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case_id"] for r in rows) == sorted(val[0] | val[1])
    assert all(r["case_id"] in val[int(r["fold"])] for r in rows)
    summary = json.loads((cv_dir / "summary.json").read_text())
    assert summary["num_cases"] == 8 and summary["out_of_fold"] is True
    fold_dice = [json.loads((cv_dir / f"fold_{k}" / "evaluation" / "summary.json").read_text())["mean_dice"]
                 for k in range(2)]
    assert [f["mean_dice"] for f in summary["folds"]] == pytest.approx(fold_dice)
    assert summary["fold_mean_dice_mean"] == pytest.approx(np.mean(fold_dice))


def test_the_same_command_again_keeps_finished_folds(cv_dir, data_root, capsys):
    before = [(cv_dir / f"fold_{k}" / "last.pt").stat().st_mtime for k in range(2)]
    assert main(["cv", "--folds", "2", "--config", "hippocampus_2d", *TINY, "--data-root", str(data_root),
                 "--out", str(cv_dir), "--quiet"]) == 0
    assert [(cv_dir / f"fold_{k}" / "last.pt").stat().st_mtime for k in range(2)] == before
    assert capsys.readouterr().err.count(": trained (") == 2


def test_a_manifest_written_before_a_config_field_existed_is_continued(tmp_path):
    """A field added later (augment.scale, data.kind_balance) is absent from an older manifest: it counts as its
    default, so the folder is still the same cross-validation; a field the config does not know is not."""
    cfg = load_config("hippocampus_2d")
    stored = json.loads(dumps(dataclasses.asdict(cfg)))
    del stored["augment"]["scale"], stored["data"]["kind_balance"]
    (tmp_path / CV_MANIFEST).write_text(json.dumps({"folds": 2, "config": stored}))
    check_cv_dir(tmp_path, cfg, 2)  # continued, no error
    stored["augment"]["no_such_field"] = 1
    (tmp_path / CV_MANIFEST).write_text(json.dumps({"folds": 2, "config": stored}))
    with pytest.raises(UnetsegError, match="cross-validation of other settings"):
        check_cv_dir(tmp_path, cfg, 2)


def test_other_settings_do_not_continue_a_cross_validation(cv_dir, data_root, capsys):
    assert main(["cv", "--folds", "3", "--config", "hippocampus_2d", *TINY, "--data-root", str(data_root),
                 "--out", str(cv_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cross-validation of other settings" in err


def test_the_folder_predicts_as_the_ensemble_of_its_folds(cv_dir, data_root, tmp_path):
    source = sorted((data_root / "Task04_Hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(cv_dir), str(source), "--out", str(out), "--quiet"]) == 0
    image, _ = io.read_image(source)
    expected = Ensemble.from_checkpoints(fold_checkpoints(cv_dir)).predict(image[0])
    written, _ = io.read_image(out / source.name)
    np.testing.assert_array_equal(written[0].astype(np.int64), expected)


def test_evaluating_the_folds_together_on_their_validation_cases_is_refused(cv_dir, data_root, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(cv_dir), "--data-root", str(data_root),
                 "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "validated on different cases" in capsys.readouterr().err

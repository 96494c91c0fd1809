"""Command line and Python API: evaluate schema, predict keeps NIfTI geometry, clear errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
import warnings

import nibabel as nib
import numpy as np
import pytest
import yaml
from skimage import io as skio

from unetseg.cli import main
from unetseg.data import download as download_mod
from unetseg.data.datasets import dataset_info, list_cases
from unetseg.errors import UnetsegError
from unetseg.infer import Segmenter, keep_largest_component

from .conftest import tiny_config


def first_val_case(run, data_root):
    split = json.loads((run / "split.json").read_text())
    refs, _ = list_cases(dataset_info("hippocampus"), data_root)
    return next(r for r in refs if r.case_id == split["val"][0])


def test_evaluate_output_schema_and_reproduces_training_validation(tiny_run, data_root, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--data-root", str(data_root),
               "--dataset", "hippocampus", "--split", "val", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mean foreground Dice" in printed and "anterior" in printed
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    split = json.loads((tiny_run / "split.json").read_text())
    assert [r["case_id"] for r in rows] == sorted(split["val"])
    assert list(rows[0]) == ["case_id", "dice_anterior", "dice_posterior", "hd95_anterior", "hd95_posterior"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == len(rows) and summary["split"] == "val"
    assert set(summary["classes"]) == {"anterior", "posterior"}
    for c in summary["classes"].values():
        assert {"dice_mean", "dice_std", "hd95_mean", "hd95_std"} <= set(c)
    dice = np.array([[float(r["dice_anterior"]), float(r["dice_posterior"])] for r in rows])
    assert summary["classes"]["anterior"]["dice_mean"] == pytest.approx(np.nanmean(dice[:, 0]))
    # the figure training logged for this checkpoint is reproduced exactly
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["mean_dice"] == pytest.approx(logged["val_mean_dice"], abs=1e-6)


def test_predict_nifti_keeps_shape_affine_and_header(tiny_run, data_root, tmp_path):
    ref = first_val_case(tiny_run, data_root)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(tiny_run), str(ref.image), "--out", str(out), "--tta", "--largest-component"]) == 0
    src = nib.load(str(ref.image))
    pred = nib.load(str(out / ref.image.name))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine)
    assert pred.header.get_zooms() == src.header.get_zooms()
    assert pred.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


@pytest.fixture(scope="module")
def tiny_dsb_run(tmp_path_factory, data_root):
    """A run folder trained for a few steps on 8 real DSB images."""
    from unetseg.train import fit

    cfg = tiny_config(["data.dataset=dsb2018", "data.patch_size=[64, 64]", "model.channels=[4, 8]"])
    return fit(cfg, tmp_path_factory.mktemp("dsb_run"), data_root=data_root, progress=False)


def test_evaluate_scores_on_the_checkpoint_s_own_data_set_by_default(tiny_dsb_run, data_root, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tiny_dsb_run), "--data-root", str(data_root), "--out", str(out),
                 "--quiet"]) == 0
    shown = capsys.readouterr().err
    assert "loading" not in shown and "evaluating" not in shown  # --quiet: no loading or scoring bars
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "dsb2018" and summary["num_cases"] == len(json.loads((tiny_dsb_run / "split.json").read_text())["val"])
    assert main(["evaluate", "--checkpoint", str(tiny_dsb_run), "--dataset", "hippocampus", "--out", str(tmp_path / "eval2")]) == 2
    assert "predicts ['background', 'nucleus'] but hippocampus has" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("train.lr=-1", "train.lr=-1 must be greater than 0"),
    ("data.max_cases=abc", "data.max_cases='abc' is not of type int | None"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch=0 must be greater than 0"),
    ("model.skips=[true,false,true,true]", "model.skips needs one flag per decoder level (3, finest first), got 4"),
])
def test_bad_settings_are_one_line_errors_before_training(setting, message, tmp_path, capsys):
    assert main(["train", "--set", setting, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_resume_refuses_settings_it_would_ignore(tiny_run, capsys):
    before = (tiny_run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(tiny_run), "--epochs", "5", "--set", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "--set would be ignored" in err and "start a new run" in err and "--epochs N extends" in err
    assert (tiny_run / "metrics.jsonl").read_text() == before


def test_a_finished_run_is_extended_by_resume_with_more_epochs(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # 1 epoch of 3 steps, finished: its schedule ended at about 0
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2  # not an extension: one line, nothing changed
    assert "planned for 1 epochs" in capsys.readouterr().err and yaml.safe_load((run / "config.yaml").read_text())[
        "train"]["epochs"] == 1
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == 9
    assert rows[1]["lr"] > rows[0]["lr"]  # the schedule now spans 9 steps: the rate rose again, warm restart
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    assert main(["train", "--resume", str(run)]) == 0  # and it is a finished 3-epoch run now
    assert "it already finished its 3 epochs" in capsys.readouterr().err


def test_predict_folder_of_pngs_with_sliding_window(tmp_path, tiny_dsb_run):
    run = tiny_dsb_run
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    skio.imsave(images / "big.png", rng.integers(0, 255, (300, 410, 3), dtype=np.uint8), check_contrast=False)
    skio.imsave(images / "grey.tif", rng.integers(0, 255, (50, 70), dtype=np.uint8), check_contrast=False)
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(images), "--out", str(tmp_path / "masks")]) == 0
    assert skio.imread(tmp_path / "masks" / "big.png").shape == (300, 410)
    assert skio.imread(tmp_path / "masks" / "grey.png").shape == (50, 70)


def test_predict_refuses_to_overwrite_an_input_or_merge_two(tiny_run, data_root, tmp_path, capsys):
    ref = first_val_case(tiny_run, data_root)
    same = tmp_path / "same"
    same.mkdir()
    scan = same / ref.image.name
    shutil.copy(ref.image, scan)
    before = scan.read_bytes()
    assert main(["predict", "--checkpoint", str(tiny_run), str(same), "--out", str(same)]) == 2
    assert "would overwrite an input" in capsys.readouterr().err and scan.read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ref.image, other / ref.image.name)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(tiny_run), str(scan), str(other / ref.image.name), "--out", str(out)]) == 2
    assert "would both be written to" in capsys.readouterr().err and not out.exists()  # refused before any work


def test_predict_goes_on_past_an_unreadable_file_and_fails_at_the_end(tiny_run, data_root, tmp_path, capsys):
    ref = first_val_case(tiny_run, data_root)
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(ref.image, batch / "a.nii.gz")
    (batch / "b.nii.gz").write_text("not an image")
    shutil.copy(ref.image, batch / "c.nii.gz")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(tiny_run), str(batch), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz: not a readable NIfTI file" in err and "1 of 3 files could not be segmented" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz", "labels_itksnap.txt", "labels_slicer.ctbl"]


def test_png_masks_encode_by_the_model_not_the_image():
    from unetseg.data.io import label_to_png_pixels

    only_class_1 = np.array([[0, 1], [1, 0]])
    assert set(np.unique(label_to_png_pixels(only_class_1, num_classes=2))) == {0, 255}
    assert set(np.unique(label_to_png_pixels(only_class_1, num_classes=3))) == {0, 1}  # as in masks that hold class 2
    assert set(np.unique(label_to_png_pixels(np.array([[0, 2]]), num_classes=3))) == {0, 2}


def test_predict_warns_when_the_input_is_not_what_the_model_was_trained_on(tmp_path, capsys):
    photo = tmp_path / "cells.png"
    skio.imsave(photo, np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8), check_contrast=False)
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(photo), "--out", str(tmp_path / "masks")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "trained on hippocampus" in err
    assert (tmp_path / "masks" / "cells.png").is_file()


def test_python_api_predicts_volume(tiny_run, data_root):
    ref = first_val_case(tiny_run, data_root)
    volume = np.asarray(nib.load(str(ref.image)).dataobj)
    seg = Segmenter.from_checkpoint(tiny_run / "best.pt")
    labels = seg.predict(volume)
    assert labels.shape == volume.shape and labels.dtype == np.int64
    probs = seg.predict_proba(volume, tta=True)
    assert probs.shape == (3, *volume.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_keep_largest_component():
    labels = np.zeros((10, 10), np.int64)
    labels[0:2, 0:2] = 1
    labels[5:9, 5:9] = 1
    labels[0, 9] = 2
    kept = keep_largest_component(labels, 3)
    assert kept[0:2, 0:2].sum() == 0 and (kept[5:9, 5:9] == 1).all() and kept[0, 9] == 2


# ---- bad input: one line, exit code 2, no traceback ------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "unetseg", *args], capture_output=True, text=True, timeout=120)


def test_truncated_file_gives_one_line_error_without_traceback(tiny_run, tmp_path):
    bad = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((30, 30, 30), np.float32), np.eye(4)), bad)
    bad.write_bytes(bad.read_bytes()[:300])
    result = run_cli("predict", "--checkpoint", str(tiny_run / "best.pt"), str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scan.nii.gz" in errors[0] and "NIfTI" in errors[0]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), p / "four.nii.gz"), "expected a 3D volume"),
        (lambda p: (p / "empty.nii").write_bytes(b""), "empty"),
        (lambda p: (p / "notes.txt").write_text("hello"), "unsupported file type"),
    ],
)
def test_bad_inputs_are_reported(tiny_run, tmp_path, capsys, make, expected):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make(inputs)
    path = next(inputs.iterdir())
    rc = main(["predict", "--checkpoint", str(tiny_run / "best.pt"), str(path), "--out", str(tmp_path / "o")])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in stderr
    assert len(errors) == 1 and expected in errors[0] and path.name in errors[0]


def test_unknown_checkpoint_and_missing_data_root(tmp_path, capsys):
    assert main(["predict", "--checkpoint", "no_such_model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "shipped model" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", "no_such_model", "--data-root", str(tmp_path)]) == 2


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"format": "unetseg-checkpoint-v1", "x": Evil()}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnetsegError, match="not a loadable unetseg checkpoint"):
            Segmenter.from_checkpoint(bad)
    assert not caught, "the refusal should be our one-line error alone, not preceded by torch's warning"
    assert "executed!" not in capsys.readouterr().out


def test_download_without_internet_fails_fast_with_hint(tmp_path, monkeypatch, capsys):
    archive = download_mod.ARCHIVES["hippocampus"]
    monkeypatch.setitem(
        download_mod.ARCHIVES, "hippocampus", download_mod.Archive("https://unreachable.invalid/x.tar", "x.tar", archive.md5, archive.extracts_to)
    )
    start = time.perf_counter()
    rc = main(["download", "hippocampus", "--data-root", str(tmp_path)])
    assert rc == 2 and time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-root" in err[0] and "UNETSEG_DATA_ROOT" in err[0]


def test_download_skips_existing_copy(tmp_path):
    existing = tmp_path / "Task04_Hippocampus"
    existing.mkdir()
    (existing / "dataset.json").write_text("{}")
    assert download_mod.download("hippocampus", tmp_path) == existing


def test_help_explains_every_subcommand():
    result = run_cli("--help")
    for command in ("train", "predict", "evaluate", "download", "export", "models"):
        assert command in result.stdout
    train_help = run_cli("train", "--help").stdout
    assert "--no-skip" in train_help and "--resume" in train_help and "UNETSEG_DATA_ROOT" in train_help


def test_download_takes_data_root_like_every_other_command_and_root_still_works(tmp_path, capsys):
    (tmp_path / "Task04_Hippocampus" / "imagesTr").mkdir(parents=True)
    (tmp_path / "Task04_Hippocampus" / "dataset.json").write_text("{}")
    for flag in ("--data-root", "--root"):
        assert main(["download", "hippocampus", flag, str(tmp_path)]) == 0
        assert f"data set ready at {tmp_path / 'Task04_Hippocampus'}" in capsys.readouterr().out


def test_ctrl_c_in_training_names_the_run_folder_to_resume(tmp_path, monkeypatch, capsys):
    import unetseg.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(unetseg.train, "fit", interrupted)
    assert main(["train", "--out", str(tmp_path / "my_run")]) == 130
    captured = capsys.readouterr()
    assert f"run folder: {tmp_path / 'my_run'}" in captured.out  # said before training starts
    assert f"interrupted; continue the run with: unetseg train --resume {tmp_path / 'my_run'}" in captured.err


def test_resume_says_what_it_resumes(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the shared fixture stays as it is
    assert main(["train", "--resume", str(run)]) == 0
    captured = capsys.readouterr()
    assert f"resuming {run}" in captured.out
    assert "it already finished its" in captured.err and "best validation Dice so far" in captured.err


def test_predict_on_a_folder_of_case_folders_says_subfolders_are_not_searched(data_root, tmp_path, capsys):
    folder = data_root / "dsb2018_stage1_train"
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "subfolders are not searched" in err and "*/images/*.png" in err


def test_evaluate_writes_beside_the_checkpoint_by_default_not_into_the_working_directory(tmp_path):
    from unetseg.cli import default_evaluation_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    assert default_evaluation_dir([str(run)]) == run / "evaluation"
    assert default_evaluation_dir([str(run / "best.pt")]) == run / "evaluation"
    assert str(default_evaluation_dir(["hippocampus_3d"])) == "evaluation/hippocampus_3d"
    assert str(default_evaluation_dir(["hippocampus_3d", "x/run"])) == "evaluation/hippocampus_3d+run"


def test_models_lists_data_set_input_skips_classes_and_dice(capsys):
    import json as _json

    from unetseg.infer import PRETRAINED_DIR, shipped_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in shipped_models():
        row = next(line for line in lines if line.startswith(name + " "))
        dice = _json.loads((PRETRAINED_DIR / name / "metrics.json").read_text())["mean_dice"]
        assert f"{dice:.4f}" in row and ("3D net" in row) == ("_3d" in name)
        assert (" off " in row) == name.endswith("_noskip")


@pytest.mark.parametrize("value", ["runs/exp #2/best.pt", "null", "2026-12-05", "dsb2018_2d", "C:\\runs\\a.pt"])
def test_init_from_is_taken_literally_and_does_not_go_with_resume(value, tmp_path, capsys):
    """--init-from VALUE becomes train.init_from exactly as typed (not read as YAML: '#' is no comment, 'null' no
    None); with --resume it is refused in one line (the run continues from its own last.pt)."""
    from unetseg.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--init-from", value])
    assert config_from_args(args).train.init_from == value
    assert main(["train", "--resume", str(tmp_path), "--init-from", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from would be ignored" in err

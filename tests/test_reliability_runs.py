"""Careless and damaged runs, configs, exports and evaluations: one clean line, nothing half-written or replaced.

The catalogue is written up in docs/reliability.md (inputs and files are built here, none committed).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from unetseg.cli import main
from unetseg.errors import UnetsegError

from .test_reliability import damaged


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("text, needle", [
    ("42\n", "expected a YAML mapping (section: fields), got int"),
    ("- 1\n- 2\n", "expected a YAML mapping (section: fields), got list"),
    ("model: 5\n", "'model' must be a mapping of fields, got 5"),
    ("model: [x]\n", "'model' must be a mapping of fields"),
    ("model: [\n", "not valid YAML ("),
])
def test_a_config_that_is_not_a_mapping_of_sections_is_one_line(tmp_path, capsys, text, needle):
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys, str(config), needle)
    assert len(err.strip().splitlines()) == 1  # YAML's own multi-line message is folded into the one line


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_bytes(b"\xff\xfe m\x00o\x00d\x00")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "not a UTF-8 text file")


@pytest.mark.parametrize("line, needle", [
    ('seeds: "abc"', "seeds='abc' is not of type list[int]"),
    ("variants: 5", "variants=5 is not of type list[str] | None"),
    ("width: -1", "width=-1 must be greater than 0"),
    ("seeds: [0, -1]", "seeds=[0, -1] must not be negative"),
    ("steps: -1", "unknown field(s) ['steps']; valid: ['analysis', 'config', 'depth'"),
    ("analysis: 5", "'analysis' must be a mapping of fields, got 5"),
    ("quick: [1]", "'quick' must be a mapping of fields, got [1]"),
    ("quick: {seeds: x}", "quick.seeds='x' is not of type list[int]"),
    ('quick: {analysis: {landscape_points_1d: "a"}}', "quick.analysis.landscape_points_1d='a' is not of type int"),
    ("analysis: {gradient_pairs: [[skip, 1]]}", "analysis.gradient_pairs=[['skip', 1]] is not of type list[list[str]]"),
    ("depths: [1, 4]", "depths=[1, 4] must be at least 2 levels"),
    ('overrides: ["train.epochs=x"]', "overrides: train.epochs='x' is not of type int"),
    ("overrides: [epochs]", "overrides 'epochs': expected section.field=value"),
    ("config: no_such", "config 'no_such' not found"),
    ("variants: [skip, skpi]", "variants names unknown variant(s) ['skpi']; the matrix has"),
    ("analysis: {lesion_variants: [residul]}", "analysis.lesion_variants names unknown variant(s) ['residul']"),
])
def test_a_study_file_with_a_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, capsys, line, needle):
    study = tmp_path / "study.yaml"
    study.write_text(f"name: mine\nconfig: hippocampus_2d\n{line}\n")
    # --report-only: were the file accepted, this stops at "no study artefacts" instead of training a study
    assert main(["ablate", "--config", str(study), "--report-only", "--report-dir", str(tmp_path / "r")]) == 2
    one_error_line(capsys, f"error: {study}: {needle}")  # before: accepted, or a TypeError from dict()


@pytest.mark.parametrize("setting, needle", [
    ("train.seed=-1", "train.seed=-1 must not be negative"),
    ("data.split_seed=-1", "data.split_seed=-1 must not be negative"),
    ("train.seed=1180591620717411303424", "must be below 2**32"),
    ("data.patch_size=[8, 8]", "each at least 16 for a 4-level network"),  # 1 pixel at the coarsest level: norms fail
])
def test_seeds_and_patch_sizes_the_libraries_cannot_take_are_one_line(tmp_path, capsys, setting, needle):
    assert main(["train", "--set", setting, "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, needle)


def test_resume_refuses_a_config_that_no_longer_matches_its_checkpoint(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("channels:\n  - 4\n  - 8\n  - 16", "channels:\n  - 4\n  - 8\n  - 32"))
    assert (run / "config.yaml").read_text() != config, "the fixture's channels changed; update this test"
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    one_error_line(capsys, "config.yaml: describes a different network than last.pt", "channels: [4, 8, 16] in the checkpoint")
    (run / "config.yaml").write_text(config)
    shutil.copyfile(run / "best.pt", run / "last.pt")  # weights only: no optimiser state to resume
    payload = torch.load(run / "last.pt", weights_only=True)
    torch.save({k: v for k, v in payload.items() if k not in ("optimizer", "scheduler")}, run / "last.pt")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    one_error_line(capsys, "last.pt: holds no training state (optimizer, scheduler", "start a new run instead of --resume")


def test_a_run_saved_before_a_setting_existed_still_resumes_and_counts_as_the_same_study_run(tiny_run, tmp_path):
    """Settings added to the config since a run was saved (model.stage_blocks, train.optimizer, ...) take their
    defaults: such a run resumes, and a study sees it as the run it asks for, not as a different config."""
    import yaml

    from unetseg.ablation.runs import check_same_config
    from unetseg.config import load_config

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = load_config(str(run / "config.yaml"))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    del raw["model"]["stage_blocks"], raw["train"]["optimizer"], raw["train"]["momentum"]
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    check_same_config(run, cfg)  # no error
    payload = torch.load(run / "last.pt", weights_only=True)
    del payload["model_args"]["stage_blocks"]
    torch.save(payload, run / "last.pt")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    cfg.train.epochs = 3
    with pytest.raises(UnetsegError, match="different config"):
        check_same_config(run, cfg)


def test_a_failed_export_leaves_no_half_written_model(tiny_run, tmp_path, monkeypatch):
    from unetseg import export

    dest = tmp_path / "models"
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "curves.png").unlink()
    with pytest.raises(UnetsegError, match=r"not a finished unetseg run \(curves.png missing\)"):
        export.export_run(run, "m", dest=dest)
    assert not (dest / "m").exists()
    shutil.copyfile(tiny_run / "curves.png", run / "curves.png")
    monkeypatch.setattr(export, "MAX_SHIPPED_BYTES", 1000)
    with pytest.raises(UnetsegError, match=r"model is \d+\.\d MB; shipped models must stay under"):
        export.export_run(run, "m", dest=dest)
    assert not (dest / "m").exists() and not list(dest.iterdir())  # the staging folder went too

    def broken_evaluation(*args, **kwargs):
        raise UnetsegError("evaluation failed")

    (dest / "m").mkdir()
    (dest / "m" / "model.pt").write_bytes(b"the old model")
    monkeypatch.setattr(export, "MAX_SHIPPED_BYTES", 10 * 2**20)
    monkeypatch.setattr(export, "record_evaluation", broken_evaluation)
    with pytest.raises(UnetsegError, match="evaluation failed"):
        export.export_run(run, "m", dest=dest, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["m"] and (dest / "m" / "model.pt").read_bytes() == b"the old model"


def test_evaluate_refuses_to_replace_an_earlier_evaluation_unless_overwrite(tiny_run, tmp_path, data_root, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    args = ["evaluate", "--checkpoint", str(tiny_run), "--data-root", str(data_root), "--out", str(out), "--quiet"]
    assert main(args) == 2
    one_error_line(capsys, "summary.json already exists", "--overwrite")
    assert (out / "summary.json").read_text() == "{}"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["num_cases"] > 0


def test_evaluate_with_no_labelled_cases_is_one_line(tmp_path, data_root, capsys):
    task = tmp_path / "Task04_Hippocampus"
    task.mkdir()
    manifest = json.loads((data_root / "Task04_Hippocampus" / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**manifest, "training": []}))
    assert main(["evaluate", "--checkpoint", "hippocampus_2d", "--split", "all", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    one_error_line(capsys, "no labelled hippocampus cases under the data root")
    assert not (tmp_path / "ev").exists()  # before: exit 0 with "0 cases, mean foreground Dice nan"


def test_evaluate_names_images_without_a_mask_and_scores_the_others(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in "abc":
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / "images" / f"{name}.png")
    Image.fromarray(((rng.random((64, 64)) > 0.5) * 255).astype(np.uint8)).save(folder / "masks" / "a.png")
    checkpoint = damaged(tmp_path, "folder.pt", lambda p: p.update(class_names=["background", "foreground"],
                                                                    dataset="folder"), model="dsb2018_2d")
    args = ["evaluate", "--checkpoint", checkpoint, "--split", "all", "--data-root", str(folder), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    assert capsys.readouterr().err.splitlines() == [  # before: scored silently, "1 cases"
        f"warning: scoring 1 of 3 folder images: 2 have no mask or label map (e.g. {folder / 'images' / 'b.png'}); "
        "give each a mask of the same file name under masks/ to score it"]
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["num_cases"] == 1
    (folder / "masks" / "a.png").unlink()
    assert main([*args, "--out", str(tmp_path / "none")]) == 2
    one_error_line(capsys, "none of the 3 folder images under the data root can be scored: 3 have no mask",
                   str(folder / "images" / "a.png"))
    assert not (tmp_path / "none").exists()


def test_models_lists_a_model_with_damaged_metadata_without_failing(tmp_path, monkeypatch, capsys):
    import unetseg.cli as cli

    package = tmp_path / "unetseg"
    for name, metrics, config in [("good", '{"mean_dice": 0.5, "classes": {"x": {}}}', "model: {spatial_dims: 3}\n"),
                                  ("list_metrics", "[1, 2]", "model: 5\n"), ("bad_json", "{bad", "model: [\n"),
                                  ("text_dice", '{"mean_dice": "0.9"}', "- 1\n")]:
        (package / "pretrained" / name).mkdir(parents=True)
        (package / "pretrained" / name / "model.pt").write_bytes(b"")
        (package / "pretrained" / name / "metrics.json").write_text(metrics)
        (package / "pretrained" / name / "config.yaml").write_text(config)
    (package / "pretrained" / ".staging.abc").mkdir()
    (package / "pretrained" / ".staging.abc" / "model.pt").write_bytes(b"")
    monkeypatch.setattr(cli, "__file__", str(package / "cli.py"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "0.5000" in out and "3D net" in out and out.count("not recorded") == 3 and ".staging" not in out


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.update(class_names=["background", "anterior"]), "2 class names for a network with 3 outputs"),
    (lambda p: p["preprocessing"].update(normalization="foo"), "normalization 'foo' is not"),
    (lambda p: p["preprocessing"].pop("in_channels"), "in_channels None differs from the network's 1"),
    (lambda p: p["preprocessing"].update(patch_size="ab"), "patch_size 'ab' is not 2 positive sizes"),
    (lambda p: p["preprocessing"].update(slice_axis=7), "slice_axis 7 is not 0, 1 or 2"),
    (lambda p: p.update(tta_flips=[]), "tta_flips [] must be a list of axis lists"),
    (lambda p: p.update(tta_flips=[[0]]), "starting with []"),
    (lambda p: p.update(tta_flips=[[], [5]]), "tta_flips [[], [5]]"),
])
def test_a_checkpoint_with_impossible_settings_is_one_line(tmp_path, data_root, capsys, change, needle):
    path = damaged(tmp_path, "odd.pt", change)
    scan = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    assert main(["predict", "--checkpoint", path, str(scan), "--out", str(tmp_path / "o"), "--tta", "--quiet"]) == 2
    one_error_line(capsys, path, "damaged checkpoint", needle)


def test_a_cuda_device_on_a_machine_without_one_is_one_line(monkeypatch):
    from unetseg.infer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UnetsegError, match=f"device '{device}': no CUDA device is available"):
            resolve_device(device)
    with pytest.raises(UnetsegError, match="'tpu' is not a device"):
        resolve_device("tpu")


def test_predict_never_writes_through_a_link_in_the_out_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "a.png").symlink_to(elsewhere / "new.png")  # dangling: exists() is False
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(image), "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, "a.png already exists")
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(image), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "a.png").is_symlink() and (out / "a.png").is_file() and not list(elsewhere.iterdir())


def test_the_api_refuses_shapes_it_would_read_wrongly():
    import numpy as np

    from unetseg.errors import DataError
    from unetseg.infer import Segmenter

    colour = Segmenter.from_checkpoint("dsb2018_2d")
    rgb = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    with pytest.raises(DataError, match=r"looks like an RGB\(A\) image.* pass channel_axis=-1"):
        colour.predict(rgb)  # before: three grey slices, a (64, 64, 3) label map
    assert colour.predict(rgb, channel_axis=-1).shape == (64, 64)
    with pytest.raises(DataError, match="channel_axis 5 is outside the image's 3 axes"):
        colour.predict(rgb, channel_axis=5)
    with pytest.raises(DataError, match="non-empty array of real numbers"):
        colour.predict(np.zeros((0, 10, 10), np.float32))
    with pytest.raises(DataError, match="non-empty array of real numbers, got complex64"):
        colour.predict(np.zeros((8, 8), np.complex64))


def test_an_exported_model_folder_is_readable_by_every_user(tiny_run, tmp_path, data_root):
    from unetseg import export

    target = export.export_run(tiny_run, "m", data_root=data_root, dest=tmp_path / "models")
    assert target.stat().st_mode & 0o777 == 0o755  # the staging folder was private (mkdtemp: 0700)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in target.iterdir())


def test_export_dest_keeps_the_package_untouched_and_the_folder_is_a_checkpoint(tiny_run, tmp_path, data_root, capsys):
    from unetseg.checkpoint import PRETRAINED_DIR

    before = sorted(p.name for p in PRETRAINED_DIR.iterdir())
    assert main(["export", str(tiny_run), "--name", "mine", "--dest", str(tmp_path / "models"),
                 "--data-root", str(data_root)]) == 0
    assert sorted(p.name for p in PRETRAINED_DIR.iterdir()) == before and (tmp_path / "models" / "mine" / "model.pt").is_file()
    assert "HD95 n/a" in capsys.readouterr().out  # the tiny run predicts no hippocampus: HD95 undefined, said so
    assert main(["predict", "--checkpoint", str(tmp_path / "models" / "mine"), str(data_root / "Task04_Hippocampus" /
                 "imagesTr" / "hippocampus_001.nii.gz"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "hippocampus_001.nii.gz").is_file()


def test_a_fine_tuned_model_that_replaces_its_starting_model_keeps_that_model_s_history(tiny_run, tmp_path, data_root):
    """export records where a train.init_from run started (the model's own training record), read before the model
    it started from is replaced, so the shipped model's metrics.json still names every command that made it."""
    from unetseg.export import export_run
    from unetseg.train import fit

    from .conftest import tiny_config

    dest = tmp_path / "models"
    parent = json.loads((export_run(tiny_run, "m", data_root=data_root, dest=dest) / "metrics.json").read_text())
    assert "init_from" not in parent["training"]
    tuned = fit(tiny_config([f"train.init_from={dest / 'm'}"]), tmp_path / "ft", data_root=data_root, progress=False)
    (tuned / "command.txt").write_text("unetseg train --init-from m\n")
    child = json.loads((export_run(tuned, "m", data_root=data_root, dest=dest, overwrite=True) / "metrics.json")
                       .read_text())
    start = child["training"]["init_from"]
    assert start["source"] == str(dest / "m") and start["mean_dice"] == parent["mean_dice"]
    assert start["training"] == parent["training"] and child["training"]["command"] == ["unetseg train --init-from m"]
    # A chain through run folders: a run tuned from the tuned run records both starting points.
    again = fit(tiny_config([f"train.init_from={tuned}"]), tmp_path / "ft2", data_root=data_root, progress=False)
    grandchild = json.loads((export_run(again, "m2", data_root=data_root, dest=dest) / "metrics.json").read_text())
    first = grandchild["training"]["init_from"]
    assert first["source"] == str(tuned) and first["training"]["command"] == ["unetseg train --init-from m"]
    assert first["training"]["init_from"]["training"] == parent["training"]


def test_provenance_of_a_killed_fine_tune_and_of_a_loop(tiny_run, tmp_path):
    """A fine-tune killed before its first checkpoint (split.json, init_from.json) can be started again in its
    folder; a run whose train.init_from leads back to itself is recorded with a note, not followed for ever."""
    import yaml

    from unetseg.provenance import training_history
    from unetseg.train import check_out_dir

    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("split.json", "config.yaml", "init_from.json"):
        (killed / name).write_text("{}")
    assert check_out_dir(killed, resume=False) is True
    loop = tmp_path / "loop"
    shutil.copytree(tiny_run, loop)
    config = yaml.safe_load((loop / "config.yaml").read_text())
    config["train"]["init_from"] = str(loop)
    (loop / "config.yaml").write_text(yaml.safe_dump(config))
    start = training_history(loop)["init_from"]
    assert start["source"] == str(loop) and "loops" in start["note"]

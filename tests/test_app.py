"""The Streamlit viewer driven by AppTest: uploads, model switching, slicing, compare mode, ground truth, bad files.

AppTest (Streamlit 1.67) drives ``st.file_uploader`` itself, so these tests go
through the real upload widget; ``tests/test_app_browser.py`` repeats the main
path in a real browser.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import io as pyio
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from unetseg import display
from unetseg.data import io
from unetseg.data.datasets import dataset_info, list_cases, load_cases
from unetseg.evaluate import evaluate_cases, summarize
from unetseg.infer import PRETRAINED_DIR, Segmenter, model_card, read_int8_calibration, shipped_models

from .conftest import REPO

APP = REPO / "apps" / "viewer.py"
CASE = "hippocampus_003"
DSB_CASE = "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552"  # 256 x 256
VOLUME_MODEL = "hippocampus_3d"  # the viewer's default for volumes: the best validation Dice of the volume models
# ... and for 2D images: dsb2018_2d (validation Dice 0.9188 against its no-skip twin's 0.9157)
IMAGE_MODEL = "dsb2018_2d"


def require_shipped(*names: str) -> None:
    """Fail (never skip) when a shipped model the viewer defaults to is missing."""
    missing = [n for n in names if n not in shipped_models()]
    if missing:
        pytest.fail(
            f"shipped model(s) {', '.join(missing)} missing under {PRETRAINED_DIR}; train and export them "
            "(`unetseg train ...` then `unetseg export ...`) - the viewer's defaults need them"
        )


@pytest.fixture
def app(monkeypatch, tmp_path):
    """A fresh viewer session run from an empty working directory, with empty data caches.

    Model objects stay cached (``st.cache_resource``) across tests, as in a running server.
    """
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=180)
    at.run()
    assert not at.exception and not at.error
    yield at
    assert list(work.iterdir()) == [], "the viewer wrote into the working directory"


@pytest.fixture
def model_calls(monkeypatch):
    """Counts every model prediction (``Segmenter.predict`` and ``flip_predictions``)."""
    calls: list[str] = []
    predict, flips = Segmenter.predict, Segmenter.flip_predictions
    monkeypatch.setattr(Segmenter, "predict", lambda self, *a, **k: calls.append("predict") or predict(self, *a, **k))
    monkeypatch.setattr(
        Segmenter, "flip_predictions", lambda self, *a, **k: calls.append("flips") or flips(self, *a, **k)
    )
    return calls


def hippocampus_files(data_root: Path, case: str = CASE) -> tuple[Path, Path]:
    task = data_root / "Task04_Hippocampus"
    return task / "imagesTr" / f"{case}.nii.gz", task / "labelsTr" / f"{case}.nii.gz"


def upload(at: AppTest, key: str, name: str, data: bytes) -> AppTest:
    at.file_uploader(key=key).set_value((name, data, "application/octet-stream"))
    at.run()
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def assert_public(message: str) -> None:
    """One line that never shows where the server keeps an upload's temporary file."""
    assert "\n" not in message, message
    assert "unetseg-upload" not in message and tempfile.gettempdir() not in message, message


def load_viewer():
    """``apps/viewer.py`` as a module (``main`` does not run), for its plain functions."""
    spec = importlib.util.spec_from_file_location("viewer_under_test", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def captions(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


def table_with(at: AppTest, column: str):
    tables = [t.value for t in at.table if column in t.value.columns]
    assert len(tables) == 1, f"expected one table with column {column!r}"
    return tables[0]


def predicted(model: str, path: Path, int8: bool = False) -> np.ndarray:
    """What ``Segmenter.predict`` gives, computed without it (so ``model_calls`` counts the app's calls only)."""
    image, _ = io.read_image(path)
    return Segmenter.from_checkpoint(model, int8=int8).predict_proba(image, channel_axis=0).argmax(axis=0)


# ---------------------------------------------------------------- volumes


def test_nifti_upload_shows_overlay_legend_sizes_and_download(app, data_root, model_calls):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    ok(app)
    assert app.selectbox(key="model").value == VOLUME_MODEL  # picked for a volume
    shape = nib.load(image_path).shape
    assert captions(app)[0] == f"{VOLUME_MODEL}: axial slice {shape[2] // 2}"
    assert app.slider(key="slice").max == shape[2] - 1
    legend = next(m.value for m in app.markdown if m.value.startswith("Legend"))
    assert "anterior" in legend and "posterior" in legend and display.legend(("b", "a", "p"))[0][1] in legend
    labels = predicted(VOLUME_MODEL, image_path)
    sizes = table_with(app, "volume (mm³)")
    counts = np.bincount(labels.ravel(), minlength=3)
    voxel = display.voxel_volume(nib.load(image_path).affine)
    assert sizes["voxels"].tolist() == counts[1:].tolist()
    assert sizes["volume (mm³)"].tolist() == pytest.approx((counts[1:] * voxel).tolist())
    assert app.download_button(key="download").label.endswith(f"({CASE}_prediction.nii.gz)")
    assert model_calls == ["predict"]


def test_the_viewer_freezes_the_heap_its_imports_leave_once_per_process(app, monkeypatch):
    """Streamlit collects garbage after every run; over the heap torch, pandas and Streamlit leave that took
    0.35-0.45 s per run here. The viewer freezes that heap out of the collector's reach once per process."""
    import gc

    assert gc.get_freeze_count() > 100_000  # the fixture's first run froze (here or in an earlier test)
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(1))
    app.run()  # a rerun freezes nothing new: the objects of a run stay collectable
    AppTest.from_file(str(APP), default_timeout=180).run()  # nor does another session of the same server
    assert calls == []


def test_default_model_is_the_best_validation_dice_made_for_the_input():
    viewer = load_viewer()

    def card(kind, dims, dice):
        return {"input_kind": kind, "spatial_dims": dims, "metrics": None if dice is None else {"mean_dice": dice}}

    cards = {"vol_2d": card("nifti", 2, 0.868), "vol_3d": card("nifti", 3, 0.887), "vol_new": card("nifti", 3, None),
             "img": card("image2d", 2, 0.906), "img_noskip": card("image2d", 2, 0.895), "any": card(None, 2, 0.99)}
    assert viewer.best_model(cards, "nifti") == "vol_3d"
    assert viewer.best_model(cards, "image2d") == "img"
    assert viewer.best_model({"a": card("nifti", 2, None), "b": card("nifti", 3, None)}, "nifti") == "a"  # first listed
    assert viewer.best_model({"a": card("nifti", 3, float("nan")), "b": card("nifti", 2, 0.5)}, "nifti") == "b"
    assert viewer.best_model({"a": card("image2d", 3, 0.9), "b": card(None, 2, 0.9)}, "image2d") is None
    shipped = {name: model_card(name) for name in shipped_models()}
    for kind in ("nifti", "image2d"):  # the shipped models' own metrics.json decide
        made_for = {n: c["metrics"]["mean_dice"] for n, c in shipped.items() if c["input_kind"] == kind}
        assert viewer.best_model(shipped, kind) == max(made_for, key=made_for.get)
    require_shipped(VOLUME_MODEL, IMAGE_MODEL)
    assert viewer.best_model(shipped, "nifti") == VOLUME_MODEL
    assert viewer.best_model(shipped, "image2d") == IMAGE_MODEL
    from unetseg.choice import best_shipped_model  # what apps/benchmark_viewer.py measures by default

    assert (best_shipped_model("nifti"), best_shipped_model("image2d")) == (VOLUME_MODEL, IMAGE_MODEL)
    assert [viewer.twin_of(n) for n in ("hippocampus_2d", "hippocampus_2d_noskip")] == [
        "hippocampus_2d_noskip", "hippocampus_2d"]


def test_a_volume_gets_the_3d_model_by_default_and_a_mask_of_its_shape(app, data_root, monkeypatch):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    volume = nib.load(image_path).get_fdata()[1:34, 2:49, 3:32].astype(np.float32)  # odd sizes: 33 x 47 x 29
    affine = np.diag([-1.2, 1.0, 1.5, 1.0])  # mirrored x, anisotropic voxels
    shapes = []
    predict = Segmenter.predict

    def recording_predict(self, *args, **kwargs):
        labels = predict(self, *args, **kwargs)
        shapes.append((self.spatial_dims, labels.shape))
        return labels

    monkeypatch.setattr(Segmenter, "predict", recording_predict)
    markers = []
    mark_edges = display.mark_edges
    monkeypatch.setattr(display, "mark_edges", lambda picture, letters: markers.append(letters) or mark_edges(picture,
                                                                                                          letters))
    upload(app, "image_upload", "odd.nii.gz", gzip.compress(nib.Nifti1Image(volume, affine).to_bytes()))
    ok(app)
    assert app.selectbox(key="model").value == VOLUME_MODEL
    assert shapes == [(3, volume.shape)]  # the 3D network, one mask voxel per input voxel
    assert captions(app)[0] == f"{VOLUME_MODEL}: axial slice {volume.shape[2] // 2}"
    assert app.slider(key="slice").max == volume.shape[2] - 1
    labels = Segmenter.from_checkpoint(VOLUME_MODEL).predict_proba(volume).argmax(axis=0)
    counts = np.bincount(labels.ravel(), minlength=3)
    assert counts[1:].min() > 0  # it finds both hippocampus parts in the cropped case
    sizes = table_with(app, "volume (mm³)")
    assert sizes["voxels"].tolist() == counts[1:].tolist()
    assert sizes["volume (mm³)"].tolist() == pytest.approx((counts[1:] * 1.2 * 1.5).tolist())
    assert markers and all(m == {"left": "L", "right": "R", "top": "A", "bottom": "P"} for m in markers)  # every panel
    markers.clear()
    app.radio(key="plane").set_value("sagittal").run()
    ok(app)
    assert captions(app)[0] == f"{VOLUME_MODEL}: sagittal slice {volume.shape[0] // 2}"
    assert markers and all(m == {"left": "P", "right": "A", "top": "S", "bottom": "I"} for m in markers)


def test_slider_plane_window_and_opacity_never_rerun_the_model(app, data_root, model_calls):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    first = app.image[0].value
    app.slider(key="slice").set_value(5).run()
    ok(app)
    assert captions(app)[0] == f"{VOLUME_MODEL}: axial slice 5" and app.image[0].value != first
    app.radio(key="plane").set_value("coronal").run()
    shape = nib.load(image_path).shape
    assert captions(app)[0] == f"{VOLUME_MODEL}: coronal slice {shape[1] // 2}"
    assert app.slider(key="slice").max == shape[1] - 1
    before = app.image[0].value
    app.slider(key="opacity").set_value(0.9).run()
    assert app.image[0].value != before
    before = app.image[0].value
    app.slider(key="width").set_value(app.slider(key="width").value / 2).run()
    assert app.image[0].value != before
    ok(app)
    assert model_calls == ["predict"]  # one prediction for all of that


def test_switching_models_predicts_once_per_model_and_caches(app, data_root, model_calls):
    require_shipped(VOLUME_MODEL, "hippocampus_2d_noskip")
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.selectbox(key="model").set_value("hippocampus_2d_noskip").run()
    ok(app)
    assert captions(app)[0].startswith("hippocampus_2d_noskip:")
    sizes = table_with(app, "voxels")
    labels = predicted("hippocampus_2d_noskip", image_path)
    assert sizes["voxels"].tolist() == np.bincount(labels.ravel(), minlength=3)[1:].tolist()
    app.selectbox(key="model").set_value(VOLUME_MODEL).run()
    assert captions(app)[0].startswith(f"{VOLUME_MODEL}:")
    assert model_calls == ["predict", "predict"]  # switching back is served from the cache


def test_compare_mode_shows_skip_and_noskip_side_by_side_with_their_disagreement(app, data_root, model_calls):
    require_shipped("hippocampus_2d", "hippocampus_2d_noskip")
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.selectbox(key="model").set_value("hippocampus_2d").run()
    app.checkbox(key="compare").check().run()
    ok(app)
    assert app.selectbox(key="model_b").value == "hippocampus_2d_noskip"  # default: the no-skip twin
    assert not app.info  # it has a twin: nothing to say
    shown = captions(app)
    assert shown[0].startswith("hippocampus_2d:") and shown[1].startswith("hippocampus_2d_noskip:")
    a, b = predicted("hippocampus_2d", image_path), predicted("hippocampus_2d_noskip", image_path)
    z = nib.load(image_path).shape[2] // 2
    here = int((a[:, :, z] != b[:, :, z]).sum())
    assert shown[2] == f"disagreement (green): {here} here, {int((a != b).sum())} in all ({float((a != b).mean()):.2%})"
    app.slider(key="slice").set_value(0).run()
    assert captions(app)[2].startswith(f"disagreement (green): {int((a[:, :, 0] != b[:, :, 0]).sum())} here")
    assert model_calls == ["predict"] * 3  # the default model on upload, then each model of the pair once


def test_compare_mode_pairs_twins_and_says_when_a_model_has_none(app, data_root, model_calls, tiny_run):
    require_shipped(VOLUME_MODEL, f"{VOLUME_MODEL}_noskip", "hippocampus_2d", "hippocampus_2d_noskip")
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.checkbox(key="compare").check().run()
    ok(app)
    assert not app.info and app.selectbox(key="model_b").value == f"{VOLUME_MODEL}_noskip"  # its twin
    shown = captions(app)
    assert shown[0].startswith(f"{VOLUME_MODEL}:") and shown[1].startswith(f"{VOLUME_MODEL}_noskip:")
    assert shown[2].startswith("disagreement (green): ")
    app.selectbox(key="model_b").set_value("hippocampus_2d_noskip").run()  # the user's choice
    ok(app)
    assert captions(app)[1].startswith("hippocampus_2d_noskip:")
    app.slider(key="slice").set_value(2).run()
    assert app.selectbox(key="model_b").value == "hippocampus_2d_noskip"  # kept while the first model stays
    app.selectbox(key="model").set_value("hippocampus_2d_noskip").run()  # a model with a twin: paired again
    ok(app)
    assert app.selectbox(key="model_b").value == "hippocampus_2d" and not app.info
    assert captions(app)[:2] == ["hippocampus_2d_noskip: axial slice 2", "hippocampus_2d: axial slice 2"]
    # a checkpoint of the user's own has no twin: the viewer says so and offers the best volume model
    app.sidebar.text_input(key="checkpoint_path").set_value(str(tiny_run)).run()
    app.selectbox(key="model").set_value(str(tiny_run)).run()
    ok(app)
    assert [i.value for i in app.info] == [f"{tiny_run} has no no-skip twin shipped; choose the second model below."]
    assert app.selectbox(key="model_b").value == VOLUME_MODEL
    assert model_calls == ["predict"] * 5  # one prediction per model


def label_uploader(at: AppTest):
    """The ground-truth upload widget, whatever its key (a new image gives it a fresh one)."""
    found = [u for u in at.get("file_uploader") if u.label.startswith("Ground truth")]
    assert len(found) == 1
    return found[0]


def test_model_choice_and_compare_mode_survive_the_run_without_a_file_when_an_upload_is_replaced(app, data_root):
    """Replacing an upload passes through a run with no file. The pickers must be drawn in it: a run that does not
    draw a widget drops its state, and the browser then showed the model picker at its first option (dsb2018_2d),
    which the next rerun (B's ground truth) sent back as the choice; the overlay vanished."""
    require_shipped(VOLUME_MODEL, "hippocampus_2d", "hippocampus_2d_noskip")
    a, _ = hippocampus_files(data_root)
    b, b_label = hippocampus_files(data_root, "hippocampus_004")
    upload(app, "image_upload", a.name, a.read_bytes())
    app.selectbox(key="model").set_value("hippocampus_2d").run()
    app.checkbox(key="compare").check().run()
    app.slider(key="opacity").set_value(0.8).run()
    app.file_uploader(key="image_upload").set_value(None).run()  # what the browser sends between A and B
    ok(app)
    assert app.info[0].value.startswith("Upload a scan or image")
    assert app.selectbox(key="model").value == "hippocampus_2d"  # drawn without a file, its state kept
    assert app.checkbox(key="compare").value and app.slider(key="opacity").value == 0.8
    upload(app, "image_upload", b.name, b.read_bytes())
    ok(app)
    assert app.selectbox(key="model").value == "hippocampus_2d"  # a volume model: kept for the new volume
    assert captions(app)[:2] == ["hippocampus_2d: axial slice 19", "hippocampus_2d_noskip: axial slice 19"]
    label_uploader(app).set_value((b_label.name, b_label.read_bytes(), "application/octet-stream")).run()
    ok(app)
    assert app.selectbox(key="model").value == "hippocampus_2d"
    assert captions(app)[0] == "hippocampus_2d: axial slice 19" and table_with(app, "Dice")["Dice"].min() > 0.5


def test_a_new_image_starts_with_an_empty_ground_truth_and_sample_pickers_step_aside(app, data_root):
    require_shipped(VOLUME_MODEL, "dsb2018_2d")
    app.sidebar.text_input(key="data_root").set_value(str(data_root)).run()
    image_path, label_path = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    label_uploader(app).set_value((label_path.name, label_path.read_bytes(), "application/octet-stream")).run()
    assert table_with(app, "Dice")["class"].tolist() == ["anterior", "posterior"]
    assert app.selectbox(key="sample_dataset").disabled and app.selectbox(key="sample_case").disabled
    assert any(c.value == "Showing the uploaded file: remove it to view a sample case." for c in app.sidebar.caption)
    path = dsb_png(data_root)
    upload(app, "image_upload", path.name, path.read_bytes())
    ok(app)  # before: "Ground truth not used: hippocampus_003.nii.gz: unknown label values [2]"
    assert label_uploader(app).value is None and not [t for t in app.table if "Dice" in t.value.columns]
    assert not any(c.startswith("errors of") for c in captions(app))
    app.file_uploader(key="image_upload").set_value(None).run()
    assert not app.selectbox(key="sample_dataset").disabled  # no upload: the sample pickers apply again
    label_uploader(app).set_value((label_path.name, label_path.read_bytes(), "application/octet-stream")).run()
    upload(app, "image_upload", image_path.name, image_path.read_bytes())  # a label dropped first goes with the image
    ok(app)
    assert table_with(app, "Dice")["class"].tolist() == ["anterior", "posterior"]


def evaluate_one_case(model: str, dataset: str, case_id: str, data_root, int8: bool = False
                      ) -> tuple[Segmenter, dict]:
    """The shipped model and its ``unetseg evaluate`` (``--int8``) row for one real case."""
    segmenter = Segmenter.from_checkpoint(model, int8=int8)
    refs, info = list_cases(dataset_info(dataset), data_root)
    cases = load_cases([r for r in refs if r.case_id == case_id], info, segmenter.preprocessing.normalization)
    return segmenter, evaluate_cases(segmenter, cases, progress=False)[0]


def test_ground_truth_metrics_equal_unetseg_evaluate_for_the_case(app, data_root):
    require_shipped(VOLUME_MODEL)
    image_path, label_path = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    upload(app, "label_upload", label_path.name, label_path.read_bytes())
    ok(app)
    segmenter, row = evaluate_one_case(VOLUME_MODEL, "hippocampus", CASE, data_root)
    metrics = table_with(app, "Dice")
    assert metrics["class"].tolist() == ["anterior", "posterior"]
    for _, r in metrics.iterrows():
        assert r["Dice"] == row[f"dice_{r['class']}"]  # same computation, so exactly equal
        assert r["HD95 (mm)"] == row[f"hd95_{r['class']}"]
    assert app.metric[0].value == f"{summarize([row], segmenter.class_names)['mean_dice']:.4f}"
    assert any(c.startswith(f"errors of {VOLUME_MODEL}: red false positive") for c in captions(app))


def test_uncertainty_layer_shows_flip_tta_disagreement(app, data_root, model_calls):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.checkbox(key="uncertainty").check().run()
    ok(app)
    shown = captions(app)[-1]
    app.slider(key="slice").set_value(3).run()
    assert model_calls == ["predict", "flips"]
    assert captions(app)[-1].startswith(f"uncertainty of {VOLUME_MODEL}")
    image, _ = io.read_image(image_path)
    vote = display.vote_disagreement(Segmenter.from_checkpoint(VOLUME_MODEL).flip_predictions(image, channel_axis=0))
    assert 0 < (vote > 0).mean() < 0.5
    assert f"flip-TTA members disagree on {float((vote > 0).mean()):.2%} of the volume" in shown


def test_sample_case_from_the_data_root_comes_with_its_label(app, data_root):
    require_shipped(VOLUME_MODEL)
    app.sidebar.text_input(key="data_root").set_value(str(data_root)).run()
    app.selectbox(key="sample_dataset").set_value("hippocampus").run()
    app.selectbox(key="sample_case").set_value(CASE).run()
    ok(app)
    assert f"Sample: **{CASE}.nii.gz**" in app.caption[0].value
    assert table_with(app, "Dice")["Dice"].min() > 0.5


def test_checkpoint_path_in_the_sidebar_joins_the_model_picker(app, data_root, tiny_run):
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.sidebar.text_input(key="checkpoint_path").set_value(str(tiny_run)).run()
    ok(app)
    assert str(tiny_run) in app.selectbox(key="model").options[-1]
    app.selectbox(key="model").set_value(str(tiny_run)).run()
    ok(app)
    assert captions(app)[0].startswith(f"{tiny_run}:")
    app.sidebar.text_input(key="checkpoint_path").set_value(str(tiny_run / "missing.pt")).run()
    assert len(app.sidebar.error) == 1 and "not found" in app.sidebar.error[0].value


def test_dicom_series_zip_and_single_slice(app):
    require_shipped(VOLUME_MODEL)
    from .test_dicom import dicom_bytes, zip_bytes

    rng = np.random.default_rng(0)
    slices = rng.integers(0, 800, (6, 40, 48))
    files = {f"IM{k}.dcm": dicom_bytes(slices[k], (0.0, 0.0, 2.5 * k)) for k in range(6)}
    upload(app, "image_upload", "series.zip", zip_bytes(files))
    ok(app)
    assert "DICOM volume of shape (48, 40, 6)" in app.caption[0].value
    assert captions(app)[0] == f"{VOLUME_MODEL}: axial slice 3"
    assert app.download_button(key="download").label.endswith("(series_prediction.nii.gz)")
    upload(app, "image_upload", "IM0.dcm", files["IM0.dcm"])
    ok(app)
    assert "volume of shape (48, 40, 1)" in app.caption[0].value
    assert captions(app)[0] == f"{VOLUME_MODEL}: axial slice 0"
    assert any("single slice" in c.value for c in app.caption)
    app.radio(key="plane").set_value("sagittal").run()
    ok(app)
    assert captions(app)[0] == f"{VOLUME_MODEL}: sagittal slice 24"


# ---------------------------------------------------------------- 2D images


def dsb_png(data_root: Path) -> Path:
    return data_root / "dsb2018_stage1_train" / DSB_CASE / "images" / f"{DSB_CASE}.png"


def test_a_model_without_int8_calibration_runs_in_float32_and_says_so(app, data_root):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    ok(app)
    assert app.selectbox(key="model").value == VOLUME_MODEL  # a 3D model: int8 is for 2D networks
    assert app.checkbox(key="int8").disabled
    assert any(f"{VOLUME_MODEL} runs in float32: {VOLUME_MODEL}: int8 inference is for 2D networks" in c.value
               for c in app.sidebar.caption)  # the reason, not "make a calibration"
    assert captions(app)[0].startswith(f"{VOLUME_MODEL}: ")


def test_png_upload_uses_the_dsb_model_and_reports_area_in_pixels(app, data_root):
    require_shipped(IMAGE_MODEL)
    path = dsb_png(data_root)
    upload(app, "image_upload", path.name, path.read_bytes())
    ok(app)
    assert app.selectbox(key="model").value == IMAGE_MODEL
    assert captions(app)[0] == f"{IMAGE_MODEL} (int8): image"  # on by default for a model with a calibration
    assert app.checkbox(key="int8").value and not app.checkbox(key="int8").disabled
    recorded = read_int8_calibration(IMAGE_MODEL)["validation"]  # what int8 costs, in the sidebar
    assert any(f"validation Dice {recorded['mean_dice_int8']:.4f} (float32 {recorded['mean_dice_float32']:.4f})"
               in c.value for c in app.sidebar.caption)
    assert "slice" not in [s.key for s in app.slider] and "plane" not in [r.key for r in app.radio]
    labels = predicted(IMAGE_MODEL, path, int8=True)
    area = table_with(app, "area (pixels)")
    assert area["area (pixels)"].tolist() == [int((labels == 1).sum())]
    assert app.download_button(key="download").label.endswith(f"({DSB_CASE}_prediction.png)")


def test_an_upload_run_encodes_no_picture_twice(app, data_root, monkeypatch):
    """The input shows alone while the model runs, then beside the overlay: one PNG encoding serves both (for a
    1040 x 1388 image each encoding costs 0.1-0.3 s), and Streamlit passes the PNGs on as they are (its default
    re-encoded them as JPEG, blurring the label edges)."""
    import hashlib

    from PIL import Image

    require_shipped(IMAGE_MODEL)
    encodings = []
    save = Image.Image.save

    def recording_save(self, fp, *args, **kwargs):
        save(self, fp, *args, **kwargs)
        if isinstance(fp, pyio.BytesIO):
            encodings.append(hashlib.sha256(fp.getvalue()).hexdigest())

    monkeypatch.setattr(Image.Image, "save", recording_save)
    path = dsb_png(data_root)
    upload(app, "image_upload", path.name, path.read_bytes())
    ok(app)
    assert captions(app)[:2] == [f"{IMAGE_MODEL} (int8): image", "input: image"]
    assert len(encodings) >= 2 and len(set(encodings)) == len(encodings)
    urls = [url for element in app.get("image") for url in element.value]
    assert len(urls) >= 2 and all(u.endswith(".png") for u in urls), urls


def test_dsb_image_shows_the_nucleus_count_and_a_table_of_their_areas(app, data_root):
    from unetseg.instances import instance_table, split_instances

    require_shipped(IMAGE_MODEL)
    path = dsb_png(data_root)
    upload(app, "image_upload", path.name, path.read_bytes())
    ok(app)
    expected = instance_table(split_instances(predicted(IMAGE_MODEL, path, int8=True) == 1))
    assert len(expected) > 5  # several nuclei in this image
    count = next(m for m in app.metric if m.label == "Number of nuclei")
    assert count.value == str(len(expected))
    [table] = [d.value for d in app.dataframe if "area_px" in d.value.columns]
    assert table["nucleus"].tolist() == [r["label"] for r in expected]
    assert table["area_px"].tolist() == [r["area_px"] for r in expected]
    assert app.download_button(key="objects_csv").label.endswith(f"({DSB_CASE}_nuclei.csv)")
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    assert not [m for m in app.metric if m.label == "Number of nuclei"]  # volumes: sizes in mm³ only


def test_zoom_shows_part_of_a_large_image_at_full_detail_without_predicting_again(app, data_root, monkeypatch,
                                                                                  model_calls):
    """A 1024 x 1024 image fills a column a few hundred pixels wide: the zoom shows a part of it, pixel for pixel."""
    require_shipped(IMAGE_MODEL)
    shown = []
    upscale = display.upscale
    monkeypatch.setattr(display, "upscale", lambda picture, *a, **k: shown.append(picture) or upscale(picture, *a, **k))
    path = dsb_png(data_root)
    upload(app, "image_upload", path.name, path.read_bytes())
    ok(app)
    whole = shown[-2]  # the overlay, then the input beside it
    assert whole.shape == (256, 256, 3) and app.select_slider(key="zoom").value == 1
    app.select_slider(key="zoom").set_value(4).run()
    ok(app)
    assert np.array_equal(shown[-2], whole[96:160, 96:160])  # the middle quarter of each side
    app.slider(key="zoom_across").set_value(0).run()
    app.slider(key="zoom_down").set_value(100).run()
    assert np.array_equal(shown[-2], whole[192:, :64])  # bottom left
    assert model_calls == ["predict"]
    assert captions(app)[0] == f"{IMAGE_MODEL} (int8): image"
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())  # a new input starts unzoomed
    assert app.select_slider(key="zoom").value == 1 and "zoom_across" not in [s.key for s in app.slider]


def test_a_large_image_shows_a_progress_bar_over_its_windows(app, monkeypatch):
    """Over the inference memory budget an image is segmented window by window: a bar, not only a spinner."""
    from streamlit.delta_generator import DeltaGenerator

    from unetseg.infer import INFER_MEMORY_ENV

    require_shipped(IMAGE_MODEL)
    monkeypatch.setenv(INFER_MEMORY_ENV, "64")  # this 600 x 700 image needs more in one pass: windows
    shown: list[tuple[float, str]] = []
    progress = DeltaGenerator.progress
    monkeypatch.setattr(DeltaGenerator, "progress",
                        lambda self, value, text=None, **k: shown.append((value, text)) or progress(self, value, text, **k))
    pixels = (np.random.default_rng(0).random((600, 700, 3)) * 255).astype(np.uint8)
    upload(app, "image_upload", "large.png", _png(pixels))
    ok(app)
    updates = [(v, t) for v, t in shown if t]  # the first call makes the bar (no text), then one per batch of windows
    assert updates, "no progress bar while the image was segmented window by window"  # before: a spinner only
    total = int(updates[-1][1].rsplit(" ", 1)[1])
    assert total > 1 and updates[-1] == (1.0, f"Segmenting: window {total} of {total}"), shown
    values = [v for v, _ in updates]
    assert len(values) >= 2 and values == sorted(values) and 0 < values[0] < 1, shown
    assert not app.get("progress")  # removed once the mask is there
    labels = Segmenter.from_checkpoint(IMAGE_MODEL).predict(pixels, channel_axis=-1)
    assert table_with(app, "area (pixels)")["area (pixels)"].tolist() == [int((labels == 1).sum())]
    app.slider(key="opacity").set_value(0.8).run()  # a rerun replays the cached prediction, bar and all
    ok(app)
    assert not app.get("progress")
    shown.clear()
    app.checkbox(key="uncertainty").check().run()  # flip TTA: one windowed pass per flip, each with its bar
    ok(app)
    assert shown[-1] == (1.0, f"Test-time augmentation (one pass per flip): window {total} of {total}"), shown
    assert not app.get("progress")


def test_dsb_ground_truth_from_a_zip_of_masks_equals_unetseg_evaluate(app, data_root):
    require_shipped(IMAGE_MODEL)
    import zipfile

    path = dsb_png(data_root)
    buf = pyio.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for mask in sorted((path.parents[1] / "masks").glob("*.png")):
            archive.write(mask, mask.name)
    upload(app, "image_upload", path.name, path.read_bytes())
    upload(app, "label_upload", "masks.zip", buf.getvalue())
    ok(app)
    for int8 in (True, False):  # the viewer's default, then with the switch off: each as unetseg evaluate scores it
        _, row = evaluate_one_case(IMAGE_MODEL, "dsb2018", DSB_CASE, data_root, int8=int8)
        metrics = table_with(app, "Dice")
        assert metrics["Dice"].tolist() == [row["dice_nucleus"]]
        assert metrics["HD95 (px)"].tolist() == pytest.approx([row["hd95_nucleus"]], nan_ok=True)
        app.checkbox(key="int8").uncheck().run()
        ok(app)
    assert captions(app)[0] == f"{IMAGE_MODEL}: image"


def test_mismatched_models_get_a_warning(app, data_root):
    require_shipped(VOLUME_MODEL, "hippocampus_2d", "dsb2018_2d")
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.selectbox(key="model").set_value("dsb2018_2d").run()
    assert not app.error and not app.exception
    assert len(app.warning) == 1 and "not volumes; pick a volume model" in app.warning[0].value
    assert len(app.image) == 0  # that model cannot run on a volume
    path = dsb_png(data_root)
    upload(app, "image_upload", path.name, path.read_bytes())
    assert app.selectbox(key="model").value == "dsb2018_2d" and not app.warning  # a new input picks a suitable model
    app.selectbox(key="model").set_value("hippocampus_2d").run()
    ok(app)
    assert len(app.warning) == 1 and "trained on hippocampus" in app.warning[0].value
    assert captions(app)[0] == "hippocampus_2d: image"  # it still runs: grey conversion
    app.selectbox(key="model").set_value(VOLUME_MODEL).run()
    assert not app.error and not app.exception
    assert len(app.warning) == 1 and "this 3D model segments volumes" in app.warning[0].value
    assert len(app.image) == 0  # a 3D network cannot run on a 2D image


# ---------------------------------------------------------------- bad input


def _nifti(data: np.ndarray, compress: bool = True) -> bytes:
    raw = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    return gzip.compress(raw) if compress else raw


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = pyio.BytesIO()
    (Image.fromarray(pixels, mode=mode) if mode else Image.fromarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_with_nan(field: str) -> bytes:
    """A NIfTI whose sform row x (``srow_x``) or voxel width (``pixdim``) is NaN.

    nibabel refuses to build such an image, so the header of a good one is edited.
    """
    good = nib.Nifti1Image(np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10), np.eye(4)).to_bytes()
    header = nib.Nifti1Header.from_fileobj(pyio.BytesIO(good))
    if field == "srow_x":
        header["srow_x"] = [np.nan, 0.0, 0.0, 0.0]
    else:
        header["pixdim"][1] = np.nan
    header["sform_code"] = 1
    return gzip.compress(header.binaryblock + good[len(header.binaryblock):])


def _dicom_zero_orientation() -> bytes:
    """A zip of a four-slice DICOM series whose ImageOrientationPatient is all zero."""
    from .test_dicom import dicom_bytes, zip_bytes

    pixels = np.random.default_rng(0).integers(0, 800, (40, 48))
    return zip_bytes({f"IM{k}.dcm": dicom_bytes(pixels, (0.0, 0.0, 2.5 * k), orientation=(0,) * 6) for k in range(4)})


def bad_upload(kind: str, data_root: Path) -> tuple[str, bytes]:
    image_path, _ = hippocampus_files(data_root)
    if kind == "wrong type":
        return "report.pdf", b"%PDF-1.4 not an image"
    if kind == "empty":
        return "scan.nii.gz", b""
    if kind == "truncated":
        data = image_path.read_bytes()
        return image_path.name, data[: len(data) // 2]
    if kind == "truncated .nii":
        data = gzip.decompress(image_path.read_bytes())
        return "scan.nii", data[: len(data) // 2]
    if kind == "NaN affine":
        return "nan_affine.nii.gz", _nifti_with_nan("srow_x")
    if kind == "NaN voxel size":
        return "nan_pixdim.nii.gz", _nifti_with_nan("pixdim")
    if kind == "zero DICOM orientation":
        return "series.zip", _dicom_zero_orientation()
    if kind == "corrupt":
        return "cells.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    if kind == "4D volume":
        return "fmri.nii.gz", _nifti(np.zeros((8, 8, 8, 4), dtype=np.float32))
    if kind == "wrong channel count":
        return "two_channels.png", _png(np.zeros((16, 16, 2), dtype=np.uint8), mode="LA")
    if kind == "over the size limit":
        return image_path.name, image_path.read_bytes()
    raise ValueError(kind)


EXPECTED = {
    "wrong type": "unsupported file type",
    "empty": "file is empty",
    "truncated": "not a readable NIfTI file",
    "truncated .nii": "not a readable NIfTI file",
    "NaN affine": "affine",
    "NaN voxel size": "pixdim",
    "zero DICOM orientation": "ImageOrientationPatient",
    "corrupt": "not a readable image",
    "4D volume": "expected a 3D volume",
    "wrong channel count": "expected a grey, RGB or RGBA 2D image",
    "over the size limit": "upload limit",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_input_shows_one_error_and_the_app_keeps_working(kind, app, data_root, monkeypatch):
    require_shipped(VOLUME_MODEL)
    name, data = bad_upload(kind, data_root)
    image_path, _ = hippocampus_files(data_root)
    image, _ = io.read_image(image_path)
    z = nib.load(image_path).shape[2]

    def send_bad() -> None:
        if kind == "over the size limit":
            monkeypatch.setenv("UNETSEG_MAX_UPLOAD_MB", "0.02")  # the real case is about 50 kB
        upload(app, "image_upload", name, data)
        monkeypatch.delenv("UNETSEG_MAX_UPLOAD_MB", raising=False)
        assert not app.exception
        assert len(app.error) == 1
        message = app.error[0].value
        assert message.startswith(f"{name}: ") and EXPECTED[kind] in message and "Traceback" not in message
        assert "Something went wrong" not in message
        assert_public(message)
        assert len(app.image) == 0

    def send_good() -> None:
        upload(app, "image_upload", image_path.name, image_path.read_bytes())
        ok(app)
        assert captions(app)[0] == f"{VOLUME_MODEL}: axial slice {z // 2}"  # with fresh view defaults
        assert app.slider(key="width").value == pytest.approx(display.default_window(image)[1])

    send_bad()
    send_good()  # the same session recovers
    send_bad()
    send_good()


def test_bad_ground_truth_is_reported_and_the_prediction_still_shows(app, data_root):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    _, other_label = hippocampus_files(data_root, "hippocampus_001")  # another case: another shape
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    upload(app, "label_upload", other_label.name, other_label.read_bytes())
    assert not app.exception and len(app.error) == 1
    assert "Ground truth not used" in app.error[0].value and "does not match the image shape" in app.error[0].value
    assert captions(app)[0].startswith(f"{VOLUME_MODEL}:")


def test_unreadable_ground_truth_names_the_upload_not_a_temporary_file(app, data_root):
    require_shipped(VOLUME_MODEL)
    image_path, label_path = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    data = gzip.decompress(label_path.read_bytes())
    upload(app, "label_upload", "truth.nii", data[: len(data) // 2])
    assert not app.exception and len(app.error) == 1
    message = app.error[0].value
    assert message.startswith("Ground truth not used: truth.nii: not a readable NIfTI file") and "from truth.nii" in message
    assert_public(message)
    assert captions(app)[0].startswith(f"{VOLUME_MODEL}:")


# ---------------------------------------------------------------- hostile checkpoints and cross-user caches


def broken_checkpoint(kind: str, folder: Path) -> Path:
    import torch

    from unetseg.infer import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

    path = folder / f"{kind.replace(' ', '_')}.pt"
    if kind == "missing":
        return path
    if kind == "not a checkpoint":
        path.write_bytes(b"these are not the weights you are looking for")
        return path
    if kind == "no model arguments":
        torch.save({"format": CHECKPOINT_FORMAT, "class_names": ["background", "x"]}, path)
        return path
    payload = load_checkpoint("hippocampus_2d")
    payload["model_args"] = {**payload["model_args"], "channels": [8, 16, 32, 64]}  # the weights no longer fit
    return save_checkpoint(payload, path)


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint", "no model arguments", "weights that do not fit"])
def test_a_broken_checkpoint_path_is_one_error_and_the_page_and_upload_stay(kind, app, data_root, tmp_path):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    before = captions(app)
    path = broken_checkpoint(kind, tmp_path)
    app.sidebar.text_input(key="checkpoint_path").set_value(str(path)).run()
    assert not app.exception
    assert len(app.error) == 1 and len(app.sidebar.error) == 1  # one line, under the box
    message = app.sidebar.error[0].value
    assert message.startswith("Checkpoint not used: ") and str(path) in message and "\n" not in message
    assert "; " in message.split(str(path), 1)[1]  # what is wrong, then what to do
    assert str(path) not in app.selectbox(key="model").options
    assert captions(app) == before  # the upload and its overlay are still there
    assert app.download_button(key="download").label.endswith(f"({CASE}_prediction.nii.gz)")
    app.sidebar.text_input(key="checkpoint_path").set_value("").run()
    ok(app)


def test_class_names_from_a_checkpoint_are_escaped_in_the_legend(app, data_root, tmp_path):
    require_shipped("hippocampus_2d")
    import torch

    from unetseg.infer import load_checkpoint, save_checkpoint

    payload = load_checkpoint("hippocampus_2d")
    payload["class_names"] = ["background", '<img src=x onerror="alert(1)">', "</span><b>bold</b>"]
    hostile = save_checkpoint(payload, tmp_path / "hostile.pt")
    assert torch.load(hostile, weights_only=True)["class_names"][1].startswith("<img")
    image_path, _ = hippocampus_files(data_root)
    upload(app, "image_upload", image_path.name, image_path.read_bytes())
    app.sidebar.text_input(key="checkpoint_path").set_value(str(hostile)).run()
    app.selectbox(key="model").set_value(str(hostile)).run()
    ok(app)
    legend = next(m.value for m in app.markdown if m.value.startswith("Legend"))
    assert "<img" not in legend and "<b>" not in legend and "</span><b>" not in legend
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in legend and "&lt;/span&gt;&lt;b&gt;bold" in legend


def test_download_is_named_after_this_upload_not_an_earlier_one_with_the_same_bytes(app, data_root):
    require_shipped(VOLUME_MODEL)
    image_path, _ = hippocampus_files(data_root)
    data = image_path.read_bytes()
    upload(app, "image_upload", "smith_john_MRN123456.nii.gz", data)
    ok(app)
    assert app.download_button(key="download").label.endswith("(smith_john_MRN123456_prediction.nii.gz)")
    second = AppTest.from_file(str(APP), default_timeout=180)  # another browser tab: same server caches
    second.run()
    upload(second, "image_upload", "anonymous.nii.gz", data)
    ok(second)
    assert second.download_button(key="download").label.endswith("(anonymous_prediction.nii.gz)")


# ---------------------------------------------------------------- layering


def test_package_never_imports_streamlit_and_app_does_no_array_work():
    for path in (REPO / "unetseg").rglob("*.py"):
        assert "streamlit" not in top_level_imports(path), f"{path} imports streamlit"
    assert "streamlit" in top_level_imports(APP)  # the check sees imports at all
    assert not top_level_imports(APP) & {"torch", "monai", "nibabel", "pydicom", "skimage", "scipy"}


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_model_labels_are_short_enough_for_the_sidebar_and_say_what_their_figure_is(app):
    import re

    box = app.selectbox(key="model")
    assert len(box.options) >= 2
    assert all(re.fullmatch(r"\S+ \(0\.\d{3}\)", label) for label in box.options), box.options
    assert max(len(label) for label in box.options) <= 30  # "name · Dice 0.852" was cut off in the sidebar
    assert "validation mean Dice" in box.help

"""`unetseg export --format onnx|torchscript`: the model files give the torch model's probabilities and masks."""

from __future__ import annotations

import builtins
import json
import tomllib

import numpy as np
import pytest

from unetseg import model_export
from unetseg.cli import main
from unetseg.data import io
from unetseg.infer import Segmenter, load_checkpoint

from .conftest import REPO

DSB_ODD = "0402a81e75262469925ea893b6706183832e85324f7b1e08e634129f5d522cdd"  # 260 x 347: no side a multiple of 8
HIPPOCAMPUS = "hippocampus_003"  # 34 x 52 x 35
MODELS = ("hippocampus_2d", "dsb2018_2d", "hippocampus_3d")
SUFFIX = {"onnx": "onnx", "torchscript": "pt"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple[str, str], object]:
    """Each model in each format, written by the command line (ONNX takes a few seconds per model)."""
    folder = tmp_path_factory.mktemp("model_files")
    files = {}
    for name in MODELS:
        for fmt in model_export.FORMATS:
            out = folder / f"{name}.{SUFFIX[fmt]}"
            assert main(["export", "--format", fmt, "--checkpoint", name, "--out", str(out)]) == 0
            files[name, fmt] = out
    return files


def real_image(name: str, data_root) -> np.ndarray:
    """A real case for the model, normalised ``(C, *S)``: a DSB image or a whole hippocampus volume."""
    if name.startswith("dsb"):
        path = data_root / "dsb2018_stage1_train" / DSB_ODD / "images" / f"{DSB_ODD}.png"
    else:
        path = data_root / "Task04_Hippocampus" / "imagesTr" / f"{HIPPOCAMPUS}.nii.gz"
    image, _ = io.read_image(path)
    return Segmenter.from_checkpoint(name).prepare(image, channel_axis=0)


@pytest.mark.parametrize("fmt", model_export.FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_model_file_gives_the_torch_models_probabilities_and_masks(exported, data_root, name, fmt):
    image = real_image(name, data_root)
    path = exported[name, fmt]
    forward = model_export.onnx_forward(path, threads=1) if fmt == "onnx" else model_export.torchscript_forward(path)
    metadata = model_export.read_metadata(path)
    expected = Segmenter.from_checkpoint(name).predict_proba(image, normalized=True)
    got = model_export.exported_probabilities(forward, image, metadata)
    assert got.shape == expected.shape == (len(metadata["class_names"]), *image.shape[1:])
    assert np.abs(got - expected).max() < 1e-4
    np.testing.assert_array_equal(got.argmax(axis=0), expected.argmax(axis=0))
    assert got.argmax(axis=0).any()  # the model finds something here, so equal masks say something


def test_onnx_file_carries_preprocessing_classes_and_dynamic_axes(exported):
    import onnx

    path = exported["hippocampus_3d", "onnx"]
    payload = load_checkpoint("hippocampus_3d")
    model = onnx.load(str(path))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props == json.loads(model_export.metadata_path(path).read_text())
    assert props["class_names"] == list(payload["class_names"])
    assert props["preprocessing"] == payload["preprocessing"]
    assert props["size_multiple"] == 8 and props["spatial_dims"] == 3 and "softmax over axis 1" in props["output"]
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims[1] == 1 and all(isinstance(d, str) and d for d in dims[:1] + dims[2:])  # batch and sides dynamic
    assert model_export.read_metadata(exported["hippocampus_3d", "torchscript"])["preprocessing"] == payload["preprocessing"]


def test_model_file_metadata_is_read_from_the_file_when_the_json_is_gone(exported, tmp_path):
    for fmt in model_export.FORMATS:
        copy = tmp_path / exported["dsb2018_2d", fmt].name
        copy.write_bytes(exported["dsb2018_2d", fmt].read_bytes())
        assert model_export.read_metadata(copy)["class_names"] == list(load_checkpoint("dsb2018_2d")["class_names"])


def test_export_refuses_to_replace_a_file_and_wrong_combinations_in_one_line(exported, tmp_path, capsys):
    out = exported["hippocampus_2d", "torchscript"]
    before = out.read_bytes()
    assert main(["export", "--format", "torchscript", "--checkpoint", "hippocampus_2d", "--out", str(out)]) == 2
    assert out.read_bytes() == before
    for argv in (["export", "--format", "onnx", "--checkpoint", "hippocampus_2d"],  # no --out
                 ["export", "runs/x", "--format", "onnx", "--out", str(tmp_path / "m.onnx")],  # a run, no --checkpoint
                 ["export", "runs/x"],  # no --name
                 ["export", "--format", "torchscript", "--checkpoint", "no_such_model", "--out", str(tmp_path / "m.pt")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_without_onnx_installed_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert main(["export", "--format", "onnx", "--checkpoint", "hippocampus_2d", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ONNX export needs the optional package 'onnxruntime': pip install 'unetseg[onnx]'"]
    assert list(tmp_path.iterdir()) == []


def test_onnx_is_an_optional_extra_that_the_test_extra_installs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {req.split(">")[0] for req in extras["onnx"]} == {"onnx", "onnxscript", "onnxruntime"}
    own = {e.strip() for req in extras["test"] if req.startswith("unetseg[") for e in req[len("unetseg["):-1].split(",")}
    assert "onnx" in own  # the test extra pulls the onnx extra in (with others)
    assert not any(req.startswith("onnx") for req in project["dependencies"])

"""The checkpoint contract (unetseg.checkpoint): shipped and run checkpoints load, round-trip unchanged, and keep
their old meaning (TTA flips of checkpoints older than the entry); one network is built per load."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from unetseg import checkpoint as ckpt_module
from unetseg.checkpoint import (
    CHECKPOINT_FORMAT,
    PRETRAINED_DIR,
    Checkpoint,
    Preprocessing,
    checkpoint_tta_flips,
    load_checkpoint,
    model_arguments,
    resolve_checkpoint,
    save_checkpoint,
    shipped_models,
)
from unetseg.config import ModelConfig
from unetseg.errors import DataError, UnetsegError
from unetseg.model import UNet

SHIPPED = ["dsb2018_2d", "dsb2018_2d_noskip", "hippocampus_2d", "hippocampus_2d_noskip", "hippocampus_3d"]


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Equal nested dicts / lists / tensors (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {set(a) ^ set(b) if isinstance(b, dict) else b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        same = a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
        assert same and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Checkpoint, b: Checkpoint) -> None:
    for f in dataclasses.fields(Checkpoint):
        if f.init:
            value = getattr(a, f.name)
            other = getattr(b, f.name)
            if isinstance(value, (Preprocessing, type(None))):
                assert value == other, f.name
            else:
                assert_same(vars(value) if dataclasses.is_dataclass(value) else value,
                            vars(other) if dataclasses.is_dataclass(other) else other, f.name)


def test_every_shipped_model_is_found_and_loads():
    assert set(SHIPPED) <= set(shipped_models())
    for name in shipped_models():
        assert resolve_checkpoint(name) == PRETRAINED_DIR / name / "model.pt"
        ckpt = Checkpoint.load(name)
        assert ckpt.class_names[0] == "background" and len(ckpt.class_names) == ckpt.model_args["out_channels"]
        assert ckpt.preprocessing.in_channels == ckpt.model_args["in_channels"]
        assert len(ckpt.preprocessing.patch_size) == ckpt.spatial_dims
        assert ckpt.dataset in ("hippocampus", "dsb2018") and ckpt.split and ckpt.split["val"]
        assert ckpt.training is None and ckpt.extra == {}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_round_trip_unchanged(name, tmp_path):
    """load -> save -> load: identical fields and tensors, and the file holds the very dict the shipped one does."""
    original = torch.load(PRETRAINED_DIR / name / "model.pt", map_location="cpu", weights_only=True)
    first = Checkpoint.load(name)
    saved = first.save(tmp_path / "model.pt")
    second = Checkpoint.load(saved)
    assert_same_checkpoint(first, second)
    assert_same(original, torch.load(saved, map_location="cpu", weights_only=True))
    assert_same(original, first.to_dict())
    assert_same(Checkpoint.from_dict(load_checkpoint(name)).to_dict(), original)


def test_a_run_checkpoint_keeps_its_training_state_through_a_round_trip(tiny_run, tmp_path):
    last = Checkpoint.load(tiny_run / "last.pt")
    assert last.training is not None and last.metrics is not None and last.epoch == 0
    assert isinstance(last.training.optimizer, dict) and last.training.best_epoch == 0
    assert last.tta_flips == ((), (0,)) and last.flips == [(), (0,)]  # hippocampus_2d flips along axis 0 only
    again = Checkpoint.load(last.save(tmp_path / "last.pt"))
    assert_same_checkpoint(last, again)
    assert_same(torch.load(tiny_run / "last.pt", weights_only=True), torch.load(tmp_path / "last.pt", weights_only=True))


def test_without_training_state_keeps_what_export_kept(tiny_run):
    """The entries a shipped model holds: what export.py's explicit keep-list held before the module existed."""
    keep = ("format", "unetseg_version", "model_args", "state_dict", "preprocessing", "class_names", "tta_flips",
            "dataset", "split", "epoch", "config")
    payload = load_checkpoint(tiny_run / "last.pt")
    shipped = Checkpoint.from_dict(payload).without_training_state().to_dict()
    assert_same(shipped, {k: payload[k] for k in keep if k in payload})


def test_unknown_entries_survive_a_round_trip(tmp_path):
    payload = load_checkpoint("hippocampus_2d")
    payload["note"] = {"by": "a later version"}
    payload["best_metric"] = 0.5  # part of a training state only: kept as it is, not a TrainingState
    ckpt = Checkpoint.from_dict(payload)
    assert ckpt.training is None and ckpt.extra == {"note": {"by": "a later version"}, "best_metric": 0.5}
    assert_same(Checkpoint.load(ckpt.save(tmp_path / "x.pt")).to_dict(), payload)


def test_one_network_is_built_per_load(monkeypatch):
    """load() checks the weights in a network and hands that network over: no second build for the Segmenter."""
    from unetseg.infer import Segmenter

    built = []

    class Counted(UNet):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "UNet", Counted)
    seg = Segmenter.from_checkpoint("hippocampus_2d")
    assert len(built) == 1 and isinstance(seg.model, Counted)
    ckpt = Checkpoint.load("hippocampus_3d")
    first, second = ckpt.build_model(), ckpt.build_model()  # the second call builds a network of its own
    assert len(built) == 3 and first is not second
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_segmenter_from_a_dict_and_from_a_checkpoint_agree():
    from unetseg.infer import Segmenter

    a = Segmenter.from_payload(load_checkpoint("dsb2018_2d"))
    b = Segmenter.from_checkpoint("dsb2018_2d")
    assert a.preprocessing == b.preprocessing == Checkpoint.load("dsb2018_2d").preprocessing
    assert a.class_names == b.class_names and a.dataset == "dsb2018"
    assert a.tta_flips == b.tta_flips == [(), (0,), (1,), (0, 1)]  # trained with each axis mirrored on its own


def test_old_checkpoints_without_tta_flips_keep_their_flips():
    """2D checkpoints from before the entry flipped both axes together; 3D ones each axis on its own; none
    when augmentation flips were off."""
    for name, dims in (("hippocampus_2d", 2), ("hippocampus_3d", 3)):
        payload = load_checkpoint(name)
        del payload["tta_flips"]
        ckpt = Checkpoint.from_dict(payload)
        expected = [(), (0, 1)] if dims == 2 else [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
        assert ckpt.tta_flips is None and ckpt.flips == checkpoint_tta_flips(payload) == expected
        payload["config"]["augment"]["flip"] = False
        assert Checkpoint.from_dict(payload).flips == checkpoint_tta_flips(payload) == [()]


def test_model_arguments_are_every_model_setting():
    """Every ModelConfig field is a UNet argument and goes into the checkpoint; a shipped config rebuilds its args."""
    unet_args = set(inspect.signature(UNet.__init__).parameters) - {"self"}
    args = model_arguments(ModelConfig(), 1, 3)
    assert set(args) <= unet_args and {f.name for f in dataclasses.fields(ModelConfig)} < set(args)
    assert UNet(**args).spatial_dims == 2
    ckpt = Checkpoint.load("hippocampus_2d")
    model_cfg = ModelConfig(**ckpt.config["model"])
    args = model_arguments(model_cfg, 1, 3)
    assert {k: v for k, v in args.items() if k in ckpt.model_args} == ckpt.model_args
    defaults = {name: p.default for name, p in inspect.signature(UNet.__init__).parameters.items()}
    assert all(args[k] == defaults[k] for k in set(args) - set(ckpt.model_args))  # added since: their defaults


def test_preprocessing_reads_and_writes_the_checkpoint_entry():
    entry = {"normalization": "zscore", "slice_axis": 0, "patch_size": [40, 56, 40], "in_channels": 1}
    pre = Preprocessing.from_dict(entry)
    assert pre == Preprocessing("zscore", 0, (40, 56, 40), 1) and pre.to_dict() == entry
    assert Preprocessing.from_dict({k: v for k, v in entry.items() if k != "slice_axis"}).slice_axis == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.in_channels = 3  # type: ignore[misc]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.pop("class_names"), "entry 'class_names' is missing"),
    (lambda p: p["preprocessing"].update(in_channels=3), "preprocessing in_channels 3 differs"),
    (lambda p: p.update(tta_flips=[[0]]), "tta_flips [[0]] must be"),
    (lambda p: p["model_args"].update(channels=[8, 16]), "do not fit the network"),
    (lambda p: p.update(format="other"), f"expected format {CHECKPOINT_FORMAT}"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(damage, message, tmp_path):
    payload = load_checkpoint("hippocampus_2d")
    damage(payload)
    path = save_checkpoint(payload, tmp_path / "damaged.pt")
    for load in (Checkpoint.load, load_checkpoint):
        with pytest.raises(DataError) as info:
            load(path)
        assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_pickle_with_code_is_refused_and_unknown_names_list_the_shipped_models(tmp_path):
    bad = tmp_path / "code.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": Path("a")}, bad)  # a Path is not allowed under weights_only
    with pytest.raises(DataError, match="not a loadable unetseg checkpoint"):
        Checkpoint.load(bad)
    with pytest.raises(UnetsegError, match="hippocampus_2d"):
        Checkpoint.resolve("no_such_model")


def test_a_run_folder_resolves_to_its_best_checkpoint(tiny_run):
    assert resolve_checkpoint(tiny_run) == tiny_run / "best.pt"
    assert Checkpoint.load(tiny_run).epoch == Checkpoint.load(tiny_run / "best.pt").epoch


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt = Checkpoint.load("hippocampus_2d")
    path = ckpt.save(tmp_path / "m.pt")
    before = path.read_bytes()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        ckpt.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]

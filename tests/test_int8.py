"""Int8 inference (unetseg.model.int8, unetseg quantize): the quantized network computes the float network's function
within quantization error, on random networks and on the shipped DSB model with real images; calibration files are
tied to their checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unetseg.checkpoint import Checkpoint, int8_calibration_path, read_int8_calibration, resolve_checkpoint
from unetseg.cli import main
from unetseg.data.datasets import dataset_info, list_all_cases, load_cases
from unetseg.errors import UnetsegError
from unetseg.evaluate import evaluate
from unetseg.infer import Segmenter, inference_network
from unetseg.model import UNet
from unetseg.model.int8 import Int8UNet, _pixel_shuffle, activation_ranges, int8_problem

IMAGE_MODEL = "dsb2018_2d"


def test_pixel_shuffle_of_channels_last_quantized_maps_is_torchs_pixel_shuffle():
    x = torch.rand(2, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    q = torch.quantize_per_tensor(x, 0.01, 3, torch.quint8)
    shuffled = _pixel_shuffle(q)
    assert shuffled.shape == (2, 3, 10, 14) and shuffled.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(shuffled.dequantize(), F.pixel_shuffle(q.dequantize(), 2))


def random_network(skips, act: str) -> UNet:
    """A float network with random weights and batch-norm statistics, batch norm folded (as Int8UNet takes it)."""
    torch.manual_seed(0)
    net = UNet(2, 3, 3, channels=(8, 16, 32), skips=skips, act=act)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return inference_network(net.eval(), portable=True)


@pytest.mark.parametrize("skips,act", [(True, "leaky_relu"), ((True, False), "relu"), (False, "leaky_relu")])
def test_int8_network_computes_the_float_network_within_quantization_error(skips, act):
    net = random_network(skips, act)
    images = [torch.rand(3, 40, 56) for _ in range(6)]
    int8 = Int8UNet(net, activation_ranges(net, images))
    x = torch.rand(2, 3, 37, 45)  # odd sizes: padded to 40 x 48 and cropped back
    with torch.inference_mode():
        expected, got = net(x), int8(x)
    assert got.shape == expected.shape == (2, 3, 37, 45) and got.dtype == torch.float32
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 0.08, f"int8 logits off by {error:.1%} of their range"
    # the quantized transposed convolutions (1x1 + pixel shuffle) must put each value where the float one does:
    # a misplaced map decorrelates the logits
    assert np.corrcoef(got.flatten(), expected.flatten())[0, 1] > 0.995
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean()
    assert agreement > 0.95


def test_networks_int8_does_not_cover_are_refused_with_the_reason():
    assert int8_problem(UNet(3, 1, 2, channels=(4, 8))).startswith("int8 inference is for 2D")
    assert "residual=False" in int8_problem(UNet(2, 1, 2, channels=(4, 8), residual=True))
    assert "InstanceNorm2d" in int8_problem(UNet(2, 1, 2, channels=(8, 8), norm="instance"))
    assert "concat" in int8_problem(UNet(2, 1, 2, channels=(8, 8), merge="add"))
    assert "stage_blocks" in int8_problem(UNet(2, 1, 2, channels=(4, 8), stage_blocks=2))
    lesioned = UNet(2, 1, 2, channels=(4, 8, 16))
    lesioned.lesion_skips([1])
    assert "lesioned long skips (levels [1])" in int8_problem(lesioned)
    with pytest.raises(ValueError, match="fold batch norm"):
        Int8UNet(UNet(2, 1, 2, channels=(4, 8)).eval(), {})
    with pytest.raises(ValueError, match="fold batch norm"):  # ranges of unfolded convolutions would not fit
        activation_ranges(UNet(2, 1, 2, channels=(4, 8)).eval(), [torch.rand(1, 8, 8)])
    net = inference_network(UNet(2, 1, 2, channels=(4, 8)).eval(), portable=True)
    with pytest.raises(ValueError, match="no calibration range for"):
        Int8UNet(net, {"input": (0.0, 1.0)})


def test_shipped_dsb_calibration_fits_its_model_and_records_a_small_cost():
    record = read_int8_calibration(IMAGE_MODEL)  # raises if model.pt changed since it was calibrated
    val = record["validation"]
    assert val["cases"] == 120
    assert abs(val["mean_dice_int8"] - val["mean_dice_float32"]) < 0.005
    assert val["label_agreement_mean"] > 0.99
    assert not set(record["calibration"]["cases"]) & set(dsb_validation_cases())


def dsb_validation_cases() -> list[str]:
    return Checkpoint.load(IMAGE_MODEL).split["val"]


def test_int8_dsb_model_segments_real_validation_images_as_float32_does(data_root):
    float32 = Segmenter.from_checkpoint(IMAGE_MODEL)
    int8 = Segmenter.from_checkpoint(IMAGE_MODEL, int8=True)
    every, info = list_all_cases(dataset_info("dsb2018"), data_root)
    wanted = dsb_validation_cases()[:4]
    for case in load_cases([r for r in every if r.case_id in wanted], info, float32.preprocessing.normalization):
        a = float32.predict(case.image, normalized=True)
        b = int8.predict(case.image, normalized=True)
        assert (a == b).mean() > 0.98, case.case_id
        truth = case.label.squeeze() > 0
        dice = [2 * (p.astype(bool) & truth).sum() / (p.astype(bool).sum() + truth.sum()) for p in (a, b)]
        assert abs(dice[0] - dice[1]) < 0.03, (case.case_id, dice)
    tta = int8.predict_proba(case.image, normalized=True, tta=True)
    assert tta.shape == (2, *case.image.shape[1:]) and np.allclose(tta.sum(0), 1, atol=1e-5)
    ranges = int8.int8_ranges
    int8.int8_ranges = None  # switched off: float32 again, not the int8 network built before
    assert np.array_equal(int8.predict(case.image, normalized=True), a)
    ranges["input"] = (ranges["input"][0], 10 * ranges["input"][1])  # other ranges: a new int8 network
    int8.int8_ranges = ranges
    assert not np.array_equal(int8.predict(case.image, normalized=True), b)


def test_calibration_is_refused_once_its_checkpoint_changes(tmp_path):
    model = tmp_path / "model.pt"
    shutil.copyfile(resolve_checkpoint(IMAGE_MODEL), model)
    with pytest.raises(UnetsegError, match="no int8 calibration .*unetseg quantize"):
        Segmenter.from_checkpoint(model, int8=True)
    shutil.copyfile(int8_calibration_path(resolve_checkpoint(IMAGE_MODEL)), int8_calibration_path(model))
    assert Segmenter.from_checkpoint(model, torch.device("cpu"), int8=True).int8_ranges is not None
    record = json.loads(int8_calibration_path(model).read_text())
    del record["validation"]["mean_dice_int8"]  # what the viewer shows: a file without it is not a calibration
    int8_calibration_path(model).write_text(json.dumps(record))
    with pytest.raises(UnetsegError, match="not an int8 calibration file"):
        read_int8_calibration(model)
    shutil.copyfile(int8_calibration_path(resolve_checkpoint(IMAGE_MODEL)), int8_calibration_path(model))
    with model.open("ab") as f:  # other bytes, as a retrained or replaced checkpoint has
        f.write(b"\0")
    with pytest.raises(UnetsegError, match="made for other weights"):
        read_int8_calibration(model)
    int8_calibration_path(model).write_text("{")
    with pytest.raises(UnetsegError, match="not an int8 calibration file"):
        read_int8_calibration(model)


def test_quantize_command_calibrates_on_training_images_and_predict_and_evaluate_use_it(tiny_run, data_root,
                                                                                       tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(tiny_run / "best.pt", checkpoint)
    assert main(["quantize", str(checkpoint), "--data-root", str(data_root), "--cases", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mean Dice float32" in out and str(int8_calibration_path(checkpoint)) in out
    record = json.loads(int8_calibration_path(checkpoint).read_text())
    val = record["validation"]
    assert len(record["calibration"]["cases"]) == 3 and val["cases"] >= 1
    assert not set(record["calibration"]["cases"]) & set(torch.load(checkpoint, weights_only=True)["split"]["val"])
    assert val["label_agreement_mean"] > 0.9
    summary = evaluate(str(checkpoint), data_root, None, "val", tmp_path / "eval", progress=False, int8=True)
    assert summary["int8"] and summary["mean_dice"] == pytest.approx(val["mean_dice_int8"])
    image = next((data_root / "Task04_Hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))
    assert main(["predict", str(image), "--out", str(tmp_path / "pred"), "--checkpoint", str(checkpoint),
                 "--int8", "--quiet", "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / image.name).is_file()
    capsys.readouterr()
    assert main(["quantize", "hippocampus_3d", "--data-root", str(data_root)]) == 2
    assert "int8 inference is for 2D networks" in capsys.readouterr().err
    assert main(["predict", str(image), "--out", str(tmp_path / "pred3d"), "--checkpoint", "hippocampus_3d",
                 "--int8", "--quiet", "--device", "cpu"]) == 2  # says why, not "make a calibration"
    assert "hippocampus_3d: int8 inference is for 2D networks" in capsys.readouterr().err

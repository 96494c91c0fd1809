"""Fast inference: whole images within the memory budget, batched flip TTA, sliding window only above the budget.

Every result is pinned to what the code before it computed: one forward pass of the plain network per flip
member for an image no larger than twice the training patch, MONAI's sliding window with that window for a
larger one (what a budget too small for more still gives), and the two agree away from window seams.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from PIL import Image

from unetseg import infer
from unetseg.cli import main
from unetseg.data import io
from unetseg.errors import UnetsegError
from unetseg.infer import (
    DEFAULT_INFER_MEMORY_MB,
    INFER_MEMORY_ENV,
    Segmenter,
    infer_memory_mb,
    inference_network,
    window_shape,
    windows_along,
)
from unetseg.model import UNet

TINY_MB = 1e-3  # a budget too small for any forward pass: the pre-budget behaviour


def plain_member(seg: Segmenter, image: np.ndarray, flip: tuple[int, ...]) -> np.ndarray:
    """One member as the code before the budget computed it: the unmodified network, one forward pass,
    softmax, mirrored back; a 2D network on a volume sees its slices as one batch."""
    from unetseg.data.preprocess import slices_to_volume, volume_to_slices

    axis = seg.preprocessing.slice_axis
    in_2d = seg.spatial_dims == 2 and image.ndim == 4
    x = torch.from_numpy(np.ascontiguousarray(volume_to_slices(image, axis) if in_2d else image[None]))
    dims = [d + 2 for d in flip]
    with torch.no_grad():
        x = torch.flip(x, dims) if dims else x
        probs = torch.softmax(seg.model(x), dim=1)
        probs = (torch.flip(probs, dims) if dims else probs).numpy()
    return slices_to_volume(probs, axis) if in_2d else probs[0]


def old_sliding_window(seg: Segmenter, image: np.ndarray, flip: tuple[int, ...]) -> np.ndarray:
    """One member of a 2D image larger than twice the training patch, as the code before the budget computed it."""
    roi = tuple(2 * p for p in seg.preprocessing.patch_size)
    dims = [d + 2 for d in flip]
    x = torch.from_numpy(image[None])
    with torch.no_grad():
        logits = sliding_window_inference(torch.flip(x, dims) if dims else x, roi_size=roi, sw_batch_size=64,
                                          predictor=seg.model, overlap=0.25, mode="gaussian")
        probs = torch.softmax(logits, dim=1)
    return (torch.flip(probs, dims) if dims else probs).numpy()[0]


def volume(data_root) -> np.ndarray:
    image, _ = io.read_image(data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz")
    return image


def rgb(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (blobs, not noise: the network's output then has structure)."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).random((*shape, 3))
    return (gaussian_filter(noise, (6, 6, 0)) * 255).astype(np.float32)


def count_passes(seg: Segmenter) -> list[tuple[int, ...]]:
    """Records the input shape of every forward pass of ``seg``'s inference network."""
    shapes: list[tuple[int, ...]] = []
    seg._inference_network().register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


# ------------------------------------------------------------------------------------------------ equal to before

@pytest.mark.parametrize("model", ["hippocampus_2d", "hippocampus_3d"])
def test_a_volume_equals_the_plain_network_with_and_without_tta(model, data_root):
    seg = Segmenter.from_checkpoint(model)
    image = seg.prepare(volume(data_root), channel_axis=0)  # (1, 34, 52, 35): odd sizes, smaller than the old window
    passes = count_passes(seg)
    members = [plain_member(seg, image, f) for f in seg.tta_flips]
    np.testing.assert_allclose(seg.predict_proba(image, normalized=True), members[0], atol=2e-5)
    np.testing.assert_allclose(seg.predict_proba(image, tta=True, normalized=True), np.mean(members, axis=0), atol=2e-5)
    slices = image.shape[1 + seg.preprocessing.slice_axis] if seg.spatial_dims == 2 else 1
    # a 2D model's slices (40 x 56 padded) share one pass, and then with their mirrored copies; a 3D volume
    # (40 x 56 x 40 padded, above SHARED_PASS_MAX_ITEM) and each of its copies have a pass of their own
    expected = [slices, slices * len(seg.tta_flips)] if seg.spatial_dims == 2 else [1] * (1 + len(seg.tta_flips))
    assert [p[0] for p in passes] == expected
    votes = seg.flip_predictions(image, normalized=True)
    assert votes.shape == (len(seg.tta_flips), *image.shape[1:]) and votes.dtype == np.int64
    assert (votes == np.argmax(members, axis=1)).mean() > 0.9999


@pytest.mark.parametrize("shape", [(256, 256), (203, 250), (37, 61)])
def test_an_image_no_larger_than_the_old_window_equals_one_plain_forward_pass(shape):
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    image = seg.prepare(rgb(shape), channel_axis=-1)
    for memory_mb in (None, TINY_MB):  # the old code's single pass, whatever the budget
        seg.memory_mb = memory_mb
        members = [plain_member(seg, image, f) for f in seg.tta_flips]
        np.testing.assert_allclose(seg.predict_proba(image, normalized=True), members[0], atol=2e-5)
        np.testing.assert_allclose(seg.predict_proba(image, tta=True, normalized=True), np.mean(members, axis=0),
                                   atol=2e-5)


def test_a_budget_too_small_for_more_reproduces_the_old_sliding_window(capsys):
    seg = Segmenter.from_checkpoint("dsb2018_2d", device="cpu")
    seg.memory_mb = TINY_MB
    image = seg.prepare(rgb((600, 700)), channel_axis=-1)  # larger than twice the 256 x 256 training patch
    members = [old_sliding_window(seg, image, f) for f in seg.tta_flips]
    np.testing.assert_allclose(seg.predict_proba(image, normalized=True), members[0], atol=2e-5)
    np.testing.assert_allclose(seg.predict_proba(image, tta=True, normalized=True), np.mean(members, axis=0), atol=2e-5)
    assert "it/s]" not in capsys.readouterr().err  # no bar unless asked
    seg.progress = True
    seg.predict_proba(image, normalized=True)
    assert "it/s]" in capsys.readouterr().err.replace("s/it]", "it/s]")  # the bar over the windows


def test_whole_image_and_large_windows_agree_away_from_window_seams():
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    image = seg.prepare(rgb((512, 904), seed=1), channel_axis=-1)  # sides on the 8-pixel grid: no padding
    whole = seg.predict_proba(image, normalized=True)
    seg.memory_mb = (512 * 520 + 100) * seg.bytes_per_voxel / 2**20  # two windows side by side, not 512 x 512s
    assert window_shape(image.shape[1:], seg.smallest_window, seg.max_voxels(), 8) == (512, 520)
    passes = count_passes(seg)
    windowed = seg.predict_proba(image, normalized=True)
    assert passes == [(1, 3, 512, 520)] * 2
    # windows [0, 520) and [384, 904), on the network's 8-pixel grid: more than a receptive field (~100 pixels)
    # away from a window's inner edge, each window sees what the whole image shows, so the results are equal
    np.testing.assert_allclose(windowed[..., :270], whole[..., :270], atol=2e-5)
    np.testing.assert_allclose(windowed[..., 630:], whole[..., 630:], atol=2e-5)
    assert (windowed.argmax(0) == whole.argmax(0)).mean() > 0.995


# --------------------------------------------------------------------------------------------- budget and passes

def test_flip_members_share_forward_passes_while_small_and_within_the_budget(monkeypatch):
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    assert len(seg.tta_flips) == 4
    passes = count_passes(seg)
    seg.predict_proba(seg.prepare(rgb((64, 80)), channel_axis=-1), tta=True, normalized=True)
    assert passes == [(4, 3, 64, 80)]  # the image and its three mirrored copies in one pass: 4 x 5,120 voxels
    image = seg.prepare(rgb((400, 500)), channel_axis=-1)
    passes.clear()
    alone = seg.predict_proba(image, tta=True, normalized=True)
    assert passes == [(1, 3, 400, 500)] * 4  # on the CPU an image of SHARED_PASS_MAX_ITEM voxels or more goes alone
    monkeypatch.setattr(infer, "SHARED_PASS_MAX_ITEM", 2**40)  # now only the memory budget limits a pass
    passes.clear()
    together = seg.predict_proba(image, tta=True, normalized=True)
    assert passes == [(4, 3, 400, 500)]
    np.testing.assert_allclose(alone, together, atol=2e-5)
    seg.memory_mb = 1.5 * 400 * 504 * seg.bytes_per_voxel / 2**20  # room for one copy, not two
    passes.clear()
    apart = seg.predict_proba(image, tta=True, normalized=True)
    assert passes == [(1, 3, 400, 500)] * 4
    np.testing.assert_allclose(apart, together, atol=2e-5)
    seg.memory_mb, seg.batch_size = None, 1  # batch_size caps a pass below the budget
    passes.clear()
    seg.predict_proba(image, tta=True, normalized=True)
    assert passes == [(1, 3, 400, 500)] * 4


def test_items_share_a_pass_below_the_cpu_threshold_and_on_other_devices_as_the_budget_allows():
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    limit = infer.SHARED_PASS_MAX_ITEM
    assert seg.items_per_pass(4, limit - 1) == 4 and seg.items_per_pass(4, limit) == 1
    seg.device = torch.device("cuda")  # arithmetic only: nothing runs there
    assert seg.items_per_pass(4, limit) == 4
    assert seg.items_per_pass(4, seg.max_voxels() // 2) == 2  # the memory budget still caps a pass
    seg.batch_size = 3
    assert seg.items_per_pass(4, limit) == 3


def test_memory_budget_from_argument_environment_and_default(monkeypatch):
    monkeypatch.delenv(INFER_MEMORY_ENV, raising=False)
    assert infer_memory_mb() == DEFAULT_INFER_MEMORY_MB == 2048
    monkeypatch.setenv(INFER_MEMORY_ENV, "512")
    assert infer_memory_mb() == 512 and infer_memory_mb(64) == 64
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    assert seg.bytes_per_voxel == 4 * (10 * 32 + 3 + 3 * 2)  # widths from 32, 3 input channels, 2 classes
    assert seg.max_voxels() == 512 * 2**20 // seg.bytes_per_voxel
    assert Segmenter(seg.model, seg.preprocessing, seg.class_names, memory_mb=64).max_voxels() == 64 * 2**20 // 1316
    for bad in ("lots", "0", "-5", "nan", "inf"):
        monkeypatch.setenv(INFER_MEMORY_ENV, bad)
        with pytest.raises(UnetsegError, match=f"{INFER_MEMORY_ENV}='{bad}' is not a positive number of megabytes"):
            infer_memory_mb()
    with pytest.raises(UnetsegError, match="memory_mb=0 is not a positive"):
        infer_memory_mb(0)
    with pytest.raises(ValueError, match="batch_size must be a positive number"):
        Segmenter(seg.model, seg.preprocessing, seg.class_names, batch_size=0)


def test_a_forward_pass_stays_within_its_memory_estimate():
    """Peak memory growth of a whole-image TTA prediction (a fresh process) is below what the budget assumed."""
    code = (  # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
        "import re, numpy as np, torch\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "torch.set_num_threads(1)\n"
        "from unetseg import infer\n"
        "from unetseg.infer import Segmenter\n"
        "infer.SHARED_PASS_MAX_ITEM = 2**40\n"  # the four members in one pass, as the memory budget allows
        "seg = Segmenter.from_checkpoint('dsb2018_2d')\n"
        "x = seg.prepare(np.random.default_rng(0).random((256, 320, 3)), channel_axis=-1)\n"
        "seg._inference_network()\n"
        "before = peak()\n"
        "seg.predict_proba(x, tta=True, normalized=True)\n"
        "print(peak() - before)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    grown = int(run.stdout)
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    estimate = len(seg.tta_flips) * 256 * 320 * seg.bytes_per_voxel  # every member in one pass
    assert 0.3 * estimate < grown < estimate, (grown, estimate)


@pytest.mark.parametrize(
    ("shape", "floor", "max_voxels", "expected", "counts"),
    [
        ((1040, 1388), (256, 256), 3_000_000, (1040, 1392), (1, 1)),  # the whole image
        ((1040, 1388), (256, 256), 1_000_000, (1040, 800), (1, 2)),
        ((1040, 1388), (256, 256), 1, (256, 256), (6, 7)),  # below the floor: the old window
        ((300, 1400), (512, 512), 1, (512, 512), (1, 4)),
        ((10000, 10000), (256, 256), 3_100_000, (1600, 1824), (8, 7)),
        ((512, 512, 300), (80, 112, 80), 3_000_000, (128, 160, 120), (5, 4, 3)),
    ],
)
def test_windows_are_as_large_as_the_budget_allows(shape, floor, max_voxels, expected, counts):
    from monai.data.utils import dense_patch_slices, get_valid_patch_size
    from monai.inferers.utils import _get_scan_interval

    roi = window_shape(shape, floor, max_voxels, 8)
    assert roi == expected and all(r % 8 == 0 and r >= f for r, f in zip(roi, floor))
    assert math.prod(roi) <= max_voxels or roi == floor
    assert tuple(windows_along(s, r) for s, r in zip(shape, roi)) == counts
    padded = tuple(max(s, r) for s, r in zip(shape, roi))  # MONAI pads an image smaller than its window
    size = get_valid_patch_size(padded, roi)
    interval = _get_scan_interval(padded, size, len(shape), (0.25,) * len(shape))
    assert len(dense_patch_slices(padded, size, interval)) == math.prod(counts)


# ----------------------------------------------------------------------------------- the faster copy of the network

@pytest.mark.parametrize(
    "args",
    [
        {"spatial_dims": 2, "in_channels": 3, "out_channels": 2},
        {"spatial_dims": 2, "norm": "instance", "act": "leaky_relu", "channels": (8, 16, 32)},
        {"spatial_dims": 2, "residual": True, "skips": [True, False, True], "merge": "add", "channels": (8, 8, 8, 8)},
        {"spatial_dims": 2, "norm": "group", "skips": False},
        {"spatial_dims": 3, "channels": (4, 8, 16)},
        {"spatial_dims": 3, "norm": "instance", "residual": True, "channels": (4, 8, 16)},
    ],
)
def test_inference_network_computes_what_the_model_computes(args):
    torch.manual_seed(0)
    model = UNet(**args)
    for m in model.modules():  # trained-looking statistics, so folding batch norm is not a no-op
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (2, args.get("in_channels", 1), *((19, 26, 13) if args["spatial_dims"] == 3 else (45, 62)))
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        for lesioned in ([], model.residual_blocks()):  # a lesioned residual block passes its input to the activation
            model.lesion_residuals(lesioned)
            net = inference_network(model)
            given = x.clone()
            torch.testing.assert_close(net(given), model(x), atol=1e-4, rtol=1e-4)
            assert torch.equal(given, x)  # never written in place
        model.lesion_residuals([])
        torch.testing.assert_close(inference_network(model)(x), expected, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_every_convolution_runs_on_onednn_unless_the_network_is_for_export():
    """A batch of one small 3D volume is what PyTorch sends to its slow native convolution; the inference network
    runs each zero-padded convolution on oneDNN instead, with the same result; ``portable`` keeps plain modules."""
    from unetseg.infer import OneDnnConv

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, channels=(4, 8, 16), norm="instance").eval()
    convs = sum(type(m) is torch.nn.Conv3d for m in model.modules())
    net, portable = inference_network(model), inference_network(model, portable=True)
    assert sum(isinstance(m, OneDnnConv) for m in net.modules()) == convs > 0
    assert not any(isinstance(m, OneDnnConv) for m in portable.modules())
    x = torch.randn(1, 1, 19, 26, 13)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(portable(x), model(x), atol=1e-4, rtol=1e-4)
        with torch.profiler.profile() as prof:
            net(x)
    ran = {e.key: e.count for e in prof.key_averages()}
    assert ran.get("aten::mkldnn_convolution") == convs and "aten::slow_conv3d_forward" not in ran, ran


def test_a_model_changed_in_place_is_predicted_as_it_is_now():
    seg = Segmenter.from_checkpoint("hippocampus_2d")
    image = seg.prepare(np.random.default_rng(0).random((40, 48, 6)))
    intact = seg.predict_proba(image, normalized=True)
    assert seg._inference_network() is seg._inference_network()  # reused while nothing changes
    seg.model.lesion_skips(seg.model.skip_levels())
    lesioned = seg.predict_proba(image, normalized=True)
    np.testing.assert_allclose(lesioned, plain_member(seg, image, ()), atol=2e-5)
    assert np.abs(lesioned - intact).max() > 0.01
    seg.model.lesion_skips([])
    with torch.no_grad():
        seg.model.head.bias += 1.0  # e.g. an optimiser step on the model a training run validates with
    np.testing.assert_allclose(seg.predict_proba(image, normalized=True), plain_member(seg, image, ()), atol=2e-5)


def test_shallow_copies_share_the_inference_network_they_build():
    """The viewer predicts with a shallow copy of the cached Segmenter per upload (for its own progress bar): the
    copies reuse one inference network instead of copying and folding the model on every upload."""
    import copy

    seg = Segmenter.from_checkpoint("hippocampus_2d")
    first = copy.copy(seg)._inference_network()
    assert copy.copy(seg)._inference_network() is first and seg._inference_network() is first


# -------------------------------------------------------------------------------------------------- batch predict

def test_predict_folder_reads_and_writes_beside_the_network_and_reports_the_rate(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    images = {f"im{i}.png": rgb((64 + 8 * i, 80), seed=i).astype(np.uint8) for i in range(4)}
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name)
    (folder / "im1b.png").write_text("not an image")
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(folder), "--out", str(tmp_path / "out"), "--tta"]) == 2
    out, err = capsys.readouterr()
    assert "im1b.png: not a readable image" in err and "1 of 5 files could not be segmented" in err
    lines = out.splitlines()
    assert [line.split(" -> ")[0].rsplit("/", 1)[-1] for line in lines[:-1]] == sorted(images)  # input order
    assert lines[-1].startswith("segmented 4 images in ") and lines[-1].endswith(" images/s")
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    for name, pixels in images.items():
        mask = np.asarray(Image.open(tmp_path / "out" / name))
        assert np.array_equal(mask > 0, seg.predict(pixels, tta=True, channel_axis=-1) > 0)
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(folder / "im0.png"), "--out", str(tmp_path / "q"),
                 "--quiet"]) == 0
    assert "/s" not in capsys.readouterr().out


def test_predict_volumes_reports_volumes_per_second(tmp_path, capsys, data_root):
    scans = sorted((data_root / "Task04_Hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[:2]
    assert main(["predict", "--checkpoint", "hippocampus_3d", *map(str, scans), "--out", str(tmp_path), "--tta"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("segmented 2 volumes in ") and last.endswith(" volumes/s")


def test_a_segmenter_leaves_the_caller_s_network_in_its_mode_and_predicts_in_eval_mode():
    """Issue 12: Segmenter used to switch the network it was given to eval mode (training's validation did so
    to the network being trained). Now the network keeps its mode; predictions use an eval-mode copy."""
    torch.manual_seed(0)
    model = UNet(channels=(4, 8), dropout=0.5)
    with torch.no_grad():  # running statistics unlike a batch's own, so train-mode and eval-mode outputs differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    model.train()
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    seg = Segmenter(model, {"normalization": "zscore", "slice_axis": 2, "patch_size": [32, 32], "in_channels": 1},
                    ["background", "a", "b"])
    probs = seg.predict_proba(image, normalized=True)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.from_numpy(image)[None]), 1)[0].numpy()
    assert np.allclose(probs, expected, atol=1e-5)

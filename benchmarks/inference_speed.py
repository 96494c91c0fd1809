"""Inference speed: ``Segmenter.predict_proba`` against the hardware's lower bound, the old path and MONAI.

For each case, with and without flip test-time augmentation (TTA), prints:

- the network's FLOPs for the whole input (``torch.utils.flop_counter``; all TTA members) and the lower bound
  they set at the fp32 matmul rate measured here just before (2048 x 2048 matmuls, best of 10);
- the old path: the code before the memory budget (commit de622d3): the unmodified network under
  ``torch.no_grad``, MONAI's sliding window (2x the training patch, 25 % overlap, Gaussian, 64 windows per batch)
  for inputs larger than that window, one forward pass per TTA member;
- MONAI's ``sliding_window_inference`` with its default settings (window = the training patch, 4 windows per
  batch as in MONAI's tutorials, overlap 0.25, constant blending) on the unmodified network: the peer;
- the new path (``Segmenter.predict_proba``), and its largest difference from the old one;
- for models with an int8 calibration (``unetseg quantize``): the same path in int8 (``Segmenter(int8_ranges=...)``,
  ``predict --int8``, the viewer's default), its speed-up over float32, and the share of pixels (voxels) whose
  label equals float32's.

Cases: dsb2018_2d on a 1040 x 1388 RGB image (a DSB 2018 image of 696 x 520 resized, as no training image is
that large) and on a 256 x 256 DSB image; hippocampus_2d and hippocampus_3d on a hippocampus MRI volume.
Times are the median (and minimum) of ``--repeats`` runs after one warm-up run, in seconds; a path whose first
run takes more than 8 s is timed by that run alone.

    python benchmarks/inference_speed.py [--repeats 3] [--models NAME ...] [--new-only] [--out FILE]

``--models`` times only those models' cases; ``--new-only`` leaves out the old path and MONAI's default (the slow
columns, shown as "-"), for a quick look at the path ``predict`` takes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from unetseg import infer
from unetseg.data import io
from unetseg.data.datasets import resolve_data_root
from unetseg.data.preprocess import slices_to_volume, volume_to_slices
from unetseg.infer import Segmenter, int8_validation

DSB_LARGE = "07fb37aafa6626608af90c1e18f6a743f29b6b233d2e427dcd1102df6a916cf5"  # 696 x 520, resized to 1388 x 1040
DSB_SMALL = "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552"  # 256 x 256
HIPPOCAMPUS = "hippocampus_003"
SLOW_S = 8.0  # seconds: a measurement whose first run takes longer is that one run


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """The fp32 matmul rate of this machine with the current thread count, in GFLOP/s (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def times(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, minimum) seconds of ``repeats`` runs after a warm-up run; a first run over
    :data:`SLOW_S` is the only one (its warm-up costs are small beside it, and it keeps the benchmark short)."""
    first = timed(fn)
    if first > SLOW_S:
        return first, first
    runs = [timed(fn) for _ in range(repeats)]
    return statistics.median(runs), min(runs)


def network_input(seg: Segmenter, image: np.ndarray) -> torch.Tensor:
    """What the network sees of a normalised image ``(C, *S)``: ``(1, C, *S)``, or a 2D network's slices."""
    if seg.spatial_dims == 2 and image.ndim == 4:
        return torch.from_numpy(np.ascontiguousarray(volume_to_slices(image, seg.preprocessing.slice_axis)))
    return torch.from_numpy(image[None])


def flops(seg: Segmenter, image: np.ndarray, members: int) -> float:
    """FLOPs of the whole-input forward passes of ``members`` TTA members."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        seg.model(network_input(seg, image))
    return counter.get_total_flops() * members


def old_predict_proba(seg: Segmenter, image: np.ndarray, tta: bool) -> np.ndarray:
    """``Segmenter.predict_proba`` as it was before the memory budget (commit de622d3), for comparison."""
    roi = tuple(2 * p for p in seg.preprocessing.patch_size)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if any(s > r for s, r in zip(batch.shape[2:], roi)):
                logits = sliding_window_inference(batch, roi_size=roi, sw_batch_size=64, predictor=seg.model,
                                                  overlap=0.25, mode="gaussian")
            else:
                logits = seg.model(batch)
            return torch.softmax(logits.float(), dim=1)

    return _members_mean(seg, image, tta, forward, chunk=64)


def monai_default(seg: Segmenter, image: np.ndarray, tta: bool) -> np.ndarray:
    """MONAI's sliding window with its defaults (window = training patch, 4 per batch), softmax averaged over TTA."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = sliding_window_inference(batch, seg.preprocessing.patch_size, 4, seg.model)
            return torch.softmax(logits, dim=1)

    return _members_mean(seg, image, tta, forward, chunk=None)


def _members_mean(seg: Segmenter, image: np.ndarray, tta: bool, forward, chunk: int | None) -> np.ndarray:
    """Mean over the TTA members (one pass each) of ``forward``'s probabilities, mirrored back; ``(K, *S)``."""
    x = network_input(seg, image)
    members = []
    for flip in seg.tta_flips if tta else [()]:
        dims = [d + 2 for d in flip]
        xf = torch.flip(x, dims) if dims else x
        probs = torch.cat([forward(c) for c in (torch.split(xf, chunk) if chunk else [xf])])
        members.append((torch.flip(probs, dims) if dims else probs).numpy())
    probs = np.mean(members, axis=0)
    if seg.spatial_dims == 2 and image.ndim == 4:
        return slices_to_volume(probs, seg.preprocessing.slice_axis)
    return probs[0]


def cases(data_root: Path) -> list[tuple[str, str, np.ndarray]]:
    """(model, description, raw image) to time."""
    dsb = data_root / "dsb2018_stage1_train"
    large = Image.open(dsb / DSB_LARGE / "images" / f"{DSB_LARGE}.png").convert("RGB").resize((1388, 1040),
                                                                                               Image.BILINEAR)
    small = Image.open(dsb / DSB_SMALL / "images" / f"{DSB_SMALL}.png").convert("RGB")
    scan, _ = io.read_image(data_root / "Task04_Hippocampus" / "imagesTr" / f"{HIPPOCAMPUS}.nii.gz")
    scan = scan[0]
    shape = "x".join(map(str, scan.shape))
    return [
        ("dsb2018_2d", "1040x1388 RGB", np.asarray(large, np.float32)),
        ("dsb2018_2d", "256x256 RGB", np.asarray(small, np.float32)),
        ("hippocampus_2d", f"{shape} volume", scan),
        ("hippocampus_3d", f"{shape} volume", scan),
    ]


def tta_cost(seg: Segmenter, image: np.ndarray, repeats: int) -> tuple[float, float]:
    """New path, time with TTA / time without, runs interleaved (so a change in the machine's load hits both):
    (ratio of medians, ratio of minima)."""
    plain, tta = [], []
    seg.predict_proba(image, tta=True, normalized=True)
    for _ in range(repeats):
        plain.append(timed(partial(seg.predict_proba, image, tta=False, normalized=True)))
        tta.append(timed(partial(seg.predict_proba, image, tta=True, normalized=True)))
    return statistics.median(tta) / statistics.median(plain), min(tta) / min(plain)


def forward_time(seg: Segmenter, image: np.ndarray, repeats: int, channels_last: bool, portable: bool = False) -> float:
    """Median seconds of the inference network's forward pass on ``image``, in the given layout (channels_last_3d in
    3D), with oneDNN convolutions or, ``portable``, PyTorch's own choice of kernels."""
    x = network_input(seg, image)
    dims = seg.spatial_dims
    saved = infer.CHANNELS_LAST[dims]
    try:
        infer.CHANNELS_LAST[dims] = channels_last
        net = infer.inference_network(seg.model, portable=portable)
        xi = seg._layout(x)
        with torch.inference_mode():
            return times(partial(net, xi), repeats)[0]
    finally:
        infer.CHANNELS_LAST[dims] = saved


def forward_variants(seg: Segmenter, image: np.ndarray, repeats: int) -> tuple[float, float, float, float]:
    """Forward-pass seconds (medians): contiguous vs channels_last, then in the layout ``predict`` uses, PyTorch's
    own kernels (``inference_network(portable=True)``) vs oneDNN convolutions."""
    layout = infer.CHANNELS_LAST[seg.spatial_dims]
    return (forward_time(seg, image, repeats, False), forward_time(seg, image, repeats, True),
            forward_time(seg, image, repeats, layout, portable=True), forward_time(seg, image, repeats, layout))


def int8_segmenter(name: str) -> Segmenter | None:
    """The model in int8 with its calibration, or None when it cannot run in int8 here (3D models, uncalibrated
    ones)."""
    return Segmenter.from_checkpoint(name, int8=True) if int8_validation(name)[0] is not None else None


def int8_columns(seg: Segmenter, seg8: Segmenter | None, image: np.ndarray, tta: bool, new_t: float,
                 repeats: int) -> str:
    """The int8 columns of a row: seconds (min), float32 / int8 time, share of labels equal to float32's."""
    if seg8 is None:
        return "- | - | -"
    t, t_min = times(partial(seg8.predict_proba, image, tta=tta, normalized=True), repeats)
    same = (seg8.predict_proba(image, tta=tta, normalized=True).argmax(0)
            == seg.predict_proba(image, tta=tta, normalized=True).argmax(0)).mean()
    return f"{t:.2f} ({t_min:.2f}) | {new_t / t:.1f} | {same:.2%}"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU") \
        if Path("/proc/cpuinfo").is_file() else platform.processor()
    flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])) if Path("/proc/cpuinfo").is_file() else set()
    int8 = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return (f"{cpu} (int8-relevant flags: {', '.join(int8) or 'none found'}), {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the "
            "start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--data-root", help="folder holding the data set folders")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="time only these models' cases (default: all)")
    parser.add_argument("--new-only", action="store_true", help="leave out the old path and MONAI's default")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [f"Machine: {machine()}.", ""]
    lines += [("The fp32 matmul rate is measured again before each row (2048 x 2048, best of 10): the machine's "
               "load changes it, so each row's bound uses the rate of its own moment."), ""]
    lines += [("| model | input | TTA | GFLOP | matmul GFLOP/s | bound s | old s | MONAI default s | new s (min) | "
               "new / bound | old / new | max \\|new - old\\| | int8 s (min) | new / int8 | int8 labels = new |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    layouts = []
    summary = {}
    for name, what, raw in cases(resolve_data_root(args.data_root)):
        if args.models and name not in args.models:
            continue
        seg = Segmenter.from_checkpoint(name)
        seg8 = int8_segmenter(name)
        image = seg.prepare(raw, channel_axis=-1 if raw.ndim == 3 and name.startswith("dsb") else None)
        for tta in (False, True):
            members = len(seg.tta_flips) if tta else 1
            gflop = flops(seg, image, members) / 1e9
            rate = matmul_gflops()  # then at once the new path, in the same conditions
            bound = gflop / rate
            new_t, new_min = times(partial(seg.predict_proba, image, tta=tta, normalized=True), args.repeats)
            if args.new_only:
                old, monai, speedup, diff = "-", "-", "-", "-"
            else:
                old_t, _ = times(partial(old_predict_proba, seg, image, tta), args.repeats)
                monai_t, _ = times(partial(monai_default, seg, image, tta), args.repeats)
                old, monai, speedup = f"{old_t:.2f}", f"{monai_t:.2f}", f"{old_t / new_t:.1f}"
                new = seg.predict_proba(image, tta=tta, normalized=True)
                diff = f"{np.abs(new - old_predict_proba(seg, image, tta)).max():.1e}"
            int8 = int8_columns(seg, seg8, image, tta, new_t, args.repeats)
            lines.append(f"| {name} | {what} | {'x' + str(members) if tta else 'no'} | {gflop:.1f} | {rate:.0f} | "
                         f"{bound:.2f} | {old} | {monai} | {new_t:.2f} ({new_min:.2f}) | "
                         f"{new_t / bound:.1f} | {speedup} | {diff} | {int8} |")
            print(lines[-1], flush=True)
        summary[(name, what)] = (len(seg.tta_flips), *tta_cost(seg, image, 2 * args.repeats - 1))
        if what.startswith("1040") or name == "hippocampus_3d" or name == "hippocampus_2d":
            layouts.append((name, what, *forward_variants(seg, image, args.repeats)))
    lines += ["", ("TTA cost (new path, runs with and without TTA interleaved): time with TTA / time without, "
                   "ratio of medians (of minima), against the FLOP share:"), ""]
    for (name, what), (members, median_ratio, min_ratio) in summary.items():
        lines.append(f"- {name}, {what}: {median_ratio:.2f}x ({min_ratio:.2f}x) for {members}x the FLOPs")
    lines += ["", "Forward pass of the inference network (median s): contiguous vs channels_last:", ""]
    for name, what, plain, last, *_ in layouts:
        lines.append(f"- {name}, {what}: {plain:.3f} vs {last:.3f} ({plain / last:.2f}x)")
    lines += ["", ("Forward pass (median s) in the layout predict uses: PyTorch's own choice of convolution kernels "
                   "(inference_network(portable=True), as before oneDNN convolutions) vs oneDNN convolutions:"), ""]
    for name, what, *_, portable, onednn in layouts:
        lines.append(f"- {name}, {what}: {portable:.3f} vs {onednn:.3f} ({portable / onednn:.2f}x)")
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Training-step throughput: unetseg's hippocampus_2d network vs MONAI's BasicUNet.

Times forward + DiceCE loss + backward + optimiser step on random batches
(batch 32, 3 classes), float32 on the CPU, after warm-up steps. Prints slices/s.
``--dsb`` adds the ``dsb2018_2d`` network (RGB, 2 classes, 16 crops of 256x256)
in the default memory layout and in channels-last (``train.channels_last``),
timed over ``--dsb-steps`` steps each (a step takes seconds).

    python benchmarks/train_throughput.py [--steps 10] [--threads 2] [--dsb] [--dsb-steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.networks.nets import BasicUNet

from unetseg.checkpoint import build_model, model_arguments
from unetseg.config import load_config
from unetseg.losses import make_loss
from unetseg.model import UNet


def slices_per_second(model: torch.nn.Module, size: tuple[int, int], batch: int, steps: int, warmup: int = 3,
                      in_channels: int = 1, classes: int = 3, channels_last: bool = False) -> float:
    """Mean training-step throughput of ``model`` on ``(batch, in_channels, *size)`` inputs with ``classes`` classes,
    in channels-last memory layout (model and input) when ``channels_last``."""
    loss_fn = make_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, in_channels, *size)
    y = torch.randint(0, classes, (batch, 1, *size))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dsb", action="store_true", help="also time the dsb2018_2d network, both memory layouts")
    parser.add_argument("--dsb-steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("hippocampus_2d")
    ours = UNet(2, 1, 3, channels=cfg.model.channels)
    ours_noskip = UNet(2, 1, 3, channels=cfg.model.channels, skips=False)
    monai = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3)
    rows = [
        ("unetseg hippocampus_2d", ours, tuple(cfg.data.patch_size)),
        ("unetseg hippocampus_2d, 64x64", ours, (64, 64)),
        ("unetseg hippocampus_2d no-skip", ours_noskip, tuple(cfg.data.patch_size)),
        ("MONAI BasicUNet, 64x64", monai, (64, 64)),
    ]
    print(f"{'model':<34} {'params':>10} {'input':>8} {'slices/s':>9}")
    for name, model, size in rows:
        n = sum(p.numel() for p in model.parameters())
        rate = slices_per_second(model, size, 32, args.steps)
        print(f"{name:<34} {n:>10,} {size[0]}x{size[1]:<5} {rate:>9.1f}")
    if args.dsb:
        dsb = load_config("dsb2018_2d")
        for layout in (False, True):
            torch.manual_seed(0)
            model = build_model(model_arguments(dsb.model, 3, 2))  # the dsb2018_2d network exactly
            rate = slices_per_second(model, tuple(dsb.data.patch_size), dsb.train.batch_size, args.dsb_steps, warmup=1,
                                     in_channels=3, classes=2, channels_last=layout)
            name = f"unetseg dsb2018_2d{', channels_last' if layout else ''}"
            print(f"{name:<34} {sum(p.numel() for p in model.parameters()):>10,} 256x256 {rate:>9.2f}  "
                  f"({dsb.train.batch_size / rate:.1f} s per step of {dsb.train.batch_size})")


if __name__ == "__main__":
    main()

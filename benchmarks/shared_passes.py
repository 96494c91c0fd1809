"""Shared forward passes or one pass per item: flip-TTA time with ``SHARED_PASS_MAX_ITEM`` as shipped and without it.

``Segmenter`` stacks the flipped copies of an input (and a 2D model's slices of a volume) into shared forward passes,
except on the CPU for items of ``unetseg.infer.SHARED_PASS_MAX_ITEM`` voxels or more, which go one per pass. This
prints, for a 256 x 256 and a 520 x 696 image (``dsb2018_2d``) and a hippocampus-sized volume (``hippocampus_2d``,
``hippocampus_3d``), the median time of a plain prediction and of a flip-TTA prediction with the rule (capped) and
with every item allowed to share (uncapped, as the memory budget allows), the three interleaved.

    python benchmarks/shared_passes.py [--repeats 9] [--threads 2]

Output of a run on the 2-core CPU: docs/shared_passes.txt.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from unetseg import infer
from unetseg.infer import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.repeats}")
    rng = np.random.default_rng(0)
    cases = [("dsb2018_2d", rng.random((3, 256, 256), dtype=np.float32)),
             ("dsb2018_2d", rng.random((3, 520, 696), dtype=np.float32)),
             ("hippocampus_2d", rng.random((1, 34, 52, 35), dtype=np.float32)),
             ("hippocampus_3d", rng.random((1, 34, 52, 35), dtype=np.float32))]
    shipped = infer.SHARED_PASS_MAX_ITEM
    for name, image in cases:
        seg = Segmenter.from_checkpoint(name)
        times: dict[str, list[float]] = {"plain": [], "capped": [], "uncapped": []}
        for repeat in range(args.repeats + 2):  # the first two warm up
            for key in times:
                infer.SHARED_PASS_MAX_ITEM = 2**62 if key == "uncapped" else shipped
                start = time.perf_counter()
                seg.predict_proba(image, tta=key != "plain", normalized=True)
                if repeat >= 2:
                    times[key].append(time.perf_counter() - start)
        infer.SHARED_PASS_MAX_ITEM = shipped
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name} {'x'.join(map(str, image.shape[1:]))}: plain {med['plain']:.3f} s; "
              f"TTA x{len(seg.tta_flips)} capped {med['capped']:.3f} s ({med['capped'] / med['plain']:.2f}x), "
              f"uncapped {med['uncapped']:.3f} s ({med['uncapped'] / med['plain']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()

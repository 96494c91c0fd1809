"""How to split a predicted nucleus mask into objects: the DSB2018 score of each way, on validation images.

    python benchmarks/instance_split.py --data-root ../shared/data [--cases 60]

Predicts the first ``--cases`` validation images of the shipped ``dsb2018_2d``
model once, then scores each way of splitting its foreground into objects with
the challenge's mean average precision over IoU 0.50-0.95
(:func:`unetseg.instances.average_precision`): connected components, and the
watershed of :func:`unetseg.instances.split_instances` over a grid of its
settings. Prints a Markdown table (docs/instances.md quotes it).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from skimage.measure import label as connected_components

from unetseg.data.datasets import dataset_info, list_cases, load_cases
from unetseg.infer import Segmenter, load_checkpoint
from unetseg.instances import average_precision, split_instances


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="folder holding dsb2018_stage1_train (default: $UNETSEG_DATA_ROOT)")
    p.add_argument("--cases", type=int, default=60, help="validation images to score (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    segmenter = Segmenter.from_checkpoint("dsb2018_2d")
    wanted = load_checkpoint("dsb2018_2d")["split"]["val"][: args.cases]
    refs, info = list_cases(dataset_info("dsb2018"), args.data_root)
    cases = load_cases([r for r in refs if r.case_id in wanted], info, segmenter.preprocessing.normalization,
                       instances=True)
    pairs = [(segmenter.predict(c.image, normalized=True) == 1, c.instances) for c in cases]
    ways = {"connected components": lambda fg: connected_components(fg)}
    for h in (0.5, 1.0, 2.0, 3.0):
        for sigma in (0.0, 1.0):
            ways[f"watershed, h {h:g}, sigma {sigma:g}"] = lambda fg, h=h, sigma=sigma: split_instances(fg, h, sigma)
    print(f"{len(pairs)} validation images of dsb2018_2d\n\n| split | DSB2018 score (mean AP, IoU 0.50-0.95) |\n|---|---|")
    for name, split in ways.items():
        print(f"| {name} | {np.mean([average_precision(truth, split(fg)) for fg, truth in pairs]):.4f} |")


if __name__ == "__main__":
    main()

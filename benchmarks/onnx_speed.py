"""Seconds per image: torch (``Segmenter.predict_proba``) against the exported ONNX (ONNX Runtime) and TorchScript files.

Every path goes from the normalised image to class probabilities without TTA, on the CPU with one thread
(``torch.set_num_threads(1)``, ONNX Runtime's ``intra_op_num_threads=1``). Cases, from benchmarks/inference_speed.py:
dsb2018_2d on a 1040 x 1388 RGB image, hippocampus_2d and hippocampus_3d on a hippocampus volume. The paths are run
in turn, ``--repeats`` times after a warm-up each, so a change in the machine's load hits all of them; the median
and minimum are printed, with the largest probability difference from torch.

    python benchmarks/onnx_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from inference_speed import cases, timed  # benchmarks/ is on sys.path when this file is run as a script

from unetseg.data.datasets import resolve_data_root
from unetseg.infer import Segmenter
from unetseg.model_export import export_model, exported_probabilities, onnx_forward, read_metadata, torchscript_forward

MODELS = ("dsb2018_2d", "hippocampus_2d", "hippocampus_3d")


def paths(name: str, seg: Segmenter, folder: Path) -> dict[str, partial]:
    """Functions ``(normalised image) -> probabilities`` for each way of running model ``name`` (``seg``)."""
    onnx_file = export_model(name, folder / f"{name}.onnx", "onnx")
    script_file = export_model(name, folder / f"{name}.pt", "torchscript")
    metadata = read_metadata(onnx_file)
    return {
        "torch": partial(seg.predict_proba, normalized=True),
        "onnxruntime": partial(exported_probabilities, onnx_forward(onnx_file, threads=1), metadata=metadata),
        "torchscript": partial(exported_probabilities, torchscript_forward(script_file), metadata=metadata),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | input | path | median s | min s | vs torch (medians) | max abs prob. diff |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, what, raw in cases(resolve_data_root(args.data_root)):
            if name not in MODELS or what.startswith("256"):
                continue
            seg = Segmenter.from_checkpoint(name)
            runs = paths(name, seg, Path(tmp))
            image = seg.prepare(raw, channel_axis=-1 if seg.preprocessing.in_channels == 3 else None)  # RGB last
            reference = runs["torch"](image)
            diffs = {path: float(np.abs(run(image) - reference).max()) for path, run in runs.items()}  # also warm-up
            seconds: dict[str, list[float]] = {path: [] for path in runs}
            for _ in range(args.repeats):
                for path, run in runs.items():
                    seconds[path].append(timed(partial(run, image)))
            base = statistics.median(seconds["torch"])
            for path, values in seconds.items():
                median = statistics.median(values)
                print(f"| {name} | {what} | {path} | {median:.3f} | {min(values):.3f} | {base / median:.2f}x | "
                      f"{diffs[path]:.1e} |", flush=True)


if __name__ == "__main__":
    main()

"""The worst validation images of a shipped DSB model, drawn: image, prediction errors, and the figures.

Reads the model's recorded ``per_case.csv`` (``unetseg/pretrained/<model>/``),
takes the ``--count`` cases with the lowest Dice, predicts each again and
draws the image beside an error overlay (false positives, false negatives)
with its Dice, object counts and size. The figure goes to ``--out``. It also
prints the recorded Dice by kind of image (:func:`unetseg.data.kinds.image_kind`).

    python benchmarks/worst_cases.py --data-root ../shared/data [--model dsb2018_2d] [--count 6] \
        [--cases ID ...] [--out docs/figures/dsb2018_2d_worst.jpg]

``--cases`` draws the given validation cases instead (e.g. an earlier model's worst ones, to compare
before and after), with the model's recorded Dice of each.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from unetseg.data import io
from unetseg.data.datasets import dataset_info, list_cases, load_case
from unetseg.data.kinds import image_kind
from matplotlib.patches import Patch

from unetseg.display import FALSE_NEGATIVE, FALSE_POSITIVE, apply_window, default_window, error_overlay, to_rgb
from unetseg.infer import PRETRAINED_DIR, Segmenter
from unetseg.plots import subplots


def worst_rows(model: str, count: int, cases: list[str] | None = None) -> list[dict[str, str]]:
    """The ``count`` rows of the model's recorded ``per_case.csv`` with the lowest Dice, worst first; or, with
    ``cases``, the rows of those case ids in that order."""
    with (PRETRAINED_DIR / model / "per_case.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if cases:
        by_id = {r["case_id"]: r for r in rows}
        missing = [c for c in cases if c not in by_id]
        if missing:
            raise SystemExit(f"not validation cases of {model}: {', '.join(missing)}")
        return [by_id[c] for c in cases]
    dice_key = next(k for k in rows[0] if k.startswith("dice_"))
    return sorted(rows, key=lambda r: float(r[dice_key]))[:count]


def dice_by_kind(model: str, refs: dict) -> None:
    """Print the recorded validation Dice of ``model`` grouped by :func:`~unetseg.data.kinds.image_kind`."""
    with (PRETRAINED_DIR / model / "per_case.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    dice_key = next(k for k in rows[0] if k.startswith("dice_"))
    groups: dict[str, list[float]] = {}
    for row in rows:
        image, _ = io.read_image(refs[row["case_id"]].image)
        groups.setdefault(image_kind(image), []).append(float(row[dice_key]))
    for kind, values in sorted(groups.items()):
        v = np.array(values)
        print(f"{kind}: {len(v)} images, mean Dice {v.mean():.3f}, median {np.median(v):.3f}, "
              f"min {v.min():.3f}, below 0.85: {int((v < 0.85).sum())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--model", default="dsb2018_2d")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--cases", nargs="+", metavar="ID", help="draw these validation cases instead of the worst")
    parser.add_argument("--out", help="JPEG to write (default: docs/figures/<model>_worst.jpg)")
    args = parser.parse_args()
    out = Path(args.out or f"docs/figures/{args.model}_worst.jpg")
    seg = Segmenter.from_checkpoint(args.model)
    refs, info = list_cases(dataset_info(seg.dataset), args.data_root)
    by_id = {r.case_id: r for r in refs}
    dice_by_kind(args.model, by_id)
    rows = worst_rows(args.model, args.count, args.cases)
    fig, axes = subplots(len(rows), 2, figsize=(8, 3.3 * len(rows)), squeeze=False)
    for (ax_image, ax_errors), row in zip(axes, rows):
        case = load_case(by_id[row["case_id"]], info, seg.preprocessing.normalization)
        prediction = seg.predict(case.image, normalized=True)
        picture = np.moveaxis(apply_window(case.image, *default_window(case.image)), 0, -1)  # (H, W, C) uint8
        base = to_rgb(picture if picture.shape[-1] == 3 else picture[..., 0])
        dice = next(float(v) for k, v in row.items() if k.startswith("dice_"))
        ax_image.imshow(base)
        ax_image.set_title(f"{row['case_id'][:10]}... {picture.shape[1]}x{picture.shape[0]}", fontsize=8)
        ax_errors.imshow(error_overlay(base, prediction, case.label))
        ax_errors.set_title(f"Dice {dice:.3f}; nuclei {row.get('objects_true', '?')} true, "
                            f"{row.get('objects_predicted', '?')} predicted", fontsize=8)
        for ax in (ax_image, ax_errors):
            ax.axis("off")
    what = "the given validation images" if args.cases else f"the {len(rows)} worst validation images"
    fig.suptitle(f"{args.model}: {what}", fontsize=9)
    fig.legend(handles=[Patch(color=np.array(c) / 255, label=name) for c, name in
                        ((FALSE_POSITIVE, "false positive"), (FALSE_NEGATIVE, "false negative"))],
               loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.3 * len(rows))))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70, pil_kwargs={"quality": 80})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

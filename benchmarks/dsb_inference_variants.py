"""What changes after the network can do for a DSB model: other sizes, thresholds and clean-ups, on its validation split.

Predicts each validation image of ``--checkpoint`` (a shipped model name, a run folder or a .pt) at full size and
at half size (probabilities resized back), then prints the mean per-image Dice of:

- the plain prediction (probability > 0.5; what ``unetseg evaluate`` scores);
- other thresholds;
- the full- and half-size probabilities averaged with a weight on the half-size ones;
- removing predicted objects under N pixels, filling holes under N pixels (scikit-image);

and, per image, the full- and half-size Dice with the median size of the true and predicted nuclei, for the
images where half size does better by more than 0.05 or worse by more than 0.2.

    python benchmarks/dsb_inference_variants.py --data-root ../shared/data [--checkpoint dsb2018_2d]

docs/dsb_finetune.md (round 3) quotes its output for the round-1 ``dsb2018_2d``
(``git show 0574dd0:unetseg/pretrained/dsb2018_2d/model.pt > round1.pt``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label, regionprops
from skimage.morphology import remove_small_holes, remove_small_objects

from unetseg.checkpoint import Checkpoint
from unetseg.data.datasets import dataset_info, list_all_cases, load_cases
from unetseg.evaluate import scored_cases, shared_training
from unetseg.infer import Segmenter


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * float((predicted & truth).sum()) / float(total)


def median_object(objects: np.ndarray) -> float:
    """Median area in pixels of the objects of a label image (a boolean mask: its connected components)."""
    areas = [r.area for r in regionprops(label(objects) if objects.dtype == bool else objects)]
    return float(np.median(areas)) if areas else 0.0


def half_size_probabilities(seg: Segmenter, image: np.ndarray) -> np.ndarray:
    """Foreground probability ``(H, W)`` of ``image`` ``(C, H, W)`` predicted at half size and resized back."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float()[None]
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    probs = torch.from_numpy(seg.predict_proba(small, normalized=True))[None]
    return F.interpolate(probs, size=image.shape[1:], mode="bilinear", align_corners=False)[0, 1].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--checkpoint", default="dsb2018_2d")
    args = parser.parse_args()
    checkpoint = Checkpoint.load(args.checkpoint)
    seg = Segmenter.from_payload(checkpoint)
    every, info = list_all_cases(dataset_info("dsb2018"), args.data_root)
    refs = scored_cases(every, info, "dsb2018", "val", shared_training([checkpoint], [args.checkpoint]),
                        args.checkpoint)
    cases = load_cases(refs, info, seg.preprocessing.normalization, progress=True, instances=True)
    predicted = []  # (case id, full-size probability, half-size probability, truth, true nuclei)
    for case in cases:
        full = seg.predict_proba(case.image, normalized=True)[1]
        predicted.append((case.case_id, full, half_size_probabilities(seg, case.image), case.label.squeeze() > 0,
                          case.instances.squeeze()))

    def mean_dice(mask_of) -> float:
        return float(np.mean([dice(mask_of(full, half), truth) for _, full, half, truth, _ in predicted]))

    print(f"{len(predicted)} validation images of {args.checkpoint}; mean per-image Dice:")
    print(f"  plain (> 0.5): {mean_dice(lambda full, half: full > 0.5):.4f}")
    for t in (0.4, 0.45, 0.55, 0.6):
        print(f"  threshold {t}: {mean_dice(lambda full, half: full > t):.4f}")
    for w in (0.2, 0.3, 0.5, 1.0):
        print(f"  half-size weight {w}: {mean_dice(lambda full, half: (1 - w) * full + w * half > 0.5):.4f}")
    for n in (10, 20, 40):
        print(f"  objects of at most {n} px removed: "
              f"{mean_dice(lambda full, half: remove_small_objects(full > 0.5, max_size=n)):.4f}")
    for n in (50, 200, 500):
        print(f"  holes of at most {n} px filled: "
              f"{mean_dice(lambda full, half: remove_small_holes(full > 0.5, max_size=n)):.4f}")
    print("images where half size differs most (Dice full / half; median nucleus px: true / predicted at full size):")
    for case_id, full, half, truth, nuclei in predicted:
        d_full, d_half = dice(full > 0.5, truth), dice(half > 0.5, truth)
        if d_half - d_full > 0.05 or d_full - d_half > 0.2:
            print(f"  {case_id[:8]} {'x'.join(map(str, truth.shape))}: {d_full:.3f} / {d_half:.3f}; "
                  f"{median_object(nuclei):.0f} / {median_object(full > 0.5):.0f}")


if __name__ == "__main__":
    main()

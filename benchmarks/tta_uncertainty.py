"""How much of the predicted structure does the viewer's flip-TTA uncertainty layer mark?

    python benchmarks/tta_uncertainty.py --data-root ../shared/data [CHECKPOINT ...]

For each checkpoint (default: the shipped hippocampus models) and each of its
validation cases: the share of predicted foreground voxels where the flip-TTA
members disagree (``display.vote_disagreement`` > 0, what the viewer paints),
and the Dice of each member alone. A model that was never trained on a
mirroring scores badly on that member and marks the whole structure.
``--flips`` overrides the checkpoint's members (e.g. ``--flips "" 0 1`` for the
unflipped image and each single axis, the members before they were stored).
"""

from __future__ import annotations

import argparse

import numpy as np

from unetseg.data.datasets import dataset_info, list_cases, load_cases
from unetseg.display import vote_disagreement
from unetseg.evaluate import score_case
from unetseg.infer import Segmenter, load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", default=["hippocampus_2d", "hippocampus_2d_noskip"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--flips", nargs="+", default=None, help='members as axis lists: "" (none), 0, 1, 01')
    p.add_argument("--max-cases", type=int, default=None)
    args = p.parse_args()
    for name in args.checkpoints:
        payload = load_checkpoint(name)
        seg = Segmenter.from_payload(payload)
        if args.flips is not None:
            seg.tta_flips = [tuple(int(c) for c in f) for f in args.flips]
        refs, info = list_cases(dataset_info(payload["dataset"]), args.data_root)
        refs = [r for r in refs if r.case_id in set(payload["split"]["val"])][: args.max_cases]
        cases = load_cases(refs, info, seg.preprocessing.normalization, progress=False)
        marked, member_dice = [], []
        for case in cases:
            members = seg.flip_predictions(case.image, normalized=True)
            vote = vote_disagreement(members)
            fg = members[0] > 0
            marked.append(float((vote[fg] > 0).mean()) if fg.any() else 0.0)
            scores = [score_case(m, case.label, seg.class_names) for m in members]
            member_dice.append([np.nanmean([s[f"dice_{k}"] for k in seg.class_names[1:]]) for s in scores])
        dice = np.mean(member_dice, axis=0)
        print(f"{name}: flips {seg.tta_flips}; predicted foreground marked uncertain: mean {np.mean(marked):.1%}, "
              f"max {np.max(marked):.1%} over {len(cases)} cases; mean Dice of each member alone: "
              + ", ".join(f"{f or 'none'} {d:.3f}" for f, d in zip(seg.tta_flips, dice)), flush=True)


if __name__ == "__main__":
    main()

"""Re-evaluate shipped models on their validation split, without and with flip TTA, and record it.

    python benchmarks/rescore_shipped.py --data-root ../shared/data [NAME ...]

Rewrites each model's ``metrics.json`` evaluation fields, ``per_case.csv`` and
``per_case_tta.csv`` with :func:`unetseg.export.record_evaluation` (what
``unetseg export`` runs), keeping its ``checkpoint`` and ``training`` record.
For models shipped before export recorded TTA; new models get it from export.
"""

from __future__ import annotations

import argparse
import json

from unetseg.export import record_evaluation
from unetseg.infer import PRETRAINED_DIR, shipped_models
from unetseg.runlog import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="shipped models (default: all)")
    p.add_argument("--data-root", default=None, help="data root (default: $UNETSEG_DATA_ROOT)")
    args = p.parse_args()
    for name in args.names or shipped_models():
        path = PRETRAINED_DIR / name / "metrics.json"
        old = json.loads(path.read_text())
        new = {**record_evaluation(PRETRAINED_DIR / name, args.data_root, progress=True),
               "checkpoint": old["checkpoint"], "training": old["training"]}
        write_json(path, new)
        t = new["with_tta"]
        print(f"{name}: Dice {new['mean_dice']:.4f} ({new['seconds_per_case']:.2f} s/case), "
              f"with TTA {t['mean_dice']:.4f} ({t['seconds_per_case']:.2f} s/case, flips {t['tta_flips']})", flush=True)


if __name__ == "__main__":
    main()

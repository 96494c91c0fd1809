#!/usr/bin/env bash
# Train candidate models side by side on one GPU machine, each for the same wall-clock budget
# (train.max_minutes), into OUT/runs/<run>/, and pack each run's best.pt and logs into OUT/<run>.tar.gz (to carry back).
#
#   UNETSEG_DATA_ROOT=/path/to/data [GPU_ROUND=hippocampus_3d|dsb2018_2d] benchmarks/gpu_round.sh OUT [MINUTES] [--set ...]
#
# hippocampus_3d (the default): the shipped hippocampus_3d config with augmentation strength 1.5 (rotation +-22.5 deg,
# scale +-22.5 %, each transform 1.5 times as often), batch 4, 100 steps per epoch, validation every 4 epochs,
# 2 DataLoader workers. Runs: three seeds with long skips, one without (the twin), and one at augmentation
# strength 1 (the shipped augmentation) as the control.
# dsb2018_2d: the shipped dsb2018_2d config (stain and inversion augmentation) with widths 32-64-128-256, 256x256 crops,
# 500 steps per epoch, validation every 4 epochs, 6 DataLoader workers; with and without long skips.
# Each run's console output is RUN/console.log. docs/gpu_round.md gives the figures of the rounds that trained the
# shipped models. On a CPU the same commands run, far slower.
set -u
out=${1:?usage: gpu_round.sh OUT [MINUTES] [--set ...]}
minutes=${2:-7}
shift $(( $# >= 2 ? 2 : 1 ))
data=${UNETSEG_DATA_ROOT:?set UNETSEG_DATA_ROOT to the folder holding the data set folders}
mkdir -p "$out/runs"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
round=${GPU_ROUND:-hippocampus_3d}
case $round in
  hippocampus_3d) recipe=(--set train.batch_size=4 --set train.steps_per_epoch=100 --set train.num_workers=2) ;;
  dsb2018_2d) recipe=(--set model.channels=[32,64,128,256] --set data.patch_size=[256,256]
                      --set train.steps_per_epoch=500 --set train.num_workers=6) ;;
  *) echo "GPU_ROUND must be hippocampus_3d or dsb2018_2d, not $round" >&2; exit 2 ;;
esac
common=(--config "$round" --data-root "$data" --quiet --set train.max_minutes="$minutes" --set train.epochs=1000
        --set train.val_every=4 "${recipe[@]}" "$@")
hard_limit=$(python3 -c "print(int($minutes * 60 + 90))")  # data loading + the last epoch's overrun

train() {  # train NAME ARGS...: one run in the background into OUT/runs/NAME
  local name=$1; shift
  timeout "$hard_limit" python3 -m unetseg train "${common[@]}" --out "$out/runs/$name" "$@" \
    >"$out/$name.console.log" 2>&1 &
}
if [ "$round" = hippocampus_3d ]; then
  train h3d_s0 --set augment.strength=1.5 --seed 0
  train h3d_s1 --set augment.strength=1.5 --seed 1
  train h3d_s2 --set augment.strength=1.5 --seed 2
  train h3d_noskip_s0 --set augment.strength=1.5 --seed 0 --no-skip
  train h3d_aug1_s0 --set augment.strength=1.0 --seed 0
else
  train dsb_s0 --seed 0
  train dsb_noskip_s0 --seed 0 --no-skip
fi
wait

python3 - "$out/runs" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
    val = [r for r in rows if "val_mean_dice" in r]
    best = max(val, key=lambda r: r["val_mean_dice"]) if val else {}
    print(f"{run.name}: {len(rows)} epochs, {rows[-1]['samples_per_s'] if rows else 0:.0f} samples/s, "
          f"last val {val[-1]['val_mean_dice'] if val else float('nan'):.4f}, best {best.get('val_mean_dice', float('nan')):.4f} "
          f"at epoch {best.get('epoch', -1) + 1}, {rows[-1]['elapsed_s'] if rows else 0:.0f} s")
PY
for run in "$out"/runs/*/; do
  name=$(basename "$run")
  mv "$out/$name.console.log" "$run/console.log"
  tar -czf "$out/$name.tar.gz" -C "$out/runs" --exclude last.pt "$name"
done

ls -la "$out"

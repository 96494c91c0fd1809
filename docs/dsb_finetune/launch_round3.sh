#!/bin/bash
# CPU fine-tune round 3 from the shipped (round-1) DSB models: round 1's settings plus a wider isotropic zoom
# (augment.scale 0.7-1.5) for the dim, large, textured nuclei the models break into speckle; 8 epochs, 90 minutes.
cd "$(dirname "$0")/../.."
export UNETSEG_DATA_ROOT=${UNETSEG_DATA_ROOT:-../shared/data} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p runs/ft3
COMMON="--set data.kind_balance=0.5 --set augment.scale=[0.7,1.5] --set train.channels_last=true --set train.lr=0.0003 --set train.warmup_steps=20 --set train.batch_size=8 --set train.steps_per_epoch=100 --set train.epochs=8 --set train.val_every=2 --set train.max_minutes=90"
setsid nohup .venv/bin/unetseg train --config dsb2018_2d --init-from dsb2018_2d --out runs/ft3/dsb_ft3 $COMMON > runs/ft3/dsb_ft3.log 2>&1 &
setsid nohup .venv/bin/unetseg train --config dsb2018_2d --no-skip --init-from dsb2018_2d_noskip --out runs/ft3/dsb_noskip_ft3 $COMMON > runs/ft3/dsb_noskip_ft3.log 2>&1 &

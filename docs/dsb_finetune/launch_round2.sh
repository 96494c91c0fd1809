#!/bin/bash
# Round 2 of the CPU fine-tune: from round 1's best checkpoints, every kind drawn alike, 40-minute budget.
cd /work/main
export UNETSEG_DATA_ROOT=/work/shared/data OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON="--set data.kind_balance=1.0 --set train.channels_last=true --set train.lr=0.0002 --set train.warmup_steps=10 --set train.batch_size=8 --set train.steps_per_epoch=100 --set train.epochs=4 --set train.val_every=2 --set train.max_minutes=40"
setsid nohup .venv/bin/unetseg train --config dsb2018_2d --init-from runs/ft/dsb_ft --out runs/ft/dsb_ft2 $COMMON > runs/ft/dsb_ft2.log 2>&1 &
setsid nohup .venv/bin/unetseg train --config dsb2018_2d --no-skip --init-from runs/ft/dsb_noskip_ft --out runs/ft/dsb_noskip_ft2 $COMMON > runs/ft/dsb_noskip_ft2.log 2>&1 &

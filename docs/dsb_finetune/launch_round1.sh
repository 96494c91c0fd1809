#!/bin/bash
# CPU fine-tune of the shipped DSB models: rare kinds drawn more often, channels_last, 80-minute budget.
cd /work/main
export UNETSEG_DATA_ROOT=/work/shared/data OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON="--set data.kind_balance=0.5 --set train.channels_last=true --set train.lr=0.0003 --set train.warmup_steps=20 --set train.batch_size=8 --set train.steps_per_epoch=100 --set train.epochs=6 --set train.val_every=3 --set train.max_minutes=80"
setsid nohup .venv/bin/unetseg train --config dsb2018_2d --init-from dsb2018_2d --out runs/ft/dsb_ft $COMMON > runs/ft/dsb_ft.log 2>&1 &
setsid nohup .venv/bin/unetseg train --config dsb2018_2d --no-skip --init-from dsb2018_2d_noskip --out runs/ft/dsb_noskip_ft $COMMON > runs/ft/dsb_noskip_ft.log 2>&1 &

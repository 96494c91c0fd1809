"""DistributedDataParallel on CPU: torchrun with 2 gloo processes trains a few steps; rank 0 alone writes.

Also as two "nodes" (two torchrun launchers joined by c10d rendezvous over loopback), as a multi-node job
runs: the README's multi-node command with localhost as the rendezvous host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def tiny_train(data_root, out) -> list[str]:
    """``unetseg train`` arguments for a few steps of a tiny network on 8 real cases."""
    return ["-m", "unetseg", "train", "--config", "hippocampus_2d", "--data-root", str(data_root), "--out", str(out),
            "--device", "cpu", "--quiet",
            "--set", "data.max_cases=8", "--set", "train.epochs=2", "--set", "train.batch_size=4",
            "--set", "model.channels=[4, 8]", "--set", "train.warmup_steps=1"]


def check_two_rank_run(out) -> None:
    """What a run of 2 ranks in all leaves: rank 0's files only, each rank half the epoch."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch: only rank 0 wrote
    split = json.loads((out / "split.json").read_text())
    n_slices_one_rank = rows[0]["step"]  # steps per epoch on each rank
    # 6 training volumes of ~36 slices, batch 4 per rank, 2 ranks: each rank sees half the epoch
    assert 0 < n_slices_one_rank * 4 * 2 <= 6 * 48 and len(split["val"]) == 2
    assert "val_mean_dice" in rows[-1] and 0.0 <= rows[-1]["val_mean_dice"] <= 1.0
    state = torch.load(out / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["state_dict"])  # saved unwrapped


def test_torchrun_two_cpu_processes(tmp_path, data_root):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           *tiny_train(data_root, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    check_two_rank_run(out)


def test_torchrun_two_nodes_over_loopback(tmp_path, data_root):
    """Two launchers, one process each, meeting at a c10d rendezvous: the multi-node command of the README."""
    out = tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"node{node}.log" for node in range(2)]  # files, not pipes: a full pipe would stall a rank
    launchers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29541", "--rdzv_id", "unetseg-test",
                          *tiny_train(data_root, out)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        for log in logs
    ]
    try:
        codes = [p.wait(timeout=300) for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    check_two_rank_run(out)

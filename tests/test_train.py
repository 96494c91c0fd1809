"""Training on the real hippocampus data: it learns, writes a complete run folder, and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from unetseg.errors import UnetsegError
from unetseg.train import fit, lr_factor

from .conftest import tiny_config


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_short_real_training_learns(tmp_path, data_root):
    cfg = tiny_config(
        [
            "data.max_cases=30",
            "train.epochs=3",
            "train.steps_per_epoch=40",
            "train.batch_size=16",
            "train.lr=0.01",
            "train.warmup_steps=5",
            "model.channels=[8, 16, 32]",
        ]
    )
    run = fit(cfg, tmp_path / "run", data_root=data_root, progress=False)
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # 120 steps of a tiny net: far from converged, but clearly learning (an untrained net scores ~0).
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert rows[-1]["val_mean_dice"] > 0.15, rows[-1]
    assert rows[-1]["val_mean_dice"] > rows[0]["val_mean_dice"] + 0.1
    for name in ("config.yaml", "split.json", "best.pt", "last.pt", "curves.png"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 24 and len(split["val"]) == 6 and not set(split["train"]) & set(split["val"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps_per_epoch"] == 40 and saved["model"]["channels"] == [8, 16, 32]
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["model_args"]["channels"] == [8, 16, 32]
    assert ckpt["preprocessing"]["slice_axis"] == 2
    assert ckpt["split"] == split
    assert "optimizer" not in ckpt and "optimizer" in torch.load(run / "last.pt", weights_only=True)


def test_resume_matches_uninterrupted_run(tmp_path, data_root):
    cfg = tiny_config(["train.epochs=2", "train.steps_per_epoch=4", "model.dropout=0.1"])
    straight = fit(cfg, tmp_path / "straight", data_root=data_root, progress=False)

    resumed = tmp_path / "resumed"
    fit(cfg, resumed, data_root=data_root, progress=False, stop_after_epoch=0)  # as if killed after epoch 0
    assert [r["epoch"] for r in metrics(resumed)] == [0]
    fit(cfg, resumed, data_root=data_root, progress=False, resume=True)

    a, b = metrics(straight), metrics(resumed)
    assert [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["val_mean_dice"] == pytest.approx(rb["val_mean_dice"], abs=1e-6)
    wa = torch.load(straight / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(resumed / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_existing_run_is_not_overwritten(tiny_run, data_root):
    with pytest.raises(UnetsegError, match="already holds a run"):
        fit(tiny_config(), tiny_run, data_root=data_root, progress=False)


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 100, 10, "poly") == pytest.approx(0.5**0.9)
    assert np.all(np.diff([lr_factor(s, 100, 10, "cosine") for s in range(10, 100)]) <= 0)


def test_3d_training_on_whole_volumes(tmp_path, data_root):
    from unetseg.config import apply_overrides, load_config

    cfg = apply_overrides(
        load_config("hippocampus_3d"),
        ["data.max_cases=4", "train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=2",
         "model.channels=[2, 4]", "train.warmup_steps=1"],
    )
    run = fit(cfg, tmp_path / "run3d", data_root=data_root, progress=False)
    row = metrics(run)[-1]
    assert 0.0 <= row["val_mean_dice"] <= 1.0 and np.isfinite(row["train_loss"])
    assert torch.load(run / "best.pt", weights_only=True)["model_args"]["spatial_dims"] == 3

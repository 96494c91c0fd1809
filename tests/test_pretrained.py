"""Shipped models: present, small, self-describing, and their recorded figures reproduce."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from unetseg.cli import main
from unetseg.infer import PRETRAINED_DIR, Segmenter, shipped_models

SHIPPED = ["hippocampus_2d", "hippocampus_2d_noskip", "dsb2018_2d", "dsb2018_2d_noskip"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_complete_and_small(name):
    assert name in shipped_models(), f"{name} is not shipped under {PRETRAINED_DIR}"
    folder = PRETRAINED_DIR / name
    assert (folder / "model.pt").stat().st_size <= 10 * 1024 * 1024
    payload = torch.load(folder / "model.pt", weights_only=True)
    assert "optimizer" not in payload
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert payload["config"] == config
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_cases"] == len(payload["split"]["val"])
    assert metrics["training"]["command"][0].startswith("unetseg train")
    Segmenter.from_checkpoint(name)  # loads by name


@pytest.mark.parametrize("base", ["hippocampus_2d", "dsb2018_2d"])
def test_noskip_models_differ_only_by_skips(base):
    a = yaml.safe_load((PRETRAINED_DIR / base / "config.yaml").read_text())
    b = yaml.safe_load((PRETRAINED_DIR / f"{base}_noskip" / "config.yaml").read_text())
    assert a["model"].pop("skips") is True and b["model"].pop("skips") is False
    assert a == b


def test_hippocampus_2d_reaches_target_and_evaluate_reproduces_it(tmp_path, data_root):
    recorded = json.loads((PRETRAINED_DIR / "hippocampus_2d" / "metrics.json").read_text())
    assert recorded["mean_dice"] >= 0.85
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", "hippocampus_2d", "--data-root", str(data_root),
                 "--dataset", "hippocampus", "--split", "val", "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == recorded["num_cases"] == 42
    assert summary["mean_dice"] == pytest.approx(recorded["mean_dice"], abs=1e-6)

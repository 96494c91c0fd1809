"""docs/gpu_round.md quotes figures that its run records hold; the shipped 3D models are those runs, the DSB models
those runs fine-tuned on the CPU (docs/dsb_finetune.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unetseg.infer import PRETRAINED_DIR
from unetseg.runlog import read_epoch_log

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNS = DOCS / "gpu_round"


def table_rows(*starts: str) -> dict[str, list[str]]:
    """Rows of docs/gpu_round.md's tables whose first cell starts with one of ``starts``: first cell -> cells."""
    rows = {}
    for line in (DOCS / "gpu_round.md").read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].startswith(starts):
            rows[cells[0]] = cells
    return rows


def epochs_of(folder: Path) -> list[dict]:
    return read_epoch_log(folder / "metrics.jsonl")  # epochs counted from 1


def dice(path: Path) -> str:
    return f"{json.loads(path.read_text())['mean_dice']:.4f}"


def test_quoted_dice_figures_match_the_run_records():
    rows = table_rows("h3d_", "ensemble of h3d")
    assert set(rows) == {"h3d_s0", "h3d_s1", "h3d_s2", "h3d_noskip_s0", "h3d_aug1_s0", "ensemble of h3d_s0, s1, s2"}
    for run, cells in rows.items():
        folder = RUNS / ("ensemble_s0_s1_s2" if run.startswith("ensemble") else run)
        assert cells[7] == dice(folder / "evaluation.json"), run
        assert cells[8] == dice(folder / "evaluation_tta.json"), run
        if run.startswith("h3d"):
            metrics = epochs_of(folder)
            validated = [r for r in metrics if "val_mean_dice" in r]
            assert cells[4] == str(len(metrics)), run
            assert cells[6] == str(max(validated, key=lambda r: r["val_mean_dice"])["epoch"]), run
            assert cells[9] == f"{validated[-1]['val_mean_dice']:.4f}", run


def test_quoted_dsb_figures_match_the_run_records():
    rows = table_rows("dsb_", "ensemble of dsb")
    assert set(rows) == {"dsb_s0", "dsb_noskip_s0", "ensemble of dsb_s0 and dsb_noskip_s0"}
    for run, cells in rows.items():
        folder = RUNS / ("ensemble_dsb" if run.startswith("ensemble") else run)
        if run.startswith("dsb"):
            assert cells[2] == str(len(epochs_of(folder))), run
        assert cells[3] == dice(folder / "evaluation.json"), run
        assert cells[4] == dice(folder / "evaluation_tta.json"), run


@pytest.mark.parametrize("name, run", [("hippocampus_3d", "h3d_s0"), ("hippocampus_3d_noskip", "h3d_noskip_s0")])
def test_shipped_models_are_the_gpu_round_runs(name, run):
    shipped = json.loads((PRETRAINED_DIR / name / "metrics.json").read_text())
    assert f"{shipped['mean_dice']:.6f}" == f"{json.loads((RUNS / run / 'evaluation.json').read_text())['mean_dice']:.6f}"
    assert (PRETRAINED_DIR / name / "training_metrics.jsonl").read_text() == (RUNS / run / "metrics.jsonl").read_text()
    config = torch.load(PRETRAINED_DIR / name / "model.pt", weights_only=True)["config"]
    assert config["train"]["max_minutes"] == 6.5 and config["augment"]["strength"] == 1.5


FINETUNE_RUNS = DOCS / "dsb_finetune"


@pytest.mark.parametrize("name, run, first, third", [("dsb2018_2d", "dsb_s0", "dsb_ft", "dsb_ft3"),
                                                     ("dsb2018_2d_noskip", "dsb_noskip_s0", "dsb_noskip_ft",
                                                      "dsb_noskip_ft3")])
def test_shipped_dsb_models_were_fine_tuned_twice_from_the_gpu_round_runs(name, run, first, third):
    """docs/dsb_finetune.md: each DSB model is its GPU-round run fine-tuned on the CPU in round 1, then again in
    round 3 (a wider zoom); metrics.json records the chain back to the GPU run (its command and figures)."""
    training = json.loads((PRETRAINED_DIR / name / "metrics.json").read_text())["training"]
    assert training["command"] == (FINETUNE_RUNS / third / "command.txt").read_text().strip().splitlines()
    assert training["command"][0].startswith(f"unetseg train --config dsb2018_2d {'--no-skip ' * ('noskip' in name)}"
                                             f"--init-from {name} ")
    round1 = training["init_from"]
    assert round1["source"] == name
    assert round1["training"]["command"] == (FINETUNE_RUNS / first / "command.txt").read_text().strip().splitlines()
    gpu = round1["training"]["init_from"]
    assert gpu["source"] == name and "init_from" not in gpu["training"]
    assert gpu["training"]["command"] == (RUNS / run / "command.txt").read_text().strip().splitlines()
    assert f"{gpu['mean_dice']:.6f}" == f"{json.loads((RUNS / run / 'evaluation.json').read_text())['mean_dice']:.6f}"
    config = torch.load(PRETRAINED_DIR / name / "model.pt", weights_only=True)["config"]
    assert config["data"]["kind_balance"] == 0.5 and config["train"]["init_from"] == name
    assert config["augment"]["color"] and config["augment"]["invert"] and config["augment"]["scale"] == [0.7, 1.5]

"""Optional TensorBoard logging in ``fit``: the event files hold what metrics.jsonl holds, also across a resume."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import tiny_config
from unetseg.errors import UnetsegError
from unetseg.eventlog import EVENT_DIR, NOT_SCALARS, EventLog, scalar_name
from unetseg.runlog import read_jsonl
from unetseg.train import fit

TENSORBOARD = ["train.tensorboard=true", "train.epochs=3", "train.val_every=1", "train.steps_per_epoch=2"]


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / EVENT_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_each_epochs_metrics_at_its_step(tmp_path, data_root):
    run = fit(tiny_config(TENSORBOARD), tmp_path / "run", data_root=data_root, progress=False)
    rows = read_jsonl(run / "metrics.jsonl")
    logged = scalars(run)
    finite = {scalar_name(k) for r in rows for k, v in r.items()
              if k not in NOT_SCALARS and isinstance(v, (int, float)) and math.isfinite(v)}
    assert set(logged) == finite and {"train/loss", "train/lr", "val/mean_dice", "val/dice_anterior"} <= finite
    assert logged["train/loss"] == [(r["step"], pytest.approx(r["train_loss"])) for r in rows]
    assert logged["val/mean_dice"] == [(r["step"], pytest.approx(r["val_mean_dice"])) for r in rows]


def test_a_resumed_run_logs_each_step_once(tmp_path, data_root):
    cfg = tiny_config(TENSORBOARD)
    run = fit(cfg, tmp_path / "run", data_root=data_root, progress=False, stop_after_epoch=1)
    fit(cfg, run, data_root=data_root, resume=True, progress=False)
    steps = [step for step, _ in scalars(run)["train/loss"]]
    assert steps == [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == sorted(set(steps))
    assert len(steps) == 3


def test_without_the_setting_no_event_files_are_written(tiny_run):
    assert not (tiny_run / EVENT_DIR).exists()


def test_names_and_a_missing_package(monkeypatch, tmp_path):
    assert [scalar_name(k) for k in ("train_loss", "lr", "val_mean_dice", "val_hd95_nucleus")] == [
        "train/loss", "train/lr", "val/mean_dice", "val/hd95_nucleus"]
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UnetsegError, match=r"pip install 'unetseg\[tensorboard\]'"):
        EventLog(tmp_path, enabled=True)
    EventLog(tmp_path, enabled=False).epoch({"step": 1, "train_loss": 0.5})  # off: nothing needed, nothing written
    assert not list(tmp_path.iterdir())

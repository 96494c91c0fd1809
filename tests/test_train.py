"""Training on the real hippocampus data: it learns, writes a complete run folder, and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from unetseg.errors import UnetsegError
from unetseg.train import TimeBudget, fit, lr_factor

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
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # counted from 1, as the console counts
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
    assert [r["epoch"] for r in metrics(resumed)] == [1]
    fit(cfg, resumed, data_root=data_root, progress=False, resume=True)

    a, b = metrics(straight), metrics(resumed)
    assert [r["epoch"] for r in b] == [1, 2]
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


def test_time_budget_decays_the_rate_and_stops_before_an_epoch_would_overrun():
    budget = TimeBudget(minutes=1.0)  # 60 s; the last epoch took 6 s of 10 steps
    budget.plan_epoch(elapsed_s=30.0, last_epoch_s=6.0, steps=10)
    assert budget.progress(0) == pytest.approx(0.5) and budget.progress(10) == pytest.approx(0.6)
    # The schedule follows the time once it is further spent than the steps (here 10 % of the steps).
    assert lr_factor(110, 1010, 10, "cosine", budget.progress(5)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.55)))
    assert lr_factor(110, 1010, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.1)))
    assert not budget.spent(elapsed_s=50.0, epoch_s=6.0) and budget.spent(elapsed_s=55.0, epoch_s=6.0)
    none = TimeBudget(None)
    none.plan_epoch(1e9, 1e9, 10)
    assert none.progress(5) == 0.0 and not none.spent(1e9, 1e9)


def test_time_limited_run_stops_early_and_validates_its_last_epoch(tmp_path, data_root, capsys):
    # 50 epochs planned, 1.2 s allowed: a few epochs fit, the one after which another would overrun is the last.
    cfg = tiny_config(["train.epochs=50", "train.steps_per_epoch=4", "train.val_every=10", "train.max_minutes=0.02",
                       "train.warmup_steps=1"])
    run = fit(cfg, tmp_path / "run", data_root=data_root, progress=True)
    rows = metrics(run)
    assert 1 <= len(rows) < 50 and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert "val_mean_dice" in rows[-1]  # the last epoch is validated even off the val_every rhythm
    assert rows[-1]["elapsed_s"] + rows[-1]["epoch_s"] > 1.2
    assert all(r["elapsed_s"] <= 1.2 for r in rows[:-1])  # no earlier epoch ended past the budget
    assert f"train.max_minutes=0.02 reached: stopped after epoch {len(rows)} of 50" in capsys.readouterr().err
    if len(rows) >= 3:  # from the second epoch on the schedule follows the clock, not the 200 planned steps
        assert rows[-1]["lr"] < rows[0]["lr"] * 0.9
    assert (run / "best.pt").is_file()


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


def test_checkpoint_stores_the_trained_flips_for_tta(tiny_run):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    assert ckpt["tta_flips"] == [[], [0]]  # hippocampus_2d mirrors left-right (axis 0) only
    from unetseg.infer import Segmenter

    assert Segmenter.from_checkpoint(tiny_run).tta_flips == [(), (0,)]


def test_collapsed_class_is_warned_in_progress_output_and_metrics(tmp_path, data_root, monkeypatch, capsys):
    """Two validations in a row with a foreground class at Dice 0 -> a warning line and a ``warning`` field."""
    import unetseg.train as train

    def never_posterior(segmenter, cases, progress=False):
        return [{"case_id": c.case_id, "dice_anterior": 0.7, "hd95_anterior": 2.0,
                 "dice_posterior": 0.0, "hd95_posterior": float("nan")} for c in cases]

    monkeypatch.setattr(train, "evaluate_cases", never_posterior)
    run = fit(tiny_config(["train.epochs=3", "train.steps_per_epoch=1"]), tmp_path / "run", data_root=data_root)
    rows = metrics(run)
    assert "warning" not in rows[0]  # one validation is not yet a pattern
    assert all("posterior" in r["warning"] and "anterior" not in r["warning"] for r in rows[1:])
    assert capsys.readouterr().err.count("warning: epoch") == 2
    assert all(r["val_hd95_posterior"] is None for r in rows)  # undefined HD95: strict JSON null, not NaN
    assert "NaN" not in (run / "metrics.jsonl").read_text()


def test_collapsed_classes_rule():
    from unetseg.train import collapsed_classes

    names = ["background", "a", "b"]
    history = [{"val_mean_dice": 0.3, "val_dice_a": 0.0, "val_dice_b": 0.6}, {"train_loss": 1.0},
               {"val_mean_dice": 0.3, "val_dice_a": 0.004, "val_dice_b": 0.0}]
    assert collapsed_classes(history, names) == ["a"]  # b was 0 only once; rows without validation don't count
    assert collapsed_classes(history[:1], names) == []


def test_batch_dice_gives_no_free_score_for_never_predicting_an_absent_class():
    """Per-sample soft Dice rewards "never predict class 2" in a slice without class 2; batch Dice does not."""
    from unetseg.losses import make_loss

    labels = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    labels[:, 0, 2:6, 2:6] = 1
    labels[1, 0, 6:8, 6:8] = 2  # class 2 only in the second sample
    never_two = torch.full((2, 3, 8, 8), -10.0)
    never_two[:, 0] = (labels[:, 0] != 1) * 20.0 - 10.0  # perfect on background / class 1, never class 2
    never_two[:, 1] = (labels[:, 0] == 1) * 20.0 - 10.0
    dice_only = {"lambda_ce": 0.0}
    per_sample = float(make_loss(**dice_only, batch_dice=False)(never_two, labels))
    batch = float(make_loss(**dice_only, batch_dice=True)(never_two, labels))
    # per sample: class 2 scores 1 in sample 0 and 0 in sample 1; over the batch it scores 0 -> a larger loss
    assert per_sample == pytest.approx((0 + 0 + 0 + 0 + 1 + 0) / 6, abs=0.02)
    assert batch == pytest.approx(1 / 3, abs=0.02)


def test_sgd_is_nesterov_momentum_sgd_and_bad_optimizer_settings_are_refused(tmp_path, data_root):
    from unetseg.config import apply_overrides
    from unetseg.model import UNet
    from unetseg.train import make_optimizer

    cfg = tiny_config(["train.optimizer=sgd", "train.momentum=0.8", "model.norm=none", "model.stage_blocks=2"])
    opt = make_optimizer(UNet(channels=(4, 8)), cfg.train)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"]
    assert isinstance(make_optimizer(UNet(channels=(4, 8)), tiny_config().train), torch.optim.AdamW)
    run = fit(cfg, tmp_path / "sgd", data_root=data_root, progress=False)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] > 0
    for bad, message in (("train.optimizer=adam", "optimizer"), ("train.momentum=1.0", "momentum"),
                         ("model.stage_blocks=0", "stage_blocks")):
        with pytest.raises(UnetsegError, match=message):
            apply_overrides(cfg, [bad])


def test_a_run_logged_with_epochs_from_0_resumes_with_its_log_counted_from_1(tmp_path, data_root):
    """metrics.jsonl counts epochs from 1, as the console does; a run folder from before (epochs from 0) resumes
    with its rows renumbered, so its log does not mix the two."""
    from unetseg.runlog import read_epoch_log

    cfg = tiny_config(["train.epochs=2", "train.steps_per_epoch=1"])
    run = tmp_path / "run"
    fit(cfg, run, data_root=data_root, progress=False, stop_after_epoch=0)
    old = "".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in metrics(run))  # as older code wrote it
    (run / "metrics.jsonl").write_text(old)
    assert [r["epoch"] for r in read_epoch_log(run / "metrics.jsonl")] == [1]
    fit(cfg, run, data_root=data_root, progress=False, resume=True)
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


def test_init_from_starts_from_the_checkpoint_s_weights_and_refuses_what_would_mislead(tiny_run, tmp_path, data_root):
    """train.init_from (unetseg train --init-from): the fine-tuned run's logged step-0 weights are the checkpoint's;
    another network, or a split whose validation cases the checkpoint was trained on, is a one-line error."""
    from unetseg.checkpoint import Checkpoint
    from unetseg.runlog import read_jsonl

    start = Checkpoint.load(tiny_run / "last.pt").state_dict
    out = fit(tiny_config([f"train.init_from={tiny_run / 'last.pt'}", "train.grad_log_every=1"]), tmp_path / "ft",
              data_root=data_root, progress=False)
    step0 = next(r for r in read_jsonl(out / "gradients.jsonl") if r["step"] == 0)
    assert step0["layers"]
    for layer in step0["layers"]:
        assert layer["weight_norm"] == pytest.approx(float(start[layer["layer"]].norm()), rel=1e-6), layer["layer"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["init_from"] == str(tiny_run / "last.pt")

    with pytest.raises(UnetsegError, match="a different network.*channels"):
        fit(tiny_config([f"train.init_from={tiny_run}", "model.channels=[4, 8, 32]"]), tmp_path / "other_net",
            data_root=data_root, progress=False)
    with pytest.raises(UnetsegError, match="trained on [0-9]+ of this run's validation cases"):
        fit(tiny_config([f"train.init_from={tiny_run}", "data.split_seed=7"]), tmp_path / "other_split",
            data_root=data_root, progress=False)
    assert not (tmp_path / "other_split").exists() and not (tmp_path / "other_net").exists()


def test_kind_balance_draws_each_kind_equally_often(tmp_path, data_root, monkeypatch):
    """data.kind_balance=1: a kind of one sample among hundreds is drawn as often as all the others together."""
    import unetseg.train as train_module

    kinds = iter(["rare"] + ["common"] * 10_000)
    monkeypatch.setattr(train_module, "image_kind", lambda image: next(kinds))
    drawn: list[int] = []
    getitem = train_module.PatchDataset.__getitem__
    monkeypatch.setattr(train_module.PatchDataset, "__getitem__", lambda self, i: (drawn.append(i), getitem(self, i))[1])
    fit(tiny_config(["data.kind_balance=1", "train.steps_per_epoch=25", "train.val_max_cases=1"]), tmp_path / "run",
        data_root=data_root, progress=False)
    assert len(drawn) == 200 and len(set(drawn)) > 50
    assert 70 <= drawn.count(0) <= 130  # binomial(200, 0.5); uniform drawing would give about 1


def test_kind_balance_with_several_processes_is_refused():
    from unetseg.train import check_kind_balance, sampling_weights

    images = [np.zeros((1, 4, 4))] * 3
    assert sampling_weights(images, 0.0) is None
    assert sampling_weights(images, 0.5).sum() == pytest.approx(1.0)
    check_kind_balance(0.5, 1)
    check_kind_balance(0.0, 2)
    with pytest.raises(UnetsegError, match="kind_balance"):
        check_kind_balance(0.5, 2)


def test_channels_last_training_trains_the_same_network(tmp_path, data_root):
    """train.channels_last changes the memory layout, not what is learnt: the same gradients at the first step and
    the same losses within rounding (Adam can turn a rounding-sized gradient into a step of up to train.lr, so
    weights are compared at that scale)."""
    from unetseg.runlog import read_jsonl

    runs = {flag: fit(tiny_config([f"train.channels_last={flag}", "train.val_max_cases=2", "train.grad_log_every=1"]),
                      tmp_path / str(flag), data_root=data_root, progress=False) for flag in (False, True)}
    a, b = (metrics(runs[flag])[-1] for flag in (False, True))
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["val_mean_dice"] == pytest.approx(b["val_mean_dice"], abs=1e-3)
    first = [next(r for r in read_jsonl(runs[flag] / "gradients.jsonl") if r["step"] == 0)["layers"] for flag in (False, True)]
    for la, lb in zip(*first):
        assert la["layer"] == lb["layer"] and la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-3, abs=1e-7)
    wa, wb = (torch.load(runs[flag] / "last.pt", weights_only=True)["state_dict"] for flag in (False, True))
    steps, lr = 3, 3e-3  # tiny_config: 3 steps; hippocampus_2d's learning rate
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=steps * lr) for k in wa)
    convs = [k for k in wb if wb[k].dim() == 4 and wb[k].shape[1] > 1 and wb[k].shape[-1] > 1]
    assert convs and all(wb[k].is_contiguous(memory_format=torch.channels_last) for k in convs)  # it did train so
    assert not any(wa[k].is_contiguous(memory_format=torch.channels_last) for k in convs)

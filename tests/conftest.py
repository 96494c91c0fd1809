"""Shared fixtures: the real data root (required, never skipped) and a tiny trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unetseg.config import apply_overrides, load_config
from unetseg.data.datasets import DATA_ROOT_ENV, default_data_root

REPO = Path(__file__).resolve().parents[1]

# Tests (and the apps they start) may change directory: pin a relative data root now.
if os.environ.get(DATA_ROOT_ENV):
    os.environ[DATA_ROOT_ENV] = str(Path(os.environ[DATA_ROOT_ENV]).resolve())


def real_data_root() -> Path:
    """The shared data root; fails the test (not skip) when the data is missing."""
    root = default_data_root()
    if not (root / "Task04_Hippocampus" / "dataset.json").is_file() or not (root / "dsb2018_stage1_train").is_dir():
        pytest.fail(
            f"real data not found under {root}; set {DATA_ROOT_ENV} to the folder holding "
            "Task04_Hippocampus and dsb2018_stage1_train (CI uses ../shared/data)"
        )
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    return real_data_root()


def tiny_config(extra: list[str] | None = None):
    """A hippocampus_2d config small enough to train in seconds."""
    overrides = [
        "data.max_cases=8",
        "train.epochs=1",
        "train.steps_per_epoch=3",
        "train.batch_size=8",
        "train.warmup_steps=1",
        "model.channels=[4, 8, 16]",
        "data.patch_size=[48, 64]",
    ]
    return apply_overrides(load_config("hippocampus_2d"), overrides + (extra or []))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """A run folder trained for a few steps on 8 real hippocampus cases."""
    from unetseg.train import fit

    out = tmp_path_factory.mktemp("tiny_run")
    return fit(tiny_config(), out, data_root=data_root, progress=False)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))

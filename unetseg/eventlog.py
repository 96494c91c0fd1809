"""TensorBoard event files of a training run (``train.tensorboard: true``): ``tensorboard --logdir RUN``.

Each epoch's ``metrics.jsonl`` row becomes scalars at the row's ``step``
(training iterations so far): ``train/loss``, ``train/lr``,
``train/samples_per_s`` and, after each validation, ``val/mean_dice``,
``val/dice_<class>`` and ``val/hd95_<class>``. The files go to
``RUN/tensorboard/``; a resumed run drops the events after its checkpoint
(``purge_step``), as its ``metrics.jsonl`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unetseg.errors import UnetsegError

EVENT_DIR = "tensorboard"
NOT_SCALARS = ("epoch", "step", "elapsed_s")


def scalar_name(key: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` key: ``val_dice_anterior`` -> ``val/dice_anterior``,
    ``train_loss`` -> ``train/loss``, ``lr`` -> ``train/lr``."""
    if key.startswith("val_"):
        return "val/" + key.removeprefix("val_")
    return "train/" + key.removeprefix("train_")


class EventLog:
    """Writes a run's epoch rows as TensorBoard scalars; does nothing when not ``enabled``.

    Args:
        run_dir: the run folder (events go to ``run_dir/tensorboard``).
        enabled: ``cfg.train.tensorboard``.
        purge_step: on resume, the first step still to train: events from it on are dropped.

    Raises:
        UnetsegError: enabled without the ``tensorboard`` package (one line saying how to install it).
    """

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UnetsegError("train.tensorboard=true needs the tensorboard package: pip install 'unetseg[tensorboard]'"
                               ", or set train.tensorboard=false") from None
        self.writer = SummaryWriter(str(Path(run_dir) / EVENT_DIR), purge_step=purge_step)

    def epoch(self, row: Mapping[str, Any]) -> None:
        """Log the finite numbers of one ``metrics.jsonl`` row at its ``step``."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(scalar_name(key), value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

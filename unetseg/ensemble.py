"""Ensembles: several trained models whose class probabilities are averaged.

An :class:`Ensemble` is a :class:`~unetseg.infer.Predictor`, so ``unetseg
predict`` and ``unetseg evaluate`` (``--checkpoint A --checkpoint B ...``) and
the Python API take it wherever they take one :class:`~unetseg.infer.Segmenter`.
Its members may differ in architecture (a 3D and a 2D model, k-fold models,
skip and no-skip networks) but must agree on what they predict and read:
the same classes, the same intensity normalisation and input channels, and
the same kind of input (volumes or 2D images).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.checkpoint import Checkpoint
from unetseg.errors import UnetsegError
from unetseg.infer import Predictor, Segmenter, dataset_kind

# A cross-validation folder (unetseg.cv) is an ensemble too: its manifest names it, its folds are its members.
CV_MANIFEST = "cv.json"


def fold_dir(out: str | Path, fold: int) -> Path:
    """The run folder of fold ``fold`` (0-based)."""
    return Path(out) / f"fold_{fold}"


def fold_checkpoints(cv_dir: str | Path) -> list[Path] | None:
    """The fold models' ``best.pt`` of a cross-validation folder; None when ``cv_dir`` is not one.

    Raises :class:`UnetsegError` when a fold has no model yet."""
    cv_dir = Path(cv_dir)
    manifest = cv_dir / CV_MANIFEST
    if not manifest.is_file():
        return None
    folds = int(read_cv_manifest(manifest)["folds"])
    paths = [fold_dir(cv_dir, k) / "best.pt" for k in range(folds)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UnetsegError(f"{cv_dir}: {len(missing)} of {folds} fold models are not trained yet ({missing[0]}); "
                           "finish them with the same unetseg cv command")
    return paths


def read_cv_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a cross-validation folder (``folds``, ``config``, ``command``)."""
    try:
        manifest = json.loads(path.read_text())
        int(manifest["folds"])
        return manifest
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UnetsegError(f"{path}: not a cross-validation manifest ({exc}); remove the folder or choose another "
                           "--out") from None


# Preprocessing settings every member must share: one prepared (normalised) image is fed to all of them.
SHARED_PREPROCESSING = ("normalization", "in_channels")


class Ensemble(Predictor):
    """The mean of its members' class probabilities (each with its own flip TTA when ``tta``).

    Args:
        members: the models, each a :class:`Segmenter`.
        names: what to call each member in error messages (checkpoint names); default ``member 1``, ...

    Raises:
        UnetsegError: the members disagree on classes, normalisation, input
            channels or the data set they were trained on (see :func:`incompatibility`).

    Example::

        ensemble = Ensemble([Segmenter.from_checkpoint("hippocampus_3d"),
                             Segmenter.from_checkpoint("hippocampus_3d_noskip")])
        labels = ensemble.predict(volume)   # (X, Y, Z) raw intensities -> (X, Y, Z) labels
    """

    def __init__(self, members: Sequence[Segmenter], names: Sequence[str] | None = None) -> None:
        if not members:
            raise UnetsegError("an ensemble needs at least one model")
        names = list(names) if names is not None else [f"member {i + 1}" for i in range(len(members))]
        if len(names) != len(members):
            raise ValueError(f"{len(members)} members but {len(names)} names")
        for name, member in zip(names[1:], members[1:]):
            problem = incompatibility(members[0], member)
            if problem:
                raise UnetsegError(f"{names[0]} and {name} cannot be averaged: {problem}")
        self.members = list(members)
        self.names = names
        first = members[0]
        self.class_names = first.class_names
        self.preprocessing = first.preprocessing  # the members share SHARED_PREPROCESSING, what preparing an image needs
        self.dataset = next((m.dataset for m in members if m.dataset), None)

    @classmethod
    def from_checkpoints(cls, names_or_paths: Sequence[str | Path], device: str = "cpu", int8: bool = False
                         ) -> Ensemble:
        """Load each checkpoint (path, run folder or shipped model name) as a member; ``int8``: each with its int8
        calibration (see :meth:`Segmenter.from_checkpoint`)."""
        return cls([Segmenter.from_checkpoint(n, device, int8) for n in names_or_paths],
                   [str(n) for n in names_or_paths])

    @classmethod
    def from_payloads(
        cls, payloads: Sequence[Checkpoint | dict[str, Any]], names: Sequence[str], device: str = "cpu"
    ) -> Ensemble:
        """Build from :class:`~unetseg.checkpoint.Checkpoint` s, or the dicts
        :func:`~unetseg.checkpoint.load_checkpoint` returns."""
        return cls([Segmenter.from_payload(p, device) for p in payloads], names)

    @property
    def spatial_dims(self) -> int:
        """3 when any member is a 3D network (the ensemble then takes volumes only), else 2."""
        return max(m.spatial_dims for m in self.members)

    @property
    def progress(self) -> bool:
        return self.members[0].progress

    @progress.setter
    def progress(self, value: bool) -> None:
        for member in self.members:
            member.progress = value

    @property
    def tta_flips(self) -> list[tuple[int, ...]]:
        """The mirrorings at least one member averages under TTA (each member uses its own)."""
        return list(dict.fromkeys(f for m in self.members for f in m.tta_flips))

    def predict_proba(
        self, image: np.ndarray, tta: bool = False, channel_axis: int | None = None, normalized: bool = False
    ) -> np.ndarray:
        """Mean class probabilities ``(K, *S)`` of the members (see :meth:`Segmenter.predict_proba`)."""
        if not normalized:  # the members share normalisation and channels, so one prepared image serves all
            image = self.members[0].prepare(image, channel_axis)
        total = self.members[0].predict_proba(image, tta=tta, normalized=True)
        for member in self.members[1:]:
            total += member.predict_proba(image, tta=tta, normalized=True)
        return total / len(self.members)


def incompatibility(first: Segmenter, other: Segmenter) -> str | None:
    """Why ``other``'s probabilities cannot be averaged with ``first``'s, or None when they can."""
    if first.class_names != other.class_names:
        return f"they predict different classes ({list(first.class_names)} and {list(other.class_names)})"
    for key in SHARED_PREPROCESSING:
        mine, theirs = getattr(first.preprocessing, key), getattr(other.preprocessing, key)
        if mine != theirs:
            return f"their preprocessing differs ({key} {mine!r} and {theirs!r})"
    kinds = {dataset_kind(first.dataset), dataset_kind(other.dataset)} - {None}
    if len(kinds) > 1:
        return f"they were trained on different kinds of input ({first.dataset} and {other.dataset})"
    return None


def expand_checkpoints(names_or_paths: Sequence[str | Path]) -> list[str | Path]:
    """The checkpoints, with each cross-validation folder (``unetseg cv``) replaced by its fold models."""
    expanded: list[str | Path] = []
    for item in names_or_paths:
        folds = fold_checkpoints(item) if Path(item).is_dir() else None
        expanded.extend(folds if folds is not None else [item])
    return expanded


def load_predictor(names_or_paths: Sequence[str | Path], device: str = "cpu", int8: bool = False
                   ) -> Segmenter | Ensemble:
    """One checkpoint -> its :class:`Segmenter`; several, or a cross-validation folder -> their :class:`Ensemble`;
    ``int8``: each with its int8 calibration."""
    names_or_paths = expand_checkpoints(names_or_paths)
    if len(names_or_paths) == 1:
        return Segmenter.from_checkpoint(names_or_paths[0], device, int8)
    return Ensemble.from_checkpoints(names_or_paths, device, int8)


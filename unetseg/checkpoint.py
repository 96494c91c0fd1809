"""The checkpoint: the one file training hands to inference, export and evaluation.

On disk a checkpoint is a plain dict of tensors, strings, numbers, lists and
dicts (format :data:`CHECKPOINT_FORMAT`), so it loads with
``torch.load(weights_only=True)`` and never executes pickled code. It holds
everything needed to use the weights without a config file (nanoGPT's rule):
the network's constructor arguments, the preprocessing, the class names, the
flips the model was trained with, and where it came from.

In code it is a :class:`Checkpoint`. This module is the only place that
writes (:meth:`Checkpoint.save`, atomic) and reads (:meth:`Checkpoint.load`,
validated, one-line :class:`DataError` messages) the file, and that finds one
by name (:func:`resolve_checkpoint`: a path, a run folder, or a shipped
model). :func:`load_checkpoint` and :func:`save_checkpoint` read and write the
raw dict, for tools that edit a checkpoint's entries.

Example::

    ckpt = Checkpoint.load("hippocampus_2d")
    model = ckpt.build_model()          # a UNet with the weights loaded
    ckpt.preprocessing.patch_size       # (48, 64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unetseg.config import DataConfig, ModelConfig
from unetseg.data.transforms import flip_combinations
from unetseg.errors import DataError, UnetsegError
from unetseg.model import UNet
from unetseg.runlog import staged_file, write_json

CHECKPOINT_FORMAT = "unetseg-checkpoint-v1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"

# What every checkpoint holds, with the type it must have.
REQUIRED_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "model_args": dict, "state_dict": dict, "preprocessing": dict, "class_names": (list, tuple),
}
# What a training run's last.pt holds besides the model, so --resume can continue it.
TRAINING_ENTRIES = ("optimizer", "scheduler", "best_metric", "best_epoch")


@dataclass(frozen=True)
class Preprocessing:
    """What inference must do to an image before the network sees it.

    Args:
        normalization: ``"percentile"`` or ``"zscore"`` (see :func:`unetseg.data.preprocess.normalize_intensity`).
        slice_axis: for a 2D network on volumes, the spatial axis slices are cut along.
        patch_size: the training input size, one entry per spatial axis.
        in_channels: the network's input channels (1 grey, 3 colour).
    """

    normalization: str
    slice_axis: int
    patch_size: tuple[int, ...]
    in_channels: int

    @classmethod
    def from_config(cls, data: DataConfig, in_channels: int) -> Preprocessing:
        """The preprocessing of a run's data settings, for a data set of ``in_channels`` channels."""
        return cls(data.normalization, data.slice_axis, tuple(data.patch_size), in_channels)

    @classmethod
    def from_dict(cls, entries: Mapping[str, Any]) -> Preprocessing:
        """From a checkpoint's ``preprocessing`` entry (older 3D checkpoints have no ``slice_axis``: 2)."""
        return cls(entries["normalization"], entries.get("slice_axis", 2), tuple(entries["patch_size"]),
                   entries["in_channels"])

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``preprocessing`` entry (what :class:`unetseg.infer.Segmenter` takes)."""
        return {"normalization": self.normalization, "slice_axis": self.slice_axis,
                "patch_size": list(self.patch_size), "in_channels": self.in_channels}


@dataclass(frozen=True, eq=False)  # tensors have no plain ==
class TrainingState:
    """What ``last.pt`` holds so that ``--resume`` continues the run: optimiser and scheduler state, and the best
    validation Dice so far with its epoch."""

    optimizer: dict[str, Any] = field(repr=False)
    scheduler: dict[str, Any] = field(repr=False)
    best_metric: float
    best_epoch: int


@dataclass(frozen=True, eq=False)  # tensors have no plain ==
class Checkpoint:
    """A trained network and everything needed to use it.

    Args:
        model_args: the :class:`UNet` constructor arguments (:func:`model_arguments`).
        state_dict: the network's weights.
        preprocessing: what inference does to an image first.
        class_names: background first; one per network output.
        tta_flips: the flips the model was trained with (each a tuple of spatial
            axes, ``()`` first); None for checkpoints older than this entry: use
            :attr:`flips`, which derives them as their training did.
        dataset: the data set trained on (``"hippocampus"``, ``"dsb2018"``, ``"folder"``).
        split: the case ids of the training run's split (``"train"``, ``"val"``).
        epoch: the epoch (0-based) the weights are from.
        metrics: that epoch's ``metrics.jsonl`` row (run checkpoints; not shipped ones).
        config: the run's resolved config as a dict.
        unetseg_version: the version that trained it.
        training: optimiser state etc. (``last.pt`` only).
        extra: entries this version does not know, kept so that loading and saving changes nothing.
    """

    model_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    tta_flips: tuple[tuple[int, ...], ...] | None = None
    dataset: str | None = None
    split: dict[str, list[str]] | None = None
    epoch: int | None = None
    metrics: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    unetseg_version: str | None = None
    training: TrainingState | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The network load() built to check the weights, handed over by the first build_model() call.
    _checked_model: list[UNet] = field(default_factory=list, init=False, repr=False)

    @staticmethod
    def resolve(name_or_path: str | Path) -> Path:
        """See :func:`resolve_checkpoint`."""
        return resolve_checkpoint(name_or_path)

    @classmethod
    def load(cls, name_or_path: str | Path) -> Checkpoint:
        """Load and check a checkpoint (path, run folder or shipped model name), never executing pickled code.

        Raises:
            UnetsegError: nothing of that name.
            DataError: not a unetseg checkpoint, or damaged (one line naming the file).
        """
        path = resolve_checkpoint(name_or_path)
        payload = _read(path)
        model = check_payload(payload, path)
        checkpoint = cls.from_dict(payload)
        checkpoint._checked_model.append(model)
        return checkpoint

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Checkpoint:
        """The typed view of a checkpoint dict (as :func:`load_checkpoint` returns it), without checking the weights."""
        known = {"format", "unetseg_version", "model_args", "state_dict", "preprocessing", "class_names", "tta_flips",
                 "dataset", "split", "epoch", "metrics", "config"}
        has_training = all(k in payload for k in TRAINING_ENTRIES)
        if has_training:
            known.update(TRAINING_ENTRIES)
        flips = payload.get("tta_flips")
        return cls(
            model_args=dict(payload["model_args"]),
            state_dict=payload["state_dict"],
            preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
            class_names=tuple(payload["class_names"]),
            tta_flips=None if flips is None else tuple(tuple(int(a) for a in f) for f in flips),
            dataset=payload.get("dataset"),
            split=payload.get("split"),
            epoch=payload.get("epoch"),
            metrics=payload.get("metrics"),
            config=payload.get("config"),
            unetseg_version=payload.get("unetseg_version"),
            training=TrainingState(*(payload[k] for k in TRAINING_ENTRIES)) if has_training else None,
            extra={k: v for k, v in payload.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The dict written to disk (entries that are None are left out, as older versions did)."""
        entries: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "unetseg_version": self.unetseg_version,
            "model_args": dict(self.model_args),
            "state_dict": self.state_dict,
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": list(self.class_names),
            "tta_flips": None if self.tta_flips is None else [list(f) for f in self.tta_flips],
            "dataset": self.dataset,
            "split": self.split,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "config": self.config,
        }
        if self.training is not None:
            entries.update(dataclasses.asdict(self.training))
        entries.update(self.extra)
        return {k: v for k, v in entries.items() if v is not None}

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (see :func:`save_checkpoint`)."""
        return save_checkpoint(self.to_dict(), path)

    def without_training_state(self) -> Checkpoint:
        """The checkpoint as a shipped model holds it: no optimiser state, no epoch metrics, no unknown entries."""
        return dataclasses.replace(self, training=None, metrics=None, extra={})

    @property
    def spatial_dims(self) -> int:
        return int(self.model_args["spatial_dims"])

    @property
    def flips(self) -> list[tuple[int, ...]]:
        """The flip test-time-augmentation members: :attr:`tta_flips`, or for older checkpoints what their
        training did (see :func:`checkpoint_tta_flips`)."""
        return _trained_flips(self.tta_flips, self.config, self.spatial_dims)

    def build_model(self) -> UNet:
        """The network with the checkpoint's weights loaded (in training mode, on the CPU).

        A checkpoint from :meth:`load` hands over the network it built to check
        the weights on the first call (no second build); later calls build a new one.
        """
        if self._checked_model:
            return self._checked_model.pop()
        model = build_model(self.model_args)
        model.load_state_dict(self.state_dict)
        return model


def model_arguments(model: ModelConfig, in_channels: int, out_channels: int) -> dict[str, Any]:
    """The :class:`UNet` constructor arguments of a config's model settings (every :class:`ModelConfig` field)
    for a data set of ``in_channels`` inputs and ``out_channels`` classes, as plain values."""
    args: dict[str, Any] = {"in_channels": in_channels, "out_channels": out_channels}
    for f in dataclasses.fields(model):
        value = getattr(model, f.name)
        args[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return args


def build_model(model_args: Mapping[str, Any]) -> UNet:
    """Rebuild a :class:`UNet` from the constructor arguments stored in a checkpoint (untrained weights)."""
    return UNet(**model_args)


def shipped_models() -> list[str]:
    """Names of the trained models that ship with the package."""
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "model.pt").is_file()) if PRETRAINED_DIR.is_dir() else []


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint path, the ``best.pt`` of a run folder, the ``model.pt`` of an exported model's folder, or the
    ``model.pt`` of a shipped model of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir() and (path / "best.pt").is_file():
        return path / "best.pt"
    if path.is_dir() and (path / "model.pt").is_file():
        return path / "model.pt"
    shipped = PRETRAINED_DIR / str(name_or_path) / "model.pt"
    if shipped.is_file():
        return shipped
    raise UnetsegError(
        f"checkpoint {str(name_or_path)!r} not found; give a .pt path, a run folder, an exported model's folder, "
        f"or a shipped model: {', '.join(shipped_models()) or '(none installed)'}"
    )


def save_checkpoint(payload: Mapping[str, Any] | Checkpoint, path: str | Path) -> Path:
    """Write a checkpoint (or its dict) atomically: to a temporary file in the same folder, then rename."""
    if isinstance(payload, Checkpoint):
        payload = payload.to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        torch.save(dict(payload), tmp)
    return path


def load_checkpoint(name_or_path: str | Path) -> dict[str, Any]:
    """The checked checkpoint dict (as :meth:`Checkpoint.load` checks it), for code that edits its entries."""
    path = resolve_checkpoint(name_or_path)
    payload = _read(path)
    check_payload(payload, path)
    return payload


def _read(path: Path) -> dict[str, Any]:
    """The dict in ``path`` (``weights_only=True``), once it is found to be a unetseg checkpoint."""
    try:
        with warnings.catch_warnings():  # a refused pickle is reported below as one line, not torch's warning
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with code in it
        raise DataError(path, f"not a loadable unetseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, f"not a unetseg checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload


def check_payload(payload: Mapping[str, Any], source: str | Path) -> UNet:
    """The network of a checkpoint dict with its weights loaded (a strict load into a fresh network, on the CPU).

    Raises:
        DataError: (one line naming ``source``) an entry is missing, the weights do not fit the network its
            ``model_args`` describe, or its settings do not fit the network (:func:`_settings_problem`).
    """
    for key, kind in REQUIRED_ENTRIES.items():
        if not isinstance(payload.get(key), kind):
            raise DataError(source, f"damaged checkpoint: entry {key!r} is missing or not a {getattr(kind, '__name__', 'list')}; "
                                    "re-export it from its run folder")
    try:
        model = build_model(payload["model_args"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = lines[1] if lines[0].startswith("Error(s) in loading") and len(lines) > 1 else lines[0]
        raise DataError(source, f"the weights do not fit the network the checkpoint describes ({detail[:200]}); "
                                "it was saved by other code or damaged") from None
    problem = _settings_problem(payload, model)
    if problem:
        raise DataError(source, f"damaged checkpoint: {problem}; re-export it from its run folder")
    return model


def _settings_problem(payload: Mapping[str, Any], model: UNet) -> str | None:
    """What is wrong with a checkpoint's class names, preprocessing or TTA flips for its network, else None."""
    names, pre, args = payload["class_names"], payload["preprocessing"], payload["model_args"]
    outputs, inputs = args.get("out_channels", 3), args.get("in_channels", 1)  # UNet's defaults
    if len(names) != outputs or not all(isinstance(n, str) for n in names):
        return f"{len(names)} class names for a network with {outputs} outputs"
    if pre.get("normalization") not in ("percentile", "zscore"):
        return f"preprocessing normalization {pre.get('normalization')!r} is not 'percentile' or 'zscore'"
    if pre.get("in_channels") != inputs:
        return f"preprocessing in_channels {pre.get('in_channels')!r} differs from the network's {inputs}"
    patch = pre.get("patch_size")
    if not (isinstance(patch, (list, tuple)) and len(patch) == model.spatial_dims
            and all(isinstance(v, int) and v > 0 for v in patch)):
        return f"preprocessing patch_size {patch!r} is not {model.spatial_dims} positive sizes"
    if model.spatial_dims == 2 and pre.get("slice_axis", 2) not in (0, 1, 2):
        return f"preprocessing slice_axis {pre.get('slice_axis')!r} is not 0, 1 or 2"
    flips = payload.get("tta_flips", [[]])
    if not (isinstance(flips, (list, tuple)) and flips and all(isinstance(f, (list, tuple)) for f in flips)
            and tuple(flips[0]) == () and all(0 <= a < model.spatial_dims for f in flips for a in f)):
        return f"tta_flips {flips!r} must be a list of axis lists (0..{model.spatial_dims - 1}) starting with []"
    return None


def checkpoint_tta_flips(payload: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """The flip test-time-augmentation members of a checkpoint dict: the mirrorings its model was trained with.

    Training stores them as ``tta_flips``. Older checkpoints are read by what
    their training really did: 2D augmentation came from albumentations with
    one seed per transform, so horizontal and vertical flips always fired
    together (a model that saw only 180-degree rotations); 3D flipped each axis
    on its own.
    """
    return _trained_flips(payload.get("tta_flips"), payload.get("config"), int(payload["model_args"]["spatial_dims"]))


def _trained_flips(
    stored: Iterable[Sequence[int]] | None, config: Mapping[str, Any] | None, spatial_dims: int
) -> list[tuple[int, ...]]:
    """The stored flips, else those an older checkpoint's training used (see :func:`checkpoint_tta_flips`)."""
    if stored is not None:
        return [tuple(int(a) for a in f) for f in stored]
    augment = (config or {}).get("augment", {})
    if not augment.get("flip", True) or augment.get("strength", 1.0) <= 0:
        return [()]
    return [(), (0, 1)] if spatial_dims == 2 else flip_combinations(range(spatial_dims))


INT8_FORMAT = "unetseg-int8-calibration-v1"
# What a calibration file records of the validation split (``unetseg quantize``), read back as numbers.
INT8_VALIDATION = ("cases", "mean_dice_float32", "mean_dice_int8", "label_agreement_mean", "label_agreement_min")


def int8_calibration_path(checkpoint_path: str | Path) -> Path:
    """Where the int8 calibration of the checkpoint file ``checkpoint_path`` lives: beside it, ``<stem>.int8.json``
    (``model.pt`` -> ``model.int8.json``)."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.int8.json")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_int8_calibration(checkpoint: str | Path, ranges: Mapping[str, Sequence[float]],
                          record: Mapping[str, Any]) -> Path:
    """Write the activation ranges of :class:`~unetseg.model.int8.Int8UNet` for a checkpoint beside its file
    (:func:`int8_calibration_path`, atomically), tied to the file by its SHA-256, with ``record`` (how they were
    made and what they score) alongside. Returns the path written."""
    path = resolve_checkpoint(checkpoint)
    out = int8_calibration_path(path)
    write_json(out, {"format": INT8_FORMAT, "checkpoint": path.name, "checkpoint_sha256": file_sha256(path),
                     **record, "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in ranges.items()}})
    return out


def read_int8_calibration(checkpoint: str | Path) -> dict[str, Any]:
    """The int8 calibration of a checkpoint (path, run folder or shipped model name), as
    :func:`save_int8_calibration` wrote it; ``ranges`` values as ``(lo, hi)`` tuples.

    Raises:
        UnetsegError: no calibration beside the checkpoint, or one made for other weights (the file was
            retrained or replaced since); both say how to make one.
        DataError: a calibration file that is not one.
    """
    path = resolve_checkpoint(checkpoint)
    side = int8_calibration_path(path)
    remedy = f"make one with `unetseg quantize {checkpoint} --data-root DIR`"
    if not side.is_file():
        raise UnetsegError(f"{path}: no int8 calibration beside it ({side.name}); {remedy}")
    try:
        data = json.loads(side.read_text())
        ranges = {str(k): (float(v[0]), float(v[1])) for k, v in data["ranges"].items()}
        data["validation"] = {k: (int if k == "cases" else float)(data["validation"][k]) for k in INT8_VALIDATION}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise DataError(side, f"not an int8 calibration file ({INT8_FORMAT}); {remedy}") from None
    if data.get("format") != INT8_FORMAT:
        raise DataError(side, f"not an int8 calibration file ({INT8_FORMAT}); {remedy}")
    if data.get("checkpoint_sha256") != file_sha256(path):
        raise UnetsegError(f"{side}: made for other weights than {path} holds now (retrained or replaced since); "
                           f"{remedy}")
    return {**data, "ranges": ranges}

"""Run configuration: the dataclasses below hold the only defaults.

YAML files (``unetseg/configs/*.yaml``) and ``--set section.field=value``
overrides change fields; the resolved config is written into every run folder.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unetseg.errors import UnetsegError
from unetseg.runlog import write_text_atomic

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """Arguments of :class:`unetseg.model.UNet` that a config may set."""

    spatial_dims: int = 2  # 2 (slices or images) or 3 (whole volumes)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # feature maps per level, finest first
    skips: bool | list[bool] = True  # long skips: all on, all off, or one flag per decoder level (finest first)
    merge: str = "concat"  # long-skip merge: "concat" (U-Net) or "add" (ResNet-style)
    residual: bool = False  # short residual skips inside each conv block
    norm: str = "batch"  # "batch", "instance", "group", or "none" (plain convolutions with bias)
    dropout: float = 0.0  # dropout between the two convolutions of a block
    act: str = "relu"  # "relu" or "leaky_relu" (slope 0.01)
    stage_blocks: int = 1  # conv blocks per encoder level; the extra ones keep the level's width (identity shortcuts)


@dataclass
class DataConfig:
    """Where the data is and how it becomes network input."""

    dataset: str = "hippocampus"  # "hippocampus" (MSD Task04), "dsb2018", or "folder" (images/ + masks/)
    root: str | None = None  # data root; None: --data-root, else $UNETSEG_DATA_ROOT, else data/
    slice_axis: int = 2  # for 2D training on volumes: the spatial axis slices are cut along
    patch_size: list[int] = field(default_factory=lambda: [48, 64])  # training input size (padded / cropped)
    normalization: str = "percentile"  # "percentile" (clip 0.5-99.5 %, rescale to [0,1]) or "zscore"
    val_fraction: float = 0.2  # share of cases held out for validation (when num_folds == 0)
    num_folds: int = 0  # k-fold cross-validation when > 1; `fold` picks the validation fold
    fold: int = 0
    split_seed: int = 0  # seed of the case-level train/val split
    max_cases: int | None = None  # use only the first N cases (after sorting) - for quick runs and tests
    kind_balance: float = 0.0  # draw training images by kind (unetseg.data.kinds): weight (count of its kind)**-k; 0 uniform, 1 kinds equal


@dataclass
class AugmentConfig:
    """Training augmentation (albumentations in 2D, MONAI in 3D); never applied to validation.

    A model is trained to be invariant to the flips it saw, so flip test-time
    augmentation uses exactly the mirrorings of ``flip_axes``.
    """

    strength: float = 1.0  # scales every probability and magnitude below; 0 switches augmentation off
    flip: bool = True  # random mirroring, each axis of flip_axes on its own with probability 0.5
    flip_axes: list[int] | None = None  # spatial axes of the network input to mirror; None: every axis
    affine: bool = True  # rotation +-15 deg, scale 0.85-1.15, shift 5 % (times strength)
    scale: list[float] | None = None  # 2D: [min, max] isotropic zoom of the affine; None: 1 -+ 0.15 x strength per axis
    elastic: bool = False  # elastic deformation (slower)
    intensity: bool = True  # brightness / contrast, and gamma when normalization is "percentile"
    color: bool = False  # RGB 2D only: stain variation (hue / saturation shifts p 0.5, channel shuffle and grey p 0.2 each)
    invert: bool = False  # 2D only: intensities inverted (1 - x, with "percentile") with probability 0.25


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3  # peak learning rate
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum below, Nesterov)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" or "poly" (power 0.9), stepped every iteration
    warmup_steps: int = 50  # linear warm-up iterations
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    num_workers: int = 0  # DataLoader workers; 0 keeps augmentation in the main process (deterministic)
    steps_per_epoch: int | None = None  # None: one pass over the training samples
    max_minutes: float | None = None  # time budget: stop before an epoch would end past it; the schedule then spans it
    val_every: int = 1  # validate every N epochs (and always after the last)
    val_max_cases: int | None = None  # validate on the first N validation cases only
    grad_log_every: int = 0  # log per-layer gradient norms every N steps (0: off)
    dice_ce_lambda_ce: float = 1.0  # weight of cross-entropy in MONAI's DiceCELoss
    dice_batch: bool = True  # soft Dice over the whole batch; False: per sample, where an absent class scores a free 1
    dice_background: bool = True  # include the background class in the Dice term (nnU-Net leaves it out)
    tensorboard: bool = False  # also write TensorBoard event files to RUN/tensorboard/ (pip install 'unetseg[tensorboard]')
    init_from: str | None = None  # start from these weights (checkpoint, run folder or shipped model): fine-tuning
    channels_last: bool = False  # 2D: train in channels_last memory format (about 1.5x faster on a CPU, other rounding)


@dataclass
class Config:
    """A whole run: name plus the four sections."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig, "train": TrainConfig}


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}
POSITIVE = {"train": {"epochs", "batch_size", "lr", "steps_per_epoch", "val_every", "val_max_cases", "max_minutes"},
            "data": {"max_cases"}, "model": {"stage_blocks"}}
NON_NEGATIVE = {"train": {"weight_decay", "warmup_steps", "grad_clip", "num_workers", "grad_log_every",
                          "dice_ce_lambda_ce", "seed", "momentum"},
                "augment": {"strength"}, "model": {"dropout"}, "data": {"val_fraction", "num_folds", "fold", "split_seed", "kind_balance"}}
SEEDS = {"train": {"seed"}, "data": {"split_seed"}}  # NumPy's generators take seeds below 2**32


# Fields that take one of a few words; the model's act, skips and flip axes are checked by their own code.
CHOICES: dict[str, dict[str, tuple[Any, ...]]] = {
    "model": {"spatial_dims": (2, 3), "merge": ("concat", "add"), "norm": ("batch", "instance", "group", "none")},
    "data": {"normalization": ("percentile", "zscore"), "slice_axis": (0, 1, 2)},
    "train": {"schedule": ("cosine", "poly"), "optimizer": ("adamw", "sgd")},
}
# Fractions that must lie in [0, 1).
BELOW_ONE = {"model": {"dropout"}, "data": {"val_fraction"}, "train": {"momentum"}}


# YAML 1.1 reads "1e-3" (no dot) as text; for a float field it is the number the user meant.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_number(value: Any, annotation: str) -> Any:
    """``"1e-3"`` -> ``0.001`` for a float field, and for each item of a float-list field (YAML 1.1 reads
    ``1e-3`` as text); every other value unchanged."""
    if isinstance(value, list) and "list[float]" in annotation:
        return [_exponent_number(item, "float") for item in value]
    if "float" in annotation and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _is_type(value: Any, name: str) -> bool:
    """``isinstance`` for a type named in an annotation; a bool is not an int or a float here."""
    return isinstance(value, _TYPES[name]) and (name == "bool" or not isinstance(value, bool))


def _matches(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field annotation such as ``int | None`` or ``bool | list[bool]``."""
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option.startswith("list[") and isinstance(value, list):
            if all(_matches(v, option[5:-1]) for v in value):
                return True
        elif option in _TYPES and _is_type(value, option):
            return True
    return False


def check_fields(
    cls: type,
    values: dict[str, Any],
    source: str,
    prefix: str = "",
    choices: dict[str, tuple[Any, ...]] | None = None,
    positive: Collection[str] = (),
    non_negative: Collection[str] = (),
    below_one: Collection[str] = (),
    seeds: Collection[str] = (),
) -> None:
    """Raise :class:`UnetsegError` naming ``source: <prefix><field>=value`` when a value for a field of the
    dataclass ``cls`` has the wrong type, is not one of its ``choices``, or (it or an entry of its list) is not
    finite or breaks its sign rule.

    Args:
        values: field name -> value, as read from YAML; names that are no field of ``cls`` are not looked at.
        prefix: what precedes field names in messages (``"train."``).
        positive, non_negative, below_one: fields that must be > 0, >= 0, < 1.
        seeds: fields that must be below 2**32 (NumPy's generators).
    """
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        where = f"{source}: {prefix}{f.name}={value!r}"
        if not _matches(value, str(f.type)):
            raise UnetsegError(f"{where} is not of type {f.type}")
        allowed = (choices or {}).get(f.name)
        if allowed is not None and value not in allowed:
            raise UnetsegError(f"{where} must be one of {', '.join(map(repr, allowed))}")
        numbers = value if isinstance(value, list) else [value]
        for number in (v for v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool)):
            if not math.isfinite(number):
                raise UnetsegError(f"{where} must be a finite number")
            if f.name in positive and number <= 0:
                raise UnetsegError(f"{where} must be greater than 0")
            if f.name in non_negative and number < 0:
                raise UnetsegError(f"{where} must not be negative")
            if f.name in below_one and number >= 1:
                raise UnetsegError(f"{where} must be below 1")
            if f.name in seeds and number >= 2**32:
                raise UnetsegError(f"{where} must be below 2**32")


def check_section(section: str, values: Any, source: str) -> None:
    """Raise :class:`UnetsegError` naming the field when a value has the wrong type or sign (see :func:`check_fields`)."""
    check_fields(SECTIONS[section], values, source, f"{section}.", CHOICES.get(section), POSITIVE.get(section, ()),
                 NON_NEGATIVE.get(section, ()), BELOW_ONE.get(section, ()), SEEDS.get(section, ()))


def check_known_fields(values: dict[str, Any], cls: type, source: str, where: str = "") -> None:
    """Raise :class:`UnetsegError` listing the keys of ``values`` that are no field of the dataclass ``cls``
    (``where``, e.g. `` in 'model'``, follows the list in the message)."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = set(values) - names
    if bad:
        raise UnetsegError(f"{source}: unknown field(s) {sorted(bad)}{where}; valid: {sorted(names)}")


def mapping_field(raw: dict[str, Any], key: str, source: str, prefix: str = "") -> dict[str, Any]:
    """``raw[key]`` when it is a mapping, ``{}`` when it is missing or empty; anything else raises naming the key."""
    values = raw.get(key) or {}
    if not isinstance(values, dict):
        raise UnetsegError(f"{source}: '{prefix}{key}' must be a mapping of fields, got {values!r}")
    return values


def check_consistency(cfg: Config, source: str) -> None:
    """Rules that tie fields together or belong to other modules, checked before any data is read or trained on.

    Raises :class:`UnetsegError` naming the setting and what it must be.
    """
    from unetseg.data.datasets import DATASETS
    from unetseg.data.transforms import check_augmentation
    from unetseg.model.blocks import activation  # the network's own rules
    from unetseg.model.unet import resolve_skips

    m, d = cfg.model, cfg.data
    if len(m.channels) < 2 or min(m.channels) < 1:
        raise UnetsegError(f"{source}: model.channels={m.channels} needs at least 2 levels of at least 1 feature map")
    try:
        resolve_skips(m.skips, len(m.channels) - 1)
        activation(m.act)
    except ValueError as exc:
        raise UnetsegError(f"{source}: model.{exc}") from None
    if d.dataset not in DATASETS:
        raise UnetsegError(f"{source}: data.dataset={d.dataset!r} must be one of {', '.join(map(repr, DATASETS))}")
    smallest = 2 ** len(m.channels)  # two pixels at the coarsest level: normalisation needs more than one value
    if len(d.patch_size) != m.spatial_dims or min(d.patch_size) < smallest:
        raise UnetsegError(f"{source}: data.patch_size={d.patch_size} needs {m.spatial_dims} sizes (model.spatial_dims), "
                           f"each at least {smallest} for a {len(m.channels)}-level network")
    if d.num_folds > 1 and d.fold >= d.num_folds:
        raise UnetsegError(f"{source}: data.fold={d.fold} must be below data.num_folds={d.num_folds}")
    device = cfg.train.device
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UnetsegError(f"{source}: train.device={device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    try:
        check_augmentation(cfg.augment, m.spatial_dims)
    except ValueError as exc:
        raise UnetsegError(f"{source}: {exc}") from None
    if cfg.augment.color and DATASETS[d.dataset].in_channels != 3:
        raise UnetsegError(f"{source}: augment.color varies the colour of RGB images; the {d.dataset} data set's network "
                           f"takes {DATASETS[d.dataset].in_channels} channel(s): set it false")


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from nested dicts; unknown keys raise :class:`UnetsegError`."""
    unknown = set(raw) - {"name", *SECTIONS}
    if unknown:
        raise UnetsegError(f"{source}: unknown section(s) {sorted(unknown)}; expected name, {', '.join(SECTIONS)}")
    cfg = Config(name=str(raw.get("name", "run")))
    for section, cls in SECTIONS.items():
        values = mapping_field(raw, section, source)
        check_known_fields(values, cls, source, f" in '{section}'")
        values = {k: _exponent_number(v, str(cls.__dataclass_fields__[k].type)) for k, v in values.items()}
        check_section(section, values, source)
        setattr(cfg, section, cls(**values))
    check_consistency(cfg, source)
    return cfg


def read_named_yaml(name_or_path: str, folder: Path, what: str = "config") -> tuple[dict[str, Any], Path]:
    """Read ``folder/<name>.yaml`` for a bare name, else the YAML file at that path.

    Returns the parsed mapping and the file it came from; a missing file or bad
    YAML raises :class:`UnetsegError` listing the names available in ``folder``.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise UnetsegError(f"{what} {name_or_path!r} not found; give a YAML path or one of: {names}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UnetsegError(f"{path}: not a UTF-8 text file; save the {what} as plain UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise UnetsegError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise UnetsegError(f"{path}: expected a YAML mapping (section: fields), got {type(raw).__name__}")
    return raw, path


def load_config(name_or_path: str) -> Config:
    """Load a shipped config by name (``hippocampus_2d``) or a YAML file by path."""
    raw, path = read_named_yaml(name_or_path, CONFIG_DIR, "config")
    return config_from_dict(raw, source=str(path))


def apply_overrides(cfg: Config, overrides: list[str], source: str = "--set") -> Config:
    """Apply ``section.field=value`` strings (values parsed as YAML) and return a new config.

    ``source`` names where the strings came from in error messages (a study file's overrides, say).
    """
    raw = cfg.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or parts[0] not in SECTIONS:
            raise UnetsegError(f"{source} {item!r}: expected section.field=value with section in {', '.join(SECTIONS)}")
        section, name = parts
        if name not in raw[section]:
            raise UnetsegError(f"{source} {item!r}: '{section}' has no field '{name}'; valid: {sorted(raw[section])}")
        raw[section][name] = yaml.safe_load(value)
    return config_from_dict(raw, source=source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a kill leaves the old file or the new one)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

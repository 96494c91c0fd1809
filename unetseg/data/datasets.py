"""Data sets on disk (MSD, DSB2018, paired folders), case-level splits, and torch datasets.

Cases are loaded once into memory (the in-memory cache), normalised, and
then cut into training samples: 2D slices of volumes, 2D images, or whole 3D
volumes, padded or randomly cropped to the patch size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from unetseg.data import io
from unetseg.data.cache import cached_array
from unetseg.data.preprocess import Normalization, normalize_intensity, pad_to_shape, volume_to_slices
from unetseg.data.transforms import Augmenter, augment
from unetseg.errors import DataError, UnetsegError
from unetseg.progress import progress_bar

DATA_ROOT_ENV = "UNETSEG_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    """A data set the project knows by name.

    Attributes:
        name: short name used on the command line.
        folder: its folder under the data root, as the original archive extracts.
        layout: ``"msd"``, ``"dsb"`` or ``"folder"``.
        class_names: background first; for MSD read from ``dataset.json``.
        in_channels: channels the network takes (2D images are converted to this).
        citation: what to cite.
        licence: the data licence.
    """

    name: str
    folder: str
    layout: str
    class_names: tuple[str, ...]
    in_channels: int
    citation: str = ""
    licence: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetInfo] = {
    "hippocampus": DatasetInfo(
        name="hippocampus",
        folder="Task04_Hippocampus",
        layout="msd",
        class_names=("background", "anterior", "posterior"),
        in_channels=1,
        citation="Antonelli et al., Nat Commun 13, 4128 (2022); Simpson et al., arXiv:1902.09063",
        licence="CC-BY-SA 4.0",
    ),
    "dsb2018": DatasetInfo(
        name="dsb2018",
        folder="dsb2018_stage1_train",
        layout="dsb",
        class_names=("background", "nucleus"),
        in_channels=3,
        citation="Caicedo et al., Nature Methods 16, 1247-1253 (2019)",
        licence="CC0 1.0",
    ),
    "folder": DatasetInfo(
        name="folder", folder="", layout="folder", class_names=("background", "foreground"), in_channels=3
    ),
}


@dataclass(frozen=True)
class CaseRef:
    """Where one case's files are. ``label`` is a file (MSD), a folder of masks (DSB), or None."""

    case_id: str
    image: Path
    label: Path | None


@dataclass
class Case:
    """One loaded case.

    Attributes:
        image: ``(C, *S)`` float32, normalised.
        label: ``(*S)`` int64 class indices, or None.
        meta: source metadata (affine, header, spacing).
        instances: ``(*S)`` int32 object labels (DSB nuclei), when loaded with ``instances=True``.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    meta: io.ImageMeta
    instances: np.ndarray | None = None


def dataset_info(name: str) -> DatasetInfo:
    """Look up a data set by name; unknown names raise :class:`UnetsegError`."""
    if name not in DATASETS:
        raise UnetsegError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def default_data_root() -> Path:
    """``$UNETSEG_DATA_ROOT`` if set, else ``data/`` in the repository (or the working directory)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    repo_data = Path(__file__).resolve().parents[2] / "data"
    return repo_data if repo_data.is_dir() else Path("data")


def resolve_data_root(root: str | Path | None) -> Path:
    """The data root from a flag, else :func:`default_data_root`."""
    return Path(root) if root else default_data_root()


def dataset_dir(info: DatasetInfo, root: str | Path | None) -> Path:
    """The folder holding ``info``'s files: ``root/<folder>``, or ``root`` itself if it is that folder."""
    base = resolve_data_root(root)
    if info.layout == "folder":
        return base
    candidates = [base / info.folder, base]
    for cand in candidates:
        if (info.layout == "msd" and (cand / "dataset.json").is_file()) or (
            info.layout == "dsb" and cand.is_dir() and cand.name == info.folder
        ):
            return cand
    if info.layout == "msd" and (base / info.folder).is_dir():
        raise DataError(base / info.folder / "dataset.json", "missing; this is not an intact MSD task folder")
    raise DataError(
        base / info.folder,
        f"data set not found; pass --data-root DIR (or set {DATA_ROOT_ENV}) to the folder holding "
        f"{info.folder}, or run `unetseg download {info.name} --data-root DIR`",
    )


def list_msd_cases(task_dir: Path, subset: str = "training") -> tuple[list[CaseRef], tuple[str, ...]]:
    """Cases listed in an MSD ``dataset.json`` and the class names (background first).

    Args:
        subset: ``"training"`` (image + label) or ``"test"`` (image only).
    """
    manifest = task_dir / "dataset.json"
    if not manifest.is_file():
        raise DataError(manifest, "missing; an MSD task folder needs dataset.json (re-extract the archive)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(manifest, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(manifest, "expected a JSON object with 'labels' and 'training'; re-extract the archive")
    class_names = _msd_class_names(meta.get("labels", {}), manifest)
    refs = []
    entries = meta.get(subset, [])
    if not isinstance(entries, list):
        raise DataError(manifest, f"'{subset}' must be a list of cases, got {type(entries).__name__}; "
                                  "fix dataset.json or re-extract the archive")
    for i, entry in enumerate(entries):
        image_rel = entry.get("image") if isinstance(entry, dict) else entry
        label_rel = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(image_rel, str) or not (label_rel is None or isinstance(label_rel, str)):
            raise DataError(manifest, f"'{subset}' entry {i} needs an 'image' path (and a 'label' path, if any) as "
                                      f"text, got {entry!r}; fix dataset.json or re-extract the archive")
        label = task_dir / label_rel if label_rel is not None else None
        refs.append(CaseRef(case_id=Path(image_rel).name.split(".")[0], image=task_dir / image_rel, label=label))
    return sorted(refs, key=lambda r: r.case_id), class_names


def _msd_class_names(labels: object, manifest: Path) -> tuple[str, ...]:
    """``{"0": "background", "1": "Anterior", ...}`` -> names in class order, lower case; classes must be 0..K-1."""
    if not isinstance(labels, dict):
        raise DataError(manifest, f"'labels' must map class indices to names, got {labels!r}")
    if not labels:
        return ("background", "foreground")
    try:
        indices = {int(k): str(v).lower() for k, v in labels.items()}
    except ValueError:
        raise DataError(manifest, f"'labels' keys must be class indices 0, 1, ..., got {sorted(labels)}") from None
    if sorted(indices) != list(range(len(indices))):
        raise DataError(manifest, f"'labels' keys must be the class indices 0..{len(indices) - 1}, got {sorted(indices)}")
    return tuple(indices[k] for k in range(len(indices)))


def list_dsb_cases(root: Path) -> list[CaseRef]:
    """DSB2018 layout: ``<id>/images/<id>.png`` and ``<id>/masks/*.png``."""
    refs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image = folder / "images" / f"{folder.name}.png"
        masks = folder / "masks"
        if not image.is_file():
            raise DataError(image, "missing; each DSB folder needs images/<id>.png")
        refs.append(CaseRef(case_id=folder.name, image=image, label=masks if masks.is_dir() else None))
    if not refs:
        raise DataError(root, "no case folders found; expected <id>/images/<id>.png")
    return refs


def list_folder_pairs(root: Path) -> list[CaseRef]:
    """Generic layout: ``images/<name>`` with the same name under ``masks/``."""
    images = root / "images"
    if not images.is_dir():
        raise DataError(images, "missing; a paired folder needs images/ and masks/ with matching file names")
    refs = []
    for image in sorted(p for p in images.iterdir() if p.is_file()):
        mask = root / "masks" / image.name
        refs.append(CaseRef(case_id=image.stem, image=image, label=mask if mask.is_file() else None))
    return refs


def list_all_cases(info: DatasetInfo, root: str | Path | None) -> tuple[list[CaseRef], DatasetInfo]:
    """Every case of a data set, labelled or not (``label`` None), and its info (class names from the files where
    they say)."""
    folder = dataset_dir(info, root)
    if info.layout == "msd":
        refs, names = list_msd_cases(folder)
        info = DatasetInfo(**{**info.__dict__, "class_names": names})
    elif info.layout == "dsb":
        refs = list_dsb_cases(folder)
    else:
        refs = list_folder_pairs(folder)
    return refs, info


def list_cases(info: DatasetInfo, root: str | Path | None) -> tuple[list[CaseRef], DatasetInfo]:
    """Labelled cases of a data set, and its info; see :func:`list_all_cases`."""
    refs, info = list_all_cases(info, root)
    return [r for r in refs if r.label is not None], info


# How a case of each layout gets its ground truth, for messages about cases without one.
LABEL_HINTS = {"msd": "a 'label' path in its dataset.json entry", "dsb": "a masks/ folder of PNGs beside images/",
               "folder": "a mask of the same file name under masks/"}


# What to do with a volume whose channels the data set's network cannot take, per layout.
VOLUME_HINTS = {"folder": " (the folder data set reads 2D images: PNG, JPEG, TIFF, BMP); save the volume's slices as "
                          "2D images under images/ and masks/ with matching names"}


def unlabelled_note(unlabelled: Sequence[CaseRef], info: DatasetInfo) -> str:
    """How many cases have no mask or label map, one of their images, and how to give them one (part of one line)."""
    return (f"{len(unlabelled)} have no mask or label map (e.g. {unlabelled[0].image}); "
            f"give each {LABEL_HINTS[info.layout]} to score it")


def to_channels(image: np.ndarray, channels: int, path: str | Path = "image") -> np.ndarray:
    """Convert ``(C, *S)`` to ``channels`` channels: grey -> RGB repeats, RGB -> grey averages."""
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=0)
    if have == 3 and channels == 1:
        return image.mean(axis=0, keepdims=True)
    raise DataError(path, f"has {have} channels; the model takes {channels}")


def read_dsb_instances(folder: Path) -> np.ndarray:
    """The nuclei of a DSB ``masks/`` folder (one PNG each, sorted by name) as ``(H, W)`` int32 labels 1..N
    (0 = background; where two masks overlap, the later one's label is kept).

    Decoded once per set of mask files and then read from the disk cache (:mod:`unetseg.data.cache`)."""
    files = sorted(folder.glob("*.png"))
    if not files:
        raise DataError(folder, "no mask PNGs; each DSB case needs at least one masks/*.png")
    return cached_array("dsb_instances", files, lambda: _decode_dsb_instances(files)).astype(np.int32)


def _decode_dsb_instances(files: Sequence[Path]) -> np.ndarray:
    """:func:`read_dsb_instances` without the cache, as uint16 when the labels fit (they compress to a few kB)."""
    instances = io.read_mask_2d(files[0]).astype(np.int32)  # nucleus 1
    for k, f in enumerate(files[1:], start=2):
        m = io.read_mask_2d(f)
        if m.shape != instances.shape:
            raise DataError(f, f"mask shape {m.shape} differs from {instances.shape} of the other masks")
        instances[m] = k
    return instances.astype(np.uint16) if len(files) < 2**16 else instances


def read_dsb_mask(folder: Path) -> np.ndarray:
    """Union of the instance masks in a DSB ``masks/`` folder: ``(H, W)`` int64 in {0, 1}."""
    return (read_dsb_instances(folder) > 0).astype(np.int64)


def load_case(ref: CaseRef, info: DatasetInfo, normalization: Normalization, instances: bool = False) -> Case:
    """Read, convert and normalise one case; image and label shapes are checked to match.

    With ``instances``, a DSB case's nuclei are kept as object labels too (for instance scores).
    """
    image, meta = io.read_image(ref.image)
    if meta.kind == "image2d":
        image = to_channels(image, info.in_channels, ref.image)
    elif image.shape[0] != info.in_channels:  # a volume's channels are modalities: never repeated or averaged
        raise DataError(ref.image, f"a volume of {image.shape[0]} channel(s), but the {info.name} data set's network "
                                   f"takes {info.in_channels}" + VOLUME_HINTS.get(info.layout, ""))
    label = objects = None
    if ref.label is not None:
        if ref.label.is_dir():
            objects = read_dsb_instances(ref.label)
            label = (objects > 0).astype(np.int64)
        elif io.file_kind(ref.label) == "nifti":
            label, _ = io.read_nifti_label(ref.label, info.num_classes)
        else:
            label = io.read_mask_2d(ref.label).astype(np.int64)
        if label.shape != image.shape[1:]:
            raise DataError(
                ref.label, f"label shape {label.shape} does not match image shape {image.shape[1:]} of {ref.image}"
            )
    return Case(ref.case_id, normalize_intensity(image, normalization), label, meta, objects if instances else None)


def load_cases(
    refs: Sequence[CaseRef], info: DatasetInfo, normalization: Normalization, progress: bool = True,
    instances: bool = False,
) -> list[Case]:
    """Load many cases into memory, with a progress bar unless ``progress=False`` (see :func:`load_case`)."""
    bar = progress_bar(refs, enabled=progress, desc="loading", unit="case", leave=False)
    return [load_case(r, info, normalization, instances) for r in bar]


def split_cases(
    case_ids: Sequence[str], val_fraction: float = 0.2, seed: int = 0, num_folds: int = 0, fold: int = 0
) -> dict[str, list[str]]:
    """Case-level train/validation split, reproducible from ``seed``.

    With ``num_folds > 1`` the shuffled cases are dealt into that many folds and
    fold ``fold`` is the validation set; otherwise ``val_fraction`` of the cases
    (at least one) is. No case is ever on both sides.
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise UnetsegError(f"need at least 2 labelled cases to split, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    if num_folds > 1:
        if not 0 <= fold < num_folds:
            raise UnetsegError(f"fold must be in 0..{num_folds - 1}, got {fold}")
        val = set(shuffled[fold::num_folds])
    else:
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val = set(shuffled[:n_val])
    return {"train": [i for i in ids if i not in val], "val": [i for i in ids if i in val]}


def training_samples(cases: Sequence[Case], spatial_dims: int, slice_axis: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut cases into training samples: 2D slices of volumes, 2D images, or whole volumes.

    Returns lists of images ``(C, *S)`` and labels ``(*S)``.
    """
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for case in cases:
        if case.label is None:
            continue
        if spatial_dims == 2 and case.image.ndim == 4:
            images.extend(volume_to_slices(case.image, slice_axis))
            labels.extend(volume_to_slices(case.label, slice_axis))
        elif spatial_dims == case.image.ndim - 1:
            images.append(case.image)
            labels.append(case.label)
        else:
            raise UnetsegError(
                f"case {case.case_id} has image shape {case.image.shape}; a {spatial_dims}D model cannot train on it"
            )
    return images, labels


class PatchDataset(Dataset):
    """Fixed-size training patches from in-memory samples.

    Each item pads the sample to ``patch_size`` (zeros) where it is smaller and
    takes a random crop where it is larger, then augments it with ``transform``
    (an :class:`~unetseg.data.transforms.Augmenter`, 2D or 3D; None: no augmentation).

    Items: ``(image (C, *patch_size) float32 tensor, label (*patch_size) int64 tensor)``.
    Call :meth:`set_epoch` before each epoch so crops and augmentation are
    reproducible from ``seed`` and the epoch number (also after ``--resume``).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        patch_size: Sequence[int],
        transform: Augmenter | None = None,
        seed: int = 0,
    ) -> None:
        if len(images) != len(labels) or not images:
            raise UnetsegError(f"need matching, non-empty image and label lists, got {len(images)} and {len(labels)}")
        self.images = list(images)
        self.labels = list(labels)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.transform = transform
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, worker_id: int = 0) -> None:
        """Reseed cropping and augmentation for ``epoch`` (and DataLoader worker)."""
        self.rng = np.random.default_rng([self.seed, epoch, worker_id])
        if self.transform is not None:
            self.transform.reseed(int(self.rng.integers(2**31)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = pad_to_shape(self.images[index], self.patch_size)
        label = pad_to_shape(self.labels[index], self.patch_size)
        starts = [int(self.rng.integers(0, s - p + 1)) for s, p in zip(label.shape, self.patch_size)]
        window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        image, label = augment(self.transform, image[(slice(None), *window)], label[window])
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(label, dtype=np.int64)
        )

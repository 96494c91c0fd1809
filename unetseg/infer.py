"""Inference: checkpoints, the :class:`Segmenter`, and prediction of files.

A checkpoint is a plain dict (safe for ``torch.load(weights_only=True)``)
holding the model's constructor arguments and the preprocessing settings, so
inference needs nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from skimage.measure import label as connected_components

from unetseg.data import io
from unetseg.data.datasets import to_channels
from unetseg.data.preprocess import normalize_intensity, slices_to_volume, volume_to_slices
from unetseg.data.transforms import flip_combinations
from unetseg.errors import DataError, UnetsegError
from unetseg.model import UNet

CHECKPOINT_FORMAT = "unetseg-checkpoint-v1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically: to a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def shipped_models() -> list[str]:
    """Names of the trained models that ship with the package."""
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "model.pt").is_file()) if PRETRAINED_DIR.is_dir() else []


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint path, or the ``model.pt`` of a shipped model of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir() and (path / "best.pt").is_file():
        return path / "best.pt"
    shipped = PRETRAINED_DIR / str(name_or_path) / "model.pt"
    if shipped.is_file():
        return shipped
    raise UnetsegError(
        f"checkpoint {str(name_or_path)!r} not found; give a .pt path, a run folder, "
        f"or a shipped model: {', '.join(shipped_models()) or '(none installed)'}"
    )


def load_checkpoint(name_or_path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``); never executes pickled code."""
    path = resolve_checkpoint(name_or_path)
    try:
        with warnings.catch_warnings():  # a refused pickle is reported below as one line, not torch's warning
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with code in it
        raise DataError(path, f"not a loadable unetseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, f"not a unetseg checkpoint (expected format {CHECKPOINT_FORMAT})")
    check_payload(payload, path)
    return payload


# What every checkpoint holds, with the type it must have.
REQUIRED_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "model_args": dict, "state_dict": dict, "preprocessing": dict, "class_names": (list, tuple),
}


def check_payload(payload: dict[str, Any], source: str | Path) -> None:
    """Raise :class:`DataError` (one line naming ``source``) unless the checkpoint's entries are all there and its
    weights fit the network its ``model_args`` describe (a strict load into a fresh network, on the CPU)."""
    for key, kind in REQUIRED_ENTRIES.items():
        if not isinstance(payload.get(key), kind):
            raise DataError(source, f"damaged checkpoint: entry {key!r} is missing or not a {getattr(kind, '__name__', 'list')}; "
                                    "re-export it from its run folder")
    try:
        build_model(payload["model_args"]).load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = lines[1] if lines[0].startswith("Error(s) in loading") and len(lines) > 1 else lines[0]
        raise DataError(source, f"the weights do not fit the network the checkpoint describes ({detail[:200]}); "
                                "it was saved by other code or damaged") from None


def checkpoint_tta_flips(payload: dict[str, Any]) -> list[tuple[int, ...]]:
    """The flip test-time-augmentation members of a checkpoint: the mirrorings its model was trained with.

    Training stores them as ``tta_flips``. Older checkpoints are read by what
    their training really did: 2D augmentation came from albumentations with
    one seed per transform, so horizontal and vertical flips always fired
    together (a model that saw only 180-degree rotations); 3D flipped each axis
    on its own.
    """
    if "tta_flips" in payload:
        return [tuple(int(a) for a in f) for f in payload["tta_flips"]]
    augment = payload.get("config", {}).get("augment", {})
    if not augment.get("flip", True) or augment.get("strength", 1.0) <= 0:
        return [()]
    dims = int(payload["model_args"]["spatial_dims"])
    return [(), (0, 1)] if dims == 2 else flip_combinations(range(dims))


def build_model(model_args: dict[str, Any]) -> UNet:
    """Rebuild a :class:`UNet` from the constructor arguments stored in a checkpoint."""
    return UNet(**model_args)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UnetsegError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def keep_largest_component(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep only the largest connected component of each foreground class (scikit-image labelling)."""
    out = np.zeros_like(labels)
    for k in range(1, num_classes):
        components = connected_components(labels == k)
        if components.max() == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[components == sizes.argmax()] = k
    return out


class Segmenter:
    """Segments images with a trained :class:`UNet`.

    Args:
        model: the network (put in eval mode here).
        preprocessing: ``normalization``, ``slice_axis``, ``patch_size``,
            ``in_channels`` as stored in checkpoints.
        class_names: background first.
        device: where to run.
        batch_size: slices or windows per forward pass.
        dataset: name of the data set the model was trained on (``"hippocampus"``,
            ``"dsb2018"``, ...), when known; used for input-mismatch warnings.
        tta_flips: the members of flip test-time augmentation, each a tuple of
            spatial axes to mirror (``()`` = unflipped, listed first). Use only
            flips the model was trained with (checkpoints store them); None:
            every combination of the network's spatial axes.
        progress: show a progress bar over the windows when an image is
            large enough to be segmented in windows (sliding window), so a
            big image never runs for minutes without a sign of life.

    Example::

        seg = Segmenter.from_checkpoint("hippocampus_2d")
        labels = seg.predict(volume)   # (X, Y, Z) raw intensities -> (X, Y, Z) labels
    """

    def __init__(
        self,
        model: UNet,
        preprocessing: dict[str, Any],
        class_names: Sequence[str],
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        dataset: str | None = None,
        tta_flips: Sequence[Sequence[int]] | None = None,
        progress: bool = False,
    ) -> None:
        self.progress = progress
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dataset = dataset
        flips = flip_combinations(range(model.spatial_dims)) if tta_flips is None else [tuple(f) for f in tta_flips]
        if not flips or flips[0] != ():
            raise ValueError(f"tta_flips must start with () (the unflipped image), got {flips}")
        self.tta_flips = flips
        self.model = model.to(self.device).eval()
        self.preprocessing = dict(preprocessing)
        self.class_names = tuple(class_names)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, name_or_path: str | Path, device: str = "cpu") -> Segmenter:
        """Build from a checkpoint path, run folder, or shipped model name."""
        return cls.from_payload(load_checkpoint(name_or_path), device)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], device: str = "cpu") -> Segmenter:
        """Build from a checkpoint dict that :func:`load_checkpoint` returned."""
        model = build_model(payload["model_args"])
        model.load_state_dict(payload["state_dict"])
        return cls(model, payload["preprocessing"], payload["class_names"], device, dataset=payload.get("dataset"),
                   tta_flips=checkpoint_tta_flips(payload))

    @property
    def spatial_dims(self) -> int:
        return self.model.spatial_dims

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare(self, image: np.ndarray, channel_axis: int | None = None, source: str | Path = "image") -> np.ndarray:
        """Raw image -> normalised ``(C, *S)`` float32 with the model's channel count.

        Args:
            image: a 2D image or 3D volume. Without a channel axis (``(H, W)``,
                ``(X, Y, Z)``) it is one channel; otherwise name its axis.
            channel_axis: the channel axis (``-1`` for ``(H, W, 3)`` RGB), or None.
        """
        image = np.asarray(image, dtype=np.float32)
        image = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
        if image.ndim not in (3, 4):
            raise DataError(source, f"expected a 2D image or 3D volume, got shape {image.shape}")
        image = to_channels(image, self.preprocessing["in_channels"], source)
        return normalize_intensity(image, self.preprocessing["normalization"])

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of a batch ``(B, C, *S) -> (B, K, *S)``.

        Inputs larger than twice the training patch go through MONAI's
        sliding-window inference (Gaussian-weighted, 25 % overlap).
        """
        # Windows twice the training patch: the network is fully convolutional, and
        # fewer, larger windows are faster than many small ones.
        roi = tuple(2 * p for p in self.preprocessing["patch_size"])
        batch = batch.to(self.device)
        if len(roi) == batch.ndim - 2 and any(s > r for s, r in zip(batch.shape[2:], roi)):
            logits = sliding_window_inference(
                batch, roi_size=roi, sw_batch_size=self.batch_size, predictor=self.model, overlap=0.25, mode="gaussian",
                progress=self.progress,
            )
        else:
            logits = self.model(batch)
        return torch.softmax(logits.float(), dim=1)

    def _probabilities(self, image: np.ndarray, flip_axes: Sequence[int] = ()) -> np.ndarray:
        """Probabilities ``(K, *S)`` of a normalised image ``(C, *S)``, optionally flipped along spatial axes."""
        x = torch.from_numpy(np.ascontiguousarray(image))
        volume_in_2d = self.spatial_dims == 2 and image.ndim == 4
        if volume_in_2d:
            x = torch.from_numpy(np.ascontiguousarray(volume_to_slices(image, self.preprocessing["slice_axis"])))
        else:
            x = x[None]
        dims = [d + 2 for d in flip_axes]
        if dims:
            x = torch.flip(x, dims)
        probs = torch.cat([self._forward(chunk) for chunk in torch.split(x, self.batch_size)])
        if dims:
            probs = torch.flip(probs, dims)
        probs = probs.cpu().numpy()
        return slices_to_volume(probs, self.preprocessing["slice_axis"]) if volume_in_2d else probs[0]

    def predict_proba(
        self, image: np.ndarray, tta: bool = False, channel_axis: int | None = None, normalized: bool = False
    ) -> np.ndarray:
        """Class probabilities ``(K, *S)``.

        Args:
            image: raw image (see :meth:`prepare`), or already normalised
                ``(C, *S)`` when ``normalized=True``.
            tta: average over the flips in ``tta_flips`` (test-time augmentation).
            channel_axis: see :meth:`prepare`.
        """
        if not normalized:
            image = self.prepare(image, channel_axis)
        if not tta:
            return self._probabilities(image)
        return np.mean(self._flip_member_probabilities(image), axis=0)

    def _flip_member_probabilities(self, image: np.ndarray) -> list[np.ndarray]:
        """Probabilities ``(K, *S)`` of each flip-TTA member (``tta_flips``), the unflipped one first."""
        return [self._probabilities(image, flip_axes=f) for f in self.tta_flips]

    def predict(
        self,
        image: np.ndarray,
        tta: bool = False,
        largest_component: bool = False,
        channel_axis: int | None = None,
        normalized: bool = False,
    ) -> np.ndarray:
        """Label map ``(*S)`` int64 for a raw image (see :meth:`predict_proba`).

        ``largest_component`` keeps each foreground class's largest connected component.
        """
        labels = self.predict_proba(image, tta=tta, channel_axis=channel_axis, normalized=normalized).argmax(axis=0)
        return keep_largest_component(labels, self.num_classes) if largest_component else labels

    def flip_predictions(self, image: np.ndarray, channel_axis: int | None = None, normalized: bool = False) -> np.ndarray:
        """Label maps ``(M, *S)``, one per flip-TTA member (``tta_flips``, the unflipped one first).

        These are the members of :meth:`predict_proba`'s flip test-time
        augmentation; where they disagree the model is unsure (see
        :func:`unetseg.display.vote_disagreement`).
        """
        if not normalized:
            image = self.prepare(image, channel_axis)
        return np.stack([probs.argmax(axis=0) for probs in self._flip_member_probabilities(image)])

    def predict_file(
        self, path: str | Path, tta: bool = False, largest_component: bool = False
    ) -> tuple[np.ndarray, io.ImageMeta]:
        """Read an image file and predict it; returns labels and the file's metadata."""
        image, meta = io.read_image(path)
        self.check_compatible(meta.kind, path)
        labels = self.predict(image, tta=tta, largest_component=largest_component, channel_axis=0)
        return labels, meta

    def check_compatible(self, kind: str, source: str | Path = "image") -> None:
        """Raise :class:`DataError` when a file of ``kind`` ("nifti" or "image2d") does not suit this model."""
        if kind == "nifti" and self.preprocessing["in_channels"] != 1:
            raise DataError(source, "this model segments 2D colour images, not volumes; pick a volume model")
        if kind == "image2d" and self.spatial_dims == 3:
            raise DataError(source, "this 3D model segments volumes; give a NIfTI file or pick a 2D model")

    def mismatch_warning(self, kind: str) -> str | None:
        """A warning when a file of ``kind`` ("nifti" or "image2d") differs from what the model was trained on.

        Unlike :meth:`check_compatible` this never raises: the model can run,
        but e.g. an MRI model on a microscopy image gives meaningless masks.
        None when the input suits the model or its training data are unknown.
        """
        trained_kind = dataset_kind(self.dataset)
        if trained_kind is None or kind == trained_kind:
            return None
        what = {"nifti": "3D volume", "image2d": "2D image"}
        return (
            f"this model was trained on {self.dataset} ({what[trained_kind]}s) but the input is a "
            f"{what.get(kind, kind)}; expect a meaningless mask, or pick a model trained on {what.get(kind, kind)}s"
        )


def prediction_path(source: str | Path, kind: str, out_dir: str | Path) -> Path:
    """Where the prediction of ``source`` goes: ``<out_dir>/<stem>.nii.gz`` for a volume
    (``kind`` "nifti", also DICOM read as a volume), ``<out_dir>/<stem>.png`` for a 2D image."""
    name = Path(source).name
    if kind == "nifti":
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
        return Path(out_dir) / f"{stem}.nii.gz"
    return Path(out_dir) / f"{Path(name).stem}.png"


def check_prediction_paths(sources: Sequence[Path], out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a batch that would lose data, before anything is predicted.

    Raises :class:`UnetsegError` when a :func:`prediction_path` would overwrite
    one of the inputs, when two inputs share one (``a.png`` and ``a.jpg``,
    or the same file name in two folders), when ``out_dir`` is a file, or -
    unless ``overwrite`` - when a prediction path already exists (a file this
    run did not make, e.g. ``x.nii.gz`` beside an input ``x.nii``).
    """
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UnetsegError(f"--out {out_dir} is a file, not a folder; give a folder for the predictions")
    inputs = {Path(s).resolve() for s in sources}
    seen: dict[Path, Path] = {}
    for source in sources:
        target = prediction_path(source, io.file_kind(source), out_dir)
        key = target.resolve()
        if key in inputs:
            raise UnetsegError(f"{target}: the prediction would overwrite an input file; choose another --out folder")
        if key in seen:
            raise UnetsegError(
                f"{seen[key]} and {source} would both be written to {target}; predict them into separate --out folders"
            )
        if not overwrite and target.exists():
            raise UnetsegError(f"{target} already exists; pass --overwrite to replace it or choose another --out folder")
        seen[key] = source


def write_prediction(labels: np.ndarray, meta: io.ImageMeta, out_dir: str | Path, num_classes: int) -> Path:
    """Save a prediction at :func:`prediction_path`: NIfTI keeps affine and header; 2D becomes a PNG mask."""
    target = prediction_path(meta.path, meta.kind, out_dir)
    if meta.kind == "nifti":
        return io.write_nifti_label(labels, meta, target)
    return io.write_png_mask(labels, target, num_classes)


def dataset_kind(dataset: str | None) -> str | None:
    """The input a data set's models are made for: ``"nifti"`` (volumes, MSD), ``"image2d"`` (DSB), else None."""
    from unetseg.data.datasets import DATASETS

    info = DATASETS.get(dataset or "")
    if info is None or info.layout == "folder":
        return None
    return "nifti" if info.layout == "msd" else "image2d"


def model_card(name_or_path: str | Path) -> dict[str, Any]:
    """What a checkpoint is, without building the model: for pickers and listings.

    Returns ``name``, ``path``, ``dataset``, ``input_kind`` (see
    :func:`dataset_kind`), ``class_names``, ``spatial_dims``, ``skips`` and ``metrics``: the ``unetseg evaluate`` summary stored as
    ``metrics.json`` beside the checkpoint (shipped models), else None.
    """
    path = resolve_checkpoint(name_or_path)
    payload = load_checkpoint(path)
    metrics_file = path.parent / "metrics.json"
    metrics = None
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError:
            metrics = None
    args = payload["model_args"]
    return {
        "name": str(name_or_path),
        "path": path,
        "dataset": payload.get("dataset"),
        "input_kind": dataset_kind(payload.get("dataset")),
        "class_names": tuple(payload["class_names"]),
        "spatial_dims": int(args["spatial_dims"]),
        "skips": args.get("skips", True) if isinstance(args.get("skips", True), bool) else list(args["skips"]),
        "metrics": metrics,
    }

"""Inference: the :class:`Segmenter`, and prediction of files.

A checkpoint (:mod:`unetseg.checkpoint`) holds the model's constructor
arguments and the preprocessing settings, so inference needs nothing else.
Its functions (``load_checkpoint``, ``resolve_checkpoint``, ...) are still
importable from here, where they used to live.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from skimage.measure import label as connected_components
from torch import nn

from unetseg.checkpoint import (  # noqa: F401  (re-exported: unetseg.infer was their home)
    CHECKPOINT_FORMAT,
    PRETRAINED_DIR,
    Preprocessing,
    REQUIRED_ENTRIES,
    Checkpoint,
    build_model,
    check_payload,
    checkpoint_tta_flips,
    load_checkpoint,
    read_int8_calibration,
    resolve_checkpoint,
    save_checkpoint,
    shipped_models,
)
from unetseg.data import io
from unetseg.data.datasets import to_channels
from unetseg.data.preprocess import (
    normalize_intensity,
    round_up_to_multiple,
    slices_to_volume,
    volume_to_slices,
)
from unetseg.data.transforms import flip_combinations
from unetseg.device import resolve_device  # noqa: F401  (re-exported)
from unetseg.errors import DataError, UnetsegError
from unetseg.instances import instance_table, split_instances  # noqa: F401 (the viewer's nuclei, see below)
from unetseg.limits import env_positive_number, positive_number
from unetseg.metrics import score_case, summarize  # noqa: F401 (the viewer's scores, see below)
from unetseg.model import UNet
from unetseg.model.blocks import ConvBlock
from unetseg.model.int8 import Int8UNet, Ranges, int8_problem


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


# --------------------------------------------------------------------------- fast inference
# How much memory one forward pass may use, and what it costs per voxel.
INFER_MEMORY_ENV = "UNETSEG_INFER_MEMORY_MB"
DEFAULT_INFER_MEMORY_MB = 2048.0
# Peak memory of a forward pass per input voxel and batch item, in float32 values per feature map of the finest
# level: measured as peak RSS growth (docs/inference_speed.md) at 410-570 bytes per voxel for the shipped networks
# (16 maps at the finest level = 640 bytes with this factor), 2D and 3D, whole images and batches.
FLOATS_PER_FINEST_MAP = 10
# On the CPU, items (flip-TTA copies, the slices of a volume) of at least this many voxels have a forward pass each;
# smaller ones share passes as far as the memory budget allows. On the 2-core CPU (benchmarks/shared_passes.py,
# docs/shared_passes.txt) a 256x256 image's four TTA copies took 0.36 s in one pass and 0.28 s one after another
# (0.074 s plain): large feature maps leave the cache. Small ones (hippocampus slices) gain from sharing, where fixed
# costs per layer dominate (docs/inference_speed.md).
SHARED_PASS_MAX_ITEM = 128 * 128
# Sliding window (above the budget only): MONAI's, Gaussian-weighted, this overlap.
WINDOW_OVERLAP = 0.25
# channels_last where it measurably helps (docs/inference_speed.md): 2D convolutions on the CPU run ~1.3-1.8x
# faster with it; 3D ones (channels_last_3d) were no faster, so 3D stays contiguous.
CHANNELS_LAST = {2: True, 3: False}


def infer_memory_mb(memory_mb: float | None = None) -> float:
    """The memory budget of one forward pass in MB: ``memory_mb``, else ``$UNETSEG_INFER_MEMORY_MB``, else 2048.

    Raises:
        UnetsegError: a value that is not a positive number (naming where it came from).
    """
    if memory_mb is not None:
        return positive_number("memory_mb", memory_mb, DEFAULT_INFER_MEMORY_MB, "megabytes")
    return env_positive_number(INFER_MEMORY_ENV, DEFAULT_INFER_MEMORY_MB, "megabytes")


def windows_along(size: int, roi: int, overlap: float = WINDOW_OVERLAP) -> int:
    """How many windows of ``roi`` MONAI's sliding window puts along an axis of ``size`` (``overlap`` between them)."""
    if roi >= size:
        return 1
    interval = max(1, int(roi * (1 - overlap)))
    return math.ceil((size - roi) / interval) + 1


def window_shape(shape: Sequence[int], floor: Sequence[int], max_voxels: int, multiple: int) -> tuple[int, ...]:
    """The largest sliding window (multiples of ``multiple``, each side at least ``floor``) with at most
    ``max_voxels`` voxels that tiles ``shape`` with few windows: more windows are added one axis at a time, the
    one with the longest window first, and each axis's window is the smallest that covers it with that many.

    A budget too small for ``floor`` gives ``floor`` (twice the training patch: smaller windows see too little).
    """
    counts = [1] * len(shape)

    def side(axis: int) -> int:
        size, n = int(shape[axis]), counts[axis]
        roi = -(-math.ceil(size / (1 + (1 - WINDOW_OVERLAP) * (n - 1))) // multiple) * multiple
        while windows_along(size, roi) > n:
            roi += multiple
        return max(roi, int(floor[axis]))

    roi = [side(a) for a in range(len(shape))]
    while math.prod(roi) > max_voxels:
        shrinkable = [a for a in range(len(shape)) if roi[a] > floor[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: roi[a])
        counts[axis] += 1
        roi[axis] = side(axis)
    return tuple(roi)


def inference_network(model: UNet, portable: bool = False) -> UNet:
    """A copy of ``model`` that computes the same function faster: each batch norm in eval mode folded into the
    convolution before it (one pass over memory less per layer), in-place activations where a block's input is not
    reused, convolutions on oneDNN whatever the batch size (:class:`OneDnnConv`) and 2D weights in
    ``channels_last`` (see :data:`CHANNELS_LAST`). ``model`` itself is not changed. Results equal ``model``'s
    within float32 rounding (``tests/test_inference.py``).

    ``portable``: keep PyTorch's own convolution modules (for ONNX and TorchScript export).
    """
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        for block in net.modules():
            if not isinstance(block, ConvBlock):
                continue
            for conv, norm in (("conv1", "norm1"), ("conv2", "norm2")):
                if _fold_batch_norm(getattr(block, conv), getattr(block, norm)):
                    setattr(block, norm, nn.Identity())
            if not block.residual:  # a residual block's shortcut may hand its input to the activation
                block.act = _in_place(block.act)
    if torch.backends.mkldnn.is_available() and not portable:
        _use_onednn_convolutions(net)
    if CHANNELS_LAST.get(model.spatial_dims, False):
        net = net.to(memory_format=_channels_last(model.spatial_dims))
    return net


class OneDnnConv(nn.Module):
    """A zero-padded convolution that runs on oneDNN (mkldnn) for float32 CPU input, whatever the batch size.

    PyTorch sends a convolution with a batch of one and few feature maps (batch x channels x the first two spatial
    sizes at most 20,480) to its slower native kernel: for the 3D hippocampus network on a whole volume that is 11 of
    its 15 convolutions, which made one volume cost nearly as much as two (docs/inference_speed.md). Other input
    (another device or dtype, unbatched, under CPU autocast, or with oneDNN switched off) goes through ``conv``.

    Shapes: as ``conv``: ``(B, C_in, *S) -> (B, C_out, *S')``.
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (x.device.type != "cpu" or x.dtype != torch.float32 or c.weight.dtype != torch.float32
                or x.dim() != c.weight.dim() or not torch.backends.mkldnn.enabled
                or torch.is_autocast_enabled("cpu")):
            return c(x)
        return torch.ops.aten.mkldnn_convolution(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)


def _use_onednn_convolutions(net: nn.Module) -> None:
    """Wrap every zero-padded 2D / 3D convolution of ``net`` (in place) in :class:`OneDnnConv`."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) in (nn.Conv2d, nn.Conv3d) and child.padding_mode == "zeros"
                    and not isinstance(child.padding, str)):
                setattr(parent, name, OneDnnConv(child))


def _channels_last(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def _fold_batch_norm(conv: nn.Module, norm: nn.Module) -> bool:
    """Fold an eval-mode ``norm`` (batch norm with running statistics) into ``conv``'s weights and bias."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.training or norm.running_var is None:
        return False
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale + (norm.bias if norm.affine else 0)
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, *[1] * (conv.weight.ndim - 1)), requires_grad=False)
    conv.bias = nn.Parameter(shift.detach(), requires_grad=False)
    return True


def _in_place(act: Any) -> Any:
    """The in-place form of a block activation (``torch.relu``, leaky ReLU), else ``act`` unchanged."""
    if act is torch.relu:
        return torch.relu_
    if isinstance(act, partial) and act.func is F.leaky_relu:
        return partial(F.leaky_relu_, *act.args, **act.keywords)
    return act


def _model_state(model: nn.Module) -> tuple | None:
    """What :func:`inference_network` depends on: every tensor (identity, storage, in-place version), and every
    module's mode and plain attributes (lesion switches, ...). None when it cannot be told (tensors without versions).
    """
    try:
        tensors = tuple((id(t), t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    except RuntimeError:  # inference tensors have no version counter
        return None
    modules = tuple(
        (id(m), tuple((k, v if isinstance(v, (bool, int, float, str, type(None))) else id(v))
                      for k, v in vars(m).items() if not k.startswith("_")))
        for m in model.modules()
    )
    return tensors, modules


class Predictor:
    """What every predictor offers once it has :meth:`predict_proba`: label maps, files, and input checks.

    :class:`Segmenter` (one network) and :class:`unetseg.ensemble.Ensemble`
    (several, probabilities averaged) are predictors; ``unetseg predict``,
    ``unetseg evaluate`` and the Python API take either. A subclass sets
    ``class_names`` (background first), ``preprocessing`` (see
    :class:`Segmenter`), ``dataset`` and ``spatial_dims``.
    """

    class_names: tuple[str, ...]
    preprocessing: dict[str, Any]
    dataset: str | None

    @property
    def spatial_dims(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict_proba(
        self, image: np.ndarray, tta: bool = False, channel_axis: int | None = None, normalized: bool = False
    ) -> np.ndarray:
        """Class probabilities ``(K, *S)`` of a raw image, or of a normalised ``(C, *S)`` one (``normalized``)."""
        raise NotImplementedError

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
        probabilities = self.predict_proba(image, tta=tta, channel_axis=channel_axis, normalized=normalized)
        return self.labels(probabilities, largest_component)

    def labels(self, probabilities: np.ndarray, largest_component: bool = False) -> np.ndarray:
        """Label map ``(*S)`` int64 of class probabilities ``(K, *S)``, as :meth:`predict` makes it."""
        labels = probabilities.argmax(axis=0)
        return keep_largest_component(labels, self.num_classes) if largest_component else labels

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
        if kind == "nifti" and self.preprocessing.in_channels != 1:
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


class Segmenter(Predictor):
    """Segments images with a trained :class:`UNet`.

    Prediction is fast: a whole image or volume goes through the network in one
    forward pass (padded to the network's size multiple, cropped back) whenever
    that fits ``memory_mb``; flip test-time augmentation stacks the mirrored
    copies into the same pass, except on the CPU for copies of
    ``SHARED_PASS_MAX_ITEM`` voxels or more, which go one per pass (faster
    there); the network runs with batch norm folded into
    its convolutions and, in 2D, ``channels_last``. Only what does not fit is
    segmented with MONAI's sliding window (Gaussian-weighted, 25 % overlap),
    with windows as large as the budget allows and never smaller than twice
    the training patch. docs/inference_speed.md has the measurements.

    Args:
        model: the network; it is left in the mode it is in (predictions use an eval-mode copy, see
            :func:`inference_network`).
        preprocessing: what an image goes through before the network (a
            :class:`~unetseg.checkpoint.Preprocessing`, or a checkpoint's
            ``preprocessing`` entry: ``normalization``, ``slice_axis``,
            ``patch_size``, ``in_channels``).
        class_names: background first.
        device: where to run.
        batch_size: at most this many images, slices or windows per forward
            pass; None: as many as ``memory_mb`` allows (on the CPU, one at a time
            from ``SHARED_PASS_MAX_ITEM`` voxels up, whatever ``batch_size``).
        dataset: name of the data set the model was trained on (``"hippocampus"``,
            ``"dsb2018"``, ...), when known; used for input-mismatch warnings.
        tta_flips: the members of flip test-time augmentation, each a tuple of
            spatial axes to mirror (``()`` = unflipped, listed first). Use only
            flips the model was trained with (checkpoints store them); None:
            every combination of the network's spatial axes.
        progress: show a progress bar over the windows when an image is too
            large for one forward pass (sliding window), so a big image never
            runs for minutes without a sign of life; or a callable
            ``progress(windows_done, windows_in_all)`` told after each batch of
            windows of one sliding-window pass (what the viewer's bar shows).
        memory_mb: memory one forward pass may use, in MB (estimated at
            ``4 * (10 * channels[0] + in_channels + 3 * classes)`` bytes per
            voxel); None: ``$UNETSEG_INFER_MEMORY_MB``, else 2048. Read at
            each prediction, so it may be changed on the instance.
        int8_ranges: run the network in int8 (CPU, 2D networks; see
            :mod:`unetseg.model.int8`) with these calibrated activation ranges
            (:func:`~unetseg.checkpoint.read_int8_calibration`); None: float32.
            Faster where the CPU has int8 instructions, and not the same
            function: its labels differ from float32's on a fraction of pixels
            (the calibration file records the validation Dice of both).

    Example::

        seg = Segmenter.from_checkpoint("hippocampus_2d")
        labels = seg.predict(volume)   # (X, Y, Z) raw intensities -> (X, Y, Z) labels
    """

    def __init__(
        self,
        model: UNet,
        preprocessing: Preprocessing | Mapping[str, Any],
        class_names: Sequence[str],
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        dataset: str | None = None,
        tta_flips: Sequence[Sequence[int]] | None = None,
        progress: bool | Callable[[int, int], None] = False,
        memory_mb: float | None = None,
        int8_ranges: Ranges | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive number or None, got {batch_size}")
        self.progress = progress
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dataset = dataset
        flips = flip_combinations(range(model.spatial_dims)) if tta_flips is None else [tuple(f) for f in tta_flips]
        if not flips or flips[0] != ():
            raise ValueError(f"tta_flips must start with () (the unflipped image), got {flips}")
        self.tta_flips = flips
        self.model = model.to(self.device)  # its mode is the caller's: predictions run on an eval-mode copy
        self.preprocessing = (preprocessing if isinstance(preprocessing, Preprocessing)
                              else Preprocessing.from_dict(preprocessing))
        self.class_names = tuple(class_names)
        self.batch_size = batch_size
        self.memory_mb = memory_mb
        self.int8_ranges = int8_ranges
        # {"built": (state of the model, its inference_network)}: a dict, so shallow copies (the viewer gives each
        # prediction one, with its own progress bar) share what one of them built
        self._network: dict[str, tuple[tuple | None, UNet | Int8UNet]] = {}

    @classmethod
    def from_checkpoint(cls, name_or_path: str | Path, device: str = "cpu", int8: bool = False) -> Segmenter:
        """Build from a checkpoint path, run folder, or shipped model name; ``int8``: with the int8 calibration
        beside the checkpoint (:func:`int8_calibration`, which says what is missing and how to make it)."""
        segmenter = cls.from_payload(Checkpoint.load(name_or_path), device)
        if int8:
            segmenter.int8_ranges = int8_calibration(name_or_path, segmenter)["ranges"]
        return segmenter

    def int8_problem(self) -> str | None:
        """Why this segmenter cannot run in int8 (one line), else None: a device other than the CPU, or a network
        :func:`~unetseg.model.int8.int8_problem` refuses."""
        if self.device.type != "cpu":
            return f"int8 inference runs on the CPU, not {self.device}; pass --device cpu"
        return int8_problem(self.model)

    @property
    def int8_ranges(self) -> dict[str, tuple[float, float]] | None:
        """The calibrated activation ranges the network runs in int8 with, or None (float32). Set it to switch;
        it is checked (:meth:`int8_problem`) and copied."""
        return None if self._int8 is None else dict(self._int8)

    @int8_ranges.setter
    def int8_ranges(self, ranges: Ranges | None) -> None:
        problem = None if ranges is None else self.int8_problem()
        if problem:
            raise UnetsegError(problem)
        # a tuple: a copy the caller cannot change, compared by value when the network is rebuilt
        self._int8 = None if ranges is None else tuple((k, (float(v[0]), float(v[1]))) for k, v in ranges.items())

    @classmethod
    def from_payload(cls, checkpoint: Checkpoint | dict[str, Any], device: str = "cpu",
                     int8_ranges: Ranges | None = None) -> Segmenter:
        """Build from a :class:`~unetseg.checkpoint.Checkpoint`, or a checkpoint dict that :func:`load_checkpoint`
        returned. A freshly loaded Checkpoint hands over the network it was checked with (no second build)."""
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = Checkpoint.from_dict(checkpoint)
        return cls(checkpoint.build_model().eval(), checkpoint.preprocessing, checkpoint.class_names, device,
                   dataset=checkpoint.dataset, tta_flips=checkpoint.flips, int8_ranges=int8_ranges)

    @property
    def spatial_dims(self) -> int:
        return self.model.spatial_dims

    @property
    def bytes_per_voxel(self) -> int:
        """Estimated peak memory of a forward pass per input voxel and batch item (see ``memory_mb``)."""
        return 4 * (FLOATS_PER_FINEST_MAP * self.model.channels[0] + self.preprocessing.in_channels
                    + 3 * self.num_classes)

    @property
    def smallest_window(self) -> tuple[int, ...]:
        """Twice the training patch: sliding windows are never smaller (they would see too little), and an image
        no larger is always one forward pass. It is also the window every image larger than it had before the
        memory budget existed, so a budget too small for anything bigger reproduces that behaviour."""
        return tuple(2 * int(p) for p in self.preprocessing.patch_size)

    def items_per_pass(self, items: int, item: int) -> int:
        """How many of ``items`` inputs (images, slices, flipped copies or sliding windows) of ``item`` voxels
        (padded) one forward pass takes: as many as the memory budget and ``batch_size`` allow, but on the CPU one
        at a time from ``SHARED_PASS_MAX_ITEM`` voxels up."""
        if self.device.type == "cpu" and item >= SHARED_PASS_MAX_ITEM:
            return 1
        return min(items, max(1, self.max_voxels() // item), self.batch_size or items)

    def max_voxels(self) -> int:
        """Voxels (summed over a batch) one forward pass may take within the memory budget."""
        return max(1, int(infer_memory_mb(self.memory_mb) * 2**20) // self.bytes_per_voxel)

    def prepare(self, image: np.ndarray, channel_axis: int | None = None, source: str | Path = "image") -> np.ndarray:
        """Raw image -> normalised ``(C, *S)`` float32 with the model's channel count.

        Args:
            image: a 2D image or 3D volume. Without a channel axis (``(H, W)``,
                ``(X, Y, Z)``) it is one channel; otherwise name its axis.
            channel_axis: the channel axis (``-1`` for ``(H, W, 3)`` RGB), or None.
        """
        image = np.asarray(image)
        if image.dtype.kind not in "biuf" or image.size == 0:
            raise DataError(source, f"expected a non-empty array of real numbers, got {image.dtype} of shape {image.shape}")
        image = image.astype(np.float32, copy=False)
        if channel_axis is None:
            if image.ndim == 3 and image.shape[-1] in (3, 4) and self.preprocessing.in_channels == 3:
                raise DataError(source, f"shape {image.shape} looks like an RGB(A) image, which this colour model "
                                        "takes as channels: pass channel_axis=-1 (a grey volume would have more slices)")
            image = image[None]
        else:
            if not -image.ndim <= channel_axis < image.ndim:
                raise DataError(source, f"channel_axis {channel_axis} is outside the image's {image.ndim} axes")
            image = np.moveaxis(image, channel_axis, 0)
        if image.ndim not in (3, 4):
            raise DataError(source, f"expected a 2D image or 3D volume, got shape {image.shape}")
        image = to_channels(image, self.preprocessing.in_channels, source)
        return normalize_intensity(image, self.preprocessing.normalization)

    def _inference_network(self) -> UNet | Int8UNet:
        """:func:`inference_network` of ``self.model`` (or its :class:`Int8UNet` with ``int8_ranges``), rebuilt
        whenever the model changed since the last call (weights, mode, lesion switches) or the ranges did, so a
        model trained or lesioned in place is always predicted as it is (in int8, lesioned skips are refused)."""
        state = (_model_state(self.model), self._int8)
        built = self._network.get("built")
        if built is None or state[0] is None or built[0] != state:
            net = inference_network(self.model) if self._int8 is None else self._int8_network()
            built = self._network["built"] = (state, net)
        return built[1]

    def _int8_network(self) -> Int8UNet:
        """:class:`Int8UNet` of the model as it is now, with ``int8_ranges``.

        Raises:
            UnetsegError: the model was changed since into one int8 does not run (its long skips lesioned).
        """
        try:
            return Int8UNet(inference_network(self.model, portable=True), dict(self._int8))
        except ValueError as exc:
            raise UnetsegError(f"{exc}; set int8_ranges to None first") from None

    def _layout(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` on the device, in the memory format :func:`inference_network` uses."""
        batch = batch.to(self.device)
        dims = batch.ndim - 2
        return batch.contiguous(memory_format=_channels_last(dims)) if CHANNELS_LAST.get(dims, False) else batch

    def member_probabilities(self, image: np.ndarray, flips: Sequence[Sequence[int]] = ((),)) -> np.ndarray:
        """Probabilities ``(M, K, *S)`` of a normalised image ``(C, *S)`` under each of the ``M`` ``flips``
        (tuples of spatial axes to mirror; each member's probabilities are mirrored back).

        Each member is ``softmax(model(flip(image)))`` flipped back, as one forward per member would give; here
        the members (and, for a 2D model on a volume, its slices) share forward passes as far as
        :meth:`items_per_pass` allows. An image too large for the budget is segmented in sliding windows, member by member.
        """
        image = np.asarray(image, dtype=np.float32)
        volume_in_2d = self.spatial_dims == 2 and image.ndim == 4
        axis = self.preprocessing.slice_axis
        x = volume_to_slices(image, axis) if volume_in_2d else image[None]
        x = torch.from_numpy(np.ascontiguousarray(x))
        flip_dims = [[d + 2 for d in f] for f in flips]
        net = self._inference_network()
        with torch.inference_mode():
            item = math.prod(round_up_to_multiple(x.shape[2:], self.model.size_multiple))
            if item <= self.max_voxels() or all(s <= w for s, w in zip(x.shape[2:], self.smallest_window)):
                probs = self._whole(net, x, flip_dims, item)
            else:
                probs = torch.stack([self._windowed(net, x, dims) for dims in flip_dims])
        probs = probs.numpy()  # (M, N, K, *S)
        if volume_in_2d:
            return np.stack([slices_to_volume(p, axis) for p in probs])
        return probs[:, 0]

    def _whole(self, net: UNet, x: torch.Tensor, flip_dims: list[list[int]], item: int) -> torch.Tensor:
        """Whole-image probabilities ``(M, N, K, *S)``: the flipped copies of ``x`` ``(N, C, *S)`` stacked into as
        few forward passes as :meth:`items_per_pass` allows (``item`` voxels each, padded)."""
        members, n = len(flip_dims), x.shape[0]
        batch = torch.cat([torch.flip(x, dims) if dims else x for dims in flip_dims])
        per_pass = self.items_per_pass(len(batch), item)
        out = torch.empty((len(batch), self.num_classes, *x.shape[2:]))
        for start in range(0, len(batch), per_pass):
            logits = net(self._layout(batch[start:start + per_pass]))
            out[start:start + per_pass] = torch.softmax(logits.float(), dim=1).cpu()
        out = out.view(members, n, *out.shape[1:])
        for m, dims in enumerate(flip_dims):
            if dims:
                out[m] = torch.flip(out[m], dims)
        return out

    def _windowed(self, net: UNet, x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        """Sliding-window probabilities ``(N, K, *S)`` of ``x`` ``(N, C, *S)`` mirrored along ``dims``."""
        roi = window_shape(x.shape[2:], self.smallest_window, self.max_voxels(), self.model.size_multiple)
        report = self.progress if callable(self.progress) else None  # else a bool: MONAI's own tqdm bar
        total, done = len(x) * math.prod(windows_along(s, r) for s, r in zip(x.shape[2:], roi)), 0
        per_pass = self.items_per_pass(total, math.prod(roi))

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            nonlocal done
            logits = net(self._layout(windows))
            if report is not None:
                done += len(windows)
                report(done, total)
            return logits

        logits = sliding_window_inference(
            torch.flip(x, dims) if dims else x, roi_size=roi, sw_batch_size=per_pass, predictor=predictor,
            overlap=WINDOW_OVERLAP, mode="gaussian", progress=report is None and bool(self.progress),
            sw_device=self.device, device="cpu",  # the blended image stays in host memory
        )
        probs = torch.softmax(logits.float(), dim=1)
        return torch.flip(probs, dims) if dims else probs

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
        members = self.member_probabilities(image, self.tta_flips if tta else [()])
        return members.mean(axis=0) if tta else members[0]

    def flip_predictions(self, image: np.ndarray, channel_axis: int | None = None, normalized: bool = False) -> np.ndarray:
        """Label maps ``(M, *S)``, one per flip-TTA member (``tta_flips``, the unflipped one first).

        These are the members of :meth:`predict_proba`'s flip test-time
        augmentation; where they disagree the model is unsure (see
        :func:`unetseg.display.vote_disagreement`).
        """
        if not normalized:
            image = self.prepare(image, channel_axis)
        return self.member_probabilities(image, self.tta_flips).argmax(axis=1)


def int8_calibration(name_or_path: str | Path, segmenter: Segmenter) -> dict[str, Any]:
    """The int8 calibration of checkpoint ``name_or_path`` (:func:`~unetseg.checkpoint.read_int8_calibration`),
    once ``segmenter``, its network on its device, is found to run in int8 (:meth:`Segmenter.int8_problem`).

    Raises:
        UnetsegError: naming the checkpoint: a device other than the CPU, a network or PyTorch int8 does not
            cover, no calibration beside it, or one made for other weights (each says what to do).
    """
    problem = segmenter.int8_problem()
    if problem:
        raise UnetsegError(f"{name_or_path}: {problem}")
    return read_int8_calibration(name_or_path)


def int8_validation(name_or_path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` when a checkpoint can run in int8 on this machine's CPU, ``record`` being what ``unetseg
    quantize`` measured on its validation split; else ``(None, why not)``, one line that says what to do (the
    reasons of :func:`int8_calibration`)."""
    try:
        return int8_calibration(name_or_path, Segmenter.from_checkpoint(name_or_path))["validation"], None
    except UnetsegError as exc:
        return None, str(exc)


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

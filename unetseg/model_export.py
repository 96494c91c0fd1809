"""A checkpoint's network as one model file for deployment: ONNX (ONNX Runtime) or TorchScript.

The file holds the network that :class:`unetseg.infer.Segmenter` runs (batch
norm folded into the convolutions, eval mode) and outputs **logits**:

- input ``image``: float32 ``(N, C, *S)``, normalised as the checkpoint's
  ``preprocessing`` says (``zscore`` or ``percentile`` per channel, see
  :func:`unetseg.data.preprocess.normalize_intensity`); the batch and spatial
  axes are dynamic, each spatial side a multiple of ``size_multiple``, not all
  of them equal to it (pad at the high end with 0, crop the output back);
- output ``logits``: ``(N, K, *S)``; ``softmax`` over axis 1 gives the class
  probabilities, ``argmax`` over axis 1 the label map.

A 2D model trained on volumes segments them slice by slice along
``preprocessing.slice_axis``. All of this, with the class names, is written
as JSON beside the file (``<file>.json``) and into the file itself (ONNX
``metadata_props``; TorchScript extra file ``unetseg.json``), so a user without
unetseg can reproduce :meth:`Segmenter.predict_proba` (``docs/model_export.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import unetseg
from unetseg.data.preprocess import pad_to_shape, round_up_to_multiple, slices_to_volume, volume_to_slices
from unetseg.errors import UnetsegError
from unetseg.checkpoint import Checkpoint, resolve_checkpoint
from unetseg.infer import inference_network
from unetseg.runlog import staged_file, write_json

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18  # ConvTranspose, InstanceNormalization and every other op here; ONNX Runtime >= 1.14 runs it
METADATA_FORMAT = "unetseg-model-file-v1"
TORCHSCRIPT_METADATA = "unetseg.json"  # the extra file inside a TorchScript archive
ONNX_INSTALL = "pip install 'unetseg[onnx]'"
Forward = Callable[[np.ndarray], np.ndarray]  # (N, C, *S) float32 -> (N, K, *S) logits


def require_onnx(what: str = "ONNX export") -> None:
    """Raise one line telling how to install the ``onnx`` extra when ``onnx``/``onnxruntime`` are missing."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise UnetsegError(f"{what} needs the optional package {module!r}: {ONNX_INSTALL}") from None


def exported_network(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's network as :class:`Segmenter` runs it (batch norm folded, eval), in plain memory layout."""
    return inference_network(checkpoint.build_model().eval(), portable=True).to(memory_format=torch.contiguous_format).eval()


def model_metadata(checkpoint: Checkpoint, source: str, fmt: str, multiple: int) -> dict[str, Any]:
    """What a user needs besides the model file: input contract, preprocessing, classes, provenance (``multiple``:
    the network's size multiple)."""
    args = checkpoint.model_args
    return {
        "format": METADATA_FORMAT,
        "model_format": fmt,
        "unetseg_version": unetseg.__version__,
        "source_checkpoint": source,
        "dataset": checkpoint.dataset,
        "class_names": list(checkpoint.class_names),
        "preprocessing": checkpoint.preprocessing.to_dict(),
        "spatial_dims": checkpoint.spatial_dims,
        "in_channels": int(args.get("in_channels", 1)),
        "size_multiple": multiple,
        "tta_flips": [list(f) for f in checkpoint.flips],
        "model_args": args,
        "input": f"image: float32 (N, C, *S), normalised per channel as preprocessing.normalization says; each "
                 f"spatial side a multiple of {multiple}, not all of them {multiple} (pad at the high end with 0)",
        "output": "logits: float32 (N, K, *S), K = len(class_names); softmax over axis 1 gives probabilities",
    }


def export_model(
    checkpoint: str | Path, out: str | Path, fmt: str, overwrite: bool = False, opset: int = ONNX_OPSET
) -> Path:
    """Write a checkpoint's network to ``out`` as ``fmt`` (``"onnx"`` or ``"torchscript"``) and ``<out>.json``.

    Args:
        checkpoint: checkpoint ``.pt``, run folder or shipped model name.
        out: the model file to write; an existing one is refused unless ``overwrite``.
        fmt: ``"onnx"`` (needs the ``onnx`` extra) or ``"torchscript"``.
        opset: ONNX opset version.

    Returns:
        ``out``. Both files are written atomically (a failed export leaves nothing behind).
    """
    if fmt not in FORMATS:
        raise UnetsegError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    out = Path(out)
    sidecar = metadata_path(out)
    if out.is_dir():
        raise UnetsegError(f"--out {out} is a folder; give a file name, e.g. {out / ('model.' + ('onnx' if fmt == 'onnx' else 'pt'))}")
    if not overwrite and (out.exists() or sidecar.exists()):
        raise UnetsegError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    loaded = Checkpoint.load(checkpoint)
    net = exported_network(loaded)
    metadata = model_metadata(loaded, str(resolve_checkpoint(checkpoint)), fmt, net.size_multiple)
    dims, multiple = metadata["spatial_dims"], metadata["size_multiple"]
    example = torch.zeros(1, metadata["in_channels"], *[2 * multiple] * dims)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(out) as tmp:
        if fmt == "onnx":
            _write_onnx(net, example, multiple, tmp, metadata, opset)
        else:
            _write_torchscript(net, example, tmp, metadata)
    write_json(sidecar, metadata)
    return out


def metadata_path(model_file: str | Path) -> Path:
    """The JSON written beside a model file: ``model.onnx`` -> ``model.onnx.json``."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def _write_onnx(net: nn.Module, example: torch.Tensor, multiple: int, path: Path, metadata: dict[str, Any],
                opset: int) -> None:
    import onnx
    from torch.export import Dim

    # Sides are multiples of the size multiple, so the network's own padding is never traced. min=2 settles the
    # "one-voxel bottleneck" test in UNet.forward while tracing; ONNX Runtime does not enforce it.
    spatial = {2 + i: multiple * Dim(f"side{i}", min=2) for i in range(example.ndim - 2)}
    with _quiet_exporter():
        program = torch.onnx.export(
            net, (example,), input_names=["image"], output_names=["logits"], opset_version=opset, dynamo=True,
            dynamic_shapes=({0: Dim("batch", min=1), **spatial},), external_data=False, verbose=False,
        )
    model = program.model_proto
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    model.doc_string = "unetseg U-Net: " + metadata["output"]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_torchscript(net: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices: the parity test is the check
        traced = torch.jit.trace(net, example, check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep torch.onnx's progress lines and notices about optional packages (torchvision) off the console."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_metadata(model_file: str | Path) -> dict[str, Any]:
    """The metadata an exported model file carries (its ``<file>.json``, else the file's own copy)."""
    model_file = Path(model_file)
    sidecar = metadata_path(model_file)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    if model_file.suffix == ".onnx":
        require_onnx("reading an ONNX model")
        import onnx

        props = onnx.load(str(model_file), load_external_data=False).metadata_props
        return {p.key: json.loads(p.value) for p in props}
    files = {TORCHSCRIPT_METADATA: ""}
    _load_torchscript(model_file, files)
    return json.loads(files[TORCHSCRIPT_METADATA])


def _load_torchscript(model_file: str | Path, extra_files: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU, without its deprecation notice (TorchScript is what was asked for here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(model_file), map_location="cpu", _extra_files=extra_files or {})


def onnx_forward(model_file: str | Path, threads: int | None = None) -> Forward:
    """An ONNX Runtime session (CPU) of an exported model as a function ``(N, C, *S) -> (N, K, *S)`` logits.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, all cores).
    """
    require_onnx("ONNX Runtime inference")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]


def torchscript_forward(model_file: str | Path) -> Forward:
    """A TorchScript model file as a function ``(N, C, *S) -> (N, K, *S)`` logits (CPU)."""
    module = _load_torchscript(model_file)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return forward


def exported_probabilities(forward: Forward, image: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """Class probabilities ``(K, *S)`` of a normalised image ``(C, *S)`` from an exported model's ``forward``.

    What :meth:`Segmenter.predict_proba` computes (without TTA or sliding
    windows): a 2D model's volume is cut into slices along the slice axis; the
    input is padded at the high end as the network itself pads, the logits are
    cropped back and turned into probabilities by a softmax over the classes.
    """
    image = np.asarray(image, dtype=np.float32)
    volume_in_2d = metadata["spatial_dims"] == 2 and image.ndim == 4
    axis = metadata["preprocessing"].get("slice_axis", 2)
    x = volume_to_slices(image, axis) if volume_in_2d else image[None]
    spatial = x.shape[2:]
    multiple = metadata["size_multiple"]
    padded = list(round_up_to_multiple(spatial, multiple))
    if all(p == multiple for p in padded):  # as UNet.forward: never a one-voxel bottleneck
        padded[0] += multiple
    logits = forward(pad_to_shape(x, padded))[(..., *(slice(0, s) for s in spatial))]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return slices_to_volume(probs, axis) if volume_in_2d else probs[0]

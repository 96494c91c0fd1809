"""What ``unetseg predict`` writes: label maps, probability maps, and label description files.

For an input ``<stem>.nii[.gz]`` (or a DICOM volume) the label map is
``<stem>.nii.gz`` with the input's affine and header; for a 2D image
``<stem>.png`` (see :func:`unetseg.data.io.label_to_png_pixels`). With
probabilities (nnU-Net's ``--save_probabilities``) also
``<stem>_probabilities.nii.gz``, a 4D float32 NIfTI ``(X, Y, Z, K)`` in the
input's space, or ``<stem>_probabilities.npz`` (``probabilities`` ``(K, H, W)``
float32 and ``class_names``) for a 2D image. Beside NIfTI label maps go the
class names and colours for the viewers radiologists use:
:data:`ITKSNAP_LABELS` (ITK-SNAP's label description file) and
:data:`SLICER_COLORS` (a 3D Slicer colour table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from unetseg.data import io
from unetseg.display import class_colors
from unetseg.errors import UnetsegError
from unetseg.runlog import write_text_atomic

ITKSNAP_LABELS = "labels_itksnap.txt"
SLICER_COLORS = "labels_slicer.ctbl"
PROBABILITIES_SUFFIX = "_probabilities"


def prediction_path(source: str | Path, kind: str, out_dir: str | Path) -> Path:
    """Where the prediction of ``source`` goes: ``<out_dir>/<stem>.nii.gz`` for a volume
    (``kind`` "nifti", also DICOM read as a volume), ``<out_dir>/<stem>.png`` for a 2D image."""
    return Path(out_dir) / f"{_stem(source, kind)}{'.nii.gz' if kind == 'nifti' else '.png'}"


def probabilities_path(source: str | Path, kind: str, out_dir: str | Path) -> Path:
    """Where the probabilities of ``source`` go: ``<stem>_probabilities.nii.gz`` (volume) or ``.npz`` (2D image)."""
    suffix = ".nii.gz" if kind == "nifti" else ".npz"
    return Path(out_dir) / f"{_stem(source, kind)}{PROBABILITIES_SUFFIX}{suffix}"


def _stem(source: str | Path, kind: str) -> str:
    name = Path(source).name
    if kind == "nifti" and name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return Path(name).stem


def check_prediction_paths(
    sources: Sequence[Path], out_dir: str | Path, overwrite: bool = False, probabilities: bool = False
) -> None:
    """Refuse a batch that would lose data, before anything is predicted.

    Raises :class:`UnetsegError` when a :func:`prediction_path` (or, with
    ``probabilities``, a :func:`probabilities_path`) would overwrite one of the
    inputs, when two inputs share one (``a.png`` and ``a.jpg``, or the same
    file name in two folders), when ``out_dir`` is a file, or - unless
    ``overwrite`` - when such a path already exists (a file this run did not
    make, e.g. ``x.nii.gz`` beside an input ``x.nii``).
    """
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UnetsegError(f"--out {out_dir} is a file, not a folder; give a folder for the predictions")
    inputs = {Path(s).resolve() for s in sources}
    seen: dict[Path, Path] = {}
    for source in sources:
        kind = io.file_kind(source)
        targets = [prediction_path(source, kind, out_dir)]
        if probabilities:
            targets.append(probabilities_path(source, kind, out_dir))
        for target in targets:
            key = target.resolve()
            if key in inputs:
                raise UnetsegError(f"{target}: the prediction would overwrite an input file; choose another --out folder")
            if key in seen:
                raise UnetsegError(f"{seen[key]} and {source} would both be written to {target}; predict them into "
                                   "separate --out folders")
            if not overwrite and (target.exists() or target.is_symlink()):  # a dangling link would write elsewhere
                raise UnetsegError(f"{target} already exists; pass --overwrite to replace it or choose another --out "
                                   "folder")
            seen[key] = source


def _replace_link(target: Path) -> Path:
    """``target``, with a symbolic link there removed: outputs replace a link (allowed by --overwrite), never
    write through it."""
    if target.is_symlink():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def write_prediction(labels: np.ndarray, meta: io.ImageMeta, out_dir: str | Path, num_classes: int) -> Path:
    """Save a prediction at :func:`prediction_path`: NIfTI keeps affine and header; 2D becomes a PNG mask."""
    target = _replace_link(prediction_path(meta.path, meta.kind, out_dir))
    if meta.kind == "nifti":
        return io.write_nifti_label(labels, meta, target)
    return io.write_png_mask(labels, target, num_classes)


def write_probabilities(
    probabilities: np.ndarray, meta: io.ImageMeta, out_dir: str | Path, class_names: Sequence[str]
) -> Path:
    """Save class probabilities ``(K, *S)`` at :func:`probabilities_path`: a volume as a 4D float32 NIfTI
    ``(X, Y, Z, K)`` with the input's affine, a 2D image as ``.npz`` (``probabilities``, ``class_names``)."""
    target = _replace_link(probabilities_path(meta.path, meta.kind, out_dir))
    values = np.asarray(probabilities, dtype=np.float32)
    if meta.kind == "nifti":
        image = nib.Nifti1Image(np.moveaxis(values, 0, -1), meta.affine)
        image.header.set_intent("vector", name="class probabilities")
        nib.save(image, str(target))
        return target
    with target.open("wb") as f:  # np.savez would add ".npz" to a name it does not end with; it does end with it
        np.savez_compressed(f, probabilities=values, class_names=np.array(list(class_names)))
    return target


def write_outputs(
    labels: np.ndarray, meta: io.ImageMeta, out_dir: str | Path, class_names: Sequence[str],
    probabilities: np.ndarray | None = None,
) -> Path:
    """:func:`write_prediction` of ``labels`` ``(*S)`` and, when given, :func:`write_probabilities` of
    ``probabilities`` ``(K, *S)``; returns the label map's path."""
    if probabilities is not None:
        write_probabilities(probabilities, meta, out_dir, class_names)
    return write_prediction(labels, meta, out_dir, len(class_names))


def label_descriptions(class_names: Sequence[str]) -> dict[str, str]:
    """The texts of :data:`ITKSNAP_LABELS` and :data:`SLICER_COLORS` for a model's classes (background first),
    in the viewer's class colours."""
    colors = class_colors(len(class_names))
    itksnap = ["################################################", "# ITK-SnAP Label Description File",
               "# written by unetseg predict", "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
               '    0     0    0    0     0   0   0  "Clear Label"']
    slicer = ["# Color table file written by unetseg predict", f"# {len(class_names)} values"]
    for index, (name, (r, g, b)) in enumerate(zip(class_names, colors.tolist())):
        if index:
            itksnap.append(f'{index:5d} {r:5d} {g:4d} {b:4d}     1   1   1  "{name}"')
        slicer.append(f"{index} {name.replace(' ', '_')} {r} {g} {b} {255 if index else 0}")
    return {ITKSNAP_LABELS: "\n".join(itksnap) + "\n", SLICER_COLORS: "\n".join(slicer) + "\n"}


def check_label_descriptions(out_dir: str | Path, class_names: Sequence[str], overwrite: bool = False) -> None:
    """Raise :class:`UnetsegError` when ``out_dir`` holds label description files of other labels (another
    model's classes) and not ``overwrite``: run before predicting, so nothing is predicted in vain."""
    for name, text in label_descriptions(class_names).items():
        target = Path(out_dir) / name
        if (target.exists() or target.is_symlink()) and not overwrite and not _holds(target, text):
            raise UnetsegError(f"{target} already exists and describes other labels; pass --overwrite to replace "
                               "it or choose another --out folder")


def _holds(target: Path, text: str) -> bool:
    return target.is_file() and not target.is_symlink() and target.read_text(errors="replace") == text


def write_label_descriptions(out_dir: str | Path, class_names: Sequence[str]) -> list[Path]:
    """Write :func:`label_descriptions` into ``out_dir`` (after :func:`check_label_descriptions`); returns the
    files written (none when they already hold these labels)."""
    written = []
    for name, text in label_descriptions(class_names).items():
        target = Path(out_dir) / name
        if not _holds(target, text):
            write_text_atomic(_replace_link(target), text)
            written.append(target)
    return written

"""What ``unetseg predict`` writes: label maps, probability maps, and label description files.

For an input ``<stem>.nii[.gz]`` (or a DICOM volume) the label map is
``<stem>.nii.gz`` with the input's affine and header (a DICOM series folder
``<folder>`` or file ``<stem>.dcm`` gives ``<folder>.nii.gz`` / ``<stem>.nii.gz``
in the series' space, and with ``--dicom-seg`` also a DICOM-SEG
``<stem>_seg.dcm``, see :func:`write_dicom_seg`); for a 2D image
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
from unetseg.data.dicom import DICOM_SUFFIXES
from unetseg.display import class_colors
from unetseg.errors import DataError, UnetsegError
from unetseg.runlog import write_text_atomic

ITKSNAP_LABELS = "labels_itksnap.txt"
SLICER_COLORS = "labels_slicer.ctbl"
PROBABILITIES_SUFFIX = "_probabilities"
DICOM_SEG_SUFFIX = "_seg.dcm"
# Name endings taken off a volume's name for its outputs; a name without one (a series folder) is kept whole.
VOLUME_SUFFIXES = (".nii.gz", ".nii", *DICOM_SUFFIXES, ".zip")
# Patient and study attributes a DICOM-SEG copies from its source that DICOM lets be empty (type 2).
TYPE_2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName")


def prediction_path(source: str | Path, kind: str, out_dir: str | Path) -> Path:
    """Where the prediction of ``source`` goes: ``<out_dir>/<stem>.nii.gz`` for a volume
    (``kind`` "nifti", or "dicom": a DICOM file or series folder), ``<out_dir>/<stem>.png`` for a 2D image."""
    return Path(out_dir) / f"{_stem(source, kind)}{'.png' if kind == 'image2d' else '.nii.gz'}"


def probabilities_path(source: str | Path, kind: str, out_dir: str | Path) -> Path:
    """Where the probabilities of ``source`` go: ``<stem>_probabilities.nii.gz`` (volume) or ``.npz`` (2D image)."""
    suffix = ".npz" if kind == "image2d" else ".nii.gz"
    return Path(out_dir) / f"{_stem(source, kind)}{PROBABILITIES_SUFFIX}{suffix}"


def dicom_seg_path(source: str | Path, out_dir: str | Path) -> Path:
    """Where the DICOM-SEG of the DICOM file or series folder ``source`` goes: ``<out_dir>/<stem>_seg.dcm``."""
    return Path(out_dir) / f"{_stem(source, 'dicom')}{DICOM_SEG_SUFFIX}"


def _stem(source: str | Path, kind: str) -> str:
    """A 2D image's name without its suffix; a volume's without one of :data:`VOLUME_SUFFIXES` (a series folder
    ``1.2.840.5`` keeps its whole name)."""
    name = Path(source).name
    if kind == "image2d":
        return Path(name).stem
    ending = next((e for e in VOLUME_SUFFIXES if name.lower().endswith(e)), "")
    return name[: len(name) - len(ending)] if len(ending) < len(name) else name


def check_prediction_paths(
    sources: Sequence[Path], out_dir: str | Path, overwrite: bool = False, probabilities: bool = False,
    dicom_seg: bool = False,
) -> None:
    """Refuse a batch that would lose data, before anything is predicted.

    Raises :class:`UnetsegError` when a :func:`prediction_path` (or, with
    ``probabilities``, a :func:`probabilities_path`) would overwrite one of the
    inputs, when two inputs share one (``a.png`` and ``a.jpg``, or the same
    file name in two folders), when ``out_dir`` is a file, or - unless
    ``overwrite`` - when such a path already exists (a file this run did not
    make, e.g. ``x.nii.gz`` beside an input ``x.nii``). With ``dicom_seg`` the
    :func:`dicom_seg_path` of each DICOM input counts too. Nothing may be written
    into a DICOM series folder that is an input (a DICOM-SEG there would join the series).
    """
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UnetsegError(f"--out {out_dir} is a file, not a folder; give a folder for the predictions")
    if dicom_seg:
        check_dicom_seg_available()
        if not any(io.file_kind(s) == "dicom" for s in sources):
            raise UnetsegError("--dicom-seg writes a DICOM-SEG for DICOM inputs (a .dcm file or a series folder) and "
                               "none is given; leave --dicom-seg out")
    inputs = {Path(s).resolve() for s in sources}
    series_folders = {key for key in inputs if key.is_dir()}
    seen: dict[Path, Path] = {}
    for source in sources:
        kind = io.file_kind(source)
        targets = [prediction_path(source, kind, out_dir)]
        if probabilities:
            targets.append(probabilities_path(source, kind, out_dir))
        if dicom_seg and kind == "dicom":
            targets.append(dicom_seg_path(source, out_dir))
        for target in targets:
            key = target.resolve()
            if key in inputs:
                raise UnetsegError(f"{target}: the prediction would overwrite an input file; choose another --out folder")
            if key.parent in series_folders:
                raise UnetsegError(f"--out {out_dir} is the DICOM series folder {key.parent}, an input; choose another "
                                   "--out folder")
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


def check_dicom_seg_available() -> None:
    """Raise :class:`UnetsegError` when highdicom (the optional extra ``unetseg[dicom-seg]``) is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UnetsegError("--dicom-seg needs highdicom; install it with: pip install 'unetseg[dicom-seg]'") from None


def write_dicom_seg(labels: np.ndarray, meta: io.ImageMeta, out_dir: str | Path, class_names: Sequence[str],
                    model_name: str = "unetseg") -> Path:
    """Save the label map ``(X, Y, Z)`` of the DICOM file or series folder ``meta.path`` as a DICOM Segmentation
    (highdicom) at :func:`dicom_seg_path`.

    One segment per foreground class (segment number = class index, label = class name, the viewer's colour),
    binary, frames referencing the source slices (empty frames left out); patient and study come from the source,
    the SEG is a new series. The algorithm is ``model_name`` (family "Artificial Intelligence"), the property
    category and type the generic SNOMED "Tissue": unetseg does not know what anatomy a model's classes are.
    """
    check_dicom_seg_available()
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from unetseg import __version__
    from unetseg.data.dicom import frame_order, series_headers

    headers = series_headers(meta.path)
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)), dtype=np.uint8)  # (Z, rows, cols), as read
    order = frame_order(headers[0]) if len(headers) == 1 else np.arange(len(headers))
    if len(order) != len(frames) or frames.shape[1:] != (headers[0].Rows, headers[0].Columns):
        raise UnetsegError(f"{meta.path}: the DICOM files changed since they were read ({len(order)} frames of "
                           f"{headers[0].Rows} x {headers[0].Columns} for a {labels.shape} label map); predict again")
    stored = np.empty_like(frames)
    stored[order] = frames  # one file's frames back in stored order (an enhanced multi-frame is read sorted)
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, family=codes.cid7162.ArtificialIntelligence,
                                                    version=__version__, source="unetseg")
    colors = class_colors(len(class_names))
    segments = [
        hd.seg.SegmentDescription(
            segment_number=index, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=hd.color.CIELabColor.from_rgb(*colors[index].tolist()))
        for index, name in enumerate(class_names) if index
    ]
    for keyword in TYPE_2_COPIED:  # anonymisers drop some; they may be empty, so an empty one stands in
        if keyword not in headers[0]:
            setattr(headers[0], keyword, "")
    source_series = headers[0].get("SeriesNumber")
    try:
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=stored, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
            series_number=1000 + int(source_series) if str(source_series or "").isdigit() else 1000,
            instance_number=1, manufacturer="unetseg", manufacturer_model_name=model_name[:64],
            software_versions=__version__, device_serial_number="unetseg",
            series_description=f"unetseg {model_name}"[:64],
            omit_empty_frames=bool(stored.any()),  # an empty prediction keeps its frames: a SEG needs one
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a source without the tags a SEG copies
        reason = " ".join(str(exc).split())[:200]
        raise DataError(meta.path, f"no DICOM-SEG written ({type(exc).__name__}: {reason}); the source lacks "
                        "what highdicom needs to reference it - the NIfTI label map is written") from None
    target = _replace_link(dicom_seg_path(meta.path, out_dir))
    seg.save_as(target)
    return target

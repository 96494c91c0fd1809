"""unetseg viewer: drop in a scan, look at the predicted mask.

    streamlit run apps/viewer.py

Widgets and display only. Reading files, models, metrics and every array
operation live in the ``unetseg`` package (``unetseg.uploads``,
``unetseg.infer``, ``unetseg.evaluate``, ``unetseg.display``).

Speed: models are cached with ``st.cache_resource``; decoded inputs and
predictions with ``st.cache_data``, keyed on the upload's SHA-256 and the
model, so moving a slider or the opacity only re-draws the picture. The
objects the libraries leave on the heap are frozen out of the garbage
collector's reach once per server (``freeze_imported_heap``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import html
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from unetseg import display, uploads
from unetseg.choice import best_model, suits
from unetseg.errors import DataError, UnetsegError
from unetseg.checkpoint import int8_calibration_path
from unetseg.infer import (
    Segmenter,
    instance_table,
    int8_validation,
    model_card,
    resolve_checkpoint,
    score_case,
    shipped_models,
    split_instances,
    summarize,
)
from unetseg.uploads import ImageMeta, default_data_root

log = logging.getLogger("unetseg.viewer")

NO_SAMPLE = "(none)"
UPLOAD_SHOWN = "Showing the uploaded file: remove it to view a sample case."
WHAT = {"nifti": "volume", "image2d": "2D image"}
INT8 = "#int8"  # ends the model key of a model that predicts in int8 (its predictions are cached apart)
NOSKIP = "_noskip"  # a shipped model ``x`` and its ablation twin ``x_noskip`` differ only in the long skips
# Temporary files that ``unetseg.uploads`` reads uploads through: their paths must never reach the page.
TEMP_PATH = re.compile(r"[^\s\"'()]*unetseg-(?:upload|download)-[^\s\"'()]*")


# ---------------------------------------------------------------- cached work (all of it via unetseg)


@st.cache_resource(show_spinner=False)
def freeze_imported_heap() -> int:
    """Collect garbage once, then move every object alive (torch, pandas, Streamlit, the viewer's modules: about
    390,000) into the collector's permanent generation (``gc.freeze``); returns how many. Once per server process.

    Streamlit collects garbage after every run (``runner.postScriptGC``). Over that heap a collection took
    0.35-0.45 s on the 2-core machine, and replacing an upload pays it between the run without a file and the run
    with the new one; frozen, it takes under a millisecond. Frozen objects are still freed by reference counting,
    but a reference cycle among them that becomes garbage later is never collected: the first run's script module
    and session objects alive at the freeze leak once per process (kilobytes). Clearing the resource cache
    (``st.cache_resource.clear()``) freezes again whatever is alive then.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@st.cache_resource(max_entries=8, show_spinner="Loading model ...")
def load_segmenter(model_key: str) -> Segmenter:
    """One :class:`Segmenter` per model (``model_key`` = reference, checkpoint and calibration file times, and
    whether it runs in int8)."""
    return Segmenter.from_checkpoint(checkpoint_ref(model_key), device="cpu", int8=runs_int8(model_key))


@st.cache_data(max_entries=32, show_spinner=False)
def cached_card(model_key: str) -> dict[str, Any]:
    return model_card(checkpoint_ref(model_key))


@st.cache_data(max_entries=32, show_spinner=False)
def int8_record(model_key: str) -> tuple[dict[str, Any] | None, str | None]:
    """What the model's int8 calibration measured on its validation images (``unetseg quantize``), or why the model
    cannot run in int8 here (:func:`unetseg.infer.int8_validation`)."""
    return int8_validation(checkpoint_ref(model_key))


@st.cache_data(max_entries=8, show_spinner="Reading file ...")
def decode_upload(key: str, name: str, _data: bytes) -> tuple[np.ndarray, ImageMeta]:
    """Uploaded bytes -> ``(C, *S)`` image and meta, cached by ``key`` (the bytes' SHA-256)."""
    return uploads.read_upload(name, _data)


@contextlib.contextmanager
def window_bar(model_key: str, what: str) -> Iterator[Segmenter]:
    """The cached model for one prediction, with an ``st.progress`` bar over the windows of an image too large for
    one forward pass (fed by ``Segmenter.progress``, as ``unetseg predict``'s bar is); images that fit get none.

    The model is shared by every session, so the bar goes on a shallow copy of it. Made inside the cached
    functions below, the bar is part of what their cache replays, and is removed when the prediction is done.
    """
    seg, bar = copy.copy(load_segmenter(model_key)), []

    def report(done: int, total: int) -> None:
        if not bar:
            bar.append(st.progress(0.0))
        bar[0].progress(done / total, text=f"{what}: window {done} of {total}")

    seg.progress = report
    try:
        yield seg
    finally:
        for b in bar:
            b.empty()


@st.cache_data(max_entries=16, show_spinner="Segmenting ...")
def predict(key: str, model_key: str, _image: np.ndarray) -> np.ndarray:
    """Label map of the input ``key`` by ``model_key``; ``_image`` is not hashed (the key stands for it)."""
    with window_bar(model_key, "Segmenting") as seg:
        labels = seg.predict(_image, channel_axis=0)
    return labels.astype(np.uint8)


@st.cache_data(max_entries=8, show_spinner="Test-time augmentation ...")
def flip_disagreement(key: str, model_key: str, _image: np.ndarray) -> np.ndarray:
    """Share of flip-TTA members that disagree with the majority, per voxel."""
    with window_bar(model_key, "Test-time augmentation (one pass per flip)") as seg:
        members = seg.flip_predictions(_image, channel_axis=0)
    return display.vote_disagreement(members)


@st.cache_data(max_entries=8, show_spinner="Reading ground truth ...")
def decode_label(key: str, name: str, _data: bytes, image_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    return uploads.read_label_upload(name, _data, image_shape, num_classes).astype(np.uint8)


@st.cache_data(max_entries=8, show_spinner="Reading ground truth ...")
def read_sample_label(path: str, image_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    return uploads.read_label_path(path, image_shape, num_classes).astype(np.uint8)


@st.cache_data(max_entries=16, show_spinner="Scoring ...")
def scores(key: str, model_key: str, label_key: str, _prediction, _truth, class_names, spacing) -> dict[str, float]:
    """Dice and HD95 per class, exactly as ``unetseg evaluate`` scores a case."""
    return score_case(_prediction, _truth, class_names, spacing)


@st.cache_data(max_entries=4, show_spinner="Listing sample cases ...")
def samples(root: str) -> dict[str, list]:
    return uploads.list_samples(root) if root and Path(root).is_dir() else {}


def model_key(ref: str) -> str:
    """``ref@<checkpoint mtime>.<int8 calibration mtime, 0 for none>``: a checkpoint re-written on disk, or
    calibrated again, gets fresh cache entries."""
    path = resolve_checkpoint(ref)
    calibration = int8_calibration_path(path)
    stamp = calibration.stat().st_mtime_ns if calibration.is_file() else 0
    return f"{ref}@{path.stat().st_mtime_ns}.{stamp}"


def checkpoint_ref(model_key: str) -> str:
    """The checkpoint a model key names (shipped name or path)."""
    return model_key.rsplit("@", 1)[0]


def runs_int8(model_key: str) -> bool:
    """Whether predictions with this model key run in int8 (the key ends in :data:`INT8`)."""
    return model_key.endswith(INT8)


def shown_name(ref: str, model_key: str) -> str:
    """The model's name as picture captions give it: ``name (int8)`` when it runs in int8."""
    return f"{ref} (int8)" if runs_int8(model_key) else ref


def upload_digest(upload) -> str:
    """SHA-256 of an upload, computed once per uploaded file."""
    memo = st.session_state.setdefault("_digests", {})
    if upload.file_id not in memo:
        memo[upload.file_id] = uploads.digest(upload.getvalue())
    return memo[upload.file_id]


# ---------------------------------------------------------------- sidebar


MODEL_HELP = "In brackets: the model's validation mean Dice (unetseg models lists them all)."


def model_label(ref: str, keys: dict[str, str]) -> str:
    """``name (0.887)``: short enough for the sidebar (``name · Dice 0.887`` was cut off for the longer names)."""
    metrics = cached_card(keys[ref]).get("metrics") or {}
    dice = metrics.get("mean_dice")
    return f"{ref} ({dice:.3f})" if isinstance(dice, float) else ref


def sidebar_models() -> dict[str, str]:
    """The models on offer: shipped ones and a checkpoint path from the sidebar; ``{ref: model_key}``.

    A checkpoint that cannot be used, for whatever reason, is one error line under the box and is left out;
    the rest of the page (and the upload) carries on.
    """
    refs = {name: model_key(name) for name in shipped_models()}
    path = st.sidebar.text_input("Checkpoint path (optional)", key="checkpoint_path",
                                 help="a .pt file or a run folder from `unetseg train`").strip()
    if path:
        try:
            key = model_key(path)
            cached_card(key)
            load_segmenter(key)  # builds the network (cached): a checkpoint that cannot run is reported here, once
            refs[path] = key
        except Exception as exc:  # a file the user names can be broken in any way; none of them may stop the page
            log.warning("checkpoint %s not used", path, exc_info=True)
            st.sidebar.error(checkpoint_problem(path, exc))
    return refs


def checkpoint_problem(path: str, exc: Exception) -> str:
    """One line naming the checkpoint, what is wrong with it and what to do."""
    fix = "give a .pt file or run folder written by `unetseg train` or `unetseg export`, or clear the box"
    if not isinstance(exc, UnetsegError):  # a failure the loaders do not know yet
        return public(f"Checkpoint not used: {path}: not a usable unetseg checkpoint ({type(exc).__name__}); {fix}")
    message = str(exc)  # the loaders' "<path>: <problem>[; <fix>]"
    return public(f"Checkpoint not used: {message}" if "; " in message else f"Checkpoint not used: {message}; {fix}")


def public(message: str, name: str = "the uploaded file") -> str:
    """``message`` on one line, with the server's temporary upload paths replaced by the upload's ``name``."""
    return " ".join(TEMP_PATH.sub(name, message).split())


def default_model(refs: dict[str, str], kind: str | None) -> str:
    """The model for a ``kind`` of input: the best shipped one made for it, else the first that suits, else the first.

    Checkpoints typed into the sidebar are never picked by default, only by hand.
    """
    shipped = set(shipped_models())
    best = best_model({ref: cached_card(key) for ref, key in refs.items() if ref in shipped}, kind)
    if best is not None:
        return best
    return next((ref for ref, key in refs.items() if suits(cached_card(key), kind)), next(iter(refs)))


def twin_of(ref: str) -> str:
    """The name of a model's ablation twin: ``x`` <-> ``x_noskip``."""
    return ref[: -len(NOSKIP)] if ref.endswith(NOSKIP) else f"{ref}{NOSKIP}"


def no_twin_note(ref: str, shipped: bool) -> str:
    what = "skip" if ref.endswith(NOSKIP) else "no-skip"
    which = f" (no {twin_of(ref)})" if shipped else ""
    return f"{ref} has no {what} twin shipped{which}; choose the second model below."


def int8_toggle(refs: dict[str, str], first: str) -> dict[str, str]:
    """The "Fast int8 inference" switch (on by default); returns ``refs`` with the key of every model that has an int8
    calibration set to run in int8 while it is on. The sidebar says what int8 costs the first model, measured."""
    record, why_not = int8_record(refs[first])
    fast = st.sidebar.checkbox("Fast int8 inference", value=True, key="int8", disabled=record is None,
                               help="Runs the network in 8-bit integers on the CPU: several times faster where the "
                               "CPU has int8 instructions (AVX-512 VNNI, AMX), not the same function as float32. "
                               "Calibrated by unetseg quantize; the figures below are its measurement.")
    if record is None:
        st.sidebar.caption(f"{first} runs in float32: {why_not}")
        return refs  # the switch is greyed out (its value stays), so no model runs in int8
    if fast:
        st.sidebar.caption(f"int8 {first}: validation Dice {record['mean_dice_int8']:.4f} (float32 "
                           f"{record['mean_dice_float32']:.4f}); labels equal to float32's on "
                           f"{record['label_agreement_mean']:.2%} of pixels ({record['cases']} images).")
    return {ref: key + INT8 if fast and int8_record(key)[0] is not None else key for ref, key in refs.items()}


def _picked_by_hand() -> None:
    st.session_state["_model_by_hand"] = True


def pick_models(refs: dict[str, str], kind: str | None, input_key: str | None) -> tuple[str, str | None]:
    """Model picker (and a second one in compare mode); a new input selects a model suited to it.

    Drawn in every run, with or without an input (``kind``, ``input_key`` None): Streamlit drops the state of a
    widget that a run does not draw, and the browser then shows it at its first option. Replacing an upload
    passes through a run with no file; a picker missing from it came back as ``dsb2018_2d`` (the first option),
    which the next rerun (e.g. a ground-truth upload) sent back as the user's choice.

    In compare mode the second model is the first one's twin (``x`` <-> ``x_noskip``), set afresh whenever
    the first model or the input changes; a model without a twin says so and gets the best other model
    for the input, which the user may change.
    """
    if input_key is not None and st.session_state.get("_models_for") != input_key:  # a new input
        st.session_state["_models_for"] = input_key
        current = st.session_state.get("model")
        # The user's own pick stays when it suits the input; a pick the viewer made (before any input, or for
        # another input) gives way to the best model for this one.
        if current not in refs or not st.session_state.get("_model_by_hand") or not suits(cached_card(refs[current]), kind):
            st.session_state["model"] = default_model(refs, kind)
            st.session_state["_model_by_hand"] = False
        st.session_state.pop("_pair_for", None)
    if st.session_state.get("model") not in refs:
        st.session_state["model"] = default_model(refs, kind)
        st.session_state["_model_by_hand"] = False
    options = list(refs)
    first = st.sidebar.selectbox("Model", options, key="model", format_func=lambda r: model_label(r, refs),
                                 help=MODEL_HELP, on_change=_picked_by_hand)
    if not st.sidebar.checkbox("Compare two models", key="compare"):
        return first, None
    twin = twin_of(first)
    if st.session_state.get("_pair_for") != first or st.session_state.get("model_b") not in refs:
        st.session_state["_pair_for"] = first
        others = {ref: key for ref, key in refs.items() if ref != first} or refs
        st.session_state["model_b"] = twin if twin in refs else default_model(others, kind)
    if twin not in refs:
        st.sidebar.info(no_twin_note(first, first in shipped_models()))
    second = st.sidebar.selectbox("Second model", options, key="model_b", format_func=lambda r: model_label(r, refs),
                                  help=MODEL_HELP)
    return first, second


# ---------------------------------------------------------------- inputs


def uploaders() -> tuple[Any, Any]:
    """The image and ground-truth upload widgets, drawn before anything that may fail (a widget not drawn in a
    run loses its file). A ground truth belongs to the image on show when it arrived: a new image starts with an
    empty ground-truth uploader, so another image's label is never scored against it."""
    left, right = st.columns(2)  # side by side: the first picture starts above the fold of a 1280 x 720 window
    upload = left.file_uploader(
        "Scan or image: NIfTI, DICOM, PNG, JPG, TIF",
        key="image_upload",
        help="NIfTI (.nii, .nii.gz), DICOM (one .dcm, or a .zip of one series), PNG, JPG, TIF, BMP. "
        f"Up to {uploads.max_upload_bytes() / 1e6:g} MB (set {uploads.MAX_UPLOAD_ENV} to change). "
        "Files are read in memory and never saved in the working directory.",
    )
    label_upload = right.file_uploader(
        "Ground truth (optional): label map or mask",
        key=label_widget_key(image_on_show(upload)),
        help="A NIfTI label map, a mask PNG/TIF, or a .zip of DSB mask PNGs (one per nucleus), "
        "for the image on the left; a new image starts with none.",
    )
    return upload, label_upload


def image_on_show(upload) -> tuple | None:
    """What identifies the image on show before it is read: the upload's file id, else the sample picked."""
    if upload is not None:
        return ("upload", upload.file_id)
    case = st.session_state.get("sample_case", NO_SAMPLE)
    return None if case == NO_SAMPLE else ("sample", st.session_state.get("sample_dataset"), case)


def label_widget_key(shown: tuple | None) -> str:
    """The ground-truth uploader's key: a fresh one (an empty uploader) when the image changed under its file.

    A file uploader cannot be emptied through ``st.session_state``; a new key is a new, empty widget. The file
    belongs to the image on show when it was first seen (a label dropped before any image goes with the next).
    """
    state = st.session_state
    generation = state.get("_label_generation", 0)
    key = "label_upload" if generation == 0 else f"label_upload_{generation}"
    label = state.get(key)
    owner = state.get("_label_owner")  # (file id, image it came with)
    if label is None:
        state.pop("_label_owner", None)
    elif owner is None or owner[0] != label.file_id or owner[1] is None:
        state["_label_owner"] = (label.file_id, shown)
    elif owner[1] != shown:
        state.pop("_label_owner")
        state["_label_generation"] = generation + 1
        key = f"label_upload_{generation + 1}"
    return key


def choose_input(upload, sample_refs: dict[str, list]) -> tuple[str, str, bytes, Any] | None:
    """The image to show: an upload, else a sample case. Returns ``(key, name, bytes, sample ref or None)``."""
    if upload is not None:
        return upload_digest(upload), upload.name, upload.getvalue(), None
    dataset = st.session_state.get("sample_dataset")
    case = st.session_state.get("sample_case", NO_SAMPLE)
    if dataset in sample_refs and case != NO_SAMPLE:
        ref = next((r for r in sample_refs[dataset] if r.case_id == case), None)
        if ref is not None:
            name, data = uploads.read_sample(ref)
            return f"sample:{ref.image}:{ref.image.stat().st_mtime_ns}", name, data, ref
    return None


def sidebar_samples(upload_on_show: bool) -> dict[str, list]:
    """The sample-case pickers; greyed out, with a note, while an upload is on show (they do not apply to it)."""
    root = st.sidebar.text_input("Data root (sample cases)", value=str(default_data_root()), key="data_root").strip()
    try:
        found = samples(root)
    except UnetsegError as exc:
        st.sidebar.error(str(exc))
        return {}
    if not found:
        st.sidebar.caption(f"No sample cases under {root or '(empty)'}.")
        return {}
    dataset = st.sidebar.selectbox("Sample data set", list(found), key="sample_dataset", disabled=upload_on_show)
    st.sidebar.selectbox("Sample case (used when nothing is uploaded)", [NO_SAMPLE] + [r.case_id for r in found[dataset]],
                         key="sample_case", disabled=upload_on_show)
    if upload_on_show:
        st.sidebar.caption(UPLOAD_SHOWN)
    return found


# ---------------------------------------------------------------- views


@dataclass
class Input:
    """The image on show: cache key, file name, array ``(C, *S)``, metadata, and the sample it came from."""

    key: str
    name: str
    image: np.ndarray
    meta: ImageMeta
    sample: Any = None

    @property
    def volume(self) -> bool:
        return self.image.ndim == 4


@dataclass
class View:
    """Where we look and how: plane and slice of a volume, the windowed picture, the overlay opacity."""

    source: Input
    plane: str | None
    index: int
    base: np.ndarray  # windowed uint8 picture (H, W) or (H, W, 3)
    aspect: tuple[float, float]
    opacity: float
    letters: dict[str, str] | None = None  # orientation markers at the picture's edges (volumes)
    box: tuple[slice, slice] = (slice(None), slice(None))  # the zoomed part of the picture (``base`` is cut to it)

    @property
    def where(self) -> str:
        return f"{self.plane} slice {self.index}" if self.plane else "image"

    @cached_property
    def input_png(self) -> bytes:
        """The input picture as shown, encoded once per run: it appears first alone, then beside the overlay
        (for a 1040 x 1388 image an encoding costs 0.1-0.3 s)."""
        return encoded(display.to_rgb(self.base), self)

    def cut(self, array: np.ndarray) -> np.ndarray:
        """The picture of a label map ``array (*S)`` in this view: its slice, zoomed."""
        if self.plane:
            array = display.plane_slice(display.to_ras(array, self.source.meta.affine), self.plane, self.index)
        return array[self.box]


def view_controls(source: Input, opacity: float) -> View:
    """Plane, slice and window/level widgets (reset to defaults when a new input arrives) -> a :class:`View`."""
    image = display.to_ras(source.image, source.meta.affine) if source.volume else source.image
    lo, span = float(image.min()), max(float(image.max() - image.min()), 1e-6)
    step = span / 200
    # Streamlit drops a widget's state in runs that do not draw it (e.g. after a bad file), hence the key checks.
    defaults_kept = {"level", "width", "plane", "zoom"} <= st.session_state.keys()
    if st.session_state.get("_view_for") != source.key or not defaults_kept:
        st.session_state["_view_for"] = source.key
        level, width = display.default_window(image)
        st.session_state["level"], st.session_state["width"] = level, min(max(width, step), 2 * span)
        st.session_state["plane"] = "axial"
        st.session_state["_slice_for"] = None
        st.session_state["zoom"], st.session_state["zoom_across"], st.session_state["zoom_down"] = 1, 50, 50
    plane, index, aspect = None, 0, (1.0, 1.0)
    if source.volume:
        cols = st.columns([2, 3])
        plane = cols[0].radio("Plane", display.PLANES, key="plane", horizontal=True)
        n = display.num_slices(image.shape, plane)
        if st.session_state.get("_slice_for") != (source.key, plane) or "slice" not in st.session_state:
            st.session_state["_slice_for"] = (source.key, plane)
            st.session_state["slice"] = n // 2
        if n > 1:
            index = cols[1].slider("Slice", 0, n - 1, key="slice")
        else:
            cols[1].caption(f"The {plane} plane has a single slice.")
        aspect = display.pixel_aspect(display.ras_spacing(source.meta.spacing, source.meta.affine), plane)
    with st.sidebar.expander("Window / level (intensity)"):
        level = st.slider("Level", lo, lo + span, key="level", step=step)
        width = st.slider("Width", step, 2 * span, key="width", step=step)
    picture = display.plane_slice(image, plane, index) if plane else image
    base = display.apply_window(display.channels_last(picture), level, width)
    letters = display.edge_letters(source.meta.affine, source.image.shape[1:], plane) if plane else None
    box = zoom_controls(base.shape)
    return View(source, plane, index, base[box], aspect, opacity, letters, box)


def zoom_controls(shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Zoom (and where to) in the sidebar: a large image is shown a few hundred pixels wide, so its detail needs it."""
    zoom = st.sidebar.select_slider("Zoom", [1, 2, 4, 8, 16], key="zoom", format_func=lambda z: f"{z}x",
                                    help=f"The picture is {shape[1]} x {shape[0]} pixels; zoom in to see them.")
    if zoom == 1:
        return slice(None), slice(None)
    across = st.sidebar.slider("Zoom centre, left to right (%)", 0, 100, key="zoom_across")
    down = st.sidebar.slider("Zoom centre, top to bottom (%)", 0, 100, key="zoom_down")
    return display.zoom_box(shape, zoom, (down / 100, across / 100))


def show_panels(panels: list[tuple[np.ndarray | bytes, str]], view: View, first_row: list) -> None:
    """Pictures side by side, three to a row, enlarged (nearest neighbour) to a readable size.

    The first row goes into ``first_row``'s placeholders (which may hold a preview).
    """
    for i, (picture, caption) in enumerate(panels):
        if i % 3 == 0:
            slots = first_row if i == 0 else [col.empty() for col in st.columns(3)]
        show(slots[i % 3], picture, caption, view)


def show(slot, picture: np.ndarray | bytes, caption: str, view: View) -> None:
    """``picture`` (RGB ``(H, W, 3)``, or already :func:`encoded`) in ``slot`` with its caption."""
    data = picture if isinstance(picture, bytes) else encoded(picture, view)
    # output_format: Streamlit's "auto" re-encodes an RGB PNG as JPEG (quality 90), blurring the label edges. Pictures
    # wider than 1460 px are still shrunk (bilinear) and re-encoded by Streamlit: zoom shows their pixels.
    slot.image(data, caption=caption, width="stretch", output_format="PNG")


def encoded(picture: np.ndarray, view: View) -> bytes:
    """``picture (H, W, 3)`` enlarged to a readable size, its edges marked with the view's orientation, as PNG."""
    picture = display.upscale(picture, target=420, aspect=view.aspect)
    if view.letters:
        picture = display.mark_edges(picture, view.letters)
    return png(picture)


def png(picture: np.ndarray) -> bytes:
    """Lossless (label edges stay crisp) and fast: zlib level 1 encodes a 1040 x 1388 overlay 3x faster than the default."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def legend_html(class_names: tuple[str, ...]) -> str:
    """The colour legend as HTML. Class names come from a checkpoint (any file a user names): escaped."""
    swatch = '<span style="display:inline-block;width:0.9em;height:0.9em;background:{};margin:0 0.3em 0 1em"></span>{}'
    return "Legend:" + "".join(
        swatch.format(html.escape(color, quote=True), html.escape(name, quote=True))
        for name, color in display.legend(class_names)
    )


# ---------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="unetseg viewer", layout="wide")
    st.sidebar.title("unetseg viewer")  # in the sidebar: the page's height goes to the pictures
    freeze_imported_heap()
    try:
        page()
    except UnetsegError as exc:  # user-caused: one line, no traceback
        st.error(public(str(exc)))
    except Exception as exc:  # a bug: still no traceback in the page; the server log has it
        log.exception("viewer failed")
        st.error(public(f"Something went wrong ({type(exc).__name__}: {exc}). "
                        "The app keeps running; try another file or model."))


def page() -> None:
    upload, label_upload = uploaders()
    refs = sidebar_models()
    sample_refs = sidebar_samples(upload is not None)
    chosen = choose_input(upload, sample_refs)
    if not refs:
        st.error("No models found: no shipped models are installed; give a checkpoint path in the sidebar.")
        return
    source, problem = read_input(chosen)
    # The sidebar's widgets come before every early return below: a run that does not draw them drops their state.
    first, second = pick_models(refs, source.meta.kind if source else None, source.key if source else None)
    refs = int8_toggle(refs, first)
    opacity = st.sidebar.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="opacity")
    uncertainty = st.sidebar.checkbox("Uncertainty (flip test-time augmentation)", key="uncertainty")
    if problem:
        st.error(problem)
        return
    if source is None:
        st.info("Upload a scan or image, or pick a sample case in the sidebar.")
        return
    key, name, image, meta, sample = source.key, source.name, source.image, source.meta, source.sample
    spacing = f", spacing {' x '.join(f'{s:g}' for s in meta.spacing)} mm" if source.volume else ""
    what = ("DICOM " if meta.file_format == "dicom" else "") + WHAT[meta.kind]
    st.caption(f"{'Sample' if sample else 'Upload'}: **{name}** - {what} of shape {image.shape[1:]}{spacing}")

    seg = load_segmenter(refs[first])
    if not model_runs_on(seg, first, meta.kind):
        return
    view = view_controls(source, opacity)
    legend = st.empty()
    first_row = [col.empty() for col in st.columns(3)]
    labels = first_prediction(source, shown_name(first, refs[first]), refs[first], view, first_row[0])
    truth = ground_truth(label_upload, sample, image.shape[1:], seg.num_classes)
    legend.markdown(legend_html(seg.class_names), unsafe_allow_html=True)

    panels = [(display.overlay(view.base, view.cut(labels), seg.num_classes, opacity),
               f"{shown_name(first, refs[first])}: {view.where}")]
    if second is not None:
        panels += compare_panels(second, refs, source, labels, view)
    if truth is not None:
        errors = display.error_overlay(view.base, view.cut(labels), view.cut(truth), opacity=max(opacity, 0.3))
        panels.append((errors, f"errors of {shown_name(first, refs[first])}: {display.ERROR_KEY}"))
    if uncertainty:
        vote = flip_disagreement(key, refs[first], image)
        share = float((vote > 0).mean())
        panels.append((display.heat_overlay(view.base, view.cut(vote)),
                       f"uncertainty of {shown_name(first, refs[first])}: flip-TTA members disagree on {share:.2%} "
                       f"of the {WHAT[meta.kind]}"))
    if len(panels) == 1:
        panels.append((view.input_png, f"input: {view.where}"))
    show_panels(panels, view, first_row)

    if truth is not None:
        ground_truth_metrics(source, refs[first], label_key(label_upload, sample), labels, truth, seg)
    sizes(labels, seg, source)
    if not source.volume and seg.num_classes == 2:  # one foreground class in a 2D image: count its objects
        objects(key, refs[first], labels, seg.class_names[1], name)
    download(key, refs[first], seg.num_classes, labels, meta)
    model_details(refs)


def first_prediction(source: Input, name: str, model_ref_key: str, view: View, slot) -> np.ndarray:
    """The label map of ``source`` by the model (``name`` as captions give it); the first time, the input shows in
    ``slot`` straight away and the overlay replaces it when the model is done."""
    done = st.session_state.setdefault("_predicted", set())
    if (source.key, model_ref_key) not in done:
        show(slot, view.input_png, f"input: {view.where} (segmenting with {name} ...)", view)
    labels = predict(source.key, model_ref_key, source.image)
    done.add((source.key, model_ref_key))
    return labels


def read_input(chosen: tuple[str, str, bytes, Any] | None) -> tuple[Input | None, str | None]:
    """The chosen file read (cached): ``(Input, None)``, ``(None, one-line error)`` or ``(None, None)`` if none."""
    if chosen is None:
        return None, None
    key, name, data, sample = chosen
    try:
        uploads.check_bytes(name, data)  # before the cache: the size limit holds for files read earlier too
        image, meta = decode_upload(key, name, data)
    except DataError as exc:
        return None, public(str(exc), name)
    return Input(key, name, image, meta, sample), None


def model_runs_on(seg: Segmenter, ref: str, kind: str) -> bool:
    """Warn about a mismatched model; False when it cannot run on this input at all."""
    try:
        seg.check_compatible(kind, ref)
    except DataError as exc:
        st.warning(f"{exc} - pick another model in the sidebar.")
        return False
    warning = seg.mismatch_warning(kind)
    if warning:
        st.warning(f"{ref}: {warning}.")
    return True


def compare_panels(second: str, refs: dict[str, str], source: Input, labels: np.ndarray, view: View) -> list:
    """The second model's overlay and the map of where the two models disagree."""
    seg_b = load_segmenter(refs[second])
    if not model_runs_on(seg_b, second, source.meta.kind):
        return []
    labels_b = predict(source.key, refs[second], source.image)
    differ = display.disagreement(labels, labels_b)
    here = display.disagreement(view.cut(labels), view.cut(labels_b))
    return [
        (display.overlay(view.base, view.cut(labels_b), seg_b.num_classes, view.opacity),
         f"{shown_name(second, refs[second])}: {view.where}"),
        (display.blend(display.to_rgb(view.base), here, display.DISAGREEMENT, 0.8),
         f"disagreement (green): {int(here.sum())} here, {int(differ.sum())} in all ({float(differ.mean()):.2%})"),
    ]


def label_key(label_upload, sample) -> str:
    if label_upload is not None:
        return upload_digest(label_upload)
    return f"sample:{sample.label}" if sample is not None else ""


def ground_truth(label_upload, sample, image_shape, num_classes) -> np.ndarray | None:
    """The uploaded ground truth (or the sample's own label), or None; a bad file shows an error."""
    try:
        if label_upload is not None:
            uploads.check_bytes(label_upload.name, label_upload.getvalue())
            return decode_label(upload_digest(label_upload), label_upload.name, label_upload.getvalue(),
                                tuple(image_shape), num_classes)
        if sample is not None and sample.label is not None:
            return read_sample_label(str(sample.label), tuple(image_shape), num_classes)
    except DataError as exc:
        st.error(public(f"Ground truth not used: {exc}", label_upload.name if label_upload is not None else "the label"))
    return None


def ground_truth_metrics(source: Input, model_ref_key: str, truth_key: str, labels, truth, seg: Segmenter) -> None:
    """Dice and HD95 per class, the numbers ``unetseg evaluate`` reports for this case."""
    row = scores(source.key, model_ref_key, truth_key, labels, truth, seg.class_names, tuple(source.meta.spacing))
    unit = "mm" if source.volume else "px"
    names = seg.class_names[1:]
    st.subheader("Against the ground truth")
    cols = st.columns([1, 3])
    cols[0].metric("Mean foreground Dice", f"{summarize([row], seg.class_names)['mean_dice']:.4f}")
    cols[1].table(pd.DataFrame([{"class": n, "Dice": row[f"dice_{n}"], f"HD95 ({unit})": row[f"hd95_{n}"]} for n in names]))


def sizes(labels: np.ndarray, seg: Segmenter, source: Input) -> None:
    st.subheader("Predicted size per class")
    rows = display.class_sizes(labels, seg.class_names, source.meta.affine if source.volume else None)
    names = {"voxels": "voxels", "volume_mm3": "volume (mm³)", "pixels": "area (pixels)"}
    st.table(pd.DataFrame(rows).rename(columns=names).style.format({"volume (mm³)": "{:,.1f}"}))


@st.cache_data(max_entries=8, show_spinner="Counting objects ...")
def object_rows(key: str, model_key: str, _labels: np.ndarray) -> list[dict[str, Any]]:
    """One row per object of the predicted foreground, split as ``unetseg evaluate`` splits nuclei."""
    return instance_table(split_instances(_labels == 1))


def objects(key: str, model_ref_key: str, labels: np.ndarray, class_name: str, name: str) -> None:
    """The number of objects (nuclei) in the predicted foreground and a table of their areas, also as CSV."""
    rows = object_rows(key, model_ref_key, labels)
    what = "nuclei" if class_name == "nucleus" else f"{class_name} objects"
    st.subheader(f"Predicted {what}")
    cols = st.columns([1, 3])
    cols[0].metric(f"Number of {what}", len(rows),
                   help="Touching objects split by a watershed on the distance transform (unetseg.instances), "
                   "as unetseg evaluate counts them")
    if not rows:
        return
    table = pd.DataFrame(rows).rename(columns={"label": class_name})
    area = table["area_px"]
    cols[0].caption(f"area (pixels): median {area.median():g}, range {area.min()}-{area.max()}")
    cols[1].dataframe(table, hide_index=True, height=240)
    cols[0].download_button(f"Download the table ({Path(name).stem}_{what.replace(' ', '_')}.csv)",
                            table.to_csv(index=False), file_name=f"{Path(name).stem}_{what.replace(' ', '_')}.csv",
                            mime="text/csv", key="objects_csv")


@st.cache_data(max_entries=8, show_spinner=False)
def download_file(key: str, model_key: str, num_classes: int, file_name: str, _labels: np.ndarray,
                  _meta: ImageMeta) -> tuple[str, bytes, str]:
    """The prediction as a file, cached by every input: upload digest, model, classes and the upload's file name
    (the name becomes the download's name; keyed without it, another user's upload of the same bytes would be
    offered a file named after this one)."""
    return uploads.prediction_download(_labels, _meta, num_classes)


def download(key: str, model_key: str, num_classes: int, labels: np.ndarray, meta: ImageMeta) -> None:
    name, data, mime = download_file(key, model_key, num_classes, meta.path.name, labels, meta)
    st.download_button(f"Download the predicted mask ({name})", data, file_name=name, mime=mime, key="download")


def model_details(refs: dict[str, str]) -> None:
    with st.expander("Models and their validation metrics (unetseg evaluate on each model's validation split)"):
        rows = []
        for ref, key in refs.items():
            card = cached_card(key)
            metrics = card.get("metrics") or {}
            row = {"model": ref, "trained on": card["dataset"], "long skips": card["skips"],
                   "val cases": metrics.get("num_cases"), "mean Dice": metrics.get("mean_dice")}
            for cls, entry in (metrics.get("classes") or {}).items():
                row[f"Dice {cls}"] = entry.get("dice_mean")
                row[f"HD95 {cls}"] = entry.get("hd95_mean")
            rows.append(row)
        st.table(pd.DataFrame(rows))


if __name__ == "__main__":
    main()

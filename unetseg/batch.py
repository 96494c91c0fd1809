"""Predict a list of files with reading and writing overlapped with the network (what ``unetseg predict`` runs).

A small thread pool reads the next files ahead and writes each prediction
while the network runs on the next, so the forward passes do not wait for the
disk; the ``input -> prediction`` lines still come in input order. One
unreadable file is reported and counted, and the batch goes on.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from unetseg.data.io import ImageMeta, file_kind, read_image
from unetseg.data.preprocess import NonFiniteWarning
from unetseg.errors import DataError, UnetsegError
from unetseg.infer import Predictor
from unetseg.outputs import write_dicom_seg, write_label_descriptions, write_outputs
from unetseg.progress import progress_bar

READ_AHEAD = 2  # files read ahead of the network (bounds the memory held)
UNITS = {"image2d": "images", "nifti": "volumes"}  # what the throughput line counts, by file kind


@dataclass(frozen=True)
class BatchOptions:
    """What ``unetseg predict`` does with each file.

    Args:
        out: folder the predictions go to.
        model_name: the model's name, written into DICOM-SEG files.
        tta: flip test-time augmentation.
        largest_component: keep only each class's largest connected component.
        save_probabilities: also write the class probabilities.
        dicom_seg: also write a DICOM-SEG for each DICOM source.
        quiet: no progress bar and no throughput line.
    """

    out: Path
    model_name: str
    tta: bool = False
    largest_component: bool = False
    save_probabilities: bool = False
    dicom_seg: bool = False
    quiet: bool = False


def report_warnings(path: Path, caught: list, category: type[Warning]) -> None:
    """Warnings of ``category`` as one ``warning: PATH: ...`` line each (a repeat once); others as Python shows them."""
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, category)):
        tqdm.write(f"warning: {path}: {message}", file=sys.stderr)
    for w in caught:
        if not issubclass(w.category, category):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


class BatchPrediction:
    """One ``predict`` over ``sources``: :meth:`run` segments them all, then raises if any could not be."""

    def __init__(self, segmenter: Predictor, sources: Sequence[Path], options: BatchOptions) -> None:
        self.segmenter = segmenter
        self.sources = list(sources)
        self.options = options
        self.failed: list[Path] = []
        self.done: list[str] = []  # the kind of each file written
        self.writes: deque[tuple[Path, str, Future]] = deque()
        self.warned: set[str] = set()

    def run(self) -> None:
        """Segment every source (a single unreadable source raises its own error); print the throughput."""
        start = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="unetseg-io")
        try:
            reads = {i: pool.submit(read_image, self.sources[i]) for i in range(min(READ_AHEAD, len(self.sources)))}
            for i, path in enumerate(progress_bar(self.sources, enabled=not self.options.quiet, desc="predicting", unit="file")):
                if i + READ_AHEAD < len(self.sources):
                    reads[i + READ_AHEAD] = pool.submit(read_image, self.sources[i + READ_AHEAD])
                self._report_writes(wait=False)
                self._segment(path, reads.pop(i), pool)
            self._report_writes(wait=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if "nifti" in self.done:  # class names and colours for ITK-SNAP and 3D Slicer, beside the NIfTI label maps
                write_label_descriptions(self.options.out, self.segmenter.class_names)
        self._finish(time.perf_counter() - start)

    def _segment(self, path: Path, read: Future, pool: ThreadPoolExecutor) -> None:
        """Predict one read file and hand its writing to ``pool``; a :class:`DataError` is reported and counted."""
        kind = file_kind(path)
        warning = self.segmenter.mismatch_warning("nifti" if kind == "dicom" else kind)  # DICOM: read as a volume
        if warning and kind not in self.warned:
            self.warned.add(kind)
            tqdm.write(f"warning: {path}: {warning}", file=sys.stderr)
        try:
            image, meta = read.result()
            self.segmenter.check_compatible(meta.kind, path)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NonFiniteWarning)
                probabilities = self.segmenter.predict_proba(image, tta=self.options.tta, channel_axis=0)
            labels = self.segmenter.labels(probabilities, self.options.largest_component)
        except DataError as exc:  # one unreadable file does not stop a batch; it is reported and counted
            if len(self.sources) == 1:
                raise
            self.failed.append(path)
            tqdm.write(f"error: {exc}", file=sys.stderr)
            return
        report_warnings(path, caught, NonFiniteWarning)
        written = pool.submit(self._write, labels, meta, probabilities if self.options.save_probabilities else None,
                              self.options.dicom_seg and kind == "dicom")
        self.writes.append((path, meta.kind, written))

    def _write(self, labels: np.ndarray, meta: ImageMeta, probabilities: np.ndarray | None, dicom_seg: bool) -> str:
        """Write one prediction (and its DICOM-SEG); returns what was written, for the ``input -> output`` line."""
        names, out = self.segmenter.class_names, self.options.out
        written = str(write_outputs(labels, meta, out, names, probabilities))
        if dicom_seg:
            written += f", {write_dicom_seg(labels, meta, out, names, self.options.model_name)}"
        return written

    def _report_writes(self, wait: bool) -> None:
        """Print the finished writes in input order (with ``wait``: all of them, waiting for each)."""
        while self.writes and (wait or self.writes[0][2].done()):
            path, kind, future = self.writes.popleft()
            try:
                tqdm.write(f"{path} -> {future.result()}")  # a failed write raises here: the batch stops
            except DataError as exc:  # no DICOM-SEG for this source (its label map is written): report, go on
                self.failed.append(path)
                tqdm.write(f"error: {exc}", file=sys.stderr)
            self.done.append(kind)

    def _finish(self, seconds: float) -> None:
        """The throughput line, and one error naming every file that could not be segmented."""
        if self.done and not self.options.quiet:
            unit = UNITS.get(self.done[0], "files") if len(set(self.done)) == 1 else "files"
            print(f"segmented {len(self.done)} {unit} in {seconds:.1f} s: {len(self.done) / seconds:.2f} {unit}/s")
        if self.failed:
            raise UnetsegError(f"{len(self.failed)} of {len(self.sources)} files could not be segmented (see the errors "
                               "above): " + ", ".join(map(str, self.failed)))

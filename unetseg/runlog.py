"""The JSON files unetseg writes (run logs, metrics, summaries): strict JSON, written atomically, read back tolerantly.

Strict means what jq, JavaScript and dashboards accept: an undefined value
(NaN, e.g. HD95 of a class absent from both masks, or an infinite distance) is
written as ``null``, never as ``NaN`` or ``Infinity``. NumPy scalars and arrays
become plain numbers and lists.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.errors import UnetsegError


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and NumPy types made plain (nested dicts and lists)."""
    if isinstance(value, Mapping):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [strict(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_float(value: float | None) -> float:
    """A number read back from strict JSON: ``null`` (undefined) -> NaN, for NumPy's nan-aware statistics."""
    return float("nan") if value is None else float(value)


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (see :func:`strict`)."""
    return json.dumps(strict(value), indent=indent, allow_nan=False)


@contextlib.contextmanager
def staged_file(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A new temporary file beside ``path`` (``.<name>.<random>``) for the block to write, renamed to ``path``
    (with permissions ``mode``) when the block succeeds and removed when it fails: a kill or an error leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`staged_file`."""
    with staged_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Strict JSON of ``value``, written atomically."""
    write_text_atomic(path, dumps(value, indent) + "\n")


def append_jsonl(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one strict JSON line (a row of a run log)."""
    with Path(path).open("a") as f:
        f.write(dumps(row) + "\n")


def write_jsonl(path: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file with ``rows``, atomically."""
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def read_epoch_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl`` or ``gradients.jsonl`` with ``epoch`` counted from 1, as the console counts
    (see :func:`read_jsonl`). Logs written before epochs were counted from 1 start at epoch 0; their epochs are
    shifted by one, so old and new run folders read alike."""
    rows = read_jsonl(path)
    if rows and rows[0].get("epoch") == 0:
        rows = [{**r, "epoch": r["epoch"] + 1} if "epoch" in r else r for r in rows]
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (an empty list when it does not exist).

    A partial last line (a write cut short by a kill or a full disk) is
    dropped; a broken line before the last raises :class:`UnetsegError` naming
    the file and line. Files written before the logs were strict may hold
    ``NaN``; it is read as a float NaN.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UnetsegError(f"{path}: line {number} is not valid JSON; delete that line (or the run folder) "
                               "and run again") from None
    return rows

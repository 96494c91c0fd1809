"""A disk cache for decoded data that is slow to read: a DSB2018 case's ``masks/`` folder holds one PNG per
nucleus (29,461 PNGs for the 670 stage-1 cases), so decoding them took most of the 26-40 s a DSB run spent
loading at every start, resume included.

Entries live in ``$UNETSEG_CACHE_DIR`` (default ``~/.cache/unetseg``; ``off`` switches the cache off), one
compressed ``.npz`` per entry, named by a hash of what it was decoded from: each source file's path, size and
modification time. A changed, added or removed source file gives a new name, so a stale entry is never read;
an unreadable entry is decoded again and rewritten; entries are written atomically (a killed run leaves none
half-written), and a cache folder that cannot be written is simply not used.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from unetseg.runlog import staged_file

CACHE_ENV = "UNETSEG_CACHE_DIR"


def cache_dir() -> Path | None:
    """``$UNETSEG_CACHE_DIR``, or ``~/.cache/unetseg`` when unset; None when it says ``off`` (or is empty)."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "unetseg"
    return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value)


def fingerprint(kind: str, sources: Sequence[Path]) -> str:
    """A name for what ``sources`` decode to: the hash of ``kind`` and each file's absolute path, size and
    modification time (nanoseconds)."""
    digest = hashlib.sha256(kind.encode())
    for path in sources:
        stat = path.stat()
        digest.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def cached_array(kind: str, sources: Sequence[Path], decode: Callable[[], np.ndarray]) -> np.ndarray:
    """``decode()``'s array, read from the cache when ``sources`` are unchanged since it was stored there.

    Args:
        kind: what the array is (a folder name in the cache, and part of the key), e.g. ``"dsb_instances"``.
        sources: the files ``decode`` reads.
        decode: computes the array (uint8/uint16/int32 label maps compress to a few kB).
    """
    root = cache_dir()
    if root is None:
        return decode()
    path = root / kind / f"{fingerprint(kind, sources)}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return stored["array"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or damaged: decode again
        pass
    array = decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, array=array)
    except OSError:  # a read-only or full disk: run without the cache
        pass
    return array

"""Progress bars that read well on a terminal and in a log file.

On a terminal, bars are tqdm's. Written to a file or a CI log (stderr is not a
terminal), a bar opened while another is open is not drawn: tqdm places nested
bars with cursor-up escape codes, which a log shows as ``^[[A`` junk; and the
bars that are drawn refresh at most every :data:`LOG_INTERVAL_S` seconds
instead of ten times a second. ``tqdm.write`` lines (a finished run, a warning)
are unaffected.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown when ``enabled`` and (off a terminal) no other bar is open.

    Args:
        iterable: what to iterate over (None: update the bar by hand, with ``total=``).
        enabled: False draws nothing (``--quiet``, other ranks of a distributed run).
        kwargs: tqdm's arguments (``desc``, ``unit``, ``total``, ``leave``, ...).
    """
    if not _on_terminal():
        enabled = enabled and not any(not bar.disable for bar in list(tqdm._instances))  # noqa: SLF001
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, disable=not enabled, **kwargs)

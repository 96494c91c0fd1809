"""User-facing errors: one line that names the file or argument and what to do.

The command line prints ``error: <message>`` for these and exits with status 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UnetsegError(Exception):
    """An error caused by the user's input or environment, with a fix in its message."""


class DataError(UnetsegError):
    """A data file or folder that cannot be used, named in the message."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")

"""Where a network runs: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a :class:`torch.device`.

Training and inference both take a device name from the user; this is the one
place that turns it into a device (torch only, so any layer may use it).
"""

from __future__ import annotations

import torch

from unetseg.errors import UnetsegError


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnetsegError(f"device {device!r}: no CUDA device is available; use cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UnetsegError(f"device {device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None

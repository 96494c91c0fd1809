"""The Chromium that the browser test and the viewer benchmark drive with Playwright: found, or installed on Debian.

Playwright's own browser download does not work on every machine (it fails
without internet), so both use a system Chromium:

1. ``$UNETSEG_CHROMIUM``, when set, is the browser to use (any Chromium or
   Chrome executable);
2. else the first of ``chromium``, ``chromium-browser``, ``google-chrome``,
   ``google-chrome-stable`` on the ``PATH``;
3. else, on Debian or Ubuntu as root, Debian's ``chromium`` package is
   installed with ``apt-get`` (about 100 MB, a minute or two), saying so first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CHROMIUM_ENV = "UNETSEG_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless, and quiet on a closed network (no background requests that the machine refuses).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    """The browser named by ``$UNETSEG_CHROMIUM`` (which must exist), else the first candidate on the PATH, else None."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        path = shutil.which(named)
        if path is None:
            raise RuntimeError(f"${CHROMIUM_ENV}={named!r} is not an executable; point it at a Chromium or Chrome binary")
        return path
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def install_chromium() -> str | None:
    """Install Debian's ``chromium`` with apt-get (root only); the installed browser's path, or None when not possible."""
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    print(f"no Chromium found: installing Debian's chromium with apt-get (set ${CHROMIUM_ENV} to use another browser)",
          file=sys.stderr, flush=True)
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).returncode != 0:
            return None
    return find_chromium()


def chromium(install: bool = True) -> str:
    """A Chromium executable: found, else (``install``) installed; raises RuntimeError saying how to get one."""
    path = find_chromium() or (install_chromium() if install else None)
    if path is None:
        raise RuntimeError(
            f"no Chromium found (tried ${CHROMIUM_ENV}, {', '.join(CANDIDATES)}) and it could not be installed here; "
            f"install one (Debian: apt-get update && apt-get install -y chromium) or set ${CHROMIUM_ENV}=/path/to/chrome"
        )
    return path

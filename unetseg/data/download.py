"""Download the original public archives with MONAI's download helpers."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from unetseg.data.datasets import DATA_ROOT_ENV, DATASETS
from unetseg.errors import UnetsegError


@dataclass(frozen=True)
class Archive:
    """An original archive: where it lives, its checksum, and the folder it extracts to."""

    url: str
    filename: str
    md5: str | None
    extracts_to: str  # folder name under the root after extraction
    extract_into_subfolder: bool = False  # archive holds bare case folders (DSB zip)


ARCHIVES: dict[str, Archive] = {
    # The MSD archive MONAI's DecathlonDataset uses (same URL and MD5 as monai.apps.DecathlonDataset).
    "hippocampus": Archive(
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar",
        filename="Task04_Hippocampus.tar",
        md5="9d24dba78a72977dbd1d2e110310f31b",
        extracts_to="Task04_Hippocampus",
    ),
    # BBBC038v1 stage-1 training set as published by the Broad Bioimage Benchmark Collection.
    # No checksum is published for it; the extracted layout is checked instead.
    "dsb2018": Archive(
        url="https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip",
        filename="stage1_train.zip",
        md5=None,
        extracts_to="dsb2018_stage1_train",
        extract_into_subfolder=True,
    ),
}


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`UnetsegError` within ``timeout_s`` when the archive's host cannot be reached."""
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        raise UnetsegError(
            f"cannot reach {host} (no internet?); copy the data set by hand and point at it "
            f"with --data-root DIR or {DATA_ROOT_ENV}=DIR"
        ) from None


def download(name: str, root: str | Path) -> Path:
    """Download, verify (MD5 where published) and extract a data set under ``root``.

    Returns the extracted data set folder. Already-present data is left alone.
    """
    if name not in ARCHIVES:
        raise UnetsegError(f"unknown dataset {name!r}; downloadable: {', '.join(ARCHIVES)}")
    archive = ARCHIVES[name]
    root = Path(root)
    target = root / archive.extracts_to
    if target.is_dir() and any(target.iterdir()):
        return target
    check_reachable(archive.url)
    from monai.apps import download_and_extract

    root.mkdir(parents=True, exist_ok=True)
    download_and_extract(
        url=archive.url,
        filepath=root / archive.filename,
        output_dir=target if archive.extract_into_subfolder else root,
        hash_val=archive.md5,
        hash_type="md5",
        progress=True,
    )
    if DATASETS[name].layout == "msd" and not (target / "dataset.json").is_file():
        raise UnetsegError(f"{target}: extraction did not produce dataset.json; delete {root / archive.filename} and retry")
    return target

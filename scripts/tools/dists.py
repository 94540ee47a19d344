"""Released sentence-transformers distributions, downloaded once into a cache and unpacked on demand.

The series are generated from, and tested against, the exact files users install: the sdist for
source trees and forks, the wheel for site-packages. Downloads go through pip (so its index and
proxy configuration apply) into ``$ST_PATCH_CACHE`` (default ``~/.cache/st-matryoshka-cache``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PROJECT = "sentence-transformers"


def cache_dir() -> Path:
    root = Path(os.environ.get("ST_PATCH_CACHE", Path.home() / ".cache" / "st-matryoshka-cache"))
    return root / "dist"


def _find(directory: Path, version: str, suffix: str) -> Path | None:
    for name in (f"sentence_transformers-{version}", f"sentence-transformers-{version}"):
        for path in directory.glob(f"{name}{suffix}"):
            return path
    return None


def download(version: str, kind: str) -> Path:
    """Path of the cached ``kind`` ("sdist" or "wheel") of ``version``, downloading it if needed."""
    if kind not in ("sdist", "wheel"):
        raise ValueError(f"kind must be 'sdist' or 'wheel', not {kind!r}")
    directory = cache_dir() / kind
    suffix = ".tar.gz" if kind == "sdist" else "-py3-none-any.whl"
    found = _find(directory, version, suffix)
    if found:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            *binary,
            f"{PROJECT}=={version}",
            "-d",
            str(directory),
        ],
        check=True,
    )
    found = _find(directory, version, suffix)
    if not found:
        raise FileNotFoundError(f"pip downloaded no {kind} of {PROJECT}=={version} into {directory}")
    return found


def sdist_tree(version: str, dest: Path | None = None) -> Path:
    """A fresh unpacked copy of the release's sdist; returns the tree root (holds ``sentence_transformers/``)."""
    archive = download(version, "sdist")
    dest = Path(dest or tempfile.mkdtemp(prefix=f"st-sdist-{version}-"))
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) else tar.extractall(dest)
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    return root


def wheel_tree(version: str, dest: Path | None = None) -> Path:
    """A fresh unpacked copy of the release's wheel, laid out like site-packages."""
    archive = download(version, "wheel")
    dest = Path(dest or tempfile.mkdtemp(prefix=f"st-wheel-{version}-"))
    with zipfile.ZipFile(archive) as wheel:
        wheel.extractall(dest)
    return dest

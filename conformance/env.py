"""Which sentence-transformers release and state is under test - without importing it.

Why separate from compat.py: importing sentence_transformers costs ~8 s of CPU. Under pytest-xdist the
controller process only reports (header, JSON summary, registry summary) and never runs a check, so
it must not pay that import on a 2-core machine. Everything here uses package metadata and file
lookups only; compat.py (imported by the workers) cross-checks the result after the real import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

#: The module the patch series adds (truncate-after-cache backport).
PATCH_MODULE = "sentence_transformers.losses._matryoshka_cache"


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("sentence_transformers")  # top-level: does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _release() -> str:
    """``__version__`` read from the package's ``__init__.py`` (the importable copy, e.g. a scratch
    dir on PYTHONPATH), falling back to the installed distribution's metadata."""
    pkg = _package_dir()
    if pkg is not None and (pkg / "__init__.py").is_file():
        for line in (pkg / "__init__.py").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return importlib.metadata.version("sentence-transformers")


def _series_commits(pkg: Path) -> bool:
    """Whether the checkout holding ``pkg`` has commits of a series (``St-Patch-Series:`` trailer)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--grep=^St-Patch-Series: "],
            cwd=pkg,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def detect_state() -> str:
    """'patched' when one of this project's series is applied to the importable package, else 'native'.

    Evidence, without importing: the state file ``st-patch`` writes into installed packages and source
    trees (``sentence_transformers/.st-patch/state.json``), the backport's module
    ``losses/_matryoshka_cache.py``, or series commits in a git checkout. The registry then applies
    the entries of the release's state: a defect the release's series fixes is registered for
    "native" only. ``CONFORMANCE_STATE=patched|native`` overrides the detection.
    """
    override = os.environ.get("CONFORMANCE_STATE", "").strip().lower()
    if override:
        if override not in ("patched", "native"):
            raise ValueError(f"CONFORMANCE_STATE must be 'patched' or 'native', got {override!r}")
        return override
    pkg = _package_dir()
    if pkg is None:
        return "native"
    if (pkg / ".st-patch" / "state.json").is_file() or (pkg / "losses" / "_matryoshka_cache.py").is_file():
        return "patched"
    return "patched" if (pkg.parent / ".git").exists() and _series_commits(pkg) else "native"


RELEASE = _release()
STATE = detect_state()

"""Which sentence-transformers release and state is under test - without importing it.

Why separate from compat.py: importing sentence_transformers costs ~8 s of CPU. Under pytest-xdist the
controller process only reports (header, JSON summary, registry summary) and never runs a check, so
it must not pay that import on a 2-core machine. Everything here uses package metadata and file
lookups only; compat.py (imported by the workers) cross-checks the result after the real import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
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


def _series_trailer(pkg: Path) -> str | None:
    """The ``St-Patch-Series:`` trailer of the newest series commit in the checkout holding ``pkg``."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%B", "--grep=^St-Patch-Series: "],
            cwd=pkg,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    names = [ln.split(":", 1)[1].strip() for ln in out.stdout.splitlines() if ln.startswith("St-Patch-Series:")]
    return names[-1] if names else None


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
    return "patched" if (pkg.parent / ".git").exists() and _series_trailer(pkg) else "native"


def applied_series() -> dict | None:
    """The series applied to the importable package, or None (native, or changed by other means).

    From the state record ``st-patch`` writes (``sentence_transformers/.st-patch/state.json``):
    ``{"name", "kind", "applied", "tool_version"}``, ``kind`` being how it was applied (``installed``,
    ``source``); in a git checkout, which has no state record, the ``St-Patch-Series:`` trailer of
    the newest series commit (``kind`` ``git``). The conformance JSON carries it as ``series``.
    """
    pkg = _package_dir()
    if pkg is None:
        return None
    path = pkg / ".st-patch" / "state.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return {"name": None, "kind": None, "applied": None, "tool_version": None, "error": str(exc)}
        keys = {"name": "series", "kind": "kind", "applied": "applied", "tool_version": "tool_version"}
        return {key: record.get(src) for key, src in keys.items()}
    name = _series_trailer(pkg) if (pkg.parent / ".git").exists() else None
    return {"name": name, "kind": "git", "applied": None, "tool_version": None} if name else None


RELEASE = _release()
STATE = detect_state()
#: ``CONFORMANCE_GENERIC=1`` (the ``generic`` lane): the series' shared multi-width loss stage switched off for the
#: whole run, so every check runs on the generic per-width path (compat.py switches it off after the import).
GENERIC_LANE = os.environ.get("CONFORMANCE_GENERIC", "").strip() not in ("", "0")
SERIES = applied_series()

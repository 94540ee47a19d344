"""Find and describe a target: a git checkout of an ST fork, a plain source tree, or an install.

Nothing here writes to the target and nothing imports ``sentence_transformers``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from .manifest import CRLF, LF, FileSpec, Manifest, Series, sha256
from .outcome import FileReport

PACKAGE = "sentence_transformers"
STATE_DIR = ".st-patch"

GIT = "git"
SOURCE = "source"
INSTALLED = "installed"
KIND_TEXT = {
    GIT: "git checkout",
    SOURCE: "source tree",
    INSTALLED: "installed package",
}

# Per-file states.
PRISTINE = "pristine"
PATCHED = "patched"
ABSENT = "absent"
MODIFIED = "modified"
SKIPPED = "skipped"
# Whole-target states (besides PRISTINE, PATCHED, MODIFIED).
PARTIAL = "partial"

_VERSION_RE = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", re.M)


class TargetError(Exception):
    """The target path is missing or is not a sentence-transformers tree (bad input: exit 2)."""


@dataclass
class Target:
    root: Path  # the directory that holds sentence_transformers/
    kind: str  # GIT, SOURCE or INSTALLED
    version: str | None
    dist_info: Path | None = None

    @property
    def package_dir(self) -> Path:
        return self.root / PACKAGE

    @property
    def state_dir(self) -> Path:
        return self.package_dir / STATE_DIR

    @property
    def legacy_journal(self) -> Path:
        """Where st-patch 1.x kept the journal of a run in progress."""
        return self.state_dir / "journal" / "journal.json"

    def path(self, rel: str) -> Path:
        return self.root.joinpath(*rel.split("/"))

    def in_scope(self, rel: str) -> bool:
        """Whether a series file is managed in this target.

        Installed packages only hold ``sentence_transformers/``; a source tree gets files outside
        it (``tests/...``) only where their top-level directory exists (sdists ship tests/).
        """
        top = rel.split("/", 1)[0]
        if top == PACKAGE or self.kind == GIT:
            return True
        if self.kind == INSTALLED:
            return False
        return (self.root / top).is_dir()

    def to_json(self) -> dict:
        return {
            "path": str(self.root),
            "kind": self.kind,
            "version": self.version,
            "dist_info": str(self.dist_info) if self.dist_info else None,
        }


def read_version(init_file: Path) -> str | None:
    """``__version__`` parsed from the text of ``sentence_transformers/__init__.py`` (no import)."""
    try:
        text = init_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = _VERSION_RE.search(text)
    return match.group(1).strip() if match else None


def _dist_infos(root: Path) -> List[Path]:
    found = []
    for pattern in ("sentence_transformers-*.dist-info", "sentence-transformers-*.dist-info"):
        found.extend(p for p in root.glob(pattern) if p.is_dir())
    return sorted(set(found))


def default_target_path() -> Path:
    """Where the running Python finds ``sentence_transformers`` (find_spec, no import)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError) as exc:
        raise TargetError(f"cannot locate {PACKAGE} in this Python: {exc}; pass --target") from None
    if spec is None:
        raise TargetError(f"{PACKAGE} is not importable in this Python; pass --target PATH")
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise TargetError(f"cannot tell where {PACKAGE} lives (spec {spec!r}); pass --target")


def resolve(path=None) -> Target:
    """Detect the target kind of PATH (or of the importable package when PATH is None)."""
    given = Path(path) if path is not None else default_target_path()
    if not given.exists():
        raise TargetError(f"target {given} does not exist")
    if not given.is_dir():
        raise TargetError(f"target {given} is not a directory")
    # not resolve(): a symlinked package directory must stay in its site-packages (with its dist-info)
    root = Path(os.path.abspath(str(given)))
    if root.name == PACKAGE and (root / "__init__.py").is_file():
        root = root.parent  # the package directory itself: use its parent
    init_file = root / PACKAGE / "__init__.py"
    if not init_file.is_file():
        raise TargetError(
            f"{given} is not a sentence-transformers target: no {PACKAGE}/__init__.py (expected a git checkout, "
            "an unpacked sdist, a site-packages directory or the package directory)"
        )
    version = read_version(init_file)
    if (root / ".git").exists():
        return Target(root, GIT, version)
    infos = _dist_infos(root)
    if infos:
        chosen = infos[0]
        for info in infos:
            if version and info.name.split("-", 1)[1].rsplit(".dist-info", 1)[0] == version:
                chosen = info
        return Target(root, INSTALLED, version, chosen)
    return Target(root, SOURCE, version)


@dataclass
class FileState:
    spec: FileSpec
    state: str  # PRISTINE, PATCHED, ABSENT, MODIFIED or SKIPPED
    sha256: str | None = None  # of the bytes on disk
    eol: str | None = None  # CRLF / LF / ANY_EOL as matched; None when absent or unknown
    data: bytes | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def exists(self) -> bool:
        return self.data is not None

    def fits(self, side: str) -> bool:
        """Whether this file is as the series expects it on ``side`` (PRISTINE or PATCHED)."""
        if self.state == SKIPPED:
            return True
        hashes = self.spec.pristine if side == PRISTINE else self.spec.patched
        if hashes is None:
            return self.state == ABSENT
        return self.state == side

    def report(self) -> FileReport:
        return FileReport(
            path=self.path,
            state=self.state,
            sha256=self.sha256,
            eol=self.eol,
            created_by_series=self.spec.created,
            expected={
                "pristine": self.spec.pristine.to_json() if self.spec.pristine else None,
                "patched": self.spec.patched.to_json() if self.spec.patched else None,
            },
        )


def classify_file(target: Target, spec: FileSpec, locate: Callable[[str], Path] | None = None) -> FileState:
    """The state of one series file; ``locate`` maps a path to where its bytes are (default: the target)."""
    if not target.in_scope(spec.path):
        return FileState(spec, SKIPPED)
    path = locate(spec.path) if locate else target.path(spec.path)
    if not path.is_file():
        return FileState(spec, ABSENT)
    data = path.read_bytes()
    digest = sha256(data)
    for side, hashes in ((PRISTINE, spec.pristine), (PATCHED, spec.patched)):
        if hashes is not None:
            eol = hashes.match(data)
            if eol is not None:
                return FileState(spec, side, digest, eol, data)
    eol = CRLF if b"\r\n" in data else (LF if b"\n" in data else None)
    return FileState(spec, MODIFIED, digest, eol, data)


def classify(target: Target, series: Series, locate: Callable[[str], Path] | None = None) -> List[FileState]:
    return [classify_file(target, spec, locate) for spec in series.files.values()]


def overall(states: List[FileState]) -> str:
    """PRISTINE, PATCHED, PARTIAL (a mix of both) or MODIFIED (some file is neither)."""
    managed = [s for s in states if s.state != SKIPPED]
    if not managed:
        return MODIFIED
    if all(s.fits(PRISTINE) for s in managed):
        return PRISTINE
    if all(s.fits(PATCHED) for s in managed):
        return PATCHED
    if all(s.fits(PRISTINE) or s.fits(PATCHED) for s in managed):
        return PARTIAL
    return MODIFIED


def leftovers(states: List[FileState]) -> List[FileState] | None:
    """Files the series creates that exist with the patched content while everything else is pristine.

    That is what ``pip install --force-reinstall`` (or an uninstall + install) leaves behind after a
    patched install: the new module is not in the wheel's RECORD. Returns them, or None when the
    target is not in that state.
    """
    extra = [s for s in states if s.state == PATCHED and s.spec.created]
    if not extra:
        return None
    others = [s for s in states if s not in extra]
    if all(s.fits(PRISTINE) for s in others) and any(s.state == PRISTINE for s in others):
        return extra
    return None


def target_eol(states: List[FileState]) -> str:
    """CRLF when the target's existing series files use CRLF (wheels, sdists), else LF."""
    eols = [s.eol for s in states if s.state in (PRISTINE, PATCHED) and s.eol in (CRLF, LF)]
    if eols:
        return CRLF if eols.count(CRLF) >= eols.count(LF) else LF
    eols = [s.eol for s in states if s.eol in (CRLF, LF)]
    return CRLF if CRLF in eols else LF


def file_eol(state: FileState, default: str) -> str:
    return state.eol if state.eol in (CRLF, LF) else default


def rank_series(target: Target, manifest: Manifest) -> List[Tuple[str, Dict[str, int]]]:
    """Series ordered by how well the target's files match their pristine or patched hashes."""
    ranking = []
    for name, series in manifest.series.items():
        states = classify(target, series)
        managed = [s for s in states if s.state != SKIPPED]
        evidence = [s for s in managed if s.exists]
        counts = {
            "files": len(managed),
            "pristine": sum(1 for s in managed if s.fits(PRISTINE)),
            "patched": sum(1 for s in managed if s.fits(PATCHED)),
            "evidence": sum(1 for s in evidence if s.state in (PRISTINE, PATCHED)),
            "state": overall(states),
        }
        ranking.append((name, counts))
    ranking.sort(key=lambda item: (-item[1]["evidence"], -max(item[1]["pristine"], item[1]["patched"]), item[0]))
    return ranking


def detect_by_content(target: Target, manifest: Manifest) -> List[str]:
    """Series whose files all match the target exactly (pristine or patched), with real evidence."""
    found = []
    for name, counts in rank_series(target, manifest):
        if counts["evidence"] and counts["state"] in (PRISTINE, PATCHED):
            found.append(name)
    return found

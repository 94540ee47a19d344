"""Read ``patches/manifest.json``: which release gets which patch series, and the file hashes.

The manifest is data produced by the series build (see ``releases.toml``); this module only
reads and validates it. Stdlib only (``packaging`` optional) and Python 3.8 compatible, because
st-patch may run under an old release's virtual environment.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

FORMAT = 1
SUPPORT_KINDS = ("patched", "native")

CRLF = "crlf"
LF = "lf"
ANY_EOL = "any"  # a file whose bytes contain no line break: both hashes are the same


class ManifestError(Exception):
    """The manifest or a patch series is missing or malformed (bad input: exit 2)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def to_crlf(data: bytes) -> bytes:
    return to_lf(data).replace(b"\n", b"\r\n")


def with_eol(data: bytes, eol: str) -> bytes:
    return to_crlf(data) if eol == CRLF else to_lf(data)


@dataclass(frozen=True)
class Hashes:
    sha256: str  # the bytes as released (CRLF for wheels and sdists)
    sha256_lf: str  # the same text with LF line endings (a git checkout)

    def match(self, data: bytes) -> str | None:
        """Line ending under which ``data`` equals this file exactly (CRLF, LF, ANY_EOL), or None."""
        digest = sha256(data)
        if self.sha256 == self.sha256_lf:
            return ANY_EOL if digest == self.sha256 else None
        if digest == self.sha256:
            return CRLF
        if digest == self.sha256_lf:
            return LF
        return None

    def expected(self, eol: str) -> str:
        return self.sha256 if eol == CRLF else self.sha256_lf

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "sha256_lf": self.sha256_lf}


@dataclass(frozen=True)
class FileSpec:
    path: str  # POSIX path relative to the source root, e.g. sentence_transformers/losses/X.py
    pristine: Hashes | None  # None: the series creates the file
    patched: Hashes | None  # None: the series deletes the file

    @property
    def created(self) -> bool:
        return self.pristine is None

    @property
    def deleted(self) -> bool:
        return self.patched is None


@dataclass
class Series:
    name: str
    releases: List[str]
    patches: List[str]
    files: Dict[str, FileSpec]
    directory: Path

    def patch_paths(self) -> List[Path]:
        return [self.directory / p for p in self.patches]


@dataclass
class Entry:
    """What the manifest says of one release: its support and its series (the table row is
    tools.releases.Release)."""

    version: str
    support: str
    series: str | None


@dataclass
class Manifest:
    path: Path
    releases: Dict[str, Entry]
    series: Dict[str, Series] = field(default_factory=dict)

    def lookup(self, version: str) -> Entry | None:
        """The release entry for ``version`` (exact string first, then PEP 440 equality)."""
        if version in self.releases:
            return self.releases[version]
        key = _version_key(version)
        if key is None:
            return None
        for name, release in self.releases.items():
            if _version_key(name) == key:
                return release
        return None

    def versions(self, support: str | None = None) -> List[str]:
        names = [v for v, r in self.releases.items() if support is None or r.support == support]
        return sorted(names, key=_sort_key)

    def supported_text(self) -> str:
        parts = []
        for support in SUPPORT_KINDS:
            names = self.versions(support)
            if names:
                parts.append("{}: {}".format(support, ", ".join(names)))
        return "; ".join(parts) or "(none)"


def _version_key(text: str):
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with every ST environment
        return text.strip()
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _sort_key(text: str):
    key = _version_key(text)
    if key is None or isinstance(key, str):
        parts = []
        for piece in text.replace("-", ".").split("."):
            parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
        return (1, tuple(parts))
    return (0, key)


def default_manifest_path() -> Path:
    """``patches/manifest.json`` beside this module: in a checkout ``scripts/st_patch/patches`` links
    to the repository's ``patches/``; an installed st-patch carries them as package data."""
    return Path(__file__).resolve().parent / "patches" / "manifest.json"


def _hashes(obj, where: str) -> Hashes | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected an object with sha256/sha256_lf or null")
    try:
        digests = (str(obj["sha256"]).lower(), str(obj["sha256_lf"]).lower())
    except KeyError as exc:
        raise ManifestError(f"{where}: missing {exc}") from None
    for digest in digests:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(f"{where}: {digest!r} is not a sha256 hex digest")
    return Hashes(*digests)


def load(path: Path | None = None) -> Manifest:
    path = Path(path) if path is not None else default_manifest_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(
            "manifest {}: unsupported format {!r} (expected {})".format(
                path, data.get("format") if isinstance(data, dict) else None, FORMAT
            )
        )
    series_dir = path.parent / "series"
    manifest = Manifest(path=path, releases={})
    for name, entry in (data.get("series") or {}).items():
        where = f"{path.name}: series {name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("patches"), list) or not entry["patches"]:
            raise ManifestError(f"{where}: needs a non-empty list of patches")
        files = {}
        for rel, spec in (entry.get("files") or {}).items():
            rel = rel.replace("\\", "/")
            if rel.startswith("/") or ".." in rel.split("/"):
                raise ManifestError(f"{where}: unsafe file path {rel!r}")
            if not isinstance(spec, dict):
                raise ManifestError(f"{where}: file {rel}: expected an object")
            pristine = _hashes(spec.get("pristine"), f"{where}: {rel}: pristine")
            patched = _hashes(spec.get("patched"), f"{where}: {rel}: patched")
            if pristine is None and patched is None:
                raise ManifestError(f"{where}: file {rel}: pristine and patched cannot both be null")
            files[rel] = FileSpec(rel, pristine, patched)
        if not files:
            raise ManifestError(f"{where}: lists no files")
        manifest.series[name] = Series(
            name=name,
            releases=[str(r) for r in entry.get("releases") or []],
            patches=[str(p) for p in entry["patches"]],
            files=files,
            directory=series_dir / name,
        )
    for version, entry in (data.get("releases") or {}).items():
        where = f"{path.name}: release {version}"
        if not isinstance(entry, dict) or entry.get("support") not in SUPPORT_KINDS:
            raise ManifestError("{}: support must be one of {}".format(where, ", ".join(SUPPORT_KINDS)))
        series = entry.get("series")
        if (entry["support"] == "patched" or series is not None) and series not in manifest.series:
            raise ManifestError(f"{where}: unknown series {series!r}")
        manifest.releases[str(version)] = Entry(str(version), entry["support"], series)
    return manifest


def check_patch_files(series: Series) -> None:
    """Raise ManifestError when a patch file of the series is missing."""
    for patch in series.patch_paths():
        if not patch.is_file():
            raise ManifestError(f"series {series.name}: patch file {patch} is missing")

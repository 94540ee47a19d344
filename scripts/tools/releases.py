"""The releases table (``releases.toml``): the one place that knows a sentence-transformers release.

Everything that needs per-release facts - the series generator, tox, the CI matrix, the report -
reads it through this module, so a new upstream release is one new row in the table.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version
from st_patch.manifest import SUPPORT_KINDS

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "releases.toml"
SUPPORT_STATES = SUPPORT_KINDS  # one definition: the manifest that st-patch reads


@dataclass(frozen=True)
class Release:
    version: str
    date: datetime.date
    pins: tuple[str, ...]
    support: str

    @property
    def key(self) -> Version:
        return Version(self.version)


def load(path: Path = TABLE) -> list[Release]:
    """All releases of the table, oldest first; a malformed row raises naming the row."""
    import tomllib

    data = tomllib.loads(path.read_text())
    pins = data.get("pins", {})
    releases = []
    for row in data.get("release", []):
        version = row.get("version")
        if row.get("support") not in SUPPORT_STATES:
            raise ValueError(f"{path}: release {version}: support must be one of {SUPPORT_STATES}")
        if row.get("pins") not in pins:
            raise ValueError(f"{path}: release {version}: pins {row.get('pins')!r} is not a key of [pins]")
        if not isinstance(row.get("date"), datetime.date):
            raise ValueError(f"{path}: release {version}: date must be a TOML date (YYYY-MM-DD)")
        releases.append(Release(str(Version(version)), row["date"], tuple(pins[row["pins"]]), row["support"]))
    return sorted(releases, key=lambda r: r.key)


def minor_lines(table: list[Release] | None = None) -> list[Release]:
    """The newest release of every minor line (2.4, 2.5, …): what CI runs the conformance suite on."""
    newest: dict[tuple[int, int], Release] = {}
    for release in table or load():
        newest[release.key.release[:2]] = release
    return list(newest.values())


if __name__ == "__main__":  # python -m tools.releases --minor-lines
    import sys

    if sys.argv[1:] != ["--minor-lines"]:
        sys.exit("usage: python -m tools.releases --minor-lines")
    print(" ".join(r.version for r in minor_lines()))

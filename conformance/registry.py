"""Registry of known upstream defects -> strict xfail marks.

Why: the suite must stay red for regressions and for the crash the patch series fixes, yet a release
with a documented upstream defect should not drown that signal. Each entry of
``expected_failures.toml`` names the checks it covers (node-id patterns), the releases (a
packaging ``SpecifierSet``), the states ("native" = unpatched upstream, "patched" = after our
series), the reason and the upstream reference. Marks are ``strict=True``: when a defect disappears
(an XPASS) the run fails, so a stale entry cannot hide anything.

Patterns: ``*`` matches any run of characters and ``?`` one character; everything else is literal
(``[`` in a node id is not a character class, unlike ``fnmatch``). A pattern matches the whole node
id, e.g. ``*::test_cached_vs_reference[CMNRL-*``.

``CONFORMANCE_IGNORE_REGISTRY=1`` disables the marks to show raw results.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite targets 3.11, tomli is the documented fallback
    import tomli as tomllib

REGISTRY_PATH = Path(__file__).with_name("expected_failures.toml")
STATES = ("native", "patched")
_FIELDS = {"id", "checks", "releases", "states", "reason", "upstream"}
_OPTIONAL = {"fixed_by"}


@dataclass(frozen=True)
class Defect:
    id: str
    checks: tuple[str, ...]
    releases: SpecifierSet
    states: tuple[str, ...]
    reason: str
    upstream: str
    fixed_by: tuple[str, ...] = ()  # the patches (concern slugs) that fix it (then: states == ("native",))

    def applies(self, release: str, state: str) -> bool:
        return state in self.states and Version(release) in self.releases

    def matches(self, nodeid: str) -> bool:
        return any(_compile(p).fullmatch(nodeid) for p in self.checks)


def _compile(pattern: str) -> re.Pattern:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def _slugs(entry: dict, path: Path) -> tuple[str, ...]:
    fixed_by = entry.get("fixed_by", [])
    if not isinstance(fixed_by, list) or not all(isinstance(s, str) and s for s in fixed_by):
        raise ValueError(f"{path}: defect {entry['id']!r}: fixed_by must be a list of patch slugs")
    return tuple(fixed_by)


def load(path: Path = REGISTRY_PATH) -> list[Defect]:
    """Parse and validate the registry; a malformed entry is an error, not a silently ignored row."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    defects = []
    for n, entry in enumerate(data.get("defect", [])):
        unknown = set(entry) - _FIELDS - _OPTIONAL
        missing = _FIELDS - set(entry)
        if unknown or missing:
            raise ValueError(f"{path}: defect #{n}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        states = tuple(entry["states"])
        if not states or set(states) - set(STATES):
            raise ValueError(f"{path}: defect {entry['id']!r}: states must be a subset of {STATES}")
        if entry.get("fixed_by") and states != ("native",):
            raise ValueError(f"{path}: defect {entry['id']!r}: fixed by a patch, so it applies to 'native' only")
        checks = entry["checks"]
        if isinstance(checks, str):
            checks = [checks]
        defects.append(
            Defect(
                id=entry["id"],
                checks=tuple(checks),
                releases=SpecifierSet(entry["releases"]),
                states=states,
                reason=" ".join(entry["reason"].split()),
                upstream=entry["upstream"],
                fixed_by=_slugs(entry, path),
            )
        )
    ids = [d.id for d in defects]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: duplicate defect ids")
    return defects


def ignored() -> bool:
    return os.environ.get("CONFORMANCE_IGNORE_REGISTRY", "") not in ("", "0")


def apply(items, release: str, state: str, defects: list[Defect] | None = None) -> dict[str, int]:
    """Add ``xfail(strict=True)`` to matching items; returns {defect id: number of items marked}.

    Each marked item also records the ids of its defects as the user property ``defects`` (a list),
    which reaches the reports (also from xdist workers): the JSON summary's per-check ``defects``."""
    import pytest

    defects = load() if defects is None else defects
    active = [d for d in defects if d.applies(release, state)]
    counts = {d.id: 0 for d in active}
    if ignored():
        return counts
    for item in items:
        hits = [d for d in active if d.matches(item.nodeid)]
        if not hits:
            continue
        reason = "; ".join(f"[{d.id}] {d.reason} ({d.upstream})" for d in hits)
        item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
        item.user_properties.append(("defects", [d.id for d in hits]))
        for d in hits:
            counts[d.id] += 1
    return counts

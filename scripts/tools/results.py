"""One conformance run as data, and the one definition of "passed" (``make matrix`` and ``make report``).

A run is two JSON files, read as they are written, never parsed out of messages:

- ``<env>.json``, the conformance suite's summary (``--conformance-json``, conformance/conftest.py):
  ``{"release", "state", "series", "torch", "transformers", "python", "registry_ignored",
  "generic_path_forced", "exitstatus",
  "defects", "checks"}``. ``series`` is what st-patch recorded in the package it applied a series to
  (``{"name", "kind", "applied", "tool_version"}``; ``kind``: installed, source or git), null when none
  is applied. ``defects`` maps the id of each registry defect of the release and state to its
  ``{"reason", "upstream"}``; each check is ``{"id", "status", "max_abs_diff", "max_rel_diff",
  "duration", "message", "defects": [id, ...]}``, ``defects`` being the registry entries marked on it.
- ``<env>.run.json`` (optional), written by ``make matrix`` after the tox run: ``{"env", "release",
  "lane", "seconds", "returncode", "recreated", "finished"}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

BAD = ("failed", "error", "xpassed")
STATUS_ORDER = ("passed", "failed", "error", "xfailed", "xpassed", "skipped")
LANE_SUFFIXES = ("oldest", "upstream")  # st-3.3.1-oldest; no suffix: newest


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Check:
    id: str
    status: str
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    duration: float = 0.0
    message: str = ""
    defects: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict) -> Check:
        return cls(
            id=str(data["id"]),
            status=str(data.get("status") or "unknown"),
            max_abs_diff=_number(data.get("max_abs_diff")),
            max_rel_diff=_number(data.get("max_rel_diff")),
            duration=_number(data.get("duration")) or 0.0,
            message=str(data.get("message") or ""),
            defects=tuple(str(d) for d in data.get("defects") or ()),
        )

    @property
    def bad(self) -> bool:
        return self.status in BAD


@dataclass
class Run:
    name: str
    summary: dict
    meta: dict = field(default_factory=dict)
    checks: list[Check] = field(init=False)

    def __post_init__(self):
        rows = self.summary.get("checks") or []
        self.checks = [Check.from_json(c) for c in rows if isinstance(c, dict) and c.get("id")]

    @property
    def release(self) -> str:
        return str(self.summary.get("release", "?"))

    @property
    def state(self) -> str:
        return str(self.summary.get("state", "?"))

    @property
    def series(self) -> dict | None:
        """What st-patch recorded (``{"name", "kind", ...}``), None when no series is applied."""
        return self.summary.get("series")

    @property
    def knows_series(self) -> bool:
        """Whether the summary says which series is applied (older summaries do not)."""
        return "series" in self.summary

    @property
    def defects(self) -> dict[str, dict]:
        """{defect id: {"reason", "upstream"}} of the registry entries active for this release and state."""
        return self.summary.get("defects") or {}

    @property
    def exitstatus(self) -> int:
        return int(self.summary.get("exitstatus", 0) or 0)

    @property
    def returncode(self) -> int | None:
        value = self.meta.get("returncode")
        return value if isinstance(value, int) else None

    @property
    def seconds(self) -> float | None:
        return _number(self.meta.get("seconds"))

    @property
    def lane(self) -> str:
        lane = self.meta.get("lane")
        if isinstance(lane, str) and lane:
            return lane
        suffix = self.name.rsplit("-", 1)[-1]
        return suffix if suffix in LANE_SUFFIXES else "newest"

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.bad]

    @property
    def passed(self) -> bool:
        """The one definition: checks ran, none failed, errored or passed unexpectedly (a strict xfail),
        pytest exited 0, and so did the tox run when its exit code is known."""
        return bool(self.checks) and not self.failed and self.exitstatus == 0 and self.returncode in (None, 0)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.checks:
            out[c.status] = out.get(c.status, 0) + 1
        return out

    def counts_text(self) -> str:
        """The counts as text, statuses in a fixed order: ``41 passed, 3 xfailed``."""
        counts = self.counts()
        keys = [*[k for k in STATUS_ORDER if k in counts], *sorted(set(counts) - set(STATUS_ORDER))]
        return ", ".join(f"{counts[k]} {k}" for k in keys) or "no checks"


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; OSError or ValueError when it is missing, unreadable or not an object."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def meta_path(path: Path) -> Path:
    """``results/st-3.3.1.json`` -> ``results/st-3.3.1.run.json``."""
    return path.with_name(f"{path.name.removesuffix('.json')}.run.json")


def is_summary(data: dict) -> bool:
    return isinstance(data.get("checks"), list)


def read(path: Path, meta: dict | None = None) -> Run:
    """The run of the summary at ``path``; ``meta`` defaults to its ``.run.json`` (empty without one)."""
    summary = read_json(path)
    if not is_summary(summary):
        raise ValueError("not a conformance summary (no checks list)")
    if meta is None:
        meta = read_json(meta_path(path)) if meta_path(path).exists() else {}
    return Run(Path(path).name.removesuffix(".json"), summary, meta)


def version_key(text: str):
    parts = re.findall(r"\d+|[A-Za-z]+", text)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def load(directory: Path) -> tuple[list[Run], list[str]]:
    """The runs under ``directory`` (sorted by release, then name) and warnings about unreadable files;
    JSON files that are not conformance summaries are skipped."""
    runs, warnings = [], []
    for path in sorted(Path(directory).glob("*.json")):
        if path.name.endswith(".run.json"):
            continue
        try:
            summary = read_json(path)
        except (OSError, ValueError) as exc:
            warnings.append(f"{path.name}: not readable JSON ({exc})")
            continue
        if not is_summary(summary):
            continue
        meta: dict = {}
        if meta_path(path).exists():
            try:
                meta = read_json(meta_path(path))
            except (OSError, ValueError) as exc:
                warnings.append(f"{meta_path(path).name}: not readable JSON ({exc})")
        runs.append(Run(path.name.removesuffix(".json"), summary, meta))
    runs.sort(key=lambda r: (version_key(r.release), r.name))
    return runs, warnings

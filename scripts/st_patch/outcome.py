"""What one st-patch command found and did: a typed record, rendered as text or as JSON.

Every key of the JSON result is declared once, here; the backends fill the fields, ``cli`` renders
them. The errors that end a command are here too, each with its exit code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

OK, FAIL, USAGE, INTERRUPTED = 0, 1, 2, 130
NATIVE = "native"


class InputError(Exception):
    """Bad usage or input (exit 2)."""


class Refusal(Exception):
    """Not applicable, or a check failed (exit 1); nothing was changed unless the message says so.
    ``details`` are outcome fields to set (e.g. ``candidates``)."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details = details


class Interrupted(Exception):
    """Ctrl-C or SIGTERM before the commit point; the target is back as it started (exit 130)."""


@dataclass
class ReleaseInfo:
    version: str | None
    support: str  # "patched", "native" or "unknown"
    series: str | None
    patches: List[str]
    detected: str | None  # "manifest", "content", "option" or None


@dataclass
class FileReport:
    path: str
    state: str
    sha256: str | None
    eol: str | None
    created_by_series: bool
    expected: Dict[str, Dict[str, str] | None]


@dataclass
class PatchReport:
    """One patch of the series on this target: present, missing or reverted (forks), or, for file
    trees, present/missing as the files say."""

    patch: str
    subject: str
    state: str
    commits: List[str] = field(default_factory=list)


@dataclass
class Outcome:
    command: str
    tool_version: str
    ok: bool = False
    exit_code: int | None = None
    manifest: str | None = None
    target: Dict[str, Any] | None = None
    release: ReleaseInfo | None = None
    state: str | None = None
    eol: str | None = None
    action: str | None = None
    files: List[FileReport] = field(default_factory=list)
    patches: List[PatchReport] = field(default_factory=list)
    would: Dict[str, str] = field(default_factory=dict)
    commits: List[str] = field(default_factory=list)
    dirty: List[str] = field(default_factory=list)
    recorded: Dict[str, Any] | None = None
    recovered: Dict[str, Any] | None = None
    pending: Dict[str, Any] | None = None
    candidates: List[Dict[str, Any]] | None = None
    drift: Dict[str, Any] | None = None
    messages: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    error: str | None = None

    def note(self, text: str) -> None:
        self.messages.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def finish(self, code: int) -> int:
        self.exit_code = code
        self.ok = code == OK
        return code

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def render_text(out: Outcome, kind_text: Dict[str, str]) -> str:
    """The human-readable form of an outcome."""
    headline = out.action if out.action not in (None, "none") else out.state
    lines = ["st-patch {}: {}".format(out.command, headline or ("error" if out.error else "-"))]
    if out.target:
        kind = kind_text.get(out.target["kind"], out.target["kind"])
        extra = f", {out.eol.upper()}" if out.eol else ""
        lines.append(
            "  target   {} ({}, sentence-transformers {}{})".format(
                out.target["path"], kind, out.target["version"], extra
            )
        )
    release = out.release
    if release:
        if release.support == NATIVE and not release.series:
            lines.append(f"  release  {release.version}: native (no series needed)")
        elif release.series:
            how = {"manifest": "", "content": ", detected by content", "option": ", chosen with --series"}
            count = len(release.patches)
            lines.append(
                "  release  {}: series {} ({} patch{}{})".format(
                    release.version,
                    release.series,
                    count,
                    "" if count == 1 else "es",
                    how.get(release.detected or "", ""),
                )
            )
        else:
            lines.append(f"  release  {release.version}: not in the manifest")
    if out.state:
        lines.append(f"  state    {out.state}")
    for p in out.patches:
        commits = "  ({})".format(" ".join(c[:12] for c in p.commits)) if p.commits else ""
        lines.append(f"    {p.state:<9} {p.patch}{commits}")
    for f in out.files:
        note = ""
        if f.state == "skipped":
            note = "  (outside sentence_transformers/, not part of this target)"
        elif f.created_by_series:
            note = "  (created by the series)"
        if f.path in out.would:
            note += f"  -> {out.would[f.path]}"
        lines.append(f"    {f.state:<9} {f.path}{note}")
    if out.recorded and "series" in out.recorded:
        lines.append(
            "  record   series {} applied {} by st-patch {}".format(
                out.recorded.get("series"), out.recorded.get("applied"), out.recorded.get("tool_version")
            )
        )
    for message in out.messages:
        lines.append("  - " + message)
    for warning in out.warnings:
        lines.append("  warning: " + warning)
    return "\n".join(lines)

"""Which patches of a series a fork's history holds: present, missing or reverted, each.

A patch is *present* when a commit in HEAD's history is it (same ``git patch-id --stable``, or the
trailer ``St-Patch-Series: <name>`` and the patch's subject) and no later commit reverts it (``This
reverts commit X``), *reverted* when all its commits are reverted, *missing* otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from . import targets as tg
from .forkgit import git
from .manifest import Series, sha256
from .targets import MODIFIED, PATCHED, PRISTINE, FileState, Target

TRAILER = "St-Patch-Series"
REVERTS = "This reverts commit "
PRESENT, MISSING, REVERTED = "present", "missing", "reverted"
RECORD = "run.json"


# ----------------------------------------------------------------------------- per-patch state


def _patch_id(target: Target, text: str) -> str | None:
    out = git(target, ["patch-id", "--stable"], input=text).stdout.split()
    return out[0] if out else None


def _subject(target: Target, text: str) -> str:
    """The subject ``git am`` gives the patch's commit (``git mailinfo``: unfolded, [PATCH] removed)."""
    proc = git(target, ["mailinfo", os.devnull, os.devnull], input=text, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("Subject: "):
            return line[len("Subject: ") :].strip()
    return ""


@dataclass
class Commit:
    sha: str
    subject: str
    series: List[str]  # the St-Patch-Series trailers
    reverts: List[str]  # the commits it says it reverts
    patch_id: str | None = None


@dataclass
class PatchState:
    name: str
    path: Path
    subject: str
    state: str
    commits: List[str]  # this patch's commits in HEAD's history, newest first
    active: List[str]  # those not reverted


def _history(target: Target, rev: str, paths: List[str]) -> List[Commit]:
    """Commits reachable from ``rev`` that touch ``paths`` (newest first), with trailers and patch-ids."""
    proc = git(target, ["log", "--no-merges", "--format=%H%x1f%s%x1f%B%x1e", rev, "--"] + paths)
    commits: List[Commit] = []
    for record in proc.stdout.split("\x1e"):
        if "\x1f" not in record:
            continue
        sha, subject, body = record.strip("\n").split("\x1f", 2)
        series, reverts = [], []
        for line in body.splitlines():
            line = line.strip()
            if line.startswith(TRAILER + ":"):
                series.append(line.split(":", 1)[1].strip())
            elif line.startswith(REVERTS):
                reverts.append(line[len(REVERTS) :].split()[0].rstrip(".,"))
        commits.append(Commit(sha, subject, series, reverts))
    if commits:
        proc = git(
            target,
            ["log", "--no-merges", "-p", "--full-diff", "--no-color", "--no-ext-diff", "--pretty=medium", rev, "--"]
            + paths,
            check=False,
        )
        if proc.returncode:  # e.g. a partial clone offline: the trailer and the subject still tell
            return commits
        log = proc.stdout
        ids = {}
        for line in git(target, ["patch-id", "--stable"], input=log).stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                ids[parts[1]] = parts[0]
        for commit in commits:
            commit.patch_id = ids.get(commit.sha)
    return commits


def patch_states(target: Target, series: Series, rev: str = "HEAD") -> List[PatchState]:
    """Each patch of ``series``: present, missing or reverted in ``rev``'s history."""
    history = _history(target, rev, list(series.files))
    reverted_by: Dict[str, List[str]] = {}
    for commit in history:
        for sha in commit.reverts:
            reverted_by.setdefault(sha, []).append(commit.sha)
    memo: Dict[str, bool] = {}

    def active(sha: str, depth: int = 0) -> bool:
        if sha not in memo:
            memo[sha] = depth > 50 or not any(active(r, depth + 1) for r in reverted_by.get(sha, []))
        return memo[sha]

    states = []
    for path in series.patch_paths():
        text = path.read_text(encoding="utf-8", errors="replace")
        pid, subject = _patch_id(target, text), _subject(target, text)
        mine = [
            c.sha
            for c in history
            if (pid is not None and c.patch_id == pid) or (series.name in c.series and c.subject == subject)
        ]
        live = [sha for sha in mine if active(sha)]
        state = PRESENT if live else (REVERTED if mine else MISSING)
        states.append(PatchState(path.name, path, subject, state, mine, live))
    return states


def classify_at(target: Target, series: Series, rev: str) -> List[FileState]:
    """The touched files' states in commit ``rev`` (what ``tg.classify`` says of the work tree)."""
    states = []
    for spec in series.files.values():
        proc = git(target, ["cat-file", "blob", f"{rev}:{spec.path}"], check=False, text=False)
        if proc.returncode:
            states.append(FileState(spec, tg.ABSENT))
            continue
        data = proc.stdout
        state = FileState(spec, MODIFIED, sha256(data), None, data)
        for side, hashes in ((PRISTINE, spec.pristine), (PATCHED, spec.patched)):
            eol = hashes.match(data) if hashes is not None else None
            if eol is not None:
                state = FileState(spec, side, sha256(data), eol, data)
                break
        states.append(state)
    return states


def names(patches: List[PatchState]) -> str:
    return ", ".join(p.name for p in patches) or "none"

"""The git-checkout backend (an ST fork): ``git am -3`` applies the series as commits, ``git revert`` undoes them.

The series' commits carry the trailer ``St-Patch-Series: <name>``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List

from . import gitrun
from . import targets as tg
from .manifest import Series
from .outcome import FAIL, OK, Refusal
from .resolve import Context
from .targets import MODIFIED, PATCHED, PRISTINE, FileState, Target

TRAILER = "St-Patch-Series"


def _git(target: Target, args: List[str], check: bool = True, **kw):
    try:
        return gitrun.run(args, target.root, check=check, **kw)
    except gitrun.GitError as exc:
        raise Refusal(str(exc)) from None


def _git_path(target: Target, name: str) -> Path:
    out = _git(target, ["rev-parse", "--git-path", name]).stdout.strip()
    path = Path(out)
    return path if path.is_absolute() else target.root / path


def operation_in_progress(target: Target) -> str | None:
    for name, what in (
        ("rebase-apply", "git am or rebase"),
        ("rebase-merge", "rebase"),
        ("MERGE_HEAD", "merge"),
        ("CHERRY_PICK_HEAD", "cherry-pick"),
        ("REVERT_HEAD", "revert"),
    ):
        if _git_path(target, name).exists():
            return what
    return None


def dirty_paths(target: Target, paths: List[str]) -> List[str]:
    """Touched paths with uncommitted changes (staged, unstaged or untracked)."""
    proc = _git(target, ["status", "--porcelain", "-z", "--untracked-files=all", "--"] + paths)
    records = iter(proc.stdout.split("\0"))
    dirty = []
    for record in records:
        if len(record) > 3:
            dirty.append(record[3:])
            if "R" in record[:2] or "C" in record[:2]:
                next(records, None)  # a rename or copy: the source path follows
    return dirty


def head(target: Target) -> str:
    return _git(target, ["rev-parse", "--verify", "HEAD"]).stdout.strip()


def series_commits(target: Target, name: str) -> List[str]:
    """Commits in HEAD's history that carry ``St-Patch-Series: <name>`` and are not reverted."""
    proc = _git(
        target,
        ["log", "--format=%H%x1f%B%x1e", "--fixed-strings", f"--grep={TRAILER}:", "--grep=This reverts commit", "HEAD"],
    )
    carrying: List[str] = []
    reverts: Dict[str, List[str]] = {}
    for record in proc.stdout.split("\x1e"):
        if "\x1f" not in record:
            continue
        sha, body = record.strip("\n").split("\x1f", 1)
        for line in body.splitlines():
            line = line.strip()
            if line.startswith(TRAILER + ":") and line.split(":", 1)[1].strip() == name:
                carrying.append(sha)
            elif line.startswith("This reverts commit "):
                reverted = line[len("This reverts commit ") :].rstrip(".").strip()
                reverts.setdefault(reverted, []).append(sha)
    memo: Dict[str, bool] = {}

    def active(sha: str, depth: int = 0) -> bool:
        if sha not in memo:
            memo[sha] = depth > 50 or not any(active(r, depth + 1) for r in reverts.get(sha, []))
        return memo[sha]

    return [sha for sha in carrying if active(sha)]  # newest first, as git log lists them


def _sequence(target: Target, args: List[str], failed: str) -> None:
    """Run ``git am`` / ``git revert`` (``args``); on failure or Ctrl-C, ``--abort`` it, then raise."""
    command = args[0]
    ident = gitrun.identity(target.root, author=command == "revert")
    try:
        proc = _git(target, args, check=False, env=ident)
    except KeyboardInterrupt:
        _git(target, [command, "--abort"], check=False, env=ident)
        raise
    if proc.returncode:
        message = gitrun.message(proc)
        _git(target, [command, "--abort"], check=False, env=ident)
        raise Refusal(f"{failed}: {message}")


def dry_run(target: Target, series: Series) -> List[FileState]:
    """``git am -3`` the series in a throw-away shared clone of HEAD; return the files' states there."""
    commit = head(target)
    with tempfile.TemporaryDirectory(prefix="st-patch-") as tmp:
        clone = Path(tmp) / "clone"
        proc = gitrun.run(
            ["clone", "--quiet", "--shared", "--no-checkout", str(target.root), str(clone)],
            Path(tmp),
            check=False,
            ceiling=Path(tmp),
        )
        if proc.returncode:
            raise Refusal(f"cannot make a temporary clone for the dry run: {gitrun.message(proc)}")
        gitrun.run(["checkout", "--quiet", "--detach", commit], clone, ceiling=Path(tmp))
        shadow = Target(clone, tg.GIT, target.version)
        proc = gitrun.run(
            ["am", "-3", "--quiet"] + [str(p) for p in series.patch_paths()],
            clone,
            check=False,
            ceiling=Path(tmp),
            env=gitrun.identity(target.root),
        )
        if proc.returncode:
            raise Refusal(f"git am -3 would fail: {gitrun.message(proc)}")
        return tg.classify(shadow, series)


class ForkBackend:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.target = ctx.target
        self.series = ctx.series
        self.out = ctx.outcome

    def _common(self, states: List[FileState]):
        commits = series_commits(self.target, self.series.name)
        state = PATCHED if commits else tg.overall(states)
        self.out.files = [s.report() for s in states]
        self.out.state = state
        self.out.commits = commits
        return commits, state

    def _guard(self, states: List[FileState], action: str) -> None:
        busy = operation_in_progress(self.target)
        if busy:
            raise Refusal(f"cannot {action}: a {busy} is in progress in {self.target.root}; finish or abort it first")
        dirty = dirty_paths(self.target, [s.path for s in states])
        if dirty:
            self.out.dirty = dirty
            raise Refusal(
                "cannot {}: uncommitted changes to files the series touches: {}; commit or stash them first".format(
                    action, ", ".join(dirty)
                )
            )

    def status(self) -> int:
        states = tg.classify(self.target, self.series)
        commits, state = self._common(states)
        self.out.action = "none"
        if commits:
            self.out.note(
                "series commits ({}: {}): {}".format(TRAILER, self.series.name, ", ".join(c[:12] for c in commits))
            )
        if state == MODIFIED:
            self.out.note(
                f"the files differ from release {self.ctx.version} (a fork?): `check` tells whether the series "
                "applies with a 3-way merge"
            )
        dirty = dirty_paths(self.target, [s.path for s in states])
        if dirty:
            self.out.dirty = dirty
            self.out.note("uncommitted changes to touched files: {}".format(", ".join(dirty)))
        return OK if state in (PRISTINE, PATCHED, MODIFIED) else FAIL

    def check(self) -> int:
        states = tg.classify(self.target, self.series)
        commits, state = self._common(states)
        self._guard(states, "apply")
        if state == PATCHED:
            self.out.action = "already-patched"
            self.out.note(
                "already patched" + (" (commits {})".format(", ".join(c[:12] for c in commits)) if commits else "")
            )
            return OK
        after = dry_run(self.target, self.series)
        self.out.would = {s.path: s.state for s in after}
        if state == PRISTINE and tg.overall(after) != PATCHED:
            raise Refusal(
                "git am -3 applies, but the files do not match the manifest's patched sha256: {}".format(
                    ", ".join(f"{s.path}={s.state}" for s in after if s.state != PATCHED)
                )
            )
        self.out.action = "would-apply"
        self.out.note(
            "apply would succeed (git am -3 in a temporary clone)"
            + (
                ""
                if state == PRISTINE
                else "; the files differ from the release, so the result was not compared with the manifest's hashes"
            )
        )
        return OK

    def apply(self) -> int:
        states = tg.classify(self.target, self.series)
        commits, state = self._common(states)
        self._guard(states, "apply")
        if state == PATCHED:
            self.out.action = "already-patched"
            self.out.note("already patched: nothing to do")
            return OK
        start = head(self.target)
        _sequence(
            self.target,
            ["am", "-3", "--quiet"] + [str(p) for p in self.series.patch_paths()],
            "git am -3 failed, aborted (nothing applied)",
        )
        after = tg.classify(self.target, self.series)
        new_commits, _ = self._common(after)
        if state == PRISTINE and tg.overall(after) != PATCHED:
            _git(self.target, ["reset", "--keep", start])
            self._common(tg.classify(self.target, self.series))
            raise Refusal(
                "git am applied the series but the files do not match the manifest's patched "
                f"sha256; reset to {start[:12]}"
            )
        if len(new_commits) != len(self.series.patches):
            self.out.warn(
                f"{len(new_commits)} of {len(self.series.patches)} new commits carry the trailer "
                f"{TRAILER}: {self.series.name}; revert will not find the others"
            )
        self.out.action = "applied"
        self.out.note(
            "applied series {} with git am -3: {}".format(self.series.name, ", ".join(c[:12] for c in new_commits))
        )
        return OK

    def revert(self) -> int:
        states = tg.classify(self.target, self.series)
        commits, state = self._common(states)
        if not commits:
            if state == PATCHED:
                raise Refusal(
                    f"the files are patched, but no commit in HEAD's history carries {TRAILER}: {self.series.name}; "
                    "revert by hand"
                )
            self.out.action = "already-pristine"
            self.out.note(f"no commit of series {self.series.name} to revert: nothing to do")
            return OK
        self._guard(states, "revert")
        _sequence(self.target, ["revert", "--no-edit"] + commits, "git revert failed, aborted (nothing reverted)")
        paths = [s.path for s in states]
        identical = (
            _git(self.target, ["diff", "--quiet", commits[-1] + "^", "HEAD", "--"] + paths, check=False).returncode == 0
        )
        self._common(tg.classify(self.target, self.series))
        self.out.action = "reverted"
        self.out.note(
            f"reverted {len(commits)} commit{'' if len(commits) == 1 else 's'} of series {self.series.name} "
            "with git revert"
        )
        if identical:
            self.out.note(f"the touched files are byte-identical to {commits[-1][:12]}^")
        else:
            self.out.warn(f"the touched files differ from {commits[-1][:12]}^ (later commits changed them)")
        return OK

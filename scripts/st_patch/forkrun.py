"""Putting a fork back where a ``git am`` / ``git revert`` of this tool started, and finding a run that was killed.

``git am`` / ``git revert`` run in a session of their own inside a critical block, so a Ctrl-C or
SIGTERM is held until git returns. After a failure or a held signal the fork is put back (``--abort``,
then HEAD, the branch, the index and the touched files) and that is verified with git before the
command says so; what cannot be put back is reported with the commands that do it. A record in
``$(git rev-parse --git-path st-patch)/run.json`` (start commit and branch) lets the next run find a
run that was killed (``kill -9``) half-way.

The two classes are the halves of ``fork.ForkBackend`` that do this (they use its ``target``,
``series``, ``root``, ``touched`` and ``out``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from . import gitrun, signals
from . import targets as tg
from .forkgit import ABORT, branch, dirty_paths, git, git_path, head, operation_in_progress, short_ref, staged_paths
from .forkstate import REVERTS, TRAILER
from .outcome import Interrupted, Refusal
from .targets import PATCHED, Target

RECORD = "run.json"


@dataclass
class Start:
    sha: str
    branch: str | None


def _record_path(target: Target) -> Path:
    return git_path(target, "st-patch") / RECORD


def write_record(target: Target, data: dict) -> None:
    path = _record_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(RECORD + ".tmp")
    with open(str(tmp), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(str(tmp), str(path))


def drop_record(target: Target) -> None:
    path = _record_path(target)
    for p in (path, path.with_name(RECORD + ".tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    try:
        path.parent.rmdir()
    except OSError:
        pass


def read_record(target: Target) -> Tuple[Path, dict | None]:
    path = _record_path(target)
    if not path.exists():
        return path, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("start"), str):
            raise ValueError("no start commit")
    except (OSError, ValueError) as exc:
        return path, {"unreadable": str(exc)}
    return path, data


class PutBack:
    """Run git's sequence with signals held, and put the fork back after a failure or a signal."""

    def _own(self, sha: str, operation: str) -> bool:
        """Whether ``sha`` is a commit this tool's ``operation`` makes: a series commit (apply) or a
        revert of one (revert)."""
        body = git(self.target, ["log", "-1", "--format=%B", sha]).stdout
        lines = [line.strip() for line in body.splitlines()]
        if operation == "apply":
            return any(
                line.startswith(TRAILER + ":") and line.split(":", 1)[1].strip() == self.series.name for line in lines
            )
        for line in lines:
            if line.startswith(REVERTS):
                reverted = line[len(REVERTS) :].split()[0].rstrip(".,")
                if git(self.target, ["cat-file", "-e", reverted + "^{commit}"], check=False).returncode == 0:
                    return self._own(reverted, "apply")
        return False

    def _on_top(self, start: Start) -> Tuple[List[str], str | None]:
        """Commits on HEAD that are not in ``start``, and why they cannot be removed (or None)."""
        now = head(self.target)
        if now == start.sha:
            return [], None
        ancestor = git(self.target, ["merge-base", "--is-ancestor", start.sha, now], check=False).returncode == 0
        if not ancestor:
            return [], f"HEAD ({now[:12]}) does not descend from the start commit {start.sha[:12]}"
        shas = git(self.target, ["rev-list", f"{start.sha}..{now}"]).stdout.split()
        return shas, None

    def _differences(self, start: Start) -> List[str]:
        """How the fork differs from ``start`` (no sequence, same branch and HEAD, index and touched files)."""
        diffs = []
        lock = git_path(self.target, "index.lock")
        if lock.exists():
            diffs.append(f"{lock} exists")
        busy = operation_in_progress(self.target)
        if busy:
            diffs.append(f"a git {busy} is in progress")
        now_branch = branch(self.target)
        if now_branch != start.branch:
            diffs.append(f"HEAD is on {short_ref(now_branch)}, not {short_ref(start.branch)}")
        now = git(self.target, ["rev-parse", "--verify", "-q", "HEAD"], check=False).stdout.strip()
        if now != start.sha:
            diffs.append(f"HEAD is {now[:12] or '?'}, not {start.sha[:12]}")
        if start.branch:
            ref = git(self.target, ["rev-parse", "--verify", "-q", start.branch], check=False).stdout.strip()
            if ref != start.sha:
                diffs.append(f"{short_ref(start.branch)} is {ref[:12] or '?'}, not {start.sha[:12]}")
        proc = git(self.target, ["diff", "--cached", "--quiet", "--no-renames", start.sha, "--"], check=False)
        if proc.returncode == 1:
            diffs.append(f"the index differs from {start.sha[:12]}")
        elif proc.returncode:
            diffs.append(f"cannot compare the index with {start.sha[:12]}: {gitrun.message(proc)}")
        try:
            dirty = dirty_paths(self.target, self.touched)
        except Refusal as exc:
            diffs.append(str(exc))
        else:
            if dirty:
                diffs.append("uncommitted changes to touched files: " + ", ".join(dirty))
        return diffs

    def _commands(self, start: Start) -> str:
        lock = git_path(self.target, "index.lock")
        steps = []
        if lock.exists():
            steps.append(f"rm {lock}  (only when no git command runs in {self.root})")
        busy = operation_in_progress(self.target)
        if busy:
            steps.append(f"git -C {self.root} {ABORT[busy][4:]}")
        if start.branch and branch(self.target) != start.branch:
            steps.append(f"git -C {self.root} switch {short_ref(start.branch)}")
        steps.append(f"git -C {self.root} reset --keep {start.sha}")
        steps.append(f"git -C {self.root} status  (HEAD {start.sha[:12]}, nothing staged)")
        return "; ".join(steps)

    def _restore_touched(self, start: Start) -> None:
        """Index and work tree of the touched files as in ``start`` (they were clean when the run began)."""
        listed = git(self.target, ["ls-tree", "-r", "--name-only", start.sha, "--"] + self.touched).stdout.split("\n")
        existing = [p for p in listed if p]
        if existing:
            git(self.target, ["checkout", "-q", start.sha, "--"] + existing, check=False)
        for rel in self.touched:
            if rel in existing:
                continue
            git(self.target, ["rm", "-q", "--cached", "--ignore-unmatch", "--", rel], check=False)
            spec = self.series.files[rel]
            state = tg.classify_file(self.target, spec)
            if state.state == PATCHED:  # what the series creates, and nothing else: it was absent at start
                self.target.path(rel).unlink()

    def _put_back(self, start: Start, operation: str) -> List[str]:
        """Abort git's sequence and bring HEAD, the branch, the index and the touched files back to
        ``start``; verify. Returns what still differs (empty: restored)."""
        ident = gitrun.identity(self.root, author=True)
        busy = operation_in_progress(self.target)
        if busy == ("am" if operation == "apply" else "revert"):
            git(self.target, [busy, "--abort"], check=False, env=ident)
        if operation_in_progress(self.target) or git_path(self.target, "index.lock").exists():
            return self._differences(start)
        if branch(self.target) != start.branch:
            return self._differences(start)
        shas, why = self._on_top(start)
        if why or not all(self._own(sha, operation) for sha in shas):
            return self._differences(start)
        if shas:
            keep = git(self.target, ["reset", "-q", "--keep", start.sha], check=False, env=ident)
            if keep.returncode:
                git(self.target, ["reset", "-q", "--soft", start.sha], check=False, env=ident)
        if self._differences(start):
            self._restore_touched(start)
        return self._differences(start)

    def _sequence(self, args: List[str], operation: str, verify) -> None:
        """Run ``git am`` / ``git revert`` (``args``) with signals held; put the fork back after a failure,
        a signal held while git ran, or a failed ``verify()`` (which returns an error text or None)."""
        start = Start(head(self.target), branch(self.target))
        write_record(
            self.target,
            {"command": operation, "series": self.series.name, "start": start.sha, "branch": start.branch},
        )
        ident = gitrun.identity(self.root, author=operation == "revert")
        guard = signals.current()
        with guard.critical():
            try:
                proc = gitrun.run(args, self.root, check=False, env=ident, own_session=True)
                failure = gitrun.message(proc) if proc.returncode else None
            except gitrun.GitError as exc:
                failure = str(exc)
            during = guard.take()  # a signal that arrived while git ran
            if failure is None and during is None:
                failure = verify()
            diffs = self._put_back(start, operation) if failure or during else []
            if not diffs:
                drop_record(self.target)
        what = " ".join(["git"] + args[:2] if args[0] == "am" else ["git", "revert"])
        if diffs:
            raise Refusal(
                "{} {}{}, and the fork could not be put back to {} on {}: {}. It may hold part of the change. "
                "To put it back: {}".format(
                    what,
                    f"was interrupted ({during})" if during else "failed",
                    f": {failure}" if failure else "",
                    start.sha[:12],
                    short_ref(start.branch),
                    "; ".join(diffs),
                    self._commands(start),
                )
            )
        if during:
            raise Interrupted(
                f"interrupted ({during}) while {what} ran; the fork is back at {start.sha[:12]} on "
                f"{short_ref(start.branch)} (verified: no git operation in progress, HEAD, branch, index and "
                "touched files as they were)"
            )
        if failure:
            raise SequenceFailed(failure, start)
        late = guard.take()
        if late:
            self.out.note(f"{late} arrived after {what} had completed and was verified: the change is complete")


class KilledRun:
    """A run killed half-way (its record is left): report it, or put the fork back before apply/revert."""

    def _interrupted(self) -> dict | None:
        """A record left by a killed run, analysed: None when there is none."""
        path, data = read_record(self.target)
        if data is None:
            return None
        info: dict = {"record": str(path)}
        if "unreadable" in data:
            info.update(restorable=False, at_start=False, why=f"unreadable record: {data['unreadable']}")
            info["commands"] = f"rm {path}"
            return info
        start = Start(data["start"], data.get("branch"))
        operation = data.get("command", "apply")
        info.update(command=operation, start=start.sha, branch=start.branch, series=data.get("series"))
        diffs = self._differences(start)
        info["differences"] = diffs
        info["at_start"] = not diffs
        why = None
        lock = git_path(self.target, "index.lock")
        busy = operation_in_progress(self.target)
        if lock.exists():
            why = f"{lock} exists"
        elif busy and busy != ("am" if operation == "apply" else "revert"):
            why = f"a git {busy} is in progress, not this tool's git {'am' if operation == 'apply' else 'revert'}"
        elif branch(self.target) != start.branch:
            why = f"HEAD is on {short_ref(branch(self.target))}, the run started on {short_ref(start.branch)}"
        else:
            shas, why = self._on_top(start)
            foreign = [s for s in shas if not self._own(s, operation)] if not why else []
            if foreign:
                why = "commits that are not the series' are on top of {}: {}".format(
                    start.sha[:12], ", ".join(s[:12] for s in foreign)
                )
            if not why:
                outside = [p for p in staged_paths(self.target, start.sha) if p not in self.touched]
                if outside:
                    why = "staged changes to files the series does not touch: " + ", ".join(outside)
        info["restorable"] = why is None
        info["why"] = why
        info["commands"] = self._commands(start) + f"; rm {path}"
        return info

    def _report_interrupted(self, info: dict) -> None:
        self.out.pending = info
        if info.get("at_start"):
            self.out.note(
                f"{info['record']} is left from an st-patch run that was killed before it changed anything "
                f"(the fork is at its start, {info['start'][:12]}); apply or revert removes it"
            )
            return
        if "start" not in info:
            self.out.warn(f"{info['record']}: {info['why']}; remove it: {info['commands']}")
            return
        self.out.warn(
            "an st-patch {} was interrupted (killed) in {}: it started at {} on {} and the fork is not back "
            "there ({}). {} To do it by hand: {}".format(
                info["command"],
                self.root,
                info["start"][:12],
                short_ref(info["branch"]),
                "; ".join(info["differences"]),
                "`st-patch apply` or `st-patch revert` puts it back first."
                if info["restorable"]
                else f"st-patch will not put it back ({info['why']}).",
                info["commands"],
            )
        )

    def _recover(self, action: str) -> None:
        """Before apply/revert: put back what a killed run left, or refuse (changing nothing)."""
        info = self._interrupted()
        if info is None:
            return
        if info.get("at_start"):
            drop_record(self.target)
            self.out.note(f"removed {info['record']}, left by a killed run that had changed nothing")
            return
        if not info.get("restorable"):
            self._report_interrupted(info)
            raise Refusal(
                "cannot {}: an interrupted st-patch run left {} as it is not ({}), and st-patch will not put "
                "it back: {}. Nothing was changed. By hand: {}".format(
                    action, self.root, "; ".join(info.get("differences", [])) or "-", info["why"], info["commands"]
                )
            )
        start = Start(info["start"], info["branch"])
        guard = signals.current()
        with guard.critical():
            diffs = self._put_back(start, info["command"])
        if diffs:
            raise Refusal(
                "cannot {}: the fork could not be put back to {} after an interrupted run: {}. By hand: {}".format(
                    action, start.sha[:12], "; ".join(diffs), info["commands"]
                )
            )
        drop_record(self.target)
        self.out.recovered = info
        self.out.note(
            f"an interrupted st-patch {info['command']} had left the fork half-way: put back to "
            f"{start.sha[:12]} on {short_ref(start.branch)} (verified)"
        )
        late = guard.take()
        if late:
            raise Interrupted(f"interrupted ({late}) after the fork was put back to {start.sha[:12]}; nothing applied")


class SequenceFailed(Exception):
    """git failed and the fork was put back (verified)."""

    def __init__(self, message: str, start: Start):
        super().__init__(message)
        self.start = start

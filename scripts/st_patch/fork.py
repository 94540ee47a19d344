"""The git-checkout backend (an ST fork): ``git am -3`` applies the series as commits, ``git revert`` undoes them.

State is per patch. A patch is *present* when a commit in HEAD's history is it (same ``git patch-id
--stable``, or the trailer ``St-Patch-Series: <name>`` and the patch's subject) and no later commit
reverts it (``This reverts commit X``), *reverted* when all its commits are reverted, *missing*
otherwise. The fork is ``patched`` only when every patch is present; ``apply`` on a ``partial`` fork
applies the missing patches, ``revert`` reverts the present ones.

``git am`` / ``git revert`` run in a session of their own inside a critical block, so a Ctrl-C or
SIGTERM is held until git returns. After a failure or a held signal the fork is put back (``--abort``,
then HEAD, the branch, the index and the touched files) and that is verified with git before the
command says so; what cannot be put back is reported with the commands that do it. A record in
``$(git rev-parse --git-path st-patch)/run.json`` (start commit and branch) lets the next run find a
run that was killed (``kill -9``) half-way: ``status`` and ``check`` report it, ``apply`` and
``revert`` put the fork back first when only this tool's commits and sequence are in the way.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from . import gitrun, signals
from . import targets as tg
from .manifest import Series
from .outcome import FAIL, OK, Interrupted, PatchReport, Refusal
from .resolve import Context
from .targets import MODIFIED, PARTIAL, PATCHED, PRISTINE, FileState, Target

TRAILER = "St-Patch-Series"
REVERTS = "This reverts commit "
PRESENT, MISSING, REVERTED = "present", "missing", "reverted"
RECORD = "run.json"
_ABORT = {
    "am": "git am --abort",
    "rebase": "git rebase --abort",
    "merge": "git merge --abort",
    "cherry-pick": "git cherry-pick --abort",
    "revert": "git revert --abort",
}


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
    """The git operation in progress (am, rebase, merge, cherry-pick, revert), or None."""
    apply_dir = _git_path(target, "rebase-apply")
    if apply_dir.exists():
        return "am" if (apply_dir / "applying").exists() else "rebase"
    if _git_path(target, "rebase-merge").exists():
        return "rebase"
    if _git_path(target, "MERGE_HEAD").exists():
        return "merge"
    if _git_path(target, "CHERRY_PICK_HEAD").exists():
        return "cherry-pick"
    if _git_path(target, "REVERT_HEAD").exists():
        return "revert"
    todo = _git_path(target, "sequencer") / "todo"
    if todo.exists():
        first = todo.read_text(encoding="utf-8", errors="replace").split(None, 1)
        return "revert" if first and first[0] == "revert" else "cherry-pick"
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


def staged_paths(target: Target, against: str = "HEAD") -> List[str]:
    """Paths whose index entry differs from ``against`` (what ``git am`` calls a "Dirty index")."""
    proc = _git(target, ["diff", "--cached", "--name-only", "-z", "--no-renames", against, "--"], check=False)
    if proc.returncode:
        raise Refusal(f"cannot compare the index with {against[:12]}: {gitrun.message(proc)}")
    return [p for p in proc.stdout.split("\0") if p]


def head(target: Target) -> str:
    return _git(target, ["rev-parse", "--verify", "HEAD"]).stdout.strip()


def branch(target: Target) -> str | None:
    """The ref HEAD points to (refs/heads/NAME), or None on a detached HEAD."""
    proc = _git(target, ["symbolic-ref", "-q", "HEAD"], check=False)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _short(ref: str | None) -> str:
    return ref[len("refs/heads/") :] if ref and ref.startswith("refs/heads/") else (ref or "(detached HEAD)")


# ----------------------------------------------------------------------------- per-patch state


def _patch_id(target: Target, text: str) -> str | None:
    out = _git(target, ["patch-id", "--stable"], input=text).stdout.split()
    return out[0] if out else None


def _subject(target: Target, text: str) -> str:
    """The subject ``git am`` gives the patch's commit (``git mailinfo``: unfolded, [PATCH] removed)."""
    proc = _git(target, ["mailinfo", os.devnull, os.devnull], input=text, check=False)
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
    proc = _git(target, ["log", "--no-merges", "--format=%H%x1f%s%x1f%B%x1e", rev, "--"] + paths)
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
        proc = _git(
            target,
            ["log", "--no-merges", "-p", "--full-diff", "--no-color", "--no-ext-diff", "--pretty=medium", rev, "--"]
            + paths,
            check=False,
        )
        if proc.returncode:  # e.g. a partial clone offline: the trailer and the subject still tell
            return commits
        log = proc.stdout
        ids = {}
        for line in _git(target, ["patch-id", "--stable"], input=log).stdout.splitlines():
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
    from .manifest import sha256

    states = []
    for spec in series.files.values():
        proc = _git(target, ["cat-file", "blob", f"{rev}:{spec.path}"], check=False, text=False)
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


def _names(patches: List[PatchState]) -> str:
    return ", ".join(p.name for p in patches) or "none"


# ----------------------------------------------------------------------------- start state and record


@dataclass
class Start:
    sha: str
    branch: str | None


def _record_path(target: Target) -> Path:
    return _git_path(target, "st-patch") / RECORD


def _write_record(target: Target, data: dict) -> None:
    path = _record_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(RECORD + ".tmp")
    with open(str(tmp), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(str(tmp), str(path))


def _drop_record(target: Target) -> None:
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


def _read_record(target: Target) -> Tuple[Path, dict | None]:
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


class ForkBackend:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.target = ctx.target
        self.series = ctx.series
        self.out = ctx.outcome
        self.root = self.target.root
        self.touched = list(self.series.files)

    # ------------------------------------------------------------------------- analysis

    def _analyse(self, rev: str = "HEAD") -> Tuple[List[PatchState], List[FileState], str]:
        """Per-patch and per-file state (files as on disk), and the whole fork's state, into the outcome."""
        patches = patch_states(self.target, self.series, rev)
        files = tg.classify(self.target, self.series) if rev == "HEAD" else classify_at(self.target, self.series, rev)
        by_files = tg.overall(files)
        present = [p for p in patches if p.state == PRESENT]
        if len(present) == len(patches):
            state = PATCHED
        elif present:
            state = PARTIAL
        elif by_files == PATCHED:  # the series' content without its commits (squashed, no trailer)
            state = PATCHED
            for p in patches:
                p.state = PRESENT
            self.out.note(
                "the touched files are the series' patched ones, but no commit in HEAD's history is one of its "
                f"patches (by patch-id or {TRAILER}: {self.series.name}): counted as present by content"
            )
        elif by_files == MODIFIED:
            state = MODIFIED  # a fork whose files diverge from the release, none of the series in it
        else:
            state = PRISTINE
        self.out.files = [s.report() for s in files]
        self.out.patches = [PatchReport(p.name, p.subject, p.state, list(p.commits)) for p in patches]
        self.out.state = state
        self.out.commits = [sha for p in patches for sha in p.active]
        if state == PARTIAL:
            self.out.note(
                "partial: present {}; missing {}; reverted {}".format(
                    *(_names([p for p in patches if p.state == s]) for s in (PRESENT, MISSING, REVERTED))
                )
            )
        return patches, files, state

    def _warn_detached(self) -> None:
        if branch(self.target) is None:
            self.out.warn(
                f"HEAD is detached at {head(self.target)[:12]}: commits made here are on no branch; "
                f"create one first: git -C {self.root} switch -c BRANCH"
            )

    def _blockers(self, action: str) -> List[str]:
        """Why ``git am`` / ``git revert`` cannot run now (the same reasons for check and apply)."""
        lock = _git_path(self.target, "index.lock")
        if lock.exists():
            return [
                f"{lock} exists: another git command is running in {self.root}, or one was killed and left it; "
                f"when no git command runs there, remove it: rm {lock}"
            ]
        busy = operation_in_progress(self.target)
        if busy:
            return [
                f"a git {busy} is in progress in {self.root}; finish it or abort it first: "
                f"git -C {self.root} {_ABORT[busy][4:]}"
            ]
        reasons = []
        staged = staged_paths(self.target)
        if staged:
            reasons.append(
                'staged changes in the index ({}); git {} needs a clean index ("Dirty index"): commit them, or '
                "unstage them with git -C {} restore --staged -- {}".format(
                    ", ".join(staged), "am" if action == "apply" else "revert", self.root, " ".join(staged)
                )
            )
        dirty = [p for p in dirty_paths(self.target, self.touched) if p not in staged]
        if dirty:
            self.out.dirty = dirty
            reasons.append(
                "uncommitted changes to files the series touches: {}; commit or stash them first".format(
                    ", ".join(dirty)
                )
            )
        return reasons

    def _refuse_if_blocked(self, action: str) -> None:
        reasons = self._blockers(action)
        if reasons:
            raise Refusal(f"cannot {action}: " + "; ".join(reasons) + ". Nothing was changed.")

    # ------------------------------------------------------------------------- putting the fork back

    def _own(self, sha: str, operation: str) -> bool:
        """Whether ``sha`` is a commit this tool's ``operation`` makes: a series commit (apply) or a
        revert of one (revert)."""
        body = _git(self.target, ["log", "-1", "--format=%B", sha]).stdout
        lines = [line.strip() for line in body.splitlines()]
        if operation == "apply":
            return any(
                line.startswith(TRAILER + ":") and line.split(":", 1)[1].strip() == self.series.name for line in lines
            )
        for line in lines:
            if line.startswith(REVERTS):
                reverted = line[len(REVERTS) :].split()[0].rstrip(".,")
                if _git(self.target, ["cat-file", "-e", reverted + "^{commit}"], check=False).returncode == 0:
                    return self._own(reverted, "apply")
        return False

    def _on_top(self, start: Start) -> Tuple[List[str], str | None]:
        """Commits on HEAD that are not in ``start``, and why they cannot be removed (or None)."""
        now = head(self.target)
        if now == start.sha:
            return [], None
        ancestor = _git(self.target, ["merge-base", "--is-ancestor", start.sha, now], check=False).returncode == 0
        if not ancestor:
            return [], f"HEAD ({now[:12]}) does not descend from the start commit {start.sha[:12]}"
        shas = _git(self.target, ["rev-list", f"{start.sha}..{now}"]).stdout.split()
        return shas, None

    def _differences(self, start: Start) -> List[str]:
        """How the fork differs from ``start`` (no sequence, same branch and HEAD, index and touched files)."""
        diffs = []
        lock = _git_path(self.target, "index.lock")
        if lock.exists():
            diffs.append(f"{lock} exists")
        busy = operation_in_progress(self.target)
        if busy:
            diffs.append(f"a git {busy} is in progress")
        now_branch = branch(self.target)
        if now_branch != start.branch:
            diffs.append(f"HEAD is on {_short(now_branch)}, not {_short(start.branch)}")
        now = _git(self.target, ["rev-parse", "--verify", "-q", "HEAD"], check=False).stdout.strip()
        if now != start.sha:
            diffs.append(f"HEAD is {now[:12] or '?'}, not {start.sha[:12]}")
        if start.branch:
            ref = _git(self.target, ["rev-parse", "--verify", "-q", start.branch], check=False).stdout.strip()
            if ref != start.sha:
                diffs.append(f"{_short(start.branch)} is {ref[:12] or '?'}, not {start.sha[:12]}")
        proc = _git(self.target, ["diff", "--cached", "--quiet", "--no-renames", start.sha, "--"], check=False)
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
        lock = _git_path(self.target, "index.lock")
        steps = []
        if lock.exists():
            steps.append(f"rm {lock}  (only when no git command runs in {self.root})")
        busy = operation_in_progress(self.target)
        if busy:
            steps.append(f"git -C {self.root} {_ABORT[busy][4:]}")
        if start.branch and branch(self.target) != start.branch:
            steps.append(f"git -C {self.root} switch {_short(start.branch)}")
        steps.append(f"git -C {self.root} reset --keep {start.sha}")
        steps.append(f"git -C {self.root} status  (HEAD {start.sha[:12]}, nothing staged)")
        return "; ".join(steps)

    def _restore_touched(self, start: Start) -> None:
        """Index and work tree of the touched files as in ``start`` (they were clean when the run began)."""
        listed = _git(self.target, ["ls-tree", "-r", "--name-only", start.sha, "--"] + self.touched).stdout.split("\n")
        existing = [p for p in listed if p]
        if existing:
            _git(self.target, ["checkout", "-q", start.sha, "--"] + existing, check=False)
        for rel in self.touched:
            if rel in existing:
                continue
            _git(self.target, ["rm", "-q", "--cached", "--ignore-unmatch", "--", rel], check=False)
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
            _git(self.target, [busy, "--abort"], check=False, env=ident)
        if operation_in_progress(self.target) or _git_path(self.target, "index.lock").exists():
            return self._differences(start)
        if branch(self.target) != start.branch:
            return self._differences(start)
        shas, why = self._on_top(start)
        if why or not all(self._own(sha, operation) for sha in shas):
            return self._differences(start)
        if shas:
            keep = _git(self.target, ["reset", "-q", "--keep", start.sha], check=False, env=ident)
            if keep.returncode:
                _git(self.target, ["reset", "-q", "--soft", start.sha], check=False, env=ident)
        if self._differences(start):
            self._restore_touched(start)
        return self._differences(start)

    # ------------------------------------------------------------------------- a killed run

    def _interrupted(self) -> dict | None:
        """A record left by a killed run, analysed: None when there is none."""
        path, data = _read_record(self.target)
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
        lock = _git_path(self.target, "index.lock")
        busy = operation_in_progress(self.target)
        if lock.exists():
            why = f"{lock} exists"
        elif busy and busy != ("am" if operation == "apply" else "revert"):
            why = f"a git {busy} is in progress, not this tool's git {'am' if operation == 'apply' else 'revert'}"
        elif branch(self.target) != start.branch:
            why = f"HEAD is on {_short(branch(self.target))}, the run started on {_short(start.branch)}"
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
                _short(info["branch"]),
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
            _drop_record(self.target)
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
        _drop_record(self.target)
        self.out.recovered = info
        self.out.note(
            f"an interrupted st-patch {info['command']} had left the fork half-way: put back to "
            f"{start.sha[:12]} on {_short(start.branch)} (verified)"
        )
        late = guard.take()
        if late:
            raise Interrupted(f"interrupted ({late}) after the fork was put back to {start.sha[:12]}; nothing applied")

    # ------------------------------------------------------------------------- running git am / revert

    def _sequence(self, args: List[str], operation: str, verify) -> None:
        """Run ``git am`` / ``git revert`` (``args``) with signals held; put the fork back after a failure,
        a signal held while git ran, or a failed ``verify()`` (which returns an error text or None)."""
        start = Start(head(self.target), branch(self.target))
        _write_record(
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
                _drop_record(self.target)
        what = " ".join(["git"] + args[:2] if args[0] == "am" else ["git", "revert"])
        if diffs:
            raise Refusal(
                "{} {}{}, and the fork could not be put back to {} on {}: {}. It may hold part of the change. "
                "To put it back: {}".format(
                    what,
                    f"was interrupted ({during})" if during else "failed",
                    f": {failure}" if failure else "",
                    start.sha[:12],
                    _short(start.branch),
                    "; ".join(diffs),
                    self._commands(start),
                )
            )
        if during:
            raise Interrupted(
                f"interrupted ({during}) while {what} ran; the fork is back at {start.sha[:12]} on "
                f"{_short(start.branch)} (verified: no git operation in progress, HEAD, branch, index and "
                "touched files as they were)"
            )
        if failure:
            raise _Failed(failure, start)
        late = guard.take()
        if late:
            self.out.note(f"{late} arrived after {what} had completed and was verified: the change is complete")

    # ------------------------------------------------------------------------- commands

    def status(self) -> int:
        info = self._interrupted()
        _, _, state = self._analyse()
        self._warn_detached()
        self.out.action = "none"
        if state == MODIFIED:
            self.out.note(
                f"the files differ from release {self.ctx.version} (a fork?): `check` tells whether the series "
                "applies with a 3-way merge"
            )
        dirty = dirty_paths(self.target, self.touched)
        if dirty:
            self.out.dirty = dirty
            self.out.note("uncommitted changes to touched files: {}".format(", ".join(dirty)))
        if info is not None:
            self._report_interrupted(info)
            if not info.get("at_start"):
                return FAIL
        return OK

    def check(self) -> int:
        info = self._interrupted()
        rev = "HEAD"
        if info is not None:
            self._report_interrupted(info)
            if not info.get("at_start"):
                if not info.get("restorable"):
                    raise Refusal(
                        "cannot apply: an interrupted st-patch run left the fork half-way and st-patch will not put "
                        "it back ({}). By hand: {}".format(info["why"], info["commands"])
                    )
                rev = info["start"]
                self.out.note(f"apply would first put the fork back to {rev[:12]} (the interrupted run)")
        patches, files, state = self._analyse(rev)
        self._warn_detached()
        if rev == "HEAD":
            self._refuse_if_blocked("apply")
        if state == PATCHED:
            self.out.action = "already-patched"
            self.out.note(
                "already patched: every patch of the series is present"
                + (" (commits {})".format(", ".join(c[:12] for c in self.out.commits)) if self.out.commits else "")
            )
            return OK
        todo = [p for p in patches if p.state != PRESENT]
        after = dry_run(self.target, self.series, rev, [p.path for p in todo])
        self.out.would = {s.path: s.state for s in after}
        exact = tg.overall(files) in (PRISTINE, PARTIAL)
        if exact and tg.overall(after) != PATCHED:
            raise Refusal(
                "git am -3 applies, but the files do not match the manifest's patched sha256: {}".format(
                    ", ".join(f"{s.path}={s.state}" for s in after if s.state != PATCHED)
                )
            )
        self.out.action = "would-apply"
        self.out.note(
            "apply would succeed: git am -3 of {} (tried in a temporary clone){}".format(
                _names(todo),
                ""
                if exact
                else "; the files differ from the release, so the result was not compared with the manifest's hashes",
            )
        )
        return OK

    def apply(self) -> int:
        self._recover("apply")
        patches, files, state = self._analyse()
        self._warn_detached()
        self._refuse_if_blocked("apply")
        if state == PATCHED:
            self.out.action = "already-patched"
            self.out.note("already patched: every patch of the series is present; nothing to do")
            return OK
        todo = [p for p in patches if p.state != PRESENT]
        exact = tg.overall(files) in (PRISTINE, PARTIAL)

        def verify() -> str | None:
            after = tg.classify(self.target, self.series)
            if exact and tg.overall(after) != PATCHED:
                return "git am applied the patches but the files do not match the manifest's patched sha256: " + (
                    ", ".join(f"{s.path}={s.state}" for s in after if s.state != PATCHED)
                )
            return None

        paths = [str(p.path) for p in todo]
        try:
            self._sequence(["am", "-3", "--quiet"] + paths, "apply", verify)
        except _Failed as exc:
            self._analyse()
            raise Refusal(
                "git am -3 of the missing patches ({}) failed and was aborted: {}. The fork is back at {} on {} "
                "(verified: no git am in progress, HEAD, branch, index and touched files as they were). "
                "To apply them by hand and resolve the conflicts: git -C {} am -3 {}".format(
                    _names(todo), exc, exc.start.sha[:12], _short(exc.start.branch), self.root, " ".join(paths)
                )
            ) from None
        patches, _, state = self._analyse()
        new = [sha for p in patches if p.name in {t.name for t in todo} for sha in p.active[:1]]
        if state != PATCHED:
            self.out.warn(
                "after git am, st-patch does not find every patch of the series in HEAD's history (missing: "
                + _names([p for p in patches if p.state != PRESENT])
                + "); status will not report the fork as patched"
            )
        self.out.action = "applied"
        self.out.note(
            "applied {} with git am -3: {}{}".format(
                _names(todo),
                ", ".join(c[:12] for c in new),
                "" if exact else " (the files differ from the release: not compared with the manifest's hashes)",
            )
        )
        return OK

    def revert(self) -> int:
        self._recover("revert")
        patches, _, state = self._analyse()
        self._warn_detached()
        present = [p for p in patches if p.state == PRESENT]
        commits = [p.active[0] for p in present if p.active]
        if not commits:
            if present:
                raise Refusal(
                    f"the files are patched, but no commit in HEAD's history is a patch of series {self.series.name}; "
                    "revert by hand"
                )
            self.out.action = "already-pristine"
            self.out.note(f"no patch of series {self.series.name} is present: nothing to revert")
            return OK
        self._refuse_if_blocked("revert")
        order = _git(self.target, ["rev-list", "--topo-order", "HEAD", "--"] + self.touched).stdout.split()
        commits.sort(key=lambda sha: order.index(sha) if sha in order else -1)  # newest first
        try:
            self._sequence(["revert", "--no-edit"] + commits, "revert", lambda: None)
        except _Failed as exc:
            self._analyse()
            raise Refusal(
                "git revert of {} failed and was aborted: {}. The fork is back at {} (verified). "
                "Revert by hand: git -C {} revert {}".format(
                    ", ".join(c[:12] for c in commits), exc, exc.start.sha[:12], self.root, " ".join(commits)
                )
            ) from None
        identical = (
            _git(
                self.target, ["diff", "--quiet", commits[-1] + "^", "HEAD", "--"] + self.touched, check=False
            ).returncode
            == 0
        )
        self._analyse()
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


class _Failed(Exception):
    """git failed and the fork was put back (verified)."""

    def __init__(self, message: str, start: Start):
        super().__init__(message)
        self.start = start


def dry_run(target: Target, series: Series, rev: str, patches: List[Path]) -> List[FileState]:
    """``git am -3`` ``patches`` in a throw-away shared clone at ``rev``; return the files' states there."""
    commit = _git(target, ["rev-parse", "--verify", rev + "^{commit}"]).stdout.strip()
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
            ["am", "-3", "--quiet"] + [str(p) for p in patches],
            clone,
            check=False,
            ceiling=Path(tmp),
            env=gitrun.identity(target.root),
        )
        if proc.returncode:
            raise Refusal(
                "git am -3 of {} would fail: {}".format(", ".join(p.name for p in patches), gitrun.message(proc))
            )
        return tg.classify(shadow, series)

"""What git says about a fork: the operation in progress, the index, HEAD and its branch.

Every call goes through ``gitrun`` (isolated from the user's configuration); a failing git command is
a Refusal naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from . import gitrun
from .outcome import Refusal
from .targets import Target

ABORT = {
    "am": "git am --abort",
    "rebase": "git rebase --abort",
    "merge": "git merge --abort",
    "cherry-pick": "git cherry-pick --abort",
    "revert": "git revert --abort",
}


def git(target: Target, args: List[str], check: bool = True, **kw):
    try:
        return gitrun.run(args, target.root, check=check, **kw)
    except gitrun.GitError as exc:
        raise Refusal(str(exc)) from None


def git_path(target: Target, name: str) -> Path:
    out = git(target, ["rev-parse", "--git-path", name]).stdout.strip()
    path = Path(out)
    return path if path.is_absolute() else target.root / path


def operation_in_progress(target: Target) -> str | None:
    """The git operation in progress (am, rebase, merge, cherry-pick, revert), or None."""
    apply_dir = git_path(target, "rebase-apply")
    if apply_dir.exists():
        return "am" if (apply_dir / "applying").exists() else "rebase"
    if git_path(target, "rebase-merge").exists():
        return "rebase"
    if git_path(target, "MERGE_HEAD").exists():
        return "merge"
    if git_path(target, "CHERRY_PICK_HEAD").exists():
        return "cherry-pick"
    if git_path(target, "REVERT_HEAD").exists():
        return "revert"
    todo = git_path(target, "sequencer") / "todo"
    if todo.exists():
        first = todo.read_text(encoding="utf-8", errors="replace").split(None, 1)
        return "revert" if first and first[0] == "revert" else "cherry-pick"
    return None


def dirty_paths(target: Target, paths: List[str]) -> List[str]:
    """Touched paths with uncommitted changes (staged, unstaged or untracked)."""
    proc = git(target, ["status", "--porcelain", "-z", "--untracked-files=all", "--"] + paths)
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
    proc = git(target, ["diff", "--cached", "--name-only", "-z", "--no-renames", against, "--"], check=False)
    if proc.returncode:
        raise Refusal(f"cannot compare the index with {against[:12]}: {gitrun.message(proc)}")
    return [p for p in proc.stdout.split("\0") if p]


def head(target: Target) -> str:
    return git(target, ["rev-parse", "--verify", "HEAD"]).stdout.strip()


def branch(target: Target) -> str | None:
    """The ref HEAD points to (refs/heads/NAME), or None on a detached HEAD."""
    proc = git(target, ["symbolic-ref", "-q", "HEAD"], check=False)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def short_ref(ref: str | None) -> str:
    return ref[len("refs/heads/") :] if ref and ref.startswith("refs/heads/") else (ref or "(detached HEAD)")


def blockers(target: Target, touched: List[str], action: str) -> Tuple[List[str], List[str]]:
    """Why ``git am`` / ``git revert`` cannot run now (the same reasons for check and apply), and the
    touched files with uncommitted changes."""
    lock = git_path(target, "index.lock")
    if lock.exists():
        reason = (
            f"{lock} exists: another git command is running in {target.root}, or one was killed and left it; "
            f"when no git command runs there, remove it: rm {lock}"
        )
        return [reason], []
    busy = operation_in_progress(target)
    if busy:
        reason = f"a git {busy} is in progress in {target.root}; finish it or abort it first: git -C {target.root} "
        return [reason + ABORT[busy][4:]], []
    reasons = []
    staged = staged_paths(target)
    if staged:
        reasons.append(
            'staged changes in the index ({}); git {} needs a clean index ("Dirty index"): commit them, or '
            "unstage them with git -C {} restore --staged -- {}".format(
                ", ".join(staged), "am" if action == "apply" else "revert", target.root, " ".join(staged)
            )
        )
    dirty = [p for p in dirty_paths(target, touched) if p not in staged]
    if dirty:
        reasons.append(
            "uncommitted changes to files the series touches: {}; commit or stash them first".format(", ".join(dirty))
        )
    return reasons, dirty

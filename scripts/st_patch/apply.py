"""Everything that changes a target: patch transforms with git, the journal, git am / git revert.

Source trees and installed packages: the touched files are copied LF-normalised into a temporary
directory, the series is applied there with ``git apply`` (forward, or ``-R`` in reverse order),
line endings are restored, every result is checked against the manifest's sha256, and only then is
the target changed, through a journal (``sentence_transformers/.st-patch/journal/``) that holds the
originals and the new contents, so that an interrupted run is rolled back, at once or by the next
st-patch command.

Git checkouts: ``git am -3`` / ``git revert`` of the commits carrying ``St-Patch-Series: <name>``.

One st-patch run at a time per target (``exclusive``): a second one waits for the first, then fails
with a clear error after ``ST_PATCH_LOCK_TIMEOUT`` seconds (default 60) without touching anything.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from .manifest import ManifestError, Series, sha256, to_lf, with_eol
from .targets import (
    GIT,
    PATCHED,
    PRISTINE,
    SKIPPED,
    FileState,
    Target,
    classify,
    file_eol,
    overall,
    target_eol,
)

TOOL_VERSION = "1.0.0"
TRAILER = "St-Patch-Series"
JOURNAL_DIR = "journal"
JOURNAL_FILE = "journal.json"
STATE_FILE = "state.json"
TMP_SUFFIX = ".st-patch-tmp"

# Options that make `git apply` on the temporary copies independent of the user's git config.
_ISOLATED = ["-c", "core.autocrlf=false", "-c", "core.safecrlf=false", "-c", "apply.whitespace=nowarn"]
_GIT_ENV_DROP = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_PREFIX",
    "GIT_COMMON_DIR",
)


class ApplyError(Exception):
    """The series does not apply or does not verify (not applicable: exit 1)."""


class TransactionError(ApplyError):
    """Changing the target failed; ``recovery`` says what was done about it."""

    def __init__(self, message: str, recovery: dict | None = None, interrupted: bool = False):
        super().__init__(message)
        self.recovery = recovery
        self.interrupted = interrupted


# --------------------------------------------------------------------------------------------- git


def _env(isolated_in: Path | None = None) -> Dict[str, str]:
    env = dict(os.environ)
    for key in _GIT_ENV_DROP:
        env.pop(key, None)
    env["LC_ALL"] = "C"
    if isolated_in is not None:  # never let git find a repository above the temporary directory
        env["GIT_CEILING_DIRECTORIES"] = str(isolated_in)
    return env


def git(
    args: List[str], cwd: Path, check: bool = True, env: Dict[str, str] | None = None, isolated: bool = False
) -> subprocess.CompletedProcess:
    cmd = ["git"] + (_ISOLATED if isolated else []) + list(args)
    try:
        return subprocess.run(cmd, cwd=str(cwd), env=env or _env(), capture_output=True, text=True, check=check)
    except FileNotFoundError:
        raise ApplyError("git is required but was not found on PATH") from None
    except subprocess.CalledProcessError as exc:
        raise ApplyError("`{}` failed in {}: {}".format(" ".join(cmd), cwd, _git_message(exc))) from None


def _git_message(proc) -> str:
    text = ((proc.stderr or "") + "\n" + (proc.stdout or "")).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-12:]) or f"exit status {proc.returncode}"


def _glob_escape(path: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]\\" else c for c in path)


def touched_paths(patch: Path, cwd: Path, env: Dict[str, str]) -> List[str]:
    """The paths a patch changes (``git apply --numstat -z``, pre- and post-image of renames)."""
    proc = git(["apply", "--numstat", "-z", str(patch)], cwd, check=False, env=env, isolated=True)
    if proc.returncode:
        raise ManifestError(f"cannot read patch {patch}: {_git_message(proc)}")
    tokens = proc.stdout.split("\0")
    paths: List[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token:
            continue
        fields = token.split("\t", 2)
        if len(fields) == 3 and fields[2]:
            paths.append(fields[2])
        elif len(fields) == 3:  # a rename: the two paths follow as separate tokens
            paths.extend(tokens[i : i + 2])
            i += 2
    if not paths:
        raise ManifestError(f"patch {patch} changes no file")
    return paths


# ----------------------------------------------------------------------------- transform + verify


def transform(
    target: Target, series: Series, states: List[FileState], reverse: bool = False
) -> Dict[str, bytes | None]:
    """New contents of every managed file after applying (or reverse-applying) the series.

    Works on LF copies in a temporary directory; the result is in each file's line ending (new
    files get the target's). None means the file does not exist afterwards. The target is not
    touched.
    """
    default_eol = target_eol(states)
    managed = [s for s in states if s.state != SKIPPED]
    source_side = "patched" if reverse else "pristine"
    with tempfile.TemporaryDirectory(prefix="st-patch-") as tmp:
        env = _env(isolated_in=Path(tmp))
        work = Path(tmp) / "tree"
        work.mkdir()
        for state in managed:
            # Leftovers of the other side (e.g. a created module that survived a reinstall) stay out.
            if state.exists and getattr(state.spec, source_side) is not None:
                dest = work.joinpath(*state.path.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(to_lf(state.data))
        patches = series.patch_paths()
        for patch in reversed(patches) if reverse else patches:
            paths = touched_paths(patch, work, env)
            unknown = [p for p in paths if p not in series.files]
            if unknown:
                raise ManifestError(
                    "patch {} changes {}, which the manifest does not list for series {}".format(
                        patch.name, ", ".join(unknown), series.name
                    )
                )
            include = [p for p in paths if target.in_scope(p)]
            if not include:
                continue
            args = ["apply", "--whitespace=nowarn"] + (["-R"] if reverse else [])
            args += ["--include=" + _glob_escape(p) for p in include] + [str(patch)]
            proc = git(args, work, check=False, env=env, isolated=True)
            if proc.returncode:
                raise ApplyError(
                    "git apply{} {} does not apply: {}".format(" -R" if reverse else "", patch.name, _git_message(proc))
                )
        result: Dict[str, bytes | None] = {}
        for state in managed:
            produced = work.joinpath(*state.path.split("/"))
            result[state.path] = (
                with_eol(produced.read_bytes(), file_eol(state, default_eol)) if produced.is_file() else None
            )
    return result


def verify(result: Dict[str, bytes | None], states: List[FileState], side: str) -> List[dict]:
    """Compare a transform's result with the manifest's ``side`` (PATCHED or PRISTINE) hashes."""
    default_eol = target_eol(states)
    problems = []
    for state in states:
        if state.state == SKIPPED:
            continue
        hashes = state.spec.patched if side == PATCHED else state.spec.pristine
        data = result.get(state.path)
        eol = file_eol(state, default_eol)
        if hashes is None:
            if data is not None:
                problems.append({"path": state.path, "sha256": sha256(data), "expected": None})
            continue
        expected = hashes.expected(eol)
        got = sha256(data) if data is not None else None
        if got != expected:
            problems.append({"path": state.path, "sha256": got, "expected": expected, "eol": eol})
    return problems


def describe_problems(problems: List[dict], side: str) -> str:
    parts = []
    for p in problems:
        if p["expected"] is None:
            parts.append("{} should not exist when {} but would (sha256 {})".format(p["path"], side, p["sha256"]))
        else:
            parts.append(
                "{} would have sha256 {}, the manifest's {} {} sha256 is {}".format(
                    p["path"], p["sha256"] or "(absent)", side, p["eol"].upper(), p["expected"]
                )
            )
    return "; ".join(parts)


# ----------------------------------------------------------------------------- durable file writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then os.replace it into place."""
    tmp = path.with_name("." + path.name + TMP_SUFFIX)
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if mode is not None:
            os.chmod(str(tmp), mode)
        os.replace(str(tmp), str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(str(tmp))
        raise
    _fsync_dir(path.parent)


def _drop_bytecode(path: Path) -> None:
    """Remove ``__pycache__/<stem>.*.pyc`` of a replaced module so no stale bytecode survives."""
    cache = path.parent / "__pycache__"
    if path.suffix == ".py" and cache.is_dir():
        for pyc in cache.glob(path.stem + ".*.pyc"):
            with contextlib.suppress(OSError):
                pyc.unlink()
        with contextlib.suppress(OSError):
            cache.rmdir()  # only when now empty


def _remove(path: Path, stop: Path) -> None:
    """Delete a file, then its parent directories that became empty (below ``stop``)."""
    if path.is_file() or path.is_symlink():
        path.unlink()
    _drop_bytecode(path)
    parent = path.parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    _fsync_dir(parent)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while the target is being changed (main thread only)."""

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError, AttributeError):  # not the main thread / no SIGTERM
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------ lock


@contextlib.contextmanager
def exclusive(target: Target, timeout: float | None = None):
    """Hold an advisory lock on the target for the whole command.

    The lock is a ``flock`` on the package's ``__init__.py``: a file every target has and no series
    touches, so the lock leaves nothing behind (a lock file would be litter in a pristine package
    and an untracked file in a fork) and dies with the process that held it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    if timeout is None:
        timeout = float(os.environ.get("ST_PATCH_LOCK_TIMEOUT") or 60)
    path = target.package_dir / "__init__.py"
    with open(path, "rb") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ApplyError(
                        f"another st-patch run is working on {target.root} (it holds a lock on {path}) and did not "
                        f"finish within {timeout:g} s; nothing was changed. Wait for it to finish and run this "
                        "command again (ST_PATCH_LOCK_TIMEOUT sets the wait in seconds)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------- journal


def journal_dir(target: Target) -> Path:
    return target.state_dir / JOURNAL_DIR


def read_state(target: Target) -> dict | None:
    path = target.state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"error": f"unreadable {path}"}


def _mode_of(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _begin(target: Target, op: str, series: Series, release: str | None, changes: Dict[str, bytes | None]) -> dict:
    """Save originals and new contents, then write journal.json (the point of no return)."""
    jdir = journal_dir(target)
    if jdir.exists():
        shutil.rmtree(str(jdir))
    (jdir / "orig").mkdir(parents=True)
    (jdir / "new").mkdir()
    entries = []
    for index, rel in enumerate(sorted(changes)):
        path = target.path(rel)
        original = path.read_bytes() if path.is_file() else None
        new = changes[rel]
        entry = {
            "path": rel,
            "mode": _mode_of(path),
            "orig": None,
            "orig_sha256": None,
            "new": None,
            "new_sha256": None,
        }
        for key, data in (("orig", original), ("new", new)):
            if data is not None:
                name = f"{key}/{index}"
                atomic_write(jdir / name, data)
                entry[key] = name
                entry[key + "_sha256"] = sha256(data)
        entries.append(entry)
    journal = {
        "format": 1,
        "op": op,
        "series": series.name,
        "release": release,
        "kind": target.kind,
        "started": _now(),
        "tool_version": TOOL_VERSION,
        "entries": entries,
    }
    atomic_write(jdir / JOURNAL_FILE, (json.dumps(journal, indent=2) + "\n").encode("utf-8"))
    return journal


def _put(target: Target, entry: dict, side: str, jdir: Path) -> None:
    """Make the target file equal to the journal's ``side`` ("orig" or "new") copy."""
    path = target.path(entry["path"])
    ref = entry[side]
    if ref is None:
        _remove(path, target.root)
        return
    data = (jdir / ref).read_bytes()
    if sha256(data) != entry[side + "_sha256"]:
        raise ApplyError("journal copy {} of {} is corrupt".format(jdir / ref, entry["path"]))
    if path.is_file() and sha256(path.read_bytes()) == entry[side + "_sha256"]:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, entry.get("mode"))
    _drop_bytecode(path)


def _commit(target: Target, state: dict | None) -> None:
    """Record the outcome, then remove journal.json: the commit point. Cleanup after it is best effort."""
    jdir = journal_dir(target)
    if state is not None:
        atomic_write(target.state_dir / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode("utf-8"))
    os.unlink(str(jdir / JOURNAL_FILE))
    _fsync_dir(jdir)
    with contextlib.suppress(OSError):
        shutil.rmtree(str(target.state_dir if state is None else jdir))
        _fsync_dir(target.package_dir)


def recover(target: Target, to: str = PRISTINE) -> dict | None:
    """Undo an unfinished transaction; None when there is none.

    ``to=PRISTINE`` (start of every command): an interrupted apply is rolled back, an interrupted
    revert is completed; either way the target ends pristine. ``to="before"`` (a failure inside
    this process): the target gets back what it had before the command.
    """
    if target.kind == GIT:
        return None
    jdir = journal_dir(target)
    if not jdir.is_dir():
        return None
    jfile = jdir / JOURNAL_FILE
    if not jfile.is_file():  # interrupted while preparing: the target was never changed
        shutil.rmtree(str(jdir))
        return {"op": None, "action": "discarded an incomplete journal (the target had not been changed)", "files": []}
    try:
        journal = json.loads(jfile.read_text(encoding="utf-8"))
        op = journal["op"]
        entries = journal["entries"]
    except (OSError, ValueError, KeyError) as exc:
        raise ApplyError(
            f"journal {jfile} is unreadable ({exc}); restore the package by reinstalling it and "
            f"delete {target.state_dir}"
        ) from None
    side = "orig" if (to != PRISTINE or op == "apply") else "new"
    for entry in entries:
        _put(target, entry, side, jdir)
    ended_pristine = (op == "apply") == (side == "orig")
    os.unlink(str(jfile))
    if ended_pristine:
        shutil.rmtree(str(target.state_dir))
    else:
        shutil.rmtree(str(jdir))
    _fsync_dir(target.package_dir)
    what = "rolled back" if side == "orig" else "completed"
    return {
        "op": op,
        "series": journal.get("series"),
        "started": journal.get("started"),
        "action": "{} the interrupted {} from the journal; the target is {}".format(
            what, op, "pristine" if ended_pristine else "patched"
        ),
        "files": [e["path"] for e in entries],
    }


def transaction(
    target: Target, op: str, series: Series, release: str | None, changes: Dict[str, bytes | None], state: dict | None
) -> None:
    """Apply ``changes`` (path -> new bytes, None = delete) all-or-nothing via the journal."""
    try:
        _begin(target, op, series, release, changes)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            shutil.rmtree(str(journal_dir(target)))
            if not any(target.state_dir.iterdir()):
                target.state_dir.rmdir()
        if isinstance(exc, KeyboardInterrupt):
            raise TransactionError("interrupted before the target was changed", None, True) from None
        if isinstance(exc, OSError):
            raise TransactionError(
                f"cannot write the journal in {target.state_dir}: {exc} (nothing was changed)"
            ) from None
        raise
    jdir = journal_dir(target)
    try:
        with _sigterm_as_interrupt():
            for rel in sorted(changes):
                _write_new(target, rel, changes[rel])
            _commit(target, state)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = "interrupted" if interrupted else f"failed ({type(exc).__name__}: {exc})"
        try:
            recovery = recover(target, to="before")
        except BaseException as again:
            raise TransactionError(
                f"{op} {reason}; rolling back failed too ({again}). The journal in {jdir} is kept: the next st-patch "
                "command rolls the target back to pristine.",
                None,
                interrupted,
            ) from None
        raise TransactionError(
            f"{op} {reason}; the target was restored from the journal", recovery, interrupted
        ) from None


def _write_new(target: Target, rel: str, data: bytes | None) -> None:
    path = target.path(rel)
    if data is None:
        _remove(path, target.root)
        return
    mode = _mode_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode)
    _drop_bytecode(path)


def state_record(target: Target, series: Series, release: str | None, how: str) -> dict:
    return {
        "format": 1,
        "series": series.name,
        "patches": list(series.patches),
        "release": release,
        "detected": how,
        "kind": target.kind,
        "applied": _now(),
        "tool": "st-patch",
        "tool_version": TOOL_VERSION,
        "files": {
            rel: (spec.patched.to_json() if spec.patched else None)
            for rel, spec in series.files.items()
            if target.in_scope(rel)
        },
    }


# ------------------------------------------------------------------------------------- git kind


def _git_path(target: Target, name: str) -> Path:
    out = git(["rev-parse", "--git-path", name], target.root).stdout.strip()
    path = Path(out)
    return path if path.is_absolute() else target.root / path


def git_operation_in_progress(target: Target) -> str | None:
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


def git_dirty(target: Target, paths: List[str]) -> List[str]:
    """Touched paths with uncommitted changes (staged, unstaged or untracked)."""
    proc = git(["status", "--porcelain", "-z", "--untracked-files=all", "--"] + paths, target.root)
    records = iter(proc.stdout.split("\0"))
    dirty = []
    for record in records:
        if len(record) > 3:
            dirty.append(record[3:])
            if "R" in record[:2] or "C" in record[:2]:
                next(records, None)  # a rename or copy: the source path follows
    return dirty


def git_head(target: Target) -> str:
    return git(["rev-parse", "--verify", "HEAD"], target.root).stdout.strip()


def series_commits(target: Target, name: str) -> List[str]:
    """Commits in HEAD's history that carry ``St-Patch-Series: <name>`` and are not reverted."""
    proc = git(
        ["log", "--format=%H%x1f%B%x1e", "--fixed-strings", f"--grep={TRAILER}:", "--grep=This reverts commit", "HEAD"],
        target.root,
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


def _identity(target: Target) -> List[str]:
    """Committer identity for git am/revert when the user has none configured."""
    proc = git(["config", "user.email"], target.root, check=False)
    if proc.stdout.strip():
        return []
    return ["-c", "user.name=st-patch", "-c", "user.email=st-patch@localhost"]


def _git_sequence(target: Target, args: List[str], failed: str) -> None:
    """Run ``git am`` / ``git revert`` (``args``); on failure or Ctrl-C, ``--abort`` it so that the
    checkout is as it was, then raise."""
    command = args[0]
    try:
        proc = git(_identity(target) + args, target.root, check=False)
    except KeyboardInterrupt:
        git([command, "--abort"], target.root, check=False)
        raise
    if proc.returncode:
        message = _git_message(proc)
        git([command, "--abort"], target.root, check=False)
        raise ApplyError(f"{failed}: {message}")


def git_am(target: Target, series: Series) -> None:
    args = ["am", "-3", "--quiet"] + [str(p) for p in series.patch_paths()]
    _git_sequence(target, args, "git am -3 failed, aborted (nothing applied)")


def git_reset_keep(target: Target, commit: str) -> None:
    git(["reset", "--keep", commit], target.root)


def git_revert(target: Target, commits: List[str]) -> None:
    _git_sequence(target, ["revert", "--no-edit"] + commits, "git revert failed, aborted (nothing reverted)")


def git_unchanged_since(target: Target, commit: str, paths: List[str]) -> bool:
    """Whether ``paths`` at HEAD are byte-identical to ``commit``."""
    proc = git(["diff", "--quiet", commit, "HEAD", "--"] + paths, target.root, check=False)
    return proc.returncode == 0


def git_dry_run(target: Target, series: Series) -> List[FileState]:
    """``git am -3`` the series in a throw-away shared clone of HEAD; return the files' states there."""
    head = git_head(target)
    with tempfile.TemporaryDirectory(prefix="st-patch-") as tmp:
        clone = Path(tmp) / "clone"
        env = _env(isolated_in=Path(tmp))
        proc = git(
            ["clone", "--quiet", "--shared", "--no-checkout", str(target.root), str(clone)],
            Path(tmp),
            check=False,
            env=env,
        )
        if proc.returncode:
            raise ApplyError(f"cannot make a temporary clone for the dry run: {_git_message(proc)}")
        git(["checkout", "--quiet", "--detach", head], clone, env=env)
        shadow = Target(clone, GIT, target.version)
        ident = _identity(shadow)
        proc = git(
            ident + ["am", "-3", "--quiet"] + [str(p) for p in series.patch_paths()], clone, check=False, env=env
        )
        if proc.returncode:
            raise ApplyError(f"git am -3 would fail: {_git_message(proc)}")
        return classify(shadow, series)


def git_overall(states: List[FileState], commits: List[str]) -> str:
    return PATCHED if commits else overall(states)

"""Change a file tree all at once: build the new directories beside the old ones, then exchange them.

A reader of an installed package or a source tree must never see half a series. So the changed
top-level directories (``sentence_transformers/``, and ``tests/`` of a source tree or the dist-info
that holds ``RECORD``) are each copied beside themselves as ``.<name>.st-patch-new`` (unchanged files
are hard links, so the copy is cheap), the new contents are written into the copies, and each copy is
exchanged with its original by one ``renameat2(RENAME_EXCHANGE)`` (Linux). The package directory is
exchanged last: that exchange is the **commit point**. A reader sees the whole old package before it
and the whole new package after it.

Before the first exchange a journal (``.sentence_transformers.st-patch-journal`` beside the package)
records the run: the release, each directory's identity (device and inode of the original and of its
copy) and the sha256 every changed file must have before and after. If the process dies (kill -9,
power loss), the next ``apply`` or ``revert`` finishes the job from the journal: before the commit
point it exchanges back what was exchanged, after it it only removes the old copies. It does so only
when every directory and file is exactly what the journal expects; otherwise it stops, changes nothing
and names what differs. A journal whose release is not the installed one (the package was reinstalled
since) is reported and removed, never replayed. ``status`` and ``check`` only report a journal.

Where ``RENAME_EXCHANGE`` is not available (not Linux, a file system without it), each directory is
renamed away and the copy renamed into its place: between those two renames the directory is missing
(an import fails), never mixed. The journal covers that window too.

Standard library only, Python >= 3.8.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import os
import platform
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from .manifest import sha256
from .outcome import Interrupted, Refusal
from .signals import Guard
from .targets import PACKAGE, Target

NEW = ".st-patch-new"
OLD = ".st-patch-old"
JOURNAL = ".st-patch-journal"
LEGACY_TMP = ".st-patch-tmp"  # temporary files of st-patch 1.0, removed by the next run
TEMP_PREFIX = "st-patch-"
FORMAT = 2

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {
    "x86_64": 316,
    "amd64": 316,
    "aarch64": 276,
    "arm64": 276,
    "riscv64": 276,
    "ppc64le": 357,
    "s390x": 347,
}


# ------------------------------------------------------------------------------------ primitives


def _renameat2():
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        return lambda a, b: func(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    if number is None or not hasattr(libc, "syscall"):
        return None
    return lambda a, b: libc.syscall(number, _AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)


def exchange(a: Path, b: Path) -> bool:
    """Exchange two directories atomically; False when the system cannot (nothing was changed)."""
    if os.environ.get("ST_PATCH_NO_EXCHANGE") or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        call = _renameat2()
    except OSError:
        return False
    if call is None:
        return False
    if call(os.fsencode(str(a)), os.fsencode(str(b))) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: Path, data: bytes, mode: int | None = None) -> None:
    """Create ``path`` (which must not exist) with ``data``, durably."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if mode is not None:
        os.chmod(str(path), mode)


def identity(path: Path) -> List[int] | None:
    try:
        st = os.lstat(str(path))
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(str(path))


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of ``src`` at ``dst`` whose files are hard links (copies where linking fails)."""
    os.mkdir(str(dst), stat.S_IMODE(os.stat(str(src)).st_mode))
    for dirpath, dirnames, filenames in os.walk(str(src)):
        rel = os.path.relpath(dirpath, str(src))
        out = os.path.join(str(dst), rel) if rel != "." else str(dst)
        for name in list(dirnames):
            source = os.path.join(dirpath, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), os.path.join(out, name))
                dirnames.remove(name)
            else:
                os.mkdir(os.path.join(out, name), stat.S_IMODE(os.stat(source).st_mode))
        for name in filenames:
            source, target = os.path.join(dirpath, name), os.path.join(out, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
                continue
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(str(a)), os.lstat(str(b))
    except OSError:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if stat.S_ISLNK(sa.st_mode) or stat.S_ISLNK(sb.st_mode):
        return stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode) and os.readlink(str(a)) == os.readlink(str(b))
    if stat.S_ISDIR(sa.st_mode) or stat.S_ISDIR(sb.st_mode):
        return stat.S_ISDIR(sa.st_mode) and stat.S_ISDIR(sb.st_mode)
    return sa.st_size == sb.st_size and a.read_bytes() == b.read_bytes()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def exclusive(target: Target, timeout: float | None = None) -> Iterator[None]:
    """Hold an advisory lock on the target for the whole command.

    The lock is a ``flock`` on the directory that holds ``sentence_transformers/`` (a directory the
    series never replaces), so it leaves nothing behind and dies with the process that held it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    if timeout is None:
        timeout = float(os.environ.get("ST_PATCH_LOCK_TIMEOUT") or 60)
    fd = os.open(str(target.root), os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Refusal(
                        f"another st-patch run is working on {target.root} (it holds a lock on that directory) and "
                        f"did not finish within {timeout:g} s; nothing was changed. Wait for it to finish and run "
                        "this command again (ST_PATCH_LOCK_TIMEOUT sets the wait in seconds)"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- temporary dirs


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    """A temporary directory named after this process, so that the next run can remove it if this one is killed."""
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_temporary_directories() -> List[str]:
    """Remove the temporary directories of st-patch runs that no longer exist."""
    removed = []
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.glob(TEMP_PREFIX + "*"):
            pid = entry.name[len(TEMP_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and entry.is_dir():
                shutil.rmtree(str(entry), ignore_errors=True)
                removed.append(str(entry))
    return removed


# ------------------------------------------------------------------------------------ the plan


@dataclass
class Unit:
    """One top-level directory of the target that the run replaces."""

    name: str  # as seen from the target root: sentence_transformers, tests, sentence_transformers-X.dist-info
    live: Path  # its real location (a symlinked package directory is replaced where it really is)

    @property
    def staged(self) -> Path:
        return self.live.parent / f".{self.live.name}{NEW}"

    @property
    def old(self) -> Path:
        return self.live.parent / f".{self.live.name}{OLD}"


def units_for(target: Target, paths) -> List[Unit]:
    """The units holding ``paths`` (relative to the target root), the package last."""
    names = sorted({p.split("/", 1)[0] for p in paths} | {PACKAGE}, key=lambda n: (n == PACKAGE, n))
    return [Unit(n, Path(os.path.realpath(str(target.root / n)))) for n in names]


def journal_path(target: Target) -> Path:
    package = Path(os.path.realpath(str(target.package_dir)))
    return package.parent / f".{PACKAGE}{JOURNAL}"


def _split(rel: str) -> Tuple[str, str]:
    top, _, rest = rel.partition("/")
    return top, rest


def _drop_bytecode(path: Path) -> None:
    """The ``__pycache__`` entries of a module this run deletes (bytecode of a file st-patch created)."""
    cache = path.parent / "__pycache__"
    if path.suffix == ".py" and cache.is_dir():
        for pyc in cache.glob(path.stem + ".*.pyc"):
            pyc.unlink()
        with contextlib.suppress(OSError):
            cache.rmdir()


def _prune(path: Path, stop: Path) -> None:
    parent = path.parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def _stage(unit: Unit, changes: Dict[str, bytes | None], remove_dirs: List[str]) -> None:
    """Build ``unit.staged``: the unit with ``changes`` (path inside the unit -> bytes, None = delete)."""
    _link_tree(unit.live, unit.staged)
    for rel in remove_dirs:
        remove_tree(unit.staged / rel)
    for rel, data in sorted(changes.items()):
        path = unit.staged.joinpath(*rel.split("/"))
        old = unit.live.joinpath(*rel.split("/"))
        mode = stat.S_IMODE(old.stat().st_mode) if old.is_file() else None
        if path.is_file() or path.is_symlink():
            path.unlink()
        if data is None:
            _drop_bytecode(path)
            _prune(path, unit.staged)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data, mode)
        if old.is_file() and int(old.stat().st_mtime) == int(path.stat().st_mtime):
            # bytecode is checked against the source's mtime (whole seconds) and size: make sure a
            # .pyc compiled from the old text can never pass for the new one
            bumped = old.stat().st_mtime + 1
            os.utime(str(path), (bumped, bumped))
        fsync_dir(path.parent)
    fsync_dir(unit.staged)


# ------------------------------------------------------------------------------------ recovery


@dataclass
class Pending:
    """A journal found on the target: what the interrupted run was and what the next apply/revert does."""

    path: Path
    journal: dict | None
    committed: bool | None  # None: cannot tell (foreign state or no journal)
    problem: str | None  # why it cannot be replayed, or None

    def locate(self, target: Target):
        """For an interrupted run stopped before its commit point: a function giving, for a path
        relative to the root, where its bytes will be once the run is rolled back (the original
        of a directory already exchanged), so that status reports the state recovery will give."""
        if self.committed is not False or self.problem or not self.journal:
            return None
        moved = {}
        for rec in self.journal["units"]:
            unit = Unit(rec["name"], Path(rec["live"]))
            if identity(unit.live) == rec["staged_ino"]:
                moved[unit.name] = unit.staged if identity(unit.staged) == rec["live_ino"] else unit.old

        def where(rel: str) -> Path:
            top, rest = _split(rel)
            return moved[top].joinpath(*rest.split("/")) if top in moved else target.path(rel)

        return where

    def to_json(self) -> dict:
        journal = self.journal or {}
        return {
            "journal": str(self.path),
            "op": journal.get("op"),
            "series": journal.get("series"),
            "release": journal.get("release"),
            "started": journal.get("started"),
            "committed": self.committed,
            "problem": self.problem,
        }


def leftovers(target: Target) -> List[Path]:
    """Staged or old directories and temporary files of st-patch runs in the target (no journal needed)."""
    found: List[Path] = []
    places = {target.root, Path(os.path.realpath(str(target.package_dir))).parent}
    for place in places:
        with contextlib.suppress(OSError):
            for entry in place.iterdir():
                if entry.name.startswith(".") and (entry.name.endswith(NEW) or entry.name.endswith(OLD)):
                    found.append(entry)
    for base in [target.package_dir, target.dist_info, target.root / "tests"]:
        if base is None or not base.is_dir():
            continue
        for dirpath, _dirnames, filenames in os.walk(str(base)):
            found.extend(Path(dirpath) / n for n in filenames if n.endswith(LEGACY_TMP))
    return sorted(found)


def inspect(target: Target) -> Pending | None:
    """The journal of an interrupted run, judged without changing anything; None when there is none."""
    path = journal_path(target)
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        units = [Unit(u["name"], Path(u["live"])) for u in journal["units"]]
        journal["files"]
        if journal.get("format") != FORMAT:
            raise ValueError(f"format {journal.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Pending(path, None, None, f"the journal {path} is unreadable ({exc})")
    if target.version != journal.get("release"):
        return Pending(
            path,
            journal,
            None,
            "it belongs to sentence-transformers {}, but {} is installed now (reinstalled since)".format(
                journal.get("release"), target.version
            ),
        )
    package = units[-1]
    record = journal["units"][-1]
    if identity(package.live) == record["staged_ino"]:
        return Pending(path, journal, True, None)
    for unit, rec in zip(units, journal["units"]):
        problem = _judge_unit(unit, rec, journal)
        if problem:
            return Pending(path, journal, False, problem)
    return Pending(path, journal, False, None)


def _unit_files(journal: dict, unit: Unit) -> List[dict]:
    return [f for f in journal["files"] if _split(f["path"])[0] == unit.name]


def _judge_unit(unit: Unit, rec: dict, journal: dict) -> str | None:
    """Why this unit cannot be rolled back (None: it can).

    A unit that was not exchanged needs nothing (the original is still in place, the copy is
    dropped). One that was exchanged is put back only if its live files are still exactly what the
    run wrote and its original is intact, so that nothing anyone did since is lost."""
    live, staged, old = identity(unit.live), identity(unit.staged), identity(unit.old)
    if live == rec["live_ino"] or (live is None and old == rec["live_ino"]):
        return None
    if live != rec["staged_ino"]:
        return f"{unit.live} is no longer the directory the interrupted run worked on"
    holder = unit.staged if staged == rec["live_ino"] else unit.old if old == rec["live_ino"] else None
    if holder is None:
        return f"the original of {unit.live} is missing"
    entries = _unit_files(journal, unit)
    for entry in entries:
        rest = _split(entry["path"])[1]
        for _side, base, key in (("written by", unit.live, "after"), ("kept from", holder, "before")):
            path = base.joinpath(*rest.split("/"))
            got = sha256(path.read_bytes()) if path.is_file() else None
            if got != entry[key]:
                return "{} is not the file the interrupted run {} it (sha256 {}, expected {})".format(
                    entry["path"], "wrote" if key == "after" else "started from", got, entry[key]
                )
    changed = {_split(e["path"])[1] for e in entries}
    for dirpath, _dirnames, filenames in os.walk(str(unit.live)):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), str(unit.live)).replace(os.sep, "/")
            if rel in changed or "__pycache__" in rel.split("/"):
                continue
            if not same_file(Path(dirpath) / name, holder / rel):
                return f"{unit.name}/{rel} was changed after the interrupted run"
    return None


def recover(target: Target, guard: Guard) -> dict | None:
    """Finish an interrupted run from its journal (apply/revert only); None when there was none.

    Raises Refusal, changing nothing, when the journal cannot be replayed safely."""
    swept = [str(p) for p in leftovers(target)]
    pending = inspect(target)
    if pending is None:
        with guard.critical():
            for path in leftovers(target):
                remove_tree(path)
        return {"action": "removed leftovers of an earlier run", "files": swept} if swept else None
    journal = pending.journal or {}
    what = "{} of series {} (started {})".format(journal.get("op"), journal.get("series"), journal.get("started"))
    if pending.journal is not None and pending.problem and pending.committed is None:
        # another release installed since: the journal is not ours to replay
        with guard.critical():
            _discard(target, pending)
        return {"action": f"removed the journal of an interrupted {what}: {pending.problem}; nothing was replayed"}
    if pending.problem:
        raise Refusal(
            f"found the journal of an interrupted {what} at {pending.path}, but {pending.problem}. "
            "Nothing was changed. To fix: reinstall the package (pip install --force-reinstall --no-deps "
            f"sentence-transformers=={target.version}) or restore the file, then delete {pending.path} "
            f"and any .*{NEW} / .*{OLD} directories beside it"
        )
    units = [Unit(u["name"], Path(u["live"])) for u in journal["units"]]
    with guard.critical():
        if not pending.committed:
            for unit, rec in zip(units, journal["units"]):
                if identity(unit.live) == rec["staged_ino"]:
                    _undo_exchange(unit, rec)
                elif identity(unit.live) is None and identity(unit.old) == rec["live_ino"]:
                    os.rename(str(unit.old), str(unit.live))
        _discard(target, pending)
    if pending.committed:
        action = f"the interrupted {what} had passed its commit point: removed what it left behind"
    else:
        action = f"rolled back the interrupted {what}: the target is as it was before it"
    return {"action": action, "op": journal.get("op"), "committed": pending.committed, "files": swept}


def _undo_exchange(unit: Unit, rec: dict) -> None:
    holder = unit.staged if identity(unit.staged) == rec["live_ino"] else unit.old
    if holder == unit.staged and exchange(unit.live, unit.staged):
        return
    os.rename(str(unit.live), str(unit.staged) + ".undo")
    os.rename(str(holder), str(unit.live))
    remove_tree(Path(str(unit.staged) + ".undo"))


def _discard(target: Target, pending: Pending) -> None:
    for path in leftovers(target):
        remove_tree(path)
    for unit in (pending.journal or {}).get("units", []):
        for suffix in (NEW, OLD):
            live = Path(unit["live"])
            remove_tree(live.parent / f".{live.name}{suffix}")
            remove_tree(Path(str(live.parent / f".{live.name}{NEW}") + ".undo"))
    with contextlib.suppress(FileNotFoundError):
        pending.path.unlink()
    fsync_dir(pending.path.parent)


# --------------------------------------------------------------------------------- transaction


def commit(
    target: Target,
    op: str,
    series: str,
    changes: Dict[str, bytes | None],
    guard: Guard,
    remove_dirs: List[str] = (),
) -> None:
    """Replace the target's files by ``changes`` (path relative to the root -> bytes; None deletes),
    all at once. ``remove_dirs``: directories (relative to the root) to drop as well.

    Returns once the commit point is passed. Raises Interrupted when a signal came before it and
    Refusal / OSError when something failed before it; either way the target is as it started."""
    units = units_for(target, list(changes) + list(remove_dirs))
    journal = _new_journal(target, op, series, changes)
    jpath = journal_path(target)
    _prepare(units, changes, remove_dirs, journal, jpath, guard)
    with guard.critical():
        _exchange_all(units, journal, jpath, op)
        try:  # past the commit point: a failure here leaves litter the next run removes, nothing more
            _drop(units, jpath)
        except OSError as exc:
            guard.cleanup_error = (
                f"{op} completed, but removing the old copies failed ({exc}); the next run removes them"
            )


def _new_journal(target: Target, op: str, series: str, changes: Dict[str, bytes | None]) -> dict:
    files = []
    for rel in sorted(changes):
        path = target.path(rel)
        before = sha256(path.read_bytes()) if path.is_file() else None
        after = sha256(changes[rel]) if changes[rel] is not None else None
        files.append({"path": rel, "before": before, "after": after})
    return {
        "format": FORMAT,
        "op": op,
        "series": series,
        "release": target.version,
        "kind": target.kind,
        "started": _now(),
        "units": [],
        "files": files,
    }


def _prepare(units: List[Unit], changes, remove_dirs, journal: dict, jpath: Path, guard: Guard) -> None:
    """Build every staged copy, then write the journal (renamed into place: complete or absent). On any
    failure or signal, remove what was built: nothing was changed."""
    try:
        for unit in units:
            inside = {_split(rel)[1]: data for rel, data in changes.items() if _split(rel)[0] == unit.name}
            removing = [_split(d)[1] for d in remove_dirs if _split(d)[0] == unit.name]
            _stage(unit, inside, removing)
            journal["units"].append(
                {
                    "name": unit.name,
                    "live": str(unit.live),
                    "live_ino": identity(unit.live),
                    "staged_ino": identity(unit.staged),
                }
            )
        draft = jpath.with_name(jpath.name + NEW)
        remove_tree(draft)
        write_file(draft, (json.dumps(journal, indent=2) + "\n").encode("utf-8"))
        os.rename(str(draft), str(jpath))
        fsync_dir(jpath.parent)
    except BaseException as exc:
        with guard.critical():
            for unit in units:
                remove_tree(unit.staged)
            remove_tree(jpath.with_name(jpath.name + NEW))
            with contextlib.suppress(FileNotFoundError):
                jpath.unlink()
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted ({exc or 'SIGINT'}) before anything was changed") from None
        if isinstance(exc, OSError):
            raise Refusal(f"cannot prepare the new files: {exc}; nothing was changed") from None
        raise


def _exchange_all(units: List[Unit], journal: dict, jpath: Path, op: str) -> None:
    """Exchange every unit, the package last (the commit point); a failure before it puts back the units
    already exchanged and raises Refusal."""
    done: List[Unit] = []
    try:
        for unit in units:
            if not exchange(unit.live, unit.staged):
                os.rename(str(unit.live), str(unit.old))
                os.rename(str(unit.staged), str(unit.live))
            done.append(unit)
            fsync_dir(unit.live.parent)
    except BaseException as exc:
        if len(done) == len(units):  # the commit point passed
            return
        for unit, rec in zip(reversed(done), reversed(journal["units"][: len(done)])):
            _undo_exchange(unit, rec)
        failed = units[len(done)]
        if identity(failed.live) is None and identity(failed.old) is not None:
            os.rename(str(failed.old), str(failed.live))
        _drop(units, jpath)
        raise Refusal(f"{op} failed ({exc}); every directory was put back, nothing was changed") from None


def _drop(units: List[Unit], jpath: Path) -> None:
    for unit in units:
        remove_tree(unit.staged)
        remove_tree(unit.old)
    with contextlib.suppress(FileNotFoundError):
        jpath.unlink()
    fsync_dir(jpath.parent)

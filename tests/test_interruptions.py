"""st-patch on a file tree, interrupted at every step: kill -9, Ctrl-C, SIGTERM, a full disk, reinstalls.

Each sweep runs ``st-patch apply`` (or ``revert``) as a separate process that counts the file-system
calls it makes (``os.open``, ``write``, ``link``, ``rename``, ``unlink``, ``mkdir``, the directory
exchange, ...) and is interrupted at the N-th one, for every N. After each interruption:

- what a reader sees is never a mix: the package directory is the release's or the patched one;
- ``status`` and ``check`` change nothing;
- on Ctrl-C / SIGTERM / a full disk: exit 130 (or 1) means the target is exactly as it started, exit
  0 means the operation completed; nothing is left behind either way;
- after kill -9: the next ``apply`` ends patched and the next ``revert`` gives back the original bytes,
  with nothing left behind (no staged directory, journal, temporary file or directory).

``strace -e inject`` delivers SIGKILL at the exchange system call itself, where no Python hook runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, snapshot
from st_patch import cli

PACKAGE = "sentence_transformers"
SCRIPTS = ROOT / "scripts"

RUNNER = """
import os, signal, sys
sys.path.insert(0, {scripts!r})
mode, at = os.environ["FAULT_MODE"], int(os.environ["FAULT_AT"])
count = [0]

def hit():
    count[0] += 1
    if count[0] != at:
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif mode == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif mode == "enospc":
        raise OSError(28, "No space left on device (injected)")

def wrap(owner, name):
    real = getattr(owner, name)
    def call(*args, **kwargs):
        reading = name == "open" and len(args) > 1 and not args[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if not (mode == "enospc" and reading):  # a full disk fails what writes, not what reads
            hit()
        return real(*args, **kwargs)
    setattr(owner, name, call)

from st_patch import cli, swap
names = ["open", "write", "fsync", "link", "mkdir", "chmod", "utime"]
if mode != "enospc":  # a full disk fails writes, not renames or unlinks
    names += ["rename", "replace", "unlink", "rmdir", "symlink"]
for name in names:
    wrap(os, name)
if mode != "enospc":
    wrap(swap, "exchange")
code = cli.main(sys.argv[1:])
sys.stderr.write("FAULT_COUNT %d\\n" % count[0])
sys.exit(code)
"""


STATE = f"{PACKAGE}/.st-patch/state.json"


def tree(root: Path) -> dict:
    """snapshot() with the state record's timestamp left out (it records when apply ran)."""
    snap = snapshot(root)
    if STATE in snap:
        record = json.loads(snap[STATE])
        record.pop("applied")
        snap[STATE] = record
    return snap


def _package(snap: dict) -> dict:
    """The files a reader of the package sees (bytecode aside)."""
    return {k: v for k, v in snap.items() if k.startswith(PACKAGE + "/") and "__pycache__" not in k}


def _leftovers(root: Path) -> list:
    found = [p.name for p in root.iterdir() if ".st-patch-" in p.name or p.name.endswith(".st-patch-journal")]
    found += [k for k in snapshot(root) if "st-patch-tmp" in k]
    return found


def _stray_temporaries(pids) -> list:
    base = Path(tempfile.gettempdir())
    return [p.name for p in base.glob("st-patch-*") if p.name.split("-")[2] in pids]


class Sweep:
    def __init__(self, root: Path, manifest: Path, tmp: Path):
        self.template = root
        self.manifest = manifest
        self.tmp = tmp
        self.runner = tmp / "fault_runner.py"
        self.runner.write_text(RUNNER.format(scripts=str(SCRIPTS)))
        self.count = 0

    def fresh(self) -> Path:
        self.count += 1
        dest = self.tmp / f"t{self.count}"
        shutil.copytree(self.template, dest, symlinks=True)
        return dest

    def run(self, command: str, target: Path, mode: str, at: int):
        env = dict(os.environ, FAULT_MODE=mode, FAULT_AT=str(at))
        proc = subprocess.run(
            [sys.executable, str(self.runner), command, "--target", str(target), "--manifest", str(self.manifest)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        count = [line for line in proc.stderr.splitlines() if line.startswith("FAULT_COUNT")]
        return proc, int(count[0].split()[1]) if count else None


def st(command: str, target: Path, manifest: Path, capsys) -> tuple:
    code = cli.main([command, "--target", str(target), "--manifest", str(manifest), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def states(make_target, synthetic, tmp_path, capsys):
    """``states(kind) -> (pristine root, pristine snapshot, patched snapshot)``."""

    def make(kind: str):
        root = make_target(kind)
        copy = tmp_path / f"{kind}-patched"
        shutil.copytree(root, copy, symlinks=True)
        assert st("apply", copy, synthetic.manifest, capsys)[0] == 0
        return root, tree(root), tree(copy), copy

    return make


def _read_only(target: Path, manifest: Path, capsys) -> str:
    """status and check on an interrupted target: they answer and change nothing."""
    before = snapshot(target)
    listing = sorted(p.name for p in target.iterdir())
    code, result = st("status", target, manifest, capsys)
    assert code == 0 and result["state"] in ("pristine", "patched"), result
    st("check", target, manifest, capsys)
    assert snapshot(target) == before and sorted(p.name for p in target.iterdir()) == listing
    return result["state"]


@pytest.mark.parametrize("kind", ["source", "installed"])
@pytest.mark.parametrize("command", ["apply", "revert"])
def test_kill_at_every_step_never_shows_a_mixed_tree_and_the_next_run_recovers(
    kind, command, states, synthetic, tmp_path, capsys
):
    pristine_root, original, patched, patched_root = states(kind)
    start, end = (original, patched) if command == "apply" else (patched, original)
    sweep = Sweep(pristine_root if command == "apply" else patched_root, synthetic.manifest, tmp_path)
    proc, total = sweep.run(command, sweep.fresh(), "kill", 0)
    assert proc.returncode == 0 and total and total > 20, proc.stderr
    mixed, leftovers, pids = [], [], set()
    at = 0
    while True:  # until a run makes fewer calls than the kill point (the count varies by a few)
        at += 1
        target = sweep.fresh()
        proc, calls = sweep.run(command, target, "kill", at)
        if proc.returncode == 0 and calls < at:
            assert tree(target) == end and not _leftovers(target)
            break
        assert proc.returncode == -signal.SIGKILL, (at, proc.stdout, proc.stderr)
        seen = _package(tree(target))
        if seen not in (_package(start), _package(end)):
            mixed.append(at)
        _read_only(target, synthetic.manifest, capsys)
        code, result = st("apply", target, synthetic.manifest, capsys)
        assert code == 0, (at, result)
        assert tree(target) == patched, at
        code, result = st("revert", target, synthetic.manifest, capsys)
        assert code == 0, (at, result)
        assert tree(target) == original, at
        leftovers += [(at, name) for name in _leftovers(target)]
    total = at - 1
    print(f"\n{kind} {command}: {total} kill points, {len(mixed)} mixed trees, {len(leftovers)} leftovers")
    assert not mixed, f"a reader saw a mixed package after kill -9 at steps {mixed} of {total}"
    assert not leftovers
    assert not _stray_temporaries(pids)


@pytest.mark.parametrize("kind", ["source", "installed"])
@pytest.mark.parametrize("command", ["apply", "revert"])
@pytest.mark.parametrize("mode", ["int", "term", "enospc"])
def test_signal_or_full_disk_at_every_step_exits_truthfully_and_leaves_nothing(
    kind, command, mode, states, synthetic, tmp_path
):
    pristine_root, original, patched, patched_root = states(kind)
    start, end = (original, patched) if command == "apply" else (patched, original)
    sweep = Sweep(pristine_root if command == "apply" else patched_root, synthetic.manifest, tmp_path)
    _, total = sweep.run(command, sweep.fresh(), mode, 0)
    outcomes = {}
    for at in range(1, total + 1):
        target = sweep.fresh()
        proc, _ = sweep.run(command, target, mode, at)
        after = tree(target)
        expected_fail = 1 if mode == "enospc" else 130
        assert proc.returncode in (0, expected_fail), (at, proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode == 0:
            assert after == end, f"exit 0 after {mode} at step {at}, but the {command} is not complete"
        else:
            assert after == start, f"exit {proc.returncode} after {mode} at step {at}, but the target changed"
        assert not _leftovers(target), (at, _leftovers(target))
        outcomes[proc.returncode] = outcomes.get(proc.returncode, 0) + 1
    print(f"\n{kind} {command} {mode}: {total} points, exits {outcomes}")
    assert outcomes.get(expected_fail), "no interruption took effect: the sweep tested nothing"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("kind", ["source", "installed"])
def test_sigkill_at_the_exchange_system_call(kind, states, synthetic, tmp_path, capsys):
    pristine_root, original, patched, _ = states(kind)
    sweep = Sweep(pristine_root, synthetic.manifest, tmp_path)
    base = [sys.executable, str(SCRIPTS / "st-patch"), "apply", "--manifest", str(synthetic.manifest), "--target"]
    count = 0
    while True:
        count += 1
        target = sweep.fresh()
        proc = subprocess.run(
            [
                "strace",
                "-f",
                "-o",
                os.devnull,
                "-e",
                f"inject=renameat2:signal=SIGKILL:when={count}",
                *base,
                str(target),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert _package(tree(target)) in (_package(original), _package(patched)), count
        _read_only(target, synthetic.manifest, capsys)
        assert st("apply", target, synthetic.manifest, capsys)[0] == 0 and tree(target) == patched
        assert st("revert", target, synthetic.manifest, capsys)[0] == 0 and tree(target) == original
        assert not _leftovers(target)
        if proc.returncode == 0:
            break
        assert count < 10, "more exchanges than the target has directories"
    assert count >= 2, "strace never reached an exchange"


def test_stale_journal_of_another_release_is_removed_never_replayed(states, synthetic, tmp_path, capsys):
    """kill -9 after the journal is written, then `pip install` of another release: nothing is replayed."""
    pristine_root, original, patched, _ = states("installed")
    sweep = Sweep(pristine_root, synthetic.manifest, tmp_path)
    _, total = sweep.run("apply", sweep.fresh(), "kill", 0)
    for at in range(1, total + 1):
        target = sweep.fresh()
        sweep.run("apply", target, "kill", at)
        if (target / ".sentence_transformers.st-patch-journal").exists():
            break
    else:
        pytest.fail("no kill point left a journal")
    # another release is installed over it (9.9.8 uses the same series here, so its files are the same)
    init = target / PACKAGE / "__init__.py"
    init.write_bytes(init.read_bytes().replace(b"9.9.9", b"9.9.8"))
    hand_edit = target / PACKAGE / "losses" / "__init__.py"
    hand_edit.write_bytes(hand_edit.read_bytes() + b"# local edit\r\n")
    before = snapshot(target)
    code, result = st("check", target, synthetic.manifest, capsys)
    assert snapshot(target) == before, "check wrote to the target"
    assert result["pending"] and "9.9.9" in result["pending"]["problem"], result
    code, result = st("status", target, synthetic.manifest, capsys)
    assert snapshot(target) == before, "status wrote to the target"
    code, result = st("apply", target, synthetic.manifest, capsys)
    assert "nothing was replayed" in result["recovered"]["action"], (at, result)
    assert hand_edit.read_bytes().endswith(b"# local edit\r\n")
    assert not _leftovers(target)


def _legacy_journal(target: Path, original: dict, patched_bytes: bytes, release: str = "9.9.9") -> Path:
    """What st-patch 1.x left when killed half-way through apply: MatryoshkaLoss.py written, its journal kept."""
    rel = f"{PACKAGE}/losses/MatryoshkaLoss.py"
    jdir = target / PACKAGE / ".st-patch" / "journal"
    (jdir / "orig").mkdir(parents=True)
    (jdir / "new").mkdir()
    (jdir / "orig" / "0").write_bytes(original[rel])
    (jdir / "new" / "0").write_bytes(patched_bytes)
    entry = {
        "path": rel,
        "mode": 0o644,
        "orig": "orig/0",
        "orig_sha256": hashlib.sha256(original[rel]).hexdigest(),
        "new": "new/0",
        "new_sha256": hashlib.sha256(patched_bytes).hexdigest(),
    }
    journal = {"format": 1, "op": "apply", "series": "backport-9.9", "release": release, "entries": [entry]}
    (jdir / "journal.json").write_text(json.dumps(journal))
    (target / rel).write_bytes(patched_bytes)
    return target / rel


@pytest.mark.parametrize("kind", ["source", "installed"])
def test_journal_of_st_patch_1_is_rolled_back_file_by_file(kind, states, synthetic, capsys):
    pristine_root, original, patched, _ = states(kind)
    rel = f"{PACKAGE}/losses/MatryoshkaLoss.py"
    path = _legacy_journal(pristine_root, original, patched[rel])
    code, result = st("status", pristine_root, synthetic.manifest, capsys)
    assert any("st-patch 1.x" in w for w in result["warnings"]), result
    assert path.read_bytes() == patched[rel], "status must not write"
    code, result = st("apply", pristine_root, synthetic.manifest, capsys)
    assert code == 0 and "1.x" in result["recovered"]["action"], result
    assert tree(pristine_root) == patched
    assert st("revert", pristine_root, synthetic.manifest, capsys)[0] == 0 and tree(pristine_root) == original


def test_journal_of_st_patch_1_over_a_file_edited_since_is_refused(states, synthetic, capsys):
    pristine_root, original, patched, _ = states("installed")
    rel = f"{PACKAGE}/losses/MatryoshkaLoss.py"
    path = _legacy_journal(pristine_root, original, patched[rel])
    path.write_bytes(path.read_bytes() + b"# edited after the crash\r\n")
    before = snapshot(pristine_root)
    code, result = st("apply", pristine_root, synthetic.manifest, capsys)
    assert code == 1 and "neither the file it started from nor the one it wrote" in result["error"], result
    assert snapshot(pristine_root) == before

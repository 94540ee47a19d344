"""Shared helpers of the project's tests: forks made from sdists, release environments, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock
from tools import dists, releases, toxenv

ROOT = Path(__file__).resolve().parents[1]

CLI = ROOT / "scripts" / "st-patch"
MANIFEST = json.loads((ROOT / "patches" / "manifest.json").read_text())
TABLE = releases.load()
PATCHED = [r.version for r in TABLE if r.support == "patched"]
NATIVE = [r.version for r in TABLE if r.support == "native"]


def st_patch(*args: str, cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess:
    """Run scripts/st-patch as a user would."""
    return subprocess.run([sys.executable, str(CLI), *args], cwd=cwd, text=True, capture_output=True, check=check)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, text=True, capture_output=True, check=True).stdout


def fork_from_sdist(version: str, dest: Path) -> Path:
    """A git repository holding the release's sdist with LF line endings, as an upstream checkout has."""
    tree = dists.sdist_tree(version, dest / "sdist")
    repo = dest / "fork"
    shutil.copytree(tree, repo)
    for path in repo.rglob("*.py"):
        path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=upstream", "-c", "user.email=upstream@example.invalid", "commit", "-qm", f"v{version}")
    git(repo, "tag", f"v{version}")
    return repo


def release_python(version: str) -> Path:
    """The python of the release's tox environment, created or brought up to date by tox (fast with tox-uv)."""
    (ROOT / ".tox").mkdir(exist_ok=True)
    python = ROOT / ".tox" / f"st-{version}" / "bin" / "python"
    with FileLock(str(ROOT / ".tox" / f".st-{version}.lock")):
        subprocess.run(
            [sys.executable, "-m", "tox", "-q", "-e", f"st-{version}", "--notest"],
            cwd=ROOT,
            check=True,
            env=tox_environ(),
        )
    return python


def tox_environ() -> dict[str, str]:
    """The environment `make` gives tox (see scripts/tools/toxenv.py)."""
    return toxenv.tox_environ()

"""Shared test set-up: a tiny synthetic release + patch series for the CLI, and the in-process CLI fixtures.

``scripts/`` is on sys.path through pytest's ``pythonpath`` (pyproject.toml): the tests import ``st_patch``
(the shipped tool) and ``tools`` (the maintainers' automation).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

SYNTHETIC_SERIES = "backport-9.9"
_IDENTITY = ["-c", "user.name=Upstream", "-c", "user.email=upstream@example.invalid", "-c", "commit.gpgsign=false"]

# The fake release 9.9.9 (LF, as in git) and what the two-patch series makes of it.
_PRISTINE = {
    "sentence_transformers/__init__.py": '"""Fake sentence-transformers."""\n\n__version__ = "9.9.9"\n',
    "sentence_transformers/losses/__init__.py": "from .MatryoshkaLoss import MatryoshkaLoss\n",
    "sentence_transformers/losses/MatryoshkaLoss.py": "".join(
        ["import torch\n", "\n", "\n", "class MatryoshkaLoss:\n", "    def forward(self, features):\n"]
        + [f"        step_{i} = features  # unchanged context line\n" for i in range(12)]
        + ["        return self.loss(features)  # truncates before the cache\n"]
    ),
    "tests/test_losses.py": "def test_old():\n    assert 1 + 1 == 2\n",
}
_PATCHES = [
    (
        "MatryoshkaLoss: truncate after cache",
        {
            "sentence_transformers/losses/MatryoshkaLoss.py": lambda text: text.replace(
                "import torch\n", "import torch\n\nfrom ._matryoshka_cache import truncate_after_cache\n"
            ).replace(
                "return self.loss(features)  # truncates before the cache",
                "return truncate_after_cache(self, features)",
            ),
            "sentence_transformers/losses/_matryoshka_cache.py": lambda _: (
                "def truncate_after_cache(loss, features):\n    return loss.loss(features)\n"
            ),
        },
    ),
    (
        "tests: MatryoshkaLoss with cached losses",
        {
            "tests/test_losses.py": lambda text: text + "\n\ndef test_new():\n    assert True\n",
            "tests/test_matryoshka_cached_losses.py": lambda _: "def test_cached():\n    assert True\n",
        },
    ),
]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *_IDENTITY, *args], cwd=str(repo), check=True, capture_output=True, text=True).stdout


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _hashes(lf_text):
    if lf_text is None:
        return None
    lf = lf_text.encode()
    return {"sha256": hashlib.sha256(_crlf(lf)).hexdigest(), "sha256_lf": hashlib.sha256(lf).hexdigest()}


def _write_tree(root: Path, files, eol: str) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        path.write_bytes(_crlf(data) if eol == "crlf" else data)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """An upstream git repo (branch ``release`` = 9.9.9, ``main`` = + the series) and a manifest.

    Returns a namespace: manifest (path), upstream (repo), pristine / patched ({path: LF text}),
    series (name), files (the series' paths).
    """
    base = tmp_path_factory.mktemp("synthetic")
    repo = base / "upstream"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "core.autocrlf", "false")
    _write_tree(repo, _PRISTINE, "lf")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "Release 9.9.9")
    git(repo, "branch", "release")
    text = dict(_PRISTINE)
    for subject, edits in _PATCHES:
        for rel, edit in edits.items():
            text[rel] = edit(text.get(rel))
        _write_tree(repo, {rel: text[rel] for rel in edits}, "lf")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"{subject}\n\nWhy it matters.\n\nSt-Patch-Series: {SYNTHETIC_SERIES}")
    patches = base / "patches"
    series_dir = patches / "series" / SYNTHETIC_SERIES
    git(repo, "format-patch", "-q", "-o", str(series_dir), "release..HEAD")
    files = [rel for _, edits in _PATCHES for rel in edits]
    manifest = {
        "format": 1,
        "releases": {
            "9.9.8": {"support": "patched", "series": SYNTHETIC_SERIES},
            "9.9.9": {"support": "patched", "series": SYNTHETIC_SERIES},
            "10.0.0": {"support": "native", "series": None},
        },
        "series": {
            SYNTHETIC_SERIES: {
                "releases": ["9.9.8", "9.9.9"],
                "patches": sorted(p.name for p in series_dir.iterdir()),
                "files": {
                    rel: {"pristine": _hashes(_PRISTINE.get(rel)), "patched": _hashes(text[rel])} for rel in files
                },
            }
        },
    }
    (patches / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return SimpleNamespace(
        manifest=patches / "manifest.json",
        upstream=repo,
        pristine=dict(_PRISTINE),
        patched=text,
        series=SYNTHETIC_SERIES,
        files=files,
    )


@pytest.fixture
def make_target(synthetic, tmp_path):
    """``make_target(kind, version=None, eol="crlf", tests=True) -> root``.

    kind: "source" (an unpacked sdist), "installed" (site-packages with a dist-info) or "git" (a
    clone of the upstream repo at the release, LF).
    """
    counter = [0]

    def make(kind: str, version=None, eol: str = "crlf", tests: bool = True) -> Path:
        counter[0] += 1
        root = tmp_path / f"{kind}-{counter[0]}"
        files = dict(synthetic.pristine)
        if version:
            files["sentence_transformers/__init__.py"] = f'__version__ = "{version}"\n'
        if kind == "git":
            git(tmp_path, "clone", "-q", "-b", "release", str(synthetic.upstream), str(root))
            git(root, "config", "core.autocrlf", "false")
            if version:
                _write_tree(
                    root, {"sentence_transformers/__init__.py": files["sentence_transformers/__init__.py"]}, "lf"
                )
                git(root, "commit", "-qam", "Bump version")
            return root
        if kind == "installed" or not tests:
            files = {rel: text for rel, text in files.items() if not rel.startswith("tests/")}
        _write_tree(root, files, eol)
        if kind == "installed":
            info = root / ("sentence_transformers-%s.dist-info" % (version or "9.9.9"))
            info.mkdir()
            (info / "METADATA").write_text("Name: sentence-transformers\nVersion: %s\n" % (version or "9.9.9"))
        return root

    return make


@pytest.fixture
def st(synthetic, capsys):
    """``st(command, target, *extra) -> (exit code, stdout + stderr)``, in-process, synthetic manifest."""

    def run(command, target, *extra):
        from st_patch import cli

        code = cli.main([command, "--target", str(target), "--manifest", str(synthetic.manifest), *extra])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


@pytest.fixture
def st_json(st):
    def run(command, target, *extra):
        code, out = st(command, target, "--json", *extra)
        result = json.loads(out)
        assert result["exit_code"] == code and result["command"] == command
        return code, result

    return run


def snapshot(root: Path) -> dict:
    """{relative path: bytes} of every file under root (without .git)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def find_python38():
    """An interpreter for Python 3.8, or None."""
    candidates = [shutil.which("python3.8")]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.8*/bin/python3.8"))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.stdout.strip() == "True":
            return candidate
    return None

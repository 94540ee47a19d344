"""scripts/st-patch: target kinds, status/check/apply/revert, refusals, the journal, real releases."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, find_python38, snapshot
from st_patch import cli, manifest
from st_patch.record import row_hash

CLI = ROOT / "scripts" / "st-patch"
MATRYOSHKA = "sentence_transformers/losses/MatryoshkaLoss.py"
CACHE = "sentence_transformers/losses/_matryoshka_cache.py"
NEW_TEST = "tests/test_matryoshka_cached_losses.py"


def _crlf(text: str) -> bytes:
    return text.encode().replace(b"\n", b"\r\n")


def _states(result):
    return {f["path"]: f["state"] for f in result["files"]}


# ------------------------------------------------------------------------------ usage and input


def test_help_documents_commands_options_and_exit_codes(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("status", "check", "apply", "revert", "exit codes", "git am -3", "site-packages", "CRLF"):
        assert word in text
    assert cli.main(["apply", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--target", "--json", "--manifest", "--series", "exit codes", "  2 "):
        assert word in text


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["apply", "--bogus"], ["status", "--target"]])
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_bad_targets_and_inputs_exit_2(st, make_target, tmp_path, synthetic):
    assert st("status", tmp_path / "missing")[0] == 2
    (tmp_path / "empty").mkdir()
    code, out = st("apply", tmp_path / "empty")
    assert code == 2 and "not a sentence-transformers target" in out
    (tmp_path / "file.txt").write_text("x")
    assert st("check", tmp_path / "file.txt")[0] == 2
    root = make_target("source")
    code, out = st("apply", root, "--series", "no-such-series")
    assert code == 2 and "unknown series" in out
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    assert cli.main(["status", "--target", str(root), "--manifest", str(bad)]) == 2
    (root / "sentence_transformers" / "__init__.py").write_text("# no version here\n")
    code, out = st("status", root)
    assert code == 2 and "__version__" in out


# -------------------------------------------------------------- source trees and installed packages


@pytest.mark.parametrize(
    "kind, eol, tests",
    [("source", "crlf", True), ("source", "lf", True), ("source", "crlf", False), ("installed", "crlf", False)],
    ids=["sdist-crlf", "tree-lf", "sdist-without-tests", "site-packages"],
)
def test_check_apply_status_revert_cycle(kind, eol, tests, st, st_json, make_target, synthetic):
    root = make_target(kind, eol=eol, tests=tests)
    original = snapshot(root)
    in_scope = [rel for rel in synthetic.files if tests or rel.startswith("sentence_transformers/")]

    code, result = st_json("status", root)
    assert code == 0 and result["state"] == "pristine" and result["target"]["kind"] == kind
    assert result["release"] == {
        "version": "9.9.9",
        "support": "patched",
        "series": synthetic.series,
        "patches": result["release"]["patches"],
        "detected": "manifest",
    }
    assert len(result["release"]["patches"]) == 2
    assert {p for p, s in _states(result).items() if s == "skipped"} == set(synthetic.files) - set(in_scope)

    code, result = st_json("check", root)
    assert code == 0 and result["action"] == "would-apply"
    assert result["would"][CACHE] == "create" and result["would"][MATRYOSHKA] == "modify"
    assert snapshot(root) == original, "check must not touch the target"

    code, out = st("apply", root)
    assert code == 0 and "applied" in out
    for rel in in_scope:
        expected = synthetic.patched[rel].encode()
        assert (root / rel).read_bytes() == (_crlf(synthetic.patched[rel]) if eol == "crlf" else expected), rel
    assert not (root / "tests").exists() or tests
    state = json.loads((root / "sentence_transformers/.st-patch/state.json").read_text())
    assert state["series"] == synthetic.series and state["release"] == "9.9.9" and state["kind"] == kind
    assert not (root / "sentence_transformers/.st-patch/journal").exists()

    code, result = st_json("status", root)
    assert code == 0 and result["state"] == "patched" and result["eol"] == eol
    assert result["recorded"]["series"] == synthetic.series
    patched = snapshot(root)
    code, out = st("apply", root)
    assert code == 0 and "already patched" in out
    assert snapshot(root) == patched
    code, result = st_json("check", root)
    assert code == 0 and result["action"] == "already-patched"

    code, out = st("revert", root)
    assert code == 0 and "byte-identical" in out
    assert snapshot(root) == original, "revert must restore the release byte for byte"
    code, out = st("revert", root)
    assert code == 0 and "already pristine" in out
    assert snapshot(root) == original


def test_package_directory_as_target_means_its_site_packages(st_json, make_target):
    root = make_target("installed")
    code, result = st_json("apply", root / "sentence_transformers")
    assert code == 0 and result["target"]["path"] == str(root.resolve())
    assert result["target"]["dist_info"].endswith("sentence_transformers-9.9.9.dist-info")


def test_symlinked_package_directory_is_the_installed_package_it_is(st_json, make_target, tmp_path):
    """site-packages/sentence_transformers -> elsewhere: still an installed package whose RECORD is kept true."""
    root = make_target("installed")
    info = root / "sentence_transformers-9.9.9.dist-info"
    data = (root / MATRYOSHKA).read_bytes()
    (info / "RECORD").write_text(f"{MATRYOSHKA},{row_hash(data)},{len(data)}\nsentence_transformers/__init__.py,,\n")
    record = (info / "RECORD").read_bytes()
    real = tmp_path / "elsewhere" / "sentence_transformers"
    real.parent.mkdir()
    (root / "sentence_transformers").rename(real)
    (root / "sentence_transformers").symlink_to(real, target_is_directory=True)
    original = snapshot(real)
    code, result = st_json("apply", root / "sentence_transformers")
    assert code == 0 and result["target"]["kind"] == "installed", result
    assert CACHE in (info / "RECORD").read_text(), "RECORD must list the added module"
    assert (root / "sentence_transformers").is_symlink() and (real / "losses" / "_matryoshka_cache.py").is_file()
    code, result = st_json("revert", root / "sentence_transformers")
    assert code == 0 and (info / "RECORD").read_bytes() == record and snapshot(real) == original
    assert (root / "sentence_transformers").is_symlink()


def test_revert_leaves_the_bytecode_pip_installed(st, make_target):
    """revert restores exactly what apply changed: pip's .pyc files of the touched modules stay."""
    root = make_target("installed")
    cache = root / "sentence_transformers" / "losses" / "__pycache__"
    cache.mkdir()
    (cache / "MatryoshkaLoss.cpython-311.pyc").write_bytes(b"pip compiled this")
    (cache / "__init__.cpython-311.pyc").write_bytes(b"and this")
    original = snapshot(root)
    assert st("apply", root)[0] == 0
    (cache / "_matryoshka_cache.cpython-311.pyc").write_bytes(b"python compiled the added module")
    assert st("revert", root)[0] == 0
    assert snapshot(root) == original


def test_usage_errors_are_json_objects_with_json(capsys):
    assert cli.main(["apply", "--json", "--bogus"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 2 and result["ok"] is False and "--bogus" in result["error"]


def test_default_target_is_the_importable_package_found_without_importing(make_target, synthetic, monkeypatch, capsys):
    root = make_target("installed")
    init = root / "sentence_transformers" / "__init__.py"
    init.write_bytes(init.read_bytes() + b'raise RuntimeError("st-patch must not import the target")\r\n')
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "sentence_transformers", raising=False)
    code = cli.main(["status", "--json", "--manifest", str(synthetic.manifest)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["target"]["path"] == str(root.resolve()) and result["state"] == "pristine"
    assert "sentence_transformers" not in sys.modules


def test_modified_file_is_refused_with_its_name_hashes_and_a_remedy(st, make_target):
    root = make_target("installed")
    path = root / MATRYOSHKA
    path.write_bytes(path.read_bytes() + b"# local edit\r\n")
    original = snapshot(root)
    for command in ("check", "apply", "revert"):
        code, out = st(command, root)
        assert code == 1, command
        assert MATRYOSHKA in out and "neither the release's file nor the patched one" in out
        assert "pip install --force-reinstall --no-deps sentence-transformers==9.9.9" in out
    assert snapshot(root) == original
    code, out = st("status", root)
    assert code == 1 and "modified" in out


def test_foreign_file_where_the_series_creates_one_is_refused(st, make_target):
    root = make_target("source")
    (root / CACHE).write_bytes(b"mine\r\n")
    code, out = st("apply", root)
    assert code == 1 and CACHE in out and "move it away" in out
    assert (root / CACHE).read_bytes() == b"mine\r\n"


def test_unknown_release_is_refused_naming_it_and_the_supported_ones(st, st_json, make_target):
    root = make_target("source", version="9.9.7")
    (root / MATRYOSHKA).write_bytes(b"class MatryoshkaLoss:\r\n    pass\r\n")
    code, out = st("apply", root)
    assert code == 1 and "9.9.7" in out and "9.9.9" in out and "native: 10.0.0" in out
    assert "st-patch check" in out
    code, result = st_json("check", root)
    assert code == 1 and "Closest series by file content: backport-9.9" in result["error"]
    assert result["candidates"][0]["series"] == "backport-9.9"


def test_unknown_release_with_exactly_matching_files_is_detected_by_content(st, st_json, make_target):
    root = make_target("installed", version="9.9.7")
    code, result = st_json("status", root)
    assert code == 0 and result["release"]["detected"] == "content" and result["state"] == "pristine"
    code, out = st("apply", root)
    assert code == 0 and "detected by content" in out
    assert st("revert", root)[0] == 0


@pytest.mark.parametrize("command", ["status", "check", "apply", "revert"])
def test_native_release_needs_nothing(command, st, make_target):
    root = make_target("installed", version="10.0.0")
    original = snapshot(root)
    code, out = st(command, root)
    assert code == 0 and "native" in out
    assert snapshot(root) == original


def test_leftovers_of_a_reinstall_are_reused_or_removed(st, st_json, make_target, synthetic):
    root = make_target("installed")
    original = snapshot(root)
    assert st("apply", root)[0] == 0
    # `pip install --force-reinstall`: the release's files come back, the new module and the record stay.
    (root / MATRYOSHKA).write_bytes(original[MATRYOSHKA])
    code, result = st_json("status", root)
    assert code == 0 and result["state"] == "partial"
    assert any("left over" in m for m in result["messages"]) and any("stale" in m for m in result["messages"])
    assert st("apply", root)[0] == 0 and st_json("status", root)[1]["state"] == "patched"
    (root / MATRYOSHKA).write_bytes(original[MATRYOSHKA])
    code, out = st("revert", root)
    assert code == 0
    assert snapshot(root) == original


@contextlib.contextmanager
def _held(root: Path, release_after: float | None = None):
    """Another st-patch run on ``root``: the lock st-patch takes, held by this process."""
    fd = os.open(str(root), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    closed = []

    def close():
        if not closed:
            closed.append(os.close(fd))

    timer = threading.Timer(release_after, close) if release_after is not None else None
    if timer:
        timer.start()
    try:
        yield
    finally:
        if timer:
            timer.join()
        close()


@pytest.mark.parametrize("kind", ["source", "installed"])
def test_a_second_run_on_the_same_target_waits_then_fails_cleanly(kind, st, make_target, monkeypatch):
    root = make_target(kind)
    original = snapshot(root)
    monkeypatch.setenv("ST_PATCH_LOCK_TIMEOUT", "0.3")
    with _held(root):
        code, out = st("apply", root)
    assert code == 1 and "another st-patch run is working on" in out and "nothing was changed" in out
    assert "ST_PATCH_LOCK_TIMEOUT" in out
    assert snapshot(root) == original  # untouched, and the lock left no file behind
    monkeypatch.setenv("ST_PATCH_LOCK_TIMEOUT", "30")
    start = time.monotonic()
    with _held(root, release_after=0.5):
        code, out = st("apply", root)  # waits for the other run, then applies
    assert code == 0 and time.monotonic() - start >= 0.5, out
    assert st("revert", root)[0] == 0 and snapshot(root) == original


# --------------------------------------------------------------------------- the script itself


def test_script_runs_as_a_program(make_target, synthetic):
    root = make_target("source")
    original = snapshot(root)
    base = [sys.executable, str(CLI)]
    args = ["--target", str(root), "--manifest", str(synthetic.manifest)]
    proc = subprocess.run(base + ["apply", "--json"] + args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "patched"
    proc = subprocess.run(base + ["revert"] + args, stdout=subprocess.PIPE, text=True)
    assert proc.returncode == 0 and "reverted" in proc.stdout
    assert snapshot(root) == original
    assert os.access(str(CLI), os.X_OK) and CLI.read_text().startswith("#!/usr/bin/env python3\n")


def test_runs_on_python_3_8(make_target, synthetic):
    python = find_python38()
    if python is None:
        pytest.skip("no Python 3.8 interpreter found")
    root = make_target("installed")
    original = snapshot(root)
    for command in ("check", "apply", "status", "revert"):
        proc = subprocess.run(
            [python, str(CLI), command, "--target", str(root), "--manifest", str(synthetic.manifest)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout
    assert snapshot(root) == original


# ------------------------------------------------------------------ real releases, real manifest

REAL_MANIFEST = ROOT / "patches" / "manifest.json"


def _patched_releases():
    if not REAL_MANIFEST.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason="patches/manifest.json not generated yet"))]
    return manifest.load(REAL_MANIFEST).versions("patched")


def _unpacked(version: str, kind: str, dest: Path) -> Path:
    """A fresh unpacked sdist (its source tree) or wheel (laid out as site-packages) of a release."""
    from tools import dists

    return dists.sdist_tree(version, dest) if kind == "sdist" else dists.wheel_tree(version, dest)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sdist", "wheel"])
@pytest.mark.parametrize("version", _patched_releases())
def test_real_release_check_apply_status_apply_revert(version, kind, tmp_path, capsys):
    """On the release's own sdist (source tree) and wheel (site-packages): the whole cycle, byte-exact."""
    root = _unpacked(version, kind, tmp_path / kind)
    original = snapshot(root)

    def run(command):
        code = cli.main([command, "--target", str(root), "--json"])  # the default manifest: the real one
        out = capsys.readouterr().out
        result = json.loads(out)
        assert code == 0, result["error"]
        return result

    series = manifest.load(REAL_MANIFEST).releases[version].series
    result = run("check")
    assert result["action"] == "would-apply" and result["release"]["series"] == series
    assert result["target"]["kind"] == ("source" if kind == "sdist" else "installed")
    assert snapshot(root) == original
    assert run("apply")["action"] == "applied"
    result = run("status")
    assert result["state"] == "patched" and result["eol"] == "crlf"
    assert (root / CACHE).read_bytes().count(b"\r\n") > 0
    assert (root / NEW_TEST).is_file() == (kind == "sdist" and (root / "tests").is_dir())
    assert run("apply")["action"] == "already-patched"
    assert run("revert")["action"] == "reverted"
    assert snapshot(root) == original

"""st-patch keeps an installed package's RECORD true: what it adds, pip uninstall removes."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest
from conftest import snapshot
from st_patch import cli, record

MODULE = "sentence_transformers/losses/_matryoshka_cache.py"
STATE = "sentence_transformers/.st-patch/state.json"
ORIGINAL = (
    "sentence_transformers/__init__.py,sha256=AAAA,10\r\n"
    "sentence_transformers/losses/MatryoshkaLoss.py,sha256=BBBB,20\r\n"
    '"sentence_transformers/odd,name.py",sha256=CCCC,30\r\n'
    "sentence_transformers-9.9.9.dist-info/RECORD,,\r\n"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_rewrite_replaces_in_place_appends_and_round_trips():
    patched = {"sentence_transformers/losses/MatryoshkaLoss.py": b"new", MODULE: b"module"}
    after = record.rewrite(ORIGINAL.encode(), patched, {STATE: True}).decode()
    lines = after.split("\r\n")
    assert lines[1] == f"sentence_transformers/losses/MatryoshkaLoss.py,sha256={_b64(b'new')},3"  # in place
    assert lines[2] == '"sentence_transformers/odd,name.py",sha256=CCCC,30'  # untouched, quoting kept
    assert lines[4:6] == [f"{STATE},,", f"{MODULE},sha256={_b64(b'module')},6"]  # appended, CRLF kept
    assert after.endswith("\r\n") and "\n" not in after.replace("\r\n", "")
    # revert: the release's bytes for the modified file, no row for the added file and the state
    release = b"x" * 20  # the release's bytes of the modified file (its row read BBBB,20)
    back = record.rewrite(
        after.encode(), {"sentence_transformers/losses/MatryoshkaLoss.py": release, MODULE: None}, {STATE: False}
    )
    assert back.decode() == ORIGINAL.replace("BBBB", _b64(release))


def test_rewrite_adds_a_missing_final_newline():
    assert (
        record.rewrite(b"a.py,sha256=A,1", {"b.py": b"b"}, {})
        == f"a.py,sha256=A,1\nb.py,sha256={_b64(b'b')},1\n".encode()
    )


def _dist_files_verify(site: Path, name: str = "sentence_transformers") -> list[str]:
    """Every hashed RECORD row checked against the file, by the standard library's reader."""
    info = next(site.glob(f"{name}-*.dist-info"))
    bad = []
    for f in PathDistribution(info).files:
        if f.hash is None or f.suffix == ".pyc":
            continue
        path = site / f
        if not path.is_file() or _b64(path.read_bytes()) != f.hash.value:
            bad.append(str(f))
    return bad


def test_apply_lists_added_files_and_revert_restores_record_bytes(make_target, capsys, synthetic):
    root = make_target("installed")
    info = next(root.glob("*.dist-info"))
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and info not in p.parents):
        rel = path.relative_to(root).as_posix()
        rows.append(f"{rel},sha256={_b64(path.read_bytes())},{path.stat().st_size}\n")
    (info / "RECORD").write_text("".join(rows) + f"{info.name}/RECORD,,\n")
    original = snapshot(root)
    args = ["--target", str(root), "--manifest", str(synthetic.manifest), "--json"]
    assert cli.main(["apply", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("RECORD" in m and "pip uninstall" in m for m in out["messages"])
    listed = {str(f) for f in PathDistribution(info).files}
    created = [p for p, data in snapshot(root).items() if p not in original and not p.startswith(f"{info.name}/")]
    assert created and set(created) <= listed  # every file st-patch wrote is listed (state.json included)
    assert _dist_files_verify(root) == []  # and every hash is the file's
    patched = snapshot(root)
    # an install patched by an st-patch that did not keep RECORD: apply lists the files, then is a no-op
    (info / "RECORD").write_bytes(original[f"{info.name}/RECORD"])
    assert cli.main(["apply", *args]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "record-updated"
    assert snapshot(root) == patched
    assert cli.main(["apply", *args]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "already-patched"
    assert cli.main(["revert", *args]) == 0
    capsys.readouterr()
    assert snapshot(root) == original  # RECORD byte for byte too


@pytest.mark.slow
def test_pip_uninstall_after_apply_leaves_nothing(tmp_path):
    """A real wheel installed by pip, patched, then uninstalled by pip: no file of the package is left."""
    from tools import dists

    wheel = dists.download("3.3.1", "wheel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    st_patch = [sys.executable, str(Path(cli.__file__).parents[1] / "st-patch")]
    proc = subprocess.run([*st_patch, "apply", "--target", str(site)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / MODULE).is_file() and (site / STATE).is_file()
    assert _dist_files_verify(site) == []
    subprocess.run([*pip, "uninstall", "-y", "sentence-transformers"], check=True)
    left = sorted(p.relative_to(site).as_posix() for p in site.glob("sentence_transformers*"))
    assert left == [], left

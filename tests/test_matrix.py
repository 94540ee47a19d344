"""make matrix: selection, freshness (resumable), retry on a stale environment, progress and exit code;
one definition of "passed" with the report; make demo's series column.

tox itself is replaced by a small fake, so these tests are fast; the slow tests create one real
environment of each lane and run make demo once.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from support import ROOT, TABLE
from tools import matrix, report, results, toxgen


def test_select_all_some_and_unknown():
    jobs = matrix.select(None, "newest")
    assert [j.env for j in jobs] == [f"st-{r.version}" for r in TABLE]
    jobs = matrix.select(["5.3.0", "3.3.1"], "both")
    assert [j.env for j in jobs] == ["st-3.3.1", "st-5.3.0", "st-3.3.1-oldest", "st-5.3.0-oldest"]
    assert jobs[0].series and jobs[0].series.startswith("backport-")
    with pytest.raises(ValueError, match="9.9.9"):
        matrix.select(["9.9.9"], "newest")


def _fake_root(tmp_path):
    root = tmp_path / "root"
    for rel in (
        "tox.ini",
        "patches/manifest.json",
        "scripts/st-patch",
        "conformance/test_a.py",
        "config/uv-oldest.toml",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    return root


def _results(job, status="passed", exitstatus=0, returncode=None):
    job.results.mkdir(parents=True, exist_ok=True)
    summary = {"release": job.version, "state": "patched", "series": None, "exitstatus": exitstatus}
    job.json_path.write_text(json.dumps({**summary, "checks": [{"id": "a", "status": status}]}))
    if returncode is not None:
        job.run_path.write_text(json.dumps({"lane": job.lane, "seconds": 1.0, "returncode": returncode}))


def test_freshness_follows_the_inputs(tmp_path):
    root = _fake_root(tmp_path)
    job = matrix.Job("3.3.1", "oldest", results=tmp_path / "results")
    assert not matrix.is_fresh(job, root)
    _results(job)
    assert matrix.is_fresh(job, root)
    later = time.time() + 5
    os.utime(root / "config" / "uv-oldest.toml", (later, later))  # an input of the oldest lane only
    assert not matrix.is_fresh(job, root)
    assert matrix.is_fresh(matrix.Job("3.3.1", "newest", results=tmp_path / "results2"), root) is False


def test_summarize_counts_and_outcome(tmp_path):
    job = matrix.Job("3.3.1", "newest", results=tmp_path)
    _results(job, "xpassed", exitstatus=1)
    assert matrix.summarize(job.json_path) == (False, "1 xpassed")
    _results(job, "xfailed")
    assert matrix.summarize(job.json_path) == (True, "1 xfailed")
    _results(job, "passed", returncode=1)  # the suite passed, the tox run did not: its .run.json says so
    assert matrix.summarize(job.json_path) == (False, "1 passed")
    assert matrix.summarize(job.json_path, {"returncode": 0}) == (True, "1 passed")


def test_matrix_and_report_share_one_definition_of_passed(tmp_path, monkeypatch):
    job = matrix.Job("3.3.1", "newest", results=tmp_path)
    _results(job, "passed", returncode=1)
    (run,), _warnings = results.load(tmp_path)
    assert matrix.summarize(job.json_path)[0] is False and run.passed is False
    assert matrix.cached_outcome(job).status == "fail"
    assert "**0/1 runs passed** — failing: newest 3.3.1" in report.render_markdown([run])
    # the rule is results.Run.passed: changing it there changes the matrix and the report alike
    monkeypatch.setattr(results.Run, "passed", property(lambda self: self.release == "3.3.1"))
    assert matrix.summarize(job.json_path)[0] is True and matrix.cached_outcome(job).status == "pass"
    assert "**1/1 runs passed**" in report.render_markdown(results.load(tmp_path)[0])


FAKE_TOX = textwrap.dedent(
    """
    import json, os, sys, time
    env, recreate = sys.argv[1], "-r" in sys.argv
    results, envdir = os.environ["FAKE_RESULTS"], os.environ["FAKE_ENVDIR"]
    os.makedirs(os.path.join(envdir, env), exist_ok=True)
    if env.startswith("st-2.4.0") and not recreate and os.path.exists(os.path.join(envdir, env, "stale")):
        print("st-patch apply: refused: modified files")
        sys.exit(1)
    status = "failed" if env.startswith("st-2.5.0") else "passed"
    with open(os.path.join(results, env + ".json"), "w") as fh:
        checks = [{"id": "c", "status": status, "defects": []}]
        series = {"name": "backport-" + env[3:], "kind": "installed", "applied": None, "tool_version": "2.0.0"}
        summary = {"release": env[3:], "state": "patched", "series": series, "defects": {}}
        json.dump({**summary, "exitstatus": int(status == "failed"), "checks": checks}, fh)
    sys.exit(int(status == "failed"))
    """
)


def test_run_parallel_resumable_with_retry_on_a_stale_env(tmp_path, monkeypatch):
    root = _fake_root(tmp_path)
    results_dir = tmp_path / "results"
    envdir = root / ".tox"
    fake = tmp_path / "fake_tox.py"
    fake.write_text(FAKE_TOX)
    monkeypatch.setenv("FAKE_RESULTS", str(results_dir))
    monkeypatch.setenv("FAKE_ENVDIR", str(envdir))
    monkeypatch.setattr(
        matrix, "tox_command", lambda job, recreate: [sys.executable, str(fake), job.env] + (["-r"] if recreate else [])
    )
    (envdir / "st-2.4.0").mkdir(parents=True)
    (envdir / "st-2.4.0" / "stale").write_text("")  # patched by an older series: apply refuses
    jobs = [matrix.Job(v, "newest", series=None, results=results_dir) for v in ("2.4.0", "2.5.0", "2.6.0")]

    out = io.StringIO()
    assert matrix.run(jobs, parallel=2, force=False, recreate=False, root=root, out=out) == 1
    lines = out.getvalue().splitlines()
    progress = sorted(ln for ln in lines if ln.startswith("["))
    assert len(progress) == 3 and {ln[:5] for ln in progress} == {"[1/3]", "[2/3]", "[3/3]"}
    by_env = {ln.split()[1]: ln for ln in progress}
    assert " pass " in by_env["st-2.4.0"] and "recreated" in by_env["st-2.4.0"]
    assert " fail " in by_env["st-2.5.0"] and "1 failed" in by_env["st-2.5.0"]
    assert " pass " in by_env["st-2.6.0"] and " ran " in by_env["st-2.6.0"]
    assert "matrix: 2/3 passed (3 ran, 0 cached)" in out.getvalue()
    assert "FAILED st-2.5.0" in out.getvalue()
    record = json.loads((results_dir / "st-2.4.0.run.json").read_text())
    assert record["recreated"] is True and record["returncode"] == 0 and record["lane"] == "newest"
    assert "st_patch" not in record  # which series is applied is the conformance JSON's
    assert "recreating the environment" in (results_dir / "logs" / "st-2.4.0.log").read_text()

    out = io.StringIO()  # again: every result is fresh, the failure is remembered
    assert matrix.run(jobs, parallel=2, force=False, recreate=False, root=root, out=out) == 1
    assert "(0 ran, 3 cached)" in out.getvalue() and out.getvalue().count(" cached ") == 3

    out = io.StringIO()
    assert matrix.run(jobs[:1], parallel=1, force=True, recreate=False, root=root, out=out) == 0
    assert "(1 ran, 0 cached)" in out.getvalue()


# A tox run as make demo's: install (a package of the release), `st-patch apply` (its state record, as
# scripts/st_patch/tree.py writes it), then the conformance suite, whose JSON takes release, state and
# series from conformance/env.py reading that package.
FAKE_DEMO_TOX = textwrap.dedent(
    """
    import json, os, sys
    from types import SimpleNamespace
    env_name, root, version = sys.argv[1], os.environ["FAKE_ROOT"], os.environ["FAKE_VERSION"]
    site = os.path.join(os.environ["FAKE_ENVDIR"], env_name, "lib", "python3.11", "site-packages")
    pkg = os.path.join(site, "sentence_transformers")
    os.makedirs(os.path.join(pkg, ".st-patch"), exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as fh:
        fh.write(f'__version__ = "{version}"\\n')
    sys.path[:0] = [site, root, os.path.join(root, "scripts")]
    from st_patch import tree
    series = SimpleNamespace(name=os.environ["FAKE_SERIES"], patches=["0001-x.patch"], files={})
    target = SimpleNamespace(kind="installed", in_scope=lambda rel: True)
    record = tree.state_record(SimpleNamespace(series=series, version=version, detected=False, target=target))
    with open(os.path.join(pkg, ".st-patch", tree.STATE_FILE), "w") as fh:
        json.dump(record, fh)
    from conformance import env
    checks = [{"id": "conformance/test_a.py::test_b", "status": "passed", "defects": []}]
    summary = {"release": env.RELEASE, "state": env.STATE, "series": env.SERIES, "exitstatus": 0}
    with open(os.path.join(os.environ["FAKE_RESULTS"], env_name + ".json"), "w") as fh:
        json.dump({**summary, "defects": {}, "checks": checks}, fh)
    """
)


def test_demo_flow_reports_the_series_it_applied(tmp_path, monkeypatch):
    """make demo = `tools.matrix --versions VERSION --force --recreate`, then `make report`: the report's
    series column names the series applied in that run's environment."""
    # PYTHON=echo: make -n still runs the recipe line that calls $(MAKE); echo shows what it would run
    make = ["make", "-n", "demo", "VERSION=2.7.0", "PYTHON=echo"]
    lines = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines.index("-m tools.matrix --versions 2.7.0 --force --recreate") < lines.index(
        "echo -m tools.report --results results --out report"
    )
    (job,) = matrix.select(["2.7.0"], "newest")
    job.results = tmp_path / "results"
    job.results.mkdir()
    fake = tmp_path / "fake_tox.py"
    fake.write_text(FAKE_DEMO_TOX)
    for key, value in {
        "FAKE_ROOT": str(ROOT),
        "FAKE_VERSION": "2.7.0",
        "FAKE_SERIES": job.series,
        "FAKE_ENVDIR": str(tmp_path / ".tox"),
        "FAKE_RESULTS": str(job.results),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(matrix, "tox_command", lambda job, recreate: [sys.executable, str(fake), job.env])
    assert matrix.run([job], parallel=1, force=True, recreate=True, root=tmp_path, out=io.StringIO()) == 0
    assert report.main(["--results", str(job.results), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| 2.7.0 |"))
    assert job.series == "backport-2.7.0" and row.startswith("| 2.7.0 | backport-2.7.0 (installed, patched) | ✅ 1 |")


def test_make_passes_the_variables():
    # not the variables of a make that runs these tests (make test-fast JOBS=2 exports them in MAKEFLAGS)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "JOBS")}
    result = subprocess.run(
        ["make", "-n", "matrix", "VERSIONS=3.3.1 5.3.0", "LANE=oldest", "JOBS=3", "FORCE=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    command = " ".join(result.stdout.replace("\\\n", " ").split())
    assert '-m tools.matrix --lane oldest --versions "3.3.1 5.3.0" --jobs 3 --force' in command
    result = subprocess.run(["make", "-n", "matrix"], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert "--jobs" not in result.stdout and "--force" not in result.stdout  # default: core count, resumable


def test_tox_ini_has_both_lanes():
    text = (ROOT / "tox.ini").read_text()
    for release in TABLE:
        assert f"[testenv:{toxgen.env_name(release.version)}]" in text
        section = text.split(f"[testenv:{toxgen.env_name(release.version, 'oldest')}]\n", 1)[1].split("\n[", 1)[0]
        assert f"UV_EXCLUDE_NEWER = {release.date.isoformat()}T00:00:00Z" in section
        assert "UV_CONFIG_FILE = {tox_root}/config/uv-oldest.toml" in section
        assert f"sentence-transformers=={release.version}" in section and "torch==2.13.0" in section
    for release in TABLE:  # newest lane: exact pins only
        section = text.split(f"[testenv:st-{release.version}]\n", 1)[1].split("\n[", 1)[0]
        deps = [d.strip() for d in section.split("deps =", 1)[1].splitlines() if d.strip()]
        assert all("==" in d for d in deps if d not in ("pytest", "pytest-xdist", "packaging")), deps


@pytest.mark.slow
def test_make_demo_reports_the_series():
    """The real make demo: a fresh environment of 3.0.1, its series applied, the suite, the report. 3.0.1 has
    an upstream defect of its own (matryoshka2d-module-not-callable, #2841) that its series fixes, so no
    check may be left an expected failure."""
    subprocess.run(["make", "demo", "VERSION=3.0.1"], cwd=ROOT, check=True)
    md = (ROOT / "report" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| 3.0.1 |"))
    assert row.startswith("| 3.0.1 | backport-3.0.1 (installed, patched) | ✅ "), row
    summary = json.loads((ROOT / "results" / "st-3.0.1.json").read_text())
    assert summary["series"]["name"] == "backport-3.0.1" and summary["series"]["kind"] == "installed"
    assert [c["id"] for c in summary["checks"] if c["status"] == "xfailed"] == []
    assert any("Matryoshka2dLoss" in c["id"] and c["status"] == "passed" for c in summary["checks"])


@pytest.mark.slow
@pytest.mark.parametrize("env", ["st-2.4.0-oldest", "st-3.3.1"])
def test_environment_creates_and_imports(env):
    """One real environment per lane: created by tox (uv), sentence-transformers imports."""
    environ = {**os.environ, "UV_FIND_LINKS": os.environ.get("UV_FIND_LINKS", "/opt/wheels")}
    subprocess.run([sys.executable, "-m", "tox", "-q", "-e", env, "--notest"], cwd=ROOT, check=True, env=environ)
    python = ROOT / ".tox" / env / "bin" / "python"
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import sentence_transformers, torch; print(sentence_transformers.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == env.split("-")[1] and out[1] == "2.13.0+cpu"

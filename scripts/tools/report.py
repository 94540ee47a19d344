"""Merge conformance results into ``report/report.md`` and ``report/report.html`` (``make report``).

Reads the runs of ``tools.results`` (each conformance JSON and the ``.run.json`` that ``make matrix``
writes beside it) and nothing else: the series and how it was applied, the defect ids of every
expected failure and their upstream references are fields of the conformance JSON. Whether a run
passed is ``results.Run.passed`` (the matrix's definition too). The data for the page is prepared
here; the layout is in ``templates/report.md.j2`` and ``templates/report.html.j2`` (Jinja2).

The Markdown fits a PR comment / job summary and reads top-down in a minute:

1. one line per lane (``newest`` = series applied, ``oldest``, ``upstream`` = as shipped): how many
   runs pass, and which fail;
2. one row per release: the series and how it was applied, one cell per lane, the largest float64
   difference from the reference over the passing checks, and timings;
3. the failing checks grouped by message (numbers masked), with the releases each group hits;
4. the expected failures grouped by upstream defect, with the link and the releases per lane
   (consecutive releases folded into ranges);
5. where ``make bench`` has written ``bench/bench.json``: the benchmark's targets and whether this
   run met them (``--bench DIR``);
6. the run × check grid (checks grouped by test function; a cell aggregates its parametrisations)
   in a collapsed block, consecutive runs of a lane with identical rows folded into one.

"Float64 difference" excludes the float32 checks (``float32`` in the check id): they have their own
documented tolerance and would hide the float64 figure under float32 rounding.
The HTML is self-contained (inline CSS, no scripts), has the same summary and the unfolded tables,
with each failing check's message (or an expected failure's defects) in the cell's tooltip.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import results, toxgen
from .results import Check, Run

HOW = {"git": "fork", "source": "sdist", "installed": "installed"}
UPSTREAM = "https://github.com/huggingface/sentence-transformers"
TEMPLATES = Path(__file__).with_name("templates")
MD_LIMIT = 60000  # GitHub comments hold 65536 characters
MD_FAILURE_KINDS = 15
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")
URL = re.compile(r"https?://[^\s)\]>,;]+")
REF = re.compile(r"(?<![\w/])#(\d{2,6})\b")
COMMIT = re.compile(r"\bcommit ([0-9a-f]{7,40})\b")
NOT_REGISTERED = "(not in the registry)"  # an xfail that no registry entry marked
LANE_ORDER = toxgen.LANES
LANE_TITLE = {
    "newest": "newest (series applied)",
    "oldest": "oldest (deps of the release date)",
    "upstream": "upstream (as shipped)",
    "generic": "generic (series applied, generic per-width path forced)",
}


# --- text helpers ----------------------------------------------------------------------------------


def one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_diff(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}s"


def reference_links(reference: str) -> list[str]:
    """The links of a registry entry's ``upstream`` reference: its URLs, then ``#1234`` as a link to
    the upstream repository (GitHub forwards ``/issues/N`` to the pull request when N is one) and
    ``commit abc1234``."""
    links = [u.rstrip(".") for u in URL.findall(reference or "")]
    bare = URL.sub("", reference or "")
    links += [f"{UPSTREAM}/issues/{n}" for n in REF.findall(bare)]
    links += [f"{UPSTREAM}/commit/{h}" for h in COMMIT.findall(bare)]
    return list(dict.fromkeys(links))


def short_link(url: str) -> str:
    m = re.search(r"github\.com/([^/]+/[^/]+)/(?:issues|pull)/(\d+)", url)
    if m:
        return f"#{m.group(2)}" if url.startswith(UPSTREAM + "/") else f"{m.group(1)}#{m.group(2)}"
    m = re.search(r"github\.com/[^/]+/[^/]+/commit/([0-9a-f]{7,12})", url)
    return m.group(1) if m else url


def group_of(check_id: str) -> str:
    """``conformance/test_x.py::test_y[a-b]`` -> ``test_x::test_y`` (a grid column)."""
    base = check_id.split("[", 1)[0]
    module, _, func = base.rpartition("::")
    module = module.rsplit("/", 1)[-1].removesuffix(".py")
    return f"{module}::{func}" if module else func


def check_name(check_id: str) -> str:
    """``conformance/test_x.py::test_y[a]`` -> ``test_y[a]``."""
    return check_id.split("::")[-1]


# --- releases and lanes ----------------------------------------------------------------------------


def release_order(runs: list[Run]) -> list[str]:
    """The releases of the report, in the (version) order of ``runs``: what ``ranges`` folds over."""
    return list(dict.fromkeys(r.release for r in runs))


def releases_by_lane(runs) -> dict[str, list[str]]:
    """{lane: [release, ...]} of ``runs``, each release once, in order of appearance."""
    out: dict[str, list[str]] = {}
    for run in runs:
        releases = out.setdefault(run.lane, [])
        if run.release not in releases:
            releases.append(run.release)
    return out


def lanes(runs: list[Run]) -> list[str]:
    present = {r.lane for r in runs}
    return [ln for ln in LANE_ORDER if ln in present] + sorted(present - set(LANE_ORDER))


def ranges(items: list[str], order: list[str]) -> str:
    """``["2.5.0", "2.5.1", "3.0.0"]`` -> ``"2.5.0–2.5.1, 3.0.0"``: items consecutive in ``order`` fold."""
    index = {v: i for i, v in enumerate(order)}
    spans: list[list[str]] = []
    for item in sorted(set(items), key=lambda v: index.get(v, len(order))):
        if spans and index.get(item, -2) == index.get(spans[-1][-1], -9) + 1:
            spans[-1].append(item)
        else:
            spans.append([item])
    return ", ".join(sp[0] if len(sp) == 1 else f"{sp[0]}–{sp[-1]}" for sp in spans)


def where(by_lane: dict[str, list[str]], order: list[str], sep: str = " ") -> str:
    """``{"newest": ["3.4.0", "3.4.1"]}`` -> ``"newest 3.4.0–3.4.1"`` (lanes joined by ``; ``)."""
    return "; ".join(f"{lane}{sep}{ranges(rel, order)}" for lane, rel in by_lane.items())


# --- one run ---------------------------------------------------------------------------------------


def is_float32_pass(check: Check) -> bool:
    return check.status == "passed" and "float32" in check.id


def is_float64_pass(check: Check) -> bool:
    return check.status == "passed" and "float32" not in check.id


def max_diff(run: Run, keep=lambda check: True) -> tuple[float | None, float | None, str | None]:
    """(largest max_abs_diff, its max_rel_diff, the check) over the checks that compared numbers and
    that ``keep`` accepts."""
    best: tuple[float | None, float | None, str | None] = (None, None, None)
    for c in run.checks:
        if keep(c) and c.max_abs_diff is not None and (best[0] is None or c.max_abs_diff > best[0]):
            best = (c.max_abs_diff, c.max_rel_diff, c.id)
    return best


def series_text(run: Run) -> str:
    """``backport-3.3.0-3.3.1 (installed, patched)``, ``none (native)``, or ``?`` for a summary that
    does not say."""
    if not run.knows_series:
        return "?"
    series = run.series
    if not series:
        return f"none ({run.state})"
    how = HOW.get(series.get("kind"), series.get("kind") or "?")
    return f"{series.get('name') or '?'} ({how}, {run.state})"


def check_seconds(run: Run) -> float:
    return sum(c.duration for c in run.checks)


def short_counts(run: Run) -> str:
    """A release-row cell: ``✅ 41 ⚠️3``, ``❌ 2 failed``, ``❌ exit 1``."""
    counts = run.counts()
    if not run.passed:
        bad = len(run.failed)
        if bad:
            return f"❌ {bad} failed"
        return f"❌ exit {run.returncode}" if run.returncode else f"❌ exit {run.exitstatus}"
    parts = [f"✅ {counts.get('passed', 0)}"]
    if counts.get("xfailed"):
        parts.append(f"⚠️{counts['xfailed']}")
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} skip")
    return " ".join(parts)


@dataclass
class Cell:
    """The checks of one test function in one run."""

    status: str  # pass | fail | xfail | skip | none
    total: int = 0
    bad: int = 0
    xfailed: int = 0
    lines: list[str] = field(default_factory=list)  # the tooltip

    @property
    def text(self) -> str:
        if self.status == "fail":
            return f"❌ {self.bad}/{self.total}"
        if self.status == "xfail":
            return f"⚠️ xfail {self.xfailed}/{self.total}"
        return {"pass": "✅", "skip": "skip"}.get(self.status, "—")


def cell(run: Run, group: str) -> Cell:
    checks = [c for c in run.checks if group_of(c.id) == group]
    if not checks:
        return Cell("none")
    out = Cell("pass", total=len(checks))
    out.bad = sum(c.bad for c in checks)
    out.xfailed = sum(c.status == "xfailed" for c in checks)
    if out.bad:
        out.status = "fail"
        out.lines = [f"{check_name(c.id)}: {c.status}: {one_line(c.message)}" for c in checks if c.bad]
    elif out.xfailed:
        out.status = "xfail"
        out.lines = [
            f"{check_name(c.id)}: {', '.join(c.defects) or NOT_REGISTERED}" for c in checks if c.status == "xfailed"
        ]
    elif all(c.status == "skipped" for c in checks):
        out.status = "skip"
    return out


def groups(runs: list[Run]) -> list[str]:
    return sorted({group_of(c.id) for run in runs for c in run.checks})


# --- across runs -----------------------------------------------------------------------------------


@dataclass
class FailureKind:
    """Failing checks whose one-line messages agree once numbers are masked (a crash is one kind
    whatever the tensor sizes it names)."""

    signature: str
    checks: list[tuple[Run, Check]] = field(default_factory=list)

    @property
    def run(self) -> Run:
        return self.checks[0][0]

    @property
    def check(self) -> Check:
        return self.checks[0][1]

    def where(self) -> dict[str, list[str]]:
        return releases_by_lane(run for run, _check in self.checks)


def failure_kinds(runs: list[Run]) -> list[FailureKind]:
    """The failing checks grouped by masked message (and test function), most checks first."""
    kinds: dict[str, FailureKind] = {}
    for run in runs:
        for c in run.failed:
            key = group_of(c.id) + " " + NUMBER.sub("N", one_line(c.message, 120))
            kinds.setdefault(key, FailureKind(key)).checks.append((run, c))
    return sorted(kinds.values(), key=lambda k: -len(k.checks))


@dataclass
class Defect:
    """An upstream defect of the registry, as the expected failures of the runs show it."""

    id: str
    reason: str = ""
    upstream: str = ""
    hits: list[tuple[Run, Check]] = field(default_factory=list)

    @property
    def links(self) -> list[str]:
        return reference_links(self.upstream)

    def where(self) -> dict[str, list[str]]:
        return releases_by_lane(run for run, _check in self.hits)


def defects(runs: list[Run]) -> list[Defect]:
    """The defects of the expected failures (``xfailed`` checks' ``defects``), in order of first sight."""
    found: dict[str, Defect] = {}
    for run in runs:
        for c in run.checks:
            if c.status != "xfailed":
                continue
            for key in c.defects or (NOT_REGISTERED,):
                info = run.defects.get(key) or {}
                entry = found.setdefault(key, Defect(key, info.get("reason", ""), info.get("upstream", "")))
                entry.hits.append((run, c))
    return list(found.values())


def lane_summary(runs: list[Run]) -> list[tuple[str, str]]:
    """(title, text) per lane - "40/40 pass; failing: 3.3.1" - and one for the float32 checks."""
    order = release_order(runs)
    failing = releases_by_lane(r for r in runs if not r.passed)
    out = []
    for lane in lanes(runs):
        in_lane = [r for r in runs if r.lane == lane]
        bad = failing.get(lane, [])
        text = f"{len(in_lane) - len(bad)}/{len(in_lane)} pass" + (f"; failing: {ranges(bad, order)}" if bad else "")
        out.append((LANE_TITLE.get(lane, lane), text))
    f32 = [d for d in (max_diff(r, is_float32_pass) for r in runs) if d[0] is not None]
    if f32:
        worst = max(f32, key=lambda d: d[0])
        text = f"own tolerance, not in the table: largest |diff| {fmt_diff(worst[0])} (rel {fmt_diff(worst[1])})"
        out.append(("float32 checks", text))
    return out


@dataclass
class ReleaseRow:
    release: str
    series: str
    cells: list[str]
    diff: str
    time: str


def release_rows(runs: list[Run], lane_list: list[str]) -> list[ReleaseRow]:
    """One row per release: the series (of the first lane that applied one), a cell per lane, the
    largest float64 difference over the release's runs, the newest lane's wall and suite time."""
    by_release: dict[str, dict[str, Run]] = {}
    for run in runs:
        by_release.setdefault(run.release, {})[run.lane] = run
    rows = []
    for release, by_lane in by_release.items():
        ordered = [by_lane[ln] for ln in (*LANE_ORDER, *by_lane) if ln in by_lane]
        shown = next((r for r in ordered if r.series), ordered[0])
        diffs = [d for d in (max_diff(r, is_float64_pass) for r in ordered) if d[0] is not None]
        abs_d, rel_d, _check = max(diffs, key=lambda d: d[0]) if diffs else (None, None, None)
        main = ordered[0]
        rows.append(
            ReleaseRow(
                release,
                series_text(shown),
                [short_counts(by_lane[ln]) if ln in by_lane else "—" for ln in lane_list],
                fmt_diff(abs_d) + (f" ({fmt_diff(rel_d)})" if rel_d is not None else ""),
                f"{fmt_seconds(main.seconds)} ({check_seconds(main):.0f}s)",
            )
        )
    return rows


def folded_grid(runs: list[Run], cols: list[str], order: list[str]) -> list[tuple[str, list[str]]]:
    """(label, cells) per lane and run of consecutive releases whose cells are identical."""
    out: list[tuple[str, list[str]]] = []
    for lane in lanes(runs):
        block: list[tuple[list[str], list[str]]] = []  # (releases, cells)
        for run in (r for r in runs if r.lane == lane):
            cells = [cell(run, c).text for c in cols]
            if block and block[-1][1] == cells:
                block[-1][0].append(run.release)
            else:
                block.append(([run.release], cells))
        out += [(f"{lane} {ranges(rel, order)}", cells) for rel, cells in block]
    return out


@dataclass
class RunRow:
    """A run in the HTML's table of runs."""

    run: Run
    series: str
    result: str  # pass | fail
    diff: tuple[float | None, float | None, str | None]  # over every check that compared numbers
    versions: str


def run_rows(runs: list[Run]) -> list[RunRow]:
    return [
        RunRow(
            run,
            series_text(run),
            "pass" if run.passed else "fail",
            max_diff(run),
            f"{run.summary.get('torch', '?')} / {run.summary.get('transformers', '?')}",
        )
        for run in runs
    ]


# --- rendering -------------------------------------------------------------------------------------


def bench_summary(directory: Path | None) -> dict | None:
    """The targets of ``make bench``'s run in ``directory`` (its ``bench.json``) for the report; None without one."""
    path = directory / "bench.json" if directory else None
    if path is None or not path.is_file():
        return None
    from . import bench

    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [
        {**row, "value": "-" if row["value"] is None else f"{row['value']:.3f}"}
        | {"met": {True: "yes", False: "NO", None: "not measured"}[row["met"]]}
        for row in bench.targets(data)
    ]
    return {"title": bench.title(data), "source": str(path), "targets": rows}


def context(runs: list[Run], warnings: list[str] | None = None, bench: dict | None = None) -> dict:
    """Everything both templates show, prepared (they only lay it out)."""
    order = release_order(runs)
    lane_list = lanes(runs)
    failed = [r for r in runs if not r.passed]
    cols = groups(runs)
    return {
        "runs": runs,
        "warnings": warnings or [],
        "bench": bench,
        "order": order,
        "passed": len(runs) - len(failed),
        "failing": where(releases_by_lane(failed), order),
        "lane_list": lane_list,
        "lane_summary": lane_summary(runs),
        "rows": release_rows(runs, lane_list),
        "kinds": failure_kinds(runs),
        "kinds_shown": MD_FAILURE_KINDS,
        "broken": [r for r in failed if not r.failed],
        "defects": defects(runs),
        "cols": cols,
        "grid": folded_grid(runs, cols, order),
        "run_rows": run_rows(runs),
        "cells": [(run.name, [cell(run, c) for c in cols]) for run in runs],
        "failures": [(run, c) for run in runs for c in run.failed],
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=md_escape, one_line=one_line, short_link=short_link, check_name=check_name)
    env.filters.update(code=lambda text: f"`{text}`", column_title=lambda group: f"`{group.split('::')[-1]}`")
    env.filters.update(fmt_diff=fmt_diff, fmt_seconds=fmt_seconds)
    env.globals.update(where=where, check_seconds=check_seconds)
    return env


def render_markdown(runs: list[Run], warnings: list[str] | None = None, bench: dict | None = None) -> str:
    text = _environment().get_template("report.md.j2").render(context(runs, warnings, bench))
    if len(text) > MD_LIMIT:
        cut = text[:MD_LIMIT].rsplit("\n", 1)[0]
        text = cut + "\n\n… (truncated; the full report is report.html)\n"
    return text


def render_html(runs: list[Run], warnings: list[str] | None = None, bench: dict | None = None) -> str:
    return _environment().get_template("report.html.j2").render(context(runs, warnings, bench))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--out", default="report", type=Path)
    parser.add_argument("--bench", default="bench", type=Path, help="make bench's output (its targets, if there)")
    args = parser.parse_args(argv)
    runs, warnings = results.load(args.results)
    bench = bench_summary(args.bench)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(render_markdown(runs, warnings, bench), encoding="utf-8")
    (args.out / "report.html").write_text(render_html(runs, warnings, bench), encoding="utf-8")
    failed = sum(not r.passed for r in runs)
    print(f"report: {len(runs)} runs, {failed} failing -> {args.out}/report.md, {args.out}/report.html")
    for w in warnings:
        print(f"report: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

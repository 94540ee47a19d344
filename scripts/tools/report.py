"""Merge conformance results into ``report/report.md`` and ``report/report.html`` (``make report``).

Reads JSON only, and knows nothing about how the results were produced:

- ``<name>.json`` with a ``checks`` list: a conformance summary (``--conformance-json``):
  ``{"release", "state", "torch", "transformers", "exitstatus", "checks": [{"id", "status",
  "max_abs_diff", "max_rel_diff", "duration", "message"}]}``;
- ``<name>.run.json`` (optional, same ``<name>``): ``{"seconds", "lane", "returncode", "st_patch":
  {"series", "kind", "state", ...}}`` - which series was applied, to what kind of target, wall time.

The Markdown fits a PR comment / job summary and reads top-down in a minute:

1. one line per lane (``newest`` = series applied, ``oldest``, ``upstream`` = as shipped): how many
   runs pass, and which fail;
2. one row per release: the series and how it was applied, one cell per lane, the largest float64
   difference from the reference over the passing checks, and timings;
3. the failing checks grouped by message (numbers masked), with the releases each group hits;
4. the expected failures grouped by upstream defect, with the link and the releases per lane
   (consecutive releases folded into ranges);
5. the run × check grid (checks grouped by test function; a cell aggregates its parametrisations)
   in a collapsed block, consecutive runs of a lane with identical rows folded into one.

The lane of a run is the ``lane`` of its ``.run.json``, else the suffix of its name (``st-3.3.1-oldest``).
"Float64 difference" excludes the float32 checks (``float32`` in the check id): they have their own
documented tolerance and would hide the float64 figure under float32 rounding.
The HTML is self-contained (inline CSS, no scripts), has the same summary and the unfolded tables,
with each failing check's message in the cell's tooltip.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

BAD = ("failed", "error", "xpassed")
HOW = {"git": "fork", "source": "sdist", "installed": "installed"}
URL = re.compile(r"https?://[^\s)\]>,;]+")
MD_LIMIT = 60000  # GitHub comments hold 65536 characters
MD_FAILURE_KINDS = 15
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@dataclass
class Run:
    name: str
    release: str
    state: str
    checks: list[dict]
    data: dict
    meta: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if c.get("status") in BAD]

    @property
    def passed(self) -> bool:
        return not self.failed and int(self.data.get("exitstatus", 0) or 0) in (0, 5) and bool(self.checks)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.checks:
            out[c.get("status") or "unknown"] = out.get(c.get("status") or "unknown", 0) + 1
        return out

    @property
    def lane(self) -> str:
        lane = self.meta.get("lane")
        if isinstance(lane, str) and lane:
            return lane
        suffix = self.name.rsplit("-", 1)[-1]
        return suffix if suffix in ("oldest", "upstream") else "newest"

    def max_diff(self, keep=lambda check: True) -> tuple[float | None, float | None, str | None]:
        """(largest max_abs_diff, its max_rel_diff, the check) over the checks that compared numbers
        and that ``keep`` accepts (see ``is_float64_pass`` / ``is_float32_pass``)."""
        best: tuple[float | None, float | None, str | None] = (None, None, None)
        for c in self.checks:
            value = c.get("max_abs_diff")
            if keep(c) and isinstance(value, (int, float)) and (best[0] is None or value > best[0]):
                best = (float(value), c.get("max_rel_diff"), c.get("id"))
        return best

    @property
    def series(self) -> str:
        patch = self.meta.get("st_patch") or {}
        if not patch:
            return "?"
        name = patch.get("series")
        how = HOW.get(patch.get("kind"), patch.get("kind") or "?")
        if not name:
            return f"none ({patch.get('state') or patch.get('support') or 'native'})"
        return f"{name} ({how}, {patch.get('state') or '?'})"

    @property
    def seconds(self) -> float | None:
        value = self.meta.get("seconds")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def check_seconds(self) -> float:
        return sum(float(c.get("duration") or 0.0) for c in self.checks)


def is_float32_pass(check: dict) -> bool:
    return check.get("status") == "passed" and "float32" in check["id"]


def is_float64_pass(check: dict) -> bool:
    return check.get("status") == "passed" and "float32" not in check["id"]


def _version_key(text: str):
    parts = re.findall(r"\d+|[A-Za-z]+", text)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def load(directory: Path) -> tuple[list[Run], list[str]]:
    """The conformance runs under ``directory`` (sorted by release, then name) and warnings."""
    runs, warnings = [], []
    for path in sorted(Path(directory).glob("*.json")):
        if path.name.endswith(".run.json"):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            warnings.append(f"{path.name}: not readable JSON ({exc})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
            continue  # not a conformance summary
        name = path.name[: -len(".json")]
        meta: dict = {}
        sidecar = path.with_name(f"{name}.run.json")
        if sidecar.exists():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                warnings.append(f"{sidecar.name}: not readable JSON ({exc})")
        checks = [c for c in data["checks"] if isinstance(c, dict) and c.get("id")]
        runs.append(Run(name, str(data.get("release", "?")), str(data.get("state", "?")), checks, data, meta))
    runs.sort(key=lambda r: (_version_key(r.release), r.name))
    return runs, warnings


def group_of(check_id: str) -> str:
    """``conformance/test_x.py::test_y[a-b]`` -> ``test_x::test_y`` (a grid column)."""
    base = check_id.split("[", 1)[0]
    module, _, func = base.rpartition("::")
    module = module.rsplit("/", 1)[-1].removesuffix(".py")
    return f"{module}::{func}" if module else func


def upstream_links(message: str) -> list[str]:
    return list(dict.fromkeys(u.rstrip(".") for u in URL.findall(message or "")))


def one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass
class Cell:
    status: str  # pass | fail | xfail | skip | none
    total: int = 0
    bad: int = 0
    xfailed: int = 0
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        if self.status == "fail":
            return f"❌ {self.bad}/{self.total}"
        if self.status == "xfail":
            return f"⚠️ xfail {self.xfailed}/{self.total}"
        if self.status == "pass":
            return "✅"
        if self.status == "skip":
            return "skip"
        return "—"


def cell(run: Run, group: str) -> Cell:
    checks = [c for c in run.checks if group_of(c["id"]) == group]
    if not checks:
        return Cell("none")
    statuses = [c.get("status") for c in checks]
    out = Cell("pass", total=len(checks))
    out.bad = sum(s in BAD for s in statuses)
    out.xfailed = sum(s == "xfailed" for s in statuses)
    out.lines = [
        f"{c['id'].split('::')[-1]}: {c.get('status')}: {one_line(c.get('message'))}"
        for c in checks
        if c.get("status") in BAD
    ]
    if out.bad:
        out.status = "fail"
    elif out.xfailed:
        out.status = "xfail"
    elif all(s == "skipped" for s in statuses):
        out.status = "skip"
    return out


def groups(runs: list[Run]) -> list[str]:
    seen: dict[str, None] = {}
    for run in runs:
        for c in run.checks:
            seen.setdefault(group_of(c["id"]), None)
    return sorted(seen)


UPSTREAM = "https://github.com/huggingface/sentence-transformers"
SEGMENT = re.compile(r"\[([A-Za-z0-9_.:-]+)\]\s*(.*?)(?=;\s*\[[A-Za-z0-9_.:-]+\]|$)", re.S)
REF = re.compile(r"(?<![\w/])#(\d{2,6})\b")
COMMIT = re.compile(r"\bcommit ([0-9a-f]{7,40})\b")


def defect_links(text: str) -> list[str]:
    """Explicit URLs, then ``#1234`` references as links to the upstream repository (GitHub forwards
    ``/issues/N`` to the pull request when N is one)."""
    links = upstream_links(text)
    bare = URL.sub("", text or "")
    links += [f"{UPSTREAM}/issues/{n}" for n in REF.findall(bare)]
    links += [f"{UPSTREAM}/commit/{h}" for h in COMMIT.findall(bare)]
    return list(dict.fromkeys(links))


def expected_failures(run: Run) -> list[tuple[str, str, list[str]]]:
    """(defect id or reason, first check, links) per distinct expected failure of the run.

    A registry xfail message reads ``xfail: [id] reason (reference); [id2] reason (reference)``:
    each ``[id]`` is its own defect, with the links of its own segment."""
    found: dict[str, tuple[str, str, list[str]]] = {}
    for c in run.checks:
        if c.get("status") != "xfailed":
            continue
        message = (c.get("message") or "").removeprefix("xfail:").strip()
        segments = [(m.group(1), m.group(2)) for m in SEGMENT.finditer(message)]
        if not segments:
            segments = [(one_line(message, 120), message)]
        for key, text in segments:
            if key not in found:
                found[key] = (key, c["id"], defect_links(text))
    return list(found.values())


def _fmt_diff(value) -> str:
    return "—" if value is None else f"{value:.2e}"


def _fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}s"


def _counts_text(run: Run) -> str:
    counts = run.counts()
    order = ("passed", "failed", "error", "xfailed", "xpassed", "skipped")
    keys = [*[k for k in order if k in counts], *sorted(set(counts) - set(order))]
    return ", ".join(f"{counts[k]} {k}" for k in keys) or "no checks"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


LANE_ORDER = ("newest", "oldest", "upstream")
LANE_TITLE = {
    "newest": "newest (series applied)",
    "oldest": "oldest (deps of the release date)",
    "upstream": "upstream (as shipped)",
}


def release_order(runs: list[Run]) -> list[str]:
    """The releases of the report, in the (version) order of ``runs``: what ``ranges`` folds over."""
    return list(dict.fromkeys(r.release for r in runs))


def releases_by_lane(runs) -> dict[str, list[str]]:
    """{lane: [release, ...]} of ``runs`` (Run objects), each release once, in order of appearance."""
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


def _short_counts(run: Run) -> str:
    counts = run.counts()
    if not run.passed:
        bad = sum(counts.get(k, 0) for k in BAD)
        return f"❌ {bad} failed" if bad else f"❌ exit {run.data.get('exitstatus')}"
    parts = [f"✅ {counts.get('passed', 0)}"]
    if counts.get("xfailed"):
        parts.append(f"⚠️{counts['xfailed']}")
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} skip")
    return " ".join(parts)


def _release_rows(runs: list[Run]) -> list[tuple[str, dict[str, Run]]]:
    rows: dict[str, dict[str, Run]] = {}
    for run in runs:
        rows.setdefault(run.release, {})[run.lane] = run
    return list(rows.items())


def _series_of(by_lane: dict[str, Run]) -> str:
    for lane in ("newest", "oldest", *by_lane):
        run = by_lane.get(lane)
        if run is not None and (run.meta.get("st_patch") or {}).get("state") != "pristine":
            return run.series
    return "none applied"


def _defects(runs: list[Run]) -> list[tuple[str, list[str], dict[str, list[str]]]]:
    """(defect key, links, {lane: [releases]}) per distinct expected failure, in order of first sight."""
    found: dict[str, tuple[list[str], list[Run]]] = {}
    for run in runs:
        for key, _check, links in expected_failures(run):
            entry = found.setdefault(key, ([], []))
            entry[0].extend(u for u in links if u not in entry[0])
            entry[1].append(run)
    return [(k, links, releases_by_lane(hit)) for k, (links, hit) in found.items()]


def _folded_grid(runs: list[Run], cols: list[str], order: list[str]) -> list[tuple[str, list[str]]]:
    """(label, cells) per lane and run of consecutive releases whose cells are identical."""
    out: list[tuple[str, list[str]]] = []
    for lane in lanes(runs):
        block: list[tuple[list[str], list[str]]] = []  # (releases, cells)
        for run in (r for r in runs if r.lane == lane):
            cells = [cell(run, c).text() for c in cols]
            if block and block[-1][1] == cells:
                block[-1][0].append(run.release)
            else:
                block.append(([run.release], cells))
        out += [(f"{lane} {ranges(rel, order)}", cells) for rel, cells in block]
    return out


@dataclass
class FailureKind:
    """Failing checks whose one-line messages agree once numbers are masked (a crash is one kind
    whatever the tensor sizes it names)."""

    signature: str
    checks: list[tuple[Run, dict]] = field(default_factory=list)

    @property
    def example(self) -> tuple[Run, dict]:
        return self.checks[0]

    def where(self) -> dict[str, list[str]]:
        return releases_by_lane(run for run, _check in self.checks)


def failure_kinds(runs: list[Run]) -> list[FailureKind]:
    """The failing checks grouped by masked message (and test function), most checks first."""
    kinds: dict[str, FailureKind] = {}
    for run in runs:
        for c in run.failed:
            key = group_of(c["id"]) + " " + NUMBER.sub("N", one_line(c.get("message"), 120))
            kinds.setdefault(key, FailureKind(key)).checks.append((run, c))
    return sorted(kinds.values(), key=lambda k: -len(k.checks))


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
    f32 = [d for d in (r.max_diff(is_float32_pass) for r in runs) if d[0] is not None]
    if f32:
        worst = max(f32, key=lambda d: d[0])
        out.append(
            (
                "float32 checks",
                f"own tolerance, not in the table: largest |diff| {_fmt_diff(worst[0])} (rel {_fmt_diff(worst[1])})",
            )
        )
    return out


def render_markdown(runs: list[Run], warnings: list[str] | None = None) -> str:
    if not runs:
        return "## Conformance matrix\n\nNo results found.\n"
    cols = groups(runs)
    order = release_order(runs)
    lane_list = lanes(runs)
    failed_runs = [r for r in runs if not r.passed]
    failing = "; ".join(f"{lane} {ranges(rel, order)}" for lane, rel in releases_by_lane(failed_runs).items())
    lines = [
        "## Conformance matrix",
        "",
        f"**{len(runs) - len(failed_runs)}/{len(runs)} runs passed**" + (f" — failing: {failing}" if failing else ""),
        "",
    ]
    lines += [f"- **{title}**: {text}" for title, text in lane_summary(runs)]
    lines += [
        "",
        "| release | series (how, state) | "
        + " | ".join(lane_list)
        + " | largest float64 diff abs (rel) | time (suite) |",
        "|---|---|" + "---|" * len(lane_list) + "---|---|",
    ]
    for release, by_lane in _release_rows(runs):
        cells = [_short_counts(by_lane[ln]) if ln in by_lane else "—" for ln in lane_list]
        diffs = [r.max_diff(is_float64_pass) for r in by_lane.values()]
        diffs = [d for d in diffs if d[0] is not None]
        abs_d, rel_d, _c = max(diffs, key=lambda d: d[0]) if diffs else (None, None, None)
        diff = _fmt_diff(abs_d) + (f" ({_fmt_diff(rel_d)})" if rel_d is not None else "")
        main = by_lane.get("newest") or next(iter(by_lane.values()))
        lines.append(
            f"| {release} | {_md_escape(_series_of(by_lane))} | "
            + " | ".join(cells)
            + f" | {diff} | {_fmt_seconds(main.seconds)} ({main.check_seconds:.0f}s) |"
        )
    lines += [
        "",
        "Cells: ✅ passed checks, ⚠️ expected failures (known upstream defects, below), ❌ failed checks. "
        "A range a–b spans the releases of this report.",
    ]
    kinds = failure_kinds(runs)
    broken = [r for r in runs if not r.passed and not r.failed]
    if kinds or broken:
        lines += ["", "### Failures (grouped by message)", ""]
        for kind in kinds[:MD_FAILURE_KINDS]:
            where = "; ".join(f"{lane} {ranges(rel, order)}" for lane, rel in kind.where().items())
            run, check = kind.example
            example = f"(e.g. `{check['id'].split('::')[-1]}` on {run.name})"
            lines.append(
                f"- **{len(kind.checks)} check{'s' if len(kind.checks) != 1 else ''}** in {where}: "
                f"{_md_escape(one_line(check.get('message'), 160))} {example}"
            )
        if len(kinds) > MD_FAILURE_KINDS:
            lines.append(f"- … {len(kinds) - MD_FAILURE_KINDS} more kinds of failure (report.html lists every check)")
        for run in broken:
            lines.append(f"- **{run.name}**: exit status {run.data.get('exitstatus')} with {_counts_text(run)}")
    defects = _defects(runs)
    if defects:
        lines += ["", "### Expected failures (known upstream defects)", ""]
        for key, links, where in defects:
            link_text = " ".join(f"[{_short(u)}]({u})" for u in links) or "(no upstream reference)"
            spans = "; ".join(f"{lane}: {ranges(rel, order)}" for lane, rel in where.items())
            lines.append(f"- `{_md_escape(key)}` {link_text} — {spans}")
    lines += ["", "<details><summary>Checks per run (consecutive identical rows folded)</summary>", ""]
    lines += ["| runs | " + " | ".join(f"`{c.split('::')[-1]}`" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in _folded_grid(runs, cols, order)]
    lines += ["", "Columns: " + ", ".join(f"`{c}`" for c in cols) + ".", "", "</details>"]
    for w in warnings or []:
        lines.append(f"\n> warning: {w}")
    text = "\n".join(lines) + "\n"
    if len(text) > MD_LIMIT:
        cut = text[:MD_LIMIT].rsplit("\n", 1)[0]
        text = cut + "\n\n… (truncated; the full report is report.html)\n"
    return text


def _short(url: str) -> str:
    m = re.search(r"github\.com/([^/]+/[^/]+)/(?:issues|pull)/(\d+)", url)
    if m:
        return f"#{m.group(2)}" if url.startswith(UPSTREAM + "/") else f"{m.group(1)}#{m.group(2)}"
    m = re.search(r"github\.com/[^/]+/[^/]+/commit/([0-9a-f]{7,12})", url)
    return m.group(1) if m else url


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}
td.pass{background:#e6f4ea}td.fail{background:#fce8e6;font-weight:bold}
td.xfail{background:#fff4d6}td.skip,td.none{color:#888}
code{font-size:90%}.small{color:#666;font-size:90%}
"""


def render_html(runs: list[Run], warnings: list[str] | None = None) -> str:
    e = html.escape
    cols = groups(runs)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Conformance matrix</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>Conformance matrix</h1>",
    ]
    if not runs:
        out.append("<p>No results found.</p></body></html>")
        return "\n".join(out) + "\n"
    failed_runs = [r for r in runs if not r.passed]
    out.append(f"<p><b>{len(runs) - len(failed_runs)}/{len(runs)} runs passed</b></p><ul>")
    out += [f"<li><b>{e(title)}</b>: {e(text)}</li>" for title, text in lane_summary(runs)]
    out.append("</ul>")
    out.append(
        "<table><tr><th>run</th><th>release</th><th>state</th><th>series (how, state)</th><th>result</th>"
        "<th>checks</th><th>largest |diff|</th><th>rel</th><th>at check</th><th>time</th><th>suite</th>"
        "<th>torch / transformers</th></tr>"
    )
    for run in runs:
        abs_d, rel_d, check = run.max_diff()
        cls = "pass" if run.passed else "fail"
        out.append(
            f"<tr><td>{e(run.name)}</td><td>{e(run.release)}</td><td>{e(run.state)}</td><td>{e(run.series)}</td>"
            f'<td class="{cls}">{cls}</td><td>{e(_counts_text(run))}</td><td>{_fmt_diff(abs_d)}</td>'
            f"<td>{_fmt_diff(rel_d)}</td><td><code>{e(check or '')}</code></td><td>{_fmt_seconds(run.seconds)}</td>"
            f"<td>{run.check_seconds:.0f}s</td>"
            f"<td>{e(str(run.data.get('torch', '?')))} / {e(str(run.data.get('transformers', '?')))}</td></tr>"
        )
    out.append("</table><h2>Checks</h2><table><tr><th>run</th>")
    out += [f"<th><code>{e(c)}</code></th>" for c in cols]
    out.append("</tr>")
    for run in runs:
        out.append(f"<tr><td>{e(run.name)}</td>")
        for c in cols:
            cl = cell(run, c)
            tip = "\n".join(cl.lines)
            if cl.status == "xfail":
                tip = "\n".join(f"{k}: {' '.join(links)}" for k, _check, links in expected_failures(run))
            out.append(f'<td class="{cl.status}" title="{e(tip)}">{e(cl.text())}</td>')
        out.append("</tr>")
    out.append("</table>")
    failures = [(run, c) for run in runs for c in run.failed]
    if failures:
        out.append("<h2>Failures</h2><ul>")
        for run, c in failures:
            out.append(
                f"<li><b>{e(run.name)}</b> <code>{e(c['id'])}</code> {e(str(c.get('status')))}: "
                f"{e(one_line(c.get('message'), 500))}</li>"
            )
        out.append("</ul>")
    xfails = [(run, x) for run in runs for x in expected_failures(run)]
    if xfails:
        out.append("<h2>Expected failures (known upstream defects)</h2><ul>")
        for run, (key, check, links) in xfails:
            refs = " ".join(f'<a href="{e(u)}">{e(_short(u))}</a>' for u in links) or "no link"
            out.append(
                f"<li>{e(run.name)}: {e(key)} — {refs} <span class=small>(e.g. <code>{e(check)}</code>)</span></li>"
            )
        out.append("</ul>")
    for w in warnings or []:
        out.append(f"<p class=small>warning: {e(w)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--out", default="report", type=Path)
    args = parser.parse_args(argv)
    runs, warnings = load(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(render_markdown(runs, warnings), encoding="utf-8")
    (args.out / "report.html").write_text(render_html(runs, warnings), encoding="utf-8")
    failed = sum(not r.passed for r in runs)
    print(f"report: {len(runs)} runs, {failed} failing -> {args.out}/report.md, {args.out}/report.html")
    for w in warnings:
        print(f"report: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

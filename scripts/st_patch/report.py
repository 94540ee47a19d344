"""Merge conformance results into ``report/report.md`` and ``report/report.html`` (``make report``).

Reads JSON only, and knows nothing about how the results were produced:

- ``<name>.json`` with a ``checks`` list: a conformance summary (``--conformance-json``):
  ``{"release", "state", "torch", "transformers", "exitstatus", "checks": [{"id", "status",
  "max_abs_diff", "max_rel_diff", "duration", "message"}]}``;
- ``<name>.run.json`` (optional, same ``<name>``): ``{"seconds", "lane", "returncode", "st_patch":
  {"series", "kind", "state", ...}}`` - which series was applied, to what kind of target, wall time.

The Markdown fits a PR comment / job summary: one line per run, a run × check grid (checks grouped
by test function; a cell aggregates its parametrisations), then one line per failing check and per
expected failure (with its upstream link). The HTML is self-contained (inline CSS, no scripts) and
has the same content, with each failing check's message in the cell's tooltip.
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
DEFECT = re.compile(r"\[([A-Za-z0-9_.:-]+)\]")
MD_LIMIT = 60000  # GitHub comments hold 65536 characters
MD_FAILURES_PER_RUN = 8


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

    def max_diff(self) -> tuple[float | None, float | None, str | None]:
        """(largest max_abs_diff, its max_rel_diff, the check) over every check that compared numbers."""
        best: tuple[float | None, float | None, str | None] = (None, None, None)
        for c in self.checks:
            value = c.get("max_abs_diff")
            if isinstance(value, (int, float)) and (best[0] is None or value > best[0]):
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


def expected_failures(run: Run) -> list[tuple[str, str, list[str]]]:
    """(defect ids or reason, first check, links) per distinct xfail reason of the run."""
    found: dict[str, tuple[str, str, list[str]]] = {}
    for c in run.checks:
        if c.get("status") != "xfailed":
            continue
        message = c.get("message") or ""
        ids = DEFECT.findall(message)
        key = ", ".join(ids) if ids else one_line(message.removeprefix("xfail:").strip(), 120)
        if key not in found:
            found[key] = (key, c["id"], upstream_links(message))
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


def render_markdown(runs: list[Run], warnings: list[str] | None = None) -> str:
    if not runs:
        return "## Conformance matrix\n\nNo results found.\n"
    cols = groups(runs)
    failed_runs = [r for r in runs if not r.passed]
    lines = [
        "## Conformance matrix",
        "",
        f"**{len(runs) - len(failed_runs)}/{len(runs)} runs passed**"
        + (f" — failing: {', '.join(r.name for r in failed_runs)}" if failed_runs else ""),
        "",
        "| run | release | state | series (how, state) | result | checks | largest diff abs (rel) | time (suite) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        abs_d, rel_d, _check = run.max_diff()
        diff = _fmt_diff(abs_d) + (f" ({_fmt_diff(rel_d)})" if rel_d is not None else "")
        lines.append(
            f"| {run.name} | {run.release} | {run.state} | {_md_escape(run.series)} | "
            f"{'✅ pass' if run.passed else '❌ fail'} | {_counts_text(run)} | {diff} | "
            f"{_fmt_seconds(run.seconds)} ({run.check_seconds:.0f}s) |"
        )
    lines += ["", "### Checks", "", "| run | " + " | ".join(f"`{c.split('::')[-1]}`" for c in cols) + " |"]
    lines.append("|---|" + "---|" * len(cols))
    for run in runs:
        lines.append(f"| {run.name} | " + " | ".join(cell(run, c).text() for c in cols) + " |")
    lines += ["", "Columns: " + ", ".join(f"`{c}`" for c in cols) + "."]
    failures = [(run, c) for run in runs for c in run.failed]
    if failures:
        lines += ["", "### Failures", ""]
        for run in runs:
            for c in run.failed[:MD_FAILURES_PER_RUN]:
                lines.append(
                    f"- **{run.name}** `{c['id']}` {c.get('status')}: {_md_escape(one_line(c.get('message')))}"
                )
            if len(run.failed) > MD_FAILURES_PER_RUN:
                more = len(run.failed) - MD_FAILURES_PER_RUN
                lines.append(f"- **{run.name}**: … {more} more failing checks (report.html lists all)")
    broken = [r for r in runs if not r.passed and not r.failed]
    for run in broken:
        lines.append(f"- **{run.name}**: exit status {run.data.get('exitstatus')} with {_counts_text(run)}")
    xfails = [(run, x) for run in runs for x in expected_failures(run)]
    if xfails:
        lines += ["", "<details><summary>Expected failures (known upstream defects)</summary>", ""]
        for run, (key, check, links) in xfails:
            link_text = " ".join(f"[{_short(u)}]({u})" for u in links) or "no link"
            lines.append(f"- {run.name}: {_md_escape(key)} — {link_text} (e.g. `{check}`)")
        lines += ["", "</details>"]
    for w in warnings or []:
        lines.append(f"\n> warning: {w}")
    text = "\n".join(lines) + "\n"
    if len(text) > MD_LIMIT:
        cut = text[:MD_LIMIT].rsplit("\n", 1)[0]
        text = cut + "\n\n… (truncated; the full report is report.html)\n"
    return text


def _short(url: str) -> str:
    m = re.search(r"github\.com/([^/]+/[^/]+)/(?:issues|pull)/(\d+)", url)
    return f"{m.group(1)}#{m.group(2)}" if m else url


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
    out.append(f"<p><b>{len(runs) - len(failed_runs)}/{len(runs)} runs passed</b></p>")
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

"""Render the README's generated tables (``make readme``; ``make check-generated`` checks them).

- the support table (release → series → state), from the manifest;
- the patch table (one row per patch: subject, releases, upstream), from the concerns and their
  messages, the same table the series are generated from.

They are generated so that they cannot drift from releases.toml, the concerns and the manifest.
"""

from __future__ import annotations

import re
import sys

from st_patch import manifest as mf

from . import concerns, releases

README = releases.ROOT / "README.md"
MANIFEST = releases.ROOT / "patches" / "manifest.json"
STATE = {"patched": "patched: crashes upstream, fixed by the backport series", "native": "native"}
UPSTREAM_URL = "https://github.com/huggingface/sentence-transformers/"


def render_support(manifest: mf.Manifest) -> str:
    rows: list[tuple[list[str], str, str]] = []
    for version, entry in manifest.releases.items():
        series = entry.series or "—"
        state = STATE[entry.support]
        if entry.support == "native" and entry.series:
            state = "native, upstream defects fixed by the series"
        if rows and rows[-1][1:] == (series, state):
            rows[-1][0].append(version)
        else:
            rows.append(([version], series, state))
    lines = ["| releases | series | state |", "|---|---|---|"]
    for versions, series, state in rows:
        span = versions[0] if len(versions) == 1 else f"{versions[0]} … {versions[-1]} ({len(versions)})"
        lines.append(f"| {span} | {series} | {state} |")
    return "\n".join(lines)


def spans(versions: list[str], order: list[str]) -> str:
    """``versions`` as runs of consecutive releases of ``order``: "2.4.0–3.3.1, 5.7.0"."""
    runs: list[list[str]] = []
    for version in versions:
        if runs and order.index(version) == order.index(runs[-1][-1]) + 1:
            runs[-1].append(version)
        else:
            runs.append([version])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def _short_ref(match: re.Match) -> str:
    kind, _, ident = match.group(0)[len(UPSTREAM_URL) :].partition("/")
    return f"#{ident}" if kind in ("pull", "issues") else ident[:8]


def upstream_text(applied: str) -> str:
    """DEP-3 ``Applied-Upstream`` as a table cell: "3.4.0 (#3068, #3114)", "not yet"."""
    text = re.sub(re.escape(UPSTREAM_URL) + r"[^\s,)]+", _short_ref, applied)
    if not text or text.lower().startswith("no"):
        return "not yet" + text[2:]
    release, sep, refs = text.partition(", ")
    return f"{release} ({refs})" if sep else release


def render_patches(table: list[releases.Release]) -> str:
    order = [r.version for r in table]
    lines = ["| patch | releases | upstream |", "|---|---|---|"]
    for slug in concerns.slugs():
        patch = concerns.patch(slug)
        where = spans(concerns.releases_with(slug, table), order)
        lines.append(f"| {patch.subject} (`{slug}`) | {where} | {upstream_text(patch.applied_upstream)} |")
    return "\n".join(lines)


def _replace(text: str, name: str, table: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text:
        raise SystemExit(f"README.md lacks the markers {start} … {end}")
    return re.sub(f"{re.escape(start)}.*?{re.escape(end)}", lambda _m: f"{start}\n{table}\n{end}", text, flags=re.S)


def render(text: str) -> str:
    text = _replace(text, "support-table", render_support(mf.load(MANIFEST)))
    return _replace(text, "patch-table", render_patches(releases.load()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    new = render(text)
    if argv == ["--check"]:
        if new != text:
            print("README.md's tables are not what the manifest and the concerns generate; run `make readme`")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

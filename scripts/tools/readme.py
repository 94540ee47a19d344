"""Render the README's support table from the manifest (``make readme``; checked by the tests).

The table is generated so that it cannot drift from releases.toml and patches/manifest.json.
"""

from __future__ import annotations

import json
import re
import sys

from . import releases

README = releases.ROOT / "README.md"
MANIFEST = releases.ROOT / "patches" / "manifest.json"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
STATE = {"patched": "patched: crashes upstream, fixed by the backport series", "native": "native"}


def render(manifest: dict) -> str:
    rows: list[tuple[list[str], str, str]] = []
    for version, entry in manifest["releases"].items():
        series = entry["series"] or "—"
        state = STATE[entry["support"]]
        if entry["support"] == "native" and entry["series"]:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    table = render(json.loads(MANIFEST.read_text()))
    new = re.sub(f"{START}.*?{END}", lambda _m: f"{START}\n{table}\n{END}", text, flags=re.S)
    if argv == ["--check"]:
        if new != text:
            print("README.md's support table is not what the manifest generates; run `make readme`")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

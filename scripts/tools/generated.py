"""Everything generated in this repository, written or checked one way: ``make generate`` / ``make check-generated``.

Each generator renders its files from their sources and, with ``--check``, fails naming what differs
instead of writing. In dependency order: the series and the manifest (from ``patches/source/``, the
concerns and ``releases.toml``), tox.ini and the CI workflow (from ``releases.toml``), the README's
tables (from the manifest and the concerns), the upstream pull request of the shared loss stage (from
its module and the fix series' recipe).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from . import readme, series, toxgen, upstream_pr

GENERATORS: tuple[tuple[str, Callable[[list[str]], int]], ...] = (
    ("patches/series/, patches/manifest.json  (make series)", series.main),
    ("tox.ini, .github/workflows/matrix.yml  (make tox.ini)", toxgen.main),
    ("README.md support and patch tables  (make readme)", readme.main),
    ("patches/upstream/matryoshka-shared-loss-stage/  (make upstream-pr)", upstream_pr.main),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python -m tools.generated [--check]", file=sys.stderr)
        return 2
    stale = []
    for name, generate in GENERATORS:
        if generate(argv) != 0:
            stale.append(name)
    if stale:
        print("not what their sources generate: " + "; ".join(stale) + ". Run `make generate`.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

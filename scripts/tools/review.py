"""Review aid for the series (``make review``).

Two views a reviewer of a series wants:

- ``native_diff(version)``: the files the release's series patches, *after* the series, against the
  same files of the first release that shipped support natively (3.4.0 for the backports; pass
  ``native=`` for another, e.g. 5.3.0 for the symmetric-loss fix). Where the backport and upstream
  made the same decision, the diff is quiet; what remains is the backport's own design (or drift).
- ``range_diff(a, b)``: ``git range-diff`` between two series (by default each pair of adjacent
  release ranges): the same concern expressed against each range's own text, so a reviewer reads
  only what differs between neighbours instead of every series in full.

Both build scratch git repositories from the releases' sdists (``dists.sdist_tree``: downloaded
once into the cache) and the series' patches (``git am``); nothing in the project is written.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path
from typing import Callable

from st_patch import gitrun
from st_patch import manifest as mf

from . import dists, releases

ROOT = releases.ROOT
MANIFEST = ROOT / "patches" / "manifest.json"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "review",
    "GIT_AUTHOR_EMAIL": "review@example.invalid",
    "GIT_COMMITTER_NAME": "review",
    "GIT_COMMITTER_EMAIL": "review@example.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+00:00",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+00:00",
}

TreeFor = Callable[[str], Path]


def _git(repo: Path, *args: str) -> str:
    """git in the scratch repository, isolated from the reviewer's configuration (st_patch.gitrun)."""
    result = gitrun.run(list(args), repo, check=False, env=GIT_ENV, ceiling=repo.parent)
    if result.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {gitrun.message(result)}")
    return result.stdout


def _lf(path: Path) -> bytes:
    return path.read_bytes().replace(b"\r\n", b"\n")


class Scratch:
    """A scratch repository holding, per series, a branch ``<name>-base`` (pristine) and ``<name>``."""

    def __init__(self, manifest: mf.Manifest, tree_for: TreeFor | None = None):
        self.manifest = manifest
        self._tmp = tempfile.TemporaryDirectory(prefix="st-review-")
        self.tree_for = tree_for or (lambda v: dists.sdist_tree(v, Path(self._tmp.name) / f"sdist-{v}"))
        self.repo = Path(self._tmp.name) / "repo"
        self.repo.mkdir()
        _git(self.repo, "init", "-q")
        self._trees: dict[str, Path] = {}

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tree(self, version: str) -> Path:
        if version not in self._trees:
            self._trees[version] = self.tree_for(version)
        return self._trees[version]

    def build(self, name: str) -> tuple[str, str]:
        """Branches ``<name>-base`` (the series' files as in its first release, LF) and ``<name>``."""
        series = self.manifest.series[name]
        tree = self.tree(series.releases[0])
        _git(self.repo, "checkout", "-q", "--orphan", f"{name}-base")
        _git(self.repo, "rm", "-rfq", "--ignore-unmatch", ".")
        for path, spec in series.files.items():
            if spec.created:
                continue
            target = self.repo / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_lf(tree / path))
        _git(self.repo, "add", "-A")
        _git(self.repo, "commit", "-q", "--allow-empty", "-m", f"{name}: pristine files of {series.releases[0]}")
        _git(self.repo, "checkout", "-q", "-b", name)
        patches = [str(p.resolve()) for p in series.patch_paths()]
        _git(self.repo, "am", "-q", "--keep-cr", *patches)
        return f"{name}-base", name

    def patched_file(self, name: str, path: str) -> bytes | None:
        result = gitrun.run(["show", f"{name}:{path}"], self.repo, check=False, text=False, ceiling=self.repo.parent)
        return result.stdout if result.returncode == 0 else None


def first_native(version: str, table: list[releases.Release] | None = None) -> str | None:
    """The first release after ``version`` whose table row says native support."""
    from packaging.version import Version

    table = releases.load() if table is None else table
    later = [r for r in table if r.key > Version(version) and r.support == "native"]
    return later[0].version if later else None


def _unified(a: bytes | None, b: bytes | None, a_name: str, b_name: str) -> str:
    a_lines = (a or b"").decode("utf-8", "replace").splitlines(keepends=True)
    b_lines = (b or b"").decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(a_lines, b_lines, a_name, b_name))


def native_diff(
    version: str,
    native: str | None = None,
    manifest: mf.Manifest | None = None,
    tree_for: TreeFor | None = None,
    table: list[releases.Release] | None = None,
) -> str:
    """Unified diff: ``version``'s files after its series -> the same files in the native release."""
    manifest = mf.load(MANIFEST) if manifest is None else manifest
    entry = manifest.lookup(version)
    name = entry.series if entry else None
    if not name:
        raise LookupError(f"sentence-transformers {version} has no series in the manifest")
    native = native or first_native(version, table)
    if not native:
        raise LookupError(f"no release after {version} has native support; pass native=")
    out = [f"# series {name} on {version} (a/, patched) vs sentence-transformers {native} (b/, native)\n"]
    with Scratch(manifest, tree_for) as scratch:
        scratch.build(name)
        native_tree = scratch.tree(native)
        for path in manifest.series[name].files:
            if not path.startswith("sentence_transformers/"):
                continue  # the fork's tests have no native counterpart
            ours = scratch.patched_file(name, path)
            theirs_path = native_tree / path
            theirs = _lf(theirs_path) if theirs_path.is_file() else None
            if theirs is None:
                out.append(f"# {path}: not in {native} (added by the series)\n")
                continue
            diff = _unified(ours, theirs, f"a/{path} ({version} + {name})", f"b/{path} ({native})")
            out.append(diff if diff else f"# {path}: identical\n")
    return "".join(out)


def adjacent_pairs(manifest: mf.Manifest) -> list[tuple[str, str]]:
    """Series of neighbouring release ranges with the same role (backport-*, fixes-*), oldest first."""
    from packaging.version import Version

    def first(name: str) -> Version:
        return Version(manifest.series[name].releases[0])

    pairs = []
    for prefix in sorted({n.split("-", 1)[0] for n in manifest.series}):
        names = sorted((n for n in manifest.series if n.split("-", 1)[0] == prefix), key=first)
        pairs += list(zip(names, names[1:]))
    return pairs


def range_diff(
    a: str,
    b: str,
    manifest: mf.Manifest | None = None,
    tree_for: TreeFor | None = None,
    scratch: Scratch | None = None,
) -> str:
    """``git range-diff`` of series ``a`` and ``b`` (each applied to its own first release's files)."""
    manifest = mf.load(MANIFEST) if manifest is None else manifest
    own = scratch is None
    scratch = scratch or Scratch(manifest, tree_for)
    try:
        for name in (a, b):
            if _git(scratch.repo, "branch", "--list", name).strip() == "":
                scratch.build(name)
        text = _git(scratch.repo, "range-diff", "--no-color", f"{a}-base..{a}", f"{b}-base..{b}")
    finally:
        if own:
            scratch.close()
    return f"# git range-diff {a} {b}\n{text}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make review ARGS=...", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", help="diff its patched files against the first native release")
    parser.add_argument("--native", help="the native release to compare with (default: the first after --release)")
    parser.add_argument("--range-diff", nargs=2, metavar=("SERIES_A", "SERIES_B"))
    parser.add_argument("--adjacent", action="store_true", help="range-diff every pair of adjacent series")
    args = parser.parse_args(argv)
    if not (args.release or args.range_diff or args.adjacent):
        parser.error("give --release VERSION, --range-diff A B or --adjacent")
    try:
        manifest = mf.load(MANIFEST)
        if args.release:
            sys.stdout.write(native_diff(args.release, args.native, manifest))
        if args.range_diff:
            sys.stdout.write(range_diff(*args.range_diff, manifest=manifest))
        if args.adjacent:
            with Scratch(manifest) as scratch:
                for a, b in adjacent_pairs(manifest):
                    sys.stdout.write(range_diff(a, b, manifest=manifest, scratch=scratch) + "\n")
    except (LookupError, KeyError, RuntimeError, mf.ManifestError) as exc:
        print(f"review: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate the patch series and the manifest from one source (``make series``).

The source is ``patches/source/``: the files every series adds (``files/``), the commit messages
(``messages/``) and the edit recipes below, which make the same change to each release's own text.
For every release the table marks ``patched``, the recipes run on the release's pristine sdist files;
releases whose touched files are identical share one series. Each series is committed in a scratch
git repository and exported with ``git format-patch``, so a series is a reviewable commit series that
``git am`` applies to a fork.

Editing a series therefore never means editing a diff: change ``patches/source/`` (or a recipe here)
and run ``make series``; ``make check-generated`` (run by the tests) fails when the committed series are
not what the source generates.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from st_patch import gitrun
from st_patch import manifest as mf

from . import concerns, dists, recipes, releases

ROOT = releases.ROOT
PATCHES = ROOT / "patches"
SOURCE = PATCHES / "source"
# Fixed identity and date: regenerating an unchanged source gives byte-identical series.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "st-matryoshka-cache",
    "GIT_AUTHOR_EMAIL": "st-matryoshka-cache@users.noreply.github.com",
    "GIT_AUTHOR_DATE": "2026-11-27T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "st-matryoshka-cache",
    "GIT_COMMITTER_EMAIL": "st-matryoshka-cache@users.noreply.github.com",
    "GIT_COMMITTER_DATE": "2026-11-27T00:00:00+00:00",
}


# --- generation ----------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(lf_text: str | None) -> dict[str, str] | None:
    """Hashes of a text file as released (CRLF, like every released .py file) and as in git (LF)."""
    if lf_text is None:
        return None
    lf = lf_text.encode()
    return {"sha256": sha256(lf.replace(b"\n", b"\r\n")), "sha256_lf": sha256(lf)}


def read_lf(path: Path) -> str:
    data = path.read_bytes()
    if b"\r\n" in data and data.count(b"\r\n") != data.count(b"\n"):
        raise recipes.RecipeError(f"{path}: mixed line endings; the series assume one style per file")
    return data.replace(b"\r\n", b"\n").decode()


def pristine_files(tree: Path, concerns: list[recipes.Concern]) -> dict[str, str]:
    """The LF text of every file the concerns edit that the release has (not one a patch adds)."""
    added = {p for c in concerns for p in c.added}
    return {p: read_lf(tree / p) for p in sorted({p for c in concerns for p in c.edits} - added)}


def concerns_for(release: releases.Release, tree: Path) -> list[recipes.Concern]:
    """The concerns of the release's series, in patch order: backports, or fixes of native support.

    A concern may edit a file that an earlier concern of the series adds (one patch per concern)."""
    candidates = concerns.BACKPORT if release.support == "patched" else concerns.NATIVE_FIXES
    out: list[recipes.Concern] = []
    added: frozenset[str] = frozenset()
    for concern in candidates:
        if concern.applies(tree, release.version, added):
            out.append(concern)
            added |= frozenset(concern.added)
    return out


def _git(repo: Path, *args: str, capture: bool = False, message: str | None = None) -> str:
    """git in the scratch repository, isolated from the maintainer's configuration (st_patch.gitrun)."""
    result = gitrun.run(list(args), repo, env=GIT_ENV, ceiling=repo.parent, input=message)
    return result.stdout if capture else ""


def build_series(
    name: str, versions: list[str], pristine: dict[str, str], concerns: list[recipes.Concern], out: Path
) -> dict:
    """Commit each concern on a scratch repo holding ``pristine``; export it; return the manifest entry."""
    messages = SOURCE / "messages"
    with tempfile.TemporaryDirectory(prefix="st-series-") as scratch:
        repo = Path(scratch)
        _git(repo, "init", "-q")
        for path, text in pristine.items():
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text(text)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"sentence-transformers {versions[0]} (pristine files)")
        base = _git(repo, "rev-parse", "HEAD", capture=True).strip()
        files: dict[str, dict] = {p: {"pristine": digests(t)} for p, t in pristine.items()}
        for concern in concerns:
            for path, recipe in concern.edits.items():
                (repo / path).write_text(recipe((repo / path).read_text()))
            for path in concern.adds:
                (repo / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(SOURCE / "files" / path, repo / path)
                files.setdefault(path, {"pristine": None})
            for path, make in concern.writes.items():
                (repo / path).parent.mkdir(parents=True, exist_ok=True)
                (repo / path).write_text(make())
                files.setdefault(path, {"pristine": None})
            message = (messages / f"{concern.slug}.txt").read_text().rstrip("\n")
            message += f"\n\nSt-Patch-Series: {name}\nSt-Patch-Releases: {', '.join(versions)}\n"
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "--cleanup=verbatim", "-F", "-", message=message)
        out.mkdir(parents=True)
        _git(repo, "format-patch", "-q", "--zero-commit", "--no-signature", "--full-index", "-o", str(out), base)
        for path in files:
            files[path]["patched"] = digests((repo / path).read_text())
    return {"releases": versions, "patches": sorted(p.name for p in out.iterdir()), "files": files}


def series_name(prefix: str, versions: list[str]) -> str:
    return f"{prefix}-{versions[0]}" if len(versions) == 1 else f"{prefix}-{versions[0]}-{versions[-1]}"


def generate(dest: Path) -> dict:
    """Write ``series/`` and ``manifest.json`` for every release of the table into ``dest``.

    Releases whose series would consist of the same concerns applied to identical files share one.
    """
    table = releases.load()
    groups: dict[tuple, list[str]] = {}
    inputs: dict[tuple, tuple[str, dict[str, str], list[recipes.Concern]]] = {}
    for release in table:
        tree = dists.sdist_tree(release.version)
        try:
            concerns = concerns_for(release, tree)
            pristine = pristine_files(tree, concerns)
        finally:
            shutil.rmtree(tree.parent)
        if not concerns:
            continue
        prefix = "backport" if release.support == "patched" else "fixes"
        key = (prefix, tuple(map(id, concerns)), tuple((p, sha256(t.encode())) for p, t in pristine.items()))
        groups.setdefault(key, []).append(release.version)
        inputs[key] = (prefix, pristine, concerns)
    manifest: dict = {"format": 1, "generated_by": "make series", "releases": {}, "series": {}}
    series_of: dict[str, str] = {}
    for key, versions in groups.items():
        prefix, pristine, concerns = inputs[key]
        name = series_name(prefix, versions)
        manifest["series"][name] = build_series(name, versions, pristine, concerns, dest / "series" / name)
        series_of.update(dict.fromkeys(versions, name))
    for release in table:
        manifest["releases"][release.version] = {"support": release.support, "series": series_of.get(release.version)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two directory trees."""
    cmp = filecmp.dircmp(a, b)
    diffs = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    for sub in cmp.common_dirs:
        diffs += [f"{sub}/{d}" for d in _same_tree(a / sub, b / sub)]
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make series", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if patches/ differs from what the source generates")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="st-refresh-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        current = PATCHES
        if args.check:
            stale = []
            if not (current / "manifest.json").exists() or not filecmp.cmp(
                fresh / "manifest.json", current / "manifest.json", shallow=False
            ):
                stale.append("manifest.json")
            stale += (
                [f"series/{d}" for d in _same_tree(fresh / "series", current / "series")]
                if (current / "series").exists()
                else ["series"]
            )
            if stale:
                print("patches/ is not what patches/source generates; run `make series`. Differs: " + ", ".join(stale))
                return 1
            print("patches/ is up to date with patches/source")
            return 0
        shutil.rmtree(current / "series", ignore_errors=True)
        shutil.copytree(fresh / "series", current / "series")
        shutil.copyfile(fresh / "manifest.json", current / "manifest.json")
        for series in mf.load(current / "manifest.json").series.values():
            print(f"{series.name}: {', '.join(series.releases)} ({len(series.patches)} patches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

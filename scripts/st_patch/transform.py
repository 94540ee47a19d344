"""The new contents of a target's files: the series applied (or reversed) with ``git apply`` on copies.

The touched files are copied LF-normalised into a temporary directory, the patches are applied there
with ``git apply`` (forward, or ``-R`` in reverse order), the line endings are restored per file and
each result is compared with the manifest's sha256 (``verify``). The target is never touched here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from . import gitrun
from .manifest import ManifestError, Series, sha256, to_lf, with_eol
from .outcome import Refusal
from .swap import temporary_directory
from .targets import PATCHED, SKIPPED, FileState, Target, file_eol, target_eol


def _glob_escape(path: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]\\" else c for c in path)


def touched_paths(patch: Path, cwd: Path) -> List[str]:
    """The paths a patch changes (``git apply --numstat -z``, pre- and post-image of renames)."""
    proc = gitrun.run(["apply", "--numstat", "-z", str(patch)], cwd, check=False, ceiling=cwd)
    if proc.returncode:
        raise ManifestError(f"cannot read patch {patch}: {gitrun.message(proc)}")
    tokens = proc.stdout.split("\0")
    paths: List[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token:
            continue
        fields = token.split("\t", 2)
        if len(fields) == 3 and fields[2]:
            paths.append(fields[2])
        elif len(fields) == 3:  # a rename: the two paths follow as separate tokens
            paths.extend(tokens[i : i + 2])
            i += 2
    if not paths:
        raise ManifestError(f"patch {patch} changes no file")
    return paths


# ----------------------------------------------------------------------------- transform + verify


def transform(
    target: Target, series: Series, states: List[FileState], reverse: bool = False
) -> Dict[str, bytes | None]:
    """New contents of every managed file after applying (or reverse-applying) the series.

    Works on LF copies in a temporary directory; the result is in each file's line ending (new
    files get the target's). None means the file does not exist afterwards. The target is not
    touched.
    """
    default_eol = target_eol(states)
    managed = [s for s in states if s.state != SKIPPED]
    source_side = "patched" if reverse else "pristine"
    with temporary_directory() as tmp:
        work = tmp / "tree"
        work.mkdir()
        for state in managed:
            # Leftovers of the other side (e.g. a created module that survived a reinstall) stay out.
            if state.exists and getattr(state.spec, source_side) is not None:
                dest = work.joinpath(*state.path.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(to_lf(state.data))
        patches = series.patch_paths()
        for patch in reversed(patches) if reverse else patches:
            paths = touched_paths(patch, work)
            unknown = [p for p in paths if p not in series.files]
            if unknown:
                raise ManifestError(
                    "patch {} changes {}, which the manifest does not list for series {}".format(
                        patch.name, ", ".join(unknown), series.name
                    )
                )
            include = [p for p in paths if target.in_scope(p)]
            if not include:
                continue
            args = ["apply", "--whitespace=nowarn"] + (["-R"] if reverse else [])
            args += ["--include=" + _glob_escape(p) for p in include] + [str(patch)]
            proc = gitrun.run(args, work, check=False, ceiling=tmp)
            if proc.returncode:
                raise Refusal(
                    "git apply{} {} does not apply: {}".format(
                        " -R" if reverse else "", patch.name, gitrun.message(proc)
                    )
                )
        result: Dict[str, bytes | None] = {}
        for state in managed:
            produced = work.joinpath(*state.path.split("/"))
            result[state.path] = (
                with_eol(produced.read_bytes(), file_eol(state, default_eol)) if produced.is_file() else None
            )
    return result


def verify(result: Dict[str, bytes | None], states: List[FileState], side: str) -> List[dict]:
    """Compare a transform's result with the manifest's ``side`` (PATCHED or PRISTINE) hashes."""
    default_eol = target_eol(states)
    problems = []
    for state in states:
        if state.state == SKIPPED:
            continue
        hashes = state.spec.patched if side == PATCHED else state.spec.pristine
        data = result.get(state.path)
        eol = file_eol(state, default_eol)
        if hashes is None:
            if data is not None:
                problems.append({"path": state.path, "sha256": sha256(data), "expected": None})
            continue
        expected = hashes.expected(eol)
        got = sha256(data) if data is not None else None
        if got != expected:
            problems.append({"path": state.path, "sha256": got, "expected": expected, "eol": eol})
    return problems


def describe_problems(problems: List[dict], side: str) -> str:
    parts = []
    for p in problems:
        if p["expected"] is None:
            parts.append("{} should not exist when {} but would (sha256 {})".format(p["path"], side, p["sha256"]))
        else:
            parts.append(
                "{} would have sha256 {}, the manifest's {} {} sha256 is {}".format(
                    p["path"], p["sha256"] or "(absent)", side, p["eol"].upper(), p["expected"]
                )
            )
    return "; ".join(parts)

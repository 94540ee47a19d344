"""Drift check: how a sentence-transformers tree the manifest does not know relates to the series.

``drift_report(tree, manifest)`` answers, for a source tree, fork checkout or site-packages holding
``sentence_transformers/`` (nothing is imported, nothing in the tree is written):

- whether the release already supports MatryoshkaLoss with cached losses natively, detected by
  content (the Matryoshka loss module wraps the cached losses' loss stage: ``CachedLossDecorator``,
  ``uses_gradient_cache`` / ``gradcache``), or carries this project's backport
  (``_matryoshka_cache``), or still warns that the combination is incompatible;
- for every series of the manifest, the state of each file it touches (pristine, patched, modified,
  absent; line endings ignored) and which hunks of its patches apply to the tree (``git apply
  --reject`` on LF copies in a scratch directory, patches in order);
- the closest series (most hunks applying, then most files identical) and a one-line advice.

``format_text(report)`` renders it for a terminal. The CLI's ``check`` on an unknown release calls
``drift_report(target.root, manifest)`` with the manifest ``manifest.load`` read (the one reader of
``manifest.json``; each series knows its own directory) and prints ``format_text`` of it (the dict
goes into its ``--json`` output).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

from . import gitrun
from .manifest import Manifest, Series, default_manifest_path, load

PACKAGE = "sentence_transformers"
_VERSION = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", re.M)

# Evidence of upstream support, searched in the Matryoshka loss module (name differs per release).
NATIVE_MARKERS = ("CachedLossDecorator", "uses_gradient_cache", "gradcache")
BACKPORT_MARKERS = ("_matryoshka_cache", "matryoshka_cached_forward")
INCOMPATIBLE_MARKERS = ("is not compatible with Cached", "cannot be :class:`CachedMultipleNegativesRankingLoss`")


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def _sha_lf(data: bytes) -> str:
    return hashlib.sha256(_lf(data)).hexdigest()


def read_version(tree: Path) -> str | None:
    init = Path(tree) / PACKAGE / "__init__.py"
    try:
        match = _VERSION.search(init.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return match.group(1) if match else None


def matryoshka_modules(tree: Path) -> list[Path]:
    """The Matryoshka loss module(s): losses/MatryoshkaLoss.py (<= 5.x), .../losses/matryoshka.py (6.x)."""
    package = Path(tree) / PACKAGE
    found = [p for p in package.rglob("*.py") if p.stem.lower() in ("matryoshkaloss", "matryoshka")]
    return sorted(p for p in found if "losses" in p.parts and "tests" not in p.relative_to(tree).parts)


def support(tree: Path) -> dict:
    """What the tree's own code says about MatryoshkaLoss + cached losses."""
    tree = Path(tree)
    modules = matryoshka_modules(tree)
    result: dict = {"state": "no-matryoshka", "native": False, "file": None, "evidence": []}
    for module in modules:
        text = module.read_text(encoding="utf-8", errors="replace")
        rel = module.relative_to(tree).as_posix()
        backport = [m for m in BACKPORT_MARKERS if m in text]
        native = [m for m in NATIVE_MARKERS if m in text]
        incompatible = [m for m in INCOMPATIBLE_MARKERS if m in text]
        if backport:
            return {"state": "patched", "native": False, "file": rel, "evidence": backport}
        if native:  # (3.4.0 kept the old "cannot be Cached..." docstring next to its support)
            return {"state": "native", "native": True, "file": rel, "evidence": native}
        result = {"state": "unsupported", "native": False, "file": rel, "evidence": incompatible or native}
    return result


# --- hunks -------------------------------------------------------------------------------------------

_DIFF = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.M)
_HUNK = re.compile(r"^@@ [^@]* @@(.*)$", re.M)


def patch_files(text: str) -> list[tuple[str, bool, int, list[str]]]:
    """(path, created, number of hunks, hunk headers) per file of a patch."""
    out = []
    sections = _DIFF.split(text)
    for i in range(1, len(sections), 3):
        path, body = sections[i + 1], sections[i + 2]
        created = "\nnew file mode" in body.split("@@", 1)[0] or "--- /dev/null" in body
        headers = [h.strip() for h in _HUNK.findall(body)]
        out.append((path, created, len(headers), headers))
    return out


def _in_scope(tree: Path, path: str) -> bool:
    top = path.split("/", 1)[0]
    return top == PACKAGE or (Path(tree) / top).is_dir()


def _apply_verbose(scratch: Path, patch: Path, paths: list[str]) -> str:
    args = ["apply", "--reject", "--verbose", "--whitespace=nowarn"] + [f"--include={p}" for p in paths]
    result = gitrun.run([*args, str(patch)], scratch, check=False, ceiling=scratch.parent)
    return result.stdout + result.stderr


_APPLIED = re.compile(r"^Hunk #(\d+) applied cleanly\.", re.M)
_REJECTED = re.compile(r"^Rejected hunk #(\d+)\.", re.M)


def _per_file_results(output: str) -> dict[str, dict[str, list[int]]]:
    """{path: {"applied": [hunk numbers], "rejected": [...]}} parsed from ``git apply --verbose``."""
    results: dict[str, dict[str, list[int]]] = {}
    current = None
    for line in output.splitlines():
        m = re.match(r"^Applied patch (\S+) cleanly", line)
        if m:  # every hunk of the file applied (git names no hunk then)
            current = m.group(1)
            results.setdefault(current, {"applied": [], "rejected": []})["clean"] = [1]
            continue
        m = re.match(r"^Applying patch (\S+) with", line)
        if m:
            current = m.group(1)
            results.setdefault(current, {"applied": [], "rejected": []})
            continue
        m = re.match(r"^Checking patch (\S+?)\.\.\.", line)
        if m:
            current = m.group(1)
            results.setdefault(current, {"applied": [], "rejected": []})
            continue
        if current is None:
            continue
        m = _APPLIED.match(line)
        if m:
            results[current]["applied"].append(int(m.group(1)))
        m = _REJECTED.match(line)
        if m:
            results[current]["rejected"].append(int(m.group(1)))
    return results


def series_fit(tree: Path, series: Series) -> dict:
    """File states and hunk results of one series on the tree (on LF scratch copies)."""
    tree = Path(tree)
    files = {}
    for path, spec in series.files.items():
        target = tree / path
        if not _in_scope(tree, path):
            files[path] = "out-of-scope"
            continue
        if not target.is_file():
            files[path] = "absent" if spec.created else "missing"
            continue
        digest = _sha_lf(target.read_bytes())
        files[path] = (
            "pristine"
            if spec.pristine and digest == spec.pristine.sha256_lf
            else "patched"
            if spec.patched and digest == spec.patched.sha256_lf
            else "modified"
        )
    patches = []
    total = applied = 0
    with tempfile.TemporaryDirectory(prefix="st-drift-") as tmp:
        scratch = Path(tmp)
        for path in series.files:
            source = tree / path
            if source.is_file() and _in_scope(tree, path):
                (scratch / path).parent.mkdir(parents=True, exist_ok=True)
                (scratch / path).write_bytes(_lf(source.read_bytes()))
        for patch_name in series.patches:
            patch = (series.directory / patch_name).resolve()
            text = patch.read_text(encoding="utf-8", errors="replace") if patch.is_file() else ""
            parts = [p for p in patch_files(text) if _in_scope(tree, p[0])]
            record = {"patch": patch_name, "hunks": 0, "applied": 0, "rejected": []}
            if not text:
                record["error"] = "patch file missing"
                patches.append(record)
                continue
            per_file = _per_file_results(_apply_verbose(scratch, patch, [p[0] for p in parts])) if parts else {}
            for path, created, n_hunks, headers in parts:
                record["hunks"] += n_hunks
                got = per_file.get(path, {"applied": [], "rejected": []})
                ok = n_hunks if got.get("clean") else len(got["applied"])
                if created and not got["rejected"]:
                    ok = n_hunks if (scratch / path).is_file() else 0
                rejected = got["rejected"] or ([] if ok == n_hunks else [n for n in range(1, n_hunks + 1)])
                record["applied"] += min(ok, n_hunks)
                for n in rejected:
                    header = headers[n - 1] if 0 < n <= len(headers) else ""
                    record["rejected"].append({"file": path, "hunk": n, "context": header})
            total += record["hunks"]
            applied += record["applied"]
            patches.append(record)
    exact = sum(s in ("pristine", "patched") or (s == "absent" and series.files[p].created) for p, s in files.items())
    return {
        "series": series.name,
        "releases": list(series.releases),
        "files": files,
        "patches": patches,
        "hunks_total": total,
        "hunks_applied": applied,
        "files_exact": exact,
    }


def drift_report(tree: Path, manifest: Manifest) -> dict:
    """Where an (unknown) release stands: native support, closest series, failing hunks."""
    tree = Path(tree)
    if not (tree / PACKAGE / "__init__.py").is_file():
        raise FileNotFoundError(f"{tree}: no {PACKAGE}/__init__.py")
    version = read_version(tree)
    known = version is not None and manifest.lookup(version) is not None
    own = support(tree)
    fits = [series_fit(tree, series) for series in manifest.series.values()]
    # backports for trees without native support, fix series of native releases for the others
    prefix_ok = [f for f in fits if f["series"].startswith("fixes-") == own["native"]] or fits
    ranked = sorted(
        prefix_ok,
        key=lambda f: (
            -(f["hunks_applied"] / f["hunks_total"] if f["hunks_total"] else 0.0),
            -f["files_exact"],
            -f["hunks_applied"],
            f["series"],
        ),
    )
    closest = ranked[0] if ranked and (ranked[0]["hunks_applied"] or ranked[0]["files_exact"]) else None
    others = [f for f in fits if f not in ranked]
    report = {
        "version": version,
        "known": known,
        "support": own,
        "closest": closest["series"] if closest else None,
        "series": ranked + others,
        "advice": _advice(version, known, own, closest),
    }
    return report


def _advice(version, known, own, closest) -> str:
    if own["state"] == "patched":
        return "the tree already carries this project's backport (_matryoshka_cache)"
    if closest is None:
        return "no series applies; " + (
            "native support detected: check it with the conformance suite"
            if own["native"]
            else "a new recipe is needed"
        )
    complete = closest["hunks_total"] and closest["hunks_applied"] == closest["hunks_total"]
    base = f"closest series {closest['series']} ({closest['hunks_applied']}/{closest['hunks_total']} hunks apply)"
    if own["native"]:
        lead = f"sentence-transformers {version} has native support ({own['file']}); "
        tail = "its fixes may carry over: run the conformance suite, then add a row to releases.toml"
    else:
        lead = f"sentence-transformers {version} needs a backport; "
        tail = (
            "add a row to releases.toml and run `make series`"
            if complete
            else "the recipes in scripts/tools/recipes.py need to learn the rejected hunks' context"
        )
    return lead + base + ": " + tail


def format_text(report: dict, limit: int = 3) -> str:
    own = report["support"]
    lines = [
        f"sentence-transformers {report['version'] or '?'}: "
        + ("in the manifest" if report["known"] else "not in the manifest"),
        f"  MatryoshkaLoss + cached losses: {own['state']}"
        + (f" ({own['file']}: {', '.join(own['evidence'])})" if own.get("file") else ""),
    ]
    for fit in report["series"][:limit]:
        mark = "closest " if fit["series"] == report["closest"] else ""
        lines.append(
            f"  {mark}series {fit['series']} (releases {', '.join(fit['releases']) or '-'}): "
            f"{fit['hunks_applied']}/{fit['hunks_total']} hunks apply, "
            f"{fit['files_exact']}/{len(fit['files'])} files identical"
        )
        for path, state in fit["files"].items():
            if state not in ("pristine", "patched", "absent", "out-of-scope"):
                lines.append(f"      {state:<9} {path}")
        for patch in fit["patches"]:
            for rej in patch["rejected"]:
                ctx = f" ({rej['context']})" if rej["context"] else ""
                lines.append(f"      FAILS     {patch['patch']}: {rej['file']} hunk #{rej['hunk']}{ctx}")
    lines.append(f"  advice: {report['advice']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m st_patch.drift TREE [--json]``: the report alone (``st-patch check`` prints it too)."""
    import argparse

    parser = argparse.ArgumentParser(prog="st-patch drift")
    parser.add_argument("tree", type=Path)
    parser.add_argument("--manifest", type=Path, default=default_manifest_path())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = drift_report(args.tree, load(args.manifest))
    print(json.dumps(report, indent=1) if args.json else format_text(report))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

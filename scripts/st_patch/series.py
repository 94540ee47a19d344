"""Generate the patch series and the manifest from one source (``make series``).

The source is ``patches/source/``: the files every series adds (``files/``), the commit messages
(``messages/``) and the edit recipes below, which make the same change to each release's own text.
For every release the table marks ``patched``, the recipes run on the release's pristine sdist files;
releases whose touched files are identical share one series. Each series is committed in a scratch
git repository and exported with ``git format-patch``, so a series is a reviewable commit series that
``git am`` applies to a fork.

Editing a series therefore never means editing a diff: change ``patches/source/`` (or a recipe here)
and run ``make series``; ``make series-check`` (run by the tests) fails when the committed series are
not what the source generates.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import dists, releases

ROOT = releases.ROOT
PATCHES = ROOT / "patches"
SOURCE = PATCHES / "source"
LOSSES = "sentence_transformers/losses"
MATRYOSHKA = f"{LOSSES}/MatryoshkaLoss.py"
SYMMETRIC = f"{LOSSES}/CachedMultipleNegativesSymmetricRankingLoss.py"
# Fixed identity and date: regenerating an unchanged source gives byte-identical series.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "st-matryoshka-cache",
    "GIT_AUTHOR_EMAIL": "st-matryoshka-cache@users.noreply.github.com",
    "GIT_AUTHOR_DATE": "2026-11-27T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "st-matryoshka-cache",
    "GIT_COMMITTER_EMAIL": "st-matryoshka-cache@users.noreply.github.com",
    "GIT_COMMITTER_DATE": "2026-11-27T00:00:00+00:00",
}


class RecipeError(RuntimeError):
    """A recipe did not find the text it edits: the release differs from what the recipe knows."""


def _sub_once(pattern: str, replacement: str | Callable[[re.Match], str], text: str, what: str, flags: int = re.M) -> str:
    """Replace the one match of ``pattern`` (literally, or by calling ``replacement`` on the match)."""
    func = replacement if callable(replacement) else (lambda _m: replacement)
    new, count = re.subn(pattern, func, text, flags=flags)
    if count != 1:
        raise RecipeError(f"{what}: expected exactly one match of {pattern!r}, found {count}")
    return new


# --- recipes: the same change, expressed against each release's own text ------------------------

MATRYOSHKA_DOC = """\
        Cached losses:
            With a cached (GradCache) loss such as :class:`CachedMultipleNegativesRankingLoss`, the embeddings
            are cached at full width and every Matryoshka dimension is truncated and re-normalised in the loss
            stage; the gradients of all dimensions are summed onto the full-width embeddings, so the second,
            gradient-carrying forward pass runs once.

"""

MATRYOSHKA_DISPATCH = """\
        if is_gradcache_loss(self.loss):
            # Cached losses re-embed in a backward hook, after the forward decorator below is gone:
            # keep the cache at full width and truncate in the loss stage instead.
            return matryoshka_cached_forward(self, sentence_features, labels)
"""


def edit_matryoshka(text: str) -> str:
    """MatryoshkaLoss: dispatch GradCache inner losses to truncate-after-cache; drop the warnings."""
    what = MATRYOSHKA
    text = _sub_once(r"^import warnings\n", "", text, what)
    for cls in ("CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss"):
        text = re.sub(rf"^from sentence_transformers\.losses\.{cls} import {cls}\n", "", text, flags=re.M)
        text = re.sub(rf"^ +if isinstance\(loss, {cls}\):\n +warnings\.warn\([^\n]*\)\n", "", text, flags=re.M)
    if "warnings." in text or "isinstance(loss, Cached" in text:
        raise RecipeError(f"{what}: unexpected remaining use of warnings or Cached* classes")
    text = _sub_once(
        r"^from sentence_transformers import SentenceTransformer\n",
        "from sentence_transformers import SentenceTransformer\n"
        "from sentence_transformers.losses._matryoshka_cache import is_gradcache_loss, matryoshka_cached_forward\n",
        text,
        what,
    )
    text = _sub_once(r"^ +Requirements:\n +1\. The base loss cannot be [^\n]*\n\n", MATRYOSHKA_DOC, text, what)
    text = _sub_once(
        r"^    def forward\(self, sentence_features: [^\n]*\) -> Tensor:\n",
        lambda match: match.group(0) + MATRYOSHKA_DISPATCH,
        text,
        what,
    )
    return text


SYMMETRIC_STAGE = '''\
    def _symmetric_loss(self, reps: list[list[Tensor]], with_backward: bool) -> Tensor:
        """MultipleNegativesSymmetricRankingLoss over the whole batch, computed mini-batch by mini-batch.

        Forward direction: each anchor of the chunk against every candidate; backward direction: each
        positive of the chunk against every anchor. Each chunk's term is weighted by its share of the
        batch, so the sum equals the full-batch loss, and backward() per chunk keeps the graph small.
        """
        embeddings_a = torch.cat(reps[0])  # (bsz, hdim)
        embeddings_b = torch.cat([torch.cat(r) for r in reps[1:]])  # ((1 + nneg) * bsz, hdim)

        batch_size = len(embeddings_a)
        labels = torch.arange(batch_size, device=embeddings_a.device)
        losses: list[torch.Tensor] = []
        for b in tqdm.trange(
            0,
            batch_size,
            self.mini_batch_size,
            desc="Preparing caches" if with_backward else "Calculating loss",
            disable=not self.show_progress_bar,
        ):
            e = min(b + self.mini_batch_size, batch_size)
            forward_scores: Tensor = self.similarity_fct(embeddings_a[b:e], embeddings_b) * self.scale
            forward_loss: torch.Tensor = self.cross_entropy_loss(forward_scores, labels[b:e])
            # The positives of this chunk are candidates b:e; score each of them against every anchor.
            backward_scores: Tensor = self.similarity_fct(embeddings_a, embeddings_b[b:e]).t() * self.scale
            backward_loss: torch.Tensor = self.cross_entropy_loss(backward_scores, labels[b:e])
            loss_mbatch = (forward_loss + backward_loss) / 2 * (e - b) / batch_size
            if with_backward:
                loss_mbatch.backward()
                loss_mbatch = loss_mbatch.detach()
            losses.append(loss_mbatch)

        return sum(losses)

    def calculate_loss_and_cache_gradients(self, reps: list[list[Tensor]]) -> Tensor:
        """Calculate the symmetric loss and cache gradients."""
        loss = self._symmetric_loss(reps, with_backward=True).requires_grad_()
        self.cache = [[r.grad for r in rs] for rs in reps]
        return loss

    def calculate_loss(self, reps: list[list[Tensor]]) -> Tensor:
        """Calculate the symmetric loss without caching gradients (for evaluation)."""
        return self._symmetric_loss(reps, with_backward=False)

'''


def edit_symmetric(text: str) -> str:
    """CachedMultipleNegativesSymmetricRankingLoss: the MNSRL formula across mini-batches."""
    return _sub_once(
        r"^    def calculate_loss_and_cache_gradients\(self, reps: list\[list\[Tensor\]\]\) -> Tensor:\n.*?(?=^    def forward\()",
        SYMMETRIC_STAGE,
        text,
        SYMMETRIC,
        flags=re.M | re.S,
    )


@dataclass(frozen=True)
class Concern:
    """One patch of a series: one reviewable change."""

    slug: str  # names patches/source/messages/<slug>.txt
    edits: dict[str, Callable[[str], str]]  # existing file -> recipe
    adds: tuple[str, ...]  # files copied from patches/source/files/

    def applies(self, tree: Path) -> bool:
        return all((tree / path).exists() for path in self.edits)


CONCERNS = (
    Concern("matryoshka-truncate-after-cache", {MATRYOSHKA: edit_matryoshka}, (f"{LOSSES}/_matryoshka_cache.py",)),
    Concern("cmnsrl-symmetric-across-mini-batches", {SYMMETRIC: edit_symmetric}, ()),
    Concern("tests-matryoshka-cached-losses", {}, ("tests/test_matryoshka_cached_losses.py",)),
)


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
        raise RecipeError(f"{path}: mixed line endings; the series assume one style per file")
    return data.replace(b"\r\n", b"\n").decode()


def pristine_files(tree: Path) -> dict[str, str]:
    """The LF text of every existing file some concern edits."""
    paths = {p for c in CONCERNS for p in c.edits}
    return {p: read_lf(tree / p) for p in sorted(paths) if (tree / p).exists()}


def _git(repo: Path, *args: str, capture: bool = False) -> str:
    env = {**os.environ, **GIT_ENV}
    result = subprocess.run(["git", *args], cwd=repo, env=env, check=True, text=True, capture_output=True)
    return result.stdout if capture else ""


def build_series(name: str, versions: list[str], pristine: dict[str, str], out: Path) -> dict:
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
        for concern in CONCERNS:
            if not all(p in pristine for p in concern.edits):
                continue
            for path, recipe in concern.edits.items():
                (repo / path).write_text(recipe((repo / path).read_text()))
            for path in concern.adds:
                (repo / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(SOURCE / "files" / path, repo / path)
                files.setdefault(path, {"pristine": None})
            message = (messages / f"{concern.slug}.txt").read_text().rstrip("\n")
            message += f"\n\nSt-Patch-Series: {name}\nSt-Patch-Releases: {', '.join(versions)}\n"
            _git(repo, "add", "-A")
            subprocess.run(
                ["git", "commit", "-q", "--cleanup=verbatim", "-F", "-"],
                cwd=repo,
                env={**os.environ, **GIT_ENV},
                input=message,
                text=True,
                check=True,
            )
        out.mkdir(parents=True)
        _git(repo, "format-patch", "-q", "--zero-commit", "--no-signature", "--full-index", "-o", str(out), base)
        for path in files:
            files[path]["patched"] = digests((repo / path).read_text())
    return {"releases": versions, "patches": sorted(p.name for p in out.iterdir()), "files": files}


def series_name(versions: list[str]) -> str:
    return f"backport-{versions[0]}" if len(versions) == 1 else f"backport-{versions[0]}-{versions[-1]}"


def generate(dest: Path) -> dict:
    """Write ``series/`` and ``manifest.json`` for every release of the table into ``dest``."""
    table = releases.load()
    groups: dict[tuple, list[str]] = {}
    pristine_by_group: dict[tuple, dict[str, str]] = {}
    for release in table:
        if release.support != "patched":
            continue
        tree = dists.sdist_tree(release.version)
        try:
            pristine = pristine_files(tree)
        finally:
            shutil.rmtree(tree.parent)
        key = tuple(sorted((p, sha256(t.encode())) for p, t in pristine.items()))
        groups.setdefault(key, []).append(release.version)
        pristine_by_group[key] = pristine
    manifest: dict = {"format": 1, "generated_by": "make series", "releases": {}, "series": {}}
    series_of: dict[str, str] = {}
    for key, versions in groups.items():
        name = series_name(versions)
        manifest["series"][name] = build_series(name, versions, pristine_by_group[key], dest / "series" / name)
        series_of.update(dict.fromkeys(versions, name))
    for release in table:
        manifest["releases"][release.version] = {"support": release.support, "series": series_of.get(release.version)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two directory trees."""
    cmp = filecmp.dircmp(a, b)
    diffs = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    for sub in cmp.common_dirs:
        diffs += [f"{sub}/{d}" for d in _same_tree(a / sub, b / sub)]
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="st-patch refresh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if patches/ differs from what the source generates")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="st-refresh-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        current = PATCHES
        if args.check:
            stale = []
            if not (current / "manifest.json").exists() or not filecmp.cmp(fresh / "manifest.json", current / "manifest.json", shallow=False):
                stale.append("manifest.json")
            stale += [f"series/{d}" for d in _same_tree(fresh / "series", current / "series")] if (current / "series").exists() else ["series"]
            if stale:
                print("patches/ is not what patches/source generates; run `make series`. Differs: " + ", ".join(stale))
                return 1
            print("patches/ is up to date with patches/source")
            return 0
        shutil.rmtree(current / "series", ignore_errors=True)
        shutil.copytree(fresh / "series", current / "series")
        shutil.copyfile(fresh / "manifest.json", current / "manifest.json")
        manifest = json.loads((fresh / "manifest.json").read_text())
        for name, entry in manifest["series"].items():
            print(f"{name}: {', '.join(entry['releases'])} ({len(entry['patches'])} patches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

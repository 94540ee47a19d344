"""The shared multi-width loss stage as an upstream pull request (``make upstream-pr``).

Upstream has one package layout and one set of semantics, so its copy of ``_matryoshka_shared.py`` is
this project's module without what only older releases need: the adapters of the 2.4 - 5.2 ranking
losses, the backport's entry point and the release table; CachedGISTEmbedLoss's masking rules are
main's. It is made from the project's module here (the engine and the adapters keep one definition),
and so is the edit of ``matryoshka.py`` (the fix series' own recipe, without the per-width logging that
upstream does not have). The pull request is ``git format-patch`` output against the newest upstream
release (its sdist, committed as the base of a scratch repository), plus its test and ``PR.md``.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
import tempfile
from pathlib import Path

from st_patch import gitrun

from . import dists, recipes_native, recipes_shared
from .recipes import RecipeError, _sub_once
from .series import GIT_ENV

ROOT = Path(__file__).resolve().parents[2]
BASE = "6.2.0"  # the newest release: what upstream main has of MatryoshkaLoss and the cached losses
PR_DIR = ROOT / "patches" / "upstream" / "matryoshka-shared-loss-stage"
TEST_SOURCE = ROOT / "patches" / "source" / "upstream" / "test_matryoshka_shared_stage.py"
TEST_PATH = "tests/sentence_transformer/losses/test_matryoshka_shared_stage.py"
MODULE_PATH = recipes_shared.SHARED_MODULE_NEW
MATRYOSHKA_PATH = recipes_native.MATRYOSHKA_NEW

#: Top-level definitions only older releases need.
OLD_RELEASES_ONLY = (
    "_release",
    "_mnrl",
    "_symmetric_formula",
    "_mnsrl",
    "GIST_PROTECTS_POSITIVE",
    "GIST_RELATIVE_MARGIN_OF_ABS",
    "GIST_PROTECTS_LABEL_COLUMN",
    "loss_stage",
)

DOCSTRING = '''"""One loss stage for every Matryoshka dimension: MatryoshkaLoss around the built-in cached losses.

``CachedLossDecorator`` calls the inner loss stage once per Matryoshka dimension on truncated,
re-normalised copies of the cached embeddings. Every dimension thereby recomputes a similarity product
at that dimension, a softmax and a backward per mini-batch, plus a backward through each truncation
(and, with ``gather_across_devices``, an all-gather of every column). The dimensions are prefixes of one
vector, so most of that work is shared:

- the dot product at dimension d is the sum of the dot products of the segments below d: one product per
  segment (together one full-width product), summed cumulatively, gives the dot products of every
  dimension; the prefix norms come from cumulative sums of squares, so
  ``cos_d(x, y) = (x[:d] . y[:d]) / (|x[:d]| |y[:d]|)`` needs no truncated copies and no second
  normalisation;
- what does not depend on the dimension is computed once: CachedGISTEmbedLoss's guide similarities and
  false-negative masks, the direction masks and hardness selections of CachedMultipleNegativesRankingLoss,
  and the all-gather of every column (once per step, at full width, through ``all_gather_with_grad``,
  which the gradients go back through);
- the gradient is written by hand: per dimension the softmax minus the one-hot label, weighted, scaled
  back to the dot products; the reverse cumulative sum over dimensions gives each segment's gradient, so
  the backward is again one product per segment; the norm terms are added once at the end.

The loss stage stays chunked by ``mini_batch_size`` exactly like the inner loss, and the dimensions of a
chunk are processed in groups bounded by :data:`WIDTH_GROUP_ELEMENTS`, so the score tensors alive at
once stay bounded at large batch sizes.

Only the library's own CachedMultipleNegativesRankingLoss (``cos_sim`` / ``dot_score``),
CachedMultipleNegativesSymmetricRankingLoss and CachedGISTEmbedLoss take this path, with their own
``calculate_loss``, a plain ``nn.CrossEntropyLoss``, float32/float64 embeddings outside autocast. Anything
else - a user's similarity function or loss, a subclass - returns None, and ``CachedLossDecorator`` loops
over the dimensions as before. ``ST_MATRYOSHKA_GENERIC=1`` (environment) or ``FORCE_GENERIC = True``
(this module) forces that loop; :data:`path_counts` counts which path ran.
"""
'''

VARIANTS = """\
#: class name -> the adapter of its loss stage.
Adapter = Callable[[nn.Module, list, tuple, dict, bool], "Stage | None"]
VARIANTS: dict[str, Adapter] = {
    "CachedMultipleNegativesRankingLoss": _mnrl_directions,
    "CachedMultipleNegativesSymmetricRankingLoss": _mnrl_directions,  # a CachedMultipleNegativesRankingLoss
    "CachedGISTEmbedLoss": _gist,
}
METHODS = ("calculate_loss_and_cache_gradients", "calculate_loss")


def _variant(class_name: str) -> Adapter | None:
    return VARIANTS.get(class_name)
"""

#: (what the project's module says, what upstream's says), each exactly once.
MAIN_SEMANTICS = (
    ('    release = _release()\n    max_columns = 3 if release < Version("3.2.0") else len(reps)\n', ""),
    ("or not 2 <= len(reps) <= max_columns:", "or len(reps) < 2:"),
    (
        "    protects = release in SpecifierSet(GIST_PROTECTS_POSITIVE)\n"
        "    relative_of_abs = release in SpecifierSet(GIST_RELATIVE_MARGIN_OF_ABS)\n"
        "    protected_start = offset if release in SpecifierSet(GIST_PROTECTS_LABEL_COLUMN) else 0\n",
        "",
    ),
    (
        "            elif relative_of_abs:\n                threshold = positive - positive.abs() * margin\n"
        "            else:\n                threshold = positive * (1 - margin)\n",
        "            else:\n                threshold = positive - positive.abs() * margin\n",
    ),
    (
        "            if protects:\n                rows = torch.arange(e - b, device=ap_mask.device)\n"
        "                ap_mask[rows, protected_start + b + rows] = False\n",
        "            rows = torch.arange(e - b, device=ap_mask.device)  # the positive itself is never masked\n"
        "            ap_mask[rows, offset + b + rows] = False\n",
    ),
    ("from packaging.specifiers import SpecifierSet\nfrom packaging.version import Version\n", ""),
)

#: Release numbers and "the release" in comments and docstrings: upstream has one (each at least once).
WORDING = (
    (", 5.3+ MNRL)", ")"),
    (
        "release's own gather (upstream gathers once per width,",
        "library's own gather (the loop gathers once per width,",
    ),
    ("# the release refuses it", "# the loss refuses it"),
    (" (``gather_across_devices``, 5.1.0+)", " (``gather_across_devices``)"),
    (
        "(for a subclass, e.g. 5.3+\n    # CachedMultipleNegativesSymmetricRankingLoss,",
        "(for a subclass, e.g.\n    # CachedMultipleNegativesSymmetricRankingLoss,",
    ),
    (" (5.7+ passes them)", ""),
    ("this release's ``class_name``", "``class_name``"),
    ("what each release's inner loss stage computes", "what each inner loss stage computes"),
    ("the release's", "the library's"),
    ("The release's", "The library's"),
)

#: Docstrings that speak of releases, as upstream's copy says them.
DOCSTRINGS = {
    "_mnrl_directions": """CachedMultipleNegativesRankingLoss (and CachedMultipleNegativesSymmetricRankingLoss, its
    subclass): the score blocks of ``directions`` (query -> documents, -> queries without itself; document ->
    queries, -> documents without its own query's), one softmax over all of them ("joint") or one per
    direction, averaged ("per_direction"); the hardness penalty ``hardness_strength * stop_grad(cos)`` on the
    negatives ``hardness_mode`` names; with ``gather_across_devices`` queries and documents of every rank.
    """,
    "_gist": """CachedGISTEmbedLoss: anchor-positive, anchor-anchor, positive-positive and anchor-negative
    blocks (anchor-anchor and positive-positive switchable); a candidate is masked where the guide scores it
    above the positive less the margin (the positive itself is exempt); with ``gather_across_devices``
    against the candidates (and guide embeddings) of every rank.""",
    "calculate_loss": """For MatryoshkaLoss, whose CachedLossDecorator stands in for the inner loss's
    ``calculate_loss(reps, ..., with_backward=...)``: that call, ``method(reps, *args, **kwargs)``, for every
    dimension at once. With ``with_backward`` the gradients are added to ``rep.grad`` of the cached
    embeddings, as the loss's own ``calculate_loss`` leaves them. None: not covered, the caller loops over
    the dimensions.
    """,
}


def _with_docstrings(text: str, docstrings: dict[str, str]) -> str:
    """``text`` with the docstrings of the top-level functions ``docstrings`` names replaced."""
    lines = text.splitlines(keepends=True)
    spans = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name in docstrings:
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
                raise RecipeError(f"_matryoshka_shared.py: {node.name} has no docstring")
            spans[node.name] = (doc.lineno - 1, doc.end_lineno)
    if set(spans) != set(docstrings):
        raise RecipeError(f"_matryoshka_shared.py: no function {', '.join(set(docstrings) - set(spans))}")
    for name, (start, end) in sorted(spans.items(), key=lambda item: -item[1][0]):
        lines[start:end] = [f'    """{docstrings[name]}"""\n']
    return "".join(lines)


def _spans(source: str, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Line spans (start, end; 0-based, end exclusive) of the top-level definitions ``names``, ``#:`` comments
    and the blank lines after each included."""
    lines = source.splitlines(keepends=True)
    spans, found = [], set()
    for node in ast.parse(source).body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        name = getattr(node, "name", None) or (targets[0] if targets else None)
        if name not in names:
            continue
        found.add(name)
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and lines[start - 1].startswith("#:"):
            start -= 1
        end = node.end_lineno
        while end < len(lines) and not lines[end].strip():
            end += 1
        spans.append((start, end))
    missing = [n for n in names if n not in found]
    if missing:
        raise RecipeError(f"_matryoshka_shared.py: no top-level definition of {', '.join(missing)}")
    return spans


def upstream_module(source: str) -> str:
    """Upstream's ``_matryoshka_shared.py`` from the project's."""
    lines = source.splitlines(keepends=True)
    drop = set()
    for start, end in _spans(source, OLD_RELEASES_ONLY):
        drop.update(range(start, end))
    text = "".join(line for i, line in enumerate(lines) if i not in drop)
    text = _sub_once(r'\A""".*?"""\n', lambda m: DOCSTRING, text, "docstring", flags=re.S)
    table = re.compile(r"^#: class name -> \(releases, adapter\).*?\n\n\ndef covers\(", re.M | re.S)
    text, count = table.subn(lambda m: VARIANTS + "\n\ndef covers(", text)
    if count != 1:
        raise RecipeError("_matryoshka_shared.py: expected one VARIANTS table followed by _variant and covers")
    for old, new in MAIN_SEMANTICS:
        if text.count(old) != 1:
            raise RecipeError(f"_matryoshka_shared.py: expected exactly one {old.strip().splitlines()[0]!r}")
        text = text.replace(old, new)
    text = _with_docstrings(text, DOCSTRINGS)
    for old, new in WORDING:
        if old not in text:
            raise RecipeError(f"_matryoshka_shared.py: no {old!r} left to reword")
        text = text.replace(old, new)
    return text


DISPATCH = """\
        # The built-in cached losses compute every dimension at once (_matryoshka_shared: one product per
        # segment, one backward for all dimensions); any other loss takes the per-dimension loop below.
        dims_weights = [(self.matryoshka_dims[idx], self.matryoshka_weights[idx]) for idx in dim_indices]
        shared = shared_calculate_loss(self.fn, dims_weights, reps, args, kwargs)
        if shared is not None:
            return shared.total

"""


def edit_matryoshka(text: str) -> str:
    """Upstream MatryoshkaLoss: CachedLossDecorator tries the shared stage first (the fix series' recipe, with
    upstream's sampling line and without the per-width logging)."""
    text = _sub_once(
        r"^from torch import Tensor, nn\n\n",
        lambda m: (
            m.group(0) + "from sentence_transformers.sentence_transformer.losses._matryoshka_shared import "
            "calculate_loss as shared_calculate_loss\n"
        ),
        text,
        "matryoshka.py",
    )
    return _sub_once(
        r"^( +dim_indices = random\.sample\(dim_indices, self\.n_dims_per_step\)\n\n)"
        r"(        loss = 0\.0\n        for idx in dim_indices:\n)",
        lambda m: m.group(1) + DISPATCH + m.group(2),
        text,
        "matryoshka.py",
    )


MESSAGE = """\
[`feat`] MatryoshkaLoss: compute every dimension of a cached loss in one pass

With a cached (GradCache) loss, MatryoshkaLoss's CachedLossDecorator runs
the inner loss stage once per Matryoshka dimension: each dimension
recomputes a similarity product, a softmax and a backward per
mini-batch, a backward through the truncation, and (with
gather_across_devices) an all-gather of every column.

The dimensions are prefixes of one vector, so the work can be shared:
one product per segment between consecutive dimensions, summed
cumulatively, gives every dimension's dot products; cumulative sums of
squares give the prefix norms; masks, hardness selections and the guide
of CachedGISTEmbedLoss are computed once; the weighted gradient of all
dimensions is written by hand and propagated with one product per
segment. The stage stays chunked by mini_batch_size, and gathers once per
step at full width.

Only the library's own CachedMultipleNegativesRankingLoss (every
direction, partition mode and hardness mode),
CachedMultipleNegativesSymmetricRankingLoss and CachedGISTEmbedLoss take
the new path; anything else loops over the dimensions as before.
ST_MATRYOSHKA_GENERIC=1 forces the loop.
"""


def build(out: Path) -> Path:
    """Write the patch (``git format-patch`` against the base release) into ``out``; its path."""
    scratch = Path(tempfile.mkdtemp(prefix="st-upstream-pr-"))
    try:
        repo = dists.sdist_tree(BASE, scratch / "sdist")
        for path in repo.rglob("*.py"):  # released files are CRLF; upstream's git has LF
            path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
        env = dict(GIT_ENV)
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", f"v{BASE} (sdist)"]):
            gitrun.run(args, repo, env=env, ceiling=scratch)
        source = (recipes_shared.SOURCE / recipes_shared.SHARED_SOURCE).read_text()
        (repo / MODULE_PATH).write_text(upstream_module(source))
        matryoshka = repo / MATRYOSHKA_PATH
        matryoshka.write_text(edit_matryoshka(matryoshka.read_text()))
        (repo / TEST_PATH).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TEST_SOURCE, repo / TEST_PATH)
        gitrun.run(["add", "-A"], repo, env=env, ceiling=scratch)
        gitrun.run(["commit", "-q", "-F", "-"], repo, env=env, ceiling=scratch, input=MESSAGE)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.patch"):
            old.unlink()
        proc = gitrun.run(["format-patch", "-1", "-o", str(out)], repo, env=env, ceiling=scratch)
        return Path(proc.stdout.strip())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make upstream-pr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed patch is not what is made")
    args = parser.parse_args(argv)
    if not args.check:
        print(build(PR_DIR))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        built = build(Path(scratch))
        committed = sorted(PR_DIR.glob("*.patch"))
        if [p.name for p in committed] != [built.name] or committed[0].read_bytes() != built.read_bytes():
            print(f"{PR_DIR.relative_to(ROOT)}: the patch is not what the source makes (make upstream-pr)")
            return 1
    if not (PR_DIR / "PR.md").exists():
        print(f"{PR_DIR.relative_to(ROOT)}: no PR.md (the pull request's description)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Native AdaptiveLayerLoss / Matryoshka2dLoss around GradCache losses (3.4.0 - 6.2.0): layers in the cache.

The backport series ships ``_adaptive_layer_cache.py`` next to ``_matryoshka_cache.py``, whose GradCache
protocol helpers it imports. Native releases truncate in their own MatryoshkaLoss and have no
``_matryoshka_cache.py``, so their copy of the layer cache is made self-contained: the import of those
helpers is replaced by their definitions, taken from the backport module's source (one definition of
each), with the protocol's description. The release's layer semantics that differ by release are a
constant (``FIRST_PRIOR``, PR #3560) or read from the loss (``get_layer_weight``, PR #3901).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .recipes import (
    ADAPTIVE_LAYER_CHECK,
    ADAPTIVE_LAYER_DISPATCH,
    ADAPTIVE_LAYER_REFUSAL,
    LOSSES,
    RecipeError,
    _sub_once,
    import_path,
)
from .recipes_native import NEW_LOSSES, REFUSE_GRADIENT_CACHE

SOURCE = Path(__file__).resolve().parents[2] / "patches" / "source" / "files"
CACHE_SOURCE = f"{LOSSES}/_matryoshka_cache.py"
LAYER_SOURCE = f"{LOSSES}/_adaptive_layer_cache.py"
LAYER_MODULE_OLD = LAYER_SOURCE
LAYER_MODULE_NEW = f"{NEW_LOSSES}/_adaptive_layer_cache.py"

#: The protocol helpers the layer cache uses, in the order of ``_matryoshka_cache.py``.
HELPERS = (
    "GRADCACHE_MARKERS",
    "LOSS_STAGE_METHODS",
    "is_gradcache_loss",
    "_with_backward",
    "check_loss_stage",
    "truncate",
    "select_dims",
    "_same_on_every_rank",
    "stage_replacements",
    "_shadowed",
    "refuse_under_adaptive_layers",
)
HELPERS_IMPORT = re.compile(
    r"^from sentence_transformers\.losses\._matryoshka_cache import \(\n(?:    \w+,\n)+\)\n", re.M
)


def _definitions(source: str, names: tuple[str, ...]) -> str:
    """The top-level definitions ``names`` of ``source`` (decorators and ``#:`` comments included), in order."""
    lines = source.splitlines(keepends=True)
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        name = getattr(node, "name", None) or (targets[0] if targets else None)
        if name not in names:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and lines[start - 1].startswith("#:"):
            start -= 1
        found[name] = "".join(lines[start : node.end_lineno])
    missing = [n for n in names if n not in found]
    if missing:
        raise RecipeError(f"{CACHE_SOURCE}: no top-level definition of {', '.join(missing)}")
    return "\n\n".join(found[n].rstrip("\n") + "\n" for n in names)


def _protocol(cache_source: str) -> str:
    """The GradCache protocol's description from ``_matryoshka_cache.py``'s docstring."""
    doc = ast.get_docstring(ast.parse(cache_source), clean=False) or ""
    start = doc.find("The GradCache protocol")
    end = doc.find("``AdaptiveLayerLoss`` and ``Matryoshka2dLoss`` do not support")
    if start < 0 or end < start:
        raise RecipeError(f"{CACHE_SOURCE}: its docstring lost the GradCache protocol's description")
    return doc[start:end]


def native_layer_module(path: str, first_prior: int) -> str:
    """``_adaptive_layer_cache.py`` of a native release (at ``path``): self-contained, prior layers from
    ``first_prior``."""
    layer = (SOURCE / LAYER_SOURCE).read_text()
    cache = (SOURCE / CACHE_SOURCE).read_text()
    what = f"{LAYER_SOURCE} (native)"
    helpers = _definitions(cache, HELPERS).replace(CACHE_SOURCE, path)
    text = _sub_once(
        HELPERS_IMPORT.pattern,
        lambda _m: "\n# --- the GradCache protocol's helpers (the same as the backport series')\n\n" + helpers,
        layer,
        what,
    )
    text = _sub_once(r"^import random\n", "import inspect\nimport random\n", text, what)
    text = _sub_once(r"^FIRST_PRIOR = 1\n", f"FIRST_PRIOR = {first_prior}\n", text, what)
    text = text.replace("(the GradCache protocol in _matryoshka_cache.py)", "(the GradCache protocol, above)")
    protocol = _protocol(cache)
    text = _sub_once(
        r'^"""\n\nfrom __future__', lambda _m: f'\n{protocol.rstrip()}\n"""\n\nfrom __future__', text, what
    )
    if "_matryoshka_cache" in text:
        raise RecipeError(f"{what}: still refers to _matryoshka_cache")
    return text


#: Upstream's "not compatible" warnings in AdaptiveLayerLoss.__init__, by release.
NOT_COMPATIBLE_WARNINGS = (
    r"^ +if isinstance\(loss, Cached\w+\):\n +warnings\.warn\([^\n]*\)\n",  # 3.4.0 - 5.0.x
    r"^ +if isinstance\(\n +loss,\n +\([^\n]*\),\n +\):\n +warnings\.warn\([^\n]*\)\n",  # 5.1.0 - 5.6.x
    r"^ +if uses_gradient_cache\(loss\):\n(?: +#[^\n]*\n)* +warnings\.warn\([^\n]*\)\n",  # 5.7.0+
)


def _drop_unused_imports(text: str, names: tuple[str, ...]) -> str:
    """Remove the import of each of ``names`` that the text no longer uses."""
    for name in names:
        patterns = (rf"^import {name}\n", rf"^from [\w.]+ import {name}\n", rf"^from [\w.]+ import \(\n +{name},\n\)\n")
        for pattern in patterns:
            stripped, count = re.subn(pattern, "", text, flags=re.M)
            if count == 1 and not re.search(rf"\b{name}\b", stripped):
                text = stripped
    return text


def edit_adaptive_layer_cached_native(module_path: str):
    """AdaptiveLayerLoss of a native release: train a GradCache loss with the layers in its cache (the file
    ``module_path``) instead of refusing it; drop upstream's "not compatible" warning."""
    module = import_path(module_path)

    def edit(text: str) -> str:
        what = "AdaptiveLayerLoss (native)"
        text = _sub_once(re.escape(REFUSE_GRADIENT_CACHE), "", text, what)
        refusal = ADAPTIVE_LAYER_REFUSAL.format(call="_refuse_gradient_cache")
        text = _sub_once(re.escape(refusal), ADAPTIVE_LAYER_CHECK, text, what)
        count = 0
        for pattern in NOT_COMPATIBLE_WARNINGS:
            text, n = re.subn(pattern, "", text, flags=re.M)
            count += n
        if count == 0 or "warnings.warn(" in text:
            raise RecipeError(f"{what}: expected upstream's 'not compatible' warnings and no other warnings.warn")
        text = _drop_unused_imports(
            text,
            (
                "warnings",
                "uses_gradient_cache",
                "CachedGISTEmbedLoss",
                "CachedMultipleNegativesRankingLoss",
                "CachedMultipleNegativesSymmetricRankingLoss",
            ),
        )
        text = _sub_once(
            r"^( +)1\. The base loss cannot be [^\n]*\n(?: {13,}\S[^\n]*\n)*",
            lambda m: (
                f"{m.group(1)}1. A cached (GradCache) loss is supported on its own or inside one"
                " :class:`MatryoshkaLoss`.\n"
            ),
            text,
            what,
        )
        text = _sub_once(
            r"^from sentence_transformers(?:\.sentence_transformer\.model)? import SentenceTransformer\n",
            lambda m: (
                m.group(0)
                + f"from {module} import (\n"
                + "    adaptive_layer_cached_forward,\n    check_adaptive_layer_loss,\n    uses_layer_cache,\n)\n"
            ),
            text,
            what,
        )
        return _sub_once(
            r"^    def forward\(self, sentence_features: [^\n]*\) -> Tensor:\n",
            lambda m: m.group(0) + ADAPTIVE_LAYER_DISPATCH,
            text,
            what,
        )

    return edit

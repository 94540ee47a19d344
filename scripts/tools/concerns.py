"""Which concerns (patches) make up the series of each kind of release, in patch order.

A backport series (releases the table marks "patched") makes MatryoshkaLoss work around cached losses
and fixes the upstream defects of those releases that this project fixes on native releases too; a
fix series (releases marked "native") fixes upstream's native support. Recipes live in recipes.py
(backport) and recipes_native.py (native support); a recipe shared by both is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import recipes_layers as layers
from . import recipes_log as log
from . import recipes_native as native
from . import recipes_shared as shared
from .recipes import (
    ADAPTIVE_LAYER,
    LOSSES,
    MATRYOSHKA,
    MATRYOSHKA_2D,
    SYMMETRIC,
    Concern,
    edit_adaptive_layer,
    edit_adaptive_layer_cached,
    edit_adaptive_layer_detach_kl_target,
    edit_matryoshka,
    edit_matryoshka2d_relative_imports,
    edit_matryoshka_check_dims,
    edit_matryoshka_refuse_mini_batched_megabatch,
    edit_matryoshka_same_dims_on_every_rank,
    edit_matryoshka_sort_dims,
    edit_matryoshka_sorted_sample,
    edit_matryoshka_validate_arguments,
    edit_matryoshka_validate_n_dims_per_step,
    edit_symmetric,
)

# --- native concerns that differ only by module layout (and a release's semantics): one table each


def _native_layer_cache(adaptive: str, module: str, first_prior: int, releases: str) -> Concern:
    """The layer cache made for a native layout (``module``) and its AdaptiveLayerLoss edit."""
    return Concern(
        "adaptive-layer-truncate-after-cache",
        {adaptive: layers.edit_adaptive_layer_cached_native(module)},
        writes={module: partial(layers.native_layer_module, module, first_prior)},
        releases=releases,
    )


#: (AdaptiveLayerLoss, the layer cache, FIRST_PRIOR, releases): the prior layers start at the embedding output
#: from 5.2.0 (PR #3560); the losses moved to sentence_transformer/losses in 5.4.0.
NATIVE_LAYER_CACHES = (
    (native.ADAPTIVE_LAYER_OLD, layers.LAYER_MODULE_OLD, 1, "<5.2.0"),
    (native.ADAPTIVE_LAYER_OLD, layers.LAYER_MODULE_OLD, 0, ">=5.2.0,<5.4.0"),
    (native.ADAPTIVE_LAYER_NEW, layers.LAYER_MODULE_NEW, 0, ">=5.4.0"),
)


def _native_log(matryoshka: str, adaptive: str, matryoshka_2d: str, layer_cache: str, releases: str) -> Concern:
    """Per-width logging for a native layout: MatryoshkaLoss inlines the logging functions, the 2D losses and
    the layer cache reach them in MatryoshkaLoss's module."""
    return Concern(
        "matryoshka-log-per-dim",
        {
            matryoshka: log.edit_matryoshka_log_native,
            adaptive: log.edit_adaptive_layer_log(matryoshka),
            matryoshka_2d: log.edit_matryoshka_2d_log,
            layer_cache: log.edit_layer_cache_log(matryoshka),
        },
        releases=releases,
    )


NATIVE_LOG_LAYOUTS = (
    (native.MATRYOSHKA_OLD, native.ADAPTIVE_LAYER_OLD, native.MATRYOSHKA_2D_OLD, layers.LAYER_MODULE_OLD, "<5.4.0"),
    (native.MATRYOSHKA_NEW, native.ADAPTIVE_LAYER_NEW, native.MATRYOSHKA_2D_NEW, layers.LAYER_MODULE_NEW, ">=5.4.0"),
)


BACKPORT: tuple[Concern, ...] = (
    # AdaptiveLayerLoss (2.5.0+) must refuse what the removed MatryoshkaLoss warning used to flag.
    Concern(
        "matryoshka-truncate-after-cache",
        {MATRYOSHKA: edit_matryoshka},
        (f"{LOSSES}/_matryoshka_cache.py", f"{LOSSES}/_matryoshka_shared.py"),
        releases="<2.5.0",
    ),
    Concern(
        "matryoshka-truncate-after-cache",
        {MATRYOSHKA: edit_matryoshka, ADAPTIVE_LAYER: edit_adaptive_layer},
        (f"{LOSSES}/_matryoshka_cache.py", f"{LOSSES}/_matryoshka_shared.py"),
        releases=">=2.5.0",
    ),
    Concern("cmnsrl-symmetric-across-mini-batches", {SYMMETRIC: edit_symmetric}, releases=">=3.1.0"),
    Concern("matryoshka-sort-dims", {MATRYOSHKA: edit_matryoshka_sort_dims}, releases="<3.0.1"),
    Concern("matryoshka-sorted-sample", {MATRYOSHKA: edit_matryoshka_sorted_sample}, releases=">=2.5.0,<4.0.0"),
    Concern("native-gist-guide-on-feature-copies", {native.GIST_OLD: native.edit_gist_guide_copy}, releases=">=2.6.0"),
    Concern("native-gradcache-hook-binds-cache", {native.CMNRL_OLD: native.edit_hook_binds_cache}, releases="<2.7.0"),
    Concern(
        "native-gradcache-hook-binds-cache",
        {native.CMNRL_OLD: native.edit_hook_binds_cache, native.CGIST_OLD: native.edit_hook_binds_cache},
        releases=">=2.7.0,<3.1.0",
    ),
    Concern(
        "native-gradcache-hook-binds-cache",
        {
            native.CMNRL_OLD: native.edit_hook_binds_cache,
            native.CGIST_OLD: native.edit_hook_binds_cache,
            native.CMNSRL_OLD: native.edit_hook_binds_cache,
        },
        releases=">=3.1.0",
    ),
    Concern("matryoshka-check-dims-fit-embedding", {MATRYOSHKA: edit_matryoshka_check_dims}, releases="<2.7.0"),
    Concern("matryoshka-validate-dims-and-weights", {MATRYOSHKA: edit_matryoshka_validate_arguments}),
    Concern(
        "matryoshka-validate-n-dims-per-step",
        {MATRYOSHKA: edit_matryoshka_validate_n_dims_per_step},
        releases=">=2.5.0",  # n_dims_per_step exists from 2.5.0
    ),
    Concern(
        "matryoshka-same-dims-on-every-rank", {MATRYOSHKA: edit_matryoshka_same_dims_on_every_rank}, releases=">=2.5.0"
    ),
    Concern("matryoshka-refuse-mini-batched-megabatch", {MATRYOSHKA: edit_matryoshka_refuse_mini_batched_megabatch}),
    Concern(
        "matryoshka2d-relative-imports",
        {MATRYOSHKA_2D: edit_matryoshka2d_relative_imports},
        releases=">=3.0.0,<3.1.0",  # 2.x imports in another order; 3.1.0 has the fix (#2907)
    ),
    Concern("tests-matryoshka-cached-losses", {}, ("tests/test_matryoshka_cached_losses.py",)),
    Concern(  # before the layer cache, whose KL term follows the detached target
        "adaptive-layer-detach-kl-target",
        {ADAPTIVE_LAYER: edit_adaptive_layer_detach_kl_target},
        releases=">=2.5.0,<3.4.0",  # AdaptiveLayerLoss exists from 2.5.0
    ),
    Concern(
        "adaptive-layer-truncate-after-cache",
        {ADAPTIVE_LAYER: edit_adaptive_layer_cached},
        (f"{LOSSES}/_adaptive_layer_cache.py",),
        releases=">=2.5.0",  # AdaptiveLayerLoss exists from 2.5.0
    ),
    Concern(
        "matryoshka-log-per-dim",
        {MATRYOSHKA: log.edit_matryoshka_log, log.CACHE_MODULE: log.edit_cache_stage_log},
        (log.LOG_MODULE,),
        releases="<2.5.0",
    ),
    Concern(  # with AdaptiveLayerLoss and Matryoshka2dLoss (2.5.0+): one loss per (layers, width)
        "matryoshka-log-per-dim",
        {
            MATRYOSHKA: log.edit_matryoshka_log,
            log.CACHE_MODULE: log.edit_cache_stage_log,
            ADAPTIVE_LAYER: log.edit_adaptive_layer_log(log.LOG_MODULE),
            MATRYOSHKA_2D: log.edit_matryoshka_2d_log,
            layers.LAYER_SOURCE: log.edit_layer_cache_log(log.LOG_MODULE),
        },
        (log.LOG_MODULE,),
        releases=">=2.5.0",
    ),
)

NATIVE_FIXES: tuple[Concern, ...] = (
    Concern("matryoshka-sorted-sample", {native.MATRYOSHKA_OLD: edit_matryoshka_sorted_sample}, releases="<4.0.0"),
    *native.NATIVE_FIXES,
    Concern(
        "adaptive-layer-detach-kl-target",
        {native.ADAPTIVE_LAYER_OLD: edit_adaptive_layer_detach_kl_target},
        releases="<5.4.0",
    ),
    Concern(
        "adaptive-layer-detach-kl-target",
        {native.ADAPTIVE_LAYER_NEW: edit_adaptive_layer_detach_kl_target},
        releases=">=5.4.0,<5.7.0",  # 5.7.0 detaches it (#3880)
    ),
    # After the refusal (native.NATIVE_FIXES), which it replaces, and after the detached KL target, which the
    # layer cache follows. The prior layers start at the embedding output from 5.2.0 (PR #3560).
    *(_native_layer_cache(*layout) for layout in NATIVE_LAYER_CACHES),
    Concern(
        "matryoshka-validate-dims-and-weights",
        {native.MATRYOSHKA_OLD: edit_matryoshka_validate_arguments},
        releases="<5.1.2",  # 5.1.2 validates them (#3530)
    ),
    Concern(
        "matryoshka-validate-n-dims-per-step",
        {native.MATRYOSHKA_OLD: edit_matryoshka_validate_n_dims_per_step},
        releases="<5.4.0",
    ),
    Concern(
        "matryoshka-validate-n-dims-per-step",
        {native.MATRYOSHKA_NEW: edit_matryoshka_validate_n_dims_per_step},
        releases=">=5.4.0",
    ),
    Concern(
        "matryoshka-refuse-mini-batched-megabatch",
        {native.MATRYOSHKA_OLD: edit_matryoshka_refuse_mini_batched_megabatch},
        releases="<5.4.0",
    ),
    Concern(
        "matryoshka-refuse-mini-batched-megabatch",
        {native.MATRYOSHKA_NEW: edit_matryoshka_refuse_mini_batched_megabatch},
        releases=">=5.4.0,<5.7.0",  # 5.7.0 rebuilt the mini-batched mode on the GradCache engine (#3862)
    ),
    Concern(
        "native-gradcache-surrogate-dtype",
        {native.GRADCACHE: native.edit_gradcache_surrogate_dtype},
        releases=">=5.7.0,<6.2.0",  # 6.2.0 promotes the dtypes itself
    ),
    Concern(
        "matryoshka-same-dims-on-every-rank",
        {native.MATRYOSHKA_OLD: edit_matryoshka_same_dims_on_every_rank},
        releases="<5.4.0",
    ),
    Concern(
        "matryoshka-same-dims-on-every-rank",
        {native.MATRYOSHKA_NEW: edit_matryoshka_same_dims_on_every_rank},
        releases=">=5.4.0",
    ),
    *(_native_log(*layout) for layout in NATIVE_LOG_LAYOUTS),
    # Performance, not correctness: last, so that every fix above can be taken without it.
    Concern(
        "native-matryoshka-shared-loss-stage",
        {native.MATRYOSHKA_OLD: shared.edit_for(shared.SHARED_MODULE_OLD)},
        (shared.SHARED_MODULE_OLD,),
        releases="<5.4.0",
    ),
    Concern(
        "native-matryoshka-shared-loss-stage",
        {native.MATRYOSHKA_NEW: shared.edit_for(shared.SHARED_MODULE_NEW)},
        writes={shared.SHARED_MODULE_NEW: shared.shared_module},
        releases=">=5.4.0",
    ),
)


# --- what the README and the registry check read: one patch per slug ---------------------------------

MESSAGES = Path(__file__).resolve().parents[2] / "patches" / "source" / "messages"


@dataclass(frozen=True)
class Patch:
    """One patch (all the concerns of one slug): its commit subject and DEP-3 fields, from its message."""

    slug: str
    subject: str
    fields: dict[str, str]

    @property
    def applied_upstream(self) -> str:
        return self.fields.get("Applied-Upstream", "")


def patch(slug: str) -> Patch:
    lines = (MESSAGES / f"{slug}.txt").read_text().splitlines()
    fields = {}
    for line in lines:
        key, sep, value = line.partition(": ")
        if sep and key in ("Description", "Origin", "Bug", "Forwarded", "Applied-Upstream"):
            fields.setdefault(key, value.strip())
    return Patch(slug, lines[0].strip(), fields)


def slugs() -> list[str]:
    """Every patch, in patch order (backport series first)."""
    return list(dict.fromkeys(c.slug for c in (*BACKPORT, *NATIVE_FIXES)))


def releases_with(slug: str, table) -> list[str]:
    """The releases of ``table`` whose series carries the patch ``slug`` (by the concerns' ranges)."""
    out = []
    for release in table:
        kind = BACKPORT if release.support == "patched" else NATIVE_FIXES
        if any(c.slug == slug and c.in_range(release.version) for c in kind):
            out.append(release.version)
    return out

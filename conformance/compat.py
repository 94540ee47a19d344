"""Adapters between the suite and whichever sentence-transformers (ST) release is importable.

Why a separate module: the checks and the oracle are written once; everything that differs between
ST 2.4.0 and 6.2.0 in *API* (import paths, tokenisation, constructor keywords, which cached losses
exist) is decided here, from the installed version or by inspecting signatures, so that tests stay
free of ``if version < ...`` branches. *Semantic* differences between releases (e.g. GIST margin
rules) are also decided here, but only as plain parameters that the oracle receives; the oracle
never looks at ST.

Nothing here computes a loss.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import warnings
from typing import Any

import sentence_transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conformance import env
from conformance.oracle import InnerSpec

ST_VERSION = Version(sentence_transformers.__version__)
#: The release string as reported by the package (goes into the JSON summary).
ST_RELEASE = sentence_transformers.__version__

PATCH_MODULE = env.PATCH_MODULE


def _state() -> str:
    """env.STATE (file lookup), cross-checked with ``find_spec`` now that the package is imported."""
    if os.environ.get("CONFORMANCE_STATE"):
        return env.STATE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = importlib.util.find_spec(PATCH_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    # The backport module implies a series; a fix series of a native release adds no module, so only
    # this direction can be cross-checked.
    state = "patched" if found else env.STATE
    if state != env.STATE or ST_RELEASE != env.RELEASE:
        raise RuntimeError(
            f"conformance.env saw {env.RELEASE}/{env.STATE} but the imported package is {ST_RELEASE}/{state}"
        )
    return state


STATE = _state()


def _losses_module():
    """The module holding the loss classes: the new layout from 5.4, ``sentence_transformers.losses`` before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 5.6+ warns on the old path
        try:
            return importlib.import_module("sentence_transformers.sentence_transformer.losses")
        except ImportError:
            return importlib.import_module("sentence_transformers.losses")


LOSSES = _losses_module()


def _models_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("sentence_transformers.models")


MODELS = _models_module()


def loss_class(name: str):
    """The ST loss class called ``name``, or None where this release does not have it."""
    return getattr(LOSSES, name, None)


#: Each inner-loss kind: (non-cached class name, cached class name).
LOSS_NAMES = {
    "mnrl": ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"),
    "mnsrl": ("MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"),
    "gist": ("GISTEmbedLoss", "CachedGISTEmbedLoss"),
}
#: Short names used in test ids.
SHORT = {"mnrl": "CMNRL", "mnsrl": "CMNSRL", "gist": "CGIST"}


def has_cached(kind: str) -> bool:
    """CMNRL exists in every release tested, CGIST from 2.7.0, CMNSRL from 3.1.0."""
    return loss_class(LOSS_NAMES[kind][1]) is not None


CACHED_KINDS = tuple(k for k in LOSS_NAMES if has_cached(k))

#: MatryoshkaLoss sorts ``matryoshka_dims`` descending from 3.0.1 (PR #2719); 2.x and 3.0.0 keep the order,
#: unless this project's backport series is applied (it carries that sort).
SORTS_DIMS = ST_VERSION >= Version("3.0.1") or env.STATE == "patched"

#: 5.7.0 - 6.1.x compute the GradCache surrogate as ``dot(reps.float(), grad.float())`` (PR #3862, for
#: autocast), so float64 gradients of every cached loss carry float32 rounding (~1e-7 abs here);
#: 6.2.0 promotes instead, and so does the fix series of those releases. Unpatched, the dedicated
#: precision check holds them to the float64 tolerance (registry: gradcache-fp32-surrogate); the other
#: cached-gradient checks use :data:`CACHED_GRAD_TOL`, still 4-5 orders of magnitude below any real defect.
FP32_SURROGATE = ST_VERSION in SpecifierSet(">=5.7.0,<6.2.0") and STATE == "native"
CACHED_GRAD_TOL = {"rtol": 1e-5, "atol": 1e-6} if FP32_SURROGATE else {"rtol": 1e-7, "atol": 1e-9}

#: Non-cached GISTEmbedLoss accepts 2 or 3 columns; CachedGISTEmbedLoss too before 3.2.0, any number after.
NONCACHED_GIST_MAX_COLUMNS = 3
CACHED_GIST_MAX_COLUMNS = 3 if ST_VERSION < Version("3.2.0") else 99


def _accepts(cls, name: str) -> bool:
    return cls is not None and name in inspect.signature(cls.__init__).parameters


#: ``n_dims_per_step`` exists from 2.5.0.
MATRYOSHKA_HAS_NDPS = _accepts(LOSSES.MatryoshkaLoss, "n_dims_per_step")
GIST_HAS_MARGIN = _accepts(loss_class("CachedGISTEmbedLoss"), "margin")  # 4.1.0
GIST_HAS_CONTRAST = _accepts(loss_class("CachedGISTEmbedLoss"), "contrast_anchors")  # 5.1.0
#: The MNRL options of the oracle's ``directions`` .. ``hardness_strength`` (5.3.0+).
RANKING_OPTIONS = ("directions", "partition_mode", "hardness_mode", "hardness_strength")


def ranking_options(cached: bool) -> bool:
    """Whether this release's (Cached)MultipleNegativesRankingLoss takes ``directions`` and the hardness options."""
    return _accepts(loss_class(LOSS_NAMES["mnrl"][1 if cached else 0]), "directions")


def gist_semantics(**overrides: Any) -> dict[str, Any]:
    """The oracle's GIST parameters that encode this release's masking rules.

    - before 4.1.0: mask where guide sim > guide positive sim; the ap diagonal survives only because
      it is equal, not greater (no explicit protection);
    - 4.1.0: ``margin_strategy``/``margin``; the ap diagonal is explicitly protected;
      "relative" masks where guide sim > g_pos * (1 - margin);
    - 5.6.0: "relative" becomes guide sim > g_pos - |g_pos| * margin (correct for negative g_pos);
    - 5.1.0: ``contrast_anchors`` / ``contrast_positives`` switch the aa / pp blocks.
    """
    sem = {
        "protect_positive": GIST_HAS_MARGIN,
        "relative_rule": "abs" if ST_VERSION >= Version("5.6.0") else "scaled",
    }
    sem.update(overrides)
    return sem


def _shared_module():
    """The shared multi-width loss stage this project's series add (``_matryoshka_shared``), or None."""
    for name in (
        "sentence_transformers.sentence_transformer.losses._matryoshka_shared",
        "sentence_transformers.losses._matryoshka_shared",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
    return None


#: The series' shared multi-width loss stage, where the importable package has it.
SHARED = _shared_module()
#: The ``generic`` lane (env.GENERIC_LANE): the whole suite with the shared stage switched off, on the generic
#: per-width path that every configuration the shared stage does not cover takes.
GENERIC_LANE = env.GENERIC_LANE
if GENERIC_LANE and SHARED is not None:
    SHARED.FORCE_GENERIC = True


def shared_runs() -> int:
    """How often the shared multi-width loss stage has run in this process (0 without it)."""
    return SHARED.path_counts["shared"] if SHARED is not None else 0


def expects_shared(kind: str) -> bool:
    """Whether MatryoshkaLoss around this release's cached ``kind`` must take the shared path."""
    return SHARED is not None and not SHARED.generic_forced() and SHARED.covers(LOSS_NAMES[kind][1])


@contextlib.contextmanager
def generic_path():
    """Force the generic per-width path of the series (no-op where the package has no shared path)."""
    if SHARED is None:
        yield
        return
    previous, SHARED.FORCE_GENERIC = SHARED.FORCE_GENERIC, True
    try:
        yield
    finally:
        SHARED.FORCE_GENERIC = previous


def shared_workspace_bytes(element_size: int) -> int:
    """Bytes of the score buffers of the last shared run (its loss-stage memory)."""
    return SHARED.last_workspace_elements * element_size if SHARED is not None else 0


#: ``layer_weighting`` of AdaptiveLayerLoss / Matryoshka2dLoss exists from 5.7.0 (PR #3901, default "uniform");
#: before, every release weights prior layer i by 1 / (1 + i), which the option calls "linear".
ADAPTIVE_HAS_LAYER_WEIGHTING = _accepts(loss_class("AdaptiveLayerLoss"), "layer_weighting")
ADAPTIVE_KEYWORDS = ("n_layers_per_step", "last_layer_weight", "prior_layers_weight", "kl_div_weight", "kl_temperature")


def _adaptive_layer_caches() -> bool:
    """Whether AdaptiveLayerLoss trains a GradCache loss (the series' ``_adaptive_layer_cache`` module, in the
    release's losses package)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return any(
                importlib.util.find_spec(f"sentence_transformers.{package}._adaptive_layer_cache") is not None
                for package in ("losses", "sentence_transformer.losses")
            )
    except (ImportError, ValueError):
        return False


#: AdaptiveLayerLoss / Matryoshka2dLoss around a GradCache loss is supported (else: refused or broken).
ADAPTIVE_LAYER_CACHES = _adaptive_layer_caches()
#: Where the checks of the 2D losses around a GradCache loss run: with the layer cache, and on an unpatched release
#: that has AdaptiveLayerLoss, where upstream's combination fails them (registry: adaptive-layer-gradient-cache).
#: A partial series without the layer cache refuses the combination instead (test_adaptive_layer.py).
CHECK_2D_CACHED = ADAPTIVE_LAYER_CACHES or (STATE == "native" and loss_class("AdaptiveLayerLoss") is not None)


def adaptive_semantics(**overrides: Any) -> dict[str, Any]:
    """The layer oracle's parameters that encode this release's AdaptiveLayerLoss semantics.

    - before 5.2.0 the prior layers are the outputs of transformer layers 1 .. L-1 (index i is hidden
      state i + 1); from 5.2.0 (PR #3560, which counts ``all_layer_embeddings`` whole) they are the
      embedding output and layers 1 .. L-1 (index i is hidden state i): ``first_prior``;
    - before 5.7.0 the KL target (the final layer's softmax) is not detached, so the KL term also
      trains the final layer (upstream #3757, detached by PR #3880 in 5.7.0): ``teacher_grad``, unless
      this project's series is applied (``env.STATE == "patched"``): every series of 2.5.0 - 5.6.1 carries
      the backport (adaptive-layer-detach-kl-target), so the registry lists the defect for "native" only.
      The suite follows the release here and checks the detachment on its own
      (``test_kl_teacher_receives_no_gradient``);
    - the default layer weighting: 1 / (1 + i) before 5.7.0, "uniform" from 5.7.0 (PR #3901).
    """
    sem: dict[str, Any] = {
        "first_prior": 0 if ST_VERSION >= Version("5.2.0") else 1,
        "teacher_grad": ST_VERSION < Version("5.7.0") and env.STATE != "patched",
        "layer_weighting": "uniform" if ADAPTIVE_HAS_LAYER_WEIGHTING else "linear",
    }
    sem.update(overrides)
    return sem


def adaptive_layer_loss(model, inner, layer_weighting: str | None = None, **layer_kwargs):
    """``AdaptiveLayerLoss(model, inner, ...)``; ``layer_weighting`` only where the release has it."""
    kwargs = _layer_kwargs(layer_weighting, layer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loss_class("AdaptiveLayerLoss")(model, inner, **kwargs)


def matryoshka_2d_loss(
    model, inner, dims, weights=None, n_dims_per_step: int = 1, layer_weighting=None, **layer_kwargs
):
    """``Matryoshka2dLoss(model, inner, dims, weights, n_dims_per_step=..., <AdaptiveLayerLoss keywords>)``."""
    kwargs = _layer_kwargs(layer_weighting, layer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loss_class("Matryoshka2dLoss")(
            model, inner, list(dims), weights, n_dims_per_step=n_dims_per_step, **kwargs
        )


def _layer_kwargs(layer_weighting: str | None, layer_kwargs: dict) -> dict:
    unknown = set(layer_kwargs) - set(ADAPTIVE_KEYWORDS)
    if unknown:
        raise TypeError(f"not an AdaptiveLayerLoss keyword: {sorted(unknown)}")
    kwargs = dict(layer_kwargs)
    if layer_weighting is not None:
        if not ADAPTIVE_HAS_LAYER_WEIGHTING:
            raise LookupError(f"AdaptiveLayerLoss of {ST_RELEASE} has no layer_weighting")
        kwargs["layer_weighting"] = layer_weighting
    return kwargs


def similarity_fn(name: str):
    util = importlib.import_module("sentence_transformers.util")
    return {"cos": util.cos_sim, "dot": util.dot_score}[name]


def make_inner_loss(spec: InnerSpec, model, guide=None, *, cached: bool, mini_batch_size: int = 32):
    """Build the ST loss object matching ``spec`` (the object under test, never used by the oracle)."""
    name = LOSS_NAMES[spec.kind][1 if cached else 0]
    cls = loss_class(name)
    if cls is None:
        raise LookupError(f"{name} does not exist in sentence-transformers {ST_RELEASE}")
    kwargs: dict[str, Any] = {}
    if cached:
        kwargs["mini_batch_size"] = mini_batch_size
    if spec.kind == "gist":
        kwargs["temperature"] = spec.temperature
        if spec.margin_strategy != "absolute" or spec.margin != 0.0:
            if not GIST_HAS_MARGIN:
                raise LookupError(f"GIST margins do not exist in {ST_RELEASE}")
            kwargs.update(margin_strategy=spec.margin_strategy, margin=spec.margin)
        if not (spec.contrast_anchors and spec.contrast_positives):
            if not GIST_HAS_CONTRAST:
                raise LookupError(f"GIST contrast_* options do not exist in {ST_RELEASE}")
            kwargs.update(contrast_anchors=spec.contrast_anchors, contrast_positives=spec.contrast_positives)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(model, guide, **kwargs)
    kwargs.update(scale=spec.scale, similarity_fct=similarity_fn(spec.similarity))
    options = {name: getattr(spec, name) for name in RANKING_OPTIONS}
    if options != {name: getattr(InnerSpec, name) for name in RANKING_OPTIONS}:
        if not ranking_options(cached):
            raise LookupError(f"{name} of {ST_RELEASE} has no directions / hardness options")
        kwargs.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MNSRL is deprecated from 5.3
        return cls(model, **kwargs)


def matryoshka_loss(model, inner, dims, weights=None, n_dims_per_step: int = -1):
    """``MatryoshkaLoss(model, inner, dims, weights, n_dims_per_step)``; ``n_dims_per_step`` only from 2.5.0."""
    kwargs: dict[str, Any] = {"matryoshka_dims": list(dims), "matryoshka_weights": weights}
    if MATRYOSHKA_HAS_NDPS:
        kwargs["n_dims_per_step"] = n_dims_per_step
    elif n_dims_per_step != -1:
        raise LookupError(f"MatryoshkaLoss of {ST_RELEASE} has no n_dims_per_step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3.1-3.3 warn "not compatible"
        return LOSSES.MatryoshkaLoss(model, inner, **kwargs)


def per_column_forwards():
    """Context in which non-cached losses embed one column per forward, like GradCache does.

    From 6.0 non-cached losses merge the candidate columns into one forward pass
    (``base.losses.merged_forward``); with dropout on, that draws different masks than GradCache's
    per-column forwards, so the "same seed, same gradients" check disables merging (6.x API:
    ``column_merging_disabled``). Earlier releases always embed per column.
    """
    try:
        module = importlib.import_module("sentence_transformers.base.losses.merged_forward")
    except ImportError:
        return contextlib.nullcontext()
    return module.column_merging_disabled()


def tokenize(model, texts: list[str]) -> dict:
    """Tokenised model input: ``preprocess`` where it exists (5.4+, ``tokenize`` deprecated in 6.x)."""
    fn = getattr(model, "preprocess", None) or model.tokenize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(fn(texts))


def build_sentence_transformer(model_dir: str, width: int):
    """``SentenceTransformer(modules=[Transformer(dir), Pooling(width, mean)])`` on any release."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = MODELS.Transformer(model_dir)
        pooling = MODELS.Pooling(width, pooling_mode="mean")
        return sentence_transformers.SentenceTransformer(modules=[transformer, pooling], device="cpu")

"""MatryoshkaLoss around the other losses of the shared GradCache engine (5.7+) against the oracle.

Why: from 5.7.0 (PR #3862) every cached loss runs on one engine (``base/losses/gradcache.py``), and two
more ways into it exist that the equivalence checks do not reach: ``MegaBatchMarginLoss`` in its
mini-batched mode (``use_mini_batched_version=True``) is a GradCache loss, truncated by MatryoshkaLoss
in its ``calculate_loss(reps, ..., with_backward=...)``; and ``mini_batch_num_tokens`` packs the
embedding mini-batches by token count instead of by ``mini_batch_size`` rows. Both must train exactly
like the math: loss value and every parameter gradient at the float64 tolerance, and the same value
under torch.no_grad(). The oracle's MegaBatchMarginLoss is written from the loss's definition
(``oracle.megabatch_margin``), never from ST's code.

Gated by capability: before 5.7.0 the mini-batched MegaBatchMarginLoss is no GradCache loss and not
the batch loss (it returns the last mini-batch's mean and drops every other mini-batch's gradient), and
no cached loss takes ``mini_batch_num_tokens``; there these checks are skipped, and
``test_megabatch_mini_batched_refused_or_right`` requires MatryoshkaLoss to refuse that mode clearly
or, failing that, to train like the math.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from conformance import compat, oracle, oracle_layers
from conformance.harness import call_loss, st_loss_and_grads
from conformance.oracle import InnerSpec, MatryoshkaSpec
from conformance.oracle_layers import LayerSpec
from conformance.recording import assert_close_recorded

MEGABATCH = compat.loss_class("MegaBatchMarginLoss")
CMNRL = compat.loss_class("CachedMultipleNegativesRankingLoss")


def _has_param(fn, name: str) -> bool:
    return fn is not None and name in inspect.signature(fn).parameters


#: The mini-batched MegaBatchMarginLoss is a GradCache loss with a with_backward loss stage (5.7.0+).
MEGABATCH_GRADCACHE = MEGABATCH is not None and _has_param(getattr(MEGABATCH, "calculate_loss", None), "with_backward")
#: Token-budget mini-batches (5.7.0+).
TOKEN_BUDGET = _has_param(getattr(CMNRL, "__init__", None), "mini_batch_num_tokens")

#: The tiny model's embeddings are close (cosine 0.86-1.0): a positive margin of 0.96 leaves the positive
#: hinge active for some pairs and not for others at every width; the negative hinge is always active.
MEGABATCH_SPEC = InnerSpec(kind="megabatch", positive_margin=0.96, negative_margin=0.3)
MNRL_SPEC = InnerSpec(kind="mnrl")
MINI_BATCH = 5
#: Small enough that a mini-batch holds 2-4 of the 13 rows (the sentences are 3-8 words long).
TOKEN_BUDGET_SIZE = 24

MATRYOSHKA = {
    "dims8_32_16-w1_0.5_2": MatryoshkaSpec(dims=(8, 32, 16), weights=(1.0, 0.5, 2.0), seed=5),
    "dims32_16_8_4-ndps2": MatryoshkaSpec(dims=(32, 16, 8, 4), n_dims_per_step=2, seed=0),
}


def _megabatch(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MEGABATCH(
            model,
            positive_margin=MEGABATCH_SPEC.positive_margin,
            negative_margin=MEGABATCH_SPEC.negative_margin,
            use_mini_batched_version=True,
            mini_batch_size=MINI_BATCH,
            **kwargs,
        )


def _cmnrl(model, **kwargs):
    return CMNRL(model, scale=MNRL_SPEC.scale, mini_batch_size=MINI_BATCH, **kwargs)


def _matryoshka(model, inner, mat: MatryoshkaSpec):
    return compat.matryoshka_loss(
        model, inner, mat.dims, list(mat.weights) if mat.weights else None, mat.n_dims_per_step
    )


def _check(model, features, loss_fn, spec: InnerSpec, mat: MatryoshkaSpec | None, what: str) -> None:
    ref_value, ref_grads = oracle.reference(model, features, spec, mat)
    value, grads = st_loss_and_grads(model, loss_fn, features, seed=mat.seed if mat else None, what=what)
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients", **compat.CACHED_GRAD_TOL)


needs_megabatch = pytest.mark.skipif(not MEGABATCH_GRADCACHE, reason="no GradCache MegaBatchMarginLoss (5.7.0+)")
needs_token_budget = pytest.mark.skipif(not TOKEN_BUDGET, reason="no mini_batch_num_tokens (5.7.0+)")


@needs_megabatch
def test_megabatch_terms_are_active(model, feats):
    """Control: with these margins and data both hinge terms are non-zero for a quarter of the pairs or more
    at every width, so the checks below see the gradient of each term (a hinge stuck at zero proves nothing)."""
    embs = oracle.embed(model, feats(2), grad=False)
    for dim in (32, 16, 8, 4):
        a, p = (oracle.truncate(e, dim) for e in embs)
        cos = oracle._sim(a, p, "cos")
        hardest = cos.masked_fill(torch.eye(len(a), dtype=torch.bool), float("-inf")).max(dim=1).values
        assert (cos.diagonal() < MEGABATCH_SPEC.positive_margin).sum() >= len(a) // 4, dim
        assert (hardest > MEGABATCH_SPEC.negative_margin).sum() >= len(a) // 4, dim


@needs_megabatch
def test_megabatch_alone_vs_reference(model, feats):
    """Control: the mini-batched MegaBatchMarginLoss alone is the formula (a failure below is then MatryoshkaLoss's)."""
    _check(model, feats(2), _megabatch(model), MEGABATCH_SPEC, None, "MegaBatchMarginLoss")


@needs_megabatch
@pytest.mark.parametrize("label", MATRYOSHKA)
def test_megabatch_matryoshka_vs_reference(label, model, feats):
    mat = MATRYOSHKA[label]
    loss_fn = _matryoshka(model, _megabatch(model), mat)
    _check(model, feats(2), loss_fn, MEGABATCH_SPEC, mat, "MatryoshkaLoss(MegaBatchMarginLoss)")


@needs_megabatch
def test_megabatch_matryoshka_no_grad_value(model, feats):
    """Evaluation: under torch.no_grad() the same value."""
    mat = MATRYOSHKA["dims8_32_16-w1_0.5_2"]
    features = feats(2)
    ref_value, _ = oracle.reference(model, features, MEGABATCH_SPEC, mat)
    loss_fn = _matryoshka(model, _megabatch(model), mat)
    with torch.no_grad():
        value = call_loss(loss_fn, features, seed=mat.seed, what="MatryoshkaLoss(MegaBatchMarginLoss) under no_grad")
    assert_close_recorded(value, ref_value, what="loss value under no_grad")


@needs_token_budget
@pytest.mark.parametrize("inner", ["CMNRL", "MegaBatch"])
def test_token_budget_matryoshka_vs_reference(inner, model, feats):
    """``mini_batch_num_tokens``: mini-batches packed by token count give the same loss and gradients."""
    mat = MATRYOSHKA["dims8_32_16-w1_0.5_2"]
    if inner == "MegaBatch":
        if not MEGABATCH_GRADCACHE:
            pytest.skip("no GradCache MegaBatchMarginLoss")
        columns, spec, loss = 2, MEGABATCH_SPEC, _megabatch(model, mini_batch_num_tokens=TOKEN_BUDGET_SIZE)
    else:
        columns, spec, loss = 3, MNRL_SPEC, _cmnrl(model, mini_batch_num_tokens=TOKEN_BUDGET_SIZE)
    _check(model, feats(columns), _matryoshka(model, loss, mat), spec, mat, f"MatryoshkaLoss({inner}, token budget)")


@pytest.mark.skipif(MEGABATCH is None or MEGABATCH_GRADCACHE, reason="the mini-batched mode is a GradCache loss")
def test_megabatch_mini_batched_refused_or_right(model, feats):
    """Before 5.7.0: MatryoshkaLoss around the mini-batched MegaBatchMarginLoss either refuses it with a
    ValueError naming ``use_mini_batched_version`` or trains exactly like the oracle."""
    mat = MATRYOSHKA["dims8_32_16-w1_0.5_2"]
    try:
        loss_fn = _matryoshka(model, _megabatch(model), mat)
    except ValueError as exc:
        assert "use_mini_batched_version=False" in str(exc), str(exc)
        return
    _check(model, feats(2), loss_fn, MEGABATCH_SPEC, mat, "MatryoshkaLoss(MegaBatchMarginLoss mini-batched)")


@pytest.mark.skipif(MEGABATCH is None, reason="no MegaBatchMarginLoss")
def test_megabatch_full_batch_matryoshka_vs_reference(model, feats):
    """The full-batch mode (what the refusal above recommends) trains like the oracle on every release."""
    mat = MATRYOSHKA["dims8_32_16-w1_0.5_2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = MEGABATCH(
            model,
            positive_margin=MEGABATCH_SPEC.positive_margin,
            negative_margin=MEGABATCH_SPEC.negative_margin,
            use_mini_batched_version=False,
        )
    _check(model, feats(2), _matryoshka(model, inner, mat), MEGABATCH_SPEC, mat, "MatryoshkaLoss(MegaBatchMarginLoss)")


@needs_megabatch
@pytest.mark.skipif(not compat.CHECK_2D_CACHED, reason=f"no layer cache in {compat.ST_RELEASE} ({compat.STATE})")
@pytest.mark.parametrize("wrapper", ["AdaptiveLayerLoss", "Matryoshka2dLoss"])
def test_megabatch_2d_vs_reference(wrapper, deep_model, feats):
    """The mini-batched MegaBatchMarginLoss inside AdaptiveLayerLoss / Matryoshka2dLoss (the layer cache drives
    its ``calculate_loss(reps, ..., with_backward=True)``): value and every gradient as the layer oracle's."""
    lay = LayerSpec(n_layers_per_step=2, **compat.adaptive_semantics(), seed=11)
    features = feats(2)
    if wrapper == "Matryoshka2dLoss":
        mat = MatryoshkaSpec(dims=(32, 16, 8), n_dims_per_step=1)
        loss_fn = compat.matryoshka_2d_loss(deep_model, _megabatch(deep_model), mat.dims, None, 1, n_layers_per_step=2)
    else:
        mat = None
        loss_fn = compat.adaptive_layer_loss(deep_model, _megabatch(deep_model), n_layers_per_step=2)
    ref_value, ref_grads = oracle_layers.reference(deep_model, features, MEGABATCH_SPEC, mat, lay)
    value, grads = st_loss_and_grads(
        deep_model, loss_fn, features, seed=lay.seed, what=f"{wrapper}(MegaBatchMarginLoss)"
    )
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients", **compat.CACHED_GRAD_TOL)

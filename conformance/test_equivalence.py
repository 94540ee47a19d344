"""MatryoshkaLoss(cached) and MatryoshkaLoss(non-cached) against the float64 oracle.

Why both against the oracle rather than against each other: ST's non-cached path is itself wrong for
GIST through 5.6 (registry: noncached-gist-matryoshka), so "cached == non-cached" would certify a
wrong answer. Loss value and every parameter gradient must match at rtol 1e-7 / atol 1e-9.
"""

from __future__ import annotations

import pytest

from conformance import cases, compat, oracle
from conformance.harness import st_loss_and_grads
from conformance.recording import F64, assert_close_recorded


def _check(case: cases.Case, model, guide, feats, reference_cache, grad_tol=None) -> None:
    features = feats(case.columns)
    key = case.reference_key()
    if key not in reference_cache:
        reference_cache[key] = oracle.reference(model, features, case.inner_spec(), case.matryoshka_spec(), guide)
    ref_value, ref_grads = reference_cache[key]
    loss = case.st_loss(model, guide)
    value, grads = st_loss_and_grads(model, loss, features, seed=case.seed, what=f"MatryoshkaLoss({case.name})")
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients", **(grad_tol or F64))


@pytest.mark.parametrize("case", cases.equivalence_cases(cached=True), ids=lambda c: c.id)
def test_cached_vs_reference(case, model, guide, feats, reference_cache):
    _check(case, model, guide, feats, reference_cache, grad_tol=compat.CACHED_GRAD_TOL)


def test_cached_grads_float64_precision(model, guide, feats, reference_cache):
    """Cached gradients keep float64 precision (no float32 step in the GradCache surrogate)."""
    _check(cases.base_case("mnrl", mini_batch_size=13), model, guide, feats, reference_cache)


@pytest.mark.parametrize("case", cases.equivalence_cases(cached=False), ids=lambda c: c.id)
def test_noncached_vs_reference(case, model, guide, feats, reference_cache):
    _check(case, model, guide, feats, reference_cache)

"""MatryoshkaLoss(cached) and MatryoshkaLoss(non-cached) against the float64 oracle.

Why both against the oracle rather than against each other: ST's non-cached path is itself wrong for
GIST through 5.6 (registry: noncached-gist-matryoshka), so "cached == non-cached" would certify a
wrong answer. Loss value and every parameter gradient must match at rtol 1e-7 / atol 1e-9.

Where a series adds the shared multi-width loss stage (``_matryoshka_shared``), the cached checks run
twice: as the package runs by default (the built-in losses must take the shared path) and with the
generic per-width path forced.
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
    runs = compat.shared_runs()
    _check(case, model, guide, feats, reference_cache, grad_tol=compat.CACHED_GRAD_TOL)
    if compat.expects_shared(case.kind):
        assert compat.shared_runs() > runs, "the built-in cached loss did not take the shared multi-width path"


@pytest.mark.parametrize(
    "case", cases.equivalence_cases(cached=True) if compat.SHARED is not None else [], ids=lambda c: c.id
)
def test_cached_generic_path_vs_reference(case, model, guide, feats, reference_cache):
    """Where a series adds the shared multi-width loss stage: its generic per-width path, forced, is exact too."""
    with compat.generic_path():
        runs = compat.shared_runs()
        _check(case, model, guide, feats, reference_cache, grad_tol=compat.CACHED_GRAD_TOL)
        assert compat.shared_runs() == runs, "the shared path ran although the generic path was forced"


def test_cached_grads_float64_precision(model, guide, feats, reference_cache):
    """Cached gradients keep float64 precision (no float32 step in the GradCache surrogate)."""
    _check(cases.base_case("mnrl", mini_batch_size=13), model, guide, feats, reference_cache)


@pytest.mark.parametrize("case", cases.equivalence_cases(cached=False), ids=lambda c: c.id)
def test_noncached_vs_reference(case, model, guide, feats, reference_cache):
    _check(case, model, guide, feats, reference_cache)

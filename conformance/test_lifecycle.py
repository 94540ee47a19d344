"""How MatryoshkaLoss(cached loss) behaves over its life, not just in one forward+backward.

Why: the GradCache protocol splits one step across forward, a loss-stage backward and a backward
hook that re-embeds later; state kept on the loss object or monkey-patched onto the model between
those moments is where upstream broke (two forwards before one backward, re-wrapping the same inner
loss, a decorator that stays on after an exception, gradient accumulation scaling). Each check uses
the base case (dims 8/32/16 unsorted, weights 1/0.5/2, 3 columns, mini-batch 5 of 13) against the
oracle.
"""

from __future__ import annotations

import random

import pytest
import torch

from conformance import cases, compat, oracle
from conformance.harness import backward, call_loss, instance_state, st_loss_and_grads
from conformance.recording import assert_close_recorded

KINDS = [pytest.param(k, id=compat.SHORT[k]) for k in compat.CACHED_KINDS]
TOL = compat.CACHED_GRAD_TOL


def _reference(case, model, guide, features, reference_cache, batch="A", mat=True):
    key = case.reference_key(batch) if mat else ("plain", case.inner_spec(), case.columns, batch)
    if key not in reference_cache:
        spec = case.matryoshka_spec() if mat else None
        reference_cache[key] = oracle.reference(model, features, case.inner_spec(), spec, guide)
    return reference_cache[key]


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_value(kind, model, guide, feats, reference_cache):
    """Evaluation: the loss under torch.no_grad() is the same value (and builds no graph)."""
    case = cases.base_case(kind)
    features = feats(case.columns)
    ref_value, _ = _reference(case, model, guide, features, reference_cache)
    loss_fn = case.st_loss(model, guide)
    with torch.no_grad():
        value = call_loss(loss_fn, features, seed=case.seed, what=f"MatryoshkaLoss({case.name}) under no_grad")
    assert_close_recorded(value, ref_value, what="loss value under no_grad")
    assert not value.requires_grad, "a loss computed under no_grad must not require grad"


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_backward(kind, model, guide, feats, reference_cache):
    """Gradient accumulation / loss scaling: (c * loss).backward() gives c x the gradients."""
    case = cases.base_case(kind)
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, guide, features, reference_cache)
    c = 0.25
    value, grads = st_loss_and_grads(model, case.st_loss(model, guide), features, seed=case.seed, what=case.id, scale=c)
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, {k: c * g for k, g in ref_grads.items()}, what=f"gradients of {c} * loss", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_two_forwards_then_backwards(kind, model, guide, feats, reference_cache):
    """loss_A = L(A); loss_B = L(B); loss_A.backward(); loss_B.backward(): each gets its own gradients."""
    case = cases.base_case(kind)
    feats_a, feats_b = feats(case.columns, "A"), feats(case.columns, "B")
    ref_a = _reference(case, model, guide, feats_a, reference_cache, "A")
    ref_b = _reference(case, model, guide, feats_b, reference_cache, "B")
    loss_fn = case.st_loss(model, guide)
    model.zero_grad(set_to_none=True)
    loss_a = call_loss(loss_fn, feats_a, seed=case.seed, what=f"{case.id} forward A")
    loss_b = call_loss(loss_fn, feats_b, seed=case.seed, what=f"{case.id} forward B")
    backward(loss_a, what=f"{case.id} backward A (after forward B)")
    grads_a = oracle.parameter_grads(model)
    model.zero_grad(set_to_none=True)
    backward(loss_b, what=f"{case.id} backward B")
    grads_b = oracle.parameter_grads(model)
    assert_close_recorded(loss_a.detach(), ref_a[0], what="loss A")
    assert_close_recorded(loss_b.detach(), ref_b[0], what="loss B")
    assert_close_recorded(grads_a, ref_a[1], what="gradients of A, backward after forward B", **TOL)
    assert_close_recorded(grads_b, ref_b[1], what="gradients of B", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_same_inner_wrapped_twice(kind, model, guide, feats, reference_cache):
    """Re-running a notebook cell: a second MatryoshkaLoss around the same inner loss behaves like the first."""
    case = cases.base_case(kind)
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, guide, features, reference_cache)
    inner = case.inner_loss(model, guide)
    case.st_loss(model, guide, inner)
    try:
        second = case.st_loss(model, guide, inner)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"second MatryoshkaLoss around the same {case.name}: constructor raised {exc!r}", pytrace=False)
    value, grads = st_loss_and_grads(
        model, second, features, seed=case.seed, what=f"second MatryoshkaLoss({case.name})"
    )
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="gradients", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_alone_afterwards(kind, model, guide, feats, reference_cache):
    """After MatryoshkaLoss used it, the inner loss on its own is the plain inner loss again."""
    case = cases.base_case(kind)
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, guide, features, reference_cache, mat=False)
    inner = case.inner_loss(model, guide)
    st_loss_and_grads(model, case.st_loss(model, guide, inner), features, seed=case.seed, what=case.id)
    value, grads = st_loss_and_grads(model, inner, features, seed=case.seed, what=f"{case.name} alone afterwards")
    assert_close_recorded(value, ref_value, what="loss value of the inner loss alone")
    assert_close_recorded(grads, ref_grads, what="gradients of the inner loss alone", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_error_in_loss_restores_state(kind, model, guide, feats, reference_cache):
    """An exception inside the loss (a 5-row positive column against 13 anchors) leaves model.forward and
    the inner loss as they were, and the same MatryoshkaLoss then works on a good batch."""
    case = cases.base_case(kind, columns=2)
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, guide, features, reference_cache)
    loss_fn = case.st_loss(model, guide)
    model_before, inner_before = instance_state(model), instance_state(loss_fn.loss)
    ragged = [features[0], {k: (v[:5] if torch.is_tensor(v) else v) for k, v in features[1].items()}]
    random.seed(case.seed)
    with pytest.raises(Exception) as info:  # noqa: B017 - any error; what matters is the state afterwards
        loss_fn([dict(f) for f in ragged], None).backward()
    assert instance_state(model) == model_before, f"model attributes changed by the failed call ({info.type.__name__})"
    assert instance_state(loss_fn.loss) == inner_before, "inner loss attributes changed by the failed call"
    value, grads = st_loss_and_grads(model, loss_fn, features, seed=case.seed, what=f"{case.id} after an error")
    assert_close_recorded(value, ref_value, what="loss value after an error")
    assert_close_recorded(grads, ref_grads, what="gradients after an error", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_too_large_dim_restores_state(kind, model, guide, feats, reference_cache):
    """dims larger than the width raise ValueError (at construction or in the loss); afterwards the model and
    the inner loss are unchanged and a valid MatryoshkaLoss on the same model matches the oracle."""
    case = cases.base_case(kind)
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, guide, features, reference_cache)
    inner = case.inner_loss(model, guide)
    model_before, inner_before = instance_state(model), instance_state(inner)
    with pytest.raises(ValueError):
        bad = compat.matryoshka_loss(model, inner, [64, 32])
        inner_before = instance_state(inner)  # constructed: the loss may legitimately set itself up
        random.seed(case.seed)
        bad([dict(f) for f in features], None).backward()
    assert instance_state(model) == model_before, "model attributes changed by the failed call"
    assert instance_state(inner) == inner_before, "inner loss attributes changed by the failed call"
    value, grads = st_loss_and_grads(model, case.st_loss(model, guide), features, seed=case.seed, what=case.id)
    assert_close_recorded(value, ref_value, what="loss value of a fresh loss on the same model")
    assert_close_recorded(grads, ref_grads, what="gradients of a fresh loss on the same model", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_same_seed_matches_noncached(kind, dropout_model, guide, feats):
    """Dropout on, same torch seed, one mini-batch covering the batch: cached == non-cached (same masks:
    GradCache replays the RNG state, and both embed the columns in the same order)."""
    cached = cases.base_case(kind, mini_batch_size=32)
    plain = cases.base_case(kind, cached=False)
    features = feats(cached.columns)
    results = {}
    for case in (plain, cached):
        torch.manual_seed(1234)
        with compat.per_column_forwards():  # 6.x merges non-cached columns into one forward by default
            results[case.cached] = st_loss_and_grads(
                dropout_model,
                case.st_loss(dropout_model, guide),
                features,
                seed=case.seed,
                what=f"{case.id} with dropout",
            )
    torch.manual_seed(1234)
    ref_value, ref_grads = oracle.reference(
        dropout_model, features, cached.inner_spec(), cached.matryoshka_spec(), guide
    )
    assert_close_recorded(results[True][0], results[False][0], what="cached vs non-cached loss with dropout")
    assert_close_recorded(results[True][1], results[False][1], what="cached vs non-cached gradients", **TOL)
    # The reference embeds in the same order with the same seed, so it sees the same dropout masks too.
    assert_close_recorded(results[True][1], ref_grads, what="cached vs seeded reference", **TOL)

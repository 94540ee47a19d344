"""MatryoshkaLoss around a user's own GradCache loss (conformance/protocol_losses.py) against the oracle.

Why: the patch series detects a GradCache loss by what it does, not by its class, so a loss that
follows the protocol in any of its loss-stage styles (``self.cache`` set by the caching stage, a
``calculate_loss(reps, with_backward=True)`` inside it, ``rep.grad`` read by the hook, or only
``calculate_loss``) must train exactly like the math: loss value and every parameter gradient at the
float64 tolerance. The user's loss alone is checked too, so that a failure is MatryoshkaLoss's. A
GradCache loss without a loss stage MatryoshkaLoss can truncate in must get a clear ValueError naming
the loss and the missing method - not a crash inside autograd.
"""

from __future__ import annotations

import random

import pytest
import torch

from conformance import cases, compat, oracle, protocol_losses
from conformance.harness import _describe, call_loss, st_loss_and_grads
from conformance.recording import assert_close_recorded

STYLES = list(protocol_losses.STYLES)


def _cases() -> list[cases.Case]:
    out = [cases.base_case("mnrl", label="dims8_32_16-w1_0.5_2")]
    if compat.MATRYOSHKA_HAS_NDPS:
        out.append(
            cases.base_case(
                "mnrl", dims=(32, 16, 8, 4), weights=None, seed=0, n_dims_per_step=2, label="dims32_16_8_4-ndps2"
            )
        )
    return out


def _reference(case, model, features, reference_cache, mat=True):
    key = case.reference_key() if mat else ("plain", case.inner_spec(), case.columns, "A")
    if key not in reference_cache:
        spec = case.matryoshka_spec() if mat else None
        reference_cache[key] = oracle.reference(model, features, case.inner_spec(), spec)
    return reference_cache[key]


def _user_loss(style: str, model, case: cases.Case):
    return protocol_losses.STYLES[style](model, mini_batch_size=case.mini_batch_size, scale=case.inner_spec().scale)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.label)
@pytest.mark.parametrize("style", STYLES)
def test_protocol_loss_vs_reference(style, case, model, feats, reference_cache):
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, features, reference_cache)
    loss_fn = case.st_loss(model, inner=_user_loss(style, model, case))
    what = f"MatryoshkaLoss({protocol_losses.STYLES[style].__name__})"
    runs = compat.shared_runs()
    value, grads = st_loss_and_grads(model, loss_fn, features, seed=case.seed, what=what)
    assert compat.shared_runs() == runs, "a user's loss took the shared multi-width path (built-in losses only)"
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients")


@pytest.mark.parametrize("style", STYLES)
def test_protocol_loss_no_grad_value(style, model, feats, reference_cache):
    """Evaluation: under torch.no_grad() the same value, through the loss's no-gradient stage."""
    case = cases.base_case("mnrl")
    features = feats(case.columns)
    ref_value, _ = _reference(case, model, features, reference_cache)
    loss_fn = case.st_loss(model, inner=_user_loss(style, model, case))
    with torch.no_grad():
        value = call_loss(loss_fn, features, seed=case.seed, what=f"MatryoshkaLoss({style}) under no_grad")
    assert_close_recorded(value, ref_value, what="loss value under no_grad")


@pytest.mark.parametrize("style", STYLES)
def test_protocol_loss_alone_vs_reference(style, model, feats, reference_cache):
    """Control: the user's loss on its own is MNRL (a failure above is then MatryoshkaLoss's)."""
    case = cases.base_case("mnrl")
    features = feats(case.columns)
    ref_value, ref_grads = _reference(case, model, features, reference_cache, mat=False)
    value, grads = st_loss_and_grads(model, _user_loss(style, model, case), features, seed=None, what=style)
    assert_close_recorded(value, ref_value, what="loss value of the user's loss alone")
    assert_close_recorded(grads, ref_grads, what="gradients of the user's loss alone")


def test_protocol_loss_without_loss_stage_raises_clear_error(model, feats):
    """A GradCache loss without calculate_loss_and_cache_gradients / calculate_loss(with_backward): a
    ValueError naming the loss and the missing method (at construction or in the first step)."""
    case = cases.base_case("mnrl")
    features = feats(case.columns)
    inner = protocol_losses.NoLossStage(model, mini_batch_size=case.mini_batch_size)
    try:
        loss_fn = case.st_loss(model, inner=inner)
        random.seed(case.seed)
        loss_fn([dict(f) for f in features], None).backward()
    except ValueError as exc:
        message = str(exc)
        for word in (type(inner).__name__, inner.missing):
            assert word in message, f"the ValueError does not name {word!r}: {message!r}"
        return
    except Exception as exc:  # noqa: BLE001 - any other crash is the finding
        pytest.fail(f"{type(inner).__name__}: {_describe(exc)} instead of a clear ValueError", pytrace=False)
    pytest.fail(f"MatryoshkaLoss({type(inner).__name__}) trained without an error", pytrace=False)

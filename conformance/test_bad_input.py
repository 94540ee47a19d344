"""Bad MatryoshkaLoss arguments must give a clear error, not a silently different loss.

Why: upstream slices ``emb[..., :d]``, so a negative dim silently trains ``width + d`` components,
dim 0 trains a constant loss, ``zip`` silently drops dims when the weights list is shorter, and
``n_dims_per_step`` 0 or below -1 silently means "all dims".
"Clear" = a ValueError (at construction or at the first step) whose message names the offending
argument. Where a release cannot or does not validate, the registry records it.
"""

from __future__ import annotations

import random

import pytest

from conformance import cases, compat

BAD = {
    "dims-too-large": dict(dims=[64, 32]),
    "dims-empty": dict(dims=[]),
    "dims-zero": dict(dims=[32, 0]),
    "dims-negative": dict(dims=[32, -4]),
    "weights-wrong-length": dict(dims=[32, 16], weights=[1.0]),
    "n_dims_per_step-zero": dict(dims=[32, 16], n_dims_per_step=0),
    "n_dims_per_step-negative": dict(dims=[32, 16], n_dims_per_step=-2),  # only -1 means "all dims"
}
WORDS_IN_A_CLEAR_MESSAGE = ("dim", "weight", "n_dims_per_step")

LOSSES = [pytest.param(True, id="CMNRL"), pytest.param(False, id="MNRL")]


@pytest.mark.parametrize("cached", LOSSES)
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_arguments_raise_clear_error(bad, cached, model, feats):
    args = {"weights": None, "n_dims_per_step": -1, **BAD[bad]}
    if args["n_dims_per_step"] != -1 and not compat.MATRYOSHKA_HAS_NDPS:
        pytest.skip(f"MatryoshkaLoss of {compat.ST_RELEASE} has no n_dims_per_step")
    case = cases.base_case("mnrl", cached=cached)
    features = feats(case.columns)
    try:
        loss_fn = compat.matryoshka_loss(
            model, case.inner_loss(model), args["dims"], args["weights"], args["n_dims_per_step"]
        )
        random.seed(0)
        loss_fn([dict(f) for f in features], None).backward()
    except ValueError as exc:
        message = str(exc)
        assert any(w in message.lower() for w in WORDS_IN_A_CLEAR_MESSAGE), (
            f"ValueError without a clear message: {message!r}"
        )
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{bad}: {type(exc).__name__} instead of a clear ValueError: {exc}", pytrace=False)
    pytest.fail(f"{bad}: accepted silently ({args})", pytrace=False)

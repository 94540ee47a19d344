"""Independent float64 reference for AdaptiveLayerLoss and Matryoshka2dLoss (2D Matryoshka).

Why a reference of its own: the 2D losses train every sampled prior layer of the transformer with the
inner loss (optionally through MatryoshkaLoss) plus a KL term that pulls each prior layer towards the
final one. Upstream obtains the layers by decorating the transformer's forward; a gradient-cache
loss re-embeds after those decorators are gone. This module writes the loss from its definition:

    L = w_last * M(final) + sum_{l in S} [ w_prior * c(l) / |S| * M(layer_l) + w_kl * T * KL_l ]
    KL_l = (1/R) * sum_rows sum_j p_j (log p_j - log q_j),  p = softmax(final / T), q = softmax(layer_l / T)

where M is the inner loss (or sum_d w_d * inner(truncate(., d)) for the Matryoshka variants), R the
number of rows of all columns together, c(l) the layer weighting and S the prior layers of the step.

Layer embeddings come from ONE forward of the Hugging Face model with ``output_hidden_states`` and a
mean pooling written here (never ST's Pooling or an ST loss). Release semantics arrive as plain
fields of :class:`LayerSpec`; ``compat.adaptive_semantics`` decides them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from conformance.oracle import InnerSpec, MatryoshkaSpec, embed, inner_loss, parameter_grads, truncate

HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class LayerSpec:
    """AdaptiveLayerLoss's parameters and the release's layer semantics.

    ``first_prior``: the hidden state of prior layer index 0 (1 = output of the first transformer
    layer, releases before 5.2.0; 0 = the embedding layer output, 5.2.0+). ``teacher_grad``: whether
    the KL target (the final layer) carries a gradient (releases before 5.7.0, upstream #3757).
    """

    n_layers_per_step: int = 1
    last_layer_weight: float = 1.0
    prior_layers_weight: float = 1.0
    kl_div_weight: float = 1.0
    kl_temperature: float = 0.3
    layer_weighting: str = "linear"  # "linear" (1/(1+i)), "log" (1/(1+ln(1+i))), "uniform" (1)
    first_prior: int = 1
    teacher_grad: bool = False
    seed: int | None = None  # the seed given to `random.seed` right before the ST call

    def weight(self, index: int) -> float:
        """c(i): how much prior layer index ``i`` counts before averaging over the sampled layers."""
        if self.layer_weighting == "linear":
            return 1.0 / (1.0 + index)
        if self.layer_weighting == "log":
            return 1.0 / (1.0 + math.log(1.0 + index))
        if self.layer_weighting == "uniform":
            return 1.0
        raise ValueError(f"unknown layer weighting {self.layer_weighting!r}")

    def prior_indices(self, n_transformer_layers: int, rng: random.Random) -> list[int]:
        """The prior layer indices of one step: all of them, or ``random.sample`` of them in draw order."""
        count = n_transformer_layers - self.first_prior
        indices: Sequence[int] = range(count)
        if 0 < self.n_layers_per_step < count:
            indices = rng.sample(indices, self.n_layers_per_step)
        return list(indices)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token vectors that the attention mask keeps, in float64."""
    mask = attention_mask.unsqueeze(-1).to(torch.float64)
    return (hidden.to(torch.float64) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def layer_embeddings(model, features: Sequence[dict]) -> list[Tensor]:
    """Per column: ``[n_layers + 1, batch, width]``, the pooled hidden state of every layer (index 0 =
    embedding output, -1 = final layer), from one forward with hidden states, with grad."""
    auto_model = model[0].auto_model
    out = []
    for f in features:
        inputs = {k: f[k] for k in HF_INPUTS if k in f}
        hidden = auto_model(**inputs, output_hidden_states=True, return_dict=True).hidden_states
        out.append(torch.stack([mean_pool(h, f["attention_mask"]) for h in hidden]))
    return out


def kl_to_teacher(layer: Sequence[Tensor], teacher_log_p: Tensor, temperature: float) -> Tensor:
    """KL(p || q) per row, averaged over all rows of all columns (rows stacked column after column)."""
    log_q = torch.log_softmax(torch.cat(list(layer), dim=0) / temperature, dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - log_q)).sum() / log_q.shape[0]


def _term(embs, spec: InnerSpec, mat: MatryoshkaSpec | None, rng: random.Random, guide_embs, terms: dict) -> Tensor:
    """The wrapped loss on one layer's embeddings; with MatryoshkaLoss its own width sample from ``rng``.
    ``terms``: width (None without MatryoshkaLoss) -> its unweighted loss, filled here."""
    if mat is None:
        terms[None] = inner_loss(embs, spec, guide_embs)
        return terms[None]
    total = torch.zeros((), dtype=torch.float64)
    for dim, weight in mat.selected(rng):
        terms[dim] = inner_loss([truncate(e, dim) for e in embs], spec, guide_embs)
        total = total + weight * terms[dim]
    return total


def adaptive_layer(
    layers: Sequence[Tensor],
    spec: InnerSpec,
    mat: MatryoshkaSpec | None,
    lay: LayerSpec,
    guide_embs=None,
    terms: dict | None = None,
) -> Tensor:
    """The 2D loss of one step from every column's layer embeddings (see the module docstring).

    The draws replay upstream's order on one stream seeded like ``random.seed(lay.seed)``: the final
    layer's widths, then the prior layers, then each prior layer's widths in the order drawn.
    ``terms`` (optional) is filled with every term's unweighted loss, keyed (transformer layers the
    embeddings passed through, width): the final layer passes through all of them.
    """
    terms = {} if terms is None else terms
    rng = random.Random(lay.seed)
    final = [c[-1] for c in layers]
    n_layers = layers[0].shape[0] - 1
    widths: dict = {}
    total = lay.last_layer_weight * _term(final, spec, mat, rng, guide_embs, widths)
    terms.update({(n_layers, dim): value.detach() for dim, value in widths.items()})
    priors = lay.prior_indices(n_layers, rng)
    temperature = lay.kl_temperature
    if temperature > 0:
        teacher_log_p = torch.log_softmax(torch.cat(final, dim=0) / temperature, dim=-1)
        if not lay.teacher_grad:
            teacher_log_p = teacher_log_p.detach()
    for index in priors:
        embs = [c[index + lay.first_prior] for c in layers]
        scale = lay.prior_layers_weight * lay.weight(index) / len(priors)
        widths = {}
        total = total + scale * _term(embs, spec, mat, rng, guide_embs, widths)
        terms.update({(index + lay.first_prior, dim): value.detach() for dim, value in widths.items()})
        if temperature > 0:
            total = total + lay.kl_div_weight * temperature * kl_to_teacher(embs, teacher_log_p, temperature)
    return total


def reference(model, features, spec: InnerSpec, mat: MatryoshkaSpec | None, lay: LayerSpec, guide=None):
    """(loss value, parameter gradients) of the 2D reference; leaves the model's .grad cleared."""
    model.zero_grad(set_to_none=True)
    layers = layer_embeddings(model, features)
    guide_embs = embed(guide, features, grad=False) if spec.kind == "gist" else None
    loss = adaptive_layer(layers, spec, mat, lay, guide_embs)
    loss.backward()
    grads = parameter_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def per_term_losses(model, features, spec: InnerSpec, mat: MatryoshkaSpec | None, lay: LayerSpec, guide=None) -> dict:
    """(transformer layers, width) -> unweighted loss of every term of one step (width None without MatryoshkaLoss)."""
    with torch.no_grad():
        layers = layer_embeddings(model, features)
        guide_embs = embed(guide, features, grad=False) if spec.kind == "gist" else None
        terms: dict = {}
        adaptive_layer(layers, spec, mat, lay, guide_embs, terms)
    return terms

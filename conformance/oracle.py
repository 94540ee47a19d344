"""Independent float64 reference for MatryoshkaLoss around (cached) in-batch-negative losses.

Why it exists: the losses under test are compared against formulas written from the math, not
against another ST code path (ST's non-cached path is itself wrong in places, see the registry).
So this module never imports an ST loss class. It only calls the ST *model* forward to obtain
embeddings - the model is not under test - one full-batch forward per input column, with grad.

Everything after the embeddings is computed in float64. Release-specific semantics (GIST masking
rules) arrive as plain parameters in :class:`InnerSpec`; compat.py decides them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class InnerSpec:
    """The inner loss, as math. ``kind``: mnrl | mnsrl | gist | megabatch."""

    kind: Literal["mnrl", "mnsrl", "gist", "megabatch"]
    similarity: Literal["cos", "dot"] = "cos"  # mnrl / mnsrl only; GIST is always cosine
    scale: float = 20.0  # mnrl / mnsrl
    temperature: float = 0.01  # gist
    margin_strategy: Literal["absolute", "relative"] = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    # Release semantics (compat.gist_semantics): whether the ap diagonal is explicitly protected from
    # masking (4.1.0+), and which "relative" rule applies ("scaled": g*(1-m) before 5.6; "abs": g-|g|*m).
    protect_positive: bool = False
    relative_rule: Literal["scaled", "abs"] = "scaled"
    positive_margin: float = 0.8  # megabatch
    negative_margin: float = 0.3  # megabatch
    # MultipleNegativesRankingLoss options (5.3.0+): which score blocks, how they are normalised, hardness.
    directions: tuple[str, ...] = ("query_to_doc",)
    partition_mode: Literal["joint", "per_direction"] = "joint"
    hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None
    hardness_strength: float = 0.0


@dataclass(frozen=True)
class MatryoshkaSpec:
    """Matryoshka dims/weights as the user passes them (any order) and the sampling rule."""

    dims: Sequence[int]
    weights: Sequence[float] | None = None
    n_dims_per_step: int = -1
    sorts_dims: bool = True  # ST >= 3.0.1 sorts descending before sampling
    seed: int | None = None  # the seed given to `random.seed` right before the ST call

    def selected(self, rng: random.Random | None = None) -> list[tuple[int, float]]:
        """(dim, weight) pairs used in one step, replaying upstream's ``random.sample`` on index order.

        ``rng``: the random stream to draw from when the sample is one of several draws of a step
        (AdaptiveLayerLoss samples layers and every layer's widths from the same stream); by default a
        fresh ``random.Random(seed)``.
        """
        weights = list(self.weights) if self.weights is not None else [1.0] * len(self.dims)
        if len(weights) != len(self.dims):
            raise ValueError("matryoshka weights and dims differ in length")
        pairs = list(zip(self.dims, weights))
        if self.sorts_dims:
            pairs.sort(key=lambda p: p[0], reverse=True)
        indices: Sequence[int] = range(len(pairs))
        if 0 < self.n_dims_per_step < len(pairs):
            rng = random.Random(self.seed) if rng is None else rng
            indices = rng.sample(indices, self.n_dims_per_step)
        return [pairs[i] for i in indices]


# ----------------------------------------------------------------------------------------- embeddings


def embed(model, features: Sequence[dict], *, grad: bool = True) -> list[Tensor]:
    """One full-batch forward per column; float64 sentence embeddings (dicts are copied: ST mutates them)."""
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        return [model(dict(f))["sentence_embedding"].to(torch.float64) for f in features]


# ----------------------------------------------------------------------------------------- inner losses


def _sim(x: Tensor, y: Tensor, kind: str) -> Tensor:
    if kind == "cos":
        return F.normalize(x, p=2, dim=-1) @ F.normalize(y, p=2, dim=-1).T
    if kind == "dot":
        return x @ y.T
    raise ValueError(kind)


def _cross_entropy(scores: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -log softmax(scores)[target]; rows may hold -inf (masked) entries."""
    rows = torch.arange(scores.shape[0])
    return -(scores[rows, targets] - torch.logsumexp(scores, dim=1)).mean()


def mnrl(embs: Sequence[Tensor], spec: InnerSpec) -> Tensor:
    """MultipleNegativesRankingLoss: CE over sim(anchor, cat(all other columns)) * scale, label i.

    With the 5.3.0+ options (:func:`mnrl_directions`) where they differ from this default.
    """
    if spec.directions != ("query_to_doc",) or spec.hardness_mode is not None:
        return mnrl_directions(embs, spec)
    anchor, candidates = embs[0], torch.cat(list(embs[1:]), dim=0)
    scores = _sim(anchor, candidates, spec.similarity) * spec.scale
    return _cross_entropy(scores, torch.arange(anchor.shape[0]))


def mnrl_directions(embs: Sequence[Tensor], spec: InnerSpec) -> Tensor:
    """MultipleNegativesRankingLoss with ``directions``, ``partition_mode`` and hardness (5.3.0+), from the
    documented definition. Queries q_i, documents d_j (every document column, n rows each; q_i's own are
    j = i, i + n, ...), positive p_i = d_i, all scores times ``scale``:

    - query_to_doc: s(q_i, d_j); query_to_query: s(q_i, q_j), j != i; doc_to_query: s(p_i, q_j);
      doc_to_doc: s(p_i, d_j) for the documents of the other queries;
    - hardness: ``alpha * stop_grad(s(q_i, d_j))`` added to the query_to_doc scores of the negatives the
      mode names: in_batch_negatives the other queries' documents, hard_negatives q_i's own documents but
      its positive, all_negatives every document but the positive;
    - loss_i = logsumexp over every selected block ("joint"), or the mean over the blocks of each block's
      logsumexp ("per_direction"), minus the positive's score; the loss is the mean over i.
    """
    queries, docs = embs[0], torch.cat(list(embs[1:]), dim=0)
    n = queries.shape[0]
    column = torch.arange(docs.shape[0])
    own = column[None, :] % n == torch.arange(n)[:, None]  # q_i's own documents
    qd = _sim(queries, docs, spec.similarity)
    blocks = {"query_to_doc": qd * spec.scale}
    if spec.hardness_mode is not None and spec.hardness_strength > 0:
        positive = column[None, :] == torch.arange(n)[:, None]
        penalised = {
            "in_batch_negatives": ~own,
            "hard_negatives": own & ~positive,
            "all_negatives": ~positive,
        }[spec.hardness_mode]
        blocks["query_to_doc"] = blocks["query_to_doc"] + spec.hardness_strength * qd.detach() * penalised
    eye = torch.eye(n, dtype=torch.bool)
    if "query_to_query" in spec.directions:
        blocks["query_to_query"] = (_sim(queries, queries, spec.similarity) * spec.scale).masked_fill(eye, -torch.inf)
    if "doc_to_query" in spec.directions:
        blocks["doc_to_query"] = _sim(embs[1], queries, spec.similarity) * spec.scale
    if "doc_to_doc" in spec.directions:
        blocks["doc_to_doc"] = (_sim(embs[1], docs, spec.similarity) * spec.scale).masked_fill(own, -torch.inf)
    positive_score = blocks["query_to_doc"].diagonal()
    if spec.partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(blocks.values()), dim=1), dim=1)
    else:
        log_z = torch.stack([torch.logsumexp(b, dim=1) for b in blocks.values()]).mean(dim=0)
    return (log_z - positive_score).mean()


def mnsrl(embs: Sequence[Tensor], spec: InnerSpec) -> Tensor:
    """MultipleNegativesSymmetricRankingLoss, every release 3.1 - 6.2 (the 5.3 rewrite is the same math):

    0.5 * (CE(sim(a, cat(p, negs)) * scale, i) + CE(sim(a, p)^T * scale, i)),
    the second term ranks all anchors for each positive.
    """
    n = embs[0].shape[0]
    labels = torch.arange(n)
    forward = mnrl(embs, spec)
    ap = _sim(embs[0], embs[1], spec.similarity) * spec.scale
    backward = _cross_entropy(ap.T, labels)
    return 0.5 * (forward + backward)


def _mask_false_negatives(
    sim: Tensor, guide_sim: Tensor, guide_pos: Tensor, spec: InnerSpec, protect: Tensor | None
) -> Tensor:
    """GIST: drop (-inf) candidates the guide finds more similar to the anchor than its own positive."""
    if spec.margin_strategy == "absolute":
        threshold = guide_pos - spec.margin
    elif spec.relative_rule == "scaled":
        threshold = guide_pos * (1 - spec.margin)
    else:
        threshold = guide_pos - guide_pos.abs() * spec.margin
    mask = guide_sim > threshold
    if protect is not None:
        mask = mask & ~protect
    return sim.masked_fill(mask, float("-inf"))


def gist(embs: Sequence[Tensor], guide_embs: Sequence[Tensor], spec: InnerSpec) -> Tensor:
    """GISTEmbedLoss (cosine, / temperature). Blocks: ap, aa, pp (switchable), then one an per extra column.

    Guide embeddings are never truncated: the guide is a separate model.
    """
    a, p = embs[0], embs[1]
    ga, gp = guide_embs[0], guide_embs[1]
    n = a.shape[0]
    guide_ap = _sim(ga, gp, "cos")
    guide_pos = guide_ap.diagonal().view(-1, 1)
    eye = torch.eye(n, dtype=torch.bool)
    blocks = [
        _mask_false_negatives(_sim(a, p, "cos"), guide_ap, guide_pos, spec, eye if spec.protect_positive else None)
    ]
    if spec.contrast_anchors:
        blocks.append(_mask_false_negatives(_sim(a, a, "cos"), _sim(ga, ga, "cos"), guide_pos, spec, None))
    if spec.contrast_positives:
        blocks.append(_mask_false_negatives(_sim(p, p, "cos"), _sim(gp, gp, "cos"), guide_pos, spec, None))
    for neg, gneg in zip(embs[2:], guide_embs[2:]):
        blocks.append(_mask_false_negatives(_sim(a, neg, "cos"), _sim(ga, gneg, "cos"), guide_pos, spec, None))
    scores = torch.cat(blocks, dim=1) / spec.temperature
    return _cross_entropy(scores, torch.arange(n))


def megabatch_margin(embs: Sequence[Tensor], spec: InnerSpec) -> Tensor:
    """MegaBatchMarginLoss (Wieting & Gimpel 2018, ParaNMT-50M), from its definition: pairs (a_i, p_i); the
    hardest negative of pair i is the other pairs' positive most cosine-similar to a_i, and

    loss = mean_i [ relu(m+ - cos(a_i, p_i)) + relu(max_{j != i} cos(a_i, p_j) - m-) ].
    """
    if len(embs) != 2:
        raise ValueError("MegaBatchMarginLoss takes (anchor, positive) pairs")
    a, p = embs
    cos = _sim(a, p, "cos")
    own = torch.eye(cos.shape[0], dtype=torch.bool)
    hardest = cos.masked_fill(own, float("-inf")).max(dim=1).values
    positive_term = F.relu(spec.positive_margin - cos.diagonal())
    negative_term = F.relu(hardest - spec.negative_margin)
    return (positive_term + negative_term).mean()


def inner_loss(embs: Sequence[Tensor], spec: InnerSpec, guide_embs: Sequence[Tensor] | None = None) -> Tensor:
    if spec.kind == "mnrl":
        return mnrl(embs, spec)
    if spec.kind == "mnsrl":
        return mnsrl(embs, spec)
    if spec.kind == "megabatch":
        return megabatch_margin(embs, spec)
    if spec.kind == "gist":
        if guide_embs is None:
            raise ValueError("GIST needs guide embeddings")
        return gist(embs, guide_embs, spec)
    raise ValueError(spec.kind)


# ----------------------------------------------------------------------------------------- matryoshka


def truncate(emb: Tensor, dim: int) -> Tensor:
    """First ``dim`` components, re-normalised to unit length."""
    if not 0 < dim <= emb.shape[-1]:
        raise ValueError(f"matryoshka dim {dim} outside 1..{emb.shape[-1]}")
    return F.normalize(emb[..., :dim], p=2, dim=-1)


def matryoshka(
    embs: Sequence[Tensor], spec: InnerSpec, mat: MatryoshkaSpec | None, guide_embs: Sequence[Tensor] | None = None
) -> Tensor:
    """sum_d w_d * inner(truncate(embs, d)); ``mat=None`` is the plain inner loss (no truncation)."""
    if mat is None:
        return inner_loss(embs, spec, guide_embs)
    total = torch.zeros((), dtype=torch.float64)
    for dim, weight in mat.selected():
        total = total + weight * inner_loss([truncate(e, dim) for e in embs], spec, guide_embs)
    return total


def per_width_terms(
    embs: Sequence[Tensor], spec: InnerSpec, mat: MatryoshkaSpec, guide_embs: Sequence[Tensor] | None = None
) -> dict[int, Tensor]:
    """Each selected width's unweighted term ``inner(truncate(embs, d))``, the summands of :func:`matryoshka`
    before weighting: what MatryoshkaLoss(..., log_per_dim=True) reports per width."""
    return {dim: inner_loss([truncate(e, dim) for e in embs], spec, guide_embs) for dim, _ in mat.selected()}


def reference_loss(model, features: Sequence[dict], spec: InnerSpec, mat: MatryoshkaSpec | None, guide=None) -> Tensor:
    """The reference loss with its graph into ``model``'s parameters (call backward to get gradients)."""
    embs = embed(model, features, grad=True)
    guide_embs = embed(guide, features, grad=False) if spec.kind == "gist" else None
    return matryoshka(embs, spec, mat, guide_embs)


def parameter_grads(model) -> dict[str, Tensor]:
    """name -> float64 gradient; parameters without a gradient count as zero."""
    return {
        name: (
            p.grad.detach().to(torch.float64).clone()
            if p.grad is not None
            else torch.zeros_like(p, dtype=torch.float64)
        )
        for name, p in model.named_parameters()
    }


def reference(model, features, spec: InnerSpec, mat: MatryoshkaSpec | None, guide=None) -> tuple[Tensor, dict]:
    """(loss value, parameter gradients) of the reference; leaves the model's .grad cleared."""
    model.zero_grad(set_to_none=True)
    loss = reference_loss(model, features, spec, mat, guide)
    loss.backward()
    grads = parameter_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads

"""GradCache losses written the way a user writes one: no sentence-transformers loss class involved.

Why: MatryoshkaLoss must drive *any* loss that follows the GradCache protocol, detected by capability
(``embed_minibatch_iter`` / ``calculate_loss_and_cache_gradients`` / ``uses_gradient_cache``), not by
class. Each class is MultipleNegativesRankingLoss (cosine, scale 20, the oracle's "mnrl") with a
gradient cache, in one of the loss-stage styles that exist in the wild:

- ``cache``: ``calculate_loss_and_cache_gradients`` back-propagates per mini-batch and sets ``self.cache``,
  which the backward hook reads (ST 2.4 - 3.3);
- ``with_backward``: ``calculate_loss_and_cache_gradients`` calls ``self.calculate_loss(reps, with_backward=True)``
  and sets ``self.cache`` from ``rep.grad`` (ST 3.4 - 5.6);
- ``rep_grad``: ``calculate_loss_and_cache_gradients`` back-propagates and sets nothing; forward hands the
  hook ``rep.grad`` of its embeddings (the ST 5.7+ engine reads ``rep.grad``);
- ``calculate_loss_only``: no ``calculate_loss_and_cache_gradients``; forward calls
  ``calculate_loss(reps, labels, with_backward=True)`` and reads ``rep.grad`` (the ST 5.7+ engine's shape).

``NoLossStage`` is a GradCache loss whose loss stage has another name: MatryoshkaLoss cannot truncate in
it and must say so (the loss and the missing method), not crash inside autograd.
Nothing here imports sentence-transformers; the model is any module returning ``sentence_embedding``.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _UserGradCacheMNRL(nn.Module):
    """Shared parts: mini-batch embedding, the chunked MNRL terms, the backward hook."""

    def __init__(self, model: nn.Module, mini_batch_size: int = 5, scale: float = 20.0) -> None:
        super().__init__()
        self.model = model
        self.mini_batch_size = mini_batch_size
        self.scale = scale

    def embed_minibatch_iter(self, sentence_feature: dict, with_grad: bool):
        """Embed ``sentence_feature`` mini-batch by mini-batch (no dropout state to replay: dropout 0)."""
        size = len(sentence_feature["input_ids"])
        for begin in range(0, size, self.mini_batch_size):
            end = begin + self.mini_batch_size
            minibatch = {k: v[begin:end] if torch.is_tensor(v) else v for k, v in sentence_feature.items()}
            with nullcontext() if with_grad else torch.no_grad():
                yield self.model(minibatch)["sentence_embedding"]

    def embed(self, sentence_features) -> list[list[Tensor]]:
        """Step 1: every mini-batch without a graph, as leaves that take the loss stage's gradients."""
        return [[r.detach().requires_grad_() for r in self.embed_minibatch_iter(f, False)] for f in sentence_features]

    def chunk_losses(self, reps: list[list[Tensor]]):
        """MNRL over the whole batch as a sum of per-chunk terms (each anchor chunk against every candidate)."""
        anchors = torch.cat(reps[0])
        candidates = torch.cat([torch.cat(r) for r in reps[1:]])
        size = len(anchors)
        labels = torch.arange(size, device=anchors.device)
        for begin in range(0, size, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, size)
            scores = F.normalize(anchors[begin:end], dim=-1) @ F.normalize(candidates, dim=-1).T * self.scale
            yield F.cross_entropy(scores, labels[begin:end], reduction="sum") / size

    def backward_each_chunk(self, reps: list[list[Tensor]]) -> Tensor:
        total = None
        for loss in self.chunk_losses(reps):
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def hook(self, grad_output: Tensor, sentence_features, cache: list[list[Tensor]] | None = None) -> None:
        """Step 3: re-embed with a graph and push the cached gradients into the model."""
        cache = self.cache if cache is None else cache
        with torch.enable_grad():
            for sentence_feature, grads in zip(sentence_features, cache):
                for rep, grad in zip(self.embed_minibatch_iter(sentence_feature, True), grads):
                    surrogate = torch.dot(rep.flatten(), grad.flatten()) * grad_output
                    surrogate.backward()


class CacheStyleMNRL(_UserGradCacheMNRL):
    """ST 2.4 - 3.3: the caching stage sets ``self.cache``; the hook reads it."""

    style = "cache"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache = None

    def calculate_loss_and_cache_gradients(self, reps: list[list[Tensor]]) -> Tensor:
        loss = self.backward_each_chunk(reps).requires_grad_()
        self.cache = [[r.grad for r in rs] for rs in reps]
        return loss

    def calculate_loss(self, reps: list[list[Tensor]]) -> Tensor:
        return sum(self.chunk_losses(reps))

    def forward(self, sentence_features, labels=None) -> Tensor:
        sentence_features = list(sentence_features)
        reps = self.embed(sentence_features)
        if not torch.is_grad_enabled():
            return self.calculate_loss(reps)
        loss = self.calculate_loss_and_cache_gradients(reps)
        loss.register_hook(partial(self.hook, sentence_features=sentence_features))
        return loss


class WithBackwardStyleMNRL(CacheStyleMNRL):
    """ST 3.4 - 5.6: the caching stage calls ``self.calculate_loss(reps, with_backward=True)``."""

    style = "with_backward"

    def calculate_loss(self, reps: list[list[Tensor]], with_backward: bool = False) -> Tensor:
        if with_backward:
            return self.backward_each_chunk(reps)
        return sum(self.chunk_losses(reps))

    def calculate_loss_and_cache_gradients(self, reps: list[list[Tensor]]) -> Tensor:
        loss = self.calculate_loss(reps, with_backward=True)
        loss = loss.detach().requires_grad_()
        self.cache = [[r.grad for r in rs] for rs in reps]
        return loss


class RepGradStyleMNRL(_UserGradCacheMNRL):
    """The caching stage sets no cache; forward hands the hook ``rep.grad`` (as ST 5.7+ reads it)."""

    style = "rep_grad"

    def calculate_loss_and_cache_gradients(self, reps: list[list[Tensor]]) -> Tensor:
        return self.backward_each_chunk(reps).requires_grad_()

    def calculate_loss(self, reps: list[list[Tensor]]) -> Tensor:
        return sum(self.chunk_losses(reps))

    def forward(self, sentence_features, labels=None) -> Tensor:
        sentence_features = list(sentence_features)
        reps = self.embed(sentence_features)
        if not torch.is_grad_enabled():
            return self.calculate_loss(reps)
        loss = self.calculate_loss_and_cache_gradients(reps)
        cache = [[r.grad for r in rs] for rs in reps]
        loss.register_hook(partial(self.hook, sentence_features=sentence_features, cache=cache))
        return loss


class CalculateLossOnlyStyleMNRL(_UserGradCacheMNRL):
    """The shape of the ST 5.7+ engine: only ``calculate_loss(reps, labels, with_backward=...)``; ``rep.grad``."""

    style = "calculate_loss_only"

    def calculate_loss(self, reps: list[list[Tensor]], labels=None, *, with_backward: bool = False) -> Tensor:
        if with_backward:
            return self.backward_each_chunk(reps)
        return sum(self.chunk_losses(reps))

    def forward(self, sentence_features, labels=None) -> Tensor:
        sentence_features = list(sentence_features)
        reps = self.embed(sentence_features)
        if not torch.is_grad_enabled():
            return self.calculate_loss(reps, labels)
        loss = self.calculate_loss(reps, labels, with_backward=True).detach().requires_grad_()
        cache = [[r.grad for r in rs] for rs in reps]
        loss.register_hook(partial(self.hook, sentence_features=sentence_features, cache=cache))
        return loss


class NoLossStage(_UserGradCacheMNRL):
    """A GradCache loss (``embed_minibatch_iter``) whose loss stage is not a protocol method."""

    style = "no_loss_stage"
    #: What the error must name: the loss stage (``calculate_loss_and_cache_gradients`` on the backport,
    #: ``calculate_loss(..., with_backward=...)`` where MatryoshkaLoss decorates calculate_loss).
    missing = "calculate_loss"

    def compute_and_cache(self, reps: list[list[Tensor]]) -> Tensor:
        loss = self.backward_each_chunk(reps).requires_grad_()
        self.cache = [[r.grad for r in rs] for rs in reps]
        return loss

    def forward(self, sentence_features, labels=None) -> Tensor:
        sentence_features = list(sentence_features)
        reps = self.embed(sentence_features)
        loss = self.compute_and_cache(reps)
        if torch.is_grad_enabled():
            loss.register_hook(partial(self.hook, sentence_features=sentence_features))
        return loss


STYLES = {
    cls.style: cls for cls in (CacheStyleMNRL, WithBackwardStyleMNRL, RepGradStyleMNRL, CalculateLossOnlyStyleMNRL)
}

"""Truncate-after-cache: MatryoshkaLoss around cached (GradCache) losses.

A GradCache loss (``CachedMultipleNegativesRankingLoss``, ``CachedGISTEmbedLoss``,
``CachedMultipleNegativesSymmetricRankingLoss``, or a user's own loss that follows the same protocol)
works in three steps:

1. embed every mini-batch without gradients and keep the embeddings,
2. compute the loss on those embeddings and cache d(loss)/d(embedding),
3. re-embed with gradients inside a backward hook and push the cached gradients into the model.

``MatryoshkaLoss`` used to truncate by decorating ``model.forward``. That decorator is gone by the time
step 3 runs, so full-width embeddings met gradients of truncated ones and backward crashed
("inconsistent tensor size"). Here the cache keeps the full-width embeddings, every Matryoshka
dimension is truncated and re-normalised in step 2 only, the weighted gradients are summed onto the
full-width embeddings, and step 3 - the expensive second forward pass - runs once.

The inner loss is not modified: its loss-stage methods are shadowed on the instance for the duration
of one call and restored afterwards, also when the call raises.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The methods that make a loss a GradCache loss, whatever its class.
GRADCACHE_PROTOCOL = ("embed_minibatch_iter", "calculate_loss_and_cache_gradients")
#: The loss-stage methods whose first argument is the list of cached embeddings.
LOSS_STAGE_METHODS = ("calculate_loss_and_cache_gradients", "calculate_loss")


def is_gradcache_loss(loss: nn.Module) -> bool:
    """Whether ``loss`` follows the GradCache protocol (detected by capability, not by class)."""
    return all(callable(getattr(loss, name, None)) for name in GRADCACHE_PROTOCOL)


def truncate(embeddings: Tensor, dim: int) -> Tensor:
    """The first ``dim`` components of each embedding, re-normalised to unit length."""
    width = embeddings.shape[-1]
    if dim > width:
        raise ValueError(
            f"Dimension {dim} in matryoshka_dims cannot be greater than the model's embedding dimension: {width}"
        )
    return F.normalize(embeddings[..., :dim], p=2, dim=-1)


def select_dims(matryoshka_loss: nn.Module) -> list[tuple[int, float]]:
    """The (dim, weight) pairs used in this step, sampled exactly as the non-cached path samples them (and the
    same on every rank of a torch.distributed process group)."""
    dims = matryoshka_loss.matryoshka_dims
    weights = matryoshka_loss.matryoshka_weights
    n_dims_per_step = getattr(matryoshka_loss, "n_dims_per_step", -1)
    dim_indices = range(len(dims))
    if n_dims_per_step > 0 and n_dims_per_step < len(dim_indices):
        dim_indices = _same_on_every_rank(random.sample(dim_indices, n_dims_per_step))
    return [(dims[idx], weights[idx]) for idx in dim_indices]


def _same_on_every_rank(sampled: list[int]) -> list[int]:
    """Rank 0's sample on every rank of an initialised torch.distributed process group, else ``sampled``.

    Ranks whose random state differs must still train the same dimensions in a step (a loss that gathers
    across ranks calls one collective per dimension); each rank has drawn its own sample all the same, so
    its random state advances exactly as in a single process.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [sampled]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]
    return sampled


def _full_width_grad(full: Tensor, dim: int, truncated_grad: Tensor) -> Tensor:
    """Chain rule through truncate + re-normalise, for one mini-batch of embeddings."""
    with torch.enable_grad():
        leaf = full.detach().requires_grad_()
        (grad,) = torch.autograd.grad(truncate(leaf, dim), leaf, grad_outputs=truncated_grad)
    return grad


def _loss_stage(
    inner_method: Callable[..., Tensor],
    inner_loss: nn.Module,
    dims_weights: list[tuple[int, float]],
    reps: list[list[Tensor]],
    *args: Any,
    **kwargs: Any,
) -> Tensor:
    """Stand-in for the inner loss's loss stage: the weighted sum over Matryoshka dimensions.

    ``reps`` are the full-width cached embeddings (one list of mini-batches per input column). Every
    further argument (e.g. the guide embeddings of CachedGISTEmbedLoss) is passed on untouched.
    The inner loss stage stays chunked by mini-batch, so no graph spans the whole batch.
    """
    # ``calculate_loss_and_cache_gradients`` calls backward() per mini-batch and caches the gradients;
    # releases before 3.0 have no separate no-grad ``calculate_loss`` and use it for evaluation too,
    # so it always runs in grad mode.
    caching = inner_method.__name__ == "calculate_loss_and_cache_gradients"
    full_grads = [[torch.zeros_like(r) for r in rs] for rs in reps]
    total = None
    for dim, weight in dims_weights:
        truncated = [[truncate(r.detach(), dim).requires_grad_(caching) for r in rs] for rs in reps]
        with torch.enable_grad() if caching else torch.no_grad():
            loss = inner_method(truncated, *args, **kwargs)
        if caching:
            for rs, ts, gs in zip(reps, truncated, full_grads):
                for r, t, g in zip(rs, ts, gs):
                    if t.grad is not None:
                        g.add_(_full_width_grad(r, dim, t.grad), alpha=weight)
        term = weight * loss.detach()
        total = term if total is None else total + term
    if not caching:
        return total
    inner_loss.cache = full_grads
    # A fresh leaf: the inner forward registers its backward hook (the second forward pass) on it.
    return total.requires_grad_()


@contextmanager
def _shadowed(obj: object, replacements: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Set instance attributes for the duration of the block; restore the previous state afterwards."""
    missing = object()
    previous = {name: vars(obj).get(name, missing) for name in replacements}
    try:
        for name, value in replacements.items():
            object.__setattr__(obj, name, value)
        yield
    finally:
        for name, value in previous.items():
            if value is missing:
                vars(obj).pop(name, None)
            else:
                object.__setattr__(obj, name, value)


def matryoshka_cached_forward(
    matryoshka_loss: nn.Module, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor
) -> Tensor:
    """``MatryoshkaLoss.forward`` for a GradCache inner loss: truncate after the cache."""
    inner_loss = matryoshka_loss.loss
    dims_weights = select_dims(matryoshka_loss)
    replacements = {}
    for name in LOSS_STAGE_METHODS:
        method = getattr(inner_loss, name, None)
        if callable(method):
            stage = partial(_loss_stage, method, inner_loss, dims_weights)
            stage.__name__ = name  # type: ignore[attr-defined]
            replacements[name] = stage
    with _shadowed(inner_loss, replacements):
        loss = inner_loss(sentence_features, labels)
    if not torch.is_grad_enabled():
        loss = loss.detach()
    return loss

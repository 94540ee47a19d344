"""Truncate-after-cache: MatryoshkaLoss around cached (GradCache) losses.

A GradCache loss (``CachedMultipleNegativesRankingLoss``, ``CachedGISTEmbedLoss``,
``CachedMultipleNegativesSymmetricRankingLoss``, or a user's own loss that follows the protocol below)
works in three steps:

1. embed every mini-batch without gradients and keep the embeddings,
2. compute the loss on those embeddings and cache d(loss)/d(embedding),
3. re-embed with gradients inside a backward hook and push the cached gradients into the model.

``MatryoshkaLoss`` used to truncate by decorating ``model.forward``. That decorator is gone by the time
step 3 runs, so full-width embeddings met gradients of truncated ones and backward crashed
("inconsistent tensor size"). Here the cache keeps the full-width embeddings, every Matryoshka
dimension is truncated and re-normalised in step 2 only, the weighted gradients are summed onto the
full-width embeddings, and step 3 - the expensive second forward pass - runs once.
For the built-in cached losses step 2 computes every dimension in one pass
(``_matryoshka_shared.py``); any other GradCache loss gets the inner loss stage once per dimension.

The inner loss is not modified: its loss-stage methods are shadowed on the instance for the duration
of one call and restored afterwards, also when the call raises.

The GradCache protocol (what MatryoshkaLoss relies on, whatever the loss's class):

- A loss is a GradCache loss when its ``uses_gradient_cache`` attribute says so (as the cached losses
  of sentence-transformers 5.7 and later do; ``False`` opts out), or, without that attribute, when it
  has an ``embed_minibatch_iter`` or a ``calculate_loss_and_cache_gradients`` method.
- Its forward keeps step 1's embeddings as leaf tensors that require grad, one list of mini-batch
  embeddings per input column (``reps``), and runs step 2 by calling one *loss stage* with ``reps``
  as first argument (further arguments, e.g. guide embeddings or labels, are passed on untouched):
  ``calculate_loss_and_cache_gradients(reps, ...)`` (3.3 style), which may itself call
  ``calculate_loss(reps, ..., with_backward=True)`` (3.4 style), or ``calculate_loss(reps, ...,
  with_backward=True)`` directly (5.7 style). Without gradients (evaluation) it may call
  ``calculate_loss(reps, ...)``.
- The loss stage back-propagates the loss into ``reps`` (mini-batch by mini-batch) and returns its
  value. Step 3 then reads the gradients from ``self.cache`` (where the loss stage put them, 3.3 and
  3.4 style) or from ``rep.grad`` (5.7 style). MatryoshkaLoss puts the full-width gradients in both
  places the loss uses: ``self.cache`` when the loss stage set it, and ``rep.grad`` of every
  embedding of ``reps``.

A loss that is a GradCache loss by the first rule but has neither ``calculate_loss_and_cache_gradients``
nor a ``calculate_loss`` with a ``with_backward`` argument cannot be driven: MatryoshkaLoss raises a
ValueError naming the loss and the missing method instead of crashing inside autograd.

``AdaptiveLayerLoss`` and ``Matryoshka2dLoss`` do not support a GradCache loss yet, directly or inside
``MatryoshkaLoss`` (:func:`refuse_under_adaptive_layers`): step 3 runs after their layer decorators are
gone, so every layer's gradient would land on the final layer's embeddings.
"""

from __future__ import annotations

import inspect
import random
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sentence_transformers.losses._matryoshka_shared import loss_stage as shared_loss_stage

#: Without a ``uses_gradient_cache`` attribute, any of these methods makes a loss a GradCache loss.
GRADCACHE_MARKERS = ("embed_minibatch_iter", "calculate_loss_and_cache_gradients")
#: The loss-stage methods whose first argument is the list of cached embeddings.
LOSS_STAGE_METHODS = ("calculate_loss_and_cache_gradients", "calculate_loss")


def is_gradcache_loss(loss: nn.Module) -> bool:
    """Whether ``loss`` follows the GradCache protocol (detected by capability, not by class)."""
    declared = getattr(loss, "uses_gradient_cache", None)
    if declared is not None:
        return bool(declared)
    return any(callable(getattr(loss, name, None)) for name in GRADCACHE_MARKERS)


def _with_backward(method: Callable[..., Any], args: tuple, kwargs: dict) -> bool | None:
    """The ``with_backward`` argument of a call of ``method(reps, *args, **kwargs)``; None: no such parameter."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return kwargs.get("with_backward")
    if "with_backward" not in signature.parameters:
        return None
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return bool(kwargs.get("with_backward", False))
    bound.apply_defaults()
    return bool(bound.arguments["with_backward"])


def check_loss_stage(loss: nn.Module) -> None:
    """Raise a clear ValueError when ``loss`` has no loss stage that MatryoshkaLoss can truncate in."""
    if callable(getattr(loss, "calculate_loss_and_cache_gradients", None)):
        return
    calculate_loss = getattr(loss, "calculate_loss", None)
    if callable(calculate_loss) and _with_backward(calculate_loss, (), {}) is not None:
        return
    name = type(loss).__name__
    if callable(calculate_loss):
        found = "has no calculate_loss_and_cache_gradients(reps, ...) method, and its calculate_loss takes no with_backward argument"
    else:
        found = "has neither a calculate_loss_and_cache_gradients(reps, ...) nor a calculate_loss(reps, ..., with_backward=...) method"
    raise ValueError(
        f"MatryoshkaLoss cannot drive {name}: it is a gradient-cache (GradCache) loss, but it {found}. "
        "MatryoshkaLoss truncates the cached embeddings in that loss stage; add one of these methods to "
        f"{name} (see the GradCache protocol in sentence_transformers/losses/_matryoshka_cache.py), "
        "or use a loss without a gradient cache."
    )


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
    caching: bool,
    inner_loss: nn.Module,
    dims_weights: list[tuple[int, float]],
    reps: list[list[Tensor]],
    *args: Any,
    **kwargs: Any,
) -> Tensor:
    """Stand-in for the inner loss's loss stage: the weighted sum over Matryoshka dimensions.

    ``reps`` are the full-width cached embeddings (one list of mini-batches per input column). Every
    further argument (e.g. the guide embeddings of CachedGISTEmbedLoss) is passed on untouched.
    ``caching``: the stage back-propagates into the embeddings (``calculate_loss_and_cache_gradients``,
    ``calculate_loss(..., with_backward=True)``); releases before 3.0 have no separate no-grad
    ``calculate_loss`` and use the caching stage for evaluation too, so it always runs in grad mode.

    The built-in cached losses take the shared multi-width stage (``_matryoshka_shared.py``: every width
    in one pass); everything else takes :func:`_per_width`. Both report their gradients the same way.
    """
    missing = object()
    cache_before = vars(inner_loss).get("cache", missing)
    shared = shared_loss_stage(inner_method, caching, inner_loss, dims_weights, reps, *args, **kwargs)
    if shared is not None:
        total, full_grads = shared.total, shared.grads
        # It stands in only for the releases' own caching stages, which all set self.cache.
        cache_set = caching
    else:
        total, full_grads = _per_width(inner_method, caching, dims_weights, reps, *args, **kwargs)
        cache_set = vars(inner_loss).get("cache", missing) is not cache_before
    if not caching:
        return total
    # Report the gradients where the inner loss reads them: the cache its loss stage set (3.3, 3.4
    # style) and the .grad of its embeddings (5.7 style).
    if cache_set:
        inner_loss.cache = full_grads
    for rs, gs in zip(reps, full_grads):
        for r, g in zip(rs, gs):
            if r.requires_grad and r.is_leaf:
                r.grad = g if r.grad is None else r.grad + g
    # A fresh leaf: the inner forward registers its backward hook (the second forward pass) on it.
    return total.requires_grad_()


def _per_width(
    inner_method: Callable[..., Tensor],
    caching: bool,
    dims_weights: list[tuple[int, float]],
    reps: list[list[Tensor]],
    *args: Any,
    **kwargs: Any,
) -> tuple[Tensor, list[list[Tensor]]]:
    """The generic path: the inner loss stage once per dimension, on truncated, re-normalised copies.

    Exact for any loss that follows the protocol. The inner loss stage stays chunked by mini-batch, so
    no graph spans the whole batch. Returns the weighted loss and the weighted full-width gradients.
    """
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
    return total, full_grads


class _Driver:
    """The shadowed loss-stage methods of one call. The outermost loss-stage call does the Matryoshka
    sum; a loss stage that calls another one (``calculate_loss_and_cache_gradients`` ->
    ``calculate_loss(reps, with_backward=True)``) reaches the inner loss's own method."""

    def __init__(self, inner_loss: nn.Module, dims_weights: list[tuple[int, float]]) -> None:
        self.inner_loss = inner_loss
        self.dims_weights = dims_weights
        self.originals = {
            name: getattr(inner_loss, name)
            for name in LOSS_STAGE_METHODS
            if callable(getattr(inner_loss, name, None))
        }
        self.active = False

    def stage(self, name: str, reps: list[list[Tensor]], *args: Any, **kwargs: Any) -> Tensor:
        method = self.originals[name]
        if self.active:
            return method(reps, *args, **kwargs)
        caching = name == "calculate_loss_and_cache_gradients" or bool(_with_backward(method, args, kwargs))
        self.active = True
        try:
            return _loss_stage(method, caching, self.inner_loss, self.dims_weights, reps, *args, **kwargs)
        finally:
            self.active = False

    def replacements(self) -> dict[str, Callable[..., Tensor]]:
        return stage_replacements(self.stage, self.originals)


def stage_replacements(stage: Callable[..., Tensor], names: Iterable[str]) -> dict[str, Callable[..., Tensor]]:
    """The shadowing methods of one call: ``stage(name, reps, ...)`` bound to each loss-stage method ``name``,
    named like it (a loss that inspects its own methods sees the names it expects)."""
    out = {}
    for name in names:
        bound = partial(stage, name)
        bound.__name__ = name  # type: ignore[attr-defined]
        out[name] = bound
    return out


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
    check_loss_stage(inner_loss)
    driver = _Driver(inner_loss, select_dims(matryoshka_loss))
    with _shadowed(inner_loss, driver.replacements()):
        loss = inner_loss(sentence_features, labels)
    if not torch.is_grad_enabled():
        loss = loss.detach()
    return loss


def refuse_under_adaptive_layers(owner: nn.Module, loss: nn.Module) -> None:
    """``AdaptiveLayerLoss`` / ``Matryoshka2dLoss``: raise a clear ValueError when ``loss`` is a GradCache
    loss or wraps one (e.g. inside ``MatryoshkaLoss``), instead of training with wrong gradients.

    The GradCache loss re-embeds its mini-batches in a backward hook, after ``owner`` has removed the
    decorators that select a layer's embeddings: every layer's gradient would land on the final layer's
    embeddings, and the KL-divergence term would get none.
    """
    chain: list[nn.Module] = []
    module: Any = loss
    while isinstance(module, nn.Module) and all(module is not seen for seen in chain):
        chain.append(module)
        module = getattr(module, "loss", None)
    cached = [index for index, module in enumerate(chain) if is_gradcache_loss(module)]
    if not cached:
        return
    owner_name = type(owner).__name__
    name = type(chain[cached[-1]]).__name__
    wrappers = [type(module).__name__ for module in chain[: cached[-1]]]
    inside = f" (inside {' inside '.join(reversed(wrappers))})" if wrappers else ""
    plain = name[len("Cached") :] if name.startswith("Cached") else f"a non-cached counterpart of {name}"
    raise ValueError(
        f"{owner_name} with {name}{inside} is not supported with a gradient cache yet: {name} re-embeds its "
        f"mini-batches in a backward hook, after {owner_name} has restored the model's layers, so every "
        f"layer's gradient would land on the final layer's embeddings. Use {owner_name} with a loss without "
        f"a gradient cache ({plain}), or MatryoshkaLoss alone with {name}."
    )

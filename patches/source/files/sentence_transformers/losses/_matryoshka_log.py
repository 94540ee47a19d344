"""Per-width losses of MatryoshkaLoss: ``MatryoshkaLoss(..., log_per_dim=True)``.

MatryoshkaLoss returns one scalar, the weighted sum over its dimensions, so a training run cannot show
how each width trains. With ``log_per_dim=True`` every call stores the unweighted loss of each width it
trained in ``last_per_dim_losses`` (width -> float). Where the trainer logs the components of a loss that
returns a dict (``SentenceTransformerTrainer.track_loss_components``, 5.0 and later) the call returns
such a dict, one ``matryoshka_dim_<width>`` component per width; elsewhere a dict would break training,
so the call returns the usual tensor and only the attribute is set.

The trainer optimises and logs the *sum* of a dict's values, so the dict is built to leave training
unchanged:

- each width's component is numerically its unweighted loss;
- where the weights are not all 1, one constant component, ``matryoshka_weighting``, makes the sum equal
  the weighted total;
- the gradient is exactly that of the weighted total: the first component carries
  ``total - total.detach()`` (zero in value), every other one is detached. For a gradient-cache loss
  ``total`` is the tensor whose backward hook runs the second forward pass, so that runs once, as
  without the switch.

The loss stages report each width's loss through :func:`record_per_dim`, the one hook point: it records
only while a MatryoshkaLoss with ``log_per_dim=True`` is collecting (:func:`collecting_per_dim`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

# --- per-width logging: everything below is shared with the fix series of native releases

_PER_DIM_LOSSES = contextvars.ContextVar("matryoshka_per_dim_losses", default=None)


@contextlib.contextmanager
def collecting_per_dim(owner):
    """Collect the per-width losses recorded during the block for ``owner`` (a MatryoshkaLoss).

    The innermost collector wins, so a MatryoshkaLoss inside another loss collects its own widths.
    """
    values = {}
    token = _PER_DIM_LOSSES.set((owner, values))
    try:
        yield values
    finally:
        _PER_DIM_LOSSES.reset(token)


def is_collecting_per_dim(owner) -> bool:
    """Whether the innermost collector is ``owner``'s (its forward already runs inside it)."""
    active = _PER_DIM_LOSSES.get()
    return active is not None and active[0] is owner


def record_per_dim(dim, value, owner=None) -> None:
    """The hook point of every loss stage: ``value`` is the unweighted loss of width ``dim`` in this call.

    A no-op unless a MatryoshkaLoss with ``log_per_dim=True`` is collecting; ``owner``, where the caller
    knows it, must be that MatryoshkaLoss (another one nested inside without the switch records nothing).
    """
    active = _PER_DIM_LOSSES.get()
    if active is not None and (owner is None or owner is active[0]):
        active[1][dim] = value.detach()


def check_log_per_dim(log_per_dim) -> bool:
    """``log_per_dim`` as given, or a clear TypeError: a truthy string or number is not a switch."""
    if not isinstance(log_per_dim, bool):
        raise TypeError(
            f"log_per_dim must be True or False, not {log_per_dim!r}: True records the loss of each Matryoshka "
            "dimension (and logs it where the trainer logs loss components), False (the default) does not."
        )
    return log_per_dim


@functools.lru_cache(maxsize=None)
def trainer_logs_loss_components() -> bool:
    """Whether this release's trainer logs a dict returned by a loss as loss components (by capability)."""
    try:
        from sentence_transformers import SentenceTransformerTrainer
    except ImportError:  # 2.x: model.fit only, which needs a tensor
        return False
    return callable(getattr(SentenceTransformerTrainer, "track_loss_components", None))


def per_dim_output(owner, total, per_dim):
    """Set ``owner.last_per_dim_losses``; return ``total``, or the dict of components that sums to it."""
    owner.last_per_dim_losses = {dim: float(value) for dim, value in per_dim.items()}
    weights = dict(zip(owner.matryoshka_dims, owner.matryoshka_weights))
    named = {f"matryoshka_dim_{dim}": value for dim, value in per_dim.items()}
    weighted = any(weights.get(dim, 1) != 1 for dim in per_dim)
    return _components(total, named, "matryoshka_weighting" if weighted else None)


def layer_term(owner, layers, loss, *args):
    """``loss(*args)``, one layer's term of AdaptiveLayerLoss ``owner`` (through ``layers`` transformer layers).

    While ``owner`` collects (``log_per_dim=True``) the term's unweighted loss is recorded under
    ``(layers, width)``: one entry per width a MatryoshkaLoss ``loss`` trained, else ``(layers, None)``.
    """
    if not is_collecting_per_dim(owner):
        return loss(*args)
    with collecting_per_dim(loss) as widths:  # a MatryoshkaLoss records its own widths
        value = loss(*args)
    for dim, width_value in (widths or {None: value}).items():
        record_per_dim((layers, dim), width_value, owner=owner)
    return value


def per_term_output(owner, total, per_term):
    """AdaptiveLayerLoss / Matryoshka2dLoss: set ``owner.last_per_dim_losses`` ((layers, width) -> float); return
    ``total``, or components ``matryoshka_layer_<layers>[_dim_<width>]`` plus ``adaptive_layer_weighting``, the
    constant that makes their sum the loss (the layers' and widths' weights, the KL term)."""
    owner.last_per_dim_losses = {key: float(value) for key, value in per_term.items()}
    named = {
        f"matryoshka_layer_{layers}" + ("" if dim is None else f"_dim_{dim}"): value
        for (layers, dim), value in per_term.items()
    }
    return _components(total, named, "adaptive_layer_weighting")


def _components(total, named, remainder):
    """``total``, or (where the trainer logs loss components) ``named`` as a dict whose sum is ``total``: the
    first component carries the gradient of ``total`` (zero in value), and ``remainder`` (if not None) is the
    constant difference between ``total`` and the named values."""
    if not named or not isinstance(total, torch.Tensor) or not trainer_logs_loss_components():
        return total
    carry = total - total.detach()  # zero in value; the gradient of the weighted total
    components = {}
    for index, (name, value) in enumerate(named.items()):
        value = value.to(total.dtype)
        components[name] = value + carry if index == 0 else value
    if remainder is not None:
        components[remainder] = total.detach() - sum(components.values()).detach()
    return components

"""Running an ST loss the way a trainer does, and turning its crashes into one-line failures.

Why: on unpatched releases before 3.4.0, MatryoshkaLoss around a cached loss crashes inside
``backward`` (``RuntimeError: inconsistent tensor size ...`` in ``_backward_hook``). The suite must
report that as a clear *failure* naming the crash and the phase, not as an error or a 40-frame
traceback. Every check runs the ST side through :func:`st_loss_and_grads`.
"""

from __future__ import annotations

import random
import traceback
from typing import Callable

import pytest
import torch

from conformance.oracle import parameter_grads


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {last.filename.rsplit('site-packages/', 1)[-1]}:{last.lineno} in {last.name})"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}{where}"


def call_loss(loss_fn, features, *, seed: int | None, what: str) -> torch.Tensor:
    """``loss_fn(features, None)`` after ``random.seed(seed)``; a crash becomes ``pytest.fail``."""
    if seed is not None:
        random.seed(seed)
    try:
        return loss_fn([dict(f) for f in features], None)
    except Exception as exc:  # noqa: BLE001 - any crash of the code under test is a finding
        pytest.fail(f"{what}: forward raised {_describe(exc)}", pytrace=False)


def backward(loss: torch.Tensor, *, what: str, scale: float = 1.0) -> None:
    try:
        (scale * loss).backward()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{what}: backward crashed with {_describe(exc)}", pytrace=False)


def st_loss_and_grads(
    model, loss_fn: Callable, features, *, seed: int | None = 0, what: str, scale: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """(loss value, parameter gradients of ``scale * loss``) of the ST loss; the model's grads are cleared."""
    model.zero_grad(set_to_none=True)
    loss = call_loss(loss_fn, features, seed=seed, what=what)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        pytest.fail(f"{what}: forward returned {type(loss).__name__} without a graph", pytrace=False)
    backward(loss, what=what, scale=scale)
    grads = parameter_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def instance_state(obj) -> dict:
    """Instance attributes that shadow methods (e.g. a decorated ``forward``/``calculate_loss``).

    An instance attribute that is just the class's own method bound to ``obj`` (what
    ``model.forward = original_forward`` leaves behind) behaves like no attribute and is ignored.
    """
    state = {}
    for key, value in vars(obj).items():
        if not callable(value) or isinstance(value, torch.nn.Module):
            continue
        own = getattr(type(obj), key, None)
        if getattr(value, "__self__", None) is obj and getattr(value, "__func__", None) is own:
            continue
        state[key] = value
    return state

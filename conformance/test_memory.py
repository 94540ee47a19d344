"""The loss stage must stay chunked: no autograd graph spanning the whole batch (upstream #3107 / PR #3114).

Why this way: GPU memory is not observable on a CPU box, but autograd's saved tensors are what a graph
costs. ``torch.autograd.graph.saved_tensors_hooks`` wraps every saved tensor in a holder that counts its
bytes while alive; the peak over forward + backward is the graph's high-water mark. GradCache keeps at
most one mini-batch of model activations and one chunk of scores (mini-batch x batch) alive, so the
peak grows about linearly with the batch; a loss stage that backpropagates once over all chunks (#3107)
keeps batch x batch scores alive (quadratic), and a path that embeds the whole batch with grad keeps all
activations (the non-cached peak). Two batch sizes, 4x apart, on the tiny model: cheap and decisive.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from conformance import cases, compat, data
from conformance.harness import backward, call_loss

SMALL, LARGE, MINI_BATCH = 32, 128, 8
#: Where a series adds the shared multi-width loss stage, its generic per-width path is checked as well.
KINDS_PATHS = [pytest.param(k, "default", id=compat.SHORT[k]) for k in compat.CACHED_KINDS] + [
    pytest.param(k, "generic", id=f"{compat.SHORT[k]}-generic") for k in compat.CACHED_KINDS if compat.SHARED
]


class SavedTensorMeter:
    """Peak bytes of tensors autograd holds for backward (live = packed and not yet released)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        return _Held(tensor, self)

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("tensor", "nbytes", "meter")

    def __init__(self, tensor: torch.Tensor, meter: SavedTensorMeter) -> None:
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


def _features(model, rows: int, columns: int = 3) -> list[dict]:
    rng = random.Random(rows)
    texts = [
        [" ".join(rng.choice(data.WORDS) for _ in range(3 + (r + c) % 6)) for r in range(rows)] for c in range(columns)
    ]
    return [compat.tokenize(model, col) for col in texts]


def peak_saved_bytes(loss_fn, model, features, seed: int, what: str) -> tuple[int, int]:
    """(peak during forward, peak during backward). For a GradCache loss the forward holds the loss stage
    (step 2, chunked backward to the embeddings) and the backward holds the mini-batch re-embedding (step 3).

    The series' shared multi-width loss stage computes its gradients without autograd: its score buffers
    count as the forward's peak instead."""
    forward_meter, backward_meter = SavedTensorMeter(), SavedTensorMeter()
    model.zero_grad(set_to_none=True)
    runs = compat.shared_runs()
    with forward_meter.hooks():
        loss = call_loss(loss_fn, features, seed=seed, what=what)
    workspace = compat.shared_workspace_bytes(loss.element_size()) if compat.shared_runs() > runs else 0
    with backward_meter.hooks():
        backward(loss, what=what)
    del loss
    model.zero_grad(set_to_none=True)
    return forward_meter.peak + workspace, backward_meter.peak


@pytest.mark.parametrize(("kind", "path"), KINDS_PATHS)
def test_loss_stage_stays_chunked(kind, path, model, guide):
    case = cases.base_case(kind, mini_batch_size=MINI_BATCH, dims=(32, 16, 8), weights=None)
    fwd, bwd = {}, {}
    with compat.generic_path() if path == "generic" else contextlib.nullcontext():
        for rows in (SMALL, LARGE):
            fwd[rows], bwd[rows] = peak_saved_bytes(
                case.st_loss(model, guide), model, _features(model, rows), case.seed, case.id
            )
    plain = cases.base_case(kind, cached=False, dims=(32, 16, 8), weights=None)
    full_graph = sum(
        peak_saved_bytes(plain.st_loss(model, guide), model, _features(model, LARGE), plain.seed, plain.id)
    )
    detail = (
        f"peak saved bytes at {SMALL}/{LARGE} rows: forward {fwd[SMALL]}/{fwd[LARGE]},"
        f" backward {bwd[SMALL]}/{bwd[LARGE]}; non-cached {full_graph} at {LARGE} rows"
    )
    ratio = LARGE / SMALL
    # Loss stage: one chunk of scores (mini-batch x batch) at a time grows like the batch (x4); a graph over
    # all chunks (#3107) grows like batch^2 (x16).
    assert fwd[LARGE] < 1.5 * ratio * fwd[SMALL], f"loss stage holds a graph over all chunks: {detail}"
    # Re-embedding: one mini-batch of activations at a time, independent of the batch; a whole-batch
    # forward with grad grows like the batch.
    assert bwd[LARGE] < 0.5 * ratio * bwd[SMALL], f"backward holds more than a mini-batch of activations: {detail}"
    assert fwd[LARGE] + bwd[LARGE] < 0.5 * full_graph, f"cached path holds about a whole-batch graph: {detail}"

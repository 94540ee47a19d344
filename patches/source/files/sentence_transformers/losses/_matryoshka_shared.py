"""One loss stage for every Matryoshka width: MatryoshkaLoss around the built-in cached losses.

Truncate-after-cache (``_matryoshka_cache.py``) calls the inner loss stage once per Matryoshka width
on truncated, re-normalised copies of the cached embeddings. Every width thereby recomputes a
similarity product at that width, a softmax and a backward per mini-batch, plus a backward through
each truncation. The widths are prefixes of one vector, so most of that work is shared:

- the dot product at width d is the sum of the dot products of the width segments below d: one
  product per segment (together one full-width product), summed cumulatively, gives the dot
  products of every width; the prefix norms come from cumulative sums of squares, so
  ``cos_d(x, y) = (x[:d] . y[:d]) / (|x[:d]| |y[:d]|)`` needs no truncated copies and no second
  normalisation (the inner cosine similarity of a re-normalised vector is the dot product);
- what does not depend on the width is computed once: CachedGISTEmbedLoss's guide similarities
  and false-negative masks (the guide is never truncated);
- the gradient is written by hand: per width the softmax minus the one-hot label, weighted, scaled
  back to the dot products; the reverse cumulative sum over widths gives each segment's gradient,
  so the backward is again one product per segment; the norm terms are added once at the end.

The loss stage stays chunked by mini-batch exactly like the inner loss (same chunks, same per-chunk
weights), and the widths of a chunk are processed in groups bounded by :data:`WIDTH_GROUP_ELEMENTS`
so that the score tensors alive at once stay bounded at large batch sizes.

Which configurations take this path: an inner loss whose class is one of the release's own cached
losses listed in :data:`VARIANTS` for this release, with the release's own loss-stage method, a
similarity of ``util.cos_sim`` / ``util.dot_score`` (MNRL family), a plain ``nn.CrossEntropyLoss``,
float32/float64 embeddings and widths between 1 and the embedding width. Anything else - a user's
own similarity function or loss, a subclass, an unknown option or release - returns
None and takes the generic per-width path, which calls the release's own loss stage
per width and stays exact. ``ST_MATRYOSHKA_GENERIC=1`` (environment) or ``FORCE_GENERIC = True``
(this module) forces the generic path; :data:`path_counts` counts which path ran.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from packaging.version import Version
from torch import Tensor, nn

#: Set to True (or the environment variable ST_MATRYOSHKA_GENERIC=1) to force the generic per-width path.
FORCE_GENERIC = False
ENV_FORCE_GENERIC = "ST_MATRYOSHKA_GENERIC"
#: Upper bound on the score elements (mini-batch rows x candidates x widths) alive at once per chunk:
#: above it the widths of a chunk are processed in groups (each group costs one more product).
WIDTH_GROUP_ELEMENTS = 1 << 23
#: How often each path ran ("shared", "generic"), for tests and curious users.
path_counts: Counter = Counter()
#: Elements of the score buffers of the last shared run (they are the loss stage's memory).
last_workspace_elements = 0
#: The norm clamp of ``torch.nn.functional.normalize``.
EPS = 1e-12


def _autocast() -> bool:
    cpu = getattr(torch, "is_autocast_cpu_enabled", None)
    return torch.is_autocast_enabled() or bool(cpu and cpu())


def generic_forced() -> bool:
    return FORCE_GENERIC or os.environ.get(ENV_FORCE_GENERIC, "").strip() not in ("", "0")


# --- the engine: every width of a set of softmax problems, chunk by chunk --------------------------


@dataclass
class Block:
    """Scores of rows ``sources[row][begin:end]`` against all of ``sources[col]``, optionally masked."""

    row: int
    col: int
    mask: Tensor | None = None  # True where the score is -inf (the same for every width)


@dataclass
class Problem:
    """One cross-entropy over the concatenated blocks; row i's label is column ``begin + i``.

    ``factor`` multiplies the sum over rows (e.g. 1 / batch size: the release's per-chunk mean times
    the chunk's share of the batch).
    """

    begin: int
    end: int
    blocks: list[Block]
    factor: float


@dataclass
class SharedStage:
    """What the shared stage computed: the weighted loss, d(loss)/d(reps) (None without gradients), and
    each width's unweighted loss (for ``MatryoshkaLoss(log_per_dim=True)``)."""

    total: Tensor
    grads: list[list[Tensor]] | None
    per_width: dict[int, Tensor]


class Widths:
    """The sampled widths as ascending segments; per width its summed weight."""

    def __init__(self, dims_weights: Sequence[tuple[int, float]]) -> None:
        self.dims = sorted({int(dim) for dim, _ in dims_weights})
        weight_of: dict[int, float] = {}
        for dim, weight in dims_weights:
            weight_of[int(dim)] = weight_of.get(int(dim), 0.0) + weight
        self.weights = [weight_of[d] for d in self.dims]
        self.bounds = [0, *self.dims]  # segment k spans [bounds[k], bounds[k + 1])

    def __len__(self) -> int:
        return len(self.dims)

    def segment(self, k: int) -> slice:
        return slice(self.bounds[k], self.bounds[k + 1])


class _Source:
    """One matrix of full-width embeddings and its prefix norms at every width."""

    def __init__(self, x: Tensor, widths: Widths, with_grad: bool) -> None:
        self.x = x
        sq = torch.stack([x[:, widths.segment(k)].square().sum(dim=1) for k in range(len(widths))], dim=1)
        self.norm = sq.cumsum_(dim=1).sqrt_()  # (n, K): |x[:d_k]|
        self.denom = self.norm.clamp_min(EPS)  # what F.normalize divides by
        self.inv = self.denom.reciprocal()
        self.grad = torch.zeros_like(x) if with_grad else None
        self.inv_grad = torch.zeros_like(self.inv) if with_grad else None

    def finish_grad(self, widths: Widths) -> Tensor:
        """Add the norm terms: d(1/|x[:d]|)/dx[:d] = -x[:d] / |x[:d]|^3 where |x[:d]| > eps (else clamped)."""
        assert self.grad is not None and self.inv_grad is not None
        coef = self.inv_grad * self.inv.pow(3) * (self.norm > EPS)
        coef = coef.flip(1).cumsum(1).flip(1).neg_()  # segment j: the sum over the widths k >= j
        for k in range(len(widths)):
            seg = widths.segment(k)
            self.grad[:, seg].addcmul_(coef[:, k : k + 1], self.x[:, seg])
        return self.grad


def _group_size(widths: Widths, rows: int, columns: int) -> int:
    per_width = max(1, rows * columns)
    return max(1, min(len(widths), WIDTH_GROUP_ELEMENTS // per_width))


class _Workspace:
    """Score buffers reused across widths and chunks (large allocations cost page faults on every call).

    Only the buffers of the latest shape are kept: the chunks of a batch share one shape but the last.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, list[Tensor]] = {}
        self.peak = 0

    def get(self, like: Tensor, rows: int, cols: int, count: int) -> list[Tensor]:
        key = (rows, cols)
        if key not in self.buffers:
            self.buffers = {k: v for k, v in self.buffers.items() if k[1] != cols}  # a ragged last chunk
        have = self.buffers.setdefault(key, [])
        while len(have) < count:
            have.append(like.new_empty(rows, cols))
        self.peak = max(self.peak, sum(b.numel() for bufs in self.buffers.values() for b in bufs))
        return have[:count]


def _log_softmax(scores: Tensor, out: Tensor) -> Tensor:
    try:
        return torch.log_softmax(scores, dim=1, out=out)
    except (TypeError, RuntimeError):  # torch without the out= overload
        return out.copy_(torch.log_softmax(scores, dim=1))


def run_problems(
    sources: list[Tensor],
    chunks: Iterable[list[Problem]],
    widths: Widths,
    scale: float,
    with_grad: bool,
) -> tuple[Tensor, list[Tensor] | None, Tensor]:
    """Σ_width weight · Σ_problem factor · Σ_row cross-entropy, its gradient w.r.t. every source, and
    each width's unweighted loss (what ``MatryoshkaLoss(log_per_dim=True)`` reports; K scalars, no cost).

    Scores at width d are ``scale * cos(x[:d], y[:d])``, masked blocks set to -inf.
    """
    srcs = [_Source(x, widths, with_grad) for x in sources]
    workspace = _Workspace()
    total = sources[0].new_zeros(())
    per_width = sources[0].new_zeros(len(widths))
    for problems in chunks:
        for problem in problems:
            total += _run_problem(srcs, problem, widths, scale, with_grad, workspace, per_width)
    global last_workspace_elements
    last_workspace_elements = workspace.peak
    if not with_grad:
        return total, None, per_width
    return total, [s.finish_grad(widths) for s in srcs], per_width


def _run_problem(
    srcs: list[_Source],
    problem: Problem,
    widths: Widths,
    scale: float,
    with_grad: bool,
    workspace: _Workspace,
    per_width: Tensor,
) -> Tensor:
    b, e = problem.begin, problem.end
    rows = e - b
    x0 = srcs[problem.blocks[0].row].x
    spans, cols = [], 0  # each block's columns in the concatenated scores
    for block in problem.blocks:
        n = srcs[block.col].x.shape[0]
        spans.append(slice(cols, cols + n))
        cols += n
    labels = torch.arange(b, e, device=x0.device)  # row i's label is column b + i
    row_index = torch.arange(rows, device=x0.device)
    group = _group_size(widths, rows, cols)
    scores, factors, dots_buffer, *grads = workspace.get(x0, rows, cols, 3 + (group if with_grad else 1))
    dots = [dots_buffer[:, span] for span in spans]  # running x[:d] . y[:d], block by block
    total = x0.new_zeros(())
    done = 0  # widths [0, done) are finished, their gradients propagated
    while done < len(widths):
        ks = range(done, min(done + group, len(widths)))
        for i, k in enumerate(ks):
            seg = widths.segment(k)
            for block, dot, span in zip(problem.blocks, dots, spans):
                r, c = srcs[block.row], srcs[block.col]
                if k == 0:
                    torch.mm(r.x[b:e, seg], c.x[:, seg].T, out=dot)
                else:
                    dot.addmm_(r.x[b:e, seg], c.x[:, seg].T)
                # scale / (|x[:d]| |y[:d]|), one factor per score, reused for the gradient
                torch.mul(r.inv[b:e, k : k + 1] * scale, c.inv[None, :, k], out=factors[:, span])
                torch.mul(dot, factors[:, span], out=scores[:, span])
                if block.mask is not None:
                    scores[:, span].masked_fill_(block.mask, -math.inf)
            logp = _log_softmax(scores, grads[i] if with_grad else grads[0])
            weight = widths.weights[k] * problem.factor
            nll = logp[row_index, labels].sum()
            total -= weight * nll
            per_width[k] -= problem.factor * nll
            if not with_grad:
                continue
            # d(loss)/d(scores) / weight = softmax - one-hot; times the factor: d(loss)/d(dot) / weight.
            g = logp.exp_()
            g[row_index, labels] -= 1.0
            g.mul_(factors)
            # d(loss)/d(1/|x[:d]|) = weight * Σ_j g_ij dot_ij |x[:d]|  (and per column likewise)
            for block, dot, span in zip(problem.blocks, dots, spans):
                r, c = srcs[block.row], srcs[block.col]
                gd = torch.mul(g[:, span], dot, out=scores[:, span])
                r.inv_grad[b:e, k].addcmul_(gd.sum(dim=1), r.denom[b:e, k], value=weight)
                c.inv_grad[:, k].addcmul_(gd.sum(dim=0), c.denom[:, k], value=weight)
        if with_grad:
            _propagate(srcs, problem, widths, ks, grads, spans)
        done = ks[-1] + 1
    return total


def _propagate(
    srcs: list[_Source], problem: Problem, widths: Widths, ks: range, grads: list[Tensor], spans: list[slice]
) -> None:
    """Gradients of the dot products of widths ``ks`` onto the segments below each width.

    The dot product at width k sums the segment products j <= k, so segment j receives the weighted
    sum of the gradients of the widths k >= j: accumulated from the widest width of the group down,
    then once for all segments below the group.
    """
    b, e = problem.begin, problem.end
    last = len(ks) - 1
    acc = grads[last].mul_(widths.weights[ks[last]] * problem.factor)
    for i in range(last, -1, -1):
        k = ks[i]
        if i < last:
            acc.add_(grads[i], alpha=widths.weights[k] * problem.factor)
        _segment_grad(srcs, problem, acc, spans, widths.segment(k), b, e)
    if ks[0] > 0:
        _segment_grad(srcs, problem, acc, spans, slice(0, widths.bounds[ks[0]]), b, e)


def _segment_grad(
    srcs: list[_Source], problem: Problem, acc: Tensor, spans: list[slice], seg: slice, b: int, e: int
) -> None:
    for block, span in zip(problem.blocks, spans):
        r, c = srcs[block.row], srcs[block.col]
        g = acc[:, span]
        r.grad[b:e, seg].addmm_(g, c.x[:, seg])
        c.grad[:, seg].addmm_(g.T, r.x[b:e, seg])


# --- adapters: what each release's inner loss stage computes, as problems ---------------------------


def _release() -> Version:
    import sentence_transformers

    return Version(sentence_transformers.__version__)


def _is_plain_cross_entropy(module: Any) -> bool:
    return (
        type(module) is nn.CrossEntropyLoss
        and module.weight is None
        and module.reduction == "mean"
        and module.label_smoothing == 0.0
    )


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _similarity_is_cosine_or_dot(fn: Any) -> bool:
    # Both are the cosine here: every width is re-normalised before the inner similarity.
    from sentence_transformers import util

    return fn is util.cos_sim or fn is util.dot_score


@dataclass
class Stage:
    """An inner loss stage expressed for :func:`run_problems`."""

    sources: list[Tensor]
    source_columns: list[list[int]]  # input columns concatenated into each source, in order
    chunks: Iterable[list[Problem]]  # computed chunk by chunk (GIST's masks are mini-batch x batch)
    scale: float


def _cat(reps: list[list[Tensor]], columns: list[int]) -> Tensor:
    return torch.cat([torch.cat(reps[c]) for c in columns]).detach()


def _mnrl(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict) -> Stage | None:
    """CachedMultipleNegativesRankingLoss 2.4.0 - 3.3.1: anchors against positives and negatives."""
    if args or kwargs or len(reps) < 2 or not _similarity_is_cosine_or_dot(inner.similarity_fct):
        return None
    if not (_is_real(inner.scale) and _is_plain_cross_entropy(inner.cross_entropy_loss)):
        return None
    anchors, candidates = _cat(reps, [0]), _cat(reps, list(range(1, len(reps))))
    n, step = anchors.shape[0], inner.mini_batch_size
    chunks = [[Problem(b, min(b + step, n), [Block(0, 1)], 1.0 / n)] for b in range(0, n, step)]
    return Stage([anchors, candidates], [[0], list(range(1, len(reps)))], chunks, float(inner.scale))


def _mnsrl(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict) -> Stage | None:
    """CachedMultipleNegativesSymmetricRankingLoss with this project's ``_symmetric_loss`` (3.1.0 - 3.3.1):
    per chunk, anchors against all candidates and the chunk's positives against all anchors, halved."""
    if getattr(type(inner), "_symmetric_loss", None) is None:  # the release's own (defective) formula
        return None
    stage = _mnrl(inner, reps, args, kwargs)
    if stage is None:
        return None
    n, step = stage.sources[0].shape[0], inner.mini_batch_size
    stage.chunks = [
        [Problem(b, min(b + step, n), [Block(0, 1)], 0.5 / n), Problem(b, min(b + step, n), [Block(1, 0)], 0.5 / n)]
        for b in range(0, n, step)
    ]
    return stage


def _gist(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict) -> Stage | None:
    """CachedGISTEmbedLoss 2.7.0 - 3.3.1: anchor-positive, anchor-anchor, positive-positive and
    anchor-negative blocks; a candidate is masked where the guide scores it above the positive."""
    if kwargs or len(args) != 1:
        return None
    guided = args[0]
    if len(guided) != len(reps) or not 2 <= len(reps) <= (3 if _release() < Version("3.2.0") else len(reps)):
        return None
    sim = inner.similarity_fct
    if not (type(sim) is nn.CosineSimilarity and sim.dim == -1 and _is_plain_cross_entropy(inner.cross_entropy_loss)):
        return None
    if not (_is_real(inner.temperature) and inner.temperature != 0):
        return None
    sources = [_cat(reps, [c]) for c in range(len(reps))]
    guide = [torch.cat(g, dim=0) for g in guided]
    n, step = sources[0].shape[0], inner.mini_batch_size

    def chunks() -> Iterator[list[Problem]]:
        for b in range(0, n, step):
            e = b + step
            # The release's own guide similarities and masks, once for every width.
            guided_ap = inner.sim_matrix(guide[0][b:e], guide[1])
            threshold = guided_ap.diagonal(offset=b).view(-1, 1)
            blocks = [
                Block(0, 1, guided_ap > threshold),
                Block(0, 0, inner.sim_matrix(guide[0][b:e], guide[0]) > threshold),
                Block(1, 1, inner.sim_matrix(guide[1][b:e], guide[1]) > threshold),
            ]
            blocks += [Block(0, i, inner.sim_matrix(guide[0][b:e], guide[i]) > threshold) for i in range(2, len(reps))]
            yield [Problem(b, min(e, n), blocks, 1.0 / n)]

    return Stage(sources, [[c] for c in range(len(reps))], chunks(), 1.0 / inner.temperature)


#: class name -> (releases, adapter, loss-stage methods it reproduces).
Adapter = Callable[[nn.Module, list, tuple, dict], "Stage | None"]
VARIANTS: dict[str, list[tuple[str, Adapter]]] = {
    "CachedMultipleNegativesRankingLoss": [(">=2.4.0,<3.4.0", _mnrl)],
    "CachedMultipleNegativesSymmetricRankingLoss": [(">=3.1.0,<3.4.0", _mnsrl)],
    "CachedGISTEmbedLoss": [(">=2.7.0,<3.4.0", _gist)],
}
METHODS = ("calculate_loss_and_cache_gradients", "calculate_loss")


def _variant(class_name: str) -> Adapter | None:
    from packaging.specifiers import SpecifierSet

    release = _release()
    for releases, adapter in VARIANTS.get(class_name, []):
        if release in SpecifierSet(releases):
            return adapter
    return None


def covers(class_name: str) -> bool:
    """Whether this release's ``class_name`` (e.g. "CachedGISTEmbedLoss") can take the shared path."""
    return _variant(class_name) is not None


def _adapter(inner: nn.Module, method: Callable[..., Any]) -> Adapter | None:
    cls = type(inner)
    if not cls.__module__.startswith("sentence_transformers."):
        return None  # a user's subclass may compute anything
    name = getattr(method, "__name__", None)
    if name not in METHODS or getattr(method, "__func__", None) is not getattr(cls, name, None):
        return None  # not the release's own loss-stage method
    return _variant(cls.__name__)


def loss_stage(
    method: Callable[..., Tensor],
    caching: bool,
    inner: nn.Module,
    dims_weights: Sequence[tuple[int, float]],
    reps: list[list[Tensor]],
    *args: Any,
    **kwargs: Any,
) -> SharedStage | None:
    """The inner loss stage for every width at once: the weighted loss, d(loss)/d(reps) or None.

    ``caching``: the stage back-propagates (the caller's reading of the method and its ``with_backward``
    argument); without it no gradient is computed. None where this configuration is not covered: the
    caller runs the generic per-width path. Reporting the gradients (``self.cache``, ``rep.grad``) is
    the caller's, the same for both paths.
    """
    result = _loss_stage(method, caching, inner, dims_weights, reps, *args, **kwargs)
    path_counts["generic" if result is None else "shared"] += 1
    return result


def _loss_stage(
    method: Callable[..., Tensor],
    caching: bool,
    inner: nn.Module,
    dims_weights: Sequence[tuple[int, float]],
    reps: list[list[Tensor]],
    *args: Any,
    **kwargs: Any,
) -> SharedStage | None:
    if generic_forced() or not dims_weights:
        return None
    adapter = _adapter(inner, method)
    if adapter is None or not reps or not all(reps):
        return None
    first = reps[0][0]
    width = first.shape[-1]
    if first.dtype not in (torch.float32, torch.float64) or _autocast():
        return None  # the release's loss stage would compute in a lower precision: keep its numerics
    if any(r.dim() != 2 or r.dtype != first.dtype or r.device != first.device for rs in reps for r in rs):
        return None
    if any(not isinstance(d, int) or not 1 <= d <= width or not _is_real(w) for d, w in dims_weights):
        return None
    stage = adapter(inner, reps, args, kwargs)
    if stage is None:
        return None
    widths = Widths(dims_weights)
    with torch.no_grad():
        total, grads, per_width = run_problems(stage.sources, stage.chunks, widths, stage.scale, caching)
    losses = dict(zip(widths.dims, per_width.unbind()))
    if grads is None:
        return SharedStage(total, None, losses)
    cache: list[list[Tensor]] = [[] for _ in reps]
    for grad, columns in zip(grads, stage.source_columns):
        sizes = [sum(r.shape[0] for r in reps[c]) for c in columns]
        for c, part in zip(columns, grad.split(sizes)):
            cache[c] = list(part.split([r.shape[0] for r in reps[c]]))
    return SharedStage(total, cache, losses)

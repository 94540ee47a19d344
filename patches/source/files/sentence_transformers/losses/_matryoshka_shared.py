"""One loss stage for every Matryoshka width: MatryoshkaLoss around the built-in cached losses.

Truncate-after-cache (``_matryoshka_cache.py`` on 2.4.0 - 3.3.1, native MatryoshkaLoss's
``CachedLossDecorator`` from 3.4.0) calls the inner loss stage once per Matryoshka width on truncated,
re-normalised copies of the cached embeddings. Every width thereby recomputes a similarity product at
that width, a softmax and a backward per mini-batch, plus a backward through each truncation (and,
gathering across devices, an all-gather of every column). The widths are prefixes of one vector, so
most of that work is shared:

- the dot product at width d is the sum of the dot products of the width segments below d: one
  product per segment (together one full-width product), summed cumulatively, gives the dot
  products of every width; the prefix norms come from cumulative sums of squares, so
  ``cos_d(x, y) = (x[:d] . y[:d]) / (|x[:d]| |y[:d]|)`` needs no truncated copies and no second
  normalisation (the inner cosine similarity of a re-normalised vector is the dot product);
- what does not depend on the width is computed once: CachedGISTEmbedLoss's guide similarities
  and false-negative masks (the guide is never truncated), the direction masks and hardness
  selections of the 5.3+ ranking loss, and the all-gather of every column (once per step, at full
  width, through the release's own ``all_gather_with_grad``, which the gradients go back through);
- the gradient is written by hand: per width the softmax minus the one-hot label, weighted, scaled
  back to the dot products; the reverse cumulative sum over widths gives each segment's gradient,
  so the backward is again one product per segment; the norm terms are added once at the end.

The loss stage stays chunked by mini-batch exactly like the inner loss (same chunks, same per-chunk
weights), and the widths of a chunk are processed in groups bounded by :data:`WIDTH_GROUP_ELEMENTS`
so that the score tensors alive at once stay bounded at large batch sizes.

Which configurations take this path: an inner loss whose class is one of the release's own cached
losses listed in :data:`VARIANTS` for this release, with the release's own loss-stage method, a
similarity of ``util.cos_sim`` / ``util.dot_score`` (MNRL family), a plain ``nn.CrossEntropyLoss``,
float32/float64 embeddings outside autocast and widths between 1 and the embedding width. Anything
else - a user's own similarity function or loss, a subclass, an unknown option or release - returns
None and takes the generic per-width path, which calls the release's own loss stage
per width and stays exact. ``ST_MATRYOSHKA_GENERIC=1`` (environment) or ``FORCE_GENERIC = True``
(this module) forces the generic path; :data:`path_counts` counts which path ran.

Entry points: :func:`loss_stage` for the backport's driver (the outermost loss-stage call of the
GradCache protocol), :func:`calculate_loss` for a native release's ``CachedLossDecorator``. The module
imports nothing of sentence-transformers at import time, so the same file serves every release and
both package layouts.
"""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from packaging.specifiers import SpecifierSet
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


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (or for CUDA, where older torch only reports that)."""
    try:
        return torch.is_autocast_enabled(device_type) or torch.is_autocast_enabled()
    except TypeError:  # torch < 2.4: no device argument
        cpu = getattr(torch, "is_autocast_cpu_enabled", None)
        return torch.is_autocast_enabled() or bool(cpu and cpu())


def generic_forced() -> bool:
    return FORCE_GENERIC or os.environ.get(ENV_FORCE_GENERIC, "").strip() not in ("", "0")


# --- the engine: every width of a set of softmax problems, chunk by chunk --------------------------


@dataclass
class Block:
    """Scores of rows ``sources[row][start:start + rows]`` against all of ``sources[col]``, optionally masked.

    ``start`` is the problem's ``begin`` unless given (e.g. a chunk's positives among candidates gathered
    across ranks). ``penalty``: a hardness term ``penalty * cos`` added to each score that carries no
    gradient (``alpha * stop_grad(cos)``, 5.3+ MNRL), the same at every width but for the cosine itself.
    """

    row: int
    col: int
    mask: Tensor | None = None  # True where the score is -inf (the same for every width)
    start: int | None = None
    penalty: Tensor | None = None


@dataclass
class Problem:
    """One cross-entropy over the concatenated blocks; row i's label is column ``label + i`` (default
    ``begin + i``).

    ``factor`` multiplies the sum over rows (e.g. 1 / batch size: the release's per-chunk mean times
    the chunk's share of the batch).
    """

    begin: int
    end: int
    blocks: list[Block]
    factor: float
    label: int | None = None


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
    rows = problem.end - problem.begin
    x0 = srcs[problem.blocks[0].row].x
    spans, cols = [], 0  # each block's columns in the concatenated scores
    for block in problem.blocks:
        n = srcs[block.col].x.shape[0]
        spans.append(slice(cols, cols + n))
        cols += n
    label = problem.begin if problem.label is None else problem.label
    labels = torch.arange(label, label + rows, device=x0.device)  # row i's label is column label + i
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
                r, c, rs = srcs[block.row], srcs[block.col], _rows(block, problem)
                if k == 0:
                    torch.mm(r.x[rs, seg], c.x[:, seg].T, out=dot)
                else:
                    dot.addmm_(r.x[rs, seg], c.x[:, seg].T)
                # scale / (|x[:d]| |y[:d]|), one factor per score, reused for the gradient
                torch.mul(r.inv[rs, k : k + 1] * scale, c.inv[None, :, k], out=factors[:, span])
                torch.mul(dot, factors[:, span], out=scores[:, span])
                if block.penalty is not None:  # + penalty * cos, without gradient
                    cos = dot * r.inv[rs, k : k + 1] * c.inv[None, :, k]
                    scores[:, span].addcmul_(cos, block.penalty)
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
                r, c, rs = srcs[block.row], srcs[block.col], _rows(block, problem)
                gd = torch.mul(g[:, span], dot, out=scores[:, span])
                r.inv_grad[rs, k].addcmul_(gd.sum(dim=1), r.denom[rs, k], value=weight)
                c.inv_grad[:, k].addcmul_(gd.sum(dim=0), c.denom[:, k], value=weight)
        if with_grad:
            _propagate(srcs, problem, widths, ks, grads, spans)
        done = ks[-1] + 1
    return total


def _rows(block: Block, problem: Problem) -> slice:
    """The rows of ``block``'s row source that the problem's rows are."""
    start = problem.begin if block.start is None else block.start
    return slice(start, start + problem.end - problem.begin)


def _propagate(
    srcs: list[_Source], problem: Problem, widths: Widths, ks: range, grads: list[Tensor], spans: list[slice]
) -> None:
    """Gradients of the dot products of widths ``ks`` onto the segments below each width.

    The dot product at width k sums the segment products j <= k, so segment j receives the weighted
    sum of the gradients of the widths k >= j: accumulated from the widest width of the group down,
    then once for all segments below the group.
    """
    last = len(ks) - 1
    acc = grads[last].mul_(widths.weights[ks[last]] * problem.factor)
    for i in range(last, -1, -1):
        k = ks[i]
        if i < last:
            acc.add_(grads[i], alpha=widths.weights[k] * problem.factor)
        _segment_grad(srcs, problem, acc, spans, widths.segment(k))
    if ks[0] > 0:
        _segment_grad(srcs, problem, acc, spans, slice(0, widths.bounds[ks[0]]))


def _segment_grad(srcs: list[_Source], problem: Problem, acc: Tensor, spans: list[slice], seg: slice) -> None:
    for block, span in zip(problem.blocks, spans):
        r, c, rs = srcs[block.row], srcs[block.col], _rows(block, problem)
        g = acc[:, span]
        r.grad[rs, seg].addmm_(g, c.x[:, seg])
        c.grad[:, seg].addmm_(g.T, r.x[rs, seg])


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


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


#: ``_gather(inner)`` when the loss gathers across devices but this module cannot find the release's gather.
_NO_GATHER_FUNCTION = object()


def _gather(inner: nn.Module) -> Any:
    """The release's ``all_gather_with_grad`` where ``inner`` gathers its embeddings across the ranks of an
    initialised process group (``gather_across_devices``, 5.1.0+), else None (no process group: the release's
    gather returns the local tensor and the rank offset is 0)."""
    if not getattr(inner, "gather_across_devices", False):
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    # The gather the loss stage calls: a global of the module that defines it (for a subclass, e.g. 5.3+
    # CachedMultipleNegativesSymmetricRankingLoss, its base class's module).
    stage = getattr(type(inner), "calculate_loss", None)
    return getattr(stage, "__globals__", {}).get("all_gather_with_grad") or _NO_GATHER_FUNCTION


@dataclass
class Stage:
    """An inner loss stage expressed for :func:`run_problems`."""

    sources: list[Tensor]
    source_columns: list[list[int]]  # input columns concatenated into each (local) source, in order
    chunks: Iterable[list[Problem]]  # computed chunk by chunk (GIST's masks are mini-batch x batch)
    scale: float
    #: The gradients of the (gathered) sources -> the gradients of the local embeddings (None: the same).
    to_local: Callable[[list[Tensor]], list[Tensor]] | None = None


class _Sources:
    """The sources of a stage: each the concatenation of some input columns' full-width embeddings.

    Where the loss gathers across ranks, each column is gathered once per step, at full width, with the
    release's own gather (upstream gathers once per width, each of already truncated embeddings), and
    the gradients of the gathered tensors go back through that gather, so every rank receives exactly
    the gradients the release's loss stage would give it.
    """

    def __init__(self, reps: list[list[Tensor]], gather: Any, with_grad: bool) -> None:
        self.reps = reps
        self.gather = gather
        self.with_grad = with_grad
        self.tensors: list[Tensor] = []
        self.columns: list[list[int]] = []
        self.parts: list[list[tuple[Tensor, Tensor]] | None] = []  # per source: (local leaf, gathered)

    def add(self, columns: Iterable[int], gathered: bool = True) -> int:
        columns = list(columns)
        local = [torch.cat(self.reps[c]).detach() for c in columns]
        if self.gather is None or not gathered:
            self.parts.append(None)
            self.tensors.append(torch.cat(local) if len(local) > 1 else local[0])
        else:
            leaves = [t.requires_grad_(self.with_grad) for t in local]
            with torch.set_grad_enabled(self.with_grad):
                parts = [(leaf, self.gather(leaf)) for leaf in leaves]
            self.parts.append(parts)
            self.tensors.append(torch.cat([out.detach() for _, out in parts]))
        self.columns.append(columns)
        return len(self.tensors) - 1

    def to_local(self, grads: list[Tensor]) -> list[Tensor]:
        out = []
        for grad, parts in zip(grads, self.parts):
            if parts is None:
                out.append(grad)
                continue
            for (_, gathered), part in zip(parts, grad.split([g.shape[0] for _, g in parts])):
                gathered.backward(part)  # one collective per column, in the same order on every rank
            out.append(torch.cat([leaf.grad for leaf, _ in parts]))
        return out

    def stage(self, chunks: Iterable[list[Problem]], scale: float) -> Stage:
        gathered = any(parts is not None for parts in self.parts)
        return Stage(self.tensors, self.columns, chunks, scale, self.to_local if gathered else None)


def _sources(inner: nn.Module, reps: list[list[Tensor]], with_grad: bool) -> _Sources | None:
    """The stage's sources, gathered where ``inner`` gathers across devices; None where the release's gather
    cannot be found (the generic path then calls the release's stage, which finds it)."""
    gather = _gather(inner)
    return None if gather is _NO_GATHER_FUNCTION else _Sources(reps, gather, with_grad)


def _gathered_value(gather: Any, tensor: Tensor) -> Tensor:
    """``tensor`` of every rank (no gradient: e.g. the guide's embeddings), gathered once per step."""
    if gather is None:
        return tensor
    with torch.no_grad():
        return gather(tensor)


def _ranking_inputs_supported(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict) -> bool:
    """The MNRL family's own inputs: no extra arguments, a cosine or dot similarity, a real scale."""
    if args or kwargs or len(reps) < 2:
        return False
    return _similarity_is_cosine_or_dot(inner.similarity_fct) and _is_real(inner.scale)


def _mnrl(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict, with_grad: bool) -> Stage | None:
    """CachedMultipleNegativesRankingLoss 2.4.0 - 5.2.x: anchors against positives and negatives; from 5.1.0
    with ``gather_across_devices`` against the candidates of every rank (the anchors stay local), the label
    offset by the rank."""
    if not (_ranking_inputs_supported(inner, reps, args, kwargs) and _is_plain_cross_entropy(inner.cross_entropy_loss)):
        return None
    sources = _sources(inner, reps, with_grad)
    if sources is None:
        return None
    anchors, candidates = sources.add([0], gathered=False), sources.add(range(1, len(reps)))
    n, step = sources.tensors[anchors].shape[0], inner.mini_batch_size
    offset = _rank() * n if sources.gather else 0
    chunks = [
        [Problem(b, min(b + step, n), [Block(anchors, candidates)], 1.0 / n, label=offset + b)]
        for b in range(0, n, step)
    ]
    return sources.stage(chunks, float(inner.scale))


def _symmetric_formula(inner: nn.Module) -> bool:
    """Whether the loss stage ranks every anchor for each positive of the chunk: this project's fix (the
    backport's ``_symmetric_loss`` on 3.1.0 - 3.3.1, the fix series' loss stage on 3.4.0 - 5.0.0) or upstream's
    own from 5.1.0 (#3442) - not the defective formula of the releases without them."""
    cls = type(inner)
    if getattr(cls, "_symmetric_loss", None) is not None:
        return True
    code = getattr(getattr(cls, "calculate_loss", None), "__code__", None)
    return code is not None and "backward_scores" in code.co_varnames


def _mnsrl(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict, with_grad: bool) -> Stage | None:
    """CachedMultipleNegativesSymmetricRankingLoss 3.1.0 - 5.2.x with the symmetric formula: per chunk, the
    chunk's anchors against all candidates and the chunk's positives against all anchors, halved; from 5.1.0
    with ``gather_across_devices`` the anchors and candidates of every rank."""
    if not _symmetric_formula(inner) or not _ranking_inputs_supported(inner, reps, args, kwargs):
        return None
    if not _is_plain_cross_entropy(inner.cross_entropy_loss):
        return None
    sources = _sources(inner, reps, with_grad)
    if sources is None:
        return None
    anchors, candidates = sources.add([0]), sources.add(range(1, len(reps)))
    n, step = sum(r.shape[0] for r in reps[0]), inner.mini_batch_size
    offset = _rank() * n if sources.gather else 0
    chunks = []
    for b in range(offset, offset + n, step):
        e = min(b + step, offset + n)
        chunks.append(
            [Problem(b, e, [Block(anchors, candidates)], 0.5 / n), Problem(b, e, [Block(candidates, anchors)], 0.5 / n)]
        )
    return sources.stage(chunks, float(inner.scale))


DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def _mnrl_directions(
    inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict, with_grad: bool
) -> Stage | None:
    """CachedMultipleNegativesRankingLoss 5.3.0 - 6.2.0 (and CachedMultipleNegativesSymmetricRankingLoss, its
    subclass there): the score blocks of ``directions`` (query -> documents, -> queries without itself;
    document -> queries, -> documents without its own query's), one softmax over all of them ("joint") or one
    per direction, averaged ("per_direction"); the hardness penalty ``hardness_strength * stop_grad(cos)`` on
    the negatives ``hardness_mode`` names; with ``gather_across_devices`` queries and documents of every rank.
    """
    if not _ranking_inputs_supported(inner, reps, args, kwargs):
        return None
    directions = set(getattr(inner, "directions", ()) or ())
    partition, hardness = getattr(inner, "partition_mode", None), getattr(inner, "hardness_mode", None)
    strength = getattr(inner, "hardness_strength", 0.0)
    if "query_to_doc" not in directions or not directions <= set(DIRECTIONS):
        return None
    if partition not in ("joint", "per_direction") or hardness not in HARDNESS_MODES or not _is_real(strength):
        return None
    if partition == "per_direction" and directions & {"query_to_query", "doc_to_doc"}:
        return None  # the release refuses it (the positive is in neither block)
    sources = _sources(inner, reps, with_grad)
    if sources is None:
        return None
    queries, docs = sources.add([0]), sources.add(range(1, len(reps)))
    n, step = sum(r.shape[0] for r in reps[0]), inner.mini_batch_size
    world, num_docs = sources.tensors[queries].shape[0], len(reps) - 1
    offset = _rank() * n if sources.gather else 0
    penalised = hardness if hardness is not None and strength > 0.0 else None
    x = sources.tensors[queries]

    def chunks() -> Iterator[list[Problem]]:
        for b in range(offset, offset + n, step):
            e = min(b + step, offset + n)
            own = torch.zeros(e - b, world, dtype=torch.bool, device=x.device)  # each row's own column
            own[torch.arange(e - b, device=x.device), torch.arange(b, e, device=x.device)] = True
            penalty = None
            if penalised is not None:
                penalty = _hardness_penalty(penalised, own, num_docs).to(x.dtype).mul_(strength)
            blocks = [Block(queries, docs, start=b, penalty=penalty)]
            if "query_to_query" in directions:
                blocks.append(Block(queries, queries, mask=own, start=b))
            if "doc_to_query" in directions:
                blocks.append(Block(docs, queries, start=b))  # the rows are the chunk's positives
            if "doc_to_doc" in directions:
                blocks.append(Block(docs, docs, mask=own.repeat(1, num_docs), start=b))
            if partition == "joint":
                yield [Problem(b, e, blocks, 1.0 / n)]
            else:  # the positive is column b + i of every block
                yield [Problem(b, e, [block], 1.0 / (n * len(blocks))) for block in blocks]

    return sources.stage(chunks(), float(inner.scale))


def _hardness_penalty(mode: str, own: Tensor, num_docs: int) -> Tensor:
    """Where the hardness penalty applies among the query -> documents scores (True), per ``hardness_mode``."""
    own_docs = own.repeat(1, num_docs)  # the row's positive and its own hard negatives
    if mode == "hard_negatives":
        own_docs[:, : own.shape[1]] = False
        return own_docs
    if mode == "in_batch_negatives":
        return ~own_docs
    penalised = torch.ones_like(own_docs)  # all_negatives: every score but the positive
    penalised[:, : own.shape[1]] = ~own
    return penalised


#: GISTEmbedLoss semantics that changed between releases (the releases that have them).
GIST_PROTECTS_POSITIVE = ">=4.1.0"  # margin_strategy / margin, and the positive exempt from masking
GIST_RELATIVE_MARGIN_OF_ABS = ">=5.6.0"  # "relative": g > g_pos - |g_pos| * m (before: g > g_pos * (1 - m))
GIST_PROTECTS_LABEL_COLUMN = ">=5.6.0"  # the exempt column is the label's (before: begin + i, also when gathered)


def _gist(inner: nn.Module, reps: list[list[Tensor]], args: tuple, kwargs: dict, with_grad: bool) -> Stage | None:
    """CachedGISTEmbedLoss 2.7.0 - 6.2.0: anchor-positive, anchor-anchor, positive-positive and anchor-negative
    blocks (anchor-anchor and positive-positive switchable from 5.1.0); a candidate is masked where the guide
    scores it above the positive (less a margin from 4.1.0, which exempts the positive itself); from 5.1.0
    with ``gather_across_devices`` against the candidates (and guide embeddings) of every rank."""
    if kwargs or len(args) != 1:
        return None
    guided = args[0]
    release = _release()
    max_columns = 3 if release < Version("3.2.0") else len(reps)
    if not isinstance(guided, (list, tuple)) or len(guided) != len(reps) or not 2 <= len(reps) <= max_columns:
        return None
    sim = inner.similarity_fct
    if not (type(sim) is nn.CosineSimilarity and sim.dim == -1 and _is_plain_cross_entropy(inner.cross_entropy_loss)):
        return None
    strategy, margin = getattr(inner, "margin_strategy", "absolute"), getattr(inner, "margin", 0.0)
    if strategy not in ("absolute", "relative") or not _is_real(margin):
        return None
    if not (_is_real(inner.temperature) and inner.temperature != 0):
        return None
    sources = _sources(inner, reps, with_grad)
    if sources is None:
        return None
    anchors = sources.add([0], gathered=False)
    candidates = [sources.add([c]) for c in range(1, len(reps))]
    guide = [torch.cat(guided[0], dim=0)] + [_gathered_value(sources.gather, torch.cat(g, dim=0)) for g in guided[1:]]
    n, step = sources.tensors[anchors].shape[0], inner.mini_batch_size
    offset = _rank() * n if sources.gather else 0
    contrast_anchors, contrast_positives = (
        getattr(inner, "contrast_anchors", True),
        getattr(inner, "contrast_positives", True),
    )
    protects = release in SpecifierSet(GIST_PROTECTS_POSITIVE)
    relative_of_abs = release in SpecifierSet(GIST_RELATIVE_MARGIN_OF_ABS)
    protected_start = offset if release in SpecifierSet(GIST_PROTECTS_LABEL_COLUMN) else 0

    def chunks() -> Iterator[list[Problem]]:
        for b in range(0, n, step):
            e = min(b + step, n)
            # The release's own guide similarities and masks, once for every width.
            guided_ap = inner.sim_matrix(guide[0][b:e], guide[1])
            positive = guided_ap.diagonal(offset=offset + b).view(-1, 1)
            if strategy == "absolute":
                threshold = positive - margin
            elif relative_of_abs:
                threshold = positive - positive.abs() * margin
            else:
                threshold = positive * (1 - margin)
            ap_mask = guided_ap > threshold
            if protects:
                rows = torch.arange(e - b, device=ap_mask.device)
                ap_mask[rows, protected_start + b + rows] = False
            blocks = [Block(anchors, candidates[0], ap_mask)]
            if contrast_anchors:
                blocks.append(Block(anchors, anchors, inner.sim_matrix(guide[0][b:e], guide[0]) > threshold))
            if contrast_positives:
                own = guide[1][offset + b : offset + e]
                blocks.append(
                    Block(candidates[0], candidates[0], inner.sim_matrix(own, guide[1]) > threshold, offset + b)
                )
            for i in range(1, len(candidates)):
                negatives = inner.sim_matrix(guide[0][b:e], guide[i + 1]) > threshold
                blocks.append(Block(anchors, candidates[i], negatives))
            yield [Problem(b, e, blocks, 1.0 / n, label=offset + b)]

    return sources.stage(chunks(), 1.0 / inner.temperature)


#: class name -> (releases, adapter) of the release's own loss stage.
Adapter = Callable[[nn.Module, list, tuple, dict, bool], "Stage | None"]
VARIANTS: dict[str, list[tuple[str, Adapter]]] = {
    "CachedMultipleNegativesRankingLoss": [(">=2.4.0,<5.3.0", _mnrl), (">=5.3.0,<6.3.0", _mnrl_directions)],
    "CachedMultipleNegativesSymmetricRankingLoss": [(">=3.1.0,<5.3.0", _mnsrl), (">=5.3.0,<6.3.0", _mnrl_directions)],
    "CachedGISTEmbedLoss": [(">=2.7.0,<6.3.0", _gist)],
}
METHODS = ("calculate_loss_and_cache_gradients", "calculate_loss")


def _variant(class_name: str) -> Adapter | None:
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
    if getattr(method, "__self__", None) is not inner:
        return None
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


def calculate_loss(
    method: Callable[..., Tensor],
    dims_weights: Sequence[tuple[int, float]],
    reps: list[list[Tensor]],
    args: tuple,
    kwargs: dict,
) -> SharedStage | None:
    """For native MatryoshkaLoss (3.4.0+), whose CachedLossDecorator stands in for the inner loss's
    ``calculate_loss(reps, ..., with_backward=...)``: that call, ``method(reps, *args, **kwargs)``, for every
    width at once. With ``with_backward`` the gradients are added to ``rep.grad`` of the cached embeddings,
    as the release's own ``calculate_loss`` leaves them. None: not covered, the caller loops over the widths.
    """
    result = None
    try:
        bound = inspect.signature(method).bind(reps, *args, **kwargs)
    except (TypeError, ValueError):
        bound = None
    if bound is not None:
        arguments = list(bound.arguments.items())[1:]  # after reps
        with_backward = bool(dict(arguments).get("with_backward", False))
        # The in-batch losses ignore their labels (5.7+ passes them); everything else is the stage's own input.
        rest = tuple(value for name, value in arguments if name not in ("with_backward", "labels"))
        if with_backward == torch.is_grad_enabled():  # else the release's own stage raises, or returns a graph
            result = _loss_stage(method, with_backward, getattr(method, "__self__", None), dims_weights, reps, *rest)
    path_counts["generic" if result is None else "shared"] += 1
    if result is not None and result.grads is not None:
        for rs, gs in zip(reps, result.grads):
            for r, g in zip(rs, gs):
                if r.requires_grad and r.is_leaf:
                    r.grad = g if r.grad is None else r.grad + g
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
    if generic_forced() or not dims_weights or not isinstance(inner, nn.Module):
        return None
    adapter = _adapter(inner, method)
    if adapter is None or not reps or not all(reps):
        return None
    first = reps[0][0]
    width = first.shape[-1]
    if first.dtype not in (torch.float32, torch.float64) or _autocast(first.device.type):
        return None  # the release's loss stage would compute in a lower precision: keep its numerics
    if any(r.dim() != 2 or r.dtype != first.dtype or r.device != first.device for rs in reps for r in rs):
        return None
    if any(not isinstance(d, int) or not 1 <= d <= width or not _is_real(w) for d, w in dims_weights):
        return None
    stage = adapter(inner, reps, args, kwargs, caching)
    if stage is None:
        return None
    widths = Widths(dims_weights)
    with torch.no_grad():
        total, grads, per_width = run_problems(stage.sources, stage.chunks, widths, stage.scale, caching)
    losses = dict(zip(widths.dims, per_width.unbind()))
    if grads is None:
        return SharedStage(total, None, losses)
    if stage.to_local is not None:
        grads = stage.to_local(grads)
    cache: list[list[Tensor]] = [[] for _ in reps]
    for grad, columns in zip(grads, stage.source_columns):
        sizes = [sum(r.shape[0] for r in reps[c]) for c in columns]
        for c, part in zip(columns, grad.split(sizes)):
            cache[c] = list(part.split([r.shape[0] for r in reps[c]]))
    return SharedStage(total, cache, losses)

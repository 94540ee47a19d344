"""The axes of the equivalence checks, and one :class:`Case` = one point on them.

Why generated, not listed: each axis is varied around a base case (and the cheap shape axes are
crossed), so adding a value to an axis adds checks for every loss at once, and the test ids say
exactly which axis value failed (the registry matches on them).

Axes:
- dims/weights: unsorted with the full width and non-uniform weights (base), four dims uniform,
  two dims far apart, the full width alone;
- n_dims_per_step: -1 (all), 1, 2, and more than the number of dims. Seeds are chosen so that the
  sampled indices are NOT in ascending order and skip the full width (exposes "ignored" and
  order-dependent caching);
- mini-batch size 5 (ragged last chunk of 13), 13 (= batch), 32 (> batch);
- 2, 3, 4 input columns (GIST non-cached: 2-3);
- cosine and dot similarity (MNRL family). Truncation re-normalises, so cos == dot mathematically:
  the dot axis is what catches a missing re-normalisation.
- GIST: margins (absolute / relative) and contrast_* switches where the release has them;
- MNRL (5.3.0+): ``directions``, ``partition_mode`` and the hardness modes, where the release has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from conformance import compat
from conformance.oracle import InnerSpec, MatryoshkaSpec

NONCACHED_NAME = {"mnrl": "MNRL", "mnsrl": "MNSRL", "gist": "GIST"}
CACHED_NAME = compat.SHORT
INNER_KINDS = ("mnrl", "mnsrl", "gist")


@dataclass(frozen=True)
class Case:
    kind: str
    cached: bool
    dims: tuple[int, ...] = (8, 32, 16)
    weights: tuple[float, ...] | None = (1.0, 0.5, 2.0)
    n_dims_per_step: int = -1
    mini_batch_size: int = 5
    columns: int = 3
    similarity: str = "cos"
    gist: dict = field(default_factory=dict, hash=False)
    ranking: dict = field(default_factory=dict, hash=False)  # MNRL options (directions, ...), 5.3.0+
    seed: int = 5
    label: str = "base"

    @property
    def name(self) -> str:
        return (CACHED_NAME if self.cached else NONCACHED_NAME)[self.kind]

    @property
    def id(self) -> str:
        return f"{self.name}-{self.label}"

    def inner_spec(self) -> InnerSpec:
        if self.kind == "gist":
            return InnerSpec(kind="gist", **compat.gist_semantics(**self.gist))
        return InnerSpec(kind=self.kind, similarity=self.similarity, **self.ranking)

    def matryoshka_spec(self) -> MatryoshkaSpec:
        return MatryoshkaSpec(
            dims=self.dims,
            weights=self.weights,
            n_dims_per_step=self.n_dims_per_step,
            sorts_dims=compat.SORTS_DIMS,
            seed=self.seed,
        )

    def reference_key(self, batch: str = "A") -> tuple:
        """What the reference depends on (not the mini-batch size, nor cached vs non-cached)."""
        mat = self.matryoshka_spec()
        return (self.inner_spec(), tuple(mat.selected()), self.columns, batch)

    def inner_loss(self, model, guide=None):
        return compat.make_inner_loss(
            self.inner_spec(), model, guide, cached=self.cached, mini_batch_size=self.mini_batch_size
        )

    def st_loss(self, model, guide=None, inner=None):
        inner = self.inner_loss(model, guide) if inner is None else inner
        return compat.matryoshka_loss(
            model, inner, self.dims, list(self.weights) if self.weights else None, self.n_dims_per_step
        )


def available(kind: str, cached: bool) -> bool:
    return compat.has_cached(kind) if cached else compat.loss_class(compat.LOSS_NAMES[kind][0]) is not None


def _dims_cases(base: Case) -> list[Case]:
    four = replace(base, dims=(32, 16, 8, 4), weights=None, seed=0)
    out = [
        replace(base, label="dims8_32_16-w1_0.5_2"),
        replace(four, label="dims32_16_8_4-uniform"),
        replace(base, dims=(4, 32), weights=(1.0, 3.0), label="dims4_32-w1_3"),
        replace(base, dims=(32,), weights=(0.7,), label="dims32-w0.7"),
    ]
    for n in (1, 2, 5) if compat.MATRYOSHKA_HAS_NDPS else ():
        out.append(replace(base, n_dims_per_step=n, label=f"dims8_32_16-ndps{n}"))
        out.append(replace(four, n_dims_per_step=n, label=f"dims32_16_8_4-ndps{n}"))
    return out


def _shape_cases(base: Case) -> list[Case]:
    out = []
    sims = ("cos",) if base.kind == "gist" else ("cos", "dot")
    max_cols = 4
    if base.kind == "gist":
        max_cols = min(max_cols, compat.CACHED_GIST_MAX_COLUMNS if base.cached else compat.NONCACHED_GIST_MAX_COLUMNS)
    mbs_values = (5, 13, 32) if base.cached else (5,)
    prefix = "mbs{mbs}-" if base.cached else ""
    # mini-batch size x columns, cosine; then dot on two shapes (the similarity axis is orthogonal).
    grid = [(mbs, cols, "cos") for mbs in mbs_values for cols in (2, 3, 4)]
    grid += [(mbs_values[0], 3, sim) for sim in sims[1:]] + [(mbs_values[-1], 2, sim) for sim in sims[1:]]
    for mbs, cols, sim in dict.fromkeys(grid):
        if cols <= max_cols:
            label = prefix.format(mbs=mbs) + f"cols{cols}-{sim}"
            out.append(replace(base, mini_batch_size=mbs, columns=cols, similarity=sim, label=label))
    return out


def _gist_cases(base: Case) -> list[Case]:
    out = []
    if compat.GIST_HAS_MARGIN:
        out.append(replace(base, gist={"margin_strategy": "absolute", "margin": 0.02}, label="margin-abs0.02"))
        out.append(replace(base, gist={"margin_strategy": "relative", "margin": 0.02}, label="margin-rel0.02"))
    if compat.GIST_HAS_CONTRAST:
        out.append(replace(base, gist={"contrast_anchors": False}, label="no-contrast-anchors"))
        out.append(replace(base, gist={"contrast_positives": False}, label="no-contrast-positives"))
    return out


def _ranking_cases(base: Case) -> list[Case]:
    """The 5.3.0+ MNRL options: every direction in one softmax, the symmetric pair per direction, each
    hardness mode (hard negatives need a negative column), once with the dot similarity."""
    if not compat.ranking_options(base.cached):
        return []
    every = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    symmetric = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    out = [
        replace(base, ranking={"directions": every}, label="directions-all-joint"),
        replace(base, ranking={"directions": every}, mini_batch_size=13, columns=4, label="mbs13-directions-all-joint"),
        replace(base, ranking=symmetric, label="directions-symmetric-per-direction"),
        replace(
            base,
            ranking={**symmetric, "hardness_mode": "all_negatives", "hardness_strength": 3.0},
            similarity="dot",
            label="directions-symmetric-hardness-all-dot",
        ),
    ]
    for mode, strength in (("in_batch_negatives", 9.0), ("hard_negatives", 5.0), ("all_negatives", 3.0)):
        ranking = {"hardness_mode": mode, "hardness_strength": strength}
        out.append(replace(base, ranking=ranking, label=f"hardness-{mode}-{strength:g}"))
    out.append(
        replace(
            base,
            ranking={"directions": every, "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
            label="directions-all-hardness-in-batch",
        )
    )
    return out


def equivalence_cases(cached: bool) -> list[Case]:
    """Every case for the loss family ``cached`` (True: Cached*, False: plain) that this release has."""
    out = []
    for kind in INNER_KINDS:
        if not available(kind, cached):
            continue
        base = Case(kind=kind, cached=cached)
        out += _dims_cases(base) + _shape_cases(base)
        if kind == "gist":
            out += _gist_cases(base)
        if kind == "mnrl":
            out += _ranking_cases(base)
    return out


def base_case(kind: str, cached: bool = True, **changes) -> Case:
    return replace(Case(kind=kind, cached=cached), **changes)

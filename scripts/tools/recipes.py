"""The backport series' recipes: each concern's edit, expressed against each release's own text.

A recipe takes a file's LF text and returns the edited text, or raises RecipeError when it does not
find exactly the text it edits, so a release that differs is reported instead of patched wrongly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

LOSSES = "sentence_transformers/losses"
MATRYOSHKA = f"{LOSSES}/MatryoshkaLoss.py"
ADAPTIVE_LAYER = f"{LOSSES}/AdaptiveLayerLoss.py"
SYMMETRIC = f"{LOSSES}/CachedMultipleNegativesSymmetricRankingLoss.py"


def import_path(path: str) -> str:
    """The dotted module name of a file of the package: ``a/b/c.py`` -> ``a.b.c``."""
    return path.removesuffix(".py").replace("/", ".")


class RecipeError(RuntimeError):
    """A recipe did not find the text it edits: the release differs from what the recipe knows."""


def _sub_once(
    pattern: str, replacement: str | Callable[[re.Match], str], text: str, what: str, flags: int = re.M
) -> str:
    """Replace the one match of ``pattern`` (literally, or by calling ``replacement`` on the match)."""
    func = replacement if callable(replacement) else (lambda _m: replacement)
    new, count = re.subn(pattern, func, text, flags=flags)
    if count != 1:
        raise RecipeError(f"{what}: expected exactly one match of {pattern!r}, found {count}")
    return new


# --- recipes: the same change, expressed against each release's own text ------------------------

MATRYOSHKA_DOC = """\
        Cached losses:
            With a cached (GradCache) loss such as :class:`CachedMultipleNegativesRankingLoss`, the embeddings
            are cached at full width and every Matryoshka dimension is truncated and re-normalised in the loss
            stage; the gradients of all dimensions are summed onto the full-width embeddings, so the second,
            gradient-carrying forward pass runs once.

"""

MATRYOSHKA_DISPATCH = """\
        if is_gradcache_loss(self.loss):
            # Cached losses re-embed in a backward hook, after the forward decorator below is gone:
            # keep the cache at full width and truncate in the loss stage instead.
            return matryoshka_cached_forward(self, sentence_features, labels)
"""


def edit_matryoshka(text: str) -> str:
    """MatryoshkaLoss: dispatch GradCache inner losses to truncate-after-cache; drop the warnings."""
    what = MATRYOSHKA
    text = _sub_once(r"^import warnings\n", "", text, what)
    for cls in ("CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss"):
        text = re.sub(rf"^from sentence_transformers\.losses\.{cls} import {cls}\n", "", text, flags=re.M)
        text = re.sub(rf"^ +if isinstance\(loss, {cls}\):\n +warnings\.warn\([^\n]*\)\n", "", text, flags=re.M)
    if "warnings." in text or "isinstance(loss, Cached" in text:
        raise RecipeError(f"{what}: unexpected remaining use of warnings or Cached* classes")
    text = _sub_once(
        r"^from sentence_transformers import SentenceTransformer\n",
        "from sentence_transformers import SentenceTransformer\n"
        "from sentence_transformers.losses._matryoshka_cache import is_gradcache_loss, matryoshka_cached_forward\n",
        text,
        what,
    )
    text = _sub_once(r"^ +Requirements:\n +1\. The base loss cannot be [^\n]*\n\n", MATRYOSHKA_DOC, text, what)
    text = _sub_once(
        r"^    def forward\(self, sentence_features: [^\n]*\) -> Tensor:\n",
        lambda match: match.group(0) + MATRYOSHKA_DISPATCH,
        text,
        what,
    )
    return text


SYMMETRIC_STAGE = '''\
    def _symmetric_loss(self, reps: list[list[Tensor]], with_backward: bool) -> Tensor:
        """MultipleNegativesSymmetricRankingLoss over the whole batch, computed mini-batch by mini-batch.

        Forward direction: each anchor of the chunk against every candidate; backward direction: each
        positive of the chunk against every anchor. Each chunk's term is weighted by its share of the
        batch, so the sum equals the full-batch loss, and backward() per chunk keeps the graph small.
        """
        embeddings_a = torch.cat(reps[0])  # (bsz, hdim)
        embeddings_b = torch.cat([torch.cat(r) for r in reps[1:]])  # ((1 + nneg) * bsz, hdim)

        batch_size = len(embeddings_a)
        labels = torch.arange(batch_size, device=embeddings_a.device)
        losses: list[torch.Tensor] = []
        for b in tqdm.trange(
            0,
            batch_size,
            self.mini_batch_size,
            desc="Preparing caches" if with_backward else "Calculating loss",
            disable=not self.show_progress_bar,
        ):
            e = min(b + self.mini_batch_size, batch_size)
            forward_scores: Tensor = self.similarity_fct(embeddings_a[b:e], embeddings_b) * self.scale
            forward_loss: torch.Tensor = self.cross_entropy_loss(forward_scores, labels[b:e])
            # The positives of this chunk are candidates b:e; score each of them against every anchor.
            backward_scores: Tensor = self.similarity_fct(embeddings_a, embeddings_b[b:e]).t() * self.scale
            backward_loss: torch.Tensor = self.cross_entropy_loss(backward_scores, labels[b:e])
            loss_mbatch = (forward_loss + backward_loss) / 2 * (e - b) / batch_size
            if with_backward:
                loss_mbatch.backward()
                loss_mbatch = loss_mbatch.detach()
            losses.append(loss_mbatch)

        return sum(losses)

    def calculate_loss_and_cache_gradients(self, reps: list[list[Tensor]]) -> Tensor:
        """Calculate the symmetric loss and cache gradients."""
        loss = self._symmetric_loss(reps, with_backward=True).requires_grad_()
        self.cache = [[r.grad for r in rs] for rs in reps]
        return loss

    def calculate_loss(self, reps: list[list[Tensor]]) -> Tensor:
        """Calculate the symmetric loss without caching gradients (for evaluation)."""
        return self._symmetric_loss(reps, with_backward=False)

'''


ADAPTIVE_LAYER_REFUSAL = """\
        # A cached (GradCache) loss re-embeds in a backward hook, after this loss has restored the model's
        # layers: every layer's gradient would land on the final layer's embeddings. Refuse it, also inside
        # MatryoshkaLoss, instead of training with wrong gradients.
        {call}(self, loss)
"""


def append_to_adaptive_layer_init(text: str, call: str, what: str) -> str:
    """AdaptiveLayerLoss.__init__ ends with the checks of ``loss`` (assert, "not compatible" warning); add a
    check after them, leaving upstream's lines as they are."""
    return _sub_once(
        r"^        assert isinstance\(self\.model\[0\], Transformer\)\n(?:        .*\n)*(?=\n    def )",
        lambda m: m.group(0) + ADAPTIVE_LAYER_REFUSAL.format(call=call),
        text,
        what,
    )


def edit_adaptive_layer(text: str) -> str:
    """AdaptiveLayerLoss (and Matryoshka2dLoss): refuse a GradCache loss, directly or inside MatryoshkaLoss."""
    what = ADAPTIVE_LAYER
    text = _sub_once(
        r"^from sentence_transformers import SentenceTransformer\n",
        "from sentence_transformers import SentenceTransformer\n"
        "from sentence_transformers.losses._matryoshka_cache import refuse_under_adaptive_layers\n",
        text,
        what,
    )
    return append_to_adaptive_layer_init(text, "refuse_under_adaptive_layers", what)


ADAPTIVE_LAYER_CHECK = """\
        # A cached (GradCache) loss, alone or inside MatryoshkaLoss, is trained with every layer in its cache
        # (see _adaptive_layer_cache.py); any other chain that holds one is refused with a clear error.
        check_adaptive_layer_loss(self, loss)
"""

ADAPTIVE_LAYER_DISPATCH = """\
        if uses_layer_cache(self):
            # Cached losses re-embed in a backward hook, after the decorators below are gone: keep every
            # layer in the cache and push each layer's gradients in one second forward pass instead.
            return adaptive_layer_cached_forward(self, sentence_features, labels)
"""


def edit_adaptive_layer_cached(text: str) -> str:
    """AdaptiveLayerLoss (and Matryoshka2dLoss): train a GradCache loss with the layers in its cache instead of
    refusing it; drop upstream's "not compatible" warnings, which flag exactly that combination."""
    what = ADAPTIVE_LAYER
    text = _sub_once(
        r"^from sentence_transformers\.losses\._matryoshka_cache import refuse_under_adaptive_layers\n",
        "from sentence_transformers.losses._adaptive_layer_cache import (\n"
        "    adaptive_layer_cached_forward,\n"
        "    check_adaptive_layer_loss,\n"
        "    uses_layer_cache,\n"
        ")\n",
        text,
        what,
    )
    refusal = ADAPTIVE_LAYER_REFUSAL.format(call="refuse_under_adaptive_layers")
    text = _sub_once(re.escape(refusal), ADAPTIVE_LAYER_CHECK, text, what)
    text = _sub_once(
        r"^            1\. The base loss cannot be :class:`Cached[^\n]*\n",
        "            1. A cached (GradCache) loss is supported on its own or inside one :class:`MatryoshkaLoss`.\n",
        text,
        what,
    )
    text, count = re.subn(r"^ +if isinstance\(loss, Cached\w+\):\n +warnings\.warn\([^\n]*\)\n", "", text, flags=re.M)
    if count == 0 or "warnings.warn(" in text:
        raise RecipeError(f"{what}: expected upstream's 'not compatible' warnings and no other warnings.warn")
    return _sub_once(
        r"^    def forward\(self, sentence_features: [^\n]*\) -> Tensor:\n",
        lambda match: match.group(0) + ADAPTIVE_LAYER_DISPATCH,
        text,
        what,
    )


def edit_adaptive_layer_detach_kl_target(text: str) -> str:
    """AdaptiveLayerLoss: detach the KL term's target (the final layer's softmax), as upstream does from 5.7.0
    (PR #3880, issue #3757), so the self-distillation term trains the prior layers only, not the teacher."""
    return _sub_once(
        r"^( +)final_embeddings = F\.softmax\(final_embeddings / self\.kl_temperature, dim=-1\)\n",
        lambda m: (
            f"{m.group(1)}# The final layer is the self-distillation teacher, so keep it out of the KL gradient"
            f" (#3757)\n{m.group(0)[:-1]}.detach()\n"
        ),
        text,
        ADAPTIVE_LAYER,
    )


def edit_symmetric(text: str) -> str:
    """CachedMultipleNegativesSymmetricRankingLoss: the MNSRL formula across mini-batches."""
    return _sub_once(
        r"^    def calculate_loss_and_cache_gradients\(self, reps: list\[list\[Tensor\]\]\) -> Tensor:\n"
        r".*?(?=^    def forward\()",
        SYMMETRIC_STAGE,
        text,
        SYMMETRIC,
        flags=re.M | re.S,
    )


def edit_matryoshka_sort_dims(text: str) -> str:
    """MatryoshkaLoss: sort the dims (and their weights) descending, as upstream does from 3.0.1 (#2719)."""
    return _sub_once(
        r"^        self\.matryoshka_dims = matryoshka_dims\n"
        r"        if matryoshka_weights is None:\n"
        r"            matryoshka_weights = \[1\] \* len\(matryoshka_dims\)\n"
        r"        self\.matryoshka_weights = matryoshka_weights\n",
        "        if matryoshka_weights is None:\n"
        "            matryoshka_weights = [1] * len(matryoshka_dims)\n"
        "        # Sort the dimensions and weights in descending order: the forward decorator caches the output of\n"
        "        # the first dimension and truncates it for the others, so the first must be the largest.\n"
        "        dims_weights = zip(matryoshka_dims, matryoshka_weights)\n"
        "        self.matryoshka_dims, self.matryoshka_weights = zip(*sorted(dims_weights, key=lambda x: x[0], reverse=True))\n",
        text,
        MATRYOSHKA,
    )


def edit_matryoshka_sorted_sample(text: str) -> str:
    """MatryoshkaLoss.forward: keep the sampled dims in descending order, as upstream does from 4.0.0 (#3203)."""
    head, sep, body = text.partition("\nclass MatryoshkaLoss(")
    if not sep:
        raise RecipeError(f"{MATRYOSHKA}: no class MatryoshkaLoss")
    body = _sub_once(
        r"^( +)dim_indices = random\.sample\(dim_indices, self\.n_dims_per_step\)\n",
        lambda m: m.group(0) + f"{m.group(1)}dim_indices.sort()\n",
        body,
        MATRYOSHKA,
    )
    return head + sep + body


SHRINK_CHECK = """\
        tensor_dim = tensor.shape[-1]
        if self.dim > tensor_dim:
            raise ValueError(
                f"Dimension {self.dim} in matryoshka_dims cannot be greater than the model's embedding dimension: {tensor_dim}"
            )
"""


def edit_matryoshka_check_dims(text: str) -> str:
    """MatryoshkaLoss: a dim wider than the embedding raises; model.forward is restored on errors (#2593, 2.7.0)."""
    text = _sub_once(
        r"^    def shrink\(self, tensor: Tensor\) -> Tensor:\n",
        lambda m: m.group(0) + SHRINK_CHECK,
        text,
        MATRYOSHKA,
    )

    def try_finally(match: re.Match) -> str:
        body = match.group(2).rstrip("\n").split("\n")
        indented = "\n".join(f"    {line}" if line else "" for line in body)
        return (
            f"{match.group(1)}        try:\n{indented}\n"
            "        finally:\n"
            "            self.model.forward = original_forward\n"
            "        return loss\n"
        )

    return _sub_once(
        r"^(        original_forward = self\.model\.forward\n)"
        r"((?:        [^\n]*\n|\n)*?)"
        r"        self\.model\.forward = original_forward\n"
        r"        return loss\n",
        try_finally,
        text,
        MATRYOSHKA,
    )


def edit_matryoshka_validate_arguments(text: str) -> str:
    """MatryoshkaLoss.__init__: reject empty or non-positive dims and weights of another length (#3530, 5.1.2)."""
    return _sub_once(
        r"^        if matryoshka_weights is None:\n"
        r"            matryoshka_weights = \[1\] \* len\(matryoshka_dims\)\n",
        "        if not matryoshka_dims:\n"
        '            raise ValueError("You must provide at least one dimension in matryoshka_dims.")\n'
        "        if any(dim <= 0 for dim in matryoshka_dims):\n"
        '            raise ValueError("All dimensions passed to a matryoshka loss must be > 0.")\n'
        "        if matryoshka_weights is None:\n"
        "            matryoshka_weights = [1] * len(matryoshka_dims)\n"
        "        elif len(matryoshka_weights) != len(matryoshka_dims):\n"
        '            raise ValueError("matryoshka_weights must be the same length as matryoshka_dims.")\n',
        text,
        MATRYOSHKA,
    )


def _matryoshka_class(text: str) -> tuple[str, str]:
    """(everything before ``class MatryoshkaLoss(``, the class and what follows it)."""
    head, sep, body = text.partition("\nclass MatryoshkaLoss(")
    if not sep:
        raise RecipeError(f"{MATRYOSHKA}: no class MatryoshkaLoss")
    return head, sep + body


NDPS_CHECK = """\
        if n_dims_per_step == 0 or n_dims_per_step < -1:
            raise ValueError(
                "n_dims_per_step must be a positive number of dimensions to sample per step, "
                f"or -1 to use all dimensions, not {n_dims_per_step}."
            )
"""


def edit_matryoshka_validate_n_dims_per_step(text: str) -> str:
    """MatryoshkaLoss.__init__: n_dims_per_step 0 or below -1 raises instead of silently meaning "all"."""
    head, body = _matryoshka_class(text)
    body = _sub_once(
        r"^        self\.n_dims_per_step = n_dims_per_step\n", lambda m: NDPS_CHECK + m.group(0), body, MATRYOSHKA
    )
    return head + body


REFUSE_MINI_BATCHED_MEGABATCH = '''\
def _refuse_mini_batched_megabatch(loss) -> None:
    """Raise a clear ValueError for MegaBatchMarginLoss in its mini-batched mode (the default).

    Before sentence-transformers 5.7.0 that mode is not the batch loss: it returns the last mini-batch's
    mean and drops every other mini-batch's gradient (upstream fixed it in 5.7.0, PR #3862, by moving it
    onto the GradCache engine). Around it MatryoshkaLoss would train every dimension on that, so it
    refuses the combination; the full-batch mode (use_mini_batched_version=False) is exact.
    """
    mini_batched = getattr(loss, "forward_mini_batched", None)
    if mini_batched is None or vars(loss).get("forward") != mini_batched:
        return
    name = type(loss).__name__
    raise ValueError(
        f"MatryoshkaLoss cannot train {name} in its mini-batched mode (use_mini_batched_version=True, the "
        "default) on this sentence-transformers release: that mode back-propagates only the last mini-batch's "
        "loss, dropping every other mini-batch's gradient (fixed upstream in 5.7.0, PR #3862). Use "
        f"{name}(..., use_mini_batched_version=False), or sentence-transformers 5.7.0 or later."
    )

'''


def edit_matryoshka_refuse_mini_batched_megabatch(text: str) -> str:
    """MatryoshkaLoss.__init__: refuse the pre-5.7 mini-batched MegaBatchMarginLoss with a clear error."""
    head, body = _matryoshka_class(text)
    body = _sub_once(
        r"^        self\.loss = loss\n",
        lambda m: m.group(0) + "        _refuse_mini_batched_megabatch(loss)\n",
        body,
        MATRYOSHKA,
    )
    return head + "\n" + REFUSE_MINI_BATCHED_MEGABATCH + body


SAMPLE_DIM_INDICES = '''\
def sample_dim_indices(dim_indices: range, n_dims_per_step: int) -> {list_of_int}:
    """``random.sample(dim_indices, n_dims_per_step)``, the same on every rank of a process group.

    Under an initialised torch.distributed process group every rank uses rank 0's sample: ranks whose
    Python random state differs would otherwise train different dimensions in the same step, and a loss
    that gathers embeddings across ranks (one all-gather per dimension) would call collectives of
    different sizes, which aborts or hangs the job. Every rank still draws its own sample, so its random
    state advances exactly as in a single process.
    """
    sampled = random.sample(dim_indices, n_dims_per_step)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [sampled]
        dist.broadcast_object_list(shared, src=0)
        sampled = shared[0]
    return sampled


'''


def edit_matryoshka_same_dims_on_every_rank(text: str) -> str:
    """MatryoshkaLoss: every rank of a torch.distributed process group samples rank 0's dimensions."""
    calls = text.count("random.sample(")
    text, count = re.subn(
        r"\brandom\.sample\(dim_indices, self\.n_dims_per_step\)",
        "sample_dim_indices(dim_indices, self.n_dims_per_step)",
        text,
    )
    if count == 0 or count != calls:
        raise RecipeError(f"{MATRYOSHKA}: expected every random.sample call to sample dim_indices, found {calls}")
    text = _sub_once(
        r"^import torch\.nn\.functional as F\n", lambda m: "import torch.distributed\n" + m.group(0), text, MATRYOSHKA
    )
    # Without postponed annotations (before 3.1.0) ``list[int]`` fails on Python 3.8, which those releases support.
    if "from __future__ import annotations" in text:
        helper = SAMPLE_DIM_INDICES.format(list_of_int="list[int]")
    elif re.search(r"^from typing import [^\n]*\bList\b", text, flags=re.M):
        helper = SAMPLE_DIM_INDICES.format(list_of_int="List[int]")
    else:
        raise RecipeError(f"{MATRYOSHKA}: neither postponed annotations nor typing.List")
    return _sub_once(r"^class ForwardDecorator\b", lambda m: helper + m.group(0), text, MATRYOSHKA)


MATRYOSHKA_2D = f"{LOSSES}/Matryoshka2dLoss.py"


def edit_matryoshka2d_relative_imports(text: str) -> str:
    """Matryoshka2dLoss: import its base classes from their modules (as 3.1.0 does, #2907).

    ``from sentence_transformers.losses import AdaptiveLayerLoss, MatryoshkaLoss`` runs while
    ``losses/__init__`` is still importing, and binds the submodule ``MatryoshkaLoss``, not the class:
    constructing Matryoshka2dLoss then fails with "TypeError: 'module' object is not callable".
    """
    return _sub_once(
        r"^from sentence_transformers\.losses import AdaptiveLayerLoss, MatryoshkaLoss\n"
        r"from sentence_transformers\.SentenceTransformer import SentenceTransformer\n",
        "from sentence_transformers import SentenceTransformer\n"
        "\n"
        "from .AdaptiveLayerLoss import AdaptiveLayerLoss\n"
        "from .MatryoshkaLoss import MatryoshkaLoss\n",
        text,
        MATRYOSHKA_2D,
    )


@dataclass(frozen=True)
class Concern:
    """One patch of a series: one reviewable change.

    A concern applies to the releases of its kind (backport or fix series) inside ``releases``; each of
    them must have every file it edits. Concerns sharing a slug (one patch, one message) exist once per
    module layout, with disjoint ranges.
    """

    slug: str  # names patches/source/messages/<slug>.txt
    edits: dict[str, Callable[[str], str]]  # existing file -> recipe
    adds: tuple[str, ...] = ()  # files copied from patches/source/files/
    releases: str = ""  # a packaging specifier; empty: every release
    writes: dict[str, Callable[[], str]] = field(default_factory=dict)  # new file -> its text, made from the source

    @property
    def added(self) -> tuple[str, ...]:
        """Every file the concern creates: copied (``adds``) or made (``writes``)."""
        return (*self.adds, *self.writes)

    def in_range(self, version: str) -> bool:
        return Version(version) in SpecifierSet(self.releases)

    def applies(self, tree: Path, version: str, added: frozenset[str] = frozenset()) -> bool:
        """Whether the release gets this patch: its range says so. A file the concern edits that the
        release lacks inside that range is an error (the range is wrong), never a silent skip, unless an
        earlier patch of the series adds it (``added``)."""
        if not self.in_range(version):
            return False
        missing = [p for p in self.edits if p not in added and not (tree / p).exists()]
        if missing:
            raise RecipeError(
                f"concern {self.slug}: {', '.join(missing)} missing in sentence-transformers {version}, which is "
                f"inside its declared range {self.releases or '(every release)'}; fix the range in concerns.py"
            )
        return True

"""Fixes of upstream's native MatryoshkaLoss + cached-loss support (releases 3.4.0 and later).

One concern per upstream defect, so a maintainer can take each patch on its own. Losses live in
``sentence_transformers/losses/<CamelCase>.py`` up to 5.3.x and in
``sentence_transformers/sentence_transformer/losses/<snake_case>.py`` from 5.4.0: a defect whose files
differ between the layouts has one concern per layout, sharing the message (slug). ``releases`` limits
each concern to the releases measured to have the defect.
"""

from __future__ import annotations

import re

from .recipes import LOSSES, Concern, RecipeError, _sub_once, append_to_adaptive_layer_init

NEW_LOSSES = "sentence_transformers/sentence_transformer/losses"


def _paths(old: str, new: str) -> tuple[str, str]:
    return f"{LOSSES}/{old}.py", f"{NEW_LOSSES}/{new}.py"


MATRYOSHKA_OLD, MATRYOSHKA_NEW = _paths("MatryoshkaLoss", "matryoshka")
GIST_OLD, GIST_NEW = _paths("GISTEmbedLoss", "gist_embed")
CMNRL_OLD, CMNRL_NEW = _paths("CachedMultipleNegativesRankingLoss", "cached_multiple_negatives_ranking")
CGIST_OLD, CGIST_NEW = _paths("CachedGISTEmbedLoss", "cached_gist_embed")
CMNSRL_OLD = f"{LOSSES}/CachedMultipleNegativesSymmetricRankingLoss.py"
ADAPTIVE_LAYER_OLD, ADAPTIVE_LAYER_NEW = _paths("AdaptiveLayerLoss", "adaptive_layer")
MATRYOSHKA_2D_OLD, MATRYOSHKA_2D_NEW = _paths("Matryoshka2dLoss", "matryoshka_2d")


# --- 1. n_dims_per_step reaches the CachedLossDecorator (3.4.0 - 5.3.x) ---------------------------


def edit_matryoshka_n_dims_per_step(text: str) -> str:
    """MatryoshkaLoss: pass n_dims_per_step to the CachedLossDecorator (5.4.0 does, commit 97d995e3)."""
    return _sub_once(
        r"^( +loss\.calculate_loss, self\.matryoshka_dims, self\.matryoshka_weights)\n",
        lambda m: m.group(1) + ", self.n_dims_per_step\n",
        text,
        "MatryoshkaLoss",
    )


# --- 2. GISTEmbedLoss: the guide must not overwrite the model's cached outputs (3.4.0 - 5.6.x) -----


def edit_gist_guide_copy(text: str) -> str:
    """GISTEmbedLoss: run the guide on shallow copies of the features (as 5.7.0 does, #3862)."""
    return _sub_once(
        r"^( +)guide_embeddings = \[\n"
        r"( +)self\.guide\(sentence_feature\)\[\"sentence_embedding\"\] for sentence_feature in sentence_features\n",
        lambda m: (
            f"{m.group(1)}# Run the guide on shallow copies: it writes its outputs into the features it is\n"
            f"{m.group(1)}# given, and loss decorators like MatryoshkaLoss reuse the dicts the model filled.\n"
            f"{m.group(1)}guide_embeddings = [\n"
            f'{m.group(2)}self.guide(dict(sentence_feature))["sentence_embedding"] for sentence_feature in sentence_features\n'
        ),
        text,
        "GISTEmbedLoss",
    )


# --- 3. legacy CachedMultipleNegativesSymmetricRankingLoss across mini-batches (3.4.0 - 5.0.0) -----
# recipes.edit_symmetric (the backport's fix) matches this text too, but it routes the cached path
# around calculate_loss(reps, with_backward), the method native MatryoshkaLoss decorates: reusing it
# would make MatryoshkaLoss(CMNSRL) silently train the full dimension only. So the same math is
# applied inside the native calculate_loss instead.


def edit_symmetric_native(text: str) -> str:
    """CMNSRL.calculate_loss: score each chunk's positives against every anchor; weight chunks by size."""
    what = "CachedMultipleNegativesSymmetricRankingLoss"
    text = _sub_once(
        r"^( +)scores: Tensor = self\.similarity_fct\(embeddings_a\[b:e\], embeddings_b\) \* self\.scale\n"
        r"\1forward_loss: torch\.Tensor = self\.cross_entropy_loss\(scores, labels\[b:e\]\)\n"
        r"\n"
        r"\1positive_scores = scores\[:, b:e\]\n"
        r"\1backward_loss: torch\.Tensor = self\.cross_entropy_loss\(positive_scores\.t\(\), labels\[: len\(positive_scores\)\]\)\n"
        r"\n"
        r"\1loss_mbatch = \(forward_loss \+ backward_loss\) / 2\n",
        lambda m: (
            f"{m.group(1)}scores: Tensor = self.similarity_fct(embeddings_a[b:e], embeddings_b) * self.scale\n"
            f"{m.group(1)}forward_loss: torch.Tensor = self.cross_entropy_loss(scores, labels[b:e])\n"
            "\n"
            f"{m.group(1)}# The positives of this chunk are candidates b:e: rank every anchor for each of them.\n"
            f"{m.group(1)}backward_scores: Tensor = self.similarity_fct(embeddings_b[b:e], embeddings_a) * self.scale\n"
            f"{m.group(1)}backward_loss: torch.Tensor = self.cross_entropy_loss(backward_scores, labels[b:e])\n"
            "\n"
            f"{m.group(1)}# Weight each chunk by its share of the batch, so that the sum is the full-batch loss.\n"
            f"{m.group(1)}loss_mbatch = (forward_loss + backward_loss) / 2 * (e - b) / batch_size\n"
        ),
        text,
        what,
    )
    return _sub_once(
        r"^( +)loss = sum\(losses\) / len\(losses\)\n", lambda m: f"{m.group(1)}loss = sum(losses)\n", text, what
    )


# --- 4. the backward hook gets its forward pass's cache (3.4.0 - 5.6.x) ----------------------------

HOOK_DOC = '''\
    """A backward hook to backpropagate the cached gradients mini-batch by mini-batch.

    ``cache`` and ``random_states`` belong to the forward pass that registered this hook. They are bound
    then instead of read off ``loss_obj`` now, so that a second forward pass before this backward pass
    cannot make the hook back-propagate the other batch's gradients.
    """
'''


def edit_hook_binds_cache(text: str) -> str:
    """Cached losses: bind the gradient cache and random states into the backward hook at forward time."""
    what = "_backward_hook"
    match = re.search(r"^def _backward_hook\(\n.*?\n\n\n", text, flags=re.M | re.S)
    if not match or text.count("\ndef _backward_hook(") != 1:
        raise RecipeError(f"{what}: expected exactly one module-level _backward_hook")
    hook = match.group(0)
    hook = _sub_once(
        r"\Adef _backward_hook\(\n\s*grad_output: Tensor,\s+sentence_features: Iterable\[(dict|Dict)\[str, Tensor\]\],"
        r"\s+loss_obj: (\w+),?\n\)(?: -> None)?:\n"
        r'    """A backward hook to backpropagate the cached gradients mini-batch by mini-batch\."""\n'
        r"    assert loss_obj\.cache is not None\n"
        r"    assert loss_obj\.random_states is not None\n",
        lambda m: (
            "def _backward_hook(\n"
            "    grad_output: Tensor,\n"
            f"    sentence_features: Iterable[{m.group(1)}[str, Tensor]],\n"
            f"    loss_obj: {m.group(2)},\n"
            "    cache: list[list[Tensor]],\n"
            "    random_states: list[list[RandContext]],\n"
            ") -> None:\n" + HOOK_DOC
        ),
        hook,
        what,
    )
    hook = _sub_once(
        r"^( +)for sentence_feature, grad, random_states in zip\(sentence_features, loss_obj\.cache, loss_obj\.random_states\):\n",
        lambda m: (
            f"{m.group(1)}for sentence_feature, grad, column_random_states in zip(sentence_features, cache, random_states):\n"
        ),
        hook,
        what,
    )
    hook = _sub_once(
        r"^( +)random_states=random_states,\n",
        lambda m: f"{m.group(1)}random_states=column_random_states,\n",
        hook,
        what,
    )
    text = text[: match.start()] + hook + text[match.end() :]
    return _sub_once(
        r"^( +)loss\.register_hook\(partial\(_backward_hook, sentence_features=sentence_features, loss_obj=self\)\)\n",
        lambda m: (
            f"{m.group(1)}loss.register_hook(\n"
            f"{m.group(1)}    partial(\n"
            f"{m.group(1)}        _backward_hook,\n"
            f"{m.group(1)}        sentence_features=sentence_features,\n"
            f"{m.group(1)}        loss_obj=self,\n"
            f"{m.group(1)}        cache=self.cache,\n"
            f"{m.group(1)}        random_states=self.random_states,\n"
            f"{m.group(1)}    )\n"
            f"{m.group(1)})\n"
        ),
        text,
        what,
    )


# --- 5. MatryoshkaLoss decorates calculate_loss per call, not at construction (3.4.0 - 6.2.0) -------

PER_CALL_FORWARD = """\
        # For the gradient-caching (Cached...) losses, decorate `calculate_loss` of the loss for this call only, as
        # model.forward is decorated below: decorating it once at construction mutated the loss for good, and a
        # second MatryoshkaLoss around the same loss stacked its decorator on top of the first one.
        if {condition}:
            shadowed = vars(self.loss).get("calculate_loss")
            self.loss.calculate_loss = CachedLossDecorator(
                self.loss.calculate_loss, self.matryoshka_dims, self.matryoshka_weights, self.n_dims_per_step
            )
            try:
                return self.loss(sentence_features, labels)
            finally:
                if shadowed is None:
                    del self.loss.calculate_loss
                else:
                    self.loss.calculate_loss = shadowed
"""


def edit_matryoshka_per_call(text: str) -> str:
    """MatryoshkaLoss: shadow the inner loss's calculate_loss for the duration of forward() only."""
    what = "MatryoshkaLoss"
    text = _sub_once(
        r"^        if (?:isinstance\(loss, self\.cached_losses\)|self\.uses_gradient_cache):\n"
        r"            loss\.calculate_loss = CachedLossDecorator\(\n"
        r"                loss\.calculate_loss, self\.matryoshka_dims, self\.matryoshka_weights, self\.n_dims_per_step\n"
        r"            \)\n",
        "",
        text,
        what,
    )
    return _sub_once(
        r"^        # For the (?:Cached\.\.\.|gradient-caching) losses, the CachedLossDecorator has been applied to the "
        r"`calculate_loss`(?: method,)?\n"
        r"        # (?:method, )?so we can directly call the loss function\.\n"
        r"        if (isinstance\(self\.loss, self\.cached_losses\)|self\.uses_gradient_cache):\n"
        r"            return self\.loss\(sentence_features, labels\)\n",
        lambda m: PER_CALL_FORWARD.format(condition=m.group(1)),
        text,
        what,
    )


# --- 6. AdaptiveLayerLoss / Matryoshka2dLoss refuse gradient-cache losses (3.4.0 - 6.2.0) ----------

REFUSE_GRADIENT_CACHE = '''\
def _refuse_gradient_cache(owner: nn.Module, loss: nn.Module) -> None:
    """Raise a clear ValueError when ``loss`` is a gradient-cache (GradCache) loss or wraps one (e.g. inside
    MatryoshkaLoss), instead of training with wrong gradients or crashing in backward.

    Such a loss re-embeds its mini-batches in a backward hook, after ``owner`` has removed the decorators
    that select a layer's embeddings. A loss is a gradient-cache loss when its ``uses_gradient_cache``
    attribute says so, or, without that attribute, when it has ``embed_minibatch_iter`` or
    ``calculate_loss_and_cache_gradients`` (the GradCache methods, whatever its class).
    """

    def uses_cache(module: nn.Module) -> bool:
        declared = getattr(module, "uses_gradient_cache", None)
        if declared is not None:
            return bool(declared)
        markers = ("embed_minibatch_iter", "calculate_loss_and_cache_gradients")
        return any(callable(getattr(module, name, None)) for name in markers)

    chain = []
    module = loss
    while isinstance(module, nn.Module) and all(module is not seen for seen in chain):
        chain.append(module)
        module = getattr(module, "loss", None)
    cached = [index for index, module in enumerate(chain) if uses_cache(module)]
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


'''


def edit_adaptive_layer_refuse(text: str) -> str:
    """AdaptiveLayerLoss: raise on a gradient-cache loss, directly or inside MatryoshkaLoss (after the warning)."""
    what = "AdaptiveLayerLoss"
    text = _sub_once(
        r"^class AdaptiveLayerLoss\(nn\.Module\):\n", lambda m: REFUSE_GRADIENT_CACHE + m.group(0), text, what
    )
    return append_to_adaptive_layer_init(text, "_refuse_gradient_cache", what)


# --- 7. MatryoshkaLoss detects a gradient-cache loss by capability, not by class (3.4.0 - 6.2.0) -----

DETECT_GRADIENT_CACHE = '''\
def _uses_gradient_cache(loss: nn.Module, cached_losses: tuple[type, ...] = ()) -> bool:
    """Whether ``loss`` is a gradient-cache (GradCache) loss, whatever its class.

    Those are sentence-transformers' cached losses, a loss whose ``uses_gradient_cache`` attribute says
    so, and, without that attribute, any loss with ``embed_minibatch_iter`` or
    ``calculate_loss_and_cache_gradients`` (e.g. a user's own GradCache loss). MatryoshkaLoss truncates
    in its ``calculate_loss(reps, ..., with_backward=...)``: a gradient-cache loss without one raises a
    clear ValueError instead of crashing in backward or training the full dimension only.
    """
    declared = getattr(loss, "uses_gradient_cache", None)
    if isinstance(loss, cached_losses):
        cached = True
    elif declared is not None:
        cached = bool(declared)
    else:
        markers = ("embed_minibatch_iter", "calculate_loss_and_cache_gradients")
        cached = any(callable(getattr(loss, name, None)) for name in markers)
    if not cached:
        return False
    calculate_loss = getattr(loss, "calculate_loss", None)
    if not callable(calculate_loss) or "with_backward" not in inspect.signature(calculate_loss).parameters:
        name = type(loss).__name__
        raise ValueError(
            f"MatryoshkaLoss cannot drive {name}: it is a gradient-cache (GradCache) loss, but it has no "
            "calculate_loss(reps, ..., with_backward=...) method, the loss stage in which MatryoshkaLoss "
            f"truncates the cached embeddings. Give {name} one that back-propagates into reps when "
            "with_backward=True and call it from its forward (or its calculate_loss_and_cache_gradients), "
            "or use a loss without a gradient cache."
        )
    return True


'''


def edit_matryoshka_detect_protocol(text: str) -> str:
    """MatryoshkaLoss: take the cached path for any gradient-cache loss, or raise a clear error."""
    what = "MatryoshkaLoss"
    text = _sub_once(r"^import random\n", "import inspect\nimport random\n", text, what)
    text = _sub_once(
        r"^class MatryoshkaLoss\(nn\.Module\):\n", lambda m: DETECT_GRADIENT_CACHE + m.group(0), text, what
    )
    if "isinstance(self.loss, self.cached_losses)" in text:  # 3.4.0 - 5.6.x, after the per-call patch
        return _sub_once(
            r"^        if isinstance\(self\.loss, self\.cached_losses\):\n",
            "        if _uses_gradient_cache(self.loss, self.cached_losses):\n",
            text,
            what,
        )
    return _sub_once(  # 5.7.0 and later
        r"^        self\.uses_gradient_cache = uses_gradient_cache\(loss\)\n",
        "        self.uses_gradient_cache = _uses_gradient_cache(loss)\n",
        text,
        what,
    )


# --- 7b. MatryoshkaLoss drives a caching stage that back-propagates by itself (3.4.0 - 6.2.0) ------
# A patch of its own, apart from 7: that one recognises a gradient-cache loss by capability and refuses
# what the native CachedLossDecorator cannot truncate in; this one teaches MatryoshkaLoss the other
# loss-stage style, so a maintainer can take the detection without the new code path.

CACHING_STAGE = '''\
class CachingStageDecorator:
    """Truncation in ``calculate_loss_and_cache_gradients(reps, ...)`` of a gradient-cache loss that
    back-propagates by itself instead of calling ``calculate_loss(reps, ..., with_backward=True)``: a
    user's loss in the style of sentence-transformers 2.4 - 3.3 (its backward hook reads ``self.cache``)
    or one whose backward hook reads ``rep.grad``. CachedLossDecorator cannot reach such a stage.

    The stage runs once per Matryoshka dimension on truncated, re-normalised copies of the cached
    embeddings, mini-batch by mini-batch as the loss chunks it (no graph spans the batch). Each
    dimension's weighted gradients are chained back through the truncation onto the full-width
    embeddings, and the sums are put where the loss reads them: ``rep.grad`` of every cached embedding,
    and ``loss.cache`` when the stage set it.
    """

    def __init__(self, fn, loss: nn.Module, matryoshka_dims, matryoshka_weights, n_dims_per_step: int = -1) -> None:
        self.fn = fn
        self.loss = loss
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = matryoshka_weights
        self.n_dims_per_step = n_dims_per_step

    def __call__(self, reps: list[list[Tensor]], *args, **kwargs) -> Tensor:
        dim_indices = range(len(self.matryoshka_dims))
        if self.n_dims_per_step > 0 and self.n_dims_per_step < len(dim_indices):
            dim_indices = random.sample(dim_indices, self.n_dims_per_step)
        missing = object()
        cache_before = vars(self.loss).get("cache", missing)
        loss = 0.0
        # The stage back-propagates into its embeddings, also when it evaluates a loss without calculate_loss.
        with torch.enable_grad():
            for idx in dim_indices:
                dim = self.matryoshka_dims[idx]
                weight = self.matryoshka_weights[idx]
                truncated = [[shrink(r, dim) for r in minibatch] for minibatch in reps]
                matryoshka_reps = [[t.detach().requires_grad_() for t in minibatch] for minibatch in truncated]
                loss += weight * self.fn(matryoshka_reps, *args, **kwargs).detach()
                for t_minibatch, d_minibatch in zip(truncated, matryoshka_reps):
                    for t, d in zip(t_minibatch, d_minibatch):
                        if t.requires_grad and d.grad is not None:
                            t.backward(weight * d.grad)  # summed onto the full-width rep.grad
        if vars(self.loss).get("cache", missing) is not cache_before:
            self.loss.cache = [[_grad_or_zeros(r) for r in minibatch] for minibatch in reps]
        # A fresh leaf, as the stage returns one: the loss registers its backward hook on it.
        return loss.requires_grad_(torch.is_grad_enabled())


def _grad_or_zeros(rep: Tensor) -> Tensor:
    return rep.grad if rep.grad is not None else torch.zeros_like(rep)


def _truncates_in_caching_stage(loss: nn.Module) -> bool:
    """Whether MatryoshkaLoss must truncate in ``loss.calculate_loss_and_cache_gradients``: the loss has one,
    and no ``calculate_loss(reps, ..., with_backward=...)`` for CachedLossDecorator to truncate in."""
    if not callable(getattr(loss, "calculate_loss_and_cache_gradients", None)):
        return False
    calculate_loss = getattr(loss, "calculate_loss", None)
    return not callable(calculate_loss) or "with_backward" not in inspect.signature(calculate_loss).parameters


def _decorated_loss_stage(matryoshka_loss: nn.Module) -> tuple[str, Any]:
    """The loss stage of the inner loss that MatryoshkaLoss truncates in for this call: (name, decorated).

    With gradients, a loss whose ``calculate_loss_and_cache_gradients`` back-propagates by itself is
    truncated there; without gradients in its no-gradient ``calculate_loss(reps, ...)``, where it has one.
    """
    loss = matryoshka_loss.loss
    args = (matryoshka_loss.matryoshka_dims, matryoshka_loss.matryoshka_weights, matryoshka_loss.n_dims_per_step)
    evaluates_in_calculate_loss = callable(getattr(loss, "calculate_loss", None)) and not torch.is_grad_enabled()
    if _truncates_in_caching_stage(loss) and not evaluates_in_calculate_loss:
        stage = loss.calculate_loss_and_cache_gradients
        return "calculate_loss_and_cache_gradients", CachingStageDecorator(stage, loss, *args)
    return "calculate_loss", CachedLossDecorator(loss.calculate_loss, *args)


'''


def _slice(text: str, start: str, end: str | None) -> str:
    """``text`` from ``start`` to the first ``end`` after it (inclusive; None: to the end): the part of an
    earlier recipe's output that a later recipe replaces, taken from that recipe's own text."""
    begin = text.index(start)
    return text[begin:] if end is None else text[begin : text.index(end, begin) + len(end)]


# the text DETECT_GRADIENT_CACHE wrote (slices of it, so the two cannot drift apart)
DRIVE_OLD_CHECK = _slice(
    DETECT_GRADIENT_CACHE, '    calculate_loss = getattr(loss, "calculate_loss", None)\n', "        )\n"
)

DRIVE_NEW_CHECK = """\
    calculate_loss = getattr(loss, "calculate_loss", None)
    with_backward = callable(calculate_loss) and "with_backward" in inspect.signature(calculate_loss).parameters
    if not with_backward and not callable(getattr(loss, "calculate_loss_and_cache_gradients", None)):
        name = type(loss).__name__
        raise ValueError(
            f"MatryoshkaLoss cannot drive {name}: it is a gradient-cache (GradCache) loss, but it has neither "
            "a calculate_loss(reps, ..., with_backward=...) nor a calculate_loss_and_cache_gradients(reps, ...) "
            f"method, the loss stages in which MatryoshkaLoss truncates the cached embeddings. Give {name} "
            "one that back-propagates into reps and call it from its forward, or use a loss without a "
            "gradient cache."
        )
"""

DRIVE_OLD_DOC = _slice(
    DETECT_GRADIENT_CACHE, "    ``calculate_loss_and_cache_gradients`` (e.g.", "full dimension only.\n"
)

DRIVE_NEW_DOC = """\
    ``calculate_loss_and_cache_gradients`` (e.g. a user's own GradCache loss). MatryoshkaLoss truncates
    in its ``calculate_loss(reps, ..., with_backward=...)``, or in ``calculate_loss_and_cache_gradients``
    when that one back-propagates by itself: a gradient-cache loss with neither raises a clear ValueError
    instead of crashing in backward or training the full dimension only.
"""

DRIVE_OLD_SHADOW = _slice(PER_CALL_FORWARD, "            shadowed = ", None)

DRIVE_NEW_SHADOW = """\
            name, decorated = _decorated_loss_stage(self)
            shadowed = vars(self.loss).get(name)
            setattr(self.loss, name, decorated)
            try:
                return self.loss(sentence_features, labels)
            finally:
                if shadowed is None:
                    delattr(self.loss, name)
                else:
                    setattr(self.loss, name, shadowed)
"""


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    """Replace the one literal copy of ``old`` (text an earlier patch of the series wrote)."""
    if text.count(old) != 1:
        first = old.strip().splitlines()[0]
        raise RecipeError(f"{what}: expected exactly one copy of {first!r}, found {text.count(old)}")
    return text.replace(old, new)


def edit_matryoshka_drive_caching_stage(text: str) -> str:
    """MatryoshkaLoss: truncate in calculate_loss_and_cache_gradients where that is where the loss back-propagates."""
    what = "MatryoshkaLoss"
    if not re.search(r"^import torch$", text, flags=re.M) or not re.search(
        r"^from typing import .*\bAny\b", text, flags=re.M
    ):
        raise RecipeError(f"{what}: expected 'import torch' and typing.Any")
    text = _replace_once(text, DRIVE_OLD_CHECK, DRIVE_NEW_CHECK, what)
    text = _replace_once(text, DRIVE_OLD_DOC, DRIVE_NEW_DOC, what)
    text = _replace_once(text, DRIVE_OLD_SHADOW, DRIVE_NEW_SHADOW, what)
    return _sub_once(r"^def _uses_gradient_cache\(", lambda m: CACHING_STAGE + m.group(0), text, what)


# --- 8. the GradCache surrogate keeps float64 precision (5.7.0 - 6.1.x) -----------------------------

GRADCACHE = "sentence_transformers/base/losses/gradcache.py"

SURROGATE = """\
{i}# Under autocast the cached gradients are reduced-precision while this re-embedding
{i}# (inside backward, outside autocast) is fp32: compute the surrogate in the promoted
{i}# dtype, at least fp32, so that float64 keeps its precision.
{i}surrogate_dtype = torch.promote_types(reps_mb.dtype, grad_mb.dtype)
{i}if surrogate_dtype in (torch.float16, torch.bfloat16):
{i}    surrogate_dtype = torch.float32
{i}surrogate = (
{i}    torch.dot(reps_mb.flatten().to(surrogate_dtype), grad_mb.flatten().to(surrogate_dtype))
{i}    * grad_output
{i})
"""


def edit_gradcache_surrogate_dtype(text: str) -> str:
    """_backward_hook: the surrogate in the promoted dtype (at least fp32), not always fp32, as 6.2.0 does."""
    return _sub_once(
        r"^( +)# Under autocast the cached gradients are reduced-precision while this re-embedding\n"
        r"\1# \(inside backward, outside autocast\) is fp32, so compute the surrogate in fp32\.\n"
        r"\1surrogate = torch\.dot\(reps_mb\.flatten\(\)\.float\(\), grad_mb\.flatten\(\)\.float\(\)\) \* grad_output\n",
        lambda m: SURROGATE.format(i=m.group(1)),
        text,
        GRADCACHE,
    )


#: In patch order.
NATIVE_FIXES: tuple[Concern, ...] = (
    Concern(
        "native-matryoshka-cached-n-dims-per-step",
        {MATRYOSHKA_OLD: edit_matryoshka_n_dims_per_step},
        releases=">=3.4.0,<5.4.0",
    ),
    Concern("native-gist-guide-on-feature-copies", {GIST_OLD: edit_gist_guide_copy}, releases=">=3.4.0,<5.4.0"),
    Concern("native-gist-guide-on-feature-copies", {GIST_NEW: edit_gist_guide_copy}, releases=">=5.4.0,<5.7.0"),
    Concern(
        "native-cmnsrl-symmetric-across-mini-batches",
        {CMNSRL_OLD: edit_symmetric_native},
        releases=">=3.4.0,<5.1.0",
    ),
    Concern(
        "native-gradcache-hook-binds-cache",
        {CMNRL_OLD: edit_hook_binds_cache, CGIST_OLD: edit_hook_binds_cache, CMNSRL_OLD: edit_hook_binds_cache},
        releases=">=3.4.0,<5.3.0",
    ),
    Concern(
        "native-gradcache-hook-binds-cache",
        {CMNRL_OLD: edit_hook_binds_cache, CGIST_OLD: edit_hook_binds_cache},
        releases=">=5.3.0,<5.4.0",  # 5.3.0's CMNSRL subclasses CMNRL (#3607): no hook of its own
    ),
    Concern(
        "native-gradcache-hook-binds-cache",
        {CMNRL_NEW: edit_hook_binds_cache, CGIST_NEW: edit_hook_binds_cache},
        releases=">=5.4.0,<5.7.0",
    ),
    Concern(
        "native-matryoshka-decorate-per-call", {MATRYOSHKA_OLD: edit_matryoshka_per_call}, releases=">=3.4.0,<5.4.0"
    ),
    Concern("native-matryoshka-decorate-per-call", {MATRYOSHKA_NEW: edit_matryoshka_per_call}, releases=">=5.4.0"),
    Concern(
        "native-matryoshka-gradcache-protocol",
        {MATRYOSHKA_OLD: edit_matryoshka_detect_protocol},
        releases=">=3.4.0,<5.4.0",
    ),
    Concern(
        "native-matryoshka-gradcache-protocol", {MATRYOSHKA_NEW: edit_matryoshka_detect_protocol}, releases=">=5.4.0"
    ),
    Concern(
        "native-matryoshka-drive-caching-stage",
        {MATRYOSHKA_OLD: edit_matryoshka_drive_caching_stage},
        releases=">=3.4.0,<5.4.0",
    ),
    Concern(
        "native-matryoshka-drive-caching-stage",
        {MATRYOSHKA_NEW: edit_matryoshka_drive_caching_stage},
        releases=">=5.4.0",
    ),
    Concern(
        "native-adaptive-layer-refuses-gradient-cache",
        {ADAPTIVE_LAYER_OLD: edit_adaptive_layer_refuse},
        releases=">=3.4.0,<5.4.0",
    ),
    Concern(
        "native-adaptive-layer-refuses-gradient-cache",
        {ADAPTIVE_LAYER_NEW: edit_adaptive_layer_refuse},
        releases=">=5.4.0",
    ),
)

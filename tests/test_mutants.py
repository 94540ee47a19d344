"""The conformance suite tests itself: deliberately broken variants of the patched code must be caught.

Each mutant is one plausible bug in a module of the backport series (the truncate-after-cache module,
the shared multi-width loss stage, the per-width logging, the AdaptiveLayerLoss layer cache). The suite
runs on ST 3.3.1 with the series applied to an unpacked wheel (first on PYTHONPATH), once with the
modules as shipped - everything passes - and once per mutant, which must fail the checks named here.
``NATIVE_MUTANTS`` and ``NATIVE_LAYER_MUTANTS`` do the same for code that a fix series carries (native
MatryoshkaLoss and the self-contained layer cache of 6.2.0), running the conformance files that exercise it.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from support import ROOT, dists, release_python, st_patch, tox_environ

VERSION = "3.3.1"
CACHE = "sentence_transformers/losses/_matryoshka_cache.py"
SHARED = "sentence_transformers/losses/_matryoshka_shared.py"
LOG_MODULE = "sentence_transformers/losses/_matryoshka_log.py"
MATRYOSHKA = "sentence_transformers/losses/MatryoshkaLoss.py"
ADAPTIVE_LAYER = "sentence_transformers/losses/AdaptiveLayerLoss.py"

# name -> (module, text in the module, its broken replacement, a check function that must fail).
# The built-in cached losses take the shared multi-width loss stage (SHARED); the generic per-width path
# (CACHE) is checked by the conformance tests that force it.
MUTANTS = {
    "weight-dropped-from-gradient": (
        CACHE,
        "g.add_(_full_width_grad(r, dim, t.grad), alpha=weight)",
        "g.add_(_full_width_grad(r, dim, t.grad))",
        "test_cached_generic_path_vs_reference",
    ),
    "no-renormalisation": (
        CACHE,
        "return F.normalize(embeddings[..., :dim], p=2, dim=-1)",
        "return embeddings[..., :dim]",
        "test_cached_generic_path_vs_reference",
    ),
    "n-dims-per-step-ignored": (
        CACHE,
        'n_dims_per_step = getattr(matryoshka_loss, "n_dims_per_step", -1)',
        "n_dims_per_step = -1",
        "test_cached_vs_reference",
    ),
    "inner-loss-not-restored": (
        CACHE,
        "vars(obj).pop(name, None)",
        "pass",
        "test_inner_alone_afterwards",
    ),
    "widths-differ-across-ranks": (  # under torch.distributed every rank must train rank 0's sample
        CACHE,
        "dim_indices = _same_on_every_rank(random.sample(dim_indices, n_dims_per_step))",
        "dim_indices = random.sample(dim_indices, n_dims_per_step)",
        "test_ranks_train_the_same_widths",
    ),
    "loss-stage-over-the-whole-batch": (  # upstream #3107: one graph over every mini-batch
        CACHE,
        "            loss = inner_method(truncated, *args, **kwargs)",
        "            chunk, inner_loss.mini_batch_size = inner_loss.mini_batch_size, 10**9\n"
        "            loss = inner_method(truncated, *args, **kwargs)\n"
        "            inner_loss.mini_batch_size = chunk",
        "test_loss_stage_stays_chunked",
    ),
    "with-backward-stage-not-caching": (  # calculate_loss(reps, with_backward=True) run without gradients
        CACHE,
        'caching = name == "calculate_loss_and_cache_gradients" or bool(_with_backward(method, args, kwargs))',
        'caching = name == "calculate_loss_and_cache_gradients"',
        "test_protocol_loss_vs_reference",
    ),
    "nested-loss-stage-truncates-again": (  # calculate_loss_and_cache_gradients -> calculate_loss re-enters
        CACHE,
        "        if self.active:",
        "        if False:",
        "test_protocol_loss_vs_reference",
    ),
    "rep-grad-not-reported": (  # the 5.7-style hook reads rep.grad of the full-width embeddings
        CACHE,
        "                r.grad = g if r.grad is None else r.grad + g",
        "                pass",
        "test_protocol_loss_vs_reference",
    ),
    "no-loss-stage-unchecked": (
        CACHE,
        "    check_loss_stage(inner_loss)",
        "    pass",
        "test_protocol_loss_without_loss_stage_raises_clear_error",
    ),
    "adaptive-layer-accepts-gradcache": (  # a chain the layer cache does not handle must still be refused
        CACHE,
        "    cached = [index for index, module in enumerate(chain) if is_gradcache_loss(module)]",
        "    cached = []",
        "test_adaptive_layers_refuse_unsupported_gradient_cache_chain",
    ),
    "adaptive-layer-checks-its-own-loss-only": (  # AdaptiveLayerLoss(MatryoshkaLoss(MatryoshkaLoss(cached)))
        CACHE,
        '        module = getattr(module, "loss", None)',
        "        module = None",
        "test_adaptive_layers_refuse_unsupported_gradient_cache_chain",
    ),
    "shared-path-never-taken": (
        CACHE,
        "    shared = shared_loss_stage(inner_method, caching, inner_loss, dims_weights, reps, *args, **kwargs)",
        "    shared = None",
        "test_cached_vs_reference",
    ),
    "shared-segment-boundary-off-by-one-width": (
        SHARED,
        "self.bounds = [0, *self.dims]",
        "self.bounds = [0, *self.dims[1:], self.dims[-1]]",
        "test_cached_vs_reference",
    ),
    "shared-prefix-norm-of-the-wrong-width": (
        SHARED,
        "torch.mul(r.inv[rs, k : k + 1] * scale, c.inv[None, :, k], out=factors[:, span])",
        "torch.mul(r.inv[rs, k : k + 1] * scale, c.inv[None, :, max(k - 1, 0)], out=factors[:, span])",
        "test_cached_vs_reference",
    ),
    "shared-width-weight-dropped": (
        SHARED,
        "acc = grads[last].mul_(widths.weights[ks[last]] * problem.factor)",
        "acc = grads[last].mul_(problem.factor)",
        "test_cached_vs_reference",
    ),
    "shared-loss-stage-over-the-whole-batch": (
        SHARED,
        "    n, step = sources.tensors[anchors].shape[0], inner.mini_batch_size\n"
        "    offset = _rank() * n if sources.gather else 0\n    chunks = [",
        "    n = step = sources.tensors[anchors].shape[0]\n"
        "    offset = _rank() * n if sources.gather else 0\n    chunks = [",
        "test_loss_stage_stays_chunked",
    ),
    # MatryoshkaLoss(..., log_per_dim=True): per-width losses (conformance/test_logging.py)
    "cached-per-width-loss-weighted": (
        CACHE,
        "\n        record_per_dim(dim, loss)",  # the generic path's record (the shared stage's is indented deeper)
        "\n        record_per_dim(dim, weight * loss)",
        "test_per_width_losses_vs_reference",
    ),
    "shared-per-width-loss-weighted": (
        SHARED,
        "per_width[k] -= problem.factor * nll",
        "per_width[k] -= weight * nll",
        "test_per_width_losses_vs_reference",
    ),
    "per-width-loss-weighted": (
        MATRYOSHKA,
        "record_per_dim(dim, dim_loss, owner=self)",
        "record_per_dim(dim, weight * dim_loss, owner=self)",
        "test_per_width_losses_vs_reference",
    ),
    "width-missing-from-per-width-losses": (  # only the first width recorded
        LOG_MODULE,
        "        active[1][dim] = value.detach()",
        "        active[1].update({} if active[1] else {dim: value.detach()})",
        "test_per_width_losses_vs_reference",
    ),
    "dict-where-the-trainer-needs-a-tensor": (  # 3.3.1's trainer does not log loss components
        LOG_MODULE,
        '    return callable(getattr(SentenceTransformerTrainer, "track_loss_components", None))',
        "    return True",
        "test_per_width_losses_vs_reference",
    ),
    "2d-term-recorded-without-its-widths": (  # a layer's term recorded whole, not per MatryoshkaLoss width
        LOG_MODULE,
        "    for dim, width_value in (widths or {None: value}).items():",
        "    for dim, width_value in {None: value}.items():",
        "test_2d_per_layer_and_width_losses_vs_reference",
    ),
    "2d-layers-counted-from-the-prior-index": (  # (i, width) instead of (i + FIRST_PRIOR, width)
        "sentence_transformers/losses/_adaptive_layer_cache.py",
        "    return index + FIRST_PRIOR",
        "    return index",
        "test_2d_per_layer_and_width_losses_vs_reference",
    ),
    "log-switch-unchecked": (
        LOG_MODULE,
        "    if not isinstance(log_per_dim, bool):",
        "    if False:",
        "test_bad_switch_raises_clear_error",
    ),
    "kl-teacher-not-detached": (  # adaptive-layer-detach-kl-target undone: the KL term trains the final layer
        ADAPTIVE_LAYER,
        "final_embeddings = F.softmax(final_embeddings / self.kl_temperature, dim=-1).detach()",
        "final_embeddings = F.softmax(final_embeddings / self.kl_temperature, dim=-1)",
        "test_kl_teacher_receives_no_gradient",
    ),
}


NATIVE_VERSION = "6.2.0"
NATIVE_MODULE = "sentence_transformers/sentence_transformer/losses/matryoshka.py"
NATIVE_PATHS = (
    "conformance/test_equivalence.py",
    "conformance/test_distributed.py",
    "conformance/test_protocol.py",
    "conformance/test_adaptive_reference.py",
    "conformance/test_adaptive_layer.py",
)
NATIVE_LAYER_MODULE = "sentence_transformers/sentence_transformer/losses/_adaptive_layer_cache.py"
NATIVE_SHARED_MODULE = "sentence_transformers/sentence_transformer/losses/_matryoshka_shared.py"

# native-matryoshka-drive-caching-stage: a user's GradCache loss whose calculate_loss_and_cache_gradients
# back-propagates by itself (its hook reads self.cache or rep.grad). Same shape as MUTANTS.
NATIVE_MUTANTS = {
    "caching-stage-rep-grad-not-filled": (  # the truncation chained off a detached copy: no full-width rep.grad
        "truncated = [[shrink(r, dim) for r in minibatch] for minibatch in reps]\n"
        "                matryoshka_reps = [[t.detach()",
        "truncated = [[shrink(r.detach(), dim) for r in minibatch] for minibatch in reps]\n"
        "                matryoshka_reps = [[t.detach()",
        "test_protocol_loss_vs_reference",
    ),
    "caching-stage-cache-not-replaced": (  # the hook reads the last width's truncated gradients
        "            self.loss.cache = [[_grad_or_zeros(r) for r in minibatch] for minibatch in reps]",
        "            pass",
        "test_protocol_loss_vs_reference",
    ),
    "caching-stage-weight-dropped": (
        "t.backward(weight * d.grad)  # summed onto the full-width rep.grad",
        "t.backward(d.grad)  # summed onto the full-width rep.grad",
        "test_protocol_loss_vs_reference",
    ),
    "caching-stage-widest-only": (  # every width trains on the widest truncation
        "truncated = [[shrink(r, dim) for r in minibatch] for minibatch in reps]\n"
        "                matryoshka_reps = [[t.detach()",
        "truncated = [[shrink(r, self.matryoshka_dims[0]) for r in minibatch] for minibatch in reps]\n"
        "                matryoshka_reps = [[t.detach()",
        "test_protocol_loss_vs_reference",
    ),
    "caching-stage-not-selected": (  # back to calculate_loss only: the full dimension trains alone
        "    if _truncates_in_caching_stage(loss) and not evaluates_in_calculate_loss:",
        "    if False:",
        "test_protocol_loss_vs_reference",
    ),
    "no-grad-value-through-caching-stage": (  # evaluation calls calculate_loss, left undecorated
        "    evaluates_in_calculate_loss = callable(getattr(loss, "
        '"calculate_loss", None)) and not torch.is_grad_enabled()',
        "    evaluates_in_calculate_loss = False",
        "test_protocol_loss_no_grad_value",
    ),
    "neither-loss-stage-unchecked": (
        '    if not with_backward and not callable(getattr(loss, "calculate_loss_and_cache_gradients", None)):',
        "    if False:",
        "test_protocol_loss_without_loss_stage_raises_clear_error",
    ),
    # native-matryoshka-shared-loss-stage: CachedLossDecorator's dispatch to the shared multi-width stage
    "native-shared-path-never-taken": (
        "        shared = shared_calculate_loss(self.fn, dims_weights, reps, args, kwargs)",
        "        shared = None",
        "test_cached_vs_reference",
    ),
}

# native-matryoshka-shared-loss-stage: the shared multi-width stage on a native release (6.2.0's adapters:
# directions, partition modes, hardness; gathering across devices).
NATIVE_SHARED_MUTANTS = {
    "native-shared-segment-boundary-off-by-one-width": (
        "self.bounds = [0, *self.dims]",
        "self.bounds = [0, *self.dims[1:], self.dims[-1]]",
        "test_cached_vs_reference",
    ),
    "native-shared-prefix-norm-of-the-wrong-width": (
        "torch.mul(r.inv[rs, k : k + 1] * scale, c.inv[None, :, k], out=factors[:, span])",
        "torch.mul(r.inv[rs, k : k + 1] * scale, c.inv[None, :, max(k - 1, 0)], out=factors[:, span])",
        "test_cached_vs_reference",
    ),
    "native-shared-width-weight-dropped": (
        "acc = grads[last].mul_(widths.weights[ks[last]] * problem.factor)",
        "acc = grads[last].mul_(problem.factor)",
        "test_cached_vs_reference",
    ),
    "native-shared-hardness-penalty-dropped": (
        "                    scores[:, span].addcmul_(cos, block.penalty)",
        "                    pass",
        "test_cached_vs_reference",
    ),
    "native-shared-per-direction-not-averaged": (
        "                yield [Problem(b, e, [block], 1.0 / (n * len(blocks))) for block in blocks]",
        "                yield [Problem(b, e, [block], 1.0 / n) for block in blocks]",
        "test_cached_vs_reference",
    ),
    "native-shared-gathered-rows-at-rank-0": (  # every rank scores rank 0's rows of the gathered batch
        "    offset = _rank() * n if sources.gather else 0\n    penalised",
        "    offset = 0\n    penalised",
        "test_shared_stage_gathers_once_per_step",
    ),
}

# adaptive-layer-truncate-after-cache on a native release: the layer cache made self-contained for 6.2.0.
NATIVE_LAYER_MUTANTS = {
    "native-layer-weighting-ignored": (  # 1 / (1 + i) instead of the loss's layer_weighting ("uniform")
        "    return get_layer_weight(index) if callable(get_layer_weight) else 1 / (1 + index)",
        "    return 1 / (1 + index)",
        "test_2d_cached_vs_reference",
    ),
    "native-prior-layers-of-5.1": (  # hidden states 1 .. L-1 instead of the embedding output and 1 .. L-1
        "FIRST_PRIOR = 0",
        "FIRST_PRIOR = 1",
        "test_2d_cached_vs_reference",
    ),
    "native-rep-grad-not-filled": (  # 6.x forward_cached reads its cache from rep.grad
        "                        r.grad = g",
        "                        pass",
        "test_2d_cached_vs_reference",
    ),
    "native-ddp-wrapper-read-as-the-model": (  # 6.x's trainer hands the loss its DDP wrapper, which has no [0]
        "    model = unwrapped(model)\n",
        "",
        "test_trainer_two_ranks_2d",
    ),
    "native-loss-and-cache-tuple-dropped": (  # 6.x CachedGISTEmbedLoss's stage returns (loss, cache)
        "            return loss, grads.get(FINAL) if grads is not None else None",
        "            return loss",
        "test_2d_cached_vs_reference",
    ),
}
ALL_NATIVE_MUTANTS = {
    **{k: (NATIVE_MODULE, *v) for k, v in NATIVE_MUTANTS.items()},
    **{k: (NATIVE_LAYER_MODULE, *v) for k, v in NATIVE_LAYER_MUTANTS.items()},
    **{k: (NATIVE_SHARED_MODULE, *v) for k, v in NATIVE_SHARED_MUTANTS.items()},
}

#: Mutants of the AdaptiveLayerLoss layer cache (same form as MUTANTS).
LAYER_MODULE = "sentence_transformers/losses/_adaptive_layer_cache.py"
LAYER_MUTANTS = {
    "layer-gradient-dropped": (  # a prior layer's loss term pushes no gradient into that layer
        "        _add(grads, index, grad)",
        "        pass",
        "test_2d_cached_vs_reference",
    ),
    "kl-term-without-gradient": (  # the KL value is added, its gradient never computed
        "                layers[FINAL], layers[index], owner.kl_temperature, owner.kl_div_weight, caching",
        "                layers[FINAL], layers[index], owner.kl_temperature, owner.kl_div_weight, False",
        "test_2d_cached_vs_reference",
    ),
    "layers-sampled-unlike-upstream": (  # the first n layers instead of random.sample's
        "indices = random.sample(indices, owner.n_layers_per_step)",
        "indices = list(indices)[: owner.n_layers_per_step]",
        "test_2d_cached_vs_reference",
    ),
    "second-pass-without-rng-replay": (  # dropout masks of the with-grad pass differ from the cached ones
        "            with _replayed(call.rng):",
        "            if True:",
        "test_2d_cached_dropout_same_seed",
    ),
    "second-pass-ignores-incoming-gradient": (  # (2.5 * loss).backward() trains like loss.backward()
        "            (surrogate * grad_output).backward()",
        "            surrogate.backward()",
        "test_2d_cached_no_grad_and_scaled_backward",
    ),
    "layer-hidden-state-off-by-one": (
        "FIRST_PRIOR = 1",
        "FIRST_PRIOR = 0",
        "test_2d_cached_vs_reference",
    ),
    "wrong-model-accepted": (
        '    if getattr(inner, "model", None) is not getattr(owner, "model", None):',
        "    if False:",
        "test_adaptive_layers_refuse_unsupported_gradient_cache_chain",
    ),
}
ALL_MUTANTS = {**MUTANTS, **{k: (LAYER_MODULE, *v) for k, v in LAYER_MUTANTS.items()}}


@pytest.fixture(scope="module")
def patched_wheel(tmp_path_factory):
    tree = dists.wheel_tree(VERSION, tmp_path_factory.mktemp("wheel"))
    result = st_patch("apply", "--target", str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    return tree


def _conformance(tree, out, version: str = VERSION, paths: tuple[str, ...] = ("conformance",)) -> dict[str, list[str]]:
    """Run the suite (or ``paths`` of it) on ``tree``; {check function: statuses of its cases}.

    The training checks are left out: no mutant names one of them as its catcher, and they would double
    the time of every run (the matrix runs them on the shipped series)."""
    subprocess.run(
        [str(release_python(version)), "-m", "pytest", *paths, "-q", "-n", "2", "-p", "no:cacheprovider"]
        + ["-m", "not training", "--conformance-json", str(out)],
        cwd=ROOT,
        env={**tox_environ(), "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    )
    statuses: dict[str, list[str]] = {}
    for check in json.loads(out.read_text())["checks"]:
        name = check["id"].split("::")[-1].split("[")[0]
        statuses.setdefault(name, []).append(check["status"])
    return statuses


def _failing(statuses: dict[str, list[str]]) -> set[str]:
    return {name for name, cases in statuses.items() if {"failed", "error", "xpassed"} & set(cases)}


@pytest.mark.slow
def test_the_series_as_shipped_passes(patched_wheel, tmp_path):
    assert _failing(_conformance(patched_wheel, tmp_path / "out.json")) == set()


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(ALL_MUTANTS))
def test_the_suite_catches_the_mutant(mutant, patched_wheel, tmp_path):
    path, original, broken, must_fail = ALL_MUTANTS[mutant]
    where = (_module_of(must_fail),)
    failing = _run_mutant(
        original,
        broken,
        mutant,
        patched_wheel / path,
        lambda: _conformance(patched_wheel, tmp_path / "o.json", paths=where),
    )
    assert must_fail in failing, f"mutant {mutant} was not caught by {must_fail}; failing: {sorted(failing)}"


def _module_of(check: str) -> str:
    """The conformance file that defines ``check``: a mutant runs only that file (the whole suite runs once,
    on the series as shipped), which keeps the mutants to minutes."""
    found = [f for f in sorted((ROOT / "conformance").glob("test_*.py")) if f"def {check}(" in f.read_text()]
    assert len(found) == 1, f"check {check} is defined in {len(found)} conformance files"
    return str(found[0].relative_to(ROOT))


def _run_mutant(original: str, broken: str, mutant: str, module, run) -> set[str]:
    """The failing check functions of ``run()`` with ``original`` in ``module`` replaced by ``broken`` (CRLF,
    as shipped)."""
    text = module.read_bytes()
    wanted = original.replace("\n", "\r\n").encode()
    assert text.count(wanted) == 1, f"mutant {mutant}: the module no longer has {original!r}"
    try:
        module.write_bytes(text.replace(wanted, broken.replace("\n", "\r\n").encode()))
        return _failing(run())
    finally:
        module.write_bytes(text)


@pytest.fixture(scope="module")
def native_patched_wheel(tmp_path_factory):
    tree = dists.wheel_tree(NATIVE_VERSION, tmp_path_factory.mktemp("native-wheel"))
    result = st_patch("apply", "--target", str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    return tree


@pytest.mark.slow
def test_the_native_series_as_shipped_passes(native_patched_wheel, tmp_path):
    statuses = _conformance(native_patched_wheel, tmp_path / "out.json", NATIVE_VERSION, NATIVE_PATHS)
    assert statuses and _failing(statuses) == set()


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(ALL_NATIVE_MUTANTS))
def test_the_suite_catches_the_native_mutant(mutant, native_patched_wheel, tmp_path):
    path, original, broken, must_fail = ALL_NATIVE_MUTANTS[mutant]

    def run():
        return _conformance(native_patched_wheel, tmp_path / "out.json", NATIVE_VERSION, (_module_of(must_fail),))

    failing = _run_mutant(original, broken, mutant, native_patched_wheel / path, run)
    assert must_fail in failing, f"mutant {mutant} was not caught by {must_fail}; failing: {sorted(failing)}"

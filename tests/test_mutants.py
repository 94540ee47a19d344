"""The conformance suite tests itself: deliberately broken variants of the patched code must be caught.

Each mutant is one plausible bug in the truncate-after-cache module of the backport series or in its
AdaptiveLayerLoss layer cache. The suite
runs on ST 3.3.1 with the series applied to an unpacked wheel (first on PYTHONPATH), once with the
module as shipped - everything passes - and once per mutant, which must fail the checks named here.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from support import ROOT, dists, release_python, st_patch, tox_environ

VERSION = "3.3.1"
MODULE = "sentence_transformers/losses/_matryoshka_cache.py"

# name -> (text in the module, its broken replacement, a check function that must fail)
MUTANTS = {
    "weight-dropped-from-gradient": (
        "g.add_(_full_width_grad(r, dim, t.grad), alpha=weight)",
        "g.add_(_full_width_grad(r, dim, t.grad))",
        "test_cached_vs_reference",
    ),
    "no-renormalisation": (
        "return F.normalize(embeddings[..., :dim], p=2, dim=-1)",
        "return embeddings[..., :dim]",
        "test_cached_vs_reference",
    ),
    "n-dims-per-step-ignored": (
        'n_dims_per_step = getattr(matryoshka_loss, "n_dims_per_step", -1)',
        "n_dims_per_step = -1",
        "test_cached_vs_reference",
    ),
    "inner-loss-not-restored": (
        "vars(obj).pop(name, None)",
        "pass",
        "test_inner_alone_afterwards",
    ),
    "widths-differ-across-ranks": (  # under torch.distributed every rank must train rank 0's sample
        "dim_indices = _same_on_every_rank(random.sample(dim_indices, n_dims_per_step))",
        "dim_indices = random.sample(dim_indices, n_dims_per_step)",
        "test_ranks_train_the_same_widths",
    ),
    "loss-stage-over-the-whole-batch": (  # upstream #3107: one graph over every mini-batch
        "            loss = inner_method(truncated, *args, **kwargs)",
        "            chunk, inner_loss.mini_batch_size = inner_loss.mini_batch_size, 10**9\n"
        "            loss = inner_method(truncated, *args, **kwargs)\n"
        "            inner_loss.mini_batch_size = chunk",
        "test_loss_stage_stays_chunked",
    ),
    "with-backward-stage-not-caching": (  # calculate_loss(reps, with_backward=True) run without gradients
        'caching = name == "calculate_loss_and_cache_gradients" or bool(_with_backward(method, args, kwargs))',
        'caching = name == "calculate_loss_and_cache_gradients"',
        "test_protocol_loss_vs_reference",
    ),
    "nested-loss-stage-truncates-again": (  # calculate_loss_and_cache_gradients -> calculate_loss re-enters
        "        if self.active:",
        "        if False:",
        "test_protocol_loss_vs_reference",
    ),
    "rep-grad-not-reported": (  # the 5.7-style hook reads rep.grad of the full-width embeddings
        "                r.grad = g if r.grad is None else r.grad + g",
        "                pass",
        "test_protocol_loss_vs_reference",
    ),
    "no-loss-stage-unchecked": (
        "    check_loss_stage(inner_loss)",
        "    pass",
        "test_protocol_loss_without_loss_stage_raises_clear_error",
    ),
    "adaptive-layer-accepts-gradcache": (  # a chain the layer cache does not handle must still be refused
        "    cached = [index for index, module in enumerate(chain) if is_gradcache_loss(module)]",
        "    cached = []",
        "test_adaptive_layers_refuse_unsupported_gradient_cache_chain",
    ),
    "adaptive-layer-checks-its-own-loss-only": (  # AdaptiveLayerLoss(MatryoshkaLoss(MatryoshkaLoss(cached)))
        '        module = getattr(module, "loss", None)',
        "        module = None",
        "test_adaptive_layers_refuse_unsupported_gradient_cache_chain",
    ),
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
ALL_MUTANTS = {
    **{k: (MODULE, *v) for k, v in MUTANTS.items()},
    **{k: (LAYER_MODULE, *v) for k, v in LAYER_MUTANTS.items()},
}


@pytest.fixture(scope="module")
def patched_wheel(tmp_path_factory):
    tree = dists.wheel_tree(VERSION, tmp_path_factory.mktemp("wheel"))
    result = st_patch("apply", "--target", str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    return tree


def _conformance(tree, out) -> dict[str, list[str]]:
    """Run the suite on ``tree``; {check function: statuses of its cases}."""
    subprocess.run(
        [str(release_python(VERSION)), "-m", "pytest", "conformance", "-q", "-n", "2", "-p", "no:cacheprovider"]
        + ["--conformance-json", str(out)],
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
    module = patched_wheel / path
    text = module.read_bytes()
    assert text.count(original.encode()) == 1, f"mutant {mutant}: the module no longer has {original!r}"
    try:
        module.write_bytes(text.replace(original.encode(), broken.replace("\n", "\r\n").encode()))
        failing = _failing(_conformance(patched_wheel, tmp_path / "out.json"))
    finally:
        module.write_bytes(text)
    assert must_fail in failing, f"mutant {mutant} was not caught by {must_fail}; failing: {sorted(failing)}"

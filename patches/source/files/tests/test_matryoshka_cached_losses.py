"""MatryoshkaLoss around cached (GradCache) losses, against a float64 computation written from the formulas.

Builds a tiny BERT from a locally written vocabulary (no hub access). The reference embeds the whole
batch with gradients, truncates and re-normalises every Matryoshka dimension, applies the inner loss
formula and sums with the weights; it does not use the library's loss classes.
"""

from __future__ import annotations

import copy
import inspect
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizerFast

from sentence_transformers import SentenceTransformer, losses, models, util

try:
    from sentence_transformers.losses import _matryoshka_shared
except ImportError:  # a tree without the series: the checks below must fail, not stop the collection
    _matryoshka_shared = None

WORDS = "red green blue cat dog bird runs sits flies over under near the a big small old new".split()
BATCH, MINI_BATCH, WIDTH = 7, 3, 16  # the mini-batch size does not divide the batch
DIMS, WEIGHTS = [4, 16, 8], [0.5, 2.0, 1.0]  # unsorted, includes the full width


def _tiny_model(path, seed: int) -> SentenceTransformer:
    torch.manual_seed(seed)
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(str(path))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(str(path))
    transformer = models.Transformer(str(path))
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu").double()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return _tiny_model(root / "model", 0), _tiny_model(root / "guide", 1)


def _columns(model, n_columns: int):
    rng = random.Random(n_columns)
    texts = [[" ".join(rng.sample(WORDS, 3 + (i + c) % 3)) for i in range(BATCH)] for c in range(n_columns)]
    return [model.tokenize(column) for column in texts]


def _reference(model, guide, features, kind: str, dims_weights) -> torch.Tensor:
    embeddings = [model(dict(f))["sentence_embedding"] for f in features]
    with torch.no_grad():
        guides = [guide(dict(f))["sentence_embedding"] for f in features] if guide is not None else None
    labels = torch.arange(BATCH)
    total = 0.0
    for dim, weight in dims_weights:
        reps = [F.normalize(e[:, :dim], dim=-1) for e in embeddings]
        if kind == "mnrl":
            loss = F.cross_entropy(util.cos_sim(reps[0], torch.cat(reps[1:])) * 20.0, labels)
        elif kind == "mnsrl":
            scores = util.cos_sim(reps[0], torch.cat(reps[1:])) * 20.0
            loss = (F.cross_entropy(scores, labels) + F.cross_entropy(scores[:, :BATCH].t(), labels)) / 2
        else:  # GIST: guide embeddings are not truncated

            def sim(x, y):
                return F.cosine_similarity(x.unsqueeze(1), y.unsqueeze(0), dim=-1)

            threshold = sim(guides[0], guides[1]).diagonal().view(-1, 1)
            # Score blocks: anchor-positive, anchor-anchor, positive-positive, then anchor-negative per column.
            pairs = [(0, 1), (0, 0), (1, 1)] + [(0, c) for c in range(2, len(reps))]
            blocks = []
            for i, j in pairs:
                block = sim(reps[i], reps[j])
                block = block.masked_fill(sim(guides[i], guides[j]) > threshold, -torch.inf)
                blocks.append(block)
            loss = F.cross_entropy(torch.cat(blocks, dim=1) / 0.01, labels)
        total = total + weight * loss
    return total


def _cached_losses():
    cases = [("mnrl", lambda m, g: losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=MINI_BATCH))]
    if hasattr(losses, "CachedGISTEmbedLoss"):
        cases.append(("gist", lambda m, g: losses.CachedGISTEmbedLoss(m, g, mini_batch_size=MINI_BATCH)))
    if hasattr(losses, "CachedMultipleNegativesSymmetricRankingLoss"):
        cases.append(
            ("mnsrl", lambda m, g: losses.CachedMultipleNegativesSymmetricRankingLoss(m, mini_batch_size=MINI_BATCH))
        )
    return cases


def _grads(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _path_counts(path: str, monkeypatch) -> dict:
    """Select the loss-stage path; how often each path ran (the series' ``_matryoshka_shared`` counts).
    Without the series only the loss's own path exists, and nothing counts it."""
    if _matryoshka_shared is None:
        assert path == "generic", "this tree has no shared multi-width loss stage (the series' _matryoshka_shared)"
        return {}
    monkeypatch.setattr(_matryoshka_shared, "FORCE_GENERIC", path == "generic")
    monkeypatch.delenv(_matryoshka_shared.ENV_FORCE_GENERIC, raising=False)
    return _matryoshka_shared.path_counts


@pytest.mark.parametrize("kind, make_loss", _cached_losses(), ids=[c[0] for c in _cached_losses()])
@pytest.mark.parametrize("n_columns", [2, 3])
@pytest.mark.parametrize("n_dims_per_step", [-1, 1])
@pytest.mark.parametrize("path", ["shared", "generic"])
def test_matryoshka_cached_matches_reference(
    tiny_models, kind, make_loss, n_columns, n_dims_per_step, path, monkeypatch
):
    """Both loss-stage paths: every width in one pass (the built-in losses), and the generic per-width path."""
    if n_dims_per_step != -1 and "n_dims_per_step" not in inspect.signature(losses.MatryoshkaLoss).parameters:
        pytest.skip("this release's MatryoshkaLoss has no n_dims_per_step")
    counts = _path_counts(path, monkeypatch)
    model, guide = copy.deepcopy(tiny_models[0]), tiny_models[1]
    features = _columns(model, n_columns)
    inner = make_loss(model, guide)
    kwargs = {} if n_dims_per_step == -1 else {"n_dims_per_step": n_dims_per_step}
    loss_fn = losses.MatryoshkaLoss(model, inner, DIMS, WEIGHTS, **kwargs)

    random.seed(12)
    runs = counts.get(path, 0)
    loss = loss_fn(features, None)
    loss.backward()
    cached = _grads(model)
    assert not counts or counts[path] > runs, f"the {path} path did not run"

    # The dims the loss used this step, drawn the way MatryoshkaLoss draws them.
    random.seed(12)
    dims_weights = list(zip(loss_fn.matryoshka_dims, loss_fn.matryoshka_weights))
    if 0 < n_dims_per_step < len(dims_weights):
        dims_weights = [dims_weights[i] for i in random.sample(range(len(dims_weights)), n_dims_per_step)]
    expected = _reference(model, guide if kind == "gist" else None, features, kind, dims_weights)
    expected.backward()
    reference = _grads(model)

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-7, atol=1e-9)
    assert cached.keys() == reference.keys() and cached
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], rtol=1e-7, atol=1e-9, msg=name)


def test_matryoshka_cached_no_grad_and_inner_loss_untouched(tiny_models):
    model = copy.deepcopy(tiny_models[0])
    features = _columns(model, 2)
    inner = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
    first = losses.MatryoshkaLoss(model, inner, DIMS, WEIGHTS)
    second = losses.MatryoshkaLoss(model, inner, DIMS, WEIGHTS)  # wrapping twice must not compound

    with torch.no_grad():
        value = first(features, None)
    expected = _reference(model, None, features, "mnrl", list(zip(first.matryoshka_dims, first.matryoshka_weights)))
    torch.testing.assert_close(value, expected.detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(second(features, None).detach(), expected.detach(), rtol=1e-7, atol=1e-9)
    model.zero_grad()

    assert "calculate_loss_and_cache_gradients" not in vars(inner)
    alone = inner(features, None)
    plain = _reference(model, None, features, "mnrl", [(WIDTH, 1.0)])
    torch.testing.assert_close(alone.detach(), plain.detach(), rtol=1e-7, atol=1e-9)


def test_matryoshka_cached_dim_too_large_restores_inner_loss(tiny_models):
    model = copy.deepcopy(tiny_models[0])
    inner = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
    loss_fn = losses.MatryoshkaLoss(model, inner, [2 * WIDTH, 4])
    with pytest.raises(ValueError, match="cannot be greater than"):
        loss_fn(_columns(model, 2), None)
    assert "calculate_loss_and_cache_gradients" not in vars(inner)
    assert "forward" not in vars(model)

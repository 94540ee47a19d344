"""MatryoshkaLoss computes every dimension of a built-in cached loss in one pass (``_matryoshka_shared``): the
loss and every parameter gradient equal the per-dimension loop's, for every option of the cached losses."""

from __future__ import annotations

import pytest
import torch

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
    MatryoshkaLoss,
)
from sentence_transformers.sentence_transformer.losses import _matryoshka_shared as shared
from sentence_transformers.util import cos_sim, dot_score

ANCHORS = ["It's nice weather outside today.", "He drove to work.", "A man is eating.", "Kids play outside.", "Hi"]
POSITIVES = ["It's so sunny.", "He took the car to work.", "A man eats food.", "Children are playing.", "Hello"]
NEGATIVES = ["It's raining.", "She walked home.", "A woman is sleeping.", "Adults work inside.", "Bye now"]
DIMS, WEIGHTS = [128, 64, 32, 16], [1.0, 0.5, 2.0, 1.0]
EVERY_DIRECTION = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

LOSSES = {
    "cmnrl": lambda model: CachedMultipleNegativesRankingLoss(model, mini_batch_size=2),
    "cmnrl-dot": lambda model: CachedMultipleNegativesRankingLoss(
        model, scale=1.0, similarity_fct=dot_score, mini_batch_size=2
    ),
    "cmnrl-every-direction": lambda model: CachedMultipleNegativesRankingLoss(
        model, directions=EVERY_DIRECTION, mini_batch_size=3
    ),
    "cmnrl-per-direction-hardness": lambda model: CachedMultipleNegativesRankingLoss(
        model,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
        hardness_mode="all_negatives",
        hardness_strength=3.0,
        mini_batch_size=2,
    ),
    "cmnrl-in-batch-negatives": lambda model: CachedMultipleNegativesRankingLoss(
        model, hardness_mode="in_batch_negatives", hardness_strength=9.0, mini_batch_size=2
    ),
    "cmnrl-hard-negatives": lambda model: CachedMultipleNegativesRankingLoss(
        model, hardness_mode="hard_negatives", hardness_strength=5.0, mini_batch_size=2
    ),
    "cmnsrl": lambda model: CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=2),
    "cgist-relative-margin": lambda model: CachedGISTEmbedLoss(
        model, model, margin_strategy="relative", margin=0.05, mini_batch_size=2
    ),
    "cgist-absolute-margin-no-contrast": lambda model: CachedGISTEmbedLoss(
        model,
        model,
        margin_strategy="absolute",
        margin=0.02,
        contrast_anchors=False,
        contrast_positives=False,
        mini_batch_size=3,
    ),
}


def _features(model: SentenceTransformer) -> list[dict[str, torch.Tensor]]:
    return [model.preprocess(texts) for texts in (ANCHORS, POSITIVES, NEGATIVES)]


def _loss_and_grads(model, loss, features, loop: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """The loss value, the parameter gradients and whether the shared stage ran."""
    previous, shared.FORCE_GENERIC = shared.FORCE_GENERIC, loop
    runs = shared.path_counts["shared"]
    try:
        model.zero_grad(set_to_none=True)
        value = loss([dict(feature) for feature in features], None)
        value.backward()
    finally:
        shared.FORCE_GENERIC = previous
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads, shared.path_counts["shared"] > runs


@pytest.fixture
def float64_model(stsb_bert_tiny_model: SentenceTransformer) -> SentenceTransformer:
    model = stsb_bert_tiny_model.to(torch.float64)
    model.eval()  # no dropout: the two passes must see the same embeddings
    return model


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matryoshka_shared_stage_equals_the_per_dimension_loop(float64_model: SentenceTransformer, name: str) -> None:
    loss = MatryoshkaLoss(float64_model, LOSSES[name](float64_model), DIMS, WEIGHTS)
    features = _features(float64_model)

    value, grads, took_shared = _loss_and_grads(float64_model, loss, features, loop=False)
    loop_value, loop_grads, loop_took_shared = _loss_and_grads(float64_model, loss, features, loop=True)

    assert took_shared and not loop_took_shared
    torch.testing.assert_close(value, loop_value, rtol=1e-10, atol=1e-12)
    assert grads.keys() == loop_grads.keys()
    for name_, grad in grads.items():
        torch.testing.assert_close(grad, loop_grads[name_], rtol=1e-8, atol=1e-10, msg=name_)


@pytest.mark.parametrize("name", ["cmnrl-every-direction", "cgist-relative-margin"])
def test_matryoshka_shared_stage_evaluates_without_gradients(float64_model: SentenceTransformer, name: str) -> None:
    loss = MatryoshkaLoss(float64_model, LOSSES[name](float64_model), DIMS, WEIGHTS)
    features = _features(float64_model)
    values = []
    for loop in (False, True):
        previous, shared.FORCE_GENERIC = shared.FORCE_GENERIC, loop
        try:
            with torch.no_grad():
                values.append(loss([dict(feature) for feature in features], None))
        finally:
            shared.FORCE_GENERIC = previous
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-12)


def test_matryoshka_shared_stage_leaves_other_similarities_to_the_loop(float64_model: SentenceTransformer) -> None:
    inner = CachedMultipleNegativesRankingLoss(float64_model, similarity_fct=lambda a, b: cos_sim(a, b))
    loss = MatryoshkaLoss(float64_model, inner, DIMS, WEIGHTS)
    _, grads, took_shared = _loss_and_grads(float64_model, loss, _features(float64_model), loop=False)
    assert not took_shared and grads

"""Tiny BERT models written to a local directory (the hub is offline).

Why its own module: the model must be identical on every release, so it is built from a fixed seed
and a fixed vocabulary with plain ``transformers`` calls, saved, and loaded back through ST's
``models.Transformer``. Width 32 (the Matryoshka full width), 2 layers (4 for the AdaptiveLayerLoss checks, which
sample among the prior layers), 2 heads, intermediate 37.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from packaging.version import Version

from conformance import compat
from conformance.data import VOCAB

MAX_LEN = 64


def write_tiny_bert(directory: Path, *, hidden: int = 32, seed: int = 0, dropout: float = 0.0, layers: int = 2) -> Path:
    """Save a randomly initialised tiny BERT and its tokenizer under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    if Version(transformers.__version__) >= Version("5"):
        # transformers >= 5 silently ignores vocab_file= (every word becomes [UNK]); pass the dict.
        tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, model_max_length=MAX_LEN)
    else:
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=MAX_LEN)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=MAX_LEN,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def load_sentence_transformer(directory: Path, hidden: int):
    """The saved model as a float64 SentenceTransformer (Transformer + mean Pooling)."""
    model = compat.build_sentence_transformer(str(directory), hidden)
    return model.double()


def assert_tokenizes_cleanly(model, texts: list[str]) -> None:
    """No [UNK] anywhere: guards the transformers-5 vocab_file trap."""
    tokenizer = model.tokenizer
    unk = tokenizer.unk_token_id
    ids = tokenizer(texts)["input_ids"]
    bad = [t for t, row in zip(texts, ids) if unk in row]
    assert not bad, f"tiny tokenizer produced [UNK] for {bad[:3]} - vocab not loaded?"


def assert_distinct(embeddings: torch.Tensor, what: str) -> None:
    """No two rows (near-)identical: duplicate rows make in-batch negatives tie and hide bugs."""
    d = torch.cdist(embeddings, embeddings)
    d.fill_diagonal_(float("inf"))
    assert float(d.min()) > 1e-6, f"{what}: duplicate embeddings (min pairwise distance {float(d.min()):.2e})"

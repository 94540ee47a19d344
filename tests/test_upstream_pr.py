"""patches/upstream/matryoshka-shared-loss-stage: ``git am`` applies the pull request to upstream's newest release,
and its test passes there (that the patch is what ``make upstream-pr`` makes is ``make check-generated``'s).

The test is upstream's kind: it uses upstream's ``stsb_bert_tiny_model`` fixture, which downloads a model;
here the fixture is a locally built tiny BERT of the same width (128), given by a conftest beside it.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from support import fork_from_sdist, git, release_python, tox_environ
from tools import upstream_pr

CONFTEST = """
import pytest
import transformers
from sentence_transformers import SentenceTransformer, models

WORDS = sorted({w.strip(".,'!?").lower() for line in __import__("test_matryoshka_shared_stage").ANCHORS
                + __import__("test_matryoshka_shared_stage").POSITIVES
                + __import__("test_matryoshka_shared_stage").NEGATIVES for w in line.replace("'", " ").split()})


@pytest.fixture
def stsb_bert_tiny_model(tmp_path):
    import torch

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "s", *WORDS]
    (tmp_path / "vocab.txt").write_text("\\n".join(vocab) + "\\n")
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=32)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=256, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    return SentenceTransformer(modules=[models.Transformer(str(tmp_path)), models.Pooling(128)], device="cpu")
"""


@pytest.mark.slow
def test_the_pull_request_applies_to_upstream_and_its_test_passes(tmp_path):
    repo = fork_from_sdist(upstream_pr.BASE, tmp_path)
    (patch,) = sorted(upstream_pr.PR_DIR.glob("*.patch"))
    git(repo, "-c", "user.name=upstream", "-c", "user.email=upstream@example.invalid", "am", "-q", str(patch))
    tests = repo / "tests" / "sentence_transformer" / "losses"
    (tests / "conftest.py").write_text(CONFTEST)
    env = {**tox_environ(), "PYTHONPATH": f"{repo}:{tests}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(release_python(upstream_pr.BASE)), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b12 passed", result.stdout), result.stdout[-2000:]

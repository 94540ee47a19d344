"""The suite's fixed vocabulary and sentences.

Why fixed and generated here: the hub is unreachable, so the tiny models get a locally written
vocabulary; every sentence must tokenise without ``[UNK]`` and every row must be distinct, or
in-batch-negative losses get ties and duplicate embeddings that hide bugs (pins.md, "tiny-model
trap"). Sentence lengths vary so that padding and attention masks are exercised.
"""

from __future__ import annotations

import random

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """
the a cat dog bird fish horse cow sheep goat red blue green yellow black white small big fast slow
runs jumps sleeps eats sings swims flies walks reads writes in on under over near far house tree river
road city forest garden kitchen today yesterday morning night happy sad quiet loud old young warm cold
bright dark soft hard sweet bitter train car boat plane book song letter apple bread cheese water
""".split()
VOCAB = SPECIAL_TOKENS + WORDS

#: Batch size of the equivalence checks; 13 is prime, so mini-batches of 5 leave a ragged last chunk.
BATCH = 13
ROWS = 20  # batch A = rows 0..12, batch B = rows 7..19 (a different batch for the two-forwards check)
MAX_COLUMNS = 4


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def sentences(columns: int = MAX_COLUMNS, rows: int = ROWS, seed: int = 0) -> list[list[str]]:
    """``columns`` lists of ``rows`` distinct sentences (distinct across all columns too), 3-8 words."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for c in range(columns):
        col = []
        for r in range(rows):
            while True:
                s = _sentence(rng, 3 + (r + c) % 6)
                if s not in seen:
                    break
            seen.add(s)
            col.append(s)
        out.append(col)
    return out


def batch_rows(name: str) -> slice:
    return {"A": slice(0, BATCH), "B": slice(ROWS - BATCH, ROWS)}[name]


def translation_pairs(rows: int, seed: int) -> list[list[str]]:
    """``[anchors, positives]``: each positive is its anchor with every word replaced by a fixed other word.

    Why: retrieval on these pairs needs learning. An untrained model relates sentences by shared words,
    and an anchor shares (almost) none with its positive; the word map is the same for every pair, so a
    model trained on some pairs retrieves held-out pairs (other seeds) better - a real signal for the
    evaluator checks. The map is a fixed derangement of WORDS (seed 0), independent of ``seed``.
    """
    mapping = WORDS[1:] + WORDS[:1]  # word i -> word i + 1: no word maps to itself
    translate = dict(zip(WORDS, mapping))
    rng = random.Random(seed)
    anchors: list[str] = []
    while len(anchors) < rows:
        s = _sentence(rng, 3 + len(anchors) % 4)
        if s not in anchors:
            anchors.append(s)
    return [anchors, [" ".join(translate[w] for w in a.split()) for a in anchors]]

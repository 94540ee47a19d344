"""One rank of a distributed ``SentenceTransformerTrainer`` run (launched by test_distributed.py).

Why a separate program: the trainer sets up ``torch.distributed`` itself from the environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), the way ``torchrun``
starts it, so each rank must be its own process with its own environment - not a fork of the test.

Usage: ``python -m conformance.train_rank OUT MODEL_DIR [2d]`` with the environment above. The rank trains
the tiny model (float64, width 32) with ``MatryoshkaLoss(CachedMultipleNegativesRankingLoss)`` (``2d``:
``Matryoshka2dLoss`` around it, every layer and width, on the 4-layer model) for
:data:`STEPS` SGD steps, recording the micro-batches its loss saw, and writes ``OUT/rank<r>.pt``
(``{"batches", "weights"}``) or ``OUT/rank<r>.err`` (the traceback).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

DIMS = (32, 16, 8)
WIDTH = 32
STEPS = 2
ROWS_PER_RANK = 6
MINI_BATCH = 4
LR = 0.5


def gathers(cls) -> bool:
    import inspect

    return "gather_across_devices" in inspect.signature(cls.__init__).parameters


def _loss(model, kind: str):
    from conformance import compat

    cls = compat.loss_class("CachedMultipleNegativesRankingLoss")
    kwargs = {"mini_batch_size": MINI_BATCH}
    if gathers(cls):
        kwargs["gather_across_devices"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = cls(model, **kwargs)
    if kind == "2d":
        # every layer and every width in every step: no draw from random, which differs between the ranks
        return compat.matryoshka_2d_loss(model, inner, DIMS, None, -1, n_layers_per_step=-1)
    return compat.matryoshka_loss(model, inner, DIMS)


def _train(out: Path, model_dir: Path, kind: str) -> None:
    import torch

    from conformance import data, tiny, training

    torch.set_num_threads(1)
    model = tiny.load_sentence_transformer(model_dir, WIDTH).train()
    loss_fn = _loss(model, kind)
    texts = data.sentences(columns=2, rows=2 * ROWS_PER_RANK)
    recipe = training.Recipe(steps=STEPS, batch_size=ROWS_PER_RANK, lr=LR)
    run = training.Run()
    handles = training.record(loss_fn, run)
    # BERT's pooler gets no gradient (mean pooling never uses it): DDP must be told
    trainer = training.trainer(model, loss_fn, texts, out / "trainer", recipe, ddp_find_unused_parameters=True)
    trainer.train()
    for handle in handles:
        handle.remove()
    import torch.distributed as dist

    info = {
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "gathers": gathers(type(inner_loss(loss_fn))),
    }
    torch.save(
        {"batches": run.batches, "weights": training.weights(model), **info}, out / f"rank{os.environ['RANK']}.pt"
    )


def inner_loss(loss_fn):
    """The cached loss at the end of the ``.loss`` chain (MatryoshkaLoss, or AdaptiveLayerLoss(MatryoshkaLoss))."""
    while hasattr(loss_fn, "loss"):
        loss_fn = loss_fn.loss
    return loss_fn


def main(argv: list[str]) -> int:
    out, model_dir = Path(argv[0]), Path(argv[1])
    kind = argv[2] if len(argv) > 2 else "matryoshka"
    rank = os.environ.get("RANK", "?")
    try:
        _train(out, model_dir, kind)
    except BaseException:  # noqa: BLE001 - the launching test reports it
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        return 1
    # The results are written: leave without destructors, which can hang joining a gloo process group's
    # threads (seen with the forked ranks of test_distributed.py, see its _leave).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

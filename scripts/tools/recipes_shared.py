"""The shared multi-width loss stage on native releases (3.4.0 - 6.2.0): a performance patch of its own.

The backport series ships ``losses/_matryoshka_shared.py`` inside ``matryoshka-truncate-after-cache``; a
fix series carries the same file (one definition: its adapters cover every release's built-in cached
losses) and teaches native MatryoshkaLoss's ``CachedLossDecorator`` to try it first. Kept apart from the
correctness fixes, so that a maintainer can take those without it; it comes last in the series, after
the per-width logging whose ``record_per_dim`` it calls.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .recipes import LOSSES, _sub_once, import_path
from .recipes_native import NEW_LOSSES

SOURCE = Path(__file__).resolve().parents[2] / "patches" / "source" / "files"
SHARED_SOURCE = f"{LOSSES}/_matryoshka_shared.py"
SHARED_MODULE_OLD = SHARED_SOURCE  # 3.4.0 - 5.3.x: the backport's path
SHARED_MODULE_NEW = f"{NEW_LOSSES}/_matryoshka_shared.py"

DISPATCH = """\
        # The built-in cached losses compute every width at once (_matryoshka_shared: one product per width
        # segment, one backward for all widths); any other loss takes the per-width loop below.
        dims_weights = [(self.matryoshka_dims[idx], self.matryoshka_weights[idx]) for idx in dim_indices]
        shared = shared_calculate_loss(self.fn, dims_weights, reps, args, kwargs)
        if shared is not None:
            for dim, _ in dims_weights:
                record_per_dim(dim, shared.per_width[dim])
            return shared.total

"""


def shared_module() -> str:
    """The module's text: the backport's file, unchanged (it imports nothing of the package's layout)."""
    return (SOURCE / SHARED_SOURCE).read_text()


def edit_matryoshka_shared_stage(module: str, text: str) -> str:
    """Native MatryoshkaLoss: CachedLossDecorator tries the shared multi-width stage of ``module`` first."""
    what = "MatryoshkaLoss"
    text = _sub_once(
        r"^from torch import Tensor, nn\n\n",
        lambda m: m.group(0) + f"from {import_path(module)} import calculate_loss as shared_calculate_loss\n",
        text,
        what,
    )
    return _sub_once(
        r"^( +dim_indices = sample_dim_indices\(dim_indices, self\.n_dims_per_step\)\n\n)"
        r"(        loss = 0\.0\n        for idx in dim_indices:\n            dim = self\.matryoshka_dims\[idx\]\n"
        r"            weight = self\.matryoshka_weights\[idx\]\n\n            truncated = )",
        lambda m: m.group(1) + DISPATCH + m.group(2),
        text,
        what,
    )


def edit_for(module: str):
    return partial(edit_matryoshka_shared_stage, module)

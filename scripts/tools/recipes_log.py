"""Per-width loss logging (``MatryoshkaLoss(..., log_per_dim=True)``): the recipes of both series.

The backport series adds ``sentence_transformers/losses/_matryoshka_log.py`` and imports it; a fix
series inlines the same functions into the release's MatryoshkaLoss module (one file, as upstream
would write it). Either way MatryoshkaLoss gains the switch, its forward collects the widths' losses
when it is on, and every loss stage reports each width's unweighted loss through ``record_per_dim``:
the non-cached loop of MatryoshkaLoss.forward, the backport's truncate-after-cache stage, and the
native CachedLossDecorator.
"""

from __future__ import annotations

from pathlib import Path

from .recipes import LOSSES, MATRYOSHKA, RecipeError, _matryoshka_class, _sub_once

LOG_MODULE = f"{LOSSES}/_matryoshka_log.py"
CACHE_MODULE = f"{LOSSES}/_matryoshka_cache.py"
SOURCE = Path(__file__).resolve().parents[2] / "patches" / "source" / "files" / LOG_MODULE
#: The line of _matryoshka_log.py after which its functions start (what a fix series inlines).
SHARED_MARKER = "# --- per-width logging: everything below is shared with the fix series of native releases"
NAMES = "check_log_per_dim, collecting_per_dim, is_collecting_per_dim, per_dim_output, record_per_dim"

INIT_SWITCH = """\
        # log_per_dim: record each width's unweighted loss in last_per_dim_losses and, where the trainer logs
        # loss components, return them as such (see record_per_dim); the training itself is unchanged.
        self.log_per_dim = check_log_per_dim(log_per_dim)
        self.last_per_dim_losses = {}
"""

FORWARD_COLLECTS = """\
        if self.log_per_dim and not is_collecting_per_dim(self):
            # Run this forward inside a collector of the widths' losses, then log them.
            with collecting_per_dim(self) as per_dim:
                loss = self.forward(sentence_features, labels)
            return per_dim_output(self, loss, per_dim)
"""


def shared_functions() -> str:
    """The functions of _matryoshka_log.py, as a fix series inlines them."""
    text = SOURCE.read_text()
    head, sep, body = text.partition(SHARED_MARKER + "\n")
    if not sep:
        raise RecipeError(f"{SOURCE}: no line {SHARED_MARKER!r}")
    return body.strip("\n") + "\n\n\n"


def _edit_matryoshka_class(text: str, what: str) -> str:
    """The switch in MatryoshkaLoss.__init__, the collector in forward, the record in the non-cached loop."""
    head, body = _matryoshka_class(text)
    body = _sub_once(
        r"^(    def __init__\(\n(?:        [^\n]*,\n)+)(    \) -> None:\n)",
        lambda m: m.group(1) + "        log_per_dim: bool = False,\n" + m.group(2),
        body,
        what,
    )
    body = _sub_once(r"^        self\.loss = loss\n", lambda m: m.group(0) + INIT_SWITCH, body, what)
    body = _sub_once(
        r"^    def forward\(self, sentence_features: [^\n]*\) -> Tensor:\n",
        lambda m: m.group(0) + FORWARD_COLLECTS,
        body,
        what,
    )
    body = _sub_once(
        r"^( +)loss \+= weight \* self\.loss\(sentence_features, (\w+)\)\n",
        lambda m: (
            f"{m.group(1)}dim_loss = self.loss(sentence_features, {m.group(2)})\n"
            f"{m.group(1)}record_per_dim(dim, dim_loss, owner=self)\n"
            f"{m.group(1)}loss += weight * dim_loss\n"
        ),
        body,
        what,
    )
    return head + body


def edit_matryoshka_log(text: str) -> str:
    """Backport MatryoshkaLoss: import the logging module; the switch, the collector, the record."""
    text = _sub_once(
        r"^from sentence_transformers\.losses\._matryoshka_cache import [^\n]*\n",
        lambda m: m.group(0) + f"from sentence_transformers.losses._matryoshka_log import {NAMES}\n",
        text,
        MATRYOSHKA,
    )
    return _edit_matryoshka_class(text, MATRYOSHKA)


def edit_cache_stage_log(text: str) -> str:
    """Backport truncate-after-cache stage: report each width's loss where it is computed (the shared
    multi-width stage and the generic per-width path)."""
    text = _sub_once(
        r"^from torch import Tensor, nn\n",
        lambda m: m.group(0) + "\nfrom sentence_transformers.losses._matryoshka_log import record_per_dim\n",
        text,
        CACHE_MODULE,
    )
    text = _sub_once(
        r"^        total, full_grads = shared\.total, shared\.grads\n",
        lambda m: (
            m.group(0) + "        for dim, loss in shared.per_width.items():\n            record_per_dim(dim, loss)\n"
        ),
        text,
        CACHE_MODULE,
    )
    return _sub_once(
        r"^            loss = inner_method\(truncated, \*args, \*\*kwargs\)\n",
        lambda m: m.group(0) + "        record_per_dim(dim, loss)\n",
        text,
        CACHE_MODULE,
    )


def edit_matryoshka_log_native(text: str) -> str:
    """Native MatryoshkaLoss: inline the logging functions; the switch, the collector, both records."""
    what = "MatryoshkaLoss"
    text = _sub_once(
        r"^import random\n", "import contextlib\nimport contextvars\nimport functools\nimport random\n", text, what
    )
    text = _sub_once(r"^class ForwardDecorator\b", lambda m: shared_functions() + m.group(0), text, what)
    text = _sub_once(
        r"^( +)loss \+= weight \* self\.fn\(matryoshka_reps, \*args, \*\*kwargs\)\n",
        lambda m: (
            f"{m.group(1)}dim_loss = self.fn(matryoshka_reps, *args, **kwargs)\n"
            f"{m.group(1)}record_per_dim(dim, dim_loss)\n"
            f"{m.group(1)}loss += weight * dim_loss\n"
        ),
        text,
        what,
    )
    return _edit_matryoshka_class(text, what)

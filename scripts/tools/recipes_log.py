"""Per-width loss logging (``MatryoshkaLoss(..., log_per_dim=True)``): the recipes of both series.

The backport series adds ``sentence_transformers/losses/_matryoshka_log.py`` and imports it; a fix
series inlines the same functions into the release's MatryoshkaLoss module (one file, as upstream
would write it). Either way MatryoshkaLoss gains the switch, its forward collects the widths' losses
when it is on, and every loss stage reports each width's unweighted loss through ``record_per_dim``:
the non-cached loop of MatryoshkaLoss.forward, the backport's truncate-after-cache stage, and the
native CachedLossDecorator.
"""

from __future__ import annotations

import re
from pathlib import Path

from .recipes import LOSSES, MATRYOSHKA, RecipeError, _matryoshka_class, _sub_once, import_path

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


def _add_init_keyword(body: str, what: str) -> str:
    return _sub_once(
        r"^(    def __init__\(\n(?:        [^\n]*,\n)+)(    \) -> None:\n)",
        lambda m: m.group(1) + "        log_per_dim: bool = False,\n" + m.group(2),
        body,
        what,
    )


def _add_switch(body: str, init_anchor: str, init_switch: str, forward_collects: str, what: str) -> str:
    """The ``log_per_dim`` keyword of a loss class's __init__, its switch after ``init_anchor``, and the
    collector at the top of its forward (MatryoshkaLoss, AdaptiveLayerLoss)."""
    body = _add_init_keyword(body, what)
    body = _sub_once(init_anchor, lambda m: m.group(0) + init_switch, body, what)
    return _sub_once(
        r"^    def forward\(self, sentence_features: [^\n]*\) -> Tensor:\n",
        lambda m: m.group(0) + forward_collects,
        body,
        what,
    )


def _edit_matryoshka_class(text: str, what: str) -> str:
    """The switch in MatryoshkaLoss.__init__, the collector in forward, the record in the non-cached loop."""
    head, body = _matryoshka_class(text)
    body = _add_switch(body, r"^        self\.loss = loss\n", INIT_SWITCH, FORWARD_COLLECTS, what)
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


# --- AdaptiveLayerLoss / Matryoshka2dLoss (2.5.0+): one loss per (layers, width) ---------------------------

#: The logging functions are reached through their module, imported on first use: a native release's
#: MatryoshkaLoss module imports the losses package, whose initialisation imports AdaptiveLayerLoss first.
LOG_ACCESSOR = '''\
def _matryoshka_log():
    """The module of the per-width logging functions ({module}), imported on first use: before 5.7.0 a native
    MatryoshkaLoss module imports the losses package, whose initialisation imports this module first."""
    return importlib.import_module("{module}")


'''

ADAPTIVE_INIT_SWITCH = """\
        # log_per_dim: record the unweighted loss of every (layers, width) term in last_per_dim_losses and, where
        # the trainer logs loss components, return them as such (see per_term_output); training is unchanged.
        self.log_per_dim = _matryoshka_log().check_log_per_dim(log_per_dim)
        self.last_per_dim_losses = {}
"""

ADAPTIVE_FORWARD_COLLECTS = """\
        log = _matryoshka_log()
        if self.log_per_dim and not log.is_collecting_per_dim(self):
            # Run this forward inside a collector of every (layers, width) loss, then log them.
            with log.collecting_per_dim(self) as per_term:
                loss = self.forward(sentence_features, labels)
            return log.per_term_output(self, loss, per_term)
"""

#: The layer cache's import in AdaptiveLayerLoss (adaptive-layer-truncate-after-cache) gains two names.
LAYER_CACHE_IMPORT = "    adaptive_layer_cached_forward,\n    check_adaptive_layer_loss,\n    uses_layer_cache,\n)\n"


def _class_body(text: str, name: str, what: str) -> tuple[str, str]:
    head, sep, body = text.partition(f"\nclass {name}(")
    if not sep:
        raise RecipeError(f"{what}: no class {name}")
    return head, sep + body


def _import_importlib(text: str, what: str) -> str:
    return _sub_once(r"^import random\n", "import importlib\nimport random\n", text, what)


def edit_adaptive_layer_log(log_path: str):
    """AdaptiveLayerLoss: the switch, the collector, every layer's term recorded per (layers, width) on the
    non-cached path (the layer cache records its own terms). ``log_path``: the file of the logging functions
    (the backport's _matryoshka_log.py, or a native release's MatryoshkaLoss module, which inlines them)."""
    log_module = import_path(log_path)

    def edit(text: str) -> str:
        what = "AdaptiveLayerLoss"
        text = _import_importlib(text, what)
        text = _sub_once(
            re.escape(LAYER_CACHE_IMPORT),
            "    FINAL,\n" + LAYER_CACHE_IMPORT[:-2] + "    layers_used,\n)\n",
            text,
            what,
        )
        head, body = _class_body(text, "AdaptiveLayerLoss", what)
        head = head.rstrip("\n") + "\n\n\n" + LOG_ACCESSOR.format(module=log_module).rstrip("\n") + "\n"
        body = _add_switch(
            body,
            r"^        self\.kl_temperature = kl_temperature\n",
            ADAPTIVE_INIT_SWITCH,
            ADAPTIVE_FORWARD_COLLECTS,
            what,
        )
        body = _sub_once(
            r"= self\.loss\(sentence_features, labels\) \* self\.last_layer_weight\n",
            "= log.layer_term(self, layers_used(self, FINAL), self.loss, sentence_features, labels)"
            " * self.last_layer_weight\n",
            body,
            what,
        )
        body = _sub_once(
            r"^( +)layer_loss = self\.loss\(sentence_features, labels\)\n",
            lambda m: (
                f"{m.group(1)}layer_loss = log.layer_term("
                "self, layers_used(self, layer_idx), self.loss, sentence_features, labels)\n"
            ),
            body,
            what,
        )
        return head + body

    return edit


def edit_matryoshka_2d_log(text: str) -> str:
    """Matryoshka2dLoss: the switch, handed to AdaptiveLayerLoss."""
    what = "Matryoshka2dLoss"
    head, body = _class_body(text, "Matryoshka2dLoss", what)
    body = _add_init_keyword(body, what)
    body = _sub_once(
        r"^            kl_temperature=kl_temperature,\n",
        lambda m: m.group(0) + "            log_per_dim=log_per_dim,\n",
        body,
        what,
    )
    return head + body


def edit_layer_cache_log(log_path: str):
    """The layer cache: record the unweighted loss of every (layers, width) term it computed."""
    log_module = import_path(log_path)

    def edit(text: str) -> str:
        what = "_adaptive_layer_cache.py"
        text = _import_importlib(text, what)
        text = _sub_once(
            r"^def adaptive_layer_cached_forward\(",
            lambda m: LOG_ACCESSOR.format(module=log_module) + m.group(0),
            text,
            what,
        )
        return _sub_once(
            r"^    value, grads = stage\.result\.total, stage\.result\.grads\n",
            lambda m: (
                m.group(0)
                + "    for (index, dim), term in stage.result.per_term.items():\n"
                + "        _matryoshka_log().record_per_dim((layers_used(owner, index), dim), term, owner=owner)\n"
            ),
            text,
            what,
        )

    return edit

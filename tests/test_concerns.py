"""One model of concerns and defects: the registry's fixes name concerns, and their ranges agree.

A defect of ``conformance/expected_failures.toml`` with ``fixed_by`` is registered for unpatched
releases only, on the promise that every release in its range gets one of those patches. The release
ranges are written twice (the concern's specifier in ``scripts/tools/concerns.py``, the defect's in
the registry): this is where they are checked against each other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version
from support import TABLE
from tools import concerns, recipes

from conformance import registry

DEFECTS = [d for d in registry.load() if d.fixed_by]


def test_every_fix_names_a_patch():
    known = set(concerns.slugs())
    for defect in DEFECTS:
        unknown = [s for s in defect.fixed_by if s not in known]
        assert not unknown, f"{defect.id}: fixed_by names {unknown}, not a concern slug of scripts/tools/concerns.py"


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.id)
def test_the_fix_reaches_every_release_with_the_defect(defect):
    with_defect = [r.version for r in TABLE if Version(r.version) in defect.releases]
    fixed = set()
    for slug in defect.fixed_by:
        fixed.update(concerns.releases_with(slug, TABLE))
    missing = [v for v in with_defect if v not in fixed]
    assert with_defect, f"{defect.id}: its range {defect.releases} holds no release of the table"
    assert not missing, (
        f"{defect.id} ({defect.releases}) is registered as fixed by {', '.join(defect.fixed_by)}, "
        f"but the series of {', '.join(missing)} do not carry it"
    )


def test_every_patch_has_a_message_and_every_message_a_patch():
    messages = {p.stem for p in concerns.MESSAGES.glob("*.txt")}
    assert set(concerns.slugs()) == messages


def test_concerns_of_one_slug_have_disjoint_ranges_per_kind():
    for kind in (concerns.BACKPORT, concerns.NATIVE_FIXES):
        for slug in {c.slug for c in kind}:
            for release in TABLE:
                hits = [c for c in kind if c.slug == slug and c.in_range(release.version)]
                assert len(hits) <= 1, f"{slug}: {len(hits)} concerns claim {release.version}"


def test_a_file_missing_inside_the_declared_range_is_an_error(tmp_path: Path):
    concern = recipes.Concern("x", {"sentence_transformers/losses/Gone.py": lambda t: t}, releases=">=1.0")
    assert concern.applies(tmp_path, "0.9") is False  # outside the range: not this release's patch
    with pytest.raises(recipes.RecipeError, match="Gone.py missing in sentence-transformers 1.2"):
        concern.applies(tmp_path, "1.2")


def test_a_concern_may_edit_a_file_an_earlier_patch_adds(tmp_path: Path):
    """matryoshka-log-per-dim edits _matryoshka_cache.py, which matryoshka-truncate-after-cache adds."""
    added = "sentence_transformers/losses/_added.py"
    concern = recipes.Concern("x", {added: lambda t: t}, releases=">=1.0")
    assert concern.applies(tmp_path, "1.2", frozenset({added})) is True
    with pytest.raises(recipes.RecipeError, match="_added.py missing"):
        concern.applies(tmp_path, "1.2")


def test_a_made_file_counts_as_added():
    """A fix series makes its self-contained layer cache (``writes``) where a backport copies one (``adds``):
    both are files the series creates, so a later concern may edit them and the pristine tree lacks them."""
    made = "sentence_transformers/sentence_transformer/losses/_made.py"
    concern = recipes.Concern("x", {}, ("sentence_transformers/losses/_copied.py",), writes={made: lambda: ""})
    assert concern.added == ("sentence_transformers/losses/_copied.py", made)


def test_the_native_layer_cache_is_self_contained():
    """The native layer cache imports nothing of the series' backport modules and keeps each release's
    prior-layer semantics (PR #3560): it is made from the backport's sources by ``make series``."""
    from tools import recipes_layers as layers

    for first_prior in (0, 1):
        text = layers.native_layer_module(layers.LAYER_MODULE_NEW, first_prior)
        compile(text, layers.LAYER_MODULE_NEW, "exec")
        assert "_matryoshka_cache" not in text
        assert f"\nFIRST_PRIOR = {first_prior}\n" in text
        for helper in layers.HELPERS:
            assert text.count(f"def {helper}(") + text.count(f"\n{helper} = ") == 1, helper

"""Review aid: patched files against the native release, and range-diff between series (synthetic release)."""

from __future__ import annotations

import dataclasses
import datetime
import shutil

import pytest
from st_patch import manifest as mf
from tools import releases, review

MATRYOSHKA = "sentence_transformers/losses/MatryoshkaLoss.py"


@pytest.fixture
def setup(synthetic, make_target, tmp_path):
    manifest = mf.load(synthetic.manifest)
    pristine = make_target("source")  # 9.9.9 as released (CRLF)
    native = make_target("source", version="10.0.0")
    # upstream's own version of the change: the same call, one comment more
    (native / MATRYOSHKA).write_text(
        synthetic.patched[MATRYOSHKA].replace(
            "return truncate_after_cache", "# upstream\n        return truncate_after_cache"
        )
    )
    trees = {"9.9.8": pristine, "9.9.9": pristine, "10.0.0": native}
    table = [
        releases.Release(v, datetime.date(2026, 1, 1), (), s)
        for v, s in (("9.9.8", "patched"), ("9.9.9", "patched"), ("10.0.0", "native"))
    ]
    return manifest, trees.__getitem__, table


def test_native_diff_shows_only_what_upstream_did_differently(setup):
    manifest, tree_for, table = setup
    text = review.native_diff("9.9.9", manifest=manifest, tree_for=tree_for, table=table)
    assert text.startswith("# series backport-9.9 on 9.9.9 (a/, patched) vs sentence-transformers 10.0.0")
    assert f"+++ b/{MATRYOSHKA} (10.0.0)" in text
    assert "+        # upstream" in text
    assert "-        return truncate_after_cache" not in text  # the backport's line is upstream's line
    assert "_matryoshka_cache.py: not in 10.0.0 (added by the series)" in text
    assert "tests/" not in text


def test_native_diff_needs_a_series_and_a_native_release(setup):
    manifest, tree_for, table = setup
    with pytest.raises(LookupError, match="no series"):
        review.native_diff("10.0.0", manifest=manifest, tree_for=tree_for, table=table)
    with pytest.raises(LookupError, match="native"):
        review.native_diff("9.9.9", manifest=manifest, tree_for=tree_for, table=table[:2])


def test_range_diff_of_identical_series_shows_equal_commits(setup, tmp_path):
    manifest, tree_for, _table = setup
    original = manifest.series["backport-9.9"]
    copy = tmp_path / "backport-9.9.9"
    shutil.copytree(original.directory, copy)
    manifest.series["backport-9.9.9"] = dataclasses.replace(
        original, name="backport-9.9.9", releases=["9.9.9"], directory=copy
    )
    manifest.series["backport-9.9"] = dataclasses.replace(original, releases=["9.9.8"])
    text = review.range_diff("backport-9.9", "backport-9.9.9", manifest=manifest, tree_for=tree_for)
    lines = [ln for ln in text.splitlines() if ln and ln[0].isdigit()]
    assert len(lines) == 2 and all(" = " in ln for ln in lines), text
    assert review.adjacent_pairs(manifest) == [("backport-9.9", "backport-9.9.9")]

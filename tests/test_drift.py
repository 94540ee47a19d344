"""Drift check: native support by content, the closest series and its failing hunks (synthetic release)."""

from __future__ import annotations

from st_patch import drift, manifest

MATRYOSHKA = "sentence_transformers/losses/MatryoshkaLoss.py"


def _report(synthetic, tree):
    return drift.drift_report(tree, manifest.load(synthetic.manifest))


def test_unknown_release_with_the_known_files_gets_the_series_and_every_hunk(synthetic, make_target):
    tree = make_target("source", version="9.9.10")
    report = _report(synthetic, tree)
    assert report["version"] == "9.9.10" and report["known"] is False
    assert report["closest"] == synthetic.series
    fit = report["series"][0]
    assert fit["hunks_total"] > 0 and fit["hunks_applied"] == fit["hunks_total"]
    assert fit["files"][MATRYOSHKA] == "pristine"
    assert report["support"]["state"] == "unsupported" and not report["support"]["native"]
    assert "make series" in report["advice"]


def test_changed_context_is_reported_as_the_failing_hunk(synthetic, make_target):
    tree = make_target("installed", version="9.9.10")
    path = tree / MATRYOSHKA
    path.write_bytes(path.read_bytes().replace(b"return self.loss(features)", b"return self.loss(features, 1)"))
    report = _report(synthetic, tree)
    fit = report["series"][0]
    assert fit["files"][MATRYOSHKA] == "modified"
    assert fit["files"]["tests/test_losses.py"] == "out-of-scope"  # site-packages hold no tests/
    rejected = [r for p in fit["patches"] for r in p["rejected"]]
    assert [r["file"] for r in rejected] == [MATRYOSHKA]
    assert fit["hunks_applied"] == fit["hunks_total"] - 1
    text = drift.format_text(report)
    assert f"closest series {synthetic.series}" in text
    assert "FAILS     0001-" in text and MATRYOSHKA in text
    assert "recipes" in report["advice"]


def test_native_support_is_detected_by_content_not_version(synthetic, make_target):
    tree = make_target("source", version="1.0.0")  # a version that says nothing
    (tree / MATRYOSHKA).write_text(
        "class CachedLossDecorator:\n    pass\n\nclass MatryoshkaLoss:\n    pass\n", encoding="utf-8"
    )
    report = _report(synthetic, tree)
    assert report["support"] == {
        "state": "native",
        "native": True,
        "file": MATRYOSHKA,
        "evidence": ["CachedLossDecorator"],
    }
    assert "native support" in report["advice"]


def test_native_support_in_the_6x_layout(tmp_path):
    tree = tmp_path / "st"
    module = tree / "sentence_transformers" / "sentence_transformer" / "losses" / "matryoshka.py"
    module.parent.mkdir(parents=True)
    (tree / "sentence_transformers" / "__init__.py").write_text('__version__ = "7.0.0"\n')
    module.write_text("from ...base.losses.gradcache import uses_gradient_cache\n")
    report = drift.drift_report(tree, manifest.Manifest(path=tmp_path / "manifest.json", releases={}))
    assert report["support"]["state"] == "native"
    assert report["closest"] is None and "no series applies" in report["advice"]


def test_backported_tree_and_incompatible_warning(synthetic, make_target):
    tree = make_target("source", version="9.9.10")
    text = (tree / MATRYOSHKA).read_text()
    (tree / MATRYOSHKA).write_text(text.replace("import torch", "import torch\nfrom ._matryoshka_cache import x"))
    assert drift.support(tree)["state"] == "patched"
    (tree / MATRYOSHKA).write_text('warnings.warn("MatryoshkaLoss is not compatible with CachedGISTEmbedLoss.")\n')
    assert drift.support(tree) == {
        "state": "unsupported",
        "native": False,
        "file": MATRYOSHKA,
        "evidence": ["is not compatible with Cached"],
    }


def test_patch_files_parses_files_hunks_and_creations():
    text = (
        "From x\nSubject: y\n---\n"
        "diff --git a/p/a.py b/p/a.py\nindex 1..2 100644\n--- a/p/a.py\n+++ b/p/a.py\n"
        "@@ -1,2 +1,2 @@ class A:\n-x\n+y\n@@ -10 +10 @@\n-z\n+w\n"
        "diff --git a/p/b.py b/p/b.py\nnew file mode 100644\nindex 0..3\n--- /dev/null\n+++ b/p/b.py\n"
        "@@ -0,0 +1 @@\n+new\n"
    )
    assert drift.patch_files(text) == [
        ("p/a.py", False, 2, ["class A:", ""]),
        ("p/b.py", True, 1, [""]),
    ]

"""scripts/st-patch on a git checkout (an ST fork)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, git
from st_patch import cli

CLI = ROOT / "scripts" / "st-patch"
MATRYOSHKA = "sentence_transformers/losses/MatryoshkaLoss.py"
CACHE = "sentence_transformers/losses/_matryoshka_cache.py"


@pytest.fixture
def st(synthetic, capsys):
    """``st(command, target, *extra) -> (exit code, stdout + stderr)``, in-process, synthetic manifest."""

    def run(command, target, *extra):
        code = cli.main([command, "--target", str(target), "--manifest", str(synthetic.manifest), *extra])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


@pytest.fixture
def st_json(st):
    def run(command, target, *extra):
        code, out = st(command, target, "--json", *extra)
        result = json.loads(out)
        assert result["exit_code"] == code and result["command"] == command
        return code, result

    return run


# ------------------------------------------------------------------------------- the cycle


def test_git_checkout_apply_is_git_am_and_revert_is_git_revert(st, st_json, make_target, synthetic):
    repo = make_target("git")
    head = git(repo, "rev-parse", "HEAD").strip()
    code, result = st_json("check", repo)
    assert code == 0 and result["action"] == "would-apply" and result["target"]["kind"] == "git"
    assert git(repo, "rev-parse", "HEAD").strip() == head and git(repo, "status", "--porcelain") == ""

    code, result = st_json("apply", repo)
    assert code == 0 and result["action"] == "applied" and len(result["commits"]) == 2
    messages = git(repo, "log", "--format=%B%x00", head + "..HEAD").split("\0")
    assert sum(f"St-Patch-Series: {synthetic.series}" in m for m in messages) == 2
    for rel in synthetic.files:
        assert (repo / rel).read_bytes() == synthetic.patched[rel].encode(), rel
    code, out = st("apply", repo)
    assert code == 0 and "already patched" in out

    code, result = st_json("revert", repo)
    assert code == 0 and result["state"] == "pristine" and not result["warnings"]
    assert any("byte-identical" in m for m in result["messages"])
    assert git(repo, "diff", head, "HEAD") == ""
    assert st("revert", repo)[0] == 0
    code, result = st_json("apply", repo)  # again, after the revert
    assert code == 0 and result["action"] == "applied"


def test_git_checkout_refuses_uncommitted_changes_to_touched_files(st, make_target):
    repo = make_target("git")
    head = git(repo, "rev-parse", "HEAD").strip()
    (repo / CACHE).write_text("untracked\n")
    code, out = st("apply", repo)
    assert code == 1 and CACHE in out and "uncommitted" in out
    assert git(repo, "rev-parse", "HEAD").strip() == head


def test_git_fork_conflict_is_aborted_and_divergence_is_merged(st, st_json, make_target):
    repo = make_target("git")
    path = repo / MATRYOSHKA
    path.write_text(path.read_text().replace("return self.loss(features)", "return self.fork_loss(features)"))
    git(repo, "commit", "-qam", "Fork change on the patched line")
    head = git(repo, "rev-parse", "HEAD").strip()
    assert st("check", repo)[0] == 1
    code, out = st("apply", repo)
    assert code == 1 and "aborted" in out
    assert git(repo, "rev-parse", "HEAD").strip() == head and git(repo, "status", "--porcelain") == ""

    git(repo, "reset", "-q", "--hard", "HEAD~1")
    path.write_text(path.read_text().replace("step_6 = features", "step_6 = features  # the fork's own change"))
    git(repo, "commit", "-qam", "Fork change elsewhere")
    head = git(repo, "rev-parse", "HEAD").strip()
    code, result = st_json("status", repo)
    assert code == 0 and result["state"] == "modified"
    code, out = st("apply", repo)
    assert code == 0, out
    assert st_json("status", repo)[1]["state"] == "patched"
    code, out = st("revert", repo)
    assert code == 0, out
    assert git(repo, "diff", head, "HEAD") == ""

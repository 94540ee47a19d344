"""scripts/st-patch on a git checkout (an ST fork): per-patch state, partial series, git's own state
kept or restored on failure, Ctrl-C and kill -9, and the checks that predict what apply will do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, git

CLI = ROOT / "scripts" / "st-patch"
MATRYOSHKA = "sentence_transformers/losses/MatryoshkaLoss.py"
CACHE = "sentence_transformers/losses/_matryoshka_cache.py"


def _patches(synthetic):
    return sorted((synthetic.manifest.parent / "series" / synthetic.series).iterdir())


def _git_state(repo: Path) -> dict:
    """What must be exactly as before after a refused, failed or interrupted command."""
    return {
        "head": git(repo, "rev-parse", "HEAD").strip(),
        "branch": subprocess.run(
            ["git", "symbolic-ref", "-q", "HEAD"], cwd=str(repo), capture_output=True, text=True
        ).stdout.strip(),
        "index": git(repo, "ls-files", "-s"),
        "status": git(repo, "status", "--porcelain", "--untracked-files=all"),
        "refs": git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"),
    }


def _no_git_operation(repo: Path) -> None:
    for name in ("rebase-apply", "rebase-merge", "CHERRY_PICK_HEAD", "REVERT_HEAD", "MERGE_HEAD", "sequencer"):
        assert not (repo / ".git" / name).exists(), name


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


# ------------------------------------------------------------------------------- partial series


def _partial(repo: Path, synthetic, how: str):
    first, second = _patches(synthetic)
    if how == "cherry-picked":  # the second patch alone, taken from upstream's branch
        git(repo, "cherry-pick", git(synthetic.upstream, "rev-parse", "HEAD").strip())
        return ["missing", "present"]
    if how == "am-by-hand":  # the first patch applied by hand
        git(repo, "am", "-q", str(first))
        return ["present", "missing"]
    git(repo, "am", "-q", str(first), str(second))  # both, then one of them reverted
    git(repo, "revert", "--no-edit", "HEAD")
    return ["present", "reverted"]


@pytest.mark.parametrize("how", ["cherry-picked", "am-by-hand", "reverted"])
def test_partial_series_is_reported_per_patch_and_apply_adds_exactly_the_missing_ones(
    how, st, st_json, make_target, synthetic
):
    repo = make_target("git")
    release = git(repo, "rev-parse", "HEAD").strip()
    expected = _partial(repo, synthetic, how)
    before = git(repo, "rev-parse", "HEAD").strip()

    code, result = st_json("status", repo)
    assert code == 0 and result["state"] == "partial", result
    assert [p["state"] for p in result["patches"]] == expected
    assert [p["patch"] for p in result["patches"]] == [p.name for p in _patches(synthetic)]
    assert result["patches"][0]["subject"] == "MatryoshkaLoss: truncate after cache"
    assert all(p["commits"] for p, s in zip(result["patches"], expected) if s != "missing")
    assert any("partial: present" in m for m in result["messages"])

    code, result = st_json("check", repo)
    assert code == 0 and result["action"] == "would-apply", result
    assert git(repo, "rev-parse", "HEAD").strip() == before

    code, result = st_json("apply", repo)
    assert code == 0 and result["action"] == "applied", result
    new = git(repo, "log", "--format=%s", f"{before}..HEAD").splitlines()
    todo = [p.name for p, s in zip(_patches(synthetic), expected) if s != "present"]
    assert len(new) == len(todo) == 1, new
    assert [p["state"] for p in result["patches"]] == ["present", "present"] and result["state"] == "patched"
    for rel in synthetic.files:
        assert (repo / rel).read_bytes() == synthetic.patched[rel].encode(), rel
    code, out = st("apply", repo)
    assert code == 0 and "already patched" in out

    code, result = st_json("revert", repo)
    assert code == 0 and result["action"] == "reverted" and result["state"] == "pristine", result
    assert git(repo, "diff", release, "HEAD") == "", "revert must give back the release's tree"
    _no_git_operation(repo)


def test_apply_on_a_partial_fork_that_conflicts_puts_everything_back_and_names_the_missing_patch(
    st, make_target, synthetic
):
    repo = make_target("git")
    first, _ = _patches(synthetic)
    git(repo, "am", "-q", str(first))  # the first patch, by hand; then the fork edits what the second one edits
    (repo / "tests/test_losses.py").write_text("def test_old():\n    assert 2 + 2 == 4\n")
    git(repo, "commit", "-qam", "Fork: own test")
    before = _git_state(repo)
    code, out = st("apply", repo)
    assert code == 1 and "0002-" in out and "git -C" in out and " am -3 " in out, out
    assert "0001-" not in out.split("failed")[0].split("patches (")[-1]
    assert _git_state(repo) == before
    _no_git_operation(repo)


# ------------------------------------------------------------------------------- checks that predict apply


def test_stale_index_lock_is_refused_by_check_and_apply_naming_it(st, make_target):
    repo = make_target("git")
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")
    before = _git_state(repo)
    for command in ("check", "apply"):
        code, out = st(command, repo)
        assert code == 1, (command, out)
        assert f"rm {lock}" in out and "nothing was changed" in out.lower(), (command, out)
        assert "aborted (nothing applied)" not in out
        _no_git_operation(repo)
    lock.unlink()
    assert _git_state(repo) == before


def test_staged_unrelated_file_is_refused_by_check_and_apply_alike(st_json, make_target):
    repo = make_target("git")
    (repo / "NOTES.md").write_text("mine\n")
    git(repo, "add", "NOTES.md")
    before = _git_state(repo)
    errors = []
    for command in ("check", "apply"):
        code, result = st_json(command, repo)
        assert code == 1 and "Dirty index" in result["error"] and "NOTES.md" in result["error"], result
        errors.append(result["error"])
    assert errors[0] == errors[1]
    assert _git_state(repo) == before
    _no_git_operation(repo)


def test_detached_head_is_warned_about(st_json, make_target):
    repo = make_target("git")
    git(repo, "checkout", "-q", "--detach")
    for command in ("status", "check", "apply"):
        code, result = st_json(command, repo)
        assert code == 0, result
        assert any("detached" in w and "switch -c" in w for w in result["warnings"]), (command, result["warnings"])


# ------------------------------------------------------------------------------- signals and kill -9

HOOK = """#!{python}
import os, sys, time
d = os.environ["ST_TEST_HOOK_DIR"]
count = os.path.join(d, "count")
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
if n == int(os.environ["ST_TEST_HOOK_AT"]):
    open(os.path.join(d, "pgid.tmp"), "w").write(str(os.getpgid(0)))
    os.rename(os.path.join(d, "pgid.tmp"), os.path.join(d, "pgid"))
    deadline = time.time() + 20
    while not os.path.exists(os.path.join(d, "release")) and time.time() < deadline:
        time.sleep(0.02)
"""


# Where git am pauses: the second patch in the index, the first committed (pre-applypatch, 2nd call); or
# right after the first commit, before git am records it as safe to abort (post-applypatch, 1st call).
PAUSES = [("pre-applypatch", 2), ("post-applypatch", 1)]
PAUSE_IDS = ["second-patch-staged", "first-patch-just-committed"]


def _hooked_run(repo: Path, synthetic, tmp_path: Path, pause, command: str = "apply"):
    """st-patch COMMAND as users run it (a process group of its own), paused inside git am by a hook."""
    hook = repo / ".git" / "hooks" / pause[0]
    hook.write_text(HOOK.format(python=sys.executable))
    hook.chmod(0o755)
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(CLI), command, "--target", str(repo), "--manifest", str(synthetic.manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "ST_TEST_HOOK_DIR": str(hook_dir), "ST_TEST_HOOK_AT": str(pause[1])},
    )
    deadline = time.time() + 30
    while not (hook_dir / "pgid").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    return proc, hook_dir, int((hook_dir / "pgid").read_text())


@pytest.mark.parametrize("pause", PAUSES, ids=PAUSE_IDS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_git_am_exits_130_with_the_fork_exactly_as_before(
    signum, pause, make_target, synthetic, tmp_path
):
    repo = make_target("git")
    before = _git_state(repo)
    proc, hook_dir, _ = _hooked_run(repo, synthetic, tmp_path, pause)
    os.killpg(proc.pid, signum)  # what Ctrl-C at the terminal does: the foreground process group
    time.sleep(0.2)
    (hook_dir / "release").write_text("")
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert _git_state(repo) == before, out
    _no_git_operation(repo)
    assert "back at" in out and "verified" in out, out
    assert not (repo / ".git" / "st-patch").exists()


@pytest.mark.parametrize("pause", PAUSES, ids=PAUSE_IDS)
def test_kill_9_mid_git_am_is_reported_then_put_back_by_the_next_apply(
    pause, st, st_json, make_target, synthetic, tmp_path
):
    repo = make_target("git")
    start = git(repo, "rev-parse", "HEAD").strip()
    proc, _, hook_pgid = _hooked_run(repo, synthetic, tmp_path, pause)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, and git's if it has its own
    if hook_pgid != proc.pid:
        os.killpg(hook_pgid, signal.SIGKILL)
    proc.communicate(timeout=60)
    (repo / ".git" / "hooks" / pause[0]).unlink()
    assert (repo / ".git" / "rebase-apply").exists(), "the test should leave git am half-way"
    half = _git_state(repo)

    code, result = st_json("status", repo)
    assert code != 0, result
    text = " ".join(result["warnings"])
    assert "interrupted" in text and " am --abort" in text and f"reset --keep {start}" in text, text
    code, result = st_json("check", repo)
    assert code == 0 and result["action"] == "would-apply", result
    assert any(f"put the fork back to {start[:12]}" in m for m in result["messages"])
    assert _git_state(repo) == half, "status and check must not write"

    code, result = st_json("apply", repo)
    assert code == 0 and result["action"] == "applied" and result["state"] == "patched", result
    assert result["recovered"]["start"] == start
    assert len(git(repo, "rev-list", f"{start}..HEAD").split()) == 2
    _no_git_operation(repo)
    assert not (repo / ".git" / "st-patch").exists()
    assert git(repo, "status", "--porcelain") == ""
    code, result = st_json("status", repo)
    assert code == 0 and result["state"] == "patched" and not result["warnings"]


def test_kill_9_then_a_foreign_commit_makes_apply_refuse_and_change_nothing(st_json, make_target, synthetic, tmp_path):
    repo = make_target("git")
    start = git(repo, "rev-parse", "HEAD").strip()
    proc, _, hook_pgid = _hooked_run(repo, synthetic, tmp_path, PAUSES[0])
    os.killpg(proc.pid, signal.SIGKILL)
    if hook_pgid != proc.pid:
        os.killpg(hook_pgid, signal.SIGKILL)
    proc.communicate(timeout=60)
    (repo / ".git" / "hooks" / "pre-applypatch").unlink()
    git(repo, "am", "--abort")
    (repo / "NOTES.md").write_text("mine\n")
    git(repo, "add", "NOTES.md")
    git(repo, "commit", "-qm", "Mine")
    before = _git_state(repo)
    code, result = st_json("apply", repo)
    assert code == 1 and "will not put it back" in result["error"] and f"reset --keep {start}" in result["error"]
    assert _git_state(repo) == before


def _diverged_origin(synthetic, tmp_path: Path) -> Path:
    """A fork's origin whose MatryoshkaLoss.py differs inside the patch's context (git am needs -3 there)."""
    origin = tmp_path / "origin"
    git(tmp_path, "clone", "-q", "-b", "release", str(synthetic.upstream), str(origin))
    path = origin / MATRYOSHKA
    path.write_text(path.read_text().replace("step_9 = features", "step_9 = features  # the fork's own change"))
    git(origin, "commit", "-qam", "Fork change inside the patch's context")
    git(origin, "config", "uploadpack.allowFilter", "true")
    git(origin, "config", "uploadpack.allowAnySHA1InWant", "true")
    return origin


def test_missing_objects_in_an_offline_partial_clone_fail_cleanly(st_json, synthetic, tmp_path):
    """git am -3 needs the release's blob, which a blob-less clone whose remote is gone cannot fetch:
    apply must say so, exit 1, and leave the fork exactly as it was."""
    origin = _diverged_origin(synthetic, tmp_path)
    full = tmp_path / "full"
    git(tmp_path, "clone", "-q", str(origin), str(full))
    assert st_json("apply", full)[0] == 0, "control: with every object the 3-way merge applies the series"

    partial = tmp_path / "partial"
    git(tmp_path, "clone", "-q", "--filter=blob:none", f"file://{origin}", str(partial))
    origin.rename(tmp_path / "origin-gone")  # offline: the promisor remote cannot be reached
    before = _git_state(partial)
    code, result = st_json("apply", partial)
    assert code == 1, result
    assert _git_state(partial) == before
    _no_git_operation(partial)
    assert not (partial / ".git" / "st-patch").exists()

"""The git-checkout backend (an ST fork): ``git am -3`` applies the series as commits, ``git revert`` undoes them.

State is per patch. A patch is *present* when a commit in HEAD's history is it (same ``git patch-id
--stable``, or the trailer ``St-Patch-Series: <name>`` and the patch's subject) and no later commit
reverts it (``This reverts commit X``), *reverted* when all its commits are reverted, *missing*
otherwise. The fork is ``patched`` only when every patch is present; ``apply`` on a ``partial`` fork
applies the missing patches, ``revert`` reverts the present ones.

Per-patch state: ``forkstate``. Git's own state restored and verified after a failure or a signal,
and a killed run found and put back: ``forkrun``. What git says about the fork: ``forkgit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from . import gitrun
from . import targets as tg
from .forkgit import (
    blockers,
    branch,
    dirty_paths,
    git,
    head,
    short_ref,
)
from .forkrun import KilledRun, PutBack, SequenceFailed
from .forkstate import MISSING, PRESENT, REVERTED, TRAILER, PatchState, classify_at, names, patch_states
from .manifest import Series
from .outcome import FAIL, OK, PatchReport, Refusal
from .resolve import Context
from .swap import temporary_directory
from .targets import MODIFIED, PARTIAL, PATCHED, PRISTINE, FileState, Target


class ForkBackend(PutBack, KilledRun):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.target = ctx.target
        self.series = ctx.series
        self.out = ctx.outcome
        self.root = self.target.root
        self.touched = list(self.series.files)

    # ------------------------------------------------------------------------- analysis

    def _analyse(self, rev: str = "HEAD") -> Tuple[List[PatchState], List[FileState], str]:
        """Per-patch and per-file state (files as on disk), and the whole fork's state, into the outcome."""
        patches = patch_states(self.target, self.series, rev)
        files = tg.classify(self.target, self.series) if rev == "HEAD" else classify_at(self.target, self.series, rev)
        by_files = tg.overall(files)
        present = [p for p in patches if p.state == PRESENT]
        if len(present) == len(patches):
            state = PATCHED
        elif present:
            state = PARTIAL
        elif by_files == PATCHED:  # the series' content without its commits (squashed, no trailer)
            state = PATCHED
            for p in patches:
                p.state = PRESENT
            self.out.note(
                "the touched files are the series' patched ones, but no commit in HEAD's history is one of its "
                f"patches (by patch-id or {TRAILER}: {self.series.name}): counted as present by content"
            )
        elif by_files == MODIFIED:
            state = MODIFIED  # a fork whose files diverge from the release, none of the series in it
        else:
            state = PRISTINE
        self.out.files = [s.report() for s in files]
        self.out.patches = [PatchReport(p.name, p.subject, p.state, list(p.commits)) for p in patches]
        self.out.state = state
        self.out.commits = [sha for p in patches for sha in p.active]
        if state == PARTIAL:
            self.out.note(
                "partial: present {}; missing {}; reverted {}".format(
                    *(names([p for p in patches if p.state == s]) for s in (PRESENT, MISSING, REVERTED))
                )
            )
        return patches, files, state

    def _warn_detached(self) -> None:
        if branch(self.target) is None:
            self.out.warn(
                f"HEAD is detached at {head(self.target)[:12]}: commits made here are on no branch; "
                f"create one first: git -C {self.root} switch -c BRANCH"
            )

    def _refuse_if_blocked(self, action: str) -> None:
        reasons, self.out.dirty = blockers(self.target, self.touched, action)
        if reasons:
            raise Refusal(f"cannot {action}: " + "; ".join(reasons) + ". Nothing was changed.")

    # ------------------------------------------------------------------------- commands

    def status(self) -> int:
        info = self._interrupted()
        _, _, state = self._analyse()
        self._warn_detached()
        self.out.action = "none"
        if state == MODIFIED:
            self.out.note(
                f"the files differ from release {self.ctx.version} (a fork?): `check` tells whether the series "
                "applies with a 3-way merge"
            )
        dirty = dirty_paths(self.target, self.touched)
        if dirty:
            self.out.dirty = dirty
            self.out.note("uncommitted changes to touched files: {}".format(", ".join(dirty)))
        if info is not None:
            self._report_interrupted(info)
            if not info.get("at_start"):
                return FAIL
        return OK

    def check(self) -> int:
        info = self._interrupted()
        rev = "HEAD"
        if info is not None:
            self._report_interrupted(info)
            if not info.get("at_start"):
                if not info.get("restorable"):
                    raise Refusal(
                        "cannot apply: an interrupted st-patch run left the fork half-way and st-patch will not put "
                        "it back ({}). By hand: {}".format(info["why"], info["commands"])
                    )
                rev = info["start"]
                self.out.note(f"apply would first put the fork back to {rev[:12]} (the interrupted run)")
        patches, files, state = self._analyse(rev)
        self._warn_detached()
        if rev == "HEAD":
            self._refuse_if_blocked("apply")
        if state == PATCHED:
            self.out.action = "already-patched"
            self.out.note(
                "already patched: every patch of the series is present"
                + (" (commits {})".format(", ".join(c[:12] for c in self.out.commits)) if self.out.commits else "")
            )
            return OK
        todo = [p for p in patches if p.state != PRESENT]
        after = dry_run(self.target, self.series, rev, [p.path for p in todo])
        self.out.would = {s.path: s.state for s in after}
        exact = tg.overall(files) in (PRISTINE, PARTIAL)
        if exact and tg.overall(after) != PATCHED:
            raise Refusal(
                "git am -3 applies, but the files do not match the manifest's patched sha256: {}".format(
                    ", ".join(f"{s.path}={s.state}" for s in after if s.state != PATCHED)
                )
            )
        self.out.action = "would-apply"
        self.out.note(
            "apply would succeed: git am -3 of {} (tried in a temporary clone){}".format(
                names(todo),
                ""
                if exact
                else "; the files differ from the release, so the result was not compared with the manifest's hashes",
            )
        )
        return OK

    def apply(self) -> int:
        self._recover("apply")
        patches, files, state = self._analyse()
        self._warn_detached()
        self._refuse_if_blocked("apply")
        if state == PATCHED:
            self.out.action = "already-patched"
            self.out.note("already patched: every patch of the series is present; nothing to do")
            return OK
        todo = [p for p in patches if p.state != PRESENT]
        exact = tg.overall(files) in (PRISTINE, PARTIAL)

        def verify() -> str | None:
            after = tg.classify(self.target, self.series)
            if exact and tg.overall(after) != PATCHED:
                return "git am applied the patches but the files do not match the manifest's patched sha256: " + (
                    ", ".join(f"{s.path}={s.state}" for s in after if s.state != PATCHED)
                )
            return None

        paths = [str(p.path) for p in todo]
        try:
            self._sequence(["am", "-3", "--quiet"] + paths, "apply", verify)
        except SequenceFailed as exc:
            self._analyse()
            raise Refusal(
                "git am -3 of the missing patches ({}) failed and was aborted: {}. The fork is back at {} on {} "
                "(verified: no git am in progress, HEAD, branch, index and touched files as they were). "
                "To apply them by hand and resolve the conflicts: git -C {} am -3 {}".format(
                    names(todo), exc, exc.start.sha[:12], short_ref(exc.start.branch), self.root, " ".join(paths)
                )
            ) from None
        patches, _, state = self._analyse()
        new = [sha for p in patches if p.name in {t.name for t in todo} for sha in p.active[:1]]
        if state != PATCHED:
            self.out.warn(
                "after git am, st-patch does not find every patch of the series in HEAD's history (missing: "
                + names([p for p in patches if p.state != PRESENT])
                + "); status will not report the fork as patched"
            )
        self.out.action = "applied"
        self.out.note(
            "applied {} with git am -3: {}{}".format(
                names(todo),
                ", ".join(c[:12] for c in new),
                "" if exact else " (the files differ from the release: not compared with the manifest's hashes)",
            )
        )
        return OK

    def revert(self) -> int:
        self._recover("revert")
        patches, _, state = self._analyse()
        self._warn_detached()
        present = [p for p in patches if p.state == PRESENT]
        commits = [p.active[0] for p in present if p.active]
        if not commits:
            if present:
                raise Refusal(
                    f"the files are patched, but no commit in HEAD's history is a patch of series {self.series.name}; "
                    "revert by hand"
                )
            self.out.action = "already-pristine"
            self.out.note(f"no patch of series {self.series.name} is present: nothing to revert")
            return OK
        self._refuse_if_blocked("revert")
        order = git(self.target, ["rev-list", "--topo-order", "HEAD", "--"] + self.touched).stdout.split()
        commits.sort(key=lambda sha: order.index(sha) if sha in order else -1)  # newest first
        try:
            self._sequence(["revert", "--no-edit"] + commits, "revert", lambda: None)
        except SequenceFailed as exc:
            self._analyse()
            raise Refusal(
                "git revert of {} failed and was aborted: {}. The fork is back at {} (verified). "
                "Revert by hand: git -C {} revert {}".format(
                    ", ".join(c[:12] for c in commits), exc, exc.start.sha[:12], self.root, " ".join(commits)
                )
            ) from None
        identical = (
            git(
                self.target, ["diff", "--quiet", commits[-1] + "^", "HEAD", "--"] + self.touched, check=False
            ).returncode
            == 0
        )
        self._analyse()
        self.out.action = "reverted"
        self.out.note(
            f"reverted {len(commits)} commit{'' if len(commits) == 1 else 's'} of series {self.series.name} "
            "with git revert"
        )
        if identical:
            self.out.note(f"the touched files are byte-identical to {commits[-1][:12]}^")
        else:
            self.out.warn(f"the touched files differ from {commits[-1][:12]}^ (later commits changed them)")
        return OK


def dry_run(target: Target, series: Series, rev: str, patches: List[Path]) -> List[FileState]:
    """``git am -3`` ``patches`` in a throw-away shared clone at ``rev``; return the files' states there."""
    commit = git(target, ["rev-parse", "--verify", rev + "^{commit}"]).stdout.strip()
    with temporary_directory() as tmp:
        clone = Path(tmp) / "clone"
        proc = gitrun.run(
            ["clone", "--quiet", "--shared", "--no-checkout", str(target.root), str(clone)],
            Path(tmp),
            check=False,
            ceiling=Path(tmp),
        )
        if proc.returncode:
            raise Refusal(f"cannot make a temporary clone for the dry run: {gitrun.message(proc)}")
        gitrun.run(["checkout", "--quiet", "--detach", commit], clone, ceiling=Path(tmp))
        shadow = Target(clone, tg.GIT, target.version)
        proc = gitrun.run(
            ["am", "-3", "--quiet"] + [str(p) for p in patches],
            clone,
            check=False,
            ceiling=Path(tmp),
            env=gitrun.identity(target.root),
        )
        if proc.returncode:
            raise Refusal(
                "git am -3 of {} would fail: {}".format(", ".join(p.name for p in patches), gitrun.message(proc))
            )
        return tg.classify(shadow, series)

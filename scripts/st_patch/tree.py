"""The file-tree backend: an unpacked sdist (source) or an installed package (site-packages).

Every touched file is checked by sha256 against the release (pristine) and the patched state, in the
target's line endings. The new contents come from ``transform`` and are verified against the manifest
before anything is written; ``swap.commit`` then replaces the changed directories all at once. On an
installed package the dist-info's ``RECORD`` is rewritten in the same step (``record``), so
``pip uninstall`` removes everything. ``state.json`` in ``sentence_transformers/.st-patch/`` records
an applied series. ``status`` and ``check`` never write.
"""

from __future__ import annotations

import json
from typing import Dict, List

from . import __version__ as TOOL_VERSION
from . import record as rec
from . import recovery, swap
from . import targets as tg
from .outcome import FAIL, OK, Refusal
from .resolve import Context
from .signals import Guard
from .targets import ABSENT, GIT, INSTALLED, PATCHED, PRISTINE, SKIPPED, FileState
from .transform import describe_problems, transform, verify

STATE_FILE = "state.json"


def reinstall_hint(target: tg.Target, version: str | None) -> str:
    spec = f"sentence-transformers=={version}" if version else "sentence-transformers"
    if target.kind == INSTALLED:
        return f"reinstall it (pip install --force-reinstall --no-deps {spec}) or restore the file, then apply again"
    if target.kind == GIT:
        return "commit or restore the file, then apply again"
    return f"restore the file from the {spec} sdist, then apply again"


def _expected_text(hashes) -> str:
    if hashes is None:
        return "absent"
    if hashes.sha256 == hashes.sha256_lf:
        return hashes.sha256
    return f"{hashes.sha256} (CRLF) or {hashes.sha256_lf} (LF)"


def refusal_text(target: tg.Target, version: str | None, states: List[FileState]) -> str:
    lines = []
    for s in states:
        if s.fits(PRISTINE) or s.fits(PATCHED):
            continue
        if s.state == ABSENT:
            lines.append(
                f"{s.path} is missing: the release ships it (pristine sha256 {_expected_text(s.spec.pristine)})"
            )
        elif s.spec.created:
            lines.append(
                f"{s.path} exists (sha256 {s.sha256}) but is not the file the series creates "
                f"(sha256 {_expected_text(s.spec.patched)}); move it away"
            )
        else:
            lines.append(
                f"{s.path} is neither the release's file nor the patched one: sha256 {s.sha256}; expected "
                f"pristine {_expected_text(s.spec.pristine)} or patched {_expected_text(s.spec.patched)}"
            )
    if not lines:  # a mix of pristine and patched files
        lines.append(
            "some files are patched and others are not: {}".format(
                ", ".join(f"{s.path}={s.state}" for s in states if s.state != SKIPPED)
            )
        )
    return "; ".join(lines) + ". To fix: " + reinstall_hint(target, version) + "."


def read_state(target: tg.Target) -> dict | None:
    path = target.state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"error": f"unreadable {path}"}


def state_record(ctx: Context) -> dict:
    return {
        "format": 1,
        "series": ctx.series.name,
        "patches": list(ctx.series.patches),
        "release": ctx.version,
        "detected": ctx.detected,
        "kind": ctx.target.kind,
        "applied": swap._now(),
        "tool": "st-patch",
        "tool_version": TOOL_VERSION,
        "files": {
            rel: (spec.patched.to_json() if spec.patched else None)
            for rel, spec in ctx.series.files.items()
            if ctx.target.in_scope(rel)
        },
    }


class TreeBackend:
    def __init__(self, ctx: Context, guard: Guard):
        self.ctx = ctx
        self.target = ctx.target
        self.series = ctx.series
        self.out = ctx.outcome
        self.guard = guard

    # -- shared

    @property
    def state_rel(self) -> str:
        return (self.target.state_dir / STATE_FILE).relative_to(self.target.root).as_posix()

    def _states(self, pending: swap.Pending | None = None) -> List[FileState]:
        locate = pending.locate(self.target) if pending is not None else None
        states = tg.classify(self.target, self.series, locate)
        self.out.files = [s.report() for s in states]
        self.out.state = tg.overall(states)
        self.out.eol = tg.target_eol(states)
        return states

    def _report_pending(self) -> swap.Pending | None:
        """status/check: say what an interrupted run left and what the next apply/revert will do."""
        pending = swap.inspect(self.target)
        if pending is not None:
            self.out.pending = pending.to_json()
        for text in recovery.describe(self.target, pending):
            self.out.warn(text)
        return pending

    def _recover(self) -> None:
        """apply/revert: finish whatever an interrupted run left, before anything else."""
        recovered = recovery.recover(self.target, self.ctx.version, self.guard)
        if recovered:
            self.out.recovered = recovered
            self.out.note(recovered["action"])
        self.guard.raise_pending()

    def _refuse_unless_clean(self, states: List[FileState], action: str) -> str:
        state = tg.overall(states)
        if state in (PRISTINE, PATCHED) or tg.leftovers(states):
            return state
        raise Refusal(f"cannot {action}: {refusal_text(self.target, self.ctx.version, states)}")

    def _note_leftovers(self, states: List[FileState]):
        extra = tg.leftovers(states)
        if extra:
            self.out.note(
                "left over from an earlier patch (e.g. after a reinstall): {}; apply reuses and "
                "revert removes {}".format(", ".join(s.path for s in extra), "it" if len(extra) == 1 else "them")
            )
        return extra

    def _record_update(self, changes: Dict[str, bytes | None], applied: bool) -> Dict[str, bytes]:
        """The installed distribution's RECORD rewritten for ``changes`` ({} when there is none to keep)."""
        info = self.target.dist_info if self.target.kind == INSTALLED else None
        path = info / "RECORD" if info is not None else None
        if path is None or not path.is_file():
            return {}
        old = path.read_bytes()
        try:
            new = rec.rewrite(old, changes, {self.state_rel: applied})
        except UnicodeDecodeError as exc:
            raise Refusal(f"{path} is not UTF-8 text ({exc}); reinstall the package") from None
        return {path.relative_to(self.target.root).as_posix(): new} if new != old else {}

    def _changes(self, states: List[FileState], result) -> Dict[str, bytes | None]:
        return {s.path: result[s.path] for s in states if s.state != SKIPPED and result.get(s.path) != s.data}

    def _plan(self, states: List[FileState], result) -> Dict[str, str]:
        plan = {}
        for s in states:
            if s.state == SKIPPED:
                continue
            new = result.get(s.path)
            plan[s.path] = (
                "keep" if new == s.data else "delete" if new is None else "create" if s.data is None else "modify"
            )
        return plan

    def _commit(self, op: str, changes: Dict[str, bytes | None], remove_dirs: List[str], expect: str) -> None:
        swap.commit(self.target, op, self.series.name, changes, self.guard, remove_dirs)
        if self.guard.cleanup_error:
            self.out.warn(self.guard.cleanup_error)
        held = self.guard.take()
        if held:
            self.out.note(f"{held} arrived after the commit point: the {op} completed")
        after = self._states()
        if self.out.state != expect:  # pragma: no cover - verified before writing
            raise Refusal(f"{op}: the files do not verify as {expect} afterwards; run `st-patch status`")
        del after

    # -- commands

    def status(self) -> int:
        states = self._states(self._report_pending())
        self.out.recorded = read_state(self.target)
        state = self.out.state
        extra = self._note_leftovers(states)
        if self.out.recorded and state != PATCHED:
            self.out.note(
                "{} records series {} applied at {}, but the files are {} (stale record)".format(
                    self.target.state_dir / STATE_FILE,
                    self.out.recorded.get("series"),
                    self.out.recorded.get("applied"),
                    state,
                )
            )
        self.out.action = "none"
        if state in (PRISTINE, PATCHED) or extra:
            return OK
        self.out.note(refusal_text(self.target, self.ctx.version, states))
        return FAIL

    def check(self) -> int:
        states = self._states(self._report_pending())
        state = self._refuse_unless_clean(states, "apply")
        self._note_leftovers(states)
        if state == PATCHED:
            self.out.action = "already-patched"
            problems = verify(transform(self.target, self.series, states, reverse=True), states, PRISTINE)
            if problems:
                self.out.warn("revert would not give back the release files: " + describe_problems(problems, PRISTINE))
            else:
                self.out.note("already patched; revert would restore the release files byte for byte")
            return OK
        result = transform(self.target, self.series, states)
        problems = verify(result, states, PATCHED)
        if problems:
            raise Refusal(
                "the series applies but the result does not match the manifest: " + describe_problems(problems, PATCHED)
            )
        self.out.action = "would-apply"
        self.out.would = self._plan(states, result)
        self.out.note("apply would succeed: every result matches the manifest's patched sha256")
        return OK

    def apply(self) -> int:
        self._recover()
        states = self._states()
        state = self._refuse_unless_clean(states, "apply")
        if state == PATCHED:
            listed = self._record_update({s.path: s.data for s in states if s.state != SKIPPED}, applied=True)
            if listed:  # patched by an st-patch that did not keep RECORD: list the files now
                kept = read_state(self.target)
                if not isinstance(kept, dict) or "error" in kept:
                    kept = state_record(self.ctx)
                record = {self.state_rel: (json.dumps(kept, indent=2) + "\n").encode("utf-8")}
                self._commit("apply", {**listed, **record}, [], PATCHED)
                self.out.action = "record-updated"
                for rel in listed:
                    self.out.note(f"already patched; updated {rel} to list the changed and added files")
                return OK
            self.out.action = "already-patched"
            self.out.note("already patched: nothing to do")
            return OK
        self._note_leftovers(states)
        result = transform(self.target, self.series, states)
        problems = verify(result, states, PATCHED)
        if problems:
            raise Refusal(
                "not applied, the result would not match the manifest: " + describe_problems(problems, PATCHED)
            )
        changes = self._changes(states, result)
        changes[self.state_rel] = (json.dumps(state_record(self.ctx), indent=2) + "\n").encode("utf-8")
        listed = self._record_update(changes, applied=True)
        self._commit("apply", {**changes, **listed}, [], PATCHED)
        self.out.action = "applied"
        count = len(changes) - 1
        self.out.note(f"applied series {self.series.name} ({count} file{'' if count == 1 else 's'} changed)")
        for rel in listed:
            self.out.note(f"updated {rel}: the changed and added files are listed, so pip uninstall removes them")
        return OK

    def revert(self) -> int:
        self._recover()
        states = self._states()
        state = self._refuse_unless_clean(states, "revert")
        extra = tg.leftovers(states)
        state_dir = self.target.state_dir.relative_to(self.target.root).as_posix()
        if state == PRISTINE and not extra:
            self.out.action = "already-pristine"
            if self.target.state_dir.exists():
                self._commit("revert", {}, [state_dir], PRISTINE)
                self.out.note(f"removed a stale {self.target.state_dir}")
            self.out.note("already pristine: nothing to do")
            return OK
        if extra and state != PATCHED:
            self._note_leftovers(states)
            changes: Dict[str, bytes | None] = {s.path: None for s in extra}
        else:
            result = transform(self.target, self.series, states, reverse=True)
            problems = verify(result, states, PRISTINE)
            if problems:
                raise Refusal(
                    "not reverted, the result would not be the release's files: "
                    + describe_problems(problems, PRISTINE)
                    + ". To fix: "
                    + reinstall_hint(self.target, self.ctx.version)
                    + "."
                )
            changes = self._changes(states, result)
        listed = self._record_update(changes, applied=False)
        self._commit("revert", {**changes, **listed}, [state_dir] if self.target.state_dir.exists() else [], PRISTINE)
        self.out.action = "reverted"
        self.out.note(f"reverted series {self.series.name}: the files are byte-identical to the release")
        return OK

"""st-patch: apply the MatryoshkaLoss + cached-loss backport series to a sentence-transformers target.

Entry point: ``main(argv) -> exit code``. See ``st-patch --help``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

from . import apply as ap
from . import manifest as mf
from . import record as rec
from . import targets as tg
from .targets import ABSENT, GIT, INSTALLED, MODIFIED, PATCHED, PRISTINE, SKIPPED

OK, FAIL, USAGE, INTERRUPTED = 0, 1, 2, 130
NATIVE = "native"

EXIT_CODES = """\
exit codes:
  0    success: status could tell the state (pristine, patched, native, or a diverged fork);
       check: apply would succeed or the target is already patched; apply/revert: done, or
       nothing to do (already patched / already pristine / native release)
  1    not applicable or check failed: unknown release, a file that is neither the release's nor
       the patched one, a series that does not apply or does not verify, a dirty git working
       tree, a change that failed (the target is rolled back), or another st-patch run holding
       the target for longer than ST_PATCH_LOCK_TIMEOUT (default 60 s; nothing was changed)
  2    bad usage or input: wrong arguments, a missing target path or one that is not a
       sentence-transformers tree, an unreadable or malformed manifest or patch
  130  interrupted (Ctrl-C / SIGTERM) while changing the target; it was rolled back
"""

DESCRIPTION = """\
Apply the MatryoshkaLoss + cached-loss backport series (patches/) to a sentence-transformers
target, check it, show its state, or revert it. This is the only tool that changes a target.

Target kinds (detected automatically from --target PATH):
  git        a git checkout of an ST fork (PATH/.git and PATH/sentence_transformers/__init__.py):
             apply = `git am -3` of the series (refused when touched files have uncommitted
             changes; aborted on failure); revert = `git revert` of the commits that carry
             the trailer "St-Patch-Series: <series>"
  source     a plain source tree such as an unpacked sdist (no .git); tests/ is patched
             when present
  installed  a site-packages directory with a sentence_transformers-*.dist-info (or the
             sentence_transformers package directory itself); only files inside
             sentence_transformers/ are patched, and the dist-info's RECORD lists what
             apply changed and added (so `pip uninstall` removes it; revert restores it)
Without --target, the sentence_transformers importable by this Python is used (located with
importlib.util.find_spec, never imported).

The release is read from __version__ in sentence_transformers/__init__.py (not imported) and
looked up in the manifest. Native releases get their fix series if the manifest names one, else
nothing. For an unknown release whose files match
one series exactly, that series is used ("detected by content").

Source and installed targets: every file the series touches is checked by sha256 against the
release (pristine) and the patched state, in the target's line endings (wheels and sdists are
CRLF, git checkouts LF). The series is applied with `git apply` to temporary LF copies, line
endings are restored and the results are verified before the target changes, all or nothing,
through a journal in sentence_transformers/.st-patch/ (state.json records an applied series).
If a journal from an interrupted run is found, any command first restores the target to
pristine and says so.
"""

COMMANDS = {
    "status": (
        "show the release, target kind, series and the state of every touched file",
        "Show the state. Changes nothing, except that a journal left by an interrupted run is rolled back first.",
    ),
    "check": (
        "dry run: would apply succeed? (exit 0 also when already patched)",
        "Dry run: the hash checks and the whole series applied to temporary copies "
        "(a throw-away clone for git checkouts), results verified against the manifest. "
        "The target is not changed.",
    ),
    "apply": (
        "apply the series (no-op when already patched)",
        "Apply the series, all or nothing. Already patched: nothing to do, exit 0.",
    ),
    "revert": (
        "revert the series, restoring the release files byte for byte",
        "Revert the series; the files come back byte-identical to the release (created "
        "files and sentence_transformers/.st-patch/ are removed). Pristine: nothing to do.",
    ),
}


class InputError(Exception):
    """Bad input (exit 2)."""


class Refusal(Exception):
    """Not applicable (exit 1); ``details`` go into the JSON result."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="st-patch", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"st-patch {ap.TOOL_VERSION}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        metavar="PATH",
        help="git checkout, source tree, site-packages directory or sentence_transformers "
        "package directory (default: the sentence_transformers importable by this Python)",
    )
    common.add_argument("--json", action="store_true", help="print one machine-readable JSON result object on stdout")
    common.add_argument("--manifest", metavar="FILE", help=f"patch manifest (default: {mf.default_manifest_path()})")
    common.add_argument(
        "--series",
        metavar="NAME",
        help="use this series instead of the one the manifest gives the release "
        "(e.g. a fork whose __version__ is not a release)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (short, long) in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=short, description=long, epilog=EXIT_CODES, formatter_class=fmt)
    sub.add_parser(
        "review",
        help="for reviewers: patched files vs upstream's native code, range-diff of adjacent series "
        "(st-patch review --help)",
        add_help=False,
    )
    return parser


# ------------------------------------------------------------------------------------- helpers


def _reinstall_hint(target: tg.Target, version: str | None) -> str:
    spec = f"sentence-transformers=={version}" if version else "sentence-transformers"
    if target.kind == INSTALLED:
        return f"reinstall it (pip install --force-reinstall --no-deps {spec}) or restore the file, then apply again"
    if target.kind == GIT:
        return "commit or restore the file, then apply again"
    return f"restore the file from the {spec} sdist, then apply again"


def _expected_text(hashes: mf.Hashes | None) -> str:
    if hashes is None:
        return "absent"
    if hashes.sha256 == hashes.sha256_lf:
        return hashes.sha256
    return f"{hashes.sha256} (CRLF) or {hashes.sha256_lf} (LF)"


def _refusal_text(target: tg.Target, version: str | None, states: List[tg.FileState]) -> str:
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
    return "; ".join(lines) + ". To fix: " + _reinstall_hint(target, version) + "."


def _release_json(version, release, series: mf.Series | None, how: str | None) -> dict:
    return {
        "version": version,
        "support": release.support if release else ("patched" if series else "unknown"),
        "series": series.name if series else None,
        "patches": list(series.patches) if series else [],
        "detected": how,
    }


# --------------------------------------------------------------------------------------- runner


class Run:
    def __init__(self, args):
        self.args = args
        self.command = args.command
        self.out: Dict = {
            "command": self.command,
            "ok": False,
            "exit_code": None,
            "tool_version": ap.TOOL_VERSION,
            "manifest": None,
            "target": None,
            "release": None,
            "state": None,
            "eol": None,
            "action": None,
            "files": [],
            "messages": [],
            "recovered": None,
            "error": None,
        }
        self.target: tg.Target | None = None
        self.series: mf.Series | None = None
        self.version: str | None = None

    def note(self, text: str) -> None:
        self.out["messages"].append(text)

    def set_states(self, states: List[tg.FileState], state: str | None = None) -> None:
        self.out["files"] = [s.to_json() for s in states]
        self.out["state"] = state or tg.overall(states)
        if self.target is not None and self.target.kind != GIT:
            self.out["eol"] = tg.target_eol(states)

    # -- setup

    def run(self) -> int:
        manifest = mf.load(Path(self.args.manifest) if self.args.manifest else None)
        self.out["manifest"] = str(manifest.path)
        target = self.target = tg.resolve(self.args.target)
        self.out["target"] = target.to_json()
        with ap.exclusive(target):
            return self._run(manifest, target)

    def _run(self, manifest: mf.Manifest, target: tg.Target) -> int:
        recovered = ap.recover(target)
        if recovered:
            self.out["recovered"] = recovered
            self.note("found a journal of an interrupted {}: {}".format(recovered["op"] or "run", recovered["action"]))
        version = self.version = target.version
        if not version:
            raise InputError("cannot find __version__ in %s" % (target.package_dir / "__init__.py"))
        release = manifest.lookup(version)
        how = None
        if self.args.series:
            if self.args.series not in manifest.series:
                raise InputError(
                    "unknown series {!r}; the manifest has: {}".format(
                        self.args.series, ", ".join(sorted(manifest.series))
                    )
                )
            series, how = manifest.series[self.args.series], "option"
        elif release is not None and release.support == NATIVE and not release.series:
            self.out["release"] = _release_json(version, release, None, "manifest")
            self.out["state"] = NATIVE
            self.out["action"] = "none"
            self.note(
                "sentence-transformers {} supports MatryoshkaLoss with cached losses natively: nothing to {}".format(
                    version, "do" if self.command in ("status", "check") else self.command
                )
            )
            return OK
        elif release is not None:  # a backport series, or the fix series of a native release
            series, how = manifest.series[release.series], "manifest"
        else:
            series, how = self._unknown_release(manifest, version)
        self.series = series
        self.out["release"] = _release_json(version, release, series, how)
        mf.check_patch_files(series)
        states = tg.classify(target, series)
        handler = getattr(self, "{}_{}".format(self.command, "git" if target.kind == GIT else "files"))
        return handler(states)

    def _unknown_release(self, manifest: mf.Manifest, version: str):
        target = self.target
        matches = tg.detect_by_content(target, manifest)
        if len(matches) == 1:
            self.note(
                f"sentence-transformers {version} is not in the manifest, but its files match series {matches[0]} "
                "exactly: using it (detected by content)"
            )
            return manifest.series[matches[0]], "content"
        ranking = tg.rank_series(target, manifest)
        candidates = [
            {"series": name, "releases": manifest.series[name].releases, **counts} for name, counts in ranking
        ]
        text = "sentence-transformers {} (__version__ in {}) is not in the manifest {}. Supported releases: {}.".format(
            version, target.package_dir / "__init__.py", manifest.path, manifest.supported_text()
        )
        if len(matches) > 1:
            text += " Its files match several series exactly ({}): pass --series NAME.".format(", ".join(matches))
        elif self.command == "check":
            close = [c for c in candidates if c["evidence"]]
            if close:
                self.set_states(tg.classify(target, manifest.series[close[0]["series"]]))
                text += (
                    " Closest series by file content: "
                    + "; ".join(
                        "{} (releases {}): {} of {} files pristine, {} patched".format(
                            c["series"], ", ".join(c["releases"]) or "-", c["pristine"], c["files"], c["patched"]
                        )
                        for c in close[:3]
                    )
                    + "."
                )
            else:
                text += " No series matches its files."
            text += " If this is a fork of a supported release, pass --series NAME."
        else:
            text += " Run `st-patch check` to see which series comes closest by file content."
        self.out["release"] = {
            "version": version,
            "support": "unknown",
            "series": None,
            "patches": [],
            "detected": None,
        }
        drift = None
        if self.command == "check":  # which hunks fail, and whether the release is native already
            from . import drift as dr

            drift = dr.drift_report(target.root, json.loads(manifest.path.read_text()), manifest.path.parent / "series")
            self.note(dr.format_text(drift))
        raise Refusal(text, candidates=candidates if self.command == "check" else None, drift=drift)

    def _refuse_unless_clean(self, states: List[tg.FileState], action: str) -> str:
        """The whole-target state, or a Refusal when the files are neither pristine nor patched."""
        state = tg.overall(states)
        if state in (PRISTINE, PATCHED) or tg.leftovers(states):
            return state
        self.set_states(states)
        raise Refusal(f"cannot {action}: {_refusal_text(self.target, self.version, states)}")

    def _note_leftovers(self, states: List[tg.FileState]) -> List[tg.FileState] | None:
        extra = tg.leftovers(states)
        if extra:
            self.note(
                "left over from an earlier patch (e.g. after a reinstall): {}; apply reuses and "
                "revert removes {}".format(", ".join(s.path for s in extra), "it" if len(extra) == 1 else "them")
            )
        return extra

    # -- source trees and installed packages

    def status_files(self, states: List[tg.FileState]) -> int:
        self.set_states(states)
        recorded = ap.read_state(self.target)
        self.out["recorded"] = recorded
        state = self.out["state"]
        extra = self._note_leftovers(states)
        if recorded and state != PATCHED:
            self.note(
                "{} records series {} applied at {}, but the files are {} (stale record)".format(
                    self.target.state_dir / ap.STATE_FILE, recorded.get("series"), recorded.get("applied"), state
                )
            )
        self.out["action"] = "none"
        if state in (PRISTINE, PATCHED) or extra:
            return OK
        self.note(_refusal_text(self.target, self.version, states))
        return FAIL

    def check_files(self, states: List[tg.FileState]) -> int:
        state = self._refuse_unless_clean(states, "apply")
        self._note_leftovers(states)
        self.set_states(states)
        if state == PATCHED:
            self.out["action"] = "already-patched"
            result = ap.transform(self.target, self.series, states, reverse=True)
            problems = ap.verify(result, states, PRISTINE)
            if problems:
                self.note(
                    "warning: revert would not give back the release files: " + ap.describe_problems(problems, PRISTINE)
                )
            else:
                self.note("already patched; revert would restore the release files byte for byte")
            return OK
        result = ap.transform(self.target, self.series, states)
        problems = ap.verify(result, states, PATCHED)
        if problems:
            raise Refusal(
                "the series applies but the result does not match the manifest: "
                + ap.describe_problems(problems, PATCHED)
            )
        self.out["action"] = "would-apply"
        self.out["would"] = self._plan(states, result)
        self.note("apply would succeed: every result matches the manifest's patched sha256")
        return OK

    def apply_files(self, states: List[tg.FileState]) -> int:
        state = self._refuse_unless_clean(states, "apply")
        if state == PATCHED:
            self.set_states(states)
            # patched by an st-patch that did not keep RECORD: list the files now, keep the state record
            listed = self._record_update({s.path: s.data for s in states if s.state != SKIPPED}, applied=True)
            if listed:
                kept = ap.read_state(self.target)
                if not isinstance(kept, dict) or "error" in kept:
                    kept = ap.state_record(self.target, self.series, self.version, self.out["release"]["detected"])
                self._write_verified("apply", listed, kept, PATCHED)
                self.out["action"] = "record-updated"
                for rel in listed:
                    self.note(f"already patched; updated {rel} to list the changed and added files")
                return OK
            self.out["action"] = "already-patched"
            self.note("already patched: nothing to do")
            return OK
        self._note_leftovers(states)
        result = ap.transform(self.target, self.series, states)
        problems = ap.verify(result, states, PATCHED)
        if problems:
            self.set_states(states)
            raise Refusal(
                "not applied, the result would not match the manifest: " + ap.describe_problems(problems, PATCHED)
            )
        changes = self._changes(states, result)
        record = ap.state_record(self.target, self.series, self.version, self.out["release"]["detected"])
        listed = self._record_update(changes, applied=True)
        self._write_verified("apply", {**changes, **listed}, record, PATCHED)
        self.out["action"] = "applied"
        self.note(f"applied series {self.series.name} ({len(changes)} file{'' if len(changes) == 1 else 's'} changed)")
        for rel in listed:
            self.note(f"updated {rel}: the changed and added files are listed, so pip uninstall removes them")
        return OK

    def revert_files(self, states: List[tg.FileState]) -> int:
        state = self._refuse_unless_clean(states, "revert")
        extra = tg.leftovers(states)
        if state == PRISTINE and not extra:
            self.set_states(states)
            self.out["action"] = "already-pristine"
            if self.target.state_dir.exists():
                shutil.rmtree(str(self.target.state_dir))
                self.note(f"removed a stale {self.target.state_dir}")
            self.note("already pristine: nothing to do")
            return OK
        if extra and state != PATCHED:
            self._note_leftovers(states)
            changes = {s.path: None for s in extra}
        else:
            result = ap.transform(self.target, self.series, states, reverse=True)
            problems = ap.verify(result, states, PRISTINE)
            if problems:
                self.set_states(states)
                raise Refusal(
                    "not reverted, the result would not be the release's files: "
                    + ap.describe_problems(problems, PRISTINE)
                    + ". To fix: "
                    + _reinstall_hint(self.target, self.version)
                    + "."
                )
            changes = self._changes(states, result)
        self._write_verified("revert", {**changes, **self._record_update(changes, applied=False)}, None, PRISTINE)
        self.out["action"] = "reverted"
        self.note(f"reverted series {self.series.name}: the files are byte-identical to the release")
        return OK

    def _write_verified(self, op: str, changes: Dict[str, bytes | None], record: dict | None, expect: str) -> None:
        """Write ``changes`` in one transaction, then classify the files again: they must be ``expect``."""
        self._transaction(op, changes, record)
        after = tg.classify(self.target, self.series)
        self.set_states(after)
        if tg.overall(after) != expect:  # pragma: no cover - verified before writing
            raise Refusal(f"{op}: the files do not verify as {expect} afterwards; run `st-patch status`")

    def _record_update(self, changes: Dict[str, bytes | None], applied: bool) -> Dict[str, bytes]:
        """The installed distribution's RECORD, rewritten for ``changes`` (see record.py); {} when
        the target is not an installed package with a RECORD or the RECORD needs no change."""
        info = self.target.dist_info if self.target.kind == INSTALLED else None
        path = info / "RECORD" if info is not None else None
        if path is None or not path.is_file():
            return {}
        old = path.read_bytes()
        state = (self.target.state_dir / ap.STATE_FILE).relative_to(self.target.root).as_posix()
        try:
            new = rec.rewrite(old, changes, {state: applied})
        except UnicodeDecodeError as exc:
            raise Refusal(f"{path} is not UTF-8 text ({exc}); reinstall the package") from None
        return {path.relative_to(self.target.root).as_posix(): new} if new != old else {}

    def _changes(self, states, result) -> Dict[str, bytes | None]:
        return {s.path: result[s.path] for s in states if s.state != SKIPPED and result.get(s.path) != s.data}

    def _plan(self, states, result) -> Dict[str, str]:
        plan = {}
        for s in states:
            if s.state == SKIPPED:
                continue
            new = result.get(s.path)
            plan[s.path] = (
                "keep" if new == s.data else "delete" if new is None else "create" if s.data is None else "modify"
            )
        return plan

    def _transaction(self, op: str, changes, record) -> None:
        try:
            ap.transaction(self.target, op, self.series, self.version, changes, record)
        except ap.TransactionError as exc:
            self.out["recovered"] = exc.recovery
            if exc.interrupted:
                self.out["error"] = str(exc)
                raise KeyboardInterrupt(str(exc)) from None
            raise

    # -- git checkouts

    def _git_common(self, states: List[tg.FileState]):
        commits = ap.series_commits(self.target, self.series.name)
        state = ap.git_overall(states, commits)
        self.set_states(states, state)
        self.out["commits"] = commits
        return commits, state

    def _git_guard(self, states: List[tg.FileState], action: str) -> None:
        busy = ap.git_operation_in_progress(self.target)
        if busy:
            raise Refusal(f"cannot {action}: a {busy} is in progress in {self.target.root}; finish or abort it first")
        dirty = ap.git_dirty(self.target, [s.path for s in states])
        if dirty:
            self.out["dirty"] = dirty
            raise Refusal(
                "cannot {}: uncommitted changes to files the series touches: {}; commit or stash them first".format(
                    action, ", ".join(dirty)
                )
            )

    def status_git(self, states: List[tg.FileState]) -> int:
        commits, state = self._git_common(states)
        self.out["action"] = "none"
        if commits:
            self.note(
                "series commits (St-Patch-Series: {}): {}".format(self.series.name, ", ".join(c[:12] for c in commits))
            )
        if state == MODIFIED:
            self.note(
                f"the files differ from release {self.version} (a fork?): `check` tells whether the series "
                "applies with a 3-way merge"
            )
        dirty = ap.git_dirty(self.target, [s.path for s in states])
        if dirty:
            self.out["dirty"] = dirty
            self.note("uncommitted changes to touched files: {}".format(", ".join(dirty)))
        return OK if state in (PRISTINE, PATCHED, MODIFIED) else FAIL

    def check_git(self, states: List[tg.FileState]) -> int:
        commits, state = self._git_common(states)
        self._git_guard(states, "apply")
        if state == PATCHED:
            self.out["action"] = "already-patched"
            self.note(
                "already patched" + (" (commits {})".format(", ".join(c[:12] for c in commits)) if commits else "")
            )
            return OK
        after = ap.git_dry_run(self.target, self.series)
        self.out["would"] = {s.path: s.state for s in after}
        if state == PRISTINE and tg.overall(after) != PATCHED:
            raise Refusal(
                "git am -3 applies, but the files do not match the manifest's patched sha256: {}".format(
                    ", ".join(f"{s.path}={s.state}" for s in after if s.state != PATCHED)
                )
            )
        self.out["action"] = "would-apply"
        self.note(
            "apply would succeed (git am -3 in a temporary clone)"
            + (
                ""
                if state == PRISTINE
                else "; the files differ from the release, so the result was not compared with the manifest's hashes"
            )
        )
        return OK

    def apply_git(self, states: List[tg.FileState]) -> int:
        commits, state = self._git_common(states)
        self._git_guard(states, "apply")
        if state == PATCHED:
            self.out["action"] = "already-patched"
            self.note("already patched: nothing to do")
            return OK
        head = ap.git_head(self.target)
        ap.git_am(self.target, self.series)
        after = tg.classify(self.target, self.series)
        new_commits, _ = self._git_common(after)
        if state == PRISTINE and tg.overall(after) != PATCHED:
            ap.git_reset_keep(self.target, head)
            self._git_common(tg.classify(self.target, self.series))
            raise Refusal(
                "git am applied the series but the files do not match the manifest's patched "
                f"sha256; reset to {head[:12]}"
            )
        if len(new_commits) != len(self.series.patches):
            self.note(
                f"warning: {len(new_commits)} of {len(self.series.patches)} new commits carry the trailer "
                f"{ap.TRAILER}: {self.series.name}; revert will not find the others"
            )
        self.out["action"] = "applied"
        self.note(
            "applied series {} with git am -3: {}".format(self.series.name, ", ".join(c[:12] for c in new_commits))
        )
        return OK

    def revert_git(self, states: List[tg.FileState]) -> int:
        commits, state = self._git_common(states)
        if not commits:
            if state == PATCHED:
                raise Refusal(
                    f"the files are patched, but no commit in HEAD's history carries {ap.TRAILER}: {self.series.name}; "
                    "revert by hand"
                )
            self.out["action"] = "already-pristine"
            self.note(f"no commit of series {self.series.name} to revert: nothing to do")
            return OK
        self._git_guard(states, "revert")
        ap.git_revert(self.target, commits)
        paths = [s.path for s in states]
        identical = ap.git_unchanged_since(self.target, commits[-1] + "^", paths)
        self._git_common(tg.classify(self.target, self.series))
        self.out["action"] = "reverted"
        self.out["identical"] = identical
        self.note(
            f"reverted {len(commits)} commit{'' if len(commits) == 1 else 's'} of series {self.series.name} "
            "with git revert"
        )
        self.note(
            f"the touched files are byte-identical to {commits[-1][:12]}^"
            if identical
            else f"warning: the touched files differ from {commits[-1][:12]}^ (later commits changed them)"
        )
        return OK


# --------------------------------------------------------------------------------------- output


def render(out: Dict) -> str:
    action = out.get("action")
    headline = action if action not in (None, "none") else out.get("state")
    lines = ["st-patch {}: {}".format(out["command"], headline or ("error" if out.get("error") else "-"))]
    target = out.get("target")
    if target:
        kind = tg.KIND_TEXT.get(target["kind"], target["kind"])
        extra = ", {}".format(out["eol"].upper()) if out.get("eol") else ""
        lines.append(
            "  target   {} ({}, sentence-transformers {}{})".format(target["path"], kind, target["version"], extra)
        )
    release = out.get("release")
    if release:
        if release["support"] == NATIVE and not release["series"]:
            lines.append("  release  {}: native (no series needed)".format(release["version"]))
        elif release["series"]:
            how = {"manifest": "", "content": ", detected by content", "option": ", chosen with --series"}
            count = len(release["patches"])
            lines.append(
                "  release  {}: series {} ({} patch{}{})".format(
                    release["version"],
                    release["series"],
                    count,
                    "" if count == 1 else "es",
                    how.get(release["detected"], ""),
                )
            )
        else:
            lines.append("  release  {}: not in the manifest".format(release["version"]))
    if out.get("state"):
        lines.append("  state    {}".format(out["state"]))
    would = out.get("would") or {}
    for f in out.get("files") or []:
        note = ""
        if f["state"] == SKIPPED:
            note = "  (outside sentence_transformers/, not part of this target)"
        elif f["created_by_series"]:
            note = "  (created by the series)"
        if f["path"] in would:
            note += "  -> {}".format(would[f["path"]])
        lines.append("    {:<9} {}{}".format(f["state"], f["path"], note))
    if out.get("commits"):
        lines.append("  commits  {}".format(" ".join(c[:12] for c in out["commits"])))
    recorded = out.get("recorded")
    if recorded and "series" in recorded:
        lines.append(
            "  record   series {} applied {} by st-patch {}".format(
                recorded.get("series"), recorded.get("applied"), recorded.get("tool_version")
            )
        )
    for message in out.get("messages") or []:
        lines.append("  - " + message)
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["review"]:  # a reviewer's aid with options of its own: st-patch review --help
        from . import review

        return review.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    runner = Run(args)
    out = runner.out
    try:
        code = runner.run()
    except (InputError, mf.ManifestError, tg.TargetError) as exc:
        code, out["error"] = USAGE, str(exc)
    except Refusal as exc:
        code, out["error"] = FAIL, str(exc)
        out.update({k: v for k, v in exc.details.items() if v is not None})
    except ap.ApplyError as exc:
        code, out["error"] = FAIL, str(exc)
        if isinstance(exc, ap.TransactionError):
            out["recovered"] = exc.recovery
    except KeyboardInterrupt as exc:
        code = INTERRUPTED
        out["error"] = out["error"] or "interrupted (%s)" % (exc or "Ctrl-C")
    except OSError as exc:
        code, out["error"] = FAIL, f"{type(exc).__name__}: {exc}"
    out["exit_code"] = code
    out["ok"] = code == OK
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=False) + "\n")
    else:
        sys.stdout.write(render(out) + "\n")
        if out["error"]:
            sys.stderr.write("st-patch: error: {}\n".format(out["error"]))
    sys.stdout.flush()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

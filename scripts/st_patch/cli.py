"""st-patch: apply the MatryoshkaLoss + cached-loss series to a sentence-transformers target.

Entry point: ``main(argv) -> exit code``. Parses the command line, finds the target, takes the
lock, resolves the series (``resolve``) and hands the command to the target's backend: ``fork`` for a
git checkout, ``tree`` for an unpacked sdist or an installed package. The outcome (``outcome``) is
printed as text or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from . import __version__ as TOOL_VERSION
from . import gitrun, signals, swap
from . import manifest as mf
from . import targets as tg
from .outcome import FAIL, INTERRUPTED, OK, USAGE, InputError, Interrupted, Outcome, Refusal, render_text

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
  130  interrupted (Ctrl-C / SIGTERM) before the commit point: the target is exactly as it was
       when the command started. A signal that arrives after the commit point is reported and
       the command exits 0, because the change is complete.
"""

DESCRIPTION = """\
Apply the MatryoshkaLoss + cached-loss backport series (patches/) to a sentence-transformers
target, check it, show its state, or revert it. This is the only tool that changes a target.

Target kinds (detected automatically from --target PATH):
  git        a git checkout of an ST fork (PATH/.git and PATH/sentence_transformers/__init__.py):
             the state is computed per patch (present, missing or reverted); apply = `git am -3`
             of the missing patches (refused with a staged index or uncommitted changes to touched
             files; on failure or Ctrl-C HEAD and the index are put back and verified); revert =
             `git revert` of the commits that carry the trailer "St-Patch-Series: <series>"
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
by building the changed directories beside the originals and exchanging them in one step
(renameat2 RENAME_EXCHANGE; the package directory last: the commit point), so a reader sees the
pristine or the fully patched package, never a mix. state.json in sentence_transformers/.st-patch/
records an applied series. A run killed half-way leaves a journal beside the package; the next
apply or revert finishes it (rolled back before the commit point, cleaned up after it) when every
file is what the journal expects, and otherwise stops without changing anything. status and check
never write; they report such a journal.
"""

COMMANDS = {
    "status": (
        "show the release, target kind, series and the state of every touched file",
        "Show the state. Changes nothing (a journal left by an interrupted run is reported, not replayed).",
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


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so a usage error can be reported as JSON."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="st-patch", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"st-patch {TOOL_VERSION}")
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (short, long) in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=short, description=long, epilog=EXIT_CODES, formatter_class=fmt)
    return parser


def _execute(args, out: Outcome, guard: signals.Guard) -> int:
    manifest = mf.load(Path(args.manifest) if args.manifest else None)
    out.manifest = str(manifest.path)
    target = tg.resolve(args.target)
    out.target = target.to_json()
    swap.sweep_temporary_directories()
    with swap.exclusive(target):
        target = tg.resolve(args.target)  # read again under the lock: another run may have changed it
        out.target = target.to_json()
        from .resolve import resolve

        ctx = resolve(args.command, manifest, target, args.series, out)
        if ctx is None:
            return OK
        if target.kind == tg.GIT:
            from .fork import ForkBackend

            backend = ForkBackend(ctx)
        else:
            from .tree import TreeBackend

            backend = TreeBackend(ctx, guard)
        return getattr(backend, args.command)()


def _wants_json(argv: List[str]) -> bool:
    return "--json" in argv


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = Outcome(command=next((a for a in argv if a in COMMANDS), "-"), tool_version=TOOL_VERSION)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else USAGE
    except InputError as exc:
        out.error = str(exc)
        out.finish(USAGE)
        if _wants_json(argv):
            sys.stdout.write(json.dumps(out.to_json(), indent=2) + "\n")
        else:
            build_parser().print_usage(sys.stderr)
            sys.stderr.write(f"{exc}\n")
        return USAGE
    out.command = args.command
    with signals.guarded() as guard:
        try:
            code = _execute(args, out, guard)
        except (InputError, mf.ManifestError, tg.TargetError) as exc:
            code, out.error = USAGE, str(exc)
        except Refusal as exc:
            code, out.error = FAIL, str(exc)
            for key, value in exc.details.items():
                if value is not None:
                    setattr(out, key, value)
        except gitrun.GitError as exc:
            code, out.error = FAIL, str(exc)
        except Interrupted as exc:
            code, out.error = INTERRUPTED, str(exc)
        except KeyboardInterrupt as exc:
            code, out.error = INTERRUPTED, f"interrupted ({exc or 'SIGINT'}); nothing was changed"
        except OSError as exc:
            code, out.error = FAIL, f"{type(exc).__name__}: {exc}"
        out.finish(code)
        with guard.critical():  # a late signal must not cut the report in half
            if args.json:
                sys.stdout.write(json.dumps(out.to_json(), indent=2) + "\n")
            else:
                sys.stdout.write(render_text(out, tg.KIND_TEXT) + "\n")
                if out.error:
                    sys.stderr.write(f"st-patch: error: {out.error}\n")
            sys.stdout.flush()
        guard.take()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

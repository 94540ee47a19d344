"""The one way this project runs git: isolated from the user's and the system's configuration and locale.

Everything that calls git goes through ``run``: st-patch on a target (``git apply`` on temporary
copies, ``git am`` / ``git revert`` on a fork) and the maintainers' tooling (the series generator,
drift and review). Without isolation the output depends on whoever runs it: ``diff.algorithm``,
``format.subjectPrefix``, ``commit.gpgsign``, ``core.autocrlf``, ``apply.whitespace``, a localised
message, or ``GIT_DIR`` exported by a calling hook would change or break what git does.

So git runs with no system or global configuration (``GIT_CONFIG_NOSYSTEM``, ``GIT_CONFIG_GLOBAL``
pointed at the null device), in the C locale, without the ``GIT_*`` variables that redirect it to
another repository, and with the few settings below forced on the command line (they also win over
a fork's own ``.git/config``). A fork's commits still carry its user's identity: ``identity`` reads it
once with the user's configuration, as ``git var`` sees it.

Standard library only, Python >= 3.8: st-patch runs inside a release's environment.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

# Settings that change what git writes or accepts, forced for every call.
FORCED = (
    "core.autocrlf=false",
    "core.safecrlf=false",
    "core.quotepath=false",
    "apply.whitespace=nowarn",
    "commit.gpgsign=false",
    "tag.gpgsign=false",
    "diff.algorithm=myers",
    "diff.noprefix=false",
    "diff.mnemonicprefix=false",
    "format.subjectPrefix=PATCH",
    "format.signature=",
    "format.coverLetter=false",
    "format.numbered=auto",
    "am.keepcr=false",
    "am.threeWay=false",
    "advice.detachedHead=false",
)
# Variables that point git at another repository, index or object store than the one in ``cwd``.
_REDIRECTS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_PREFIX",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_EXTERNAL_DIFF",
    "GIT_DIFF_OPTS",
    "GIT_PAGER",
    "GIT_EDITOR",
    "GIT_SEQUENCE_EDITOR",
)
FALLBACK_IDENTITY = ("st-patch", "st-patch@localhost")


class GitError(Exception):
    """git failed (or is missing); the message has the command and git's last lines."""

    def __init__(self, message: str, proc: subprocess.CompletedProcess | None = None):
        super().__init__(message)
        self.proc = proc


def environment(ceiling: Path | None = None, extra: Dict[str, str] | None = None) -> Dict[str, str]:
    """The isolated environment; ``ceiling`` stops git from finding a repository above that directory."""
    env = {k: v for k, v in os.environ.items() if k not in _REDIRECTS and not k.startswith("GIT_CONFIG_KEY_")}
    env = {k: v for k, v in env.items() if not k.startswith("GIT_CONFIG_VALUE_")}
    env.update(
        {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_OPTIONAL_LOCKS": "0",
            "LC_ALL": "C",
            "LANG": "C",
            "LANGUAGE": "C",
        }
    )
    if ceiling is not None:
        env["GIT_CEILING_DIRECTORIES"] = str(ceiling)
    if extra:
        env.update(extra)
    return env


def command(args: Sequence[str]) -> List[str]:
    forced: List[str] = []
    for setting in FORCED:
        forced += ["-c", setting]
    return ["git"] + forced + list(args)


def message(proc: subprocess.CompletedProcess) -> str:
    """git's last meaningful lines, on one line."""
    out = proc.stdout if isinstance(proc.stdout, str) else (proc.stdout or b"").decode("utf-8", "replace")
    err = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode("utf-8", "replace")
    lines = [line for line in (err + "\n" + out).strip().splitlines() if line.strip()]
    return " | ".join(lines[-12:]) or f"exit status {proc.returncode}"


def run(
    args: Sequence[str],
    cwd: Path,
    check: bool = True,
    ceiling: Path | None = None,
    env: Dict[str, str] | None = None,
    input: str | None = None,
    text: bool = True,
    own_session: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``git ARGS`` in ``cwd``, isolated. ``check``: raise GitError on a non-zero exit.

    ``own_session``: git runs in a session of its own, so a Ctrl-C at the terminal reaches only
    st-patch, which lets a ``git am`` finish or abort cleanly instead of dying half-way."""
    cmd = command(args)
    try:
        proc = subprocess.run(
            cmd,
            cwd=str(cwd),
            env=environment(ceiling, env),
            input=input,
            capture_output=True,
            text=text,
            start_new_session=own_session,
        )
    except FileNotFoundError:
        raise GitError("git is required but was not found on PATH") from None
    if check and proc.returncode:
        raise GitError("`git {}` failed in {}: {}".format(" ".join(args), cwd, message(proc)), proc)
    return proc


def identity(repo: Path, author: bool = False) -> Dict[str, str]:
    """The committer identity the user's own configuration gives ``repo`` (as ``GIT_COMMITTER_*``
    variables, and ``GIT_AUTHOR_*`` too with ``author``: a revert is authored by its user), or
    st-patch's when none is configured."""
    env = {k: v for k, v in os.environ.items() if k not in _REDIRECTS}
    env["LC_ALL"] = "C"
    names = {}
    for key in ("user.name", "user.email"):
        try:
            proc = subprocess.run(
                ["git", "config", key], cwd=str(repo), env=env, capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise GitError("git is required but was not found on PATH") from None
        names[key] = proc.stdout.strip()
    name = names["user.name"] or FALLBACK_IDENTITY[0]
    email = names["user.email"] or FALLBACK_IDENTITY[1]
    env = {"GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
    if author:
        env.update({"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email})
    return env

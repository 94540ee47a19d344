"""What an interrupted run left on a file tree: reported by ``status``/``check``, finished by ``apply``/``revert``.

Two kinds: the journal of this version's directory exchange (``swap``), and the journal an st-patch
1.x run kept inside the package (``sentence_transformers/.st-patch/journal/``), which is rolled back
file by file, each file checked to be the one that run started from or wrote.
"""

from __future__ import annotations

import json
from typing import Dict, List

from . import swap
from .outcome import Refusal
from .signals import Guard
from .targets import INSTALLED, Target


def describe(target: Target, pending: swap.Pending | None) -> List[str]:
    """Warnings for status/check: what was found and what the next apply or revert will do."""
    texts = []
    if pending is not None:
        if pending.problem and pending.committed is None and pending.journal is not None:
            texts.append(
                f"found the journal of an interrupted run ({pending.path}): {pending.problem}; "
                "the next apply or revert removes it without replaying it"
            )
        elif pending.problem:
            texts.append(
                f"found the journal of an interrupted run ({pending.path}), which cannot be replayed: {pending.problem}"
            )
        elif pending.committed:
            texts.append(
                f"an interrupted {pending.journal['op']} had passed its commit point; the next apply or revert "
                "removes what it left behind"
            )
        else:
            texts.append(
                f"an interrupted {pending.journal['op']} was stopped before its commit point (the target is as it "
                "was before it); the next apply or revert removes what it left behind"
            )
    stray = swap.leftovers(target)
    if stray and pending is None:
        texts.append(
            "left behind by an earlier run: {}; the next apply or revert removes them".format(
                ", ".join(map(str, stray))
            )
        )
    if target.legacy_journal.is_file():
        texts.append(
            f"found the journal of an st-patch 1.x run that was interrupted ({target.legacy_journal}); "
            "the next apply or revert rolls it back"
        )
    return texts


def recover(target: Target, version: str, guard: Guard) -> dict | None:
    """Finish an interrupted run of this version, then of st-patch 1.x; None when there was none."""
    return swap.recover(target, guard) or _legacy(target, version, guard)


def _reinstall(target: Target, version: str) -> str:
    if target.kind == INSTALLED:
        return f"reinstall the package (pip install --force-reinstall --no-deps sentence-transformers=={version})"
    return f"restore the files from the sentence-transformers {version} sdist"


def _legacy(target: Target, version: str, guard: Guard) -> dict | None:
    """Roll back a journal that st-patch 1.x left in the package, file by file checked."""
    jfile = target.legacy_journal
    if not jfile.is_file():
        return None
    jdir = jfile.parent
    try:
        journal = json.loads(jfile.read_text(encoding="utf-8"))
        entries = journal["entries"]
    except (OSError, ValueError, KeyError) as exc:
        raise Refusal(
            f"the journal {jfile} is unreadable ({exc}); {_reinstall(target, version)} and delete {jdir}"
        ) from None
    changes: Dict[str, bytes | None] = {}
    if journal.get("release") == version:  # else another release was installed since: nothing is replayed
        for entry in entries:
            path = target.path(entry["path"])
            got = swap.sha256(path.read_bytes()) if path.is_file() else None
            if got not in (entry.get("orig_sha256"), entry.get("new_sha256")):
                raise Refusal(
                    f"found the journal of an interrupted st-patch 1.x run ({jfile}), but {entry['path']} is "
                    f"neither the file it started from nor the one it wrote (sha256 {got}). Nothing was changed. "
                    f"To fix: {_reinstall(target, version)}, then delete {jdir}"
                )
            if got != entry.get("orig_sha256"):
                changes[entry["path"]] = (jdir / entry["orig"]).read_bytes() if entry.get("orig") else None
    rel = jdir.relative_to(target.root).as_posix()
    swap.commit(target, "recover", journal.get("series") or "?", changes, guard, remove_dirs=[rel])
    return {
        "action": f"rolled back the interrupted st-patch 1.x {journal.get('op')} from {jfile}",
        "files": sorted(changes),
    }

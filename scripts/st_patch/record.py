"""Keep an installed distribution's ``RECORD`` true to the files st-patch changes.

``pip uninstall`` removes exactly what ``RECORD`` lists. Without a row, the module a series adds
(``sentence_transformers/losses/_matryoshka_cache.py``) and st-patch's state record would stay behind
after an uninstall and shadow nothing but confuse the next install; with stale hashes, tools that
verify an installation against ``RECORD`` report the patched files as corrupted.

So ``apply`` rewrites the rows of the files it changes (new sha256 and size, in place), appends rows
for the files it creates and one without a hash for the state record (its content changes), and
``revert`` puts the release's hashes back and drops the appended rows. Every other line is kept byte
for byte, so apply followed by revert gives back the original ``RECORD`` exactly. The new ``RECORD``
is written in the same journalled transaction as the files.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
from typing import Dict


def row_hash(data: bytes) -> str:
    """The wheel spec's hash field: ``sha256=`` and the urlsafe base64 digest without padding."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def _row_text(fields: list, newline: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator=newline).writerow(fields)
    return out.getvalue()


def _row_path(line: str) -> str | None:
    try:
        row = next(csv.reader([line]))
    except (csv.Error, StopIteration):
        return None
    return row[0] if row else None


def rewrite(record: bytes, files: Dict[str, bytes | None], unhashed: Dict[str, bool]) -> bytes:
    """``record`` with a row per path of ``files`` (bytes: hash and size; None: no row) and of
    ``unhashed`` (True: a row with empty hash and size; False: no row).

    A path's existing row is replaced where it stands; rows that did not exist are appended in
    sorted order. Paths are relative to the directory that holds the dist-info (site-packages),
    with ``/``, as RECORD writes them."""
    text = record.decode("utf-8")
    newline = "\r\n" if "\r\n" in text else "\n"
    wanted: Dict[str, list | None] = {}
    for path, data in files.items():
        wanted[path] = None if data is None else [path, row_hash(data), str(len(data))]
    for path, present in unhashed.items():
        wanted[path] = [path, "", ""] if present else None
    lines, done = [], set()
    for line in text.splitlines(keepends=True):
        path = _row_path(line.rstrip("\r\n"))
        if path in wanted:
            done.add(path)
            if wanted[path] is not None:
                lines.append(_row_text(wanted[path], newline))
            continue
        lines.append(line)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += newline
    for path in sorted(set(wanted) - done):
        if wanted[path] is not None:
            lines.append(_row_text(wanted[path], newline))
    return "".join(lines).encode("utf-8")

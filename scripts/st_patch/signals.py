"""Ctrl-C and SIGTERM for a command that changes a target: honoured before the commit point, held inside it.

A command that changes a target has one commit point (a directory exchange on a file tree, the end
of ``git am`` on a fork). Before it, SIGINT or SIGTERM raises ``KeyboardInterrupt`` and the backend
puts the target back as it started (exit 130). Inside ``critical()`` (the steps that must not be cut
in half: the exchanges, a running ``git am``, a roll-back) a signal is only remembered; the block ends,
and then ``raise_pending()`` raises it, or, once the operation has completed, ``take()`` reports it
and the command exits 0, because the target is in its new state whatever the signal wanted.

SIGKILL cannot be caught: that is what the journal is for (see ``swap``).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator, List

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Guard:
    def __init__(self) -> None:
        self.depth = 0
        self.pending: List[int] = []
        self.cleanup_error: str | None = None  # set by a step that completed but could not tidy up
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.depth:
            self.pending.append(signum)
            return
        raise KeyboardInterrupt(_NAMES.get(signum, str(signum)))

    def __enter__(self) -> Guard:
        for signum in _NAMES:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except (ValueError, OSError):  # not the main thread: signals stay as they were
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, previous)
        self._previous.clear()

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Hold SIGINT/SIGTERM for the duration of the block."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def raise_pending(self) -> None:
        """Raise KeyboardInterrupt for a signal held by ``critical()`` (outside a critical block)."""
        if self.pending and not self.depth:
            signum = self.pending[0]
            self.pending.clear()
            raise KeyboardInterrupt(_NAMES.get(signum, str(signum)))

    def take(self) -> str | None:
        """The name of a held signal, which is dropped (the operation completed), or None."""
        if not self.pending:
            return None
        signum = self.pending[0]
        self.pending.clear()
        return _NAMES.get(signum, str(signum))


_ACTIVE: List[Guard] = []


@contextlib.contextmanager
def guarded() -> Iterator[Guard]:
    """Install a Guard for the duration of a command; ``current()`` returns it."""
    guard = Guard()
    with guard:
        _ACTIVE.append(guard)
        try:
            yield guard
        finally:
            _ACTIVE.remove(guard)


def current() -> Guard:
    """The active Guard (a fresh, uninstalled one when none is active, e.g. in library use)."""
    return _ACTIVE[-1] if _ACTIVE else Guard()

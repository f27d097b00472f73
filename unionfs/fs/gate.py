"""A gate that lets writers through until someone pauses it (for a consistent snapshot of the upper dir).

Writers (``with gate.writing():``) run concurrently with each other; :meth:`WriteGate.pause` waits until the
writers in flight are done and holds new ones back until :meth:`WriteGate.resume`.  A thread that holds the
gate already passes again without waiting (one request's change may pass it several times, and a pause
waits for that thread), and :meth:`WriteGate.entered` lets a thread that must never wait in: it gets False
while the gate is paused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WriteGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._paused = False
        self._held = threading.local()
        """Per thread: how many times it is inside the gate."""

    @property
    def paused(self) -> bool:
        return self._paused

    @contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._writers += 1
        self._held.depth = 1
        try:
            yield
        finally:
            self._held.depth = 0
            self._leave()

    @contextmanager
    def entered(self) -> Iterator[bool]:
        """Enter without waiting: yields True inside the gate (every :meth:`writing` of this thread until
        the block ends passes at once), False (and not inside) while it is paused."""
        if getattr(self._held, "depth", 0):
            with self.writing():
                yield True
            return
        with self._cond:
            if self._paused:
                inside = False
            else:
                self._writers += 1
                inside = True
        if not inside:
            yield False
            return
        self._held.depth = 1
        try:
            yield True
        finally:
            self._held.depth = 0
            self._leave()

    def _leave(self) -> None:
        with self._cond:
            self._writers -= 1
            if self._writers == 0:
                self._cond.notify_all()

    def pause(self, timeout: float | None = None) -> bool:
        """Stop new writers and wait for those in flight; False (and not paused) if that timed out."""
        with self._cond:
            if self._paused:
                return True
            self._paused = True
            if not self._cond.wait_for(lambda: self._writers == 0, timeout):
                self._paused = False
                self._cond.notify_all()
                return False
            return True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

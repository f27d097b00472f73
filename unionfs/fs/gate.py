"""A gate that lets writers through until someone pauses it (for a consistent snapshot of the upper dir).

Writers (``with gate.writing():``) run concurrently with each other; :meth:`WriteGate.pause` waits until the
writers in flight are done and holds new ones back until :meth:`WriteGate.resume`.
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

    @property
    def paused(self) -> bool:
        return self._paused

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._writers += 1
        try:
            yield
        finally:
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

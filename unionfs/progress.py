"""Progress of long store operations: a line redrawn on a terminal, nothing otherwise.

Operations report through the :class:`Progress` interface (``phase`` when a new stage starts, ``advance``
after each entry, ``done`` at the end); :func:`for_stream` gives a :class:`TerminalProgress` when the
stream is a terminal and a silent :class:`Progress` otherwise, so scripts and logs stay clean.
"""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """The interface, silent: every method does nothing."""

    def phase(self, label: str, *, files: int | None = None, nbytes: int | None = None) -> None:
        """A new stage begins; ``files``/``nbytes`` are its totals when known."""

    def advance(self, files: int, nbytes: int) -> None:
        """``files`` more entries and ``nbytes`` more bytes are done."""

    def done(self) -> None:
        """The operation is over (clears the line)."""


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


class TerminalProgress(Progress):
    """``LABEL  N[/TOTAL] files  X[/Y] MiB`` on one line of a terminal, redrawn at most ``hz`` times a
    second."""

    def __init__(self, stream: TextIO, *, hz: float = 10.0, unit: str = "files") -> None:
        self.stream = stream
        self.unit = unit
        self.interval = 1.0 / hz
        self.label = ""
        self.total_files: int | None = None
        self.total_bytes: int | None = None
        self.files = 0
        self.nbytes = 0
        self._last = 0.0
        self._width = 0

    def phase(self, label: str, *, files: int | None = None, nbytes: int | None = None) -> None:
        self.label, self.total_files, self.total_bytes = label, files, nbytes
        self.files = self.nbytes = 0
        self._draw()

    def advance(self, files: int, nbytes: int) -> None:
        self.files += files
        self.nbytes += nbytes
        finished = self.total_files is not None and self.files >= self.total_files
        if finished or time.monotonic() - self._last >= self.interval:
            self._draw()

    def line(self) -> str:
        count = f"{self.files}" if self.total_files is None else f"{self.files}/{self.total_files}"
        size = human_bytes(self.nbytes)
        if self.total_bytes is not None:
            size += f"/{human_bytes(self.total_bytes)}"
        return f"{self.label}  {count} {self.unit}  {size}"

    def _draw(self) -> None:
        self._last = time.monotonic()
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def done(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def for_stream(stream: TextIO, *, unit: str = "files") -> Progress:
    """A terminal progress line on ``stream`` when it is a terminal, else the silent one; ``unit`` names
    what the count counts (files, layers)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return TerminalProgress(stream, unit=unit) if tty else Progress()

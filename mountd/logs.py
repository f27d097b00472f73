"""The daemon's logger, which imports :mod:`logging` only once something is logged.

``logging`` (with ``traceback``, ``string``, ``weakref`` …) is a good part of the start-up time of a
mount, and a mount that goes well logs nothing below a warning.  :data:`log` answers ``debug``/``info``
below the configured level without importing anything; the first message at or above it (or
:func:`real`, or :func:`configure` with ``debug``) sets up ``logging`` as :func:`configure` asked:
stderr, ``unionfs-mount: LEVEL: message``, warnings and errors, everything with ``-d``; once the daemon
is detached and ready (:func:`to_syslog`), syslog instead, where there is one.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

NAME = "unionfs"
DEBUG, INFO, WARNING = 10, 20, 30
_level = [DEBUG]
"""The level :func:`configure` set: below it nothing is passed on unless ``logging`` is imported anyway."""
_pending = [False]
"""Has :func:`configure` been called and its handler not been set up yet?"""
_syslog = [False]
"""Log to syslog instead of stderr (:func:`to_syslog`)."""


def configure(*, debug: bool) -> None:
    """Log to stderr: warnings and errors, everything with ``debug`` (then ``logging`` is set up now)."""
    _level[0] = DEBUG if debug else WARNING
    _pending[0] = True
    if debug or "logging" in sys.modules:
        real()


def to_syslog() -> None:
    """From now on log to syslog (the daemon's stderr is gone), or nowhere where there is none; warnings and
    errors only.  Nothing is imported before something is logged."""
    _syslog[0] = True
    _pending[0] = True
    if "logging" in sys.modules:
        real()


def real() -> logging.Logger:
    """The ``logging`` logger behind :data:`log`, set up as :func:`configure` (and :func:`to_syslog`) asked."""
    import logging

    if _pending[0]:
        _pending[0] = False
        root = logging.getLogger()
        root.setLevel(_level[0])
        if _syslog[0]:
            _use_syslog(root)
        elif not any(getattr(h, "unionfs_stderr", False) for h in root.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("unionfs-mount: %(levelname)s: %(message)s"))
            handler.unionfs_stderr = True  # type: ignore[attr-defined]
            root.addHandler(handler)
    return logging.getLogger(NAME)


def _use_syslog(root: logging.Logger) -> None:
    import logging
    from logging.handlers import SysLogHandler

    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    try:
        syslog = SysLogHandler(address="/dev/log")
    except OSError:
        return
    syslog.ident = f"unionfs-mount[{os.getpid()}]: "
    syslog.setLevel(logging.WARNING)
    root.addHandler(syslog)


def shutdown() -> None:
    """Flush and close the handlers, if ``logging`` was ever set up."""
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()


class Logger:
    """The few calls the daemon makes, as :class:`logging.Logger` spells them."""

    __slots__ = ()

    def debug(self, msg: str, *args: Any, exc_info: bool = False) -> None:
        if _level[0] <= DEBUG or "logging" in sys.modules:
            real().debug(msg, *args, exc_info=exc_info)

    def info(self, msg: str, *args: Any) -> None:
        if _level[0] <= INFO or "logging" in sys.modules:
            real().info(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        real().warning(msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        real().error(msg, *args)

    def exception(self, msg: str, *args: Any) -> None:
        real().exception(msg, *args)


log = Logger()

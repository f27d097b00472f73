"""``unionfs-mount``: the fuse-overlayfs command line (``mount_program`` of containers/storage, mount.fuse).

Exit status: 0 mounted (or ``-h``/``--version``); 1 the mount failed (directories, mountpoint, libfuse);
2 the command line is wrong (unknown option, bad value, missing argument).  Every failure is one line on
stderr, ``unionfs-mount: error: …``, and leaves nothing mounted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from mountd import lifecycle, logs
from mountd.cli.exits import EXIT_FAILURE, EXIT_USAGE, error
from mountd.options import Action, MountConfig, OptionError, help_text, parse_argv
from unionfs import __version__

PROG = "unionfs-mount"

log = logs.log


def version_line() -> str:
    """``unionfs-mount VERSION (frontend NAME; fusepy: binding NAME, libfuse MAJOR)``: the frontend mounts
    get unless ``-o frontend=`` says otherwise, and what the fusepy frontend would load (or why it cannot)."""
    default = os.environ.get(lifecycle.FRONTEND_ENV) or lifecycle.DEFAULT_FRONTEND
    try:
        from mountd.highlevel.binding import BINDING_NAME, LIBFUSE_MAJOR
    except ImportError as exc:
        return f"{PROG} {__version__} (frontend {default}; fusepy: no FUSE binding: {exc})"
    return f"{PROG} {__version__} (frontend {default}; fusepy: binding {BINDING_NAME}, libfuse {LIBFUSE_MAJOR})"


def run_mount(config: MountConfig, *, prog: str = PROG) -> int:
    """Mount ``config`` as the command-line programs do: log setup, one-line errors, exit status."""
    lifecycle.configure_logging(debug=config.debug)
    try:
        return lifecycle.mount(config)
    except lifecycle.MountError as exc:
        error(prog, exc)
        return EXIT_FAILURE
    except Exception as exc:  # a bug: one line, the traceback with -d
        log.debug("internal error", exc_info=True)
        error(prog, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs-mount`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = parse_argv(args)
    except OptionError as exc:
        error(PROG, exc)
        return EXIT_USAGE
    if parsed is Action.HELP:
        print(help_text(PROG), end="")
        return 0
    if parsed is Action.VERSION:
        print(version_line())
        return 0
    return run_mount(parsed)

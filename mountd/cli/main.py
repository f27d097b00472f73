"""``unionfs``: the command for people (``unionfs-mount`` is the one for programs).

Subcommands: ``mount`` and ``umount`` here, the image commands from :mod:`mountd.cli.images`; each is an
argparse subparser whose ``func`` takes the parsed arguments and returns the exit status.  Exit status:
0 done; 1 failed (one line on stderr, ``unionfs: error: …``); 2 a wrong command line (:mod:`mountd.cli.exits`).

The mount machinery (:mod:`mountd.cli.mount`) is imported inside the handlers that mount, so that the image
commands start without it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mountd.cli import build as cli_build
from mountd.cli import images as cli_images
from mountd.cli import stats as cli_stats
from mountd.cli import transfer as cli_transfer
from mountd.cli.exits import EXIT_FAILURE, EXIT_USAGE, error
from unionfs import __version__
from unionfs.mountopts import escape_path

PROG = "unionfs"


# -- mount --------------------------------------------------------------------------------------------------

def mount_argv(args: argparse.Namespace) -> list[str]:
    """The ``unionfs-mount`` command line equivalent to ``unionfs mount`` arguments.

    The ``-o`` lists come first and the named flags after them, so ``--lower``/``--upper``/``--work`` win
    over the same option inside ``-o``.
    """
    opts: list[str] = list(args.options)
    if args.lower:
        opts.append("lowerdir=" + ":".join(escape_path(d) for d in args.lower))
    if args.upper is not None:
        opts.append("upperdir=" + escape_path(args.upper))
    if args.work is not None:
        opts.append("workdir=" + escape_path(args.work))
    for flag in ("ro", "volatile"):
        if getattr(args, flag):
            opts.append(flag)
    if args.whiteout is not None:
        opts.append("whiteout=" + args.whiteout)
    argv = [arg for opt in opts for arg in ("-o", opt)]
    argv += (["-f"] if args.foreground else []) + (["-d"] if args.debug else [])
    return [*argv, "--", args.mountpoint]


def cmd_mount(args: argparse.Namespace) -> int:
    if args.image is None:
        return _mount(args)
    try:
        cli_images.prepare_image_mount(args)  # the image's layers become --lower, an upper is chosen
    except cli_images.USER_ERRORS as exc:
        error(PROG, exc)
        return EXIT_FAILURE
    status = _mount(args)
    if status != 0:
        cli_images.abandon_image_mount(args)
    return status


def _mount(args: argparse.Namespace) -> int:
    from mountd.cli.mount import run_mount
    from mountd.options import MountConfig, OptionError, parse_argv

    try:
        config = parse_argv(mount_argv(args))
    except OptionError as exc:
        error(PROG, exc)
        return EXIT_USAGE
    assert isinstance(config, MountConfig)  # no -h/-V can reach here: argparse handled them
    return run_mount(config, prog=PROG)


def _add_mount(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "mount", help="mount a union of directories",
        description="Mount LOWER dirs (the first on top) with an optional writable UPPER dir on MOUNTPOINT. "
                    "Returns once the mount is ready; `unionfs umount MOUNTPOINT` ends it. "
                    "Every option of unionfs-mount works with -o (see unionfs-mount -h).")
    cli_images.add_mount_arguments(p)  # [IMAGE] and --store
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a read-only layer; repeat, top layer first")
    p.add_argument("--upper", metavar="DIR", help="the writable layer (needs --work)")
    p.add_argument("--work", metavar="DIR", help="scratch dir on the upper's filesystem")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="unionfs-mount options, comma-separated (e.g. lowerdir=A:B,allow_other)")
    p.add_argument("--ro", action="store_true", help="read-only even with --upper")
    p.add_argument("--volatile", action="store_true", help="skip fsync")
    p.add_argument("--whiteout", choices=("auto", "kernel", "oci"), help="whiteout format to write")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="debug log on stderr (implies -f)")
    p.set_defaults(func=cmd_mount)


# -- umount -------------------------------------------------------------------------------------------------

def cmd_umount(args: argparse.Namespace) -> int:
    from mountd.lifecycle import MountError, unmount

    try:
        unmount(args.mountpoint, timeout=args.timeout)
    except MountError as exc:
        error(PROG, exc)
        return EXIT_FAILURE
    return 0


def _add_umount(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "umount", help="unmount a union and wait for its daemon to exit",
        description="Unmount a unionfs mount and wait until its daemon has exited.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon (default 30)")
    p.set_defaults(func=cmd_umount)


# -- main ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``unionfs`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog=PROG, description="An OverlayFS-style union filesystem.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_mount(sub)
    _add_umount(sub)
    cli_images.add_commands(sub)
    cli_transfer.add_commands(sub)
    cli_stats.add_command(sub)
    cli_build.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())

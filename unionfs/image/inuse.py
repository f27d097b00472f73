"""Which running union mounts use a directory: ``/proc/self/mountinfo``, the daemons' command lines, and the
workdir lock.

A union mount is either the kernel's overlayfs (its dirs are in mountinfo's super options) or a FUSE
daemon: a unionfs daemon says which dirs it serves on its control channel (``info``); any other daemon with
the fuse-overlayfs command line (fuse-overlayfs, ``-o lowerdir=…,upperdir=…,workdir=…`` and the mountpoint
among its arguments) is found by its command line.  A running unionfs daemon also holds an ``flock`` on its
workdir (:func:`unionfs.fs.layers.LayerStack.open`).

Everything here only reads ``/proc``; a process that vanishes while being read is skipped.  Paths are
compared by their real paths; relative paths on a daemon's command line are taken relative to its cwd.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass

from unionfs.control import ControlClient
from unionfs.fs.fsio import HostDir
from unionfs.mountinfo import mounts, unescape
from unionfs.mountopts import escape_path, option_values, split_lowerdir
from unionfs.mountopts import unescape as unescape_path

CONTROL_TIMEOUT = 5.0
"""How long a daemon may take to answer ``info`` before its command line is read instead."""
FUSE_TYPES = ("fuse.unionfs", "fuse.unionfs-mount", "fuse.fuse-overlayfs", "fuse")


@dataclass(frozen=True)
class UnionMount:
    """A running union mount (or a daemon starting one).  ``lowers`` top-down; ``pid`` of the daemon
    (None for the kernel's overlayfs)."""

    mountpoint: str
    fstype: str
    lowers: tuple[str, ...]
    upper: str | None
    work: str | None
    pid: int | None = None

    def describe(self) -> str:
        """``MOUNTPOINT (the kernel's overlayfs)``, ``MOUNTPOINT (process PID)``, or for a daemon known only
        by the lock on its workdir ``a unionfs daemon (workdir W is locked)``."""
        if self.fstype == "overlay":
            return f"{self.mountpoint} (the kernel's overlayfs)"
        if self.pid is None:
            return f"a unionfs daemon (workdir {self.work} is locked)"
        return f"{self.mountpoint or 'a mount being made'} (process {self.pid})"


def _real(path: str, cwd: str = "/") -> str:
    return os.path.realpath(os.path.join(cwd, path))


def kernel_mounts() -> list[UnionMount]:
    """The kernel overlayfs mounts, with their dirs from the super options."""
    out = []
    for line in mounts():
        if line.fstype != "overlay":
            continue
        opts = {k: unescape(v) for k, v in option_values(line.super_options).items()}
        out.append(UnionMount(line.mountpoint, line.fstype,
                              tuple(p for p in split_lowerdir(opts.get("lowerdir", "")) if p),
                              opts.get("upperdir"), opts.get("workdir")))
    return out


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]


def _launch_dir(pid: int) -> str:
    """The directory relative paths on ``pid``'s command line were meant from: ``$PWD`` of its environment
    (a daemon changes its cwd to ``/`` when it detaches, its environment stays), else its cwd."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"PWD=/"):
                    return os.fsdecode(item[4:])
    except OSError:
        pass
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return "/"


def holds_open(pid: int, path: str) -> bool:
    """True when process ``pid`` has a descriptor of ``path`` (a real path) open: a union daemon keeps
    every layer dir open for as long as it runs."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def _parse_argv(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(``-o`` options, ``--lower`` dirs, positionals) of a mount command line: fuse-overlayfs's
    (``PROG -o lowerdir=…,upperdir=…,workdir=… MNT``) or ``unionfs mount``'s (``--lower D --upper U
    --work W MNT``; ``--upper``/``--work`` land in the options as upperdir/workdir)."""
    opts: dict[str, str] = {}
    lowers: list[str] = []
    positional: list[str] = []
    named = {"--upper": "upperdir", "--work": "workdir"}
    args = iter(argv[1:])
    for arg in args:
        flag, eq, inline = arg.partition("=")
        if arg == "-o":
            opts.update(option_values(next(args, "")))
        elif arg.startswith("-o"):
            opts.update(option_values(arg[2:]))
        elif flag == "--lower":
            lowers.append(inline if eq else next(args, ""))
        elif flag in named:
            opts[named[flag]] = escape_path(inline if eq else next(args, ""))  # as -o values are
        elif not arg.startswith("-"):
            positional.append(arg)
    return opts, lowers, positional


def _daemon_mount(pid: int, argv: list[str]) -> UnionMount | None:
    """The union a process with a mount command line serves, or None if it names no lower dirs."""
    opts, lowers, positional = _parse_argv(argv)
    lowers = lowers or [p for p in split_lowerdir(opts.get("lowerdir", "")) if p]
    if not lowers or not positional:
        return None
    cwd = _launch_dir(pid)
    upper, work = (unescape_path(opts[k]) if opts.get(k) else None for k in ("upperdir", "workdir"))
    return UnionMount(_real(positional[-1], cwd), "fuse", tuple(_real(p, cwd) for p in lowers),
                      _real(upper, cwd) if upper else None, _real(work, cwd) if work else None, pid)


def _mount_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of the processes (other than this one) whose command line names lower dirs."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        argv = _cmdline(int(entry))
        if argv and any("lowerdir=" in a or a.startswith("--lower") for a in argv):
            yield int(entry), argv


def daemon_mounts() -> list[UnionMount]:
    """Processes whose command line is a union mount (running daemons and ones still starting)."""
    out = []
    for pid, argv in _mount_processes():
        found = _daemon_mount(pid, argv)
        if found is not None:
            out.append(found)
    return out


def mount_at(path: str) -> UnionMount | None:
    """The union mounted at ``path`` (a mountpoint; the topmost mount there), or None.

    For a FUSE mount the dirs come from the daemon's command line; a FUSE union whose daemon cannot be
    found is returned with no dirs.
    """
    real = os.path.realpath(path)
    lines = [m for m in mounts() if m.mountpoint == real]
    if not lines:
        return None
    top = lines[-1]
    if top.fstype == "overlay":
        return next((m for m in reversed(kernel_mounts()) if m.mountpoint == real), None)
    if top.fstype != "fuse" and not top.fstype.startswith("fuse."):
        return None
    served = _ask_daemon(real, top.fstype)
    if served is not None:
        return served
    for daemon in daemon_mounts():
        if daemon.mountpoint == real:
            return UnionMount(real, top.fstype, daemon.lowers, daemon.upper, daemon.work, daemon.pid)
    return UnionMount(real, top.fstype, (), None, None) if top.fstype in FUSE_TYPES else None


def _ask_daemon(mountpoint: str, fstype: str) -> UnionMount | None:
    """The dirs a unionfs daemon reports on its control channel (``info``), or None if none answers."""
    try:
        with ControlClient(mountpoint, timeout=CONTROL_TIMEOUT) as client:
            info = client.request("info")
    except (OSError, ValueError, ConnectionError):
        return None
    if not info.get("ok"):
        return None
    return UnionMount(mountpoint, fstype, tuple(info.get("lowers") or ()), info.get("upper"), info.get("work"),
                      info.get("pid"))


def workdir_locked(work: str) -> bool:
    """True when a running unionfs daemon holds the lock of workdir ``work`` (False if it is not there)."""
    try:
        host = HostDir(work)
    except OSError:
        return False
    try:
        fd = host.open("", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    finally:
        host.close()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return False


def users_of_upper(upper: str, *, work: str | None = None) -> list[UnionMount]:
    """The mounts (and starting daemons) that use ``upper`` as their upper dir: kernel overlay mounts naming
    it, mount processes naming it on their command line or holding it open.  ``work``, when known (from a
    container record), is also checked for a daemon's lock."""
    real = os.path.realpath(upper)
    users = [m for m in kernel_mounts() if m.upper and os.path.realpath(m.upper) == real]
    # unionfs daemons say which upper they serve on their control channel
    for line in mounts():
        if line.fstype in FUSE_TYPES or line.fstype.startswith("fuse."):
            served = _ask_daemon(line.mountpoint, line.fstype)
            if served is not None and served.upper and os.path.realpath(served.upper) == real:
                users.append(served)
    if any(u.fstype != "overlay" for u in users):
        return users
    for pid, argv in _mount_processes():
        found = _daemon_mount(pid, argv)
        if (found is not None and found.upper == real) or holds_open(pid, real):
            users.append(found if found is not None and found.upper == real
                         else UnionMount(found.mountpoint if found else "", "fuse", (), real, None, pid))
    if not users and work is not None and workdir_locked(work):
        users.append(UnionMount("", "fuse", (), real, os.path.realpath(work)))
    return users


def paths_in_use(prefix: str) -> set[str]:
    """Every path under ``prefix`` (a real directory path) that a running mount uses: the lowerdirs and
    upperdirs of kernel overlay mounts, and whatever any process holds open there (a union daemon keeps its
    layer dirs open).  Processes that cannot be read are skipped."""
    base = prefix.rstrip("/") + "/"
    found = {p for m in kernel_mounts() for p in (*m.lowers, m.upper or "") if p.startswith(base)}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(base):
                found.add(target)
    return found

"""Getting a ``/dev/fuse`` descriptor mounted: ``mount(2)`` with ``fd=`` as root, ``fusermount3`` otherwise.

As root the daemon opens ``/dev/fuse`` and mounts itself (the string libfuse builds: ``fd=N,rootmode=…,
user_id=…,group_id=…`` plus ``allow_other``/``default_permissions``/``max_read``).  Where the kernel has
``FUSE_DEV_IOC_SYNC_INIT`` (6.18) the caller answers INIT while ``mount(2)`` waits, so a mount that cannot
work fails here instead of after the daemon detached.  Without the privilege the set-uid ``fusermount3``
mounts and hands the descriptor back over a socket pair (``_FUSE_COMMFD``, SCM_RIGHTS).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

from mountd.lowlevel import abi

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOATIME = 128, 1024
MNT_DETACH = 2

_FLAG_BITS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
              "sync": MS_SYNCHRONOUS, "dirsync": MS_DIRSYNC, "noatime": MS_NOATIME}


class MountRequest(NamedTuple):
    """What to mount: ``source`` (fsname), ``subtype``, the mount flags by name (``ro``, ``nodev``, …) and the
    kernel's FUSE options (``allow_other``, ``default_permissions``, ``max_read=N``)."""

    mountpoint: str
    source: str
    subtype: str
    flags: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @property
    def ms_flags(self) -> int:
        bits = 0
        for name in self.flags:
            bits |= _FLAG_BITS.get(name, 0)
        return bits


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def open_device() -> int:
    """A fresh ``/dev/fuse`` descriptor (close-on-exec)."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)


def enable_sync_init(fd: int) -> bool:
    """Ask for INIT during ``mount(2)`` (kernel 6.18+); False where the kernel does not have it."""
    try:
        fcntl.ioctl(fd, abi.FUSE_DEV_IOC_SYNC_INIT)
    except OSError:
        return False
    return True


def kernel_mount(fd: int, request: MountRequest) -> None:
    """``mount(2)`` of ``fd`` at the mountpoint (root).  Raises OSError with the kernel's errno."""
    st = os.stat(request.mountpoint)
    data = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}", *request.options]
    rc = _libc().mount(os.fsencode(request.source), os.fsencode(request.mountpoint),
                       f"fuse.{request.subtype}".encode(), request.ms_flags, ",".join(data).encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), request.mountpoint)


def fusermount(request: MountRequest) -> int:
    """Mount through the set-uid ``fusermount3``; returns the ``/dev/fuse`` descriptor it passed back."""
    import socket  # only without root: a root mount never loads it
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = [f"fsname={request.source}", f"subtype={request.subtype}", *request.flags, *request.options]
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()), _FUSE_COMMFD2=str(theirs.fileno()))
        try:
            proc = subprocess.run(["fusermount3", "-o", ",".join(opts), "--", request.mountpoint],
                                  env=env, pass_fds=(theirs.fileno(),), capture_output=True, text=True,
                                  check=False)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "fusermount3 is not installed") from None
        theirs.close()
        if proc.returncode != 0:
            said = proc.stderr.strip().splitlines()
            raise OSError(errno.EPERM, said[-1] if said else "fusermount3 failed", request.mountpoint)
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError(errno.EIO, "fusermount3 passed no descriptor", request.mountpoint)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def mount_device(fd: int, request: MountRequest, serve_init: Callable[[], None]) -> bool:
    """Mount ``/dev/fuse`` descriptor ``fd`` as root.  Where the kernel has SYNC_INIT, ``serve_init()``
    answers INIT in a helper thread while ``mount(2)`` waits, and True is returned; else INIT comes as the
    first request after this returns False.  Raises OSError; nothing stays mounted then."""
    if not enable_sync_init(fd):
        kernel_mount(fd, request)
        return False
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve_init()
        except BaseException as exc:  # reported once mount(2) returned
            failure.append(exc)

    helper = threading.Thread(target=run, name="unionfs-init", daemon=True)
    helper.start()
    kernel_mount(fd, request)  # a failure here: the helper stays blocked on a device nobody mounted
    helper.join(10.0)
    if failure or helper.is_alive():
        with contextlib.suppress(OSError):
            unmount(request.mountpoint, lazy=True)
        raise OSError(errno.EIO, f"INIT failed: {failure[0] if failure else 'no answer'}", request.mountpoint)
    return True


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount (``umount2`` as root, ``fusermount3 -u`` otherwise).  Raises OSError."""
    if os.geteuid() == 0:
        if _libc().umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
        return
    import subprocess  # only without root

    proc = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint], capture_output=True,
                          check=False)
    if proc.returncode != 0:
        raise OSError(errno.EBUSY, proc.stderr.decode(errors="replace").strip(), mountpoint)

"""FUSE passthrough (kernel 6.9+, protocol 7.40, init-namespace CAP_SYS_ADMIN): reads, writes and mmap of
an open regular file go from the kernel straight to a backing file the daemon registered.

One backing file per node, shared by every open of it and closed with the last release (the kernel refuses
two different backing files for one inode, and a passthrough open next to a page-cache open of the same
inode).  The kernel reopens the backing file with the flags of the user's open and the daemon's
credentials: a write open has been copied up by the core before, so its backing is the upper file.

Which opens pass through: read-only opens of upper files, and of lower files on a read-only mount, or on
any mount with ``-o passthrough=all``.
Write opens send their data through the daemon (except with ``passthrough=all``), so that a pause for a
commit holds it: in page-cache mode
(the kernel clears set-id bits itself, ``file_remove_privs``), or, where the node has a passthrough open
already, sharing its backing with ``FOPEN_DIRECT_IO`` (then the daemon clears them on a write flagged
``FUSE_WRITE_KILL_SUIDGID``).
On a writable mount a lower file may be copied up while it is open for reading, and the kernel's overlayfs
then reads the upper copy through the old descriptor; a kernel-held lower backing would keep reading the
old data.  So by default (``passthrough=on``) lower files of a writable mount are read through the daemon
(which moves such descriptors to the upper copy) and the kernel's page cache; ``passthrough=all`` trades
that rule for the kernel's read speed (an old descriptor keeps reading the lower file, as the kernel's
overlayfs did before Linux 4.19; docs/semantics.md).  While a node has page-cache opens, later opens of it
stay in that mode too; while it has a passthrough open, later opens share its backing.  An open that
resolves to the upper copy of a node whose backing is still a lower file (the node was copied up since)
raises :class:`Stale`: the dispatcher gives the name a new node id and answers ESTALE, the kernel looks the
name up again, and the retried open gets the new node, which never had the lower backing.  The lower file
is never written: write opens are of upper files only, and never share a lower backing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import threading

from mountd.lowlevel import abi

OVERLAYFS_MAGIC = 0x794C7630


class Stale(Exception):
    """The open cannot share the node's passthrough backing (see the module doc)."""


class _Backing:
    """A backing file registered with the kernel: its id, whether it is an upper file, how many opens share it."""

    __slots__ = ("backing_id", "upper", "users")

    def __init__(self, backing_id: int, upper: bool, users: int) -> None:
        self.backing_id = backing_id
        self.upper = upper
        self.users = users


def fs_type(fd: int) -> int | None:
    """``f_type`` of the filesystem of descriptor ``fd`` (``fstatfs``), or None."""
    buf = ctypes.create_string_buffer(256)
    if ctypes.CDLL(None, use_errno=True).fstatfs(fd, buf) != 0:
        return None
    return int(struct.unpack_from("=l", buf.raw)[0])


def stack_depth(fds: list[int]) -> int:
    """``max_stack_depth`` for backing files on the filesystems of these directory descriptors: 2 when one
    of them is an overlayfs (the backing files are stacked themselves: nothing may stack on this mount
    then), else 1 (the kernel's overlayfs may still stack on this mount)."""
    return 2 if any(fs_type(fd) == OVERLAYFS_MAGIC for fd in fds) else 1


class Passthrough:
    """The backing files of one mount's device ``fd``.  ``enabled`` False: every call is a no-op."""

    def __init__(self, fd: int, *, enabled: bool, reason: str = "", lower: bool = False,
                 writes: bool = False) -> None:
        self.fd = fd
        self.enabled = enabled
        self.reason = reason
        self.lower = lower
        """Lower files pass through too (a read-only mount, or ``passthrough=all``)."""
        self.writes = writes
        """Write opens pass through too (``passthrough=all``): a pause does not hold their data."""
        self._by_node: dict[int, _Backing] = {}
        self._cached: dict[int, int] = {}
        """Nodes with opens in page-cache mode (no backing) -> how many."""
        self._lock = threading.Lock()
        self.opened = 0
        self.stale_retries = 0

    def disable(self, reason: str) -> None:
        self.enabled = False
        self.reason = reason

    def attach(self, nodeid: int, host_fd: int, *, upper: bool, write: bool = False) -> int:
        """The backing id for an open of regular file node ``nodeid`` whose host descriptor is ``host_fd``;
        0 for an open in page-cache mode (served by READ/WRITE requests).  Every call is to be matched by
        one :meth:`detach` with ``backed`` = (the result != 0).  Raises :class:`Stale` (see the module doc)
        or OSError from the kernel."""
        with self._lock:
            backing = self._by_node.get(nodeid)
            if backing is not None and backing.upper != upper:
                self.stale_retries += 1  # copied up since: the kernel holds the lower file for this node
                raise Stale
            if (not self.enabled or (write and backing is None and not self.writes) or self._cached.get(nodeid)
                    or not (upper or self.lower)):
                self._cached[nodeid] = self._cached.get(nodeid, 0) + 1
                return 0
            if backing is not None:
                backing.users += 1
                return backing.backing_id
            arg = bytearray(abi.BACKING_MAP.pack(host_fd, 0, 0))
            try:
                backing_id: int = fcntl.ioctl(self.fd, abi.FUSE_DEV_IOC_BACKING_OPEN, arg, True)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EINVAL, errno.ELOOP):
                    self.enabled = False
                    self.reason = f"the kernel refused a backing file ({os.strerror(exc.errno or 0)})"
                    self._cached[nodeid] = self._cached.get(nodeid, 0) + 1
                    return 0
                raise
            backing_id = int(backing_id)
            self._by_node[nodeid] = _Backing(backing_id, upper, 1)
            self.opened += 1
            return backing_id

    def detach(self, nodeid: int, *, backed: bool) -> None:
        """One open of ``nodeid`` was released (``backed``: it had a backing id); the last one closes the
        backing."""
        with self._lock:
            if not backed:
                left = self._cached.get(nodeid, 0) - 1
                if left > 0:
                    self._cached[nodeid] = left
                else:
                    self._cached.pop(nodeid, None)
                return
            backing = self._by_node.get(nodeid)
            if backing is None:
                return
            backing.users -= 1
            if backing.users > 0:
                return
            del self._by_node[nodeid]
        # an error: the connection is gone, and the kernel dropped the backing with everything else
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, abi.FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing.backing_id))

    def snapshot(self) -> dict[str, object]:
        """For ``unionfs stats``."""
        return {"enabled": self.enabled, "reason": self.reason, "lower_files": self.lower, "writes": self.writes,
                "backing_files": len(self._by_node), "page_cache_nodes": len(self._cached),
                "backing_opens": self.opened, "stale_retries": self.stale_retries}

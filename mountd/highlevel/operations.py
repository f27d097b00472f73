"""The fusepy ``Operations`` adapter: translate arguments, call :class:`unionfs.fs.union.UnionFS`, translate
the result.  It owns the table of open file handles.  ``OSError`` from the core reaches libfuse as its errno;
any other exception is logged with its traceback and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from mountd.highlevel.binding import Operations, fuse_get_context, kernel_invalidator, request_umask
from mountd.service import MountService
from unionfs.fs.attr import Attr
from unionfs.fs.union import Handle, UnionFS

log = logging.getLogger("unionfs")
_F = TypeVar("_F", bound=Callable[..., Any])


def _op(fn: _F) -> _F:
    """Wrap one FUSE operation: OSError passes through (after the invalidations it queued were sent), anything
    else is logged and becomes EIO."""

    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: UnionOperations, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        failed = 1
        try:
            result = fn(self, *args, **kwargs)
            failed = 0
            return result
        except OSError:
            # a change that failed may have changed the union first (a copy-up): its invalidations reach the
            # kernel before the caller sees the error, as a reply's do
            self.service.wait_invalidations()
            raise
        except Exception:
            log.exception("unexpected error in %s%r", name, args)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
        finally:
            self.service.count(name, time.perf_counter_ns() - start, failed)

    return cast(_F, wrapper)


FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_POSIX_ACL = 1 << 19
FMODE_EXEC = 0x20


def _rel(path: str) -> str:
    return path[1:] if path.startswith("/") else path


class UnionOperations(Operations):  # type: ignore[misc]
    """The union as libfuse sees it.  Only the operations defined here are registered."""

    use_ns = True

    def __init__(self, fs: UnionFS, *, on_ready: Callable[[], None] | None = None,
                 mountpoint: str | None = None, writeback_cache: bool = False, readdirplus: str = "1",
                 posix_acl: bool = False) -> None:
        self.fs = fs
        self.posix_acl = posix_acl
        self.writeback_cache = writeback_cache
        self.readdirplus = readdirplus
        self.on_ready = on_ready
        self.mountpoint = mountpoint
        self.service = MountService(fs, mountpoint=mountpoint, frontend="fusepy")
        self.handles: dict[int, Handle] = self.service.handles
        self.listings: dict[int, list[tuple[str, bytes, int, int]]] = {}
        """Listings of open directories by handle (libfuse 3 reads a big directory in several calls)."""
        self._dir_handles = itertools.count(1)
        self.op_stats: dict[str, list[int]] = self.service.op_stats
        """Per operation: [calls, total ns, errors]; read by ``unionfs stats``."""

    # -- lifecycle ----------------------------------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        """libfuse 3's init: ask for the writeback cache and set readdirplus as configured, then :meth:`init`.

        libfuse asks for readdirplus in "auto" mode, where the kernel sends attributes only with the first
        reply of a listing and after lookups in the directory: a tree walk that lstats every entry (a
        container commit's diff) then still needs a LOOKUP for most entries of big directories (3.8k of
        6.3k per mount in a podman build).  ``readdirplus=1`` drops "auto": every reply carries them."""
        if self.writeback_cache and conn is not None:
            conn.want |= FUSE_CAP_WRITEBACK_CACHE & conn.capable
        if self.posix_acl and conn is not None:
            # The kernel then reads system.posix_acl_access/default through getxattr, caches them and checks
            # them wherever it checks permissions; chmod and setfacl reach the host through the daemon.
            conn.want |= FUSE_CAP_POSIX_ACL & conn.capable
            # and leaves the caller's umask to us: it applies only where no default ACL decides instead
            conn.want |= FUSE_CAP_DONT_MASK & conn.capable
        if conn is not None:
            if self.readdirplus == "0":
                conn.want &= ~(FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO)
            elif self.readdirplus == "1":
                conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO
        self.init("/")

    def init(self, path: str) -> None:
        """Start the helpers of a live mount, then report ready — also when a helper could not start (the
        mount works without them; the failure is logged)."""
        try:
            invalidate = kernel_invalidator()
            if invalidate is not None:
                self._start_invalidator(invalidate)
            try:
                self.service.start_control()
            except OSError:
                log.exception("control socket unavailable; the mount works without it")
        except Exception:
            log.exception("starting the mount's helpers failed")
        finally:
            if self.on_ready is not None:
                self.on_ready()

    def destroy(self, path: str) -> None:
        self.service.close()

    def _start_invalidator(self, invalidate: Callable[[str], None]) -> None:
        """Kernel cache invalidations go out from their own thread (:meth:`MountService.start_invalidator`);
        ``invalidate`` takes a FUSE path ("/" + the union path)."""
        self.service.start_invalidator(lambda rel: invalidate("/" + rel))

    # -- helpers ------------------------------------------------------------------------------------------
    def _handle(self, fh: int) -> Handle:
        return self.service.handle(fh)

    def _track(self, handle: Handle) -> int:
        return self.service.track(handle)

    # -- attributes -------------------------------------------------------------------------------------------
    @_op
    def getattr(self, path: str | None, fh: int | None = None) -> Attr:
        if path is None:
            return self.fs.fgetattr(self._handle(fh or -1))
        return self.fs.getattr(_rel(path))

    @_op
    def attrs_of(self, path: str | None, names: list[str]) -> list[Attr | None]:
        """The attributes of entries of directory ``path`` for a listing that carries them (None: gone)."""
        if path is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self.fs.getattr_children(_rel(path), names)

    @_op
    def readlink(self, path: str) -> str:
        return self.fs.readlink(_rel(path))

    @_op
    def opendir(self, path: str) -> int:
        return next(self._dir_handles)

    @_op
    def releasedir(self, path: str | None, fh: int) -> int:
        self.listings.pop(fh, None)
        return 0

    @_op
    def listing(self, path: str | None, fh: int, offset: int) -> list[tuple[str, bytes, int, int]]:
        """The entries of an open directory as ``(name, encoded name, type bits, st_ino)``, "." and ".." first;
        taken at offset 0 and kept for the later offsets of the same handle."""
        entries = self.listings.get(fh) if offset else None
        if entries is None:
            if path is None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            rel = _rel(path)
            ino = self.fs.getattr(rel).st_ino
            entries = [(".", b".", 0o040000, ino), ("..", b"..", 0o040000, 1)]
            entries.extend((name, os.fsencode(name), kind, child_ino)
                           for name, kind, child_ino in self.fs.readdir(rel))
            if fh:
                self.listings[fh] = entries
        return entries

    @_op
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        rel = _rel(path)
        ino = self.fs.getattr(rel).st_ino
        entries = [(".", {"st_mode": 0o040000, "st_ino": ino}, 0), ("..", {"st_mode": 0o040000, "st_ino": 1}, 0)]
        entries.extend((name, {"st_mode": kind, "st_ino": ino}, 0) for name, kind, ino in self.fs.readdir(rel))
        return entries

    @_op
    def access(self, path: str, amode: int) -> int:
        self.fs.access(_rel(path), amode)
        return 0

    @_op
    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    # -- xattrs ----------------------------------------------------------------------------------------------
    @_op
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes | None:
        """The value, or None where there is none: :class:`mountd.highlevel.binding.UnionFUSE` answers that with
        ENODATA without an exception on the way (fusepy's own ``getxattr`` is not used)."""
        return self.fs.xattr_or_none(_rel(path), name)

    @_op
    def listxattr(self, path: str) -> list[str]:
        return self.fs.listxattr(_rel(path))

    @_op
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.fs.setxattr(_rel(path), name, value, options)
        return 0

    @_op
    def removexattr(self, path: str, name: str) -> int:
        self.fs.removexattr(_rel(path), name)
        return 0

    # -- namespace -------------------------------------------------------------------------------------------
    @_op
    def mkdir(self, path: str, mode: int) -> int:
        uid, gid, _ = fuse_get_context()
        self.fs.mkdir(_rel(path), mode, uid, gid, self._umask())
        return 0

    @_op
    def mknod(self, path: str, mode: int, dev: int) -> int:
        uid, gid, _ = fuse_get_context()
        self.fs.mknod(_rel(path), mode, dev, uid, gid, self._umask())
        return 0

    def _umask(self) -> int:
        """The caller's umask where the kernel left it to us (POSIX ACLs on: FUSE_CAP_DONT_MASK), else 0 (the
        kernel applied it already)."""
        return request_umask() if self.posix_acl else 0

    @_op
    def symlink(self, target: str, source: str) -> int:
        uid, gid, _ = fuse_get_context()
        self.fs.symlink(source, _rel(target), uid, gid)
        return 0

    @_op
    def link(self, target: str, source: str) -> int:
        self.fs.link(_rel(source), _rel(target))
        self.service.wait_invalidations()  # the other names' nlink and ctime, before the caller sees it done
        return 0

    @_op
    def unlink(self, path: str) -> int:
        self.fs.unlink(_rel(path))
        self.service.wait_invalidations()  # the other names' nlink and ctime, before the caller sees it done
        return 0

    @_op
    def rmdir(self, path: str) -> int:
        self.fs.rmdir(_rel(path))
        return 0

    @_op
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self.fs.rename(_rel(old), _rel(new), flags)
        self.service.wait_invalidations()  # a replaced hard link's other names, before the caller sees it done
        return 0

    @_op
    def chmod(self, path: str, mode: int) -> int:
        self.fs.chmod(_rel(path), mode)
        return 0

    @_op
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.fs.chown(_rel(path), uid, gid)
        return 0

    @_op
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        atime, mtime = times if times is not None else (None, None)
        self.fs.utimens(_rel(path), atime, mtime)
        return 0

    @_op
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if fh is not None and fh in self.handles:
            self.fs.ftruncate(self.handles[fh], length)
            self._changed_through(self.handles[fh])
        elif path is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        else:
            self.fs.truncate(_rel(path), length)
        return 0

    # -- files ---------------------------------------------------------------------------------------------------
    def _flags(self, flags: int) -> int:
        # The kernel's open for execve carries its internal __FMODE_EXEC bit, which openat2 refuses.
        flags &= ~FMODE_EXEC
        # With the writeback cache the kernel also reads through a descriptor opened write-only (to fill
        # partial pages): such a file is opened for reading and writing.
        if self.writeback_cache and (flags & os.O_ACCMODE) == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    @_op
    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        uid, gid, _ = fuse_get_context()
        return self._track(self.fs.create(_rel(path), self._flags(flags), mode, uid, gid, self._umask()))

    @_op
    def open(self, path: str, flags: int) -> int:
        """Open; first the invalidations earlier requests queued reach the kernel (at most
        :data:`mountd.service.INVALIDATION_WAIT`): after a write through one name of a hard link, an open of
        another name then reads the new data and size, not what the kernel had cached for that name."""
        self.service.wait_invalidations()
        return self._track(self.fs.open(_rel(path), self._flags(flags)))

    @_op
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.fs.read(self._handle(fh), size, offset)

    @_op
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        """Write; a file of several links has its other names' kernel caches dropped before the caller sees
        it done (libfuse's path layer gives every reply the mount's attribute timeout)."""
        handle = self._handle(fh)
        written = self.fs.write(handle, data, offset)
        self._changed_through(handle)
        return written

    def _changed_through(self, handle: Handle) -> None:
        """After a change through ``handle``: the other names of its file (if it has several links) drop
        their kernel caches before the caller sees the change done."""
        self.fs.changed_through(handle)
        self.service.wait_invalidations()

    @_op
    def flush(self, path: str | None, fh: int) -> int:
        self._handle(fh)
        return 0

    @_op
    def release(self, path: str | None, fh: int) -> int:
        self.service.release(fh)
        return 0

    @_op
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.fsync(self._handle(fh), bool(datasync))
        return 0

    @_op
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        return 0

    @_op
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        handle = self._handle(fh)
        self.fs.fallocate(handle, mode, offset, size)
        self._changed_through(handle)
        return 0

"""Every opcode the kernel sends -> one :class:`unionfs.fs.union.UnionFS` call -> the reply.

The errno rules are those of the fusepy frontend: an ``OSError`` from the core is answered with its errno,
any other exception is logged with its traceback and answered with EIO.  Optional operations this daemon
does not implement (locks, ioctl, poll, bmap, lseek, copy_file_range, statx, tmpfile, syncfs) answer ENOSYS,
after which the kernel does them itself or stops asking.

Node ids exist only here and in :mod:`mountd.lowlevel.nodes`; the core is called with union paths.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import stat as stat_mod
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple, NoReturn

from mountd import logs
from mountd.lowlevel import abi
from mountd.lowlevel.nodes import NodeTable
from mountd.lowlevel.passthrough import Passthrough, Stale
from mountd.lowlevel.session import Request, Session
from mountd.service import MountService
from unionfs.fs.attr import Attr
from unionfs.fs.fsio import RENAME_EXCHANGE
from unionfs.fs.orphan import Orphan
from unionfs.fs.union import UTIME_NOW, UTIME_OMIT, Handle, UnionFS

log = logs.log
_clock = time.perf_counter_ns

FMODE_EXEC = 0x20
_PLUS_CHUNK = 16
"""Entries whose attributes a READDIRPLUS reply reads at a time (about what one reply holds)."""
KEPT_NODE_LISTINGS = 64
"""Listings of directories read without a handle (fh 0: no OPENDIR) kept between a READDIR at offset 0 and
the one that reaches the end; a reader that stops half-way leaves one, and the oldest go beyond this bound."""

QUICK_OPCODES = frozenset({
    abi.LOOKUP, abi.GETATTR, abi.GETXATTR, abi.LISTXATTR, abi.READLINK, abi.STATFS, abi.ACCESS, abi.FORGET,
    abi.BATCH_FORGET, abi.OPENDIR, abi.READDIR, abi.READDIRPLUS, abi.RELEASEDIR, abi.FLUSH, abi.INIT,
    abi.DESTROY, abi.FSYNCDIR, abi.RELEASE,
})
"""Answered by the reader itself: they read cached or small state and never wait for a copy-up's data.
RELEASE is one of them: ``close(2)`` returns before the kernel sends it, and until it is answered the
daemon holds the host file open (a remount read-only of the upper filesystem would see it busy)."""

CHANGE_OPCODES = frozenset({
    abi.CREATE, abi.MKDIR, abi.MKNOD, abi.SYMLINK, abi.UNLINK, abi.RMDIR, abi.RENAME, abi.RENAME2, abi.LINK,
    abi.SETATTR, abi.SETXATTR, abi.REMOVEXATTR, abi.OPEN, abi.WRITE,
})
"""Answered by the reader itself when they are quick (:meth:`Dispatcher.try_now`): a change that copies at
most :data:`QUICK_COPY_BYTES` of file data up first, a WRITE of at most :data:`QUICK_WRITE_BYTES`, and
never while the write gate is paused or invalidations wait to be sent.  A hand-off to a worker costs two
thread wake-ups, more than such a change itself."""
QUICK_COPY_BYTES: Final = 256 << 10
QUICK_WRITE_BYTES: Final = 128 << 10

NO_REPLY = frozenset({abi.FORGET, abi.BATCH_FORGET})
REPLIED: Any = object()
"""Returned by a handler that wrote its reply itself."""


class _Later(BaseException):
    """Raised on the reader by a change that would have to wait (before it changed anything): a worker takes
    the request over.  Not an Exception: the handlers' error handling lets it through."""


class Settings(NamedTuple):
    """What the mount options decide for the protocol frontend."""

    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    negative_timeout: float = 3600.0
    kernel_cache: bool = True
    direct_io: bool = False
    writeback_cache: bool = False
    readdirplus: str = "1"
    posix_acl: bool = False
    max_write: int = 1 << 20
    passthrough: str = "off"
    """on, all or off (``-o passthrough=``; see :class:`Passthrough`)."""
    max_stack_depth: int = 1
    dir_cache: bool = False
    """Directory listings kept in the kernel's page cache (``dir_cache=``): NO_OPENDIR_SUPPORT where the kernel
    offers it (OPENDIR answers ENOSYS, every opendir then costs no request and caches), else FOPEN_CACHE_DIR in
    the OPENDIR reply."""
    spin: str = "auto"
    """The reader's polling after a request: "auto", "on" or "off" (:class:`mountd.lowlevel.session.Session`)."""


Entry = tuple[str, bytes, int, int, int]
"""One entry of a listing: name, encoded name, type bits, st_ino, its offset."""
_FIRST_OFFSET = 3
"""The offsets of names start here: "." is 1, ".." is 2 (an offset is that of the entry *after* which a
reader resumes; 0 is the start)."""
_OFFSET_MASK = (1 << 62) - 1


class Listing(NamedTuple):
    """A directory's entries in offset order ("." and ".." first), with their offsets."""

    entries: list[Entry]
    offsets: list[int]

    def start(self, offset: int) -> int:
        """The index of the first entry after ``offset``."""
        return bisect.bisect_right(self.offsets, offset)


EMPTY_LISTING = Listing([], [])


def _listing_of(ino: int, children: list[tuple[str, int, int]]) -> Listing:
    """The listing of a directory (``st_ino`` ``ino``) with ``children`` as ``(name, type bits, st_ino)``.

    An entry's offset is a hash of its name (as ext4's hashed directories do), and the entries are in offset
    order: a reader resumes after the same name in any listing of the directory, also when names were added
    or removed since it began, or when its listing is another reader's (no OPENDIR: readers of one node share
    listings, and the kernel's cached listing is shared by all of them).  Python's hash is fixed for the life
    of the daemon, which is as long as an offset has to mean something.  The rare collision takes the next
    free offset."""
    keyed = sorted((_FIRST_OFFSET + (hash(encoded) & _OFFSET_MASK), encoded, name, kind, child_ino)
                   for name, kind, child_ino in children for encoded in (os.fsencode(name),))
    entries: list[Entry] = [(".", b".", stat_mod.S_IFDIR, ino, 1), ("..", b"..", stat_mod.S_IFDIR, 1, 2)]
    offsets = [1, 2]
    last = 2
    for off, encoded, name, kind, child_ino in keyed:
        off = max(off, last + 1)
        entries.append((name, encoded, kind, child_ino, off))
        offsets.append(off)
        last = off
    return Listing(entries, offsets)


def _name(body: bytes, start: int = 0) -> tuple[str, int]:
    """The NUL-terminated name at ``start`` and the offset after its NUL."""
    end = body.index(b"\0", start)
    return os.fsdecode(body[start:end]), end + 1


class Dispatcher:
    """The protocol frontend's request handlers for one mount."""

    def __init__(self, fs: UnionFS, service: MountService, session: Session, settings: Settings, *,
                 on_init: Callable[[], None] | None = None, passthrough: Passthrough | None = None) -> None:
        self.fs = fs
        self.service = service
        self.session = session
        self.settings = settings
        self.nodes = NodeTable()
        self.on_init = on_init
        self.negotiated: abi.Negotiated | None = None
        self._entry_valid = abi.split_seconds(settings.entry_timeout)
        self._attr_valid = abi.split_seconds(settings.attr_timeout)
        self._negative_valid = abi.split_seconds(settings.negative_timeout)
        self._dir_handles = itertools.count(1)
        self._listings: dict[int, Listing] = {}
        """Listings being read, by directory handle (from OPENDIR)."""
        self._node_listings: dict[int, Listing] = {}
        """Listings being read without a handle (no OPENDIR: fh 0), by node, shared by its readers."""
        self._listings_lock = threading.Lock()
        self._fh_nodes: dict[int, tuple[int, bool | None]] = {}
        """Open file -> (its node, whether it has a passthrough backing; None: not a regular file)."""
        self.passthrough = passthrough if passthrough is not None else Passthrough(
            session.fd, enabled=False, reason="off")
        self._posix_acl = False
        self._counts: dict[int, list[int]] = {}
        self._reader_changing = 0
        """The reader's thread id while it answers a change itself (:meth:`try_now`), else 0."""
        self._read_buffer = memoryview(bytearray(settings.max_write))
        """The reader's buffer for READs answered from the page cache (:meth:`try_now`; reader only)."""
        self._handlers: dict[int, Callable[[Request], Any]] = {
            abi.INIT: self.op_init, abi.LOOKUP: self.op_lookup, abi.FORGET: self.op_forget,
            abi.BATCH_FORGET: self.op_batch_forget, abi.GETATTR: self.op_getattr, abi.SETATTR: self.op_setattr,
            abi.READLINK: self.op_readlink, abi.SYMLINK: self.op_symlink, abi.MKNOD: self.op_mknod,
            abi.MKDIR: self.op_mkdir, abi.UNLINK: self.op_unlink, abi.RMDIR: self.op_rmdir,
            abi.RENAME: self.op_rename, abi.RENAME2: self.op_rename2, abi.LINK: self.op_link,
            abi.OPEN: self.op_open, abi.READ: self.op_read, abi.WRITE: self.op_write,
            abi.STATFS: self.op_statfs, abi.RELEASE: self.op_release, abi.FSYNC: self.op_fsync,
            abi.SETXATTR: self.op_setxattr, abi.GETXATTR: self.op_getxattr, abi.LISTXATTR: self.op_listxattr,
            abi.REMOVEXATTR: self.op_removexattr, abi.FLUSH: self.op_flush, abi.OPENDIR: self.op_opendir,
            abi.READDIR: self.op_readdir, abi.READDIRPLUS: self.op_readdirplus,
            abi.RELEASEDIR: self.op_releasedir, abi.FSYNCDIR: self.op_empty, abi.ACCESS: self.op_access,
            abi.CREATE: self.op_create, abi.FALLOCATE: self.op_fallocate, abi.DESTROY: self.op_empty,
        }

    # -- the session's two questions ----------------------------------------------------------------------
    def is_quick(self, request: Request) -> bool:
        return request.opcode in QUICK_OPCODES

    def try_now(self, request: Request) -> bool:
        """Answer a request that is not quick by nature on the reader, where that cannot block for long: a
        READ of data the host's page cache holds, a quick change (:data:`CHANGE_OPCODES`).  False: a worker
        must answer it (nothing was sent, nothing changed)."""
        opcode = request.opcode
        if opcode == abi.READ:
            return self._read_now(request)
        if opcode not in CHANGE_OPCODES or self.service.invalidations_pending or not self._quick_change(request):
            return False
        with self.fs.gate.entered() as inside:
            if not inside:
                return False  # paused for a commit: a worker waits, the reader goes on
            self._reader_changing = threading.get_ident()
            try:
                self.handle(request)
            except _Later:
                return False
            finally:
                self._reader_changing = 0
        return True

    def _quick_change(self, request: Request) -> bool:
        """Is this change quick enough for the reader (see :data:`CHANGE_OPCODES`)?"""
        opcode, body = request.opcode, request.body
        if opcode in (abi.CREATE, abi.MKDIR, abi.MKNOD, abi.SYMLINK, abi.UNLINK, abi.RMDIR):
            return True  # a new object, or a name removed: no file data moves
        if opcode == abi.WRITE:
            return bool(abi.WRITE_IN.unpack_from(body, 0)[2] <= QUICK_WRITE_BYTES)
        if opcode == abi.OPEN and abi.OPEN_IN.unpack_from(body, 0)[0] & (os.O_ACCMODE | os.O_TRUNC) == os.O_RDONLY:
            return True
        if opcode == abi.SETATTR:
            valid, _, fh = abi.SETATTR_IN.unpack_from(body, 0)[:3]
            handle = self.service.handles.get(fh) if valid & abi.FATTR_FH else None
            if handle is not None and handle.on_upper:
                return True
        paths: list[str | None]
        try:
            if opcode in (abi.RENAME, abi.RENAME2):
                start = abi.RENAME_IN.size if opcode == abi.RENAME else abi.RENAME2_IN.size
                old, end = _name(body, start)
                paths = [self.nodes.child_path(request.nodeid, old)]
                newdir, flags = abi.RENAME2_IN.unpack_from(body, 0)[:2] if opcode == abi.RENAME2 else (0, 0)
                if flags & RENAME_EXCHANGE:
                    paths.append(self.nodes.child_path(newdir, _name(body, end)[0]))
            elif opcode == abi.LINK:
                paths = [self.nodes.path(abi.LINK_IN.unpack_from(body, 0)[0])]
            else:
                paths = [self.nodes.path(request.nodeid)]
            return all(path is not None and self.fs.copy_up_bytes(path) <= QUICK_COPY_BYTES for path in paths)
        except (OSError, ValueError, struct.error):
            return False  # a worker gives the answer

    def _read_now(self, request: Request) -> bool:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(request.body, 0)
        handle = self.service.handles.get(fh)
        if handle is None or size > len(self._read_buffer):
            return False
        start = _clock()
        view = self._read_buffer[:size]
        try:
            count = self.fs.read_cached(handle, view, offset)
        except OSError:
            return False  # the worker's read says why
        if count is None:
            return False
        self.session.reply_one(request.unique, view[:count])
        counts = self._counts.get(abi.READ) or self._counts_of(abi.READ)
        counts[0] += 1
        counts[1] += _clock() - start
        return True

    def handle(self, request: Request) -> None:
        """Answer one request (FORGETs get no answer).  A handler answers by returning the reply's body
        (bytes, a list of parts, None for an empty one), :data:`REPLIED`, an ``int`` errno (an expected
        negative answer, without the cost of an exception) or by raising OSError."""
        opcode = request.opcode
        counts = self._counts.get(opcode)
        if counts is None:
            counts = self._counts_of(opcode)
        start = _clock()
        failed = 1
        counted = True
        try:
            handler = self._handlers.get(opcode)
            if handler is None:
                self.session.reply_error(request.unique, errno.ENOSYS)
                return
            result = handler(request)
            if type(result) is int:
                self._answer(request, self.session.reply_error, result)
                return
            failed = 0
            if result is REPLIED or opcode in NO_REPLY:
                return
            self._answer(request, self._reply, result)
        except _Later:
            counted = False
            raise
        except OSError as exc:
            code = exc.errno if isinstance(exc.errno, int) and 0 < exc.errno < 4096 else errno.EIO
            if opcode not in NO_REPLY:
                self._answer(request, self.session.reply_error, code)
        except Exception:
            log.exception("unexpected error in %s", abi.OPCODE_NAMES.get(opcode, opcode))
            if opcode not in NO_REPLY:
                self.session.reply_error(request.unique, errno.EIO)
        finally:
            if counted:
                counts[0] += 1
                counts[1] += _clock() - start
                counts[2] += failed

    def _reply(self, unique: int, result: Any) -> None:
        if result is None:
            self.session.reply_one(unique, b"")
        elif type(result) is list:
            self.session.reply(unique, *result)
        else:
            self.session.reply_one(unique, result)

    def _answer(self, request: Request, send: Callable[[int, Any], None], result: Any) -> None:
        """Send a change's answer (``send(unique, result)``: its reply, or its error) once the kernel cache
        invalidations it queued are sent: a change through one name of a hard link reaches the kernel's
        caches of the other names, a directory it copied up on the way shows its new attributes, before the
        caller sees it done.  A failing change counts too: it may have copied up before it failed (setxattr
        with XATTR_REPLACE of a name the object lacks), and the caller's next stat may be answered from the
        kernel's cache alone.  Bounded, and never on the reader, which must stay free: a change answered
        there leaves the wait and its answer to a worker.  Most answers wait for nothing: no closure is
        built for them."""
        if request.opcode not in QUICK_OPCODES and self.service.invalidations_pending:
            if self._reader_changing == threading.get_ident():
                self.session.defer(lambda: self._send_after_invalidations(send, request.unique, result))
                return
            self.service.wait_invalidations()
        send(request.unique, result)

    def _send_after_invalidations(self, send: Callable[[int, Any], None], unique: int, result: Any) -> None:
        """On a worker: the answer of a change the reader made, once the invalidations it queued are sent."""
        self.service.wait_invalidations()
        send(unique, result)

    def _wait_invalidations(self) -> None:
        """Wait until the invalidations queued so far are sent; on the reader (which must never wait for
        them) :class:`_Later`, before anything changed: the request goes to a worker."""
        if self.service.invalidations_pending:
            if self._reader_changing == threading.get_ident():
                raise _Later
            self.service.wait_invalidations()

    def _counts_of(self, opcode: int) -> list[int]:
        """The ``[calls, total ns, errors]`` of ``opcode`` in ``unionfs stats`` (shared with the service)."""
        counts = self.service.op_stats.setdefault(abi.OPCODE_NAMES.get(opcode, str(opcode)), [0, 0, 0])
        self._counts[opcode] = counts
        return counts

    # -- helpers ----------------------------------------------------------------------------------------------
    def _path(self, nodeid: int) -> str:
        """The union path of a node; ENOENT when its name is gone."""
        path = self.nodes.path(nodeid)
        if path is None:
            self.nodes.check(nodeid)  # ESTALE for an unknown node
            self._gone(nodeid)
        return path

    def _gone(self, nodeid: int) -> NoReturn:
        """Fail a request that needs the name of ``nodeid``, which has none (:meth:`NodeTable.gone_errno`)."""
        code = self.nodes.gone_errno(nodeid)
        raise OSError(code, os.strerror(code))

    def _orphan_or_path(self, nodeid: int) -> Orphan | str:
        """The union path of a node, or the object it holds once its name is gone; ENOENT for neither."""
        path = self.nodes.path(nodeid)
        if path is not None:
            return path
        orphan = self._orphan(nodeid)
        if orphan is None:
            self._gone(nodeid)
        return orphan

    def _attr_valid_for(self, attrs: Attr, nlink: int | None = None) -> tuple[int, int]:
        """How long the kernel may keep ``attrs``: the mount's attribute timeout, but not at all for a file of
        several links, nor for one that a node whose name is gone still holds.  Its names (and such a node)
        are nodes of their own, and a change through one of them that the daemon does not see (a write
        passed through to the backing file) would leave the others' attributes stale: a listing kept by the
        kernel no longer refreshes them with every READDIRPLUS."""
        links = attrs.st_nlink if nlink is None else nlink
        if links > 1 and not stat_mod.S_ISDIR(attrs.st_mode):
            return 0, 0
        held = self.nodes.held_inos
        if held and attrs.st_ino in held:
            return 0, 0
        return self._attr_valid

    def _entry(self, nodeid: int, attrs: Attr) -> bytes:
        ev, evn = self._entry_valid
        av, avn = self._attr_valid_for(attrs)
        return abi.ENTRY_OUT_HEAD.pack(nodeid, 0, ev, av, evn, avn) + abi.pack_attr(attrs)

    def _attr_out(self, attrs: Attr, *, nlink: int | None = None, nodeid: int | None = None) -> bytes:
        """The ``fuse_attr_out`` of ``attrs`` (of node ``nodeid``, if given: one whose name is gone gets them
        with no timeout, since a change through another name of its object, or a new name given to it, is
        reported by path and cannot reach it)."""
        if nodeid is not None and self.nodes.path(nodeid) is None:
            av, avn = 0, 0
        else:
            av, avn = self._attr_valid_for(attrs, nlink)
        return abi.ATTR_OUT_HEAD.pack(av, avn, 0) + abi.pack_attr(attrs, nlink=nlink)

    def _new_entry(self, parent: int, name: str, path: str) -> bytes:
        """The entry reply for a name just created (or linked) at ``path``; counts the kernel's lookup."""
        attrs = self.fs.getattr(path)
        return self._entry(self.nodes.remember(parent, name), attrs)

    def _umask(self, umask: int) -> int:
        """The caller's umask where the kernel left it to us (POSIX ACLs on), else 0 (applied already)."""
        return umask if self._posix_acl else 0

    def _open_flags(self, flags: int) -> int:
        flags &= ~FMODE_EXEC  # the kernel's internal bit for execve's open: openat2 refuses it
        if self.settings.writeback_cache and (flags & os.O_ACCMODE) == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR  # the kernel reads through it to fill pages
        return flags

    def _fopen(self) -> int:
        """The open flags of a file in page-cache mode."""
        flags = 0
        if self.settings.kernel_cache:
            flags |= abi.FOPEN_KEEP_CACHE
        if self.settings.direct_io:
            flags |= abi.FOPEN_DIRECT_IO
        return flags

    def _orphan(self, nodeid: int) -> Orphan | None:
        """The object a node whose name is gone still holds (None: it has a name, or was given up)."""
        self.nodes.check(nodeid)  # ESTALE for an unknown node
        return self.nodes.orphan(nodeid)

    def _open_handle_of(self, nodeid: int) -> Handle | None:
        """An open file of node ``nodeid`` (a writable one first), for a node whose name is gone."""
        self.nodes.check(nodeid)  # ESTALE for an unknown node
        best: Handle | None = None
        for fh in self.nodes.open_fhs(nodeid):
            handle = self.service.handles.get(fh)
            if handle is not None and (best is None or (handle.on_upper and not best.on_upper)):
                best = handle
        return best

    # -- INIT -------------------------------------------------------------------------------------------------
    def wanted_flags(self) -> int:
        settings = self.settings
        wanted = (abi.ASYNC_READ | abi.ATOMIC_O_TRUNC | abi.BIG_WRITES | abi.MAX_PAGES | abi.AUTO_INVAL_DATA
                  | abi.PARALLEL_DIROPS | abi.CACHE_SYMLINKS)
        if settings.readdirplus != "0":
            wanted |= abi.DO_READDIRPLUS
            if settings.readdirplus == "auto":
                wanted |= abi.READDIRPLUS_AUTO
        if settings.writeback_cache:
            wanted |= abi.WRITEBACK_CACHE
        if settings.posix_acl:
            wanted |= abi.POSIX_ACL | abi.DONT_MASK
        if settings.dir_cache:
            wanted |= abi.NO_OPENDIR_SUPPORT
        if self.passthrough.enabled and not settings.writeback_cache:
            wanted |= abi.PASSTHROUGH  # the kernel drops it silently next to the writeback cache
        return wanted

    def op_init(self, request: Request) -> Any:
        major, minor, max_readahead, offered = abi.parse_init(request.body)
        if major != abi.KERNEL_MAJOR or minor < abi.MIN_MINOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is too old (7.{abi.MIN_MINOR} needed)")
        minor = min(minor, abi.KERNEL_MINOR)
        flags = abi.negotiate(offered, self.wanted_flags())
        max_write = self.settings.max_write if flags & abi.MAX_PAGES else min(self.settings.max_write, 128 << 10)
        self.negotiated = abi.Negotiated(minor, flags, max_write, max_readahead)
        self._posix_acl = bool(flags & abi.POSIX_ACL)
        if self.passthrough.enabled and not flags & abi.PASSTHROUGH:
            self.passthrough.disable("writeback_cache is on" if self.settings.writeback_cache
                                     else "the kernel does not offer it (6.9 or later needed)")
        log.debug("INIT: protocol 7.%d, offered %#x, using %#x", minor, offered, flags)
        reply = abi.init_reply(minor=minor, max_readahead=max_readahead, flags=flags, max_write=max_write,
                               max_pages=max(1, max_write // 4096),
                               max_stack_depth=self.settings.max_stack_depth if flags & abi.PASSTHROUGH else 0)
        self.session.reply(request.unique, reply)
        if self.on_init is not None:
            # after the reply: the kernel has the answer before anyone is told the mount works
            callback, self.on_init = self.on_init, None
            callback()
        return REPLIED

    # -- lookups and attributes -------------------------------------------------------------------------------
    def op_lookup(self, request: Request) -> bytes:
        name, _ = _name(request.body)
        path = self.nodes.child_path(request.nodeid, name)
        try:
            attrs = self.fs.getattr(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.settings.negative_timeout > 0:
                ev, evn = self._negative_valid
                return abi.ENTRY_OUT_HEAD.pack(0, 0, ev, 0, evn, 0) + bytes(abi.ATTR.size)
            raise
        return self._entry(self.nodes.remember(request.nodeid, name), attrs)

    def op_forget(self, request: Request) -> None:
        (count,) = abi.FORGET_IN.unpack_from(request.body, 0)
        self.nodes.forget(request.nodeid, count)

    def op_batch_forget(self, request: Request) -> None:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(request.body, 0)
        offset = abi.BATCH_FORGET_IN.size
        for _ in range(count):
            nodeid, n = abi.FORGET_ONE.unpack_from(request.body, offset)
            offset += abi.FORGET_ONE.size
            self.nodes.forget(nodeid, n)

    def _attrs_of(self, nodeid: int) -> tuple[Attr, int | None]:
        """(attributes, nlink override) of a node: by its path, or through an open file once it has none."""
        path = self.nodes.path(nodeid)
        if path is not None:
            try:
                return self.fs.getattr(path), None
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        orphan = self._orphan(nodeid)  # also where the name went while this request ran
        if orphan is not None:
            return self.fs.orphan_getattr(orphan), None
        handle = self._open_handle_of(nodeid)
        if handle is None:
            if path is None:
                self._gone(nodeid)
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        # as the kernel's overlayfs: what the open file's own inode says (a lower file keeps its links)
        return self.fs.fgetattr(handle), None

    def op_getattr(self, request: Request) -> bytes:
        attrs, nlink = self._attrs_of(request.nodeid)
        return self._attr_out(attrs, nlink=nlink, nodeid=request.nodeid)

    def op_setattr(self, request: Request) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = abi.SETATTR_IN.unpack_from(request.body, 0)
        path = self.nodes.path(request.nodeid)
        handle = self.service.handles.get(fh) if valid & abi.FATTR_FH else None
        a_ns: int | None = UTIME_OMIT
        m_ns: int | None = UTIME_OMIT
        if valid & abi.FATTR_ATIME:
            a_ns = UTIME_NOW if valid & abi.FATTR_ATIME_NOW else atime * 1_000_000_000 + atimensec
        if valid & abi.FATTR_MTIME:
            m_ns = UTIME_NOW if valid & abi.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimensec
        new_uid = uid if valid & abi.FATTR_UID else -1
        new_gid = gid if valid & abi.FATTR_GID else -1
        orphan = self._orphan(request.nodeid) if path is None else None
        if orphan is not None:
            if valid & abi.FATTR_SIZE and handle is not None and handle.on_upper:
                # ftruncate(2): through the open file, as the kernel's overlayfs (a new mtime even at
                # the same size)
                valid &= ~abi.FATTR_SIZE
                self.fs.orphan_setattr(orphan, mode=mode if valid & abi.FATTR_MODE else None, uid=new_uid,
                                       gid=new_gid)
                self.fs.ftruncate(handle, size)
                if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
                    self.fs.orphan_setattr(orphan, atime_ns=a_ns, mtime_ns=m_ns)
            else:
                self.fs.orphan_setattr(orphan, mode=mode if valid & abi.FATTR_MODE else None, uid=new_uid,
                                       gid=new_gid, size=size if valid & abi.FATTR_SIZE else None,
                                       atime_ns=a_ns, mtime_ns=m_ns)
        elif path is None:
            self._setattr_gone(request.nodeid, handle, valid, mode, new_uid, new_gid, size, a_ns, m_ns)
        else:
            if valid & abi.FATTR_MODE:
                self.fs.chmod(path, mode)
            if valid & (abi.FATTR_UID | abi.FATTR_GID):
                self.fs.chown(path, new_uid, new_gid)
            if valid & abi.FATTR_SIZE:
                if handle is not None and handle.on_upper:
                    self.fs.ftruncate(handle, size)
                else:
                    self.fs.truncate(path, size)
            if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
                self.fs.utimens(path, a_ns, m_ns)
            if not valid & (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_SIZE | abi.FATTR_ATIME
                            | abi.FATTR_MTIME):
                # chown(f, -1, -1) and the like: the kernel's overlayfs copies up on every setattr
                self.fs.chown(path, -1, -1)
        attrs, nlink = self._attrs_of(request.nodeid)
        return self._attr_out(attrs, nlink=nlink, nodeid=request.nodeid)

    def _setattr_gone(self, nodeid: int, handle: Handle | None, valid: int, mode: int, uid: int, gid: int,
                      size: int, a_ns: int | None, m_ns: int | None) -> None:
        """SETATTR of a node whose name is gone: through its open upper file (fchmod, fchown, ftruncate,
        futimens), as on the kernel's overlayfs; a lower file can no longer be copied up (ENOENT)."""
        if handle is None:
            handle = self._open_handle_of(nodeid)
        if handle is None or not handle.on_upper:
            self._gone(nodeid)
        fd = handle.fd
        if valid & abi.FATTR_MODE:
            os.fchmod(fd, stat_mod.S_IMODE(mode))
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            if self.fs.idmap is not None:
                uid, gid = self.fs.idmap.stored(uid, gid)
            os.fchown(fd, uid, gid)
        if valid & abi.FATTR_SIZE:
            self.fs.ftruncate(handle, size)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
            st = os.fstat(fd)
            now = time.time_ns()

            def pick(value: int | None, current: int) -> int:
                if value is None or value == UTIME_NOW:
                    return now
                return current if value == UTIME_OMIT else value

            os.utime(fd, ns=(pick(a_ns, st.st_atime_ns), pick(m_ns, st.st_mtime_ns)))

    def op_readlink(self, request: Request) -> bytes:
        orphan = self._orphan_or_path(request.nodeid)
        target = self.fs.orphan_readlink(orphan) if isinstance(orphan, Orphan) else self.fs.readlink(orphan)
        return os.fsencode(target)

    def op_statfs(self, request: Request) -> bytes:
        sv = self.fs.statfs()
        return abi.STATFS_OUT.pack(sv["f_blocks"], sv["f_bfree"], sv["f_bavail"], sv["f_files"], sv["f_ffree"],
                                   sv["f_bsize"], sv["f_namemax"], sv["f_frsize"], 0)

    def op_access(self, request: Request) -> None:
        mask, _ = abi.ACCESS_IN.unpack_from(request.body, 0)
        orphan = self._orphan_or_path(request.nodeid)
        if isinstance(orphan, Orphan):
            self.fs.orphan_access(orphan, mask)
        else:
            self.fs.access(orphan, mask)

    # -- xattrs -----------------------------------------------------------------------------------------------
    def op_getxattr(self, request: Request) -> bytes | int:
        size, _ = abi.GETXATTR_IN.unpack_from(request.body, 0)
        name, _ = _name(request.body, abi.GETXATTR_IN.size)
        orphan = self._orphan_or_path(request.nodeid)
        value = (self.fs.orphan_xattr_or_none(orphan, name) if isinstance(orphan, Orphan)
                 else self.fs.xattr_or_none(orphan, name))
        if value is None:
            return errno.ENODATA  # the common answer of a tree walk: no exception
        return self._sized(value, size)

    def op_listxattr(self, request: Request) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(request.body, 0)
        orphan = self._orphan_or_path(request.nodeid)
        names = self.fs.orphan_listxattr(orphan) if isinstance(orphan, Orphan) else self.fs.listxattr(orphan)
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    @staticmethod
    def _sized(data: bytes, size: int) -> bytes:
        """Answer a request with a buffer of ``size`` bytes: the length alone when ``size`` is 0, ERANGE when
        ``data`` does not fit, else ``data``."""
        if size == 0:
            return abi.GETXATTR_OUT.pack(len(data), 0)
        if len(data) > size:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        return data

    def op_setxattr(self, request: Request) -> None:
        size, flags = abi.SETXATTR_IN.unpack_from(request.body, 0)
        name, end = _name(request.body, abi.SETXATTR_IN.size)
        value = request.body[end:end + size]
        orphan = self._orphan_or_path(request.nodeid)
        if isinstance(orphan, Orphan):
            self.fs.orphan_setxattr(orphan, name, value, flags)
        else:
            self.fs.setxattr(orphan, name, value, flags)

    def op_removexattr(self, request: Request) -> None:
        name, _ = _name(request.body)
        orphan = self._orphan_or_path(request.nodeid)
        if isinstance(orphan, Orphan):
            self.fs.orphan_removexattr(orphan, name)
        else:
            self.fs.removexattr(orphan, name)

    # -- namespace --------------------------------------------------------------------------------------------
    def op_mknod(self, request: Request) -> bytes:
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(request.body, 0)
        name, _ = _name(request.body, abi.MKNOD_IN.size)
        path = self.nodes.child_path(request.nodeid, name)
        self.fs.mknod(path, mode, rdev, request.uid, request.gid, self._umask(umask))
        return self._new_entry(request.nodeid, name, path)

    def op_mkdir(self, request: Request) -> bytes:
        mode, umask = abi.MKDIR_IN.unpack_from(request.body, 0)
        name, _ = _name(request.body, abi.MKDIR_IN.size)
        path = self.nodes.child_path(request.nodeid, name)
        self.fs.mkdir(path, mode, request.uid, request.gid, self._umask(umask))
        return self._new_entry(request.nodeid, name, path)

    def op_symlink(self, request: Request) -> bytes:
        name, end = _name(request.body)
        target, _ = _name(request.body, end)
        path = self.nodes.child_path(request.nodeid, name)
        self.fs.symlink(target, path, request.uid, request.gid)
        return self._new_entry(request.nodeid, name, path)

    def op_link(self, request: Request) -> bytes:
        (old,) = abi.LINK_IN.unpack_from(request.body, 0)
        name, _ = _name(request.body, abi.LINK_IN.size)
        src = self._orphan_or_path(old)
        path = self.nodes.child_path(request.nodeid, name)
        if isinstance(src, Orphan):
            self.fs.orphan_link(src, path)  # linkat of /proc/self/fd of a descriptor whose name is gone
        else:
            self.fs.link(src, path)
        return self._new_entry(request.nodeid, name, path)

    def _pin(self, parent: int, name: str, path: str) -> Orphan | None:
        """The object at ``path`` pinned before its name goes, where the kernel holds a node for it: that
        node keeps answering (an open file, an open(2) that looked the name up already), as the kernel's
        overlayfs holds the inode."""
        return self.fs.pin(path) if self.nodes.held(parent, name) else None

    def _remove(self, request: Request, remove: Callable[[str], None]) -> None:
        name, _ = _name(request.body)
        path = self.nodes.child_path(request.nodeid, name)
        orphan = self._pin(request.nodeid, name, path)
        try:
            remove(path)
        except BaseException:
            if orphan is not None:
                orphan.close()
            raise
        self.nodes.detach(request.nodeid, name, orphan)

    def op_unlink(self, request: Request) -> None:
        self._remove(request, self.fs.unlink)

    def op_rmdir(self, request: Request) -> None:
        self._remove(request, self.fs.rmdir)

    def op_rename(self, request: Request) -> None:
        (newdir,) = abi.RENAME_IN.unpack_from(request.body, 0)
        self._rename(request, newdir, 0, abi.RENAME_IN.size)

    def op_rename2(self, request: Request) -> None:
        newdir, flags, _ = abi.RENAME2_IN.unpack_from(request.body, 0)
        self._rename(request, newdir, flags, abi.RENAME2_IN.size)

    def _rename(self, request: Request, newdir: int, flags: int, start: int) -> None:
        old, end = _name(request.body, start)
        new, _ = _name(request.body, end)
        src = self.nodes.child_path(request.nodeid, old)
        dst = self.nodes.child_path(newdir, new)
        replaced = None if flags & RENAME_EXCHANGE or src == dst else self._pin(newdir, new, dst)
        try:
            self.fs.rename(src, dst, flags)
        except BaseException:
            if replaced is not None:
                replaced.close()
            raise
        if flags & RENAME_EXCHANGE:
            self.nodes.exchange(request.nodeid, old, newdir, new)
            return
        if src != dst:
            self.nodes.detach(newdir, new, replaced)
            self.nodes.move(request.nodeid, old, newdir, new)

    # -- files ------------------------------------------------------------------------------------------------
    def _opened(self, nodeid: int, handle: Handle, flags: int) -> bytes:
        """Register an open file of ``nodeid``; the ``fuse_open_out`` that answers its open.  A regular file
        gets a passthrough backing where :class:`Passthrough` says so; ESTALE (after giving the name a new
        node) where the open cannot share the node's backing."""
        backing_id = 0
        regular = stat_mod.S_ISREG(os.fstat(handle.fd).st_mode)
        if regular:
            try:
                backing_id = self.passthrough.attach(nodeid, handle.fd, upper=handle.on_upper,
                                                     write=flags & os.O_ACCMODE != os.O_RDONLY)
            except Stale:
                self.fs.release(handle)
                self.nodes.give_up(nodeid)
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None
            except BaseException:
                self.fs.release(handle)
                raise
        fh = self.service.track(handle)
        self._fh_nodes[fh] = (nodeid, backing_id != 0 if regular else None)
        self.nodes.opened(nodeid, fh)
        if backing_id:
            if flags & os.O_ACCMODE != os.O_RDONLY and not self.passthrough.writes:
                # a writer sharing a reader's backing: its data through the daemon (DIRECT_IO overrides
                # PASSTHROUGH for read and write, mmap maps the backing)
                return abi.OPEN_OUT.pack(fh, abi.FOPEN_PASSTHROUGH | abi.FOPEN_DIRECT_IO, backing_id)
            return abi.OPEN_OUT.pack(fh, abi.FOPEN_PASSTHROUGH, backing_id)
        return abi.OPEN_OUT.pack(fh, self._fopen(), 0)

    def op_open(self, request: Request) -> bytes:
        flags, _ = abi.OPEN_IN.unpack_from(request.body, 0)
        path = self.nodes.path(request.nodeid)
        if path is None:
            orphan = self._orphan(request.nodeid)
            if orphan is None:
                # the name got a new node (see _opened) while this open was on its way: ESTALE makes the
                # kernel look the name up again
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            # the name went (unlink, rename over it) after the kernel looked it up: the open gets the
            # object it found, as on the kernel's overlayfs
            handle = self.fs.orphan_open(orphan, self._open_flags(flags))
            return self._opened(request.nodeid, handle, flags)
        self._wait_invalidations()
        try:
            handle = self.fs.open(path, self._open_flags(flags))
        except FileNotFoundError:
            orphan = self._orphan(request.nodeid)
            if orphan is None:
                raise
            handle = self.fs.orphan_open(orphan, self._open_flags(flags))  # the name went meanwhile
        return self._opened(request.nodeid, handle, flags)

    def op_create(self, request: Request) -> list[bytes]:
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(request.body, 0)
        name, _ = _name(request.body, abi.CREATE_IN.size)
        path = self.nodes.child_path(request.nodeid, name)
        handle = self.fs.create(path, self._open_flags(flags), mode, request.uid, request.gid, self._umask(umask))
        try:
            attrs = self.fs.getattr(path)
        except BaseException:
            self.fs.release(handle)
            raise
        nodeid = self.nodes.remember(request.nodeid, name)
        try:
            opened = self._opened(nodeid, handle, flags)
        except BaseException:
            self.nodes.forget(nodeid, 1)
            raise
        return [self._entry(nodeid, attrs), opened]

    def op_read(self, request: Request) -> bytes:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(request.body, 0)
        return self.fs.read(self.service.handle(fh), size, offset)

    def op_write(self, request: Request) -> bytes:
        fh, offset, size, write_flags, _, _, _ = abi.WRITE_IN.unpack_from(request.body, 0)
        data = request.body[abi.WRITE_IN.size:abi.WRITE_IN.size + size]
        handle = self.service.handle(fh)
        if write_flags & abi.WRITE_KILL_SUIDGID:
            # a direct write by a caller without CAP_FSETID: the kernel left the set-id bits to us
            mode = os.fstat(handle.fd).st_mode
            kill = stat_mod.S_ISUID | (stat_mod.S_ISGID if mode & stat_mod.S_IXGRP else 0)
            if mode & kill:
                os.fchmod(handle.fd, stat_mod.S_IMODE(mode) & ~kill)
        written = self.fs.write(handle, data, offset)
        return abi.WRITE_OUT.pack(written, 0)

    def op_flush(self, request: Request) -> None:
        fh, _, _, _ = abi.FLUSH_IN.unpack_from(request.body, 0)
        self.service.handle(fh)

    def op_release(self, request: Request) -> None:
        fh, _, _, _ = abi.RELEASE_IN.unpack_from(request.body, 0)
        # forget the handle number before its descriptor is closed: a concurrent open may get the same
        # number as soon as it is
        nodeid, backed = self._fh_nodes.pop(fh, (request.nodeid, None))
        self.nodes.closed(nodeid, fh)
        self.service.release(fh)
        if backed is not None:
            self.passthrough.detach(nodeid, backed=backed)

    def op_fsync(self, request: Request) -> None:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(request.body, 0)
        self.fs.fsync(self.service.handle(fh), bool(flags & abi.FSYNC_FDATASYNC))

    def op_fallocate(self, request: Request) -> None:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(request.body, 0)
        self.fs.fallocate(self.service.handle(fh), mode, offset, length)

    def op_empty(self, request: Request) -> None:
        return None

    # -- directories --------------------------------------------------------------------------------------------
    @property
    def no_opendir(self) -> bool:
        """Does the kernel open directories without OPENDIR (NO_OPENDIR_SUPPORT negotiated)?"""
        return self.negotiated is not None and bool(self.negotiated.flags & abi.NO_OPENDIR_SUPPORT)

    def op_opendir(self, request: Request) -> bytes | int:
        if self.no_opendir:
            # the kernel stops asking: every later opendir costs no request and keeps the listing in the
            # directory's page cache (FOPEN_KEEP_CACHE|FOPEN_CACHE_DIR, fh 0) until an invalidation
            return errno.ENOSYS
        self._orphan_or_path(request.nodeid)  # ENOENT for a directory whose name is gone, unless kept
        fh = next(self._dir_handles)
        flags = abi.FOPEN_KEEP_CACHE | abi.FOPEN_CACHE_DIR if self.settings.dir_cache else 0
        return abi.OPEN_OUT.pack(fh, flags, 0)

    def op_releasedir(self, request: Request) -> None:
        fh, _, _, _ = abi.RELEASE_IN.unpack_from(request.body, 0)
        with self._listings_lock:
            self._listings.pop(fh, None)

    def _listing(self, nodeid: int, fh: int, offset: int) -> Listing:
        """The listing of an open directory: taken at offset 0 and kept for the later offsets of the same
        handle.

        Without OPENDIR (fh 0) the readers of one node share one listing: taken anew at offset 0, dropped
        when a reader reaches its end (:meth:`_listing_done`), at most :data:`KEPT_NODE_LISTINGS` kept.  A
        later offset that finds none takes the listing again.  Offsets belong to names, not to positions
        (:func:`_listing_of`), so a reader resumes right in any listing of the directory."""
        kept, key = (self._listings, fh) if fh else (self._node_listings, nodeid)
        with self._listings_lock:
            listing = kept.get(key) if offset else None
        if listing is None:
            path = self.nodes.path(nodeid)
            if path is None:
                if self._orphan(nodeid) is None:
                    self._gone(nodeid)
                return EMPTY_LISTING  # a removed directory lists nothing, as on the kernel's overlayfs
            listing = _listing_of(self.fs.getattr(path).st_ino, self.fs.readdir(path))
            with self._listings_lock:
                kept.pop(key, None)  # re-inserted last: the oldest one goes first
                kept[key] = listing
                if len(self._node_listings) > KEPT_NODE_LISTINGS:
                    del self._node_listings[next(iter(self._node_listings))]
        return listing

    def _listing_done(self, nodeid: int, fh: int, start: int, listing: Listing) -> None:
        """A handle-less reader asked past the end of ``listing``: the listing it shared is let go."""
        if fh == 0 and start >= len(listing.entries):
            with self._listings_lock:
                if self._node_listings.get(nodeid) is listing:
                    del self._node_listings[nodeid]

    def op_readdir(self, request: Request) -> bytes:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(request.body, 0)
        listing = self._listing(request.nodeid, fh, offset)
        start = listing.start(offset)
        self._listing_done(request.nodeid, fh, start, listing)
        out: list[bytes] = []
        used = 0
        for _, encoded, kind, ino, off in itertools.islice(listing.entries, start, None):
            need = abi.dirent_size(encoded)
            if used + need > size:
                break
            out.append(abi.dirent(ino, off, kind, encoded))
            used += need
        return b"".join(out)

    def op_readdirplus(self, request: Request) -> bytes:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(request.body, 0)
        listing = self._listing(request.nodeid, fh, offset)
        index = listing.start(offset)
        self._listing_done(request.nodeid, fh, index, listing)
        entries = listing.entries
        out: list[bytes] = []
        used = 0
        if not entries:
            return b""
        path = self._path(request.nodeid)
        zero_entry = bytes(abi.ENTRY_OUT_SIZE)
        while index < len(entries):
            end = min(index + _PLUS_CHUNK, len(entries))
            names = [entries[i][0] for i in range(index, end) if i >= 2]
            try:
                found = iter(self.fs.getattr_children(path, names) if names else [])
            except OSError:  # the directory itself is gone since the listing was taken
                found = iter([None] * len(names))
            for i in range(index, end):
                name, encoded, kind, ino, off = entries[i]
                need = abi.DIRENTPLUS_HEAD_SIZE + ((len(encoded) + 7) & ~7)
                if used + need > size:
                    return b"".join(out)
                if i < 2:
                    out.append(zero_entry + abi.dirent(ino, off, kind, encoded))
                    used += need
                    continue
                attrs = next(found)
                if attrs is None:
                    continue  # gone since the listing was taken
                nodeid = self.nodes.remember(request.nodeid, name)
                out.append(self._entry(nodeid, attrs) + abi.dirent(attrs.st_ino, off, attrs.st_mode, encoded))
                used += need
            index = end
        return b"".join(out)

"""The UnionFS facade: POSIX-shaped operations over a layer stack, with the kernel overlayfs's semantics.

Paths are union paths relative to the root (``""`` is the root, ``"a/b"`` a child; the FUSE adapter strips
the leading ``/``).  Every method raises ``OSError(errno, message, path)`` on failure and nothing else; a
missing object is ENOENT.  Metadata operations are serialised by one lock; reads and writes on open handles
take no lock.  Callers: ``mountd.highlevel.operations`` and the tests.

The facade holds the POSIX rules of each operation and delegates the rest: resolution to
:class:`~unionfs.fs.lookup.Resolver` (over the merged directory states of the lookup cache), inode numbers and
hard-link names to :class:`~unionfs.fs.inodes.Inodes`, and every change of the upper layer (copy-up,
whiteouts, new objects, removal) to :class:`~unionfs.fs.upper.Upper`, which a read-only union has none of
(EROFS).  Attributes come back as :class:`~unionfs.fs.attr.Attr` records.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from unionfs.fs import copyup
from unionfs.fs.attr import Attr, attr_of
from unionfs.fs.cache import LookupCache
from unionfs.fs.dirstate import DirState
from unionfs.fs.fsio import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    HostDir,
    fallocate,
    fd_xattr,
    join,
    split,
)
from unionfs.fs.gate import WriteGate
from unionfs.fs.idmap import IdMap
from unionfs.fs.index import ORIGIN_XATTR, InodeIndex
from unionfs.fs.inodes import ORIGIN_TRUSTED, Inodes
from unionfs.fs.layers import WORK_SUBDIR, LayerStack
from unionfs.fs.lookup import NAME_MAX, Node, Resolver
from unionfs.fs.lookup import check_name as _check_name
from unionfs.fs.lookup import path_error as _err
from unionfs.fs.orphan import Orphan
from unionfs.fs.upper import Upper
from unionfs.fs.whiteout import (
    REDIRECT_MAX,
    WH_PREFIX,
    WhiteoutFormat,
    dir_is_opaque,
    dir_redirect,
    xattr_from_host,
    xattr_to_host,
)

S_IFDIR = stat_mod.S_IFDIR
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_F = TypeVar("_F", bound=Callable[..., Any])
REDIRECT_MODES = ("on", "follow", "nofollow", "off")
"""``redirect_dir`` as the kernel means it: ``on`` renames directories that have lower copies (recording
the move in a redirect xattr) and follows redirects; ``follow`` and ``off`` follow them but answer such a
rename with EXDEV (``off`` is ``follow`` as in the kernel built with ``redirect_always_follow``, Debian's);
``nofollow`` follows none (a lookup that would is EPERM) and renames none."""


class Handle:
    """An open file of the union: the host descriptor, the union path it was opened as, and its st_ino."""

    __slots__ = ("fd", "flags", "ino", "on_upper", "path")

    def __init__(self, fd: int, path: str, ino: int, on_upper: bool, flags: int = os.O_RDONLY) -> None:
        self.fd = fd
        self.path = path
        self.ino = ino
        self.on_upper = on_upper
        self.flags = flags

    def __repr__(self) -> str:
        return f"Handle(fd={self.fd}, path={self.path!r}, ino={self.ino}, on_upper={self.on_upper})"


def _mutating(fn: _F) -> _F:
    """Mark a method that changes the upper layer: it passes the write gate (held shut by a pause)."""

    @functools.wraps(fn)
    def wrapper(self: UnionFS, *args: Any, **kwargs: Any) -> Any:
        with self.gate.writing():
            return fn(self, *args, **kwargs)

    return cast(_F, wrapper)


class UnionFS:
    """A mounted union of ``stack``.  ``whiteout`` is ``auto``, ``kernel`` or ``oci``; ``volatile`` skips
    every fsync (as the kernel's ``volatile`` option does); ``redirect_dir`` is one of
    :data:`REDIRECT_MODES` (ValueError otherwise)."""

    def __init__(self, stack: LayerStack, *, whiteout: str = "auto", volatile: bool = False,
                 cache_entries: int = 1_000_000, idmap: IdMap | None = None, redirect_dir: str = "on",
                 index: bool = False) -> None:
        if redirect_dir not in REDIRECT_MODES:
            raise ValueError(f"redirect_dir={redirect_dir}: expected one of {', '.join(REDIRECT_MODES)}")
        self.stack = stack
        self.volatile = volatile
        self.redirect_dir = redirect_dir
        self.idmap = idmap if idmap is not None and not idmap.identity else None
        self.cache = LookupCache(cache_entries)
        self.resolver = Resolver.of_stack(stack, self.cache, follow_redirects=redirect_dir != "nofollow")
        self.lock = threading.RLock()
        self.gate = WriteGate()
        self.counters: dict[str, int] = {}
        self.invalidate: Callable[[str], None] = lambda path: None
        """Told the union path of every *other* name whose cached attributes/data an operation made stale
        (names of a hard-linked upper file).  The FUSE adapter forwards these to the kernel."""
        self.index: InodeIndex | None = None
        """The inode index (``index=on`` on a writable union; the kernel ignores it without an upper)."""
        if index and stack.upper is not None and stack.work is not None and stack.lowers:
            self.index = InodeIndex(upper=stack.upper.host, work=stack.work,
                                    lowers={layer.index: layer.host for layer in stack.lowers},
                                    order=stack.lower_indices)
            self.index.verify()  # before anything is written: a mismatch leaves the dirs as they were
        fmt = Upper.prepare(stack, whiteout=whiteout)  # mount-time I/O: cleans the workdir, probes the format
        if self.index is not None:
            if fmt is None or fmt.origin_xattr != ORIGIN_TRUSTED:
                raise OSError(errno.EINVAL, "index=on needs trusted.* xattrs in the upper and work dirs "
                                            "(the kernel refuses userxattr,index=on): mount with index=off")
            self.index.setup()
        self.inodes = Inodes(stack, self.cache, origin_xattr=fmt.origin_xattr if fmt else ORIGIN_TRUSTED,
                             notify=self._notify)
        self.upper: Upper | None = None if fmt is None else Upper(
            stack, fmt, resolver=self.resolver, cache=self.cache, inodes=self.inodes, volatile=volatile,
            notify=self._notify)
        if self.upper is not None:
            self.upper.opaque_new_dirs = redirect_dir == "on" or self.index is not None
            self.upper.index = self.index
            if self.index is not None:
                self.inodes.overlay_origin = self._overlay_origin_ino
        self._lower_handles: dict[str, set[int]] = {}
        """Read-only handles open on a lower file, by path: a copy-up moves them onto the upper copy, so that
        they see later writes (as the kernel's overlayfs does since 4.19)."""
        self._handles_by_fd: dict[int, Handle] = {}

    def close(self) -> None:
        self.stack.close()

    def _notify(self, path: str) -> None:
        self.invalidate(path)

    # ================================================================== helpers
    def _attrs(self, st: os.stat_result, ino: int, nlink: int | None = None) -> Attr:
        uid, gid = (st.st_uid, st.st_gid) if self.idmap is None else self.idmap.shown(st.st_uid, st.st_gid)
        return attr_of(st, ino=ino, uid=uid, gid=gid, nlink=nlink)

    def _writable(self) -> Upper:
        """The upper layer; EROFS on a union without one."""
        if self.upper is None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return self.upper

    def _host(self, node: Node) -> HostDir:
        return self.resolver.hosts[node.layer]

    def _needs_whiteout(self, parent: DirState, name: str) -> bool:
        """Would removing the upper copy of ``name`` let a lower one show through?"""
        return not parent.upper_opaque and name in parent.lower

    def pause(self, timeout: float | None = None) -> bool:
        """Hold every change back (after those in flight) so the upper dir can be copied consistently."""
        return self.gate.pause(timeout)

    def resume(self) -> None:
        self.gate.resume()

    # ================================================================== reading
    def getattr(self, path: str) -> Attr:
        """Attributes of ``path`` (lstat-like; times in ns).  ENOENT where nothing is visible."""
        with self.lock:
            node = self.resolver.require(path)
            if node.in_upper:
                st = self._host(node).lstat(path)
                return self._upper_attrs(path, node, st, self.inodes.upper_ino(path, st))
            cached = self.cache.get_attrs(path)
            if cached is not None:
                return cached
            st = self._host(node).lstat(node.source)
            if self.index is not None and not node.is_dir and st.st_nlink > 1:
                return self._lower_link_attrs(path, node, st)
            merged = node.is_dir and len(node.merge_layers) > 1 and self._merged(path)
            attrs = self._attrs(st, self.inodes.ino(node.layer, st.st_ino), 1 if merged else None)
            self.cache.put_attrs(path, attrs)
            return attrs

    def _lower_link_attrs(self, path: str, node: Node, st: os.stat_result) -> Attr:
        """The attributes of ``path``, a lower name of a lower hard link (lstat ``st``) with ``index=on``:
        its index entry's where one name of the inode was copied up (data, mode, the union's link count),
        with the lower object's st_ino; never cached (a change through another name changes them)."""
        assert self.index is not None
        name = self.index.name_of(node.layer, node.source, st, path)
        ino = self.inodes.ino(node.layer, st.st_ino)
        entry = self.index.entry_stat(name)
        if entry is None:
            return self._attrs(st, ino)
        self.inodes.note_links(path, entry)
        return self._attrs(entry, ino, self.index.nlink_of_entry(name, entry, st.st_nlink))

    def _overlay_origin_ino(self, path: str, st: os.stat_result) -> int | None:
        """The st_ino of upper non-directory ``path`` (lstat ``st``) copied up by the kernel: its origin's,
        where the kernel uses it (an origin with one link, or an indexed one), else None."""
        if self.index is None or self.upper is None or stat_mod.S_ISDIR(st.st_mode):
            return None
        origin = self.index.origin_stat(self.upper.dir.try_getxattr(path, ORIGIN_XATTR))
        if origin is None or (origin.st_nlink > 1 and self.index.indexed_name(self.upper.dir, path, st) is None):
            return None
        for layer in self.stack.lowers:
            if layer.host.dev == origin.st_dev:
                return self.inodes.ino(layer.index, origin.st_ino)
        return None

    def _index_entry(self, path: str, node: Node) -> str | None:
        """Where ``path`` (``node``) is a lower name of a lower hard link whose inode was copied up through
        the index (``index=on``): the entry's path in the work dir; else None."""
        if self.index is None or node.in_upper or node.is_dir:
            return None
        st = self._host(node).lstat(node.source)
        if st.st_nlink < 2:
            return None
        name = self.index.name_of(node.layer, node.source, st, path)
        return None if self.index.entry_stat(name) is None else self.index.rel(name)

    def _is_lower_link(self, node: Node) -> bool:
        """Is ``node`` a lower non-directory with several links (what ``index=on`` copies up through the
        index, also before removing or replacing a name of it, as the kernel's ``ovl_nlink_start``)?"""
        return (self.index is not None and not node.in_upper and not node.is_dir
                and self._host(node).lstat(node.source).st_nlink > 1)

    def _indexed_upper(self, path: str) -> tuple[str, int] | None:
        """Where upper ``path`` is a name of an indexed inode: (its index name, the union's link count)."""
        if self.index is None or self.upper is None:
            return None
        st = self.upper.dir.try_lstat(path)
        if st is None:
            return None
        name = self.index.indexed_name(self.upper.dir, path, st)
        if name is None:
            return None
        return name, self.index.nlink_of_upper(self.upper.dir, path, st)

    def _identity(self, path: str, node: Node) -> tuple[int, int] | None:
        """The host inode a non-directory name shows with ``index=on`` (an upper name's own, a lower name's
        index entry, or its lower inode): two names of one file are one overlay inode to the kernel."""
        if node.is_dir:
            return None
        if node.in_upper:
            st = self._host(node).lstat(path)
            return st.st_dev, st.st_ino
        entry = self._index_entry(path, node)
        if entry is not None and self.upper is not None:
            st = self.upper.work.lstat(entry)
        else:
            st = self._host(node).lstat(node.source)
        return st.st_dev, st.st_ino

    def _one_inode(self, a: str, anode: Node, b: str, bnode: Node) -> bool:
        """Are non-directories ``a`` and ``b`` one inode to the kernel (what makes rename(2) and
        renameat2(RENAME_EXCHANGE) of them do nothing): two upper names of one upper file, or with
        ``index=on`` any two names of one lower hard link (copied up through the index or not)?"""
        if anode.is_dir or bnode.is_dir:
            return False
        if anode.in_upper and bnode.in_upper:
            ast, bst = self._host(anode).lstat(a), self._host(bnode).lstat(b)
            return (ast.st_dev, ast.st_ino) == (bst.st_dev, bst.st_ino)
        return self.index is not None and self._identity(a, anode) == self._identity(b, bnode)

    def copy_up_bytes(self, path: str) -> int:
        """The bytes of file data a change of ``path`` would copy up first: 0 where its top copy is in the
        upper layer, or it is not a regular file, or nothing is there (a frontend's measure of whether a
        change is quick)."""
        with self.lock:
            node = self.resolver.lookup(path)
            if node is None or node.in_upper or node.kind != stat_mod.S_IFREG:
                return 0
            return self.getattr(path).st_size

    def getattr_children(self, path: str, names: list[str]) -> list[Attr | None]:
        """:meth:`getattr` of each of ``names`` inside directory ``path`` (None for a name not visible any
        more), for a listing that carries attributes.  The same answers, but each layer's objects of the
        directory are read through one descriptor of it: one or two system calls per name instead of up to
        nine, and no walk from the root per name."""
        with self.lock:
            state = self.resolver.dir_state(path)
            if state is None:
                self.resolver.require(path)  # ENOENT/ENOTDIR as getattr would say
                raise _err(errno.ENOTDIR, path)
            out: list[Attr | None] = [None] * len(names)
            upper: list[tuple[int, str, Node]] = []
            lower: dict[tuple[int, str], list[tuple[int, str, Node]]] = {}
            for index, name in enumerate(names):
                node = self.resolver.child(state, name)
                if node is None:
                    continue
                if node.in_upper:
                    upper.append((index, name, node))
                else:
                    cached = self.cache.get_attrs(join(path, name))
                    if cached is not None:
                        out[index] = cached
                    else:
                        # where the layer holds it: below a renamed directory not the union path
                        source_dir, _, source_name = node.source.rpartition("/")
                        lower.setdefault((node.layer, source_dir), []).append((index, source_name, node))
            for (layer, source_dir), entries in lower.items():
                # as getattr's lower branch, each layer's names read through one descriptor of the dir
                stats = self.resolver.hosts[layer].lstat_children(source_dir, [name for _, name, _ in entries])
                for (index, _, node), st in zip(entries, stats, strict=True):
                    if st is None:
                        continue
                    child = join(path, names[index])
                    if self.index is not None and not node.is_dir and st.st_nlink > 1:
                        out[index] = self._lower_link_attrs(child, node, st)
                        continue
                    merged = node.is_dir and len(node.merge_layers) > 1 and self._merged(child)
                    attrs = self._attrs(st, self.inodes.ino(node.layer, st.st_ino), 1 if merged else None)
                    self.cache.put_attrs(child, attrs)
                    out[index] = attrs
            if upper:
                upper_dir = self.resolver.hosts[0]  # layer 0: the upper layer, where these nodes are
                stats = upper_dir.lstat_children(path, [name for _, name, _ in upper])
                unknown = [(i, name) for (i, name, _), st in zip(upper, stats, strict=True)
                           if st is not None and self.cache.get_ino(join(path, name)) is None]
                origins = dict(zip((i for i, _ in unknown),
                                   upper_dir.getxattr_children(path, [name for _, name in unknown],
                                                                self.inodes.origin_xattr), strict=True))
                for (index, name, node), st in zip(upper, stats, strict=True):
                    if st is None:
                        continue
                    child = join(path, name)
                    ino = self.cache.get_ino(child)
                    if ino is None and origins[index] is None and self.inodes.overlay_origin is not None:
                        ino = self.inodes.upper_ino(child, st)
                    if ino is None:
                        ino = self.inodes.origin_ino(origins[index], st)
                        self.cache.put_ino(child, ino)
                    out[index] = self._upper_attrs(child, node, st, ino)
            return out

    def _upper_attrs(self, path: str, node: Node, st: os.stat_result, ino: int) -> Attr:
        """The attributes of upper object ``path`` from its ``lstat`` and union inode number (never cached:
        the daemon's own writes change them)."""
        self.inodes.note_links(path, st)
        if self.index is not None and st.st_nlink > 1 and not node.is_dir:
            return self._attrs(st, ino, self.index.nlink_of_upper(self.resolver.hosts[0], path, st))
        merged = node.is_dir and self._may_merge(path, node) and self._merged(path)
        return self._attrs(st, ino, 1 if merged else None)

    def _may_merge(self, path: str, node: Node) -> bool:
        """Can upper directory ``path`` have lower copies: the same name below, or a redirect elsewhere?
        (Asked before building its state, which a directory made in the mount never needs.)"""
        if node.merge_layers or self.cache.peek_dir(path) is not None:
            return True
        return bool(self.stack.lowers) and dir_redirect(self.resolver.hosts[0], path) is not None

    def _merged(self, path: str) -> bool:
        """Is directory ``path`` merged from several layers?  The kernel then reports st_nlink 1."""
        if path == "" and self.cache.peek_dir(path) is None:
            # the root is in every layer and has no redirect: merged unless its top copy is opaque or alone
            # (asked by the first stat of a new mount: no scan of every layer's root on the way to ready)
            layers = self.stack.layers
            return len(layers) > 1 and not dir_is_opaque(layers[0].host, "")
        state = self.resolver.dir_state(path)
        if state is None:
            return False
        return len(state.lower_layers) + (state.upper_kinds is not None) > 1

    def fgetattr(self, handle: Handle) -> Attr:
        """Attributes through an open handle (works after the name was unlinked)."""
        st = os.fstat(handle.fd)
        return self._attrs(st, handle.ino, self._held_nlink(st, functools.partial(fd_xattr, handle.fd)))

    def _held_nlink(self, st: os.stat_result, getxattr: Callable[[str], bytes | None]) -> int | None:
        """The link count the union shows for an object reached through a descriptor rather than a name
        (host ``st``; ``getxattr`` reads its xattrs): an indexed inode's recorded one, else None (the
        host's own)."""
        if self.index is None or st.st_nlink < 2 or stat_mod.S_ISDIR(st.st_mode):
            return None
        return self.index.nlink_of(st, getxattr)

    def readlink(self, path: str) -> str:
        with self.lock:
            node = self.resolver.require(path)
            if node.kind != stat_mod.S_IFLNK:
                raise _err(errno.EINVAL, path)
            return self._host(node).readlink(node.source)

    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """The merged entries of directory ``path`` as ``(name, st_mode type bits, st_ino)``; ENOTDIR/ENOENT.

        The inode numbers agree with :meth:`getattr` except for an upper object renamed after copy-up."""
        with self.lock:
            state = self.resolver.dir_state(path)
            if state is None:
                self.resolver.require(path)
                raise _err(errno.ENOTDIR, path)
            out = []
            upper = state.upper_kinds or {}
            for name in state.visible_names():
                kind = upper.get(name)
                if kind is None:
                    low = state.lower[name]
                    out.append((name, low.kind, self.inodes.ino(low.layer, low.ino)))
                    continue
                child = join(path, name)
                ino = self.cache.get_ino(child)
                if ino is None:
                    ino = self.inodes.upper_ino(child, self.resolver.hosts[0].lstat(child))  # layer 0: upper
                out.append((name, kind, ino))
            return out

    def access(self, path: str, mode: int) -> None:
        with self.lock:
            self.resolver.require(path)
            if mode & os.W_OK and self.upper is None:
                raise _err(errno.EROFS, path)

    def statfs(self) -> dict[str, int]:
        host = self.upper.dir if self.upper else self.stack.lowers[0].host
        sv = host.statvfs()
        return {
            "f_bsize": sv.f_bsize, "f_frsize": sv.f_frsize, "f_blocks": sv.f_blocks, "f_bfree": sv.f_bfree,
            "f_bavail": sv.f_bavail, "f_files": sv.f_files, "f_ffree": sv.f_ffree, "f_favail": sv.f_favail,
            "f_namemax": sv.f_namemax,
        }

    # ================================================================== xattrs
    def getxattr(self, path: str, name: str) -> bytes:
        value = self.xattr_or_none(path, name)
        if value is None:
            raise _err(errno.ENODATA, path)
        return value

    def xattr_or_none(self, path: str, name: str) -> bytes | None:
        """:meth:`getxattr`, but None where ``path`` has no such attribute (ENODATA) instead of raising: a
        tree walk asks every entry for ``security.capability``, and most have none."""
        with self.lock:
            node = self.resolver.require(path)
            host_name = xattr_to_host(name)
            if host_name is None:
                return None
            entry = self._index_entry(path, node)
            if entry is not None and self.upper is not None:
                return self.upper.work.try_getxattr(entry, host_name)
            if not node.in_upper:
                return self._lower_xattrs(path, node).get(host_name)
            try:
                return self._host(node).getxattr(path, host_name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return None
                raise

    def listxattr(self, path: str) -> list[str]:
        with self.lock:
            node = self.resolver.require(path)
            entry = self._index_entry(path, node)
            host_names: list[str] | dict[str, bytes]
            if entry is not None and self.upper is not None:
                host_names = self.upper.work.listxattr(entry)
            else:
                host_names = self._host(node).listxattr(path) if node.in_upper else self._lower_xattrs(path, node)
            if not host_names:
                return []
            names = (xattr_from_host(n) for n in host_names)
            return [n for n in names if n is not None]

    def _lower_xattrs(self, path: str, node: Node) -> dict[str, bytes]:
        """All xattrs of a lower object, read once and cached (lower layers never change)."""
        cached = self.cache.get_xattrs(path)
        if cached is not None:
            return cached
        host, source = self._host(node), node.source
        values: dict[str, bytes] = {}
        try:
            names = host.listxattr(source)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            names = []
        for attr in names:
            value = host.try_getxattr(source, attr)
            if value is not None:
                values[attr] = value
        self.cache.put_xattrs(path, values)
        return values

    @_mutating
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        with self.lock:
            layer = self._writable()
            node = self.resolver.require(path)
            host_name = xattr_to_host(name)
            if host_name is None:
                raise _err(errno.EPERM, path)
            entry = self._index_entry(path, node)
            if entry is not None:  # the kernel's inode has the index entry as its upper: no copy-up
                layer.work.setxattr(entry, host_name, value, flags)
                return
            self.copy_up(path)
            layer.dir.setxattr(path, host_name, value, flags)

    @_mutating
    def removexattr(self, path: str, name: str) -> None:
        with self.lock:
            layer = self._writable()
            node = self.resolver.require(path)
            host_name = xattr_to_host(name)
            if host_name is None:
                raise _err(errno.ENODATA, path)
            entry = self._index_entry(path, node)
            if entry is not None:  # as in setxattr: the index entry is the inode's upper copy
                layer.work.removexattr(entry, host_name)
                return
            if not node.in_upper:
                self._host(node).getxattr(node.source, host_name)  # ENODATA before any copy-up
            self.copy_up(path)
            layer.dir.removexattr(path, host_name)

    # ================================================================== copy-up
    def copy_up(self, path: str, *, data_limit: int | None = None, truncate_to: int | None = None) -> Node:
        """Make sure ``path`` has its top copy in the upper layer (parents first); returns its node.  The
        read handles open on its lower copy move onto the upper one.  EROFS without an upper layer.

        Call with the lock held.  ``data_limit`` and ``truncate_to`` as for :func:`copyup.stage_copy`.
        """
        node = self._writable().copy_up(path, data_limit=data_limit, truncate_to=truncate_to)
        if path in self._lower_handles:
            self._move_lower_handles(path)
        return node

    def _new_parent(self, path: str) -> DirState:
        """Checks for creating ``path``: EROFS, EEXIST, ENAMETOOLONG, parent copied up; returns the parent
        state."""
        upper = self._writable()
        if path == "":
            raise _err(errno.EEXIST, path)
        parent = self.resolver.lookup_parent(path)
        if self.resolver.child(parent, split(path)[1]) is not None:
            raise _err(errno.EEXIST, path)
        _check_name(path)
        self._check_representable(path)
        return upper.ensure_dir(split(path)[0])

    def _creation_mode(self, path: str, mode: int, umask: int) -> int:
        """The mode to create ``path`` with.  With POSIX ACLs on, the kernel leaves the caller's ``umask``
        to the file system: it applies unless the parent (already in the upper layer) has a default ACL,
        which then decides instead (the host applies it; see :meth:`Upper.place_new`)."""
        if not umask or self._writable().parent_default_acl(path) is not None:
            return mode
        return mode & ~(umask & 0o777)

    def _check_representable(self, path: str) -> None:
        """Names that are whiteout markers in the OCI format (``.wh.*``) cannot be created: every layer,
        the upper included, is read in every format, so such a file would turn into a marker (EPERM).
        A deliberate difference from the kernel, which knows only its own format (docs/semantics.md)."""
        if split(path)[1].startswith(WH_PREFIX):
            raise _err(errno.EPERM, path)

    def _stored_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """The caller's owner as the layers store it; EINVAL (before anything is created) if unmapped."""
        return (uid, gid) if self.idmap is None else self.idmap.stored(uid, gid)

    # ================================================================== creating
    @_mutating
    def create(self, path: str, flags: int, mode: int, uid: int = 0, gid: int = 0, umask: int = 0) -> Handle:
        """Create and open a regular file (O_CREAT); EEXIST if something is visible there.  ``umask``: the
        caller's, where the kernel leaves it to the file system (see :meth:`_creation_mode`)."""
        uid, gid = self._stored_owner(uid, gid)
        with self.lock:
            parent = self._new_parent(path)
            mode = self._creation_mode(path, mode, umask)
            fds: list[int] = []

            def build(host: HostDir, rel: str) -> None:
                fd = host.open(rel, os.O_RDWR | os.O_CREAT | os.O_EXCL, stat_mod.S_IMODE(mode))
                fds.append(fd)
                Upper.give_owner(host, rel, uid, gid)
                if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                    os.fchmod(fd, stat_mod.S_IMODE(mode))

            self._writable().place_new(path, parent, build, stat_mod.S_IFREG, mode)
            fd = fds[0]
            return Handle(fd, path, self.inodes.ino(0, os.fstat(fd).st_ino), True)

    @_mutating
    def mkdir(self, path: str, mode: int, uid: int = 0, gid: int = 0, umask: int = 0) -> None:
        uid, gid = self._stored_owner(uid, gid)
        with self.lock:
            parent = self._new_parent(path)
            mode = self._creation_mode(path, mode, umask)

            def build(host: HostDir, rel: str) -> None:
                host.mkdir(rel, stat_mod.S_IMODE(mode))
                Upper.give_owner(host, rel, uid, gid)
                if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID | stat_mod.S_ISVTX):
                    host.chmod(rel, stat_mod.S_IMODE(mode) | (host.lstat(rel).st_mode & stat_mod.S_ISGID))

            self._writable().place_new(path, parent, build, S_IFDIR, mode)
            self.cache.invalidate_subtree(path)

    @_mutating
    def mknod(self, path: str, mode: int, rdev: int, uid: int = 0, gid: int = 0, umask: int = 0) -> None:
        uid, gid = self._stored_owner(uid, gid)
        with self.lock:
            kind = stat_mod.S_IFMT(mode)
            if kind == stat_mod.S_IFCHR and rdev == 0:
                raise _err(errno.EPERM, path)  # the whiteout device, as the kernel's overlayfs refuses it
            parent = self._new_parent(path)
            mode = self._creation_mode(path, mode, umask)

            def build(host: HostDir, rel: str) -> None:
                host.mknod(rel, mode, rdev)
                Upper.give_owner(host, rel, uid, gid)

            self._writable().place_new(path, parent, build, kind, mode)

    @_mutating
    def symlink(self, target: str, path: str, uid: int = 0, gid: int = 0) -> None:
        uid, gid = self._stored_owner(uid, gid)
        with self.lock:
            parent = self._new_parent(path)

            def build(host: HostDir, rel: str) -> None:
                host.symlink(target, rel)
                Upper.give_owner(host, rel, uid, gid)

            self._writable().place_new(path, parent, build, stat_mod.S_IFLNK)

    @_mutating
    def link(self, src: str, dst: str) -> None:
        """Hard link ``dst`` to the object at ``src`` (copied up first, as the kernel does)."""
        with self.lock:
            node = self.resolver.require(src)
            if node.is_dir:
                raise _err(errno.EPERM, src)
            parent = self._new_parent(dst)
            self.copy_up(src)
            upper = self._writable().dir

            def build(host: HostDir, rel: str) -> None:
                host.link(src, rel, src_dir=upper)

            self._writable().place_new(dst, parent, build, node.kind, new_inode=False)
            self.cache.drop_attrs(src)
            st = upper.lstat(dst)
            self.inodes.note_links(src, st)
            self.inodes.note_links(dst, st)
            self.inodes.invalidate_other_names(dst, st)

    # ================================================================== removing
    @_mutating
    def unlink(self, path: str) -> None:
        with self.lock:
            upper = self._writable()
            node = self.resolver.require(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            parent_path, name = split(path)
            parent = upper.ensure_dir(parent_path)
            if self._is_lower_link(node):  # the kernel copies it up first, to count the union's links
                node = self.copy_up(path)
            indexed = self._indexed_upper(path) if node.in_upper else None
            old = upper.dir.try_lstat(path) if node.in_upper else None
            if self._needs_whiteout(parent, name):
                upper.replace_with_whiteout(path, is_dir=False)
                parent.upper_whiteout(name)
            else:
                upper.remove(path, is_dir=False)
                parent.upper_remove(name)
            self.cache.drop_attrs(path)
            self.cache.drop_ino(path)
            if indexed is not None and self.index is not None:
                self.index.record_nlink(indexed[0], indexed[1] - 1)
            if old is not None and old.st_nlink > 1:
                self.inodes.forget_name(path, old)
                self.inodes.invalidate_other_names(path, old)

    @_mutating
    def rmdir(self, path: str) -> None:
        with self.lock:
            upper = self._writable()
            if path == "":
                raise _err(errno.EBUSY, path)
            node = self.resolver.require(path)
            if not node.is_dir:
                raise _err(errno.ENOTDIR, path)
            if self.resolver.listdir(path):
                raise _err(errno.ENOTEMPTY, path)
            parent_path, name = split(path)
            parent = upper.ensure_dir(parent_path)
            if self._needs_whiteout(parent, name):
                upper.replace_with_whiteout(path, is_dir=True)
                parent.upper_whiteout(name)
            else:
                upper.remove(path, is_dir=True)
                parent.upper_remove(name)
            self.cache.invalidate_subtree(path)

    # ================================================================== rename
    def _has_lower(self, path: str, node: Node) -> bool:
        """Does directory ``path`` have a lower copy (the kernel's "merge or lower" type)?"""
        state = self.resolver.dir_state(path)
        return not node.in_upper or (state is not None and bool(state.lower_layers))

    def _upper_redirect(self, path: str) -> str | None:
        """The redirect recorded on the upper copy of directory ``path``, if it has one."""
        upper = self._writable().dir
        st = upper.try_lstat(path)
        return dir_redirect(upper, path) if st is not None and stat_mod.S_ISDIR(st.st_mode) else None

    def _redirect_for(self, path: str, *, samedir: bool) -> str | None:
        """The redirect directory ``path`` (with a lower copy) gets when it moves, as the kernel computes
        it: its old name when it stays in its parent, else the absolute path of its lower copies (an
        ancestor's absolute redirect standing for the path above it); None where the one it has still
        holds.  EXDEV where the path is longer than the kernel's ``redirect_max``."""
        own = self._upper_redirect(path)
        if own is not None and (samedir or own.startswith("/")):
            return None
        if samedir:
            return split(path)[1]
        parts: list[str] = []
        moved = path
        while path:
            redirect = self._upper_redirect(path) if parts else own
            parts.append(redirect if redirect is not None else split(path)[1])
            if parts[-1].startswith("/"):
                break
            path = split(path)[0]
        text = "/".join(reversed(parts))
        text = text if text.startswith("/") else "/" + text
        if len(os.fsencode(text)) > REDIRECT_MAX:
            raise _err(errno.EXDEV, moved)
        return text

    def _set_redirect(self, path: str, redirect: str | None) -> None:
        """Record ``redirect`` on upper directory ``path`` (None: leave it); EXDEV where xattrs fail."""
        if redirect is None:
            return
        layer = self._writable()
        try:
            layer.dir.setxattr(path, layer.redirect_xattr, os.fsencode(redirect))
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                raise _err(errno.EXDEV, path) from None
            raise

    @_mutating
    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        """rename(2)/renameat2(2) with the kernel overlayfs's rules: a directory with a lower copy moves
        with a redirect (``redirect_dir=on``: the upper copy records where its lower copies are, a whiteout
        hides the old name) and answers EXDEV with every other ``redirect_dir``."""
        with self.lock:
            layer = self._writable()
            upper, work, writer = layer.dir, layer.work, layer.writer
            if flags == RENAME_EXCHANGE:
                self._exchange(src, dst)
                return
            if flags & ~RENAME_NOREPLACE:
                raise _err(errno.EINVAL, dst)
            snode = self.resolver.require(src)
            if src == "" or dst == "":
                raise _err(errno.EBUSY, src)
            dparent = self.resolver.lookup_parent(dst)
            dname = split(dst)[1]
            _check_name(dst)
            dnode = self.resolver.child(dparent, dname)
            self._check_representable(dst)
            if dst == src:
                return
            if dnode is not None and self._one_inode(src, snode, dst, dnode):
                return  # two names of one file: rename(2) does nothing
            if snode.is_dir and dst.startswith(src + "/"):
                raise _err(errno.EINVAL, dst)
            if dnode is not None:
                if flags & RENAME_NOREPLACE:
                    raise _err(errno.EEXIST, dst)
                if snode.is_dir and not dnode.is_dir:
                    raise _err(errno.ENOTDIR, dst)
                if dnode.is_dir and not snode.is_dir:
                    raise _err(errno.EISDIR, dst)
            # the kernel's order: type mismatches (the VFS), then EXDEV (overlayfs), then ENOTEMPTY
            moves_lower = snode.is_dir and self._has_lower(src, snode)
            if moves_lower and self.redirect_dir != "on":
                raise _err(errno.EXDEV, src)
            if dnode is not None and dnode.is_dir and self.resolver.listdir(dst):
                dstate = self.resolver.dir_state(dst)
                if dnode.in_upper and dstate is not None and not dstate.lower_layers:
                    # the kernel copies the dir up and marks it (see below) before the upper fs refuses to
                    # replace a non-empty pure-upper dir: the copy-up and its mark stay (docs/semantics.md)
                    if moves_lower:
                        redirect = self._redirect_for(src, samedir=split(src)[0] == split(dst)[0])
                        layer.ensure_dir(split(src)[0])
                        self.copy_up(src)
                        self._set_redirect(src, redirect)
                        self.cache.invalidate_subtree(src)
                    elif dparent.lower_layers:
                        writer.mark_opaque(upper, src)
                        self.cache.invalidate_subtree(src)
                raise _err(errno.ENOTEMPTY, dst)
            redirect = self._redirect_for(src, samedir=split(src)[0] == split(dst)[0]) if moves_lower else None
            sparent_path, sname = split(src)
            if writer.format is WhiteoutFormat.OCI and len(os.fsencode(WH_PREFIX + sname)) > NAME_MAX \
                    and self._needs_whiteout(self.resolver.lookup_parent(src), sname):
                raise _err(errno.ENAMETOOLONG, src)  # its whiteout could not be written: change nothing
            sparent = layer.ensure_dir(sparent_path)
            snode = self.copy_up(src)
            dparent = layer.ensure_dir(split(dst)[0])
            dindexed = None
            if dnode is not None and not dnode.is_dir and self.index is not None:
                if self._is_lower_link(dnode):  # as for unlink: the replaced name's links are counted
                    dnode = self.copy_up(dst)
                dindexed = self._indexed_upper(dst)
            src_needs_wh = self._needs_whiteout(sparent, sname)
            # Clear what the upper holds at dst: an (empty-looking) upper dir with only whiteouts inside,
            # a whiteout of either format.
            dst_upper = upper.try_lstat(dst)
            replaced = dst_upper if dnode is not None and dnode.in_upper and not dnode.is_dir else None
            if dnode is not None and dnode.is_dir and dnode.in_upper:
                tmp = join(WORK_SUBDIR, copyup.temp_name("rm"))
                upper.rename(dst, tmp, dst_dir=work)
                work.remove_tree(tmp)
                dst_upper = None
            if moves_lower:
                self._set_redirect(src, redirect)
            elif snode.is_dir and dparent.lower_layers:  # into a merged dir: opaque, as the kernel marks it
                writer.mark_opaque(upper, src)
            if dst_upper is not None and dnode is None:
                # a kernel-format whiteout at dst: swap it with src so it lands where src was
                upper.rename(src, dst, RENAME_EXCHANGE)
                if src_needs_wh:
                    pass  # the whiteout now at src is exactly what src needs
                else:
                    upper.unlink(src)
            elif src_needs_wh and writer.format is WhiteoutFormat.KERNEL:
                upper.rename(src, dst, RENAME_WHITEOUT)
            else:
                upper.rename(src, dst)
                if src_needs_wh:
                    layer.replace_with_whiteout(src, is_dir=False)
            if writer.format is WhiteoutFormat.OCI:
                writer.remove_whiteout(dst)
            if src_needs_wh:
                sparent.upper_whiteout(sname)
            else:
                sparent.upper_remove(sname)
            dparent.upper_set(dname, snode.kind)
            self.cache.invalidate_subtree(src)
            self.cache.invalidate_subtree(dst)
            if dindexed is not None and self.index is not None:
                self.index.record_nlink(dindexed[0], dindexed[1] - 1)
            if replaced is not None and replaced.st_nlink > 1:
                # the replaced file lost a link (and its ctime moved): its other names' caches are stale
                self.inodes.forget_name(dst, replaced)
                self.inodes.invalidate_other_names(dst, replaced)

    def _exchange(self, a: str, b: str) -> None:
        """renameat2(RENAME_EXCHANGE): swap two existing names.  Both are copied up first (a directory with a
        lower copy gets a redirect, or EXDEV as for rename); no whiteout is needed since both names stay."""
        layer = self._writable()
        upper, writer = layer.dir, layer.writer
        anode, bnode = self.resolver.require(a), self.resolver.require(b)
        if "" in (a, b):
            raise _err(errno.EBUSY, a)
        for path in (a, b):
            _check_name(path)
            self._check_representable(path)
        if a == b or self._one_inode(a, anode, b, bnode):
            return  # the VFS exchanges nothing where both names are one inode (nothing is copied up)
        if (anode.is_dir and b.startswith(a + "/")) or (bnode.is_dir and a.startswith(b + "/")):
            raise _err(errno.EINVAL, b)
        a_lower = anode.is_dir and self._has_lower(a, anode)
        b_lower = bnode.is_dir and self._has_lower(b, bnode)
        for path, lower in ((a, a_lower), (b, b_lower)):
            if lower and self.redirect_dir != "on":
                raise _err(errno.EXDEV, path)
        samedir = split(a)[0] == split(b)[0]
        a_redirect = self._redirect_for(a, samedir=samedir) if a_lower else None
        b_redirect = self._redirect_for(b, samedir=samedir) if b_lower else None
        aparent = layer.ensure_dir(split(a)[0])
        bparent = layer.ensure_dir(split(b)[0])
        anode, bnode = self.copy_up(a), self.copy_up(b)
        # a directory with a lower copy records where it was; a purely upper one moving into a merged dir is
        # marked opaque, as the kernel marks it (docs/semantics.md)
        if a_lower:
            self._set_redirect(a, a_redirect)
        elif anode.is_dir and bparent.lower_layers:
            writer.mark_opaque(upper, a)
        if b_lower:
            self._set_redirect(b, b_redirect)
        elif bnode.is_dir and aparent.lower_layers:
            writer.mark_opaque(upper, b)
        upper.rename(a, b, RENAME_EXCHANGE)
        aparent.upper_set(split(a)[1], bnode.kind)
        bparent.upper_set(split(b)[1], anode.kind)
        for path in (a, b):
            self.cache.invalidate_subtree(path)
            self.invalidate(path)

    # ================================================================== metadata
    @_mutating
    def chmod(self, path: str, mode: int) -> None:
        with self.lock:
            self.resolver.require(path)
            self.copy_up(path)
            self._writable().dir.chmod(path, stat_mod.S_IMODE(mode))
            self.inodes.invalidate_other_names(path)

    @_mutating
    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.lock:
            self.resolver.require(path)
            if self.idmap is not None:
                uid, gid = self.idmap.stored(uid, gid)
            self.copy_up(path)
            self._writable().dir.chown(path, uid, gid)
            self.inodes.invalidate_other_names(path)

    @_mutating
    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Set times in ns; None means "now" for both (utime(NULL)); UTIME_OMIT / UTIME_NOW are honoured."""
        with self.lock:
            self.resolver.require(path)
            self.copy_up(path)
            upper = self._writable().dir
            st = upper.lstat(path)
            now = time.time_ns()

            def pick(value: int | None, current: int) -> int:
                if value is None or value == UTIME_NOW:
                    return now
                if value == UTIME_OMIT:
                    return current
                return value

            upper.utime(path, (pick(atime_ns, st.st_atime_ns), pick(mtime_ns, st.st_mtime_ns)))
            self.inodes.invalidate_other_names(path, st)

    @_mutating
    def truncate(self, path: str, length: int) -> None:
        with self.lock:
            node = self.resolver.require(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            if node.kind != stat_mod.S_IFREG:
                raise _err(errno.EINVAL, path)  # as vfs_truncate; opening a fifo to truncate it would block
            if node.in_upper:
                self._writable().dir.truncate(path, length)
            else:  # the copy is truncated before it becomes visible
                self.copy_up(path, truncate_to=length)
            self.inodes.invalidate_other_names(path)

    # ================================================================== files
    def open(self, path: str, flags: int) -> Handle:
        """Open ``path``; writing (or O_TRUNC) copies it up first.  Returns a handle owning a descriptor."""
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        host_flags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY)
        if write:
            with self.gate.writing():
                return self._open(path, flags, host_flags, write=True)
        return self._open(path, flags, host_flags, write=False)

    def _open(self, path: str, flags: int, host_flags: int, *, write: bool) -> Handle:
        with self.lock:
            node = self.resolver.require(path)
            if write:
                if node.is_dir:
                    raise _err(errno.EISDIR, path)
                truncating = bool(flags & os.O_TRUNC)
                node = self.copy_up(path, data_limit=0 if truncating else None)
            else:
                entry = self._index_entry(path, node)
                if entry is not None and self.upper is not None:  # the file the other names wrote
                    fd = self.upper.work.open(entry, host_flags)
                    try:
                        ino = self.inodes.ino(node.layer, self._host(node).lstat(node.source).st_ino)
                    except BaseException:
                        os.close(fd)
                        raise
                    return Handle(fd, path, ino, True, host_flags)
            host = self._host(node)
            fd = host.open(node.source, host_flags)
            try:
                st = os.fstat(fd)
                ino = self.inodes.upper_ino(path, st) if node.in_upper else self.inodes.ino(node.layer, st.st_ino)
            except BaseException:
                os.close(fd)
                raise
            handle = Handle(fd, path, ino, node.in_upper, host_flags)
            if not node.in_upper and node.kind == stat_mod.S_IFREG and self.upper is not None:
                self._lower_handles.setdefault(path, set()).add(fd)
                self._handles_by_fd[fd] = handle
            return handle

    def _move_lower_handles(self, path: str) -> None:
        """After ``path`` was copied up: point the read handles open on its lower copy at the upper one."""
        upper = self._writable().dir
        for fd in self._lower_handles.pop(path, ()):
            handle = self._handles_by_fd.get(fd)
            if handle is None:
                continue
            new = upper.open(path, handle.flags)
            try:
                os.dup2(new, fd)
            finally:
                os.close(new)
            handle.on_upper = True

    def read(self, handle: Handle, size: int, offset: int) -> bytes:
        return os.pread(handle.fd, size, offset)

    def read_cached(self, handle: Handle, buffer: memoryview, offset: int) -> int | None:
        """:meth:`read` into ``buffer`` at ``offset``, but only where the host's page cache holds the data
        (``RWF_NOWAIT``: never a wait for the disk).  The number of bytes read (fewer than asked only at the
        end of the file), or None where the read would wait (or the host filesystem cannot tell): then
        :meth:`read` it.  Raises OSError as :meth:`read` does."""
        try:
            count = os.preadv(handle.fd, [buffer], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        if count < len(buffer) and offset + count < os.fstat(handle.fd).st_size:
            return None  # part of the range is not cached
        return count

    @_mutating
    def write(self, handle: Handle, data: bytes, offset: int) -> int:
        return os.pwrite(handle.fd, data, offset)

    @_mutating
    def ftruncate(self, handle: Handle, length: int) -> None:
        os.ftruncate(handle.fd, length)

    def fsync(self, handle: Handle, datasync: bool) -> None:
        if self.volatile:
            return
        (os.fdatasync if datasync else os.fsync)(handle.fd)

    @_mutating
    def fallocate(self, handle: Handle, mode: int, offset: int, length: int) -> None:
        fallocate(handle.fd, mode, offset, length)

    def changed_through(self, handle: Handle) -> None:
        """The file of ``handle`` changed through it (a write): its other names, the hard links the union
        has seen, have their kernel caches dropped (:attr:`Inodes.notify`)."""
        if handle.on_upper and self.inodes.links:
            st = os.fstat(handle.fd)
            if st.st_nlink > 1:
                with self.lock:
                    self.inodes.invalidate_other_names(handle.path, st)

    def release(self, handle: Handle) -> None:
        """Close the handle; a file written through one name has its other names' kernel caches dropped."""
        if not handle.on_upper and handle.path in self._lower_handles:
            with self.lock:
                self._lower_handles.get(handle.path, set()).discard(handle.fd)
                self._handles_by_fd.pop(handle.fd, None)
        try:
            self.changed_through(handle)
        finally:
            os.close(handle.fd)

    # ================================================================== objects whose name is gone
    def pin(self, path: str) -> Orphan | None:
        """Hold the object visible at ``path`` so that it stays reachable once its name is gone (unlink,
        rmdir, a rename over it); None where nothing is visible.  A frontend that holds a handle on the
        name calls it before the removal and closes the orphan when its last handle goes
        (:mod:`unionfs.fs.orphan`)."""
        with self.lock:
            try:
                node = self.resolver.require(path)
            except OSError:
                return None
            pinned = self._host(node).pin(node.source)
            try:
                st = pinned.stat()
                if node.in_upper:
                    ino = self.inodes.upper_ino(path, st)
                    merged = node.is_dir and bool(node.merge_layers) and self._merged(path)
                else:
                    ino = self.inodes.ino(node.layer, st.st_ino)
                    merged = node.is_dir and len(node.merge_layers) > 1 and self._merged(path)
            except BaseException:
                pinned.close()
                raise
            return Orphan(pinned, path, ino, node.in_upper, stat_mod.S_IFMT(st.st_mode), 1 if merged else None)

    @staticmethod
    def _orphan_copy_up(orphan: Orphan) -> None:
        """A change of an orphan needs it in the upper layer: a lower one cannot get there any more, and
        answers as the kernel's copy-up does when it finds the whiteout where the name was (EEXIST; ENOTDIR
        for a directory)."""
        if not orphan.on_upper:
            raise _err(errno.ENOTDIR if orphan.is_dir else errno.EEXIST, orphan.path)

    def orphan_getattr(self, orphan: Orphan) -> Attr:
        """Attributes of an orphan: its host object's, with the st_ino the union showed (and the link count
        of an indexed upper file counted as for its names: the index entry is not one)."""
        st = orphan.pinned.stat()
        nlink = orphan.nlink
        if nlink is None and orphan.on_upper:
            nlink = self._held_nlink(st, orphan.pinned.try_getxattr)
        return self._attrs(st, orphan.ino, nlink)

    def orphan_readlink(self, orphan: Orphan) -> str:
        """:meth:`readlink` of an orphan: the kernel's overlayfs reads the symlink it still holds."""
        if orphan.kind != stat_mod.S_IFLNK:
            raise _err(errno.EINVAL, orphan.path)
        return orphan.pinned.readlink()

    @_mutating
    def orphan_link(self, orphan: Orphan, dst: str) -> None:
        """:meth:`link` of an orphan (``linkat`` of ``/proc/self/fd`` of a descriptor whose name is gone): an
        upper object with links left gets the new name ``dst`` (ENOENT for one with none, as linkat(2)
        answers); a lower one answers ENOENT, as the kernel's overlayfs does (it cannot be copied up any
        more); EPERM for a dir."""
        if orphan.is_dir:
            raise _err(errno.EPERM, orphan.path)
        with self.lock:
            parent = self._new_parent(dst)
            if not orphan.on_upper:
                raise _err(errno.ENOENT, orphan.path)
            pinned = orphan.pinned

            def build(host: HostDir, rel: str) -> None:
                host.link_pinned(pinned, rel)

            self._writable().place_new(dst, parent, build, orphan.kind, new_inode=False)
            st = self._writable().dir.lstat(dst)
            self.inodes.note_links(dst, st)
            self.inodes.invalidate_other_names(dst, st)

    def orphan_access(self, orphan: Orphan, mode: int) -> None:
        """:meth:`access` of an orphan: it exists; EROFS for ``W_OK`` on a read-only union."""
        if mode & os.W_OK and self.upper is None:
            raise _err(errno.EROFS, orphan.path)

    def orphan_open(self, orphan: Orphan, flags: int) -> Handle:
        """Open an orphan (an ``open(2)`` that looked its name up before the name went).  Writing a lower
        orphan fails: it cannot be copied up any more (:meth:`_orphan_copy_up`)."""
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        host_flags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY)
        if not write:
            return Handle(orphan.pinned.reopen(host_flags), orphan.path, orphan.ino, orphan.on_upper, host_flags)
        if orphan.is_dir:
            raise _err(errno.EISDIR, orphan.path)
        with self.gate.writing():
            self._orphan_copy_up(orphan)
            return Handle(orphan.pinned.reopen(host_flags), orphan.path, orphan.ino, True, host_flags)

    @_mutating
    def orphan_setattr(self, orphan: Orphan, *, mode: int | None = None, uid: int = -1, gid: int = -1,
                       size: int | None = None, atime_ns: int | None = UTIME_OMIT,
                       mtime_ns: int | None = UTIME_OMIT) -> None:
        """chmod (``mode``), chown (``uid``/``gid``, -1 keeps), truncate (``size``) and utimens (as
        :meth:`utimens`) of an orphan, in that order.  An upper orphan is changed in place; a lower one
        fails for any change, even for none (``chown(f, -1, -1)``), as the kernel's copy-up does
        (:meth:`_orphan_copy_up`)."""
        self._orphan_copy_up(orphan)
        pinned = orphan.pinned
        if mode is not None:
            pinned.chmod(stat_mod.S_IMODE(mode))
        if uid != -1 or gid != -1:
            if self.idmap is not None:
                uid, gid = self.idmap.stored(uid, gid)
            pinned.chown(uid, gid)
        if size is not None:
            if orphan.is_dir:
                raise _err(errno.EISDIR, orphan.path)
            pinned.truncate(size)
        if atime_ns != UTIME_OMIT or mtime_ns != UTIME_OMIT:
            st = pinned.stat()
            now = time.time_ns()

            def pick(value: int | None, current: int) -> int:
                if value is None or value == UTIME_NOW:
                    return now
                return current if value == UTIME_OMIT else value

            pinned.utime((pick(atime_ns, st.st_atime_ns), pick(mtime_ns, st.st_mtime_ns)))
        if self.inodes.links:
            with self.lock:  # the names it still has (a hard link) show the change
                self.inodes.invalidate_other_names(orphan.path, pinned.stat())

    def orphan_xattr_or_none(self, orphan: Orphan, name: str) -> bytes | None:
        """:meth:`xattr_or_none` of an orphan."""
        host_name = xattr_to_host(name)
        if host_name is None:
            return None
        try:
            return orphan.pinned.getxattr(host_name)
        except OSError as exc:
            if exc.errno == errno.ENODATA or (not orphan.on_upper and exc.errno in (errno.ENOTSUP, errno.EPERM)):
                return None
            raise

    def orphan_listxattr(self, orphan: Orphan) -> list[str]:
        """:meth:`listxattr` of an orphan."""
        try:
            host_names = orphan.pinned.listxattr()
        except OSError as exc:
            if orphan.on_upper or exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            return []
        names = (xattr_from_host(n) for n in host_names)
        return [n for n in names if n is not None]

    @_mutating
    def orphan_setxattr(self, orphan: Orphan, name: str, value: bytes, flags: int) -> None:
        """:meth:`setxattr` of an orphan (a lower one cannot be copied up any more)."""
        host_name = xattr_to_host(name)
        if host_name is None:
            raise _err(errno.EPERM, orphan.path)
        self._orphan_copy_up(orphan)
        orphan.pinned.setxattr(host_name, value, flags)

    @_mutating
    def orphan_removexattr(self, orphan: Orphan, name: str) -> None:
        """:meth:`removexattr` of an orphan (ENODATA where it has no such attribute; a lower one cannot be
        copied up any more)."""
        host_name = xattr_to_host(name)
        if host_name is None:
            raise _err(errno.ENODATA, orphan.path)
        if not orphan.on_upper:
            orphan.pinned.getxattr(host_name)
        self._orphan_copy_up(orphan)
        orphan.pinned.removexattr(host_name)

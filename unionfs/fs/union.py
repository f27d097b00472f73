"""The UnionFS facade: POSIX-shaped operations over a layer stack, with the kernel overlayfs's semantics.

Paths are union paths relative to the root (``""`` is the root, ``"a/b"`` a child; the FUSE adapter strips
the leading ``/``).  Every method raises ``OSError(errno, message, path)`` on failure and nothing else; a
missing object is ENOENT.  Metadata operations are serialised by one lock; reads and writes on open handles
take no lock.  Callers: ``mountd.highlevel.operations`` and the tests.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from unionfs.fs import acl, copyup
from unionfs.fs.attr import Attr, attr_of
from unionfs.fs.cache import DirState, LookupCache
from unionfs.fs.fsio import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, HostDir, fallocate, join, split
from unionfs.fs.gate import WriteGate
from unionfs.fs.idmap import IdMap
from unionfs.fs.layers import WORK_SUBDIR, LayerStack
from unionfs.fs.lookup import Node, Resolver
from unionfs.fs.whiteout import (
    WH_PREFIX,
    WhiteoutFormat,
    WhiteoutWriter,
    probe_kernel_format,
    xattr_from_host,
    xattr_to_host,
)

S_IFDIR = stat_mod.S_IFDIR
NAME_MAX = 255
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(slots=True)
class Handle:
    """An open file of the union: the host descriptor, the union path it was opened as, and its st_ino."""

    fd: int
    path: str
    ino: int
    upper: bool
    flags: int = os.O_RDONLY


def _mutating(fn: _F) -> _F:
    """Mark a method that changes the upper layer: it passes the write gate (held shut by a pause)."""

    @functools.wraps(fn)
    def wrapper(self: UnionFS, *args: Any, **kwargs: Any) -> Any:
        with self.gate.writing():
            return fn(self, *args, **kwargs)

    return cast(_F, wrapper)


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), "/" + path)


def _check_name(path: str) -> None:
    if len(os.fsencode(split(path)[1])) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG, path)


class UnionFS:
    """A mounted union of ``stack``.  ``whiteout`` is ``auto``, ``kernel`` or ``oci``; ``volatile`` skips
    every fsync (as the kernel's ``volatile`` option does)."""

    def __init__(self, stack: LayerStack, *, whiteout: str = "auto", volatile: bool = False,
                 cache_entries: int = 1_000_000, idmap: IdMap | None = None) -> None:
        self.stack = stack
        self.volatile = volatile
        self.idmap = idmap if idmap is not None and not idmap.identity else None
        self.cache = LookupCache(cache_entries)
        self.resolver = Resolver(stack, self.cache)
        self.lock = threading.RLock()
        self.gate = WriteGate()
        self.upper: HostDir | None = stack.upper.host if stack.upper else None
        self.work: HostDir | None = stack.work
        self.writer: WhiteoutWriter | None = None
        self.origin_xattr = "trusted.unionfs.origin"
        self.layer_fs = self._layer_fs_ids()
        self.counters: dict[str, int] = {}
        self.invalidate: Callable[[str], None] = lambda path: None
        """Told the union path of every *other* name whose cached attributes/data an operation made stale
        (names of a hard-linked upper file).  The FUSE adapter forwards these to the kernel."""
        self._links: dict[tuple[int, int], set[str]] = {}
        self._lower_handles: dict[str, set[int]] = {}
        """Read-only handles open on a lower file, by path: a copy-up moves them onto the upper copy, so that
        they see later writes (as the kernel's overlayfs does since 4.19)."""
        self._handles_by_fd: dict[int, Handle] = {}
        if self.upper is not None and self.work is not None:
            copyup.clean_workdir(self.work, WORK_SUBDIR)
            if whiteout not in ("auto", "kernel", "oci"):
                raise ValueError(f"whiteout={whiteout}: expected auto, kernel or oci")
            kernel_ok = probe_kernel_format(self.work, WORK_SUBDIR)
            if whiteout == "kernel" and not kernel_ok:
                raise OSError(errno.EPERM, "whiteout=kernel needs mknod and trusted.* xattrs in the workdir")
            fmt = WhiteoutFormat.KERNEL if (whiteout == "kernel" or (whiteout == "auto" and kernel_ok)) \
                else WhiteoutFormat.OCI
            if not kernel_ok:
                self.origin_xattr = "user.unionfs.origin"
            self.writer = WhiteoutWriter(fmt, self.upper, self.work, WORK_SUBDIR)

    def close(self) -> None:
        self.stack.close()

    # ================================================================== helpers
    def _layer_fs_ids(self) -> dict[int, int]:
        devs: dict[int, int] = {}
        out = {}
        for layer in self.stack.layers:
            out[layer.index] = devs.setdefault(layer.host.dev, len(devs))
        return out

    def _ino(self, layer: int, real_ino: int) -> int:
        fs = self.layer_fs[layer]
        return real_ino if fs == 0 else (real_ino & ((1 << 48) - 1)) | (fs << 48)

    def _attrs(self, st: os.stat_result, ino: int, nlink: int | None = None) -> Attr:
        uid, gid = (st.st_uid, st.st_gid) if self.idmap is None else self.idmap.shown(st.st_uid, st.st_gid)
        return attr_of(st, ino=ino, uid=uid, gid=gid, nlink=nlink)

    def _node(self, path: str) -> Node:
        node = self.resolver.lookup(path)
        if node is None:
            _check_name(path)
            parent = split(path)[0]
            if path and self.resolver.dir_state(parent) is None and self.resolver.lookup(parent) is not None:
                raise _err(errno.ENOTDIR, path)
            raise _err(errno.ENOENT, path)
        return node

    def _writable(self) -> tuple[HostDir, HostDir, WhiteoutWriter]:
        if self.upper is None or self.work is None or self.writer is None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return self.upper, self.work, self.writer

    def _upper_ino(self, path: str, st: os.stat_result) -> int:
        """The st_ino of an upper object: its recorded origin where it was copied up, else its own."""
        cached = self.cache.get_ino(path)
        if cached is not None:
            return cached
        ino = self._read_upper_ino(path, st)
        self.cache.put_ino(path, ino)
        return ino

    def _read_upper_ino(self, path: str, st: os.stat_result) -> int:
        try:
            value = self.upper.getxattr(path, self.origin_xattr) if self.upper else None
        except OSError:
            value = None
        return self._origin_ino(value, st)

    def _origin_ino(self, value: bytes | None, st: os.stat_result) -> int:
        """The st_ino of an upper object whose origin xattr is ``value`` (None: not copied up)."""
        if value:
            try:
                return int(value)
            except ValueError:
                pass
        return self._ino(0, st.st_ino)

    def _note_links(self, path: str, st: os.stat_result) -> None:
        """Remember the names seen of an upper non-directory with several links."""
        if st.st_nlink > 1 and not stat_mod.S_ISDIR(st.st_mode):
            self._links.setdefault((st.st_dev, st.st_ino), set()).add(path)

    def _touch_links(self, path: str, st: os.stat_result | None = None) -> None:
        """After ``path`` changed: tell :attr:`invalidate` about the other known names of the same inode."""
        if st is None:
            if self.upper is None:
                return
            st = self.upper.try_lstat(path)
            if st is None:
                return
        names = self._links.get((st.st_dev, st.st_ino))
        if not names:
            return
        for other in list(names):
            if other != path:
                self.invalidate(other)
        if st.st_nlink <= 1:
            names.clear()

    def _host(self, node: Node) -> HostDir:
        return self.resolver.hosts[node.layer]

    def _lower_has(self, parent: DirState, name: str) -> bool:
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
            node = self._node(path)
            if node.upper:
                assert self.upper is not None
                st = self.upper.lstat(path)
                return self._upper_attrs(path, node, st, self._upper_ino(path, st))
            cached = self.cache.get_attrs(path)
            if cached is not None:
                return cached
            st = self._host(node).lstat(path)
            merged = node.is_dir and len(node.chain) > 1 and self._merged(path)
            attrs = self._attrs(st, self._ino(node.layer, st.st_ino), 1 if merged else None)
            self.cache.put_attrs(path, attrs)
            return attrs

    def getattr_children(self, path: str, names: list[str]) -> list[Attr | None]:
        """:meth:`getattr` of each of ``names`` inside directory ``path`` (None for a name not visible any
        more), for a listing that carries attributes.  The same answers, but the upper objects of the
        directory are read through one descriptor of it: two system calls per name instead of nine."""
        with self.lock:
            state = self.resolver.dir_state(path)
            if state is None:
                self._node(path)  # ENOENT/ENOTDIR as getattr would say
                raise _err(errno.ENOTDIR, path)
            out: list[Attr | None] = [None] * len(names)
            upper: list[tuple[int, str, Node]] = []
            for index, name in enumerate(names):
                node = self.resolver.child(state, name)
                if node is None:
                    continue
                if node.upper:
                    upper.append((index, name, node))
                else:
                    out[index] = self.getattr(join(path, name))
            if upper:
                assert self.upper is not None
                stats = self.upper.lstat_children(path, [name for _, name, _ in upper])
                unknown = [(i, name) for (i, name, _), st in zip(upper, stats, strict=True)
                           if st is not None and self.cache.get_ino(join(path, name)) is None]
                origins = dict(zip((i for i, _ in unknown),
                                   self.upper.getxattr_children(path, [name for _, name in unknown],
                                                                self.origin_xattr), strict=True))
                for (index, name, node), st in zip(upper, stats, strict=True):
                    if st is None:
                        continue
                    child = join(path, name)
                    ino = self.cache.get_ino(child)
                    if ino is None:
                        ino = self._origin_ino(origins[index], st)
                        self.cache.put_ino(child, ino)
                    out[index] = self._upper_attrs(child, node, st, ino)
            return out

    def _upper_attrs(self, path: str, node: Node, st: os.stat_result, ino: int) -> Attr:
        """The attributes of upper object ``path`` from its ``lstat`` and union inode number (never cached:
        the daemon's own writes change them)."""
        self._note_links(path, st)
        merged = node.is_dir and bool(node.chain) and self._merged(path)
        return self._attrs(st, ino, 1 if merged else None)

    def _merged(self, path: str) -> bool:
        """Is directory ``path`` merged from several layers?  The kernel then reports st_nlink 1."""
        state = self.resolver.dir_state(path)
        if state is None:
            return False
        return len(state.lower_layers) + (state.upper is not None) > 1

    def fgetattr(self, handle: Handle) -> Attr:
        """Attributes through an open handle (works after the name was unlinked)."""
        return self._attrs(os.fstat(handle.fd), handle.ino)

    def readlink(self, path: str) -> str:
        with self.lock:
            node = self._node(path)
            if node.kind != stat_mod.S_IFLNK:
                raise _err(errno.EINVAL, path)
            return self._host(node).readlink(path)

    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """The merged entries of directory ``path`` as ``(name, st_mode type bits, st_ino)``; ENOTDIR/ENOENT.

        The inode numbers agree with :meth:`getattr` except for an upper object renamed after copy-up."""
        with self.lock:
            state = self.resolver.dir_state(path)
            if state is None:
                self._node(path)
                raise _err(errno.ENOTDIR, path)
            out = []
            upper = state.upper or {}
            for name in state.visible_names():
                kind = upper.get(name)
                if kind is None:
                    low = state.lower[name]
                    out.append((name, low.kind, self._ino(low.layer, low.ino)))
                    continue
                child = join(path, name)
                ino = self.cache.get_ino(child)
                if ino is None:
                    assert self.upper is not None
                    ino = self._upper_ino(child, self.upper.lstat(child))
                out.append((name, kind, ino))
            return out

    def access(self, path: str, mode: int) -> None:
        with self.lock:
            self._node(path)
            if mode & os.W_OK and self.upper is None:
                raise _err(errno.EROFS, path)

    def statfs(self) -> dict[str, int]:
        host = self.upper or self.stack.lowers[0].host
        sv = host.statvfs()
        return {
            "f_bsize": sv.f_bsize, "f_frsize": sv.f_frsize, "f_blocks": sv.f_blocks, "f_bfree": sv.f_bfree,
            "f_bavail": sv.f_bavail, "f_files": sv.f_files, "f_ffree": sv.f_ffree, "f_favail": sv.f_favail,
            "f_namemax": sv.f_namemax,
        }

    # ================================================================== xattrs
    def getxattr(self, path: str, name: str) -> bytes:
        value = self.xattr(path, name)
        if value is None:
            raise _err(errno.ENODATA, path)
        return value

    def xattr(self, path: str, name: str) -> bytes | None:
        """:meth:`getxattr`, but None where ``path`` has no such attribute (ENODATA) instead of raising: a
        tree walk asks every entry for ``security.capability``, and most have none."""
        with self.lock:
            node = self._node(path)
            host_name = xattr_to_host(name)
            if host_name is None:
                return None
            if not node.upper:
                return self._lower_xattrs(path, node).get(host_name)
            try:
                return self._host(node).getxattr(path, host_name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return None
                raise

    def listxattr(self, path: str) -> list[str]:
        with self.lock:
            node = self._node(path)
            host_names = self._host(node).listxattr(path) if node.upper else self._lower_xattrs(path, node)
            if not host_names:
                return []
            names = (xattr_from_host(n) for n in host_names)
            return [n for n in names if n is not None]

    def _lower_xattrs(self, path: str, node: Node) -> dict[str, bytes]:
        """All xattrs of a lower object, read once and cached (lower layers never change)."""
        cached = self.cache.get_xattrs(path)
        if cached is not None:
            return cached
        host = self._host(node)
        values: dict[str, bytes] = {}
        try:
            names = host.listxattr(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            names = []
        for attr in names:
            value = host.try_getxattr(path, attr)
            if value is not None:
                values[attr] = value
        self.cache.put_xattrs(path, values)
        return values

    @_mutating
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        with self.lock:
            upper, _, _ = self._writable()
            self._node(path)
            host_name = xattr_to_host(name)
            if host_name is None:
                raise _err(errno.EPERM, path)
            self.copy_up(path)
            upper.setxattr(path, host_name, value, flags)

    @_mutating
    def removexattr(self, path: str, name: str) -> None:
        with self.lock:
            upper, _, _ = self._writable()
            node = self._node(path)
            host_name = xattr_to_host(name)
            if host_name is None:
                raise _err(errno.ENODATA, path)
            if not node.upper:
                self._host(node).getxattr(path, host_name)  # ENODATA before any copy-up
            self.copy_up(path)
            upper.removexattr(path, host_name)

    # ================================================================== copy-up
    def copy_up(self, path: str, *, data_limit: int | None = None) -> Node:
        """Make sure ``path`` has its top copy in the upper layer (parents first); returns its node.

        Call with the lock held.  ``data_limit`` as for :func:`copyup.stage_copy`.
        """
        upper, work, _ = self._writable()
        node = self._node(path)
        if node.upper:
            return node
        parent_path, name = split(path)
        parent = self._ensure_upper_dir(parent_path)
        host = self._host(node)
        st = host.lstat(path)
        # A lower hard link is broken by copy-up (as with the kernel's index=off): the copy then has an
        # inode of its own, so only objects with one link keep their origin's st_ino.
        keeps_origin = node.is_dir or st.st_nlink == 1
        origin = str(self._ino(node.layer, st.st_ino)).encode()
        tmp = join(WORK_SUBDIR, copyup.temp_name("copyup"))

        def mark(rel: str) -> None:
            if not keeps_origin:
                return
            try:
                work.setxattr(rel, self.origin_xattr, origin)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                    raise

        copyup.stage_copy(host, path, st, work, tmp, data_limit=data_limit, sync=not self.volatile, mark=mark)
        parent_times = upper.lstat(parent_path)
        try:
            copyup.publish(work, tmp, upper, path)
        except BaseException:
            copyup.remove_tree(work, tmp)
            raise
        # the parent's times stay as they were: a copy-up is not a change of the directory
        upper.utime(parent_path, (parent_times.st_atime_ns, parent_times.st_mtime_ns))
        self.cache.drop_ino(path)
        parent.upper_set(name, node.kind)
        own = self.cache.peek_dir(path)
        if own is not None:
            own.upper = {}
        self.cache.drop_attrs(path)
        if path in self._lower_handles:
            self._move_lower_handles(path)
        # st_nlink may change with the copy (a merged dir reports 1, a broken hard link its own count)
        self.invalidate(path)
        return Node(node.kind, True, 0, node.chain)

    def _ensure_upper_dir(self, path: str) -> DirState:
        """Copy up directory ``path`` and its parents as needed; returns its (updated) state."""
        node = self._node(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, path)
        if not node.upper:
            if path:
                self._ensure_upper_dir(split(path)[0])
            self.copy_up(path)
        state = self.resolver.dir_state(path)
        assert state is not None
        if state.upper is None:
            state.upper = {}
        return state

    # ================================================================== whiteouts
    def _replace_with_whiteout(self, path: str, *, is_dir: bool) -> None:
        """Atomically turn upper ``path`` (an object or nothing) into a whiteout."""
        upper, work, writer = self._writable()
        present = upper.try_lstat(path) is not None
        if writer.format is WhiteoutFormat.KERNEL:
            tmp = writer.make_whiteout_in_work(copyup.temp_name("wh"))
            if not present:
                work.rename(tmp, path, RENAME_NOREPLACE, dst_dir=upper)
            elif is_dir:
                work.rename(tmp, path, RENAME_EXCHANGE, dst_dir=upper)
                copyup.remove_tree(work, tmp)
            else:
                work.rename(tmp, path, dst_dir=upper)
            return
        wh = writer.whiteout_rel(path)
        if upper.try_lstat(wh) is None:
            tmp = writer.make_whiteout_in_work(copyup.temp_name("wh"))
            work.rename(tmp, wh, RENAME_NOREPLACE, dst_dir=upper)
        if present:
            self._remove_upper(path, is_dir=is_dir)

    def _remove_upper(self, path: str, *, is_dir: bool) -> None:
        upper, work, _ = self._writable()
        if is_dir:
            tmp = join(WORK_SUBDIR, copyup.temp_name("rm"))
            upper.rename(path, tmp, dst_dir=work)
            copyup.remove_tree(work, tmp)
        else:
            upper.unlink(path)

    def _place_new(self, path: str, parent: DirState, build: Callable[[HostDir, str], None], kind: int,
                   mode: int | None = None) -> None:
        """Create a new object at ``path`` with ``build(host, rel)``; over a whiteout it is built in the
        work dir (made opaque if it is a directory), given what the parent would have given it (the group
        of a set-gid parent, the ACLs its default ACL makes of ``mode``; None: a symlink, which has no
        ACLs) and swapped in atomically."""
        upper, work, writer = self._writable()
        name = split(path)[1]
        self.cache.drop_ino(path)
        if name not in parent.upper_wh:
            build(upper, path)
            parent.upper_set(name, kind)
            return
        tmp = join(WORK_SUBDIR, copyup.temp_name("new"))
        build(work, tmp)
        try:
            parent_st = upper.lstat(split(path)[0])
            if parent_st.st_mode & stat_mod.S_ISGID:  # what the host does in a set-gid parent, done here
                bits = stat_mod.S_IMODE(work.lstat(tmp).st_mode)
                work.chown(tmp, -1, parent_st.st_gid)  # (which clears set-id bits: given back below)
                if kind == S_IFDIR:
                    work.chmod(tmp, bits | stat_mod.S_ISGID)
                elif kind != stat_mod.S_IFLNK and bits & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                    work.chmod(tmp, bits)
            default_acl = self._parent_default_acl(path) if mode is not None else None
            if default_acl is not None and mode is not None:
                work.setxattr(tmp, acl.ACCESS, default_acl)
                if kind == S_IFDIR:
                    work.setxattr(tmp, acl.DEFAULT, default_acl)
                kept = stat_mod.S_IMODE(work.lstat(tmp).st_mode) & stat_mod.S_ISGID
                work.chmod(tmp, acl.inherited_mode(default_acl, mode) | kept)
            if kind == S_IFDIR:
                writer.mark_opaque(work, tmp)
            if upper.try_lstat(path) is not None:  # a kernel-format whiteout, whatever format we write
                work.rename(tmp, path, RENAME_EXCHANGE, dst_dir=upper)
                work.unlink(tmp)
            else:
                work.rename(tmp, path, RENAME_NOREPLACE, dst_dir=upper)
        except BaseException:
            copyup.remove_tree(work, tmp)
            raise
        if writer.format is WhiteoutFormat.OCI:
            writer.remove_whiteout(path)
        parent.upper_set(name, kind)
        if kind == S_IFDIR:
            self.cache.invalidate_subtree(path)

    def _new_parent(self, path: str) -> DirState:
        """Checks for creating ``path``: EEXIST, ENAMETOOLONG, parent copied up; returns the parent state."""
        self._writable()
        if path == "":
            raise _err(errno.EEXIST, path)
        parent = self.resolver.lookup_parent(path)
        if self.resolver.child(parent, split(path)[1]) is not None:
            raise _err(errno.EEXIST, path)
        _check_name(path)
        self._check_representable(path)
        return self._ensure_upper_dir(split(path)[0])

    def _creation_mode(self, path: str, mode: int, umask: int) -> int:
        """The mode to create ``path`` with.  With POSIX ACLs on, the kernel leaves the caller's ``umask``
        to the file system: it applies unless the parent (already in the upper layer) has a default ACL,
        which then decides instead (the host applies it; see :meth:`_place_new`)."""
        if not umask or self._parent_default_acl(path) is not None:
            return mode
        return mode & ~(umask & 0o777)

    def _parent_default_acl(self, path: str) -> bytes | None:
        """The default ACL of the upper copy of ``path``'s parent, if it has one."""
        assert self.upper is not None
        return self.upper.try_getxattr(split(path)[0], acl.DEFAULT)

    def _check_representable(self, path: str) -> None:
        """Names that are whiteout markers in the OCI format (``.wh.*``) cannot be created: every layer,
        the upper included, is read in every format, so such a file would turn into a marker (EPERM).
        A deliberate difference from the kernel, which knows only its own format (docs/semantics.md)."""
        if split(path)[1].startswith(WH_PREFIX):
            raise _err(errno.EPERM, path)

    def _stored_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """The caller's owner as the layers store it; EINVAL (before anything is created) if unmapped."""
        return (uid, gid) if self.idmap is None else self.idmap.stored(uid, gid)

    def _owner(self, host: HostDir, rel: str, uid: int, gid: int) -> None:
        """Give a new object its owner (already as stored: see :meth:`_stored_owner`); a set-gid parent keeps
        its group, as the host filesystem already gave it."""
        if uid == 0 and gid == 0:
            return
        parent_st = host.lstat(split(rel)[0])
        if parent_st.st_mode & stat_mod.S_ISGID:
            gid = -1
        host.chown(rel, uid, gid)

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
                self._owner(host, rel, uid, gid)
                if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                    os.fchmod(fd, stat_mod.S_IMODE(mode))

            self._place_new(path, parent, build, stat_mod.S_IFREG, mode)
            fd = fds[0]
            assert self.upper is not None
            return Handle(fd, path, self._ino(0, os.fstat(fd).st_ino), True)

    @_mutating
    def mkdir(self, path: str, mode: int, uid: int = 0, gid: int = 0, umask: int = 0) -> None:
        uid, gid = self._stored_owner(uid, gid)
        with self.lock:
            parent = self._new_parent(path)
            mode = self._creation_mode(path, mode, umask)

            def build(host: HostDir, rel: str) -> None:
                host.mkdir(rel, stat_mod.S_IMODE(mode))
                self._owner(host, rel, uid, gid)
                if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID | stat_mod.S_ISVTX):
                    host.chmod(rel, stat_mod.S_IMODE(mode) | (host.lstat(rel).st_mode & stat_mod.S_ISGID))

            self._place_new(path, parent, build, S_IFDIR, mode)
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
                self._owner(host, rel, uid, gid)

            self._place_new(path, parent, build, kind, mode)

    @_mutating
    def symlink(self, target: str, path: str, uid: int = 0, gid: int = 0) -> None:
        uid, gid = self._stored_owner(uid, gid)
        with self.lock:
            parent = self._new_parent(path)

            def build(host: HostDir, rel: str) -> None:
                host.symlink(target, rel)
                self._owner(host, rel, uid, gid)

            self._place_new(path, parent, build, stat_mod.S_IFLNK)

    @_mutating
    def link(self, src: str, dst: str) -> None:
        """Hard link ``dst`` to the object at ``src`` (copied up first, as the kernel does)."""
        with self.lock:
            node = self._node(src)
            if node.is_dir:
                raise _err(errno.EPERM, src)
            parent = self._new_parent(dst)
            self.copy_up(src)
            assert self.upper is not None
            upper = self.upper

            def build(host: HostDir, rel: str) -> None:
                host.link(src, rel, src_dir=upper)

            self._place_new(dst, parent, build, node.kind)
            self.cache.drop_attrs(src)
            st = upper.lstat(dst)
            self._note_links(src, st)
            self._note_links(dst, st)
            self._touch_links(dst, st)

    # ================================================================== removing
    @_mutating
    def unlink(self, path: str) -> None:
        with self.lock:
            self._writable()
            node = self._node(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            parent_path, name = split(path)
            parent = self._ensure_upper_dir(parent_path)
            old = self.upper.try_lstat(path) if node.upper and self.upper else None
            if self._lower_has(parent, name):
                self._replace_with_whiteout(path, is_dir=False)
                parent.upper_whiteout(name)
            else:
                self._remove_upper(path, is_dir=False)
                parent.upper_remove(name)
            self.cache.drop_attrs(path)
            self.cache.drop_ino(path)
            if old is not None and old.st_nlink > 1:
                self._links.get((old.st_dev, old.st_ino), set()).discard(path)
                self._touch_links(path, old)

    @_mutating
    def rmdir(self, path: str) -> None:
        with self.lock:
            self._writable()
            if path == "":
                raise _err(errno.EBUSY, path)
            node = self._node(path)
            if not node.is_dir:
                raise _err(errno.ENOTDIR, path)
            if self.resolver.listdir(path):
                raise _err(errno.ENOTEMPTY, path)
            parent_path, name = split(path)
            parent = self._ensure_upper_dir(parent_path)
            if self._lower_has(parent, name):
                self._replace_with_whiteout(path, is_dir=True)
                parent.upper_whiteout(name)
            else:
                self._remove_upper(path, is_dir=True)
                parent.upper_remove(name)
            self.cache.invalidate_subtree(path)

    # ================================================================== rename
    @_mutating
    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        """rename(2)/renameat2(2) with the kernel overlayfs's rules: a directory that is not purely upper
        answers EXDEV (the kernel's default without ``redirect_dir``)."""
        with self.lock:
            upper, work, writer = self._writable()
            if flags == RENAME_EXCHANGE:
                self._exchange(src, dst)
                return
            if flags & ~RENAME_NOREPLACE:
                raise _err(errno.EINVAL, dst)
            snode = self._node(src)
            if src == "" or dst == "":
                raise _err(errno.EBUSY, src)
            dparent = self.resolver.lookup_parent(dst)
            dname = split(dst)[1]
            _check_name(dst)
            dnode = self.resolver.child(dparent, dname)
            self._check_representable(dst)
            if dst == src:
                return
            if dnode is not None and snode.upper and dnode.upper and not snode.is_dir:
                sst, dst_st = upper.lstat(src), upper.lstat(dst)
                if (sst.st_dev, sst.st_ino) == (dst_st.st_dev, dst_st.st_ino):
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
            if snode.is_dir:
                sstate = self.resolver.dir_state(src)
                if not snode.upper or (sstate is not None and sstate.lower_layers):
                    raise _err(errno.EXDEV, src)
            if dnode is not None and dnode.is_dir and self.resolver.listdir(dst):
                raise _err(errno.ENOTEMPTY, dst)
            sparent_path, sname = split(src)
            if writer.format is WhiteoutFormat.OCI and len(os.fsencode(WH_PREFIX + sname)) > NAME_MAX \
                    and self._lower_has(self.resolver.lookup_parent(src), sname):
                raise _err(errno.ENAMETOOLONG, src)  # its whiteout could not be written: change nothing
            sparent = self._ensure_upper_dir(sparent_path)
            snode = self.copy_up(src)
            dparent = self._ensure_upper_dir(split(dst)[0])
            src_needs_wh = self._lower_has(sparent, sname)
            dst_lower = self._lower_has(dparent, dname)
            # Clear what the upper holds at dst: an (empty-looking) upper dir with only whiteouts inside,
            # a whiteout of either format.
            dst_upper = upper.try_lstat(dst)
            if dnode is not None and dnode.is_dir and dnode.upper:
                tmp = join(WORK_SUBDIR, copyup.temp_name("rm"))
                upper.rename(dst, tmp, dst_dir=work)
                copyup.remove_tree(work, tmp)
                dst_upper = None
            if snode.is_dir and dst_lower:
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
                    self._replace_with_whiteout(src, is_dir=False)
            if writer.format is WhiteoutFormat.OCI:
                writer.remove_whiteout(dst)
            if src_needs_wh:
                sparent.upper_whiteout(sname)
            else:
                sparent.upper_remove(sname)
            dparent.upper_set(dname, snode.kind)
            self.cache.invalidate_subtree(src)
            self.cache.invalidate_subtree(dst)

    def _exchange(self, a: str, b: str) -> None:
        """renameat2(RENAME_EXCHANGE): swap two existing names.  Both are copied up first (a directory must
        be purely upper, else EXDEV as for rename); no whiteout is needed since both names stay."""
        upper, _, writer = self._writable()
        anode, bnode = self._node(a), self._node(b)
        if "" in (a, b):
            raise _err(errno.EBUSY, a)
        for path in (a, b):
            _check_name(path)
            self._check_representable(path)
        if a == b:
            return
        if (anode.is_dir and b.startswith(a + "/")) or (bnode.is_dir and a.startswith(b + "/")):
            raise _err(errno.EINVAL, b)
        for path, node in ((a, anode), (b, bnode)):
            if node.is_dir:
                state = self.resolver.dir_state(path)
                if not node.upper or (state is not None and state.lower_layers):
                    raise _err(errno.EXDEV, path)
        aparent = self._ensure_upper_dir(split(a)[0])
        bparent = self._ensure_upper_dir(split(b)[0])
        anode, bnode = self.copy_up(a), self.copy_up(b)
        # a directory moving onto a name a lower layer has must hide that lower copy
        if anode.is_dir and self._lower_has(bparent, split(b)[1]):
            writer.mark_opaque(upper, a)
        if bnode.is_dir and self._lower_has(aparent, split(a)[1]):
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
            self._node(path)
            self.copy_up(path)
            assert self.upper is not None
            self.upper.chmod(path, stat_mod.S_IMODE(mode))
            self._touch_links(path)

    @_mutating
    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.lock:
            self._node(path)
            if self.idmap is not None:
                uid, gid = self.idmap.stored(uid, gid)
            self.copy_up(path)
            assert self.upper is not None
            self.upper.chown(path, uid, gid)
            self._touch_links(path)

    @_mutating
    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Set times in ns; None means "now" for both (utime(NULL)); UTIME_OMIT / UTIME_NOW are honoured."""
        with self.lock:
            self._node(path)
            self.copy_up(path)
            assert self.upper is not None
            st = self.upper.lstat(path)
            now = time.time_ns()

            def pick(value: int | None, current: int) -> int:
                if value is None or value == UTIME_NOW:
                    return now
                if value == UTIME_OMIT:
                    return current
                return value

            self.upper.utime(path, (pick(atime_ns, st.st_atime_ns), pick(mtime_ns, st.st_mtime_ns)))
            self._touch_links(path, st)

    @_mutating
    def truncate(self, path: str, length: int) -> None:
        with self.lock:
            node = self._node(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            if node.kind != stat_mod.S_IFREG:
                raise _err(errno.EINVAL, path)  # as vfs_truncate; opening a fifo to truncate it would block
            self.copy_up(path, data_limit=length)
            assert self.upper is not None
            self.upper.truncate(path, length)
            self._touch_links(path)

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
            node = self._node(path)
            if write:
                if node.is_dir:
                    raise _err(errno.EISDIR, path)
                truncating = bool(flags & os.O_TRUNC)
                node = self.copy_up(path, data_limit=0 if truncating else None)
            host = self._host(node)
            fd = host.open(path, host_flags)
            try:
                st = os.fstat(fd)
                ino = self._upper_ino(path, st) if node.upper else self._ino(node.layer, st.st_ino)
            except BaseException:
                os.close(fd)
                raise
            handle = Handle(fd, path, ino, node.upper, host_flags)
            if not node.upper and node.kind == stat_mod.S_IFREG and self.upper is not None:
                self._lower_handles.setdefault(path, set()).add(fd)
                self._handles_by_fd[fd] = handle
            return handle

    def _move_lower_handles(self, path: str) -> None:
        """After ``path`` was copied up: point the read handles open on its lower copy at the upper one."""
        assert self.upper is not None
        for fd in self._lower_handles.pop(path, ()):
            handle = self._handles_by_fd.get(fd)
            if handle is None:
                continue
            new = self.upper.open(path, handle.flags)
            try:
                os.dup2(new, fd)
            finally:
                os.close(new)
            handle.upper = True

    def read(self, handle: Handle, size: int, offset: int) -> bytes:
        return os.pread(handle.fd, size, offset)

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

    def release(self, handle: Handle) -> None:
        """Close the handle; a file written through one name has its other names' kernel caches dropped."""
        if not handle.upper and handle.path in self._lower_handles:
            with self.lock:
                self._lower_handles.get(handle.path, set()).discard(handle.fd)
                self._handles_by_fd.pop(handle.fd, None)
        try:
            if handle.upper and self._links:
                st = os.fstat(handle.fd)
                if st.st_nlink > 1:
                    with self.lock:
                        self._touch_links(handle.path, st)
        finally:
            os.close(handle.fd)

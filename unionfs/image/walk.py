"""Directory-at-a-time access to a layer tree, on top of :class:`unionfs.fs.fsio.HostDir`.

Walking a whole tree (digest, commit, diff) through ``HostDir``'s path methods opens every parent again for
every entry.  Here a directory is opened once through ``HostDir`` (``openat2``, no symlink followed) and its
children are reached by *single-component* names relative to that descriptor, with ``O_NOFOLLOW`` /
``follow_symlinks=False``: the same guarantee (nothing outside the tree, no symlink followed), one syscall
per question.

:func:`read_dir` reads one layer directory the way :func:`unionfs.fs.whiteout.read_layer_dir` does (every
whiteout and opaque format), but keeps each child's ``lstat`` and non-private xattrs, which a walk needs.

Callers: the image-tooling modules (``digest``, ``commit``, ``changes``).  Errors are ``OSError`` from the
host with the path relative to the tree root.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections import OrderedDict
from dataclasses import dataclass, field

from unionfs.fs.fsio import HostDir, join
from unionfs.fs.whiteout import OPAQUE_XATTRS, dir_marks, is_private_xattr, is_whiteout, marker_name

Xattrs = tuple[tuple[str, bytes], ...]
"""Sorted ``(name, value)`` pairs."""

_XATTR_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)

OVERLAY_ONLY_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect", "trusted.overlay.metacopy",
                       "user.overlay.metacopy")
"""Private xattrs that make an upper entry depend on the lower layers it was mounted with (a renamed
directory's redirect, a metadata-only copy-up): such an entry cannot stand alone in a layer."""


class OpenDir:
    """One directory of a :class:`HostDir` tree, open for reading (and, in a tree we own, for writing).

    ``rel`` is the directory's path relative to the tree root (``""`` is the root).  Every method takes a
    single component ``name`` (``""`` meaning the directory itself where that makes sense).  Always close it
    (it is a context manager).
    """

    def __init__(self, host: HostDir, rel: str) -> None:
        self.rel = rel
        self.fd = host.open_dir_readable(rel)

    def __enter__(self) -> OpenDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def path(self, name: str) -> str:
        """The tree-relative path of child ``name`` (for messages and records)."""
        return join(self.rel, name) if name else self.rel

    def _target(self, name: str) -> str | int:
        """What the xattr calls act on: the directory's own descriptor for ``""`` (a ``/proc/self/fd/N``
        path with ``follow_symlinks=False`` would name the magic link itself), else the child through it."""
        return f"/proc/self/fd/{self.fd}/{name}" if name else self.fd

    # -- reading -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open child ``name`` without following a symlink (ELOOP if it is one)."""
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)

    def readlink(self, name: str) -> str:
        return os.readlink(name, dir_fd=self.fd)

    def getxattr(self, name: str, attr: str) -> bytes | None:
        """The value of ``attr`` on child ``name`` (``""``: this dir), or None where it is not set."""
        try:
            return os.getxattr(self._target(name), attr, follow_symlinks=bool(not name))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, *_XATTR_UNSUPPORTED):
                return None
            raise

    def xattr_names(self, name: str) -> list[str]:
        """All xattr names of child ``name`` (``""``: this dir); empty where xattrs are unsupported."""
        try:
            return os.listxattr(self._target(name), follow_symlinks=bool(not name))
        except OSError as exc:
            if exc.errno in _XATTR_UNSUPPORTED:
                return []
            raise

    def public_xattrs(self, name: str, names: list[str] | None = None) -> Xattrs:
        """The sorted non-private xattrs of child ``name`` (overlay-private ones are never part of a layer)."""
        out = []
        for attr in sorted(self.xattr_names(name) if names is None else names):
            if is_private_xattr(attr):
                continue
            value = self.getxattr(name, attr)
            if value is not None:
                out.append((attr, value))
        return tuple(out)

    # -- writing (only in trees this process owns, e.g. a store's staging dir) ------------------------------
    def mkdir(self, name: str, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=self.fd)

    def mknod(self, name: str, mode: int, device: int = 0) -> None:
        os.mknod(name, mode, device, dir_fd=self.fd)

    def symlink(self, target: str, name: str) -> None:
        os.symlink(target, name, dir_fd=self.fd)

    def chown(self, name: str, uid: int, gid: int) -> None:
        os.chown(name, uid, gid, dir_fd=self.fd, follow_symlinks=False)

    def chmod(self, name: str, mode: int) -> None:
        """chmod of a child this process just created and knows is not a symlink."""
        os.chmod(name, mode, dir_fd=self.fd)

    def utime(self, name: str, ns: tuple[int, int]) -> None:
        os.utime(name, ns=ns, dir_fd=self.fd, follow_symlinks=False)

    def setxattr(self, name: str, attr: str, value: bytes) -> None:
        os.setxattr(self._target(name), attr, value, follow_symlinks=bool(not name))

    def fsync(self) -> None:
        os.fsync(self.fd)


class DirCache:
    """A bounded set of open directories of one tree, for walks that visit entries in path order."""

    def __init__(self, host: HostDir, limit: int = 64) -> None:
        self.host = host
        self.limit = limit
        self._open: OrderedDict[str, OpenDir] = OrderedDict()

    def get(self, rel: str) -> OpenDir:
        """The open directory ``rel`` (opened on first use; the least recently used one is closed)."""
        found = self._open.get(rel)
        if found is not None:
            self._open.move_to_end(rel)
            return found
        opened = OpenDir(self.host, rel)
        self._open[rel] = opened
        if len(self._open) > self.limit:
            _, old = self._open.popitem(last=False)
            old.close()
        return opened

    def close(self) -> None:
        for opened in self._open.values():
            opened.close()
        self._open.clear()

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class Child:
    """A visible entry of a layer directory: its ``lstat`` and its sorted non-private xattrs."""

    name: str
    st: os.stat_result
    xattrs: Xattrs
    overlay_only: str | None = None
    """The first :data:`OVERLAY_ONLY_XATTRS` name set on the entry, if any."""


@dataclass(slots=True)
class Listing:
    """One layer directory as an overlay reads it.

    ``children`` are the visible entries sorted by their byte names (markers excluded), ``whiteouts`` the
    names this layer hides below it, ``opaque`` whether it hides the layers below entirely.  A name that is
    both an entry and a whiteout (possible with ``.wh.`` files) is an entry here and stays in
    ``whiteouts`` too: the caller decides (the union shows the entry and hides the lower copies).
    """

    opaque: bool = False
    children: list[Child] = field(default_factory=list)
    whiteouts: set[str] = field(default_factory=set)
    sockets: list[str] = field(default_factory=list)


def sort_key(name: str) -> bytes:
    """Names sort by their bytes on disk, the same on every machine and locale."""
    return os.fsencode(name)


def read_dir(d: OpenDir, *, with_xattrs: bool = True) -> Listing:
    """Read layer directory ``d``: visible children with stats (and xattrs), whiteouts, opacity.

    The formats read are those of :mod:`unionfs.fs.whiteout`: char 0/0 and ``.wh.NAME`` whiteouts, xattr
    whiteouts in a directory whose ``overlay.opaque`` is ``x``, opaque xattrs (``y``) and ``.wh..wh..opq``.
    Sockets are listed apart in ``sockets`` (an image layer does not hold them).  A child that vanishes
    while being read is skipped.
    """
    out = Listing()
    out.opaque, xwhiteouts = dir_marks(
        next((v for a in OPAQUE_XATTRS if (v := d.getxattr("", a)) is not None), None))
    for name in sorted(d.names(), key=sort_key):
        marker = marker_name(name)
        if marker is not None:
            if marker[0]:
                out.opaque = True
            else:
                out.whiteouts.add(marker[1])
            continue
        try:
            st = d.lstat(name)
        except FileNotFoundError:
            continue
        if is_whiteout(st, None):
            out.whiteouts.add(name)
            continue
        if stat_mod.S_ISSOCK(st.st_mode):
            out.sockets.append(name)
            continue
        names = d.xattr_names(name) if with_xattrs or xwhiteouts else []
        if xwhiteouts and is_whiteout(st, names.__contains__):
            out.whiteouts.add(name)
            continue
        xattrs = d.public_xattrs(name, names) if with_xattrs else ()
        overlay_only = next((a for a in names if a in OVERLAY_ONLY_XATTRS), None)
        out.children.append(Child(name, st, xattrs, overlay_only))
    return out

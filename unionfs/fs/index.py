"""The inode index (``index=on``): the names of a lower hard link stay one file across copy-up, in the kernel
overlayfs's on-disk format, so that an upper and work dir move between unionfs and the kernel both ways.

The format (the kernel's ``fs/overlayfs/``, checked against what it writes: ``tests/unit/test_index.py``):

- A *file handle* of an object is the ``struct ovl_fb`` of its host file handle: version 0, magic 0xfb, the
  total length, flags (0 for a lower object on a little-endian host, ``FLAG_PATH_UPPER`` for an upper one),
  the handle type, the 16-byte ``s_uuid`` of its file system, then the handle's bytes (``name_to_handle_at``).
- Copy-up of a lower non-directory with several links goes through the index: the copy is published as
  ``workdir/index/<hex of the lower object's handle>`` and linked from there to the upper name; a later
  copy-up of another name of the same lower inode links to that entry instead of copying.  The copy carries
  ``trusted.overlay.origin`` (the lower handle) and ``trusted.overlay.nlink`` (``"U%+d"``: the union's link
  count relative to the upper inode's, or ``"L%+d"`` relative to the lower one's).
- A name of a lower hard link that has not been copied up shows its index entry where there is one.
- At mount the upper root's ``trusted.overlay.origin`` must be the handle of the first lower layer's root and
  the index dir's ``trusted.overlay.upper`` the handle of the upper root (set where missing); a mismatch
  fails the mount with ESTALE, before anything is written.  Then the index dir is cleaned as the kernel
  cleans it (``ovl_indexdir_cleanup``): left-over temporary entries, stale entries (whose origin xattr does
  not match their name, or whose lower object is gone) and orphans (no name left in the union) go.

Paths are relative to the work dir (``index/<name>``) or union/upper paths; errors are ``OSError``.  Not
thread-safe: the union calls it under its lock.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from unionfs.fs.fsio import HostDir, join

INDEX_SUBDIR = "index"
ORIGIN_XATTR = "trusted.overlay.origin"
NLINK_XATTR = "trusted.overlay.nlink"
UPPER_XATTR = "trusted.overlay.upper"
IMPURE_XATTR = "trusted.overlay.impure"

FH_VERSION = 0
FH_MAGIC = 0xFB
FLAG_BIG_ENDIAN = 1
FLAG_ANY_ENDIAN = 2
FLAG_PATH_UPPER = 4
FLAG_ALL = FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN | FLAG_PATH_UPPER
FLAG_CPU_ENDIAN = FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
FB_HEADER = 21
"""version, magic, len, flags, type (one byte each) and the uuid (16): ``sizeof(struct ovl_fb)``."""


class FileHandle(NamedTuple):
    """A decoded ``struct ovl_fb``."""

    flags: int
    handle_type: int
    uuid: bytes
    fid: bytes


def encode_fh(handle_type: int, fid: bytes, uuid: bytes, *, upper: bool = False) -> bytes:
    """The ``struct ovl_fb`` of a host file handle (``name_to_handle_at``'s type and bytes) on the file system
    with ``uuid``, as the kernel stores it in ``trusted.overlay.origin``/``upper`` and names index entries."""
    if len(uuid) != 16 or FB_HEADER + len(fid) > 255:
        raise ValueError("a file handle needs a 16-byte uuid and at most 234 bytes of fid")
    flags = FLAG_CPU_ENDIAN | (FLAG_PATH_UPPER if upper else 0)
    return bytes((FH_VERSION, FH_MAGIC, FB_HEADER + len(fid), flags, handle_type)) + uuid + fid


def decode_fh(value: bytes) -> FileHandle | None:
    """The handle stored in ``value``; None for the kernel's "origin unknown" (a newer version, unknown
    flags, the other endianness); ValueError where it is not a file handle at all (the kernel's EINVAL)."""
    if len(value) < FB_HEADER or value[1] != FH_MAGIC or len(value) < value[2] or value[2] < FB_HEADER:
        raise ValueError("not an overlay file handle")
    flags = value[3]
    if value[0] > FH_VERSION or flags & ~FLAG_ALL:
        return None
    if not flags & FLAG_ANY_ENDIAN and (flags & FLAG_BIG_ENDIAN) != FLAG_CPU_ENDIAN:
        return None
    return FileHandle(flags, value[4], bytes(value[5:FB_HEADER]), bytes(value[FB_HEADER:value[2]]))


def index_name(fh: bytes) -> str:
    """The name of the index entry of the lower object whose handle is ``fh`` (``ovl_get_index_name``)."""
    return fh[:fh[2]].hex()


def parse_nlink(value: bytes | None) -> tuple[str, int] | None:
    """``trusted.overlay.nlink`` as (``"U"`` or ``"L"``, difference); None where it is missing or invalid."""
    if not value or len(value) < 3 or value[:1] not in (b"U", b"L") or value[1:2] not in (b"+", b"-"):
        return None
    try:
        return value[:1].decode(), int(value[1:].decode())
    except ValueError:
        return None


def format_nlink(union_nlink: int, upper_nlink: int) -> bytes:
    """The ``trusted.overlay.nlink`` that records ``union_nlink`` relative to the upper inode's count."""
    return f"U{union_nlink - upper_nlink:+d}".encode()


def union_nlink(value: bytes | None, *, upper_nlink: int, lower_nlink: int | None, fallback: int) -> int:
    """The union's link count of an indexed inode (``ovl_get_nlink``): the recorded difference applied to the
    upper (``U``) or lower (``L``) count; ``fallback`` where it is missing, invalid or not positive."""
    parsed = parse_nlink(value)
    if parsed is None:
        return fallback
    base = upper_nlink if parsed[0] == "U" else lower_nlink
    if base is None:
        return fallback
    nlink = base + parsed[1]
    return nlink if nlink > 0 else fallback


def index_error(code: int, message: str) -> OSError:
    """A mount-time error of the index, one line for the user (and the kernel's hint)."""
    return OSError(code, f"{message} (mount with index=off, or delete the work dir's index)")


class InodeIndex:
    """The index of a writable union whose work dir is ``work`` (see the module docstring).

    ``lowers`` maps each lower layer's index to its directory, ``order`` the lower indices top-down."""

    def __init__(self, *, upper: HostDir, work: HostDir, lowers: Mapping[int, HostDir],
                 order: Sequence[int]) -> None:
        if not order:
            raise ValueError("an index needs a lower layer")
        self.upper = upper
        self.work = work
        self.lowers = dict(lowers)
        self.order = tuple(order)
        self._uuids: dict[int, bytes] = {}
        """st_dev → s_uuid of the file systems seen."""
        self._fhs: dict[tuple[int, int], str] = {}
        """(layer, st_ino) of a lower hard link → its index name (lower layers never change)."""
        self.entries: set[str] = set()
        """Names in the index dir (kept in step by every change the union makes)."""
        self.seen: dict[str, set[str]] = {}
        """Index name → union paths seen of lower names of that inode (for the frontend's invalidations)."""

    # ------------------------------------------------------------------ handles
    def uuid_of(self, host: HostDir) -> bytes:
        uuid = self._uuids.get(host.dev)
        if uuid is None:
            try:
                uuid = host.fs_uuid()
            except OSError as exc:
                raise index_error(errno.EOPNOTSUPP, f"index=on: the file system of {host.path} does not tell "
                                  f"its uuid ({os.strerror(exc.errno or errno.ENOTTY)})") from None
            self._uuids[host.dev] = uuid
        return uuid

    def fh_of(self, host: HostDir, rel: str, *, upper: bool = False) -> bytes:
        """The overlay file handle of ``rel`` in ``host``."""
        handle_type, fid = host.file_handle(rel)
        return encode_fh(handle_type, fid, self.uuid_of(host), upper=upper)

    def name_of(self, layer: int, rel: str, st: os.stat_result, path: str | None = None) -> str:
        """The index name of the lower object ``rel`` of ``layer`` (lstat ``st``); ``path``, a union name of
        it, is remembered for invalidations."""
        key = (layer, st.st_ino)
        name = self._fhs.get(key)
        if name is None:
            name = index_name(self.fh_of(self.lowers[layer], rel))
            self._fhs[key] = name
        if path is not None:
            self.seen.setdefault(name, set()).add(path)
        return name

    @staticmethod
    def rel(name: str) -> str:
        """The path of index entry ``name`` in the work dir."""
        return join(INDEX_SUBDIR, name)

    def entry_stat(self, name: str) -> os.stat_result | None:
        """The lstat of index entry ``name`` where it exists (and is not a whiteout), else None."""
        if name not in self.entries:
            return None
        st = self.work.try_lstat(self.rel(name))
        if st is None or (stat_mod.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            return None
        return st

    def origin_stat(self, value: bytes | None) -> os.stat_result | None:
        """The lstat of the lower object an origin xattr names (in a lower layer on the file system with its
        uuid), None where it is unknown or gone."""
        if not value:
            return None
        try:
            fh = decode_fh(value)
        except ValueError:
            return None
        if fh is None or fh.flags & FLAG_PATH_UPPER:
            return None
        for index in self.order:
            host = self.lowers[index]
            if self.uuid_of(host) != fh.uuid:
                continue
            st = host.stat_by_handle(fh.handle_type, fh.fid)
            if st is not None:
                return st
        return None

    # ------------------------------------------------------------------ link counts
    def nlink_of_entry(self, name: str, st: os.stat_result, lower_nlink: int | None) -> int:
        """The union's link count of the inode of index entry ``name`` (lstat ``st``)."""
        value = self.work.try_getxattr(self.rel(name), NLINK_XATTR)
        return union_nlink(value, upper_nlink=st.st_nlink, lower_nlink=lower_nlink, fallback=st.st_nlink)

    def nlink_of_upper(self, host: HostDir, rel: str, st: os.stat_result) -> int:
        """The union's link count of upper non-directory ``rel`` (lstat ``st``): its own, or for an indexed
        one (``trusted.overlay.nlink`` set) the recorded one."""
        return self.nlink_of(st, functools.partial(host.try_getxattr, rel))

    def nlink_of(self, st: os.stat_result, getxattr: Callable[[str], bytes | None]) -> int:
        """The union's link count of an upper non-directory whose host object is ``st`` and whose xattrs
        ``getxattr`` reads (also one held after its names are gone): the recorded one of an indexed inode
        (an ``L`` record counts from its origin's links), else the host's."""
        value = getxattr(NLINK_XATTR)
        if value is None:
            return st.st_nlink
        lower = None
        if value[:1] == b"L":
            origin = self.origin_stat(getxattr(ORIGIN_XATTR))
            lower = origin.st_nlink if origin is not None else None
        return union_nlink(value, upper_nlink=st.st_nlink, lower_nlink=lower, fallback=st.st_nlink)

    def indexed_name(self, host: HostDir, rel: str, st: os.stat_result) -> str | None:
        """The index name of upper non-directory ``rel`` (lstat ``st``) where it is a link of an index entry
        (the kernel's ``OVL_INDEX``: the entry named by its origin is the same inode), else None."""
        if st.st_nlink < 2 or stat_mod.S_ISDIR(st.st_mode):
            return None
        origin = host.try_getxattr(rel, ORIGIN_XATTR)
        if not origin or len(origin) < FB_HEADER:
            return None
        name = index_name(origin)
        entry = self.entry_stat(name)
        if entry is None or (entry.st_dev, entry.st_ino) != (st.st_dev, st.st_ino):
            return None
        return name

    def record_nlink(self, name: str, union: int) -> None:
        """Record ``union`` as the union's link count of index entry ``name``'s inode; at 0 the entry goes,
        as the kernel's ``ovl_cleanup_index`` removes it (or, where upper names are still linked, the
        count is set to theirs, its safety rule)."""
        rel = self.rel(name)
        st = self.work.lstat(rel)
        if union <= 0:
            if st.st_nlink == 1:
                self.work.unlink(rel)
                self.entries.discard(name)
                self.seen.pop(name, None)
                return
            union = st.st_nlink - 1
        self.work.setxattr(rel, NLINK_XATTR, format_nlink(union, st.st_nlink))

    # ------------------------------------------------------------------ mount
    def verify(self) -> None:
        """The mount-time checks that write nothing: the upper root's origin, the index dir's upper handle
        and the names of the index entries.  ESTALE (a different lower stack or upper), EINVAL (an entry
        that is not the kernel's), as the kernel fails such a mount."""
        lower_root = self.fh_of(self.lowers[self.order[0]], "")
        stored = self.upper.try_getxattr("", ORIGIN_XATTR)
        if stored and self._known(stored) and stored != lower_root:
            raise index_error(errno.ESTALE, "failed to verify upper root origin")
        if self.work.try_lstat(INDEX_SUBDIR) is None:
            return
        upper_root = self.fh_of(self.upper, "", upper=True)
        stored = self.work.try_getxattr(INDEX_SUBDIR, UPPER_XATTR)
        if stored and self._known(stored) and stored != upper_root:
            raise index_error(errno.ESTALE, "failed to verify index dir 'upper' xattr")
        for name, _kind, _ino in self.work.scandir(INDEX_SUBDIR):
            if name.startswith("#"):
                continue
            if self._name_fh(name) is None:  # a newer format: the kernel fails the mount too
                raise index_error(errno.ENODATA, f"failed to verify index entry {name}: unknown format")
            st = self.work.lstat(self.rel(name))
            if stat_mod.S_ISDIR(st.st_mode) or (stat_mod.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                continue
            if self.work.try_getxattr(self.rel(name), ORIGIN_XATTR) is None:
                raise index_error(errno.ENODATA, f"failed to verify index entry {name}: no origin")

    def setup(self) -> None:
        """After :meth:`verify`: record the handles that are missing, make the index dir, clean it as the
        kernel does at mount, and read its entries."""
        if self.upper.try_getxattr("", ORIGIN_XATTR) is None:
            self.upper.setxattr("", ORIGIN_XATTR, self.fh_of(self.lowers[self.order[0]], ""))
        if self.work.try_lstat(INDEX_SUBDIR) is None:
            self.work.mkdir(INDEX_SUBDIR, 0)
        if self.work.try_getxattr(INDEX_SUBDIR, UPPER_XATTR) is None:
            self.work.setxattr(INDEX_SUBDIR, UPPER_XATTR, self.fh_of(self.upper, "", upper=True))
        self.entries = set()
        for name, _kind, _ino in self.work.scandir(INDEX_SUBDIR):
            if self._stale(name):
                self.work.remove_tree(self.rel(name))
            else:
                self.entries.add(name)

    @staticmethod
    def _known(value: bytes) -> bool:
        """Is a stored handle one the kernel compares (not "origin unknown")?"""
        try:
            return decode_fh(value) is not None
        except ValueError:
            return True

    def _name_fh(self, name: str) -> FileHandle | None:
        """The handle an index entry's name spells; EINVAL where it spells none (the kernel fails the mount)."""
        try:
            raw = bytes.fromhex(name)
            if len(name) < 2 * FB_HEADER or len(raw) < raw[2]:
                raise ValueError(name)
            return decode_fh(raw)
        except ValueError:
            raise index_error(errno.EINVAL, f"failed to verify index entry {name}: not a file handle") from None

    def _stale(self, name: str) -> bool:
        """Does the kernel's mount-time cleanup remove index entry ``name``: a temporary one, one whose origin
        does not match its name, or a non-directory with no name left (its lower object gone, or the union's
        count 0)?"""
        if name.startswith("#"):
            return True
        rel = self.rel(name)
        st = self.work.lstat(rel)
        if stat_mod.S_ISDIR(st.st_mode) or (stat_mod.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            return False
        origin = self.work.try_getxattr(rel, ORIGIN_XATTR)
        if origin is None or origin[:origin[2] if len(origin) > 2 else 0].hex() != name:
            return True
        if st.st_nlink != 1:
            return False
        lower = self.origin_stat(origin)
        if lower is None:
            return True
        return union_nlink(self.work.try_getxattr(rel, NLINK_XATTR), upper_nlink=st.st_nlink,
                           lower_nlink=lower.st_nlink, fallback=0) == 0 or lower.st_nlink == 1

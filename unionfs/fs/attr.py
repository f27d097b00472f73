"""The attribute record the core answers with: what ``lstat`` says of a union object, as the union shows it.

:class:`Attr` holds the ``st_*`` fields of ``stat(2)`` with the union's inode number, owner (after id mapping)
and link count; times are in nanoseconds (``st_atime_ns`` …, as ``os.stat_result`` names them).  The core
hands the same record out again for a cached lower object (lower layers never change), so a caller must not
change its fields.  Each frontend packs it into its own wire form (a ``struct stat``, a ``fuse_attr``) and may
keep that packed form in :attr:`Attr.packed`, the one slot meant for it.

A cache that keeps records of many objects keeps them in their compact form (:func:`compact`: the twelve
fields in one 120-byte ``bytes``, against some 450 bytes for a record with its int objects and a packed
form) and makes the record again when asked (:func:`from_compact`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field


@dataclass(slots=True)
class Attr:
    """Attributes of one union object (see the module docstring).  Treat the ``st_*`` fields as read-only."""

    st_mode: int
    st_ino: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blocks: int
    st_blksize: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    packed: bytes | None = field(default=None, compare=False, repr=False)
    """A frontend's packed form of this record, made once and reused while the core hands the record out."""


def attr_of(st: os.stat_result, *, ino: int, uid: int, gid: int, nlink: int | None = None) -> Attr:
    """The record of host ``st`` shown with the union's ``ino``, owner and (where given) link count."""
    return Attr(st.st_mode, ino, st.st_nlink if nlink is None else nlink, uid, gid, st.st_rdev, st.st_size,
                st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


_COMPACT = struct.Struct("=IIIQQQqqqqqq")
"""mode, uid, gid; ino, nlink, rdev; size, blocks, blksize, atime, mtime, ctime (ns): the compact record."""


def compact(attr: Attr) -> bytes | None:
    """``attr``'s fields in one ``bytes`` (no ``packed`` form); None for a value out of the record's ranges
    (a negative owner, say), which a cache then does not keep."""
    try:
        return _COMPACT.pack(attr.st_mode, attr.st_uid, attr.st_gid, attr.st_ino, attr.st_nlink, attr.st_rdev,
                             attr.st_size, attr.st_blocks, attr.st_blksize, attr.st_atime_ns, attr.st_mtime_ns,
                             attr.st_ctime_ns)
    except struct.error:
        return None


def from_compact(record: bytes) -> Attr:
    """The record :func:`compact` made ``record`` from (a new one, with no ``packed`` form yet)."""
    mode, uid, gid, ino, nlink, rdev, size, blocks, blksize, atime, mtime, ctime = _COMPACT.unpack(record)
    return Attr(mode, ino, nlink, uid, gid, rdev, size, blocks, blksize, atime, mtime, ctime)

"""The attribute record the core answers with: what ``lstat`` says of a union object, as the union shows it.

:class:`Attr` holds the ``st_*`` fields of ``stat(2)`` with the union's inode number, owner (after id mapping)
and link count; times are in nanoseconds (``st_atime_ns`` …, as ``os.stat_result`` names them).  A caller
must not change its fields (the core may hand the same record out again).  Each frontend packs it into its
own wire form (a ``struct stat``, a ``fuse_attr``) and may keep that packed form in :attr:`Attr.packed`, the
one slot meant for it.

A cache that keeps records of many objects keeps them in their compact form (:func:`compact`: the twelve
fields in one 112-byte ``bytes``, against some 450 bytes for a record with its int objects and a packed
form) and makes the record again when asked (:func:`from_compact`).
"""

from __future__ import annotations

import os
import struct

_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blocks", "st_blksize",
           "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


class Attr:
    """Attributes of one union object (see the module docstring).  Treat the ``st_*`` fields as read-only.

    Two records are equal when their ``st_*`` fields are (``packed`` is not compared).  (A plain class with
    ``__slots__``, not a dataclass: the daemon makes one per request, and importing :mod:`dataclasses` is a
    good part of a mount's start-up.)"""

    __slots__ = (*_FIELDS, "packed")

    def __init__(self, st_mode: int, st_ino: int, st_nlink: int, st_uid: int, st_gid: int, st_rdev: int,
                 st_size: int, st_blocks: int, st_blksize: int, st_atime_ns: int, st_mtime_ns: int,
                 st_ctime_ns: int, packed: bytes | None = None) -> None:
        self.st_mode = st_mode
        self.st_ino = st_ino
        self.st_nlink = st_nlink
        self.st_uid = st_uid
        self.st_gid = st_gid
        self.st_rdev = st_rdev
        self.st_size = st_size
        self.st_blocks = st_blocks
        self.st_blksize = st_blksize
        self.st_atime_ns = st_atime_ns
        self.st_mtime_ns = st_mtime_ns
        self.st_ctime_ns = st_ctime_ns
        self.packed = packed
        """A frontend's packed form of this record, made once and reused while the core hands the record out."""

    def fields(self) -> tuple[int, ...]:
        """The ``st_*`` fields in the order of the constructor's parameters."""
        return (self.st_mode, self.st_ino, self.st_nlink, self.st_uid, self.st_gid, self.st_rdev, self.st_size,
                self.st_blocks, self.st_blksize, self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns)

    def replace(self, **changes: int) -> Attr:
        """A new record with ``changes`` (``st_*`` names) applied; TypeError for another name."""
        values = dict(zip(_FIELDS, self.fields(), strict=True))
        for name, value in changes.items():
            if name not in values:
                raise TypeError(f"Attr has no field {name!r}")
            values[name] = value
        return from_fields(tuple(values[name] for name in _FIELDS))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Attr):
            return NotImplemented
        return self.fields() == other.fields()

    __hash__ = None  # type: ignore[assignment]  # mutable (packed), as the dataclass was

    def __repr__(self) -> str:
        return "Attr(" + ", ".join(f"{name}={value}" for name, value in zip(_FIELDS, self.fields(), strict=True)) + ")"


def attr_of(st: os.stat_result, *, ino: int, uid: int, gid: int, nlink: int | None = None) -> Attr:
    """The record of host ``st`` shown with the union's ``ino``, owner and (where given) link count."""
    return Attr(st.st_mode, ino, st.st_nlink if nlink is None else nlink, uid, gid, st.st_rdev, st.st_size,
                st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


_COMPACT = struct.Struct("=IIIIIQQqqqqq")
"""mode, uid, gid, nlink, blksize; ino, rdev; size, blocks, atime, mtime, ctime (ns): the compact record
(76 bytes, a 112-byte ``bytes``)."""


def compact(attr: Attr) -> bytes | None:
    """``attr``'s fields in one ``bytes`` (no ``packed`` form); None for a value out of the record's ranges
    (a negative owner, say), which a cache then does not keep."""
    try:
        return _COMPACT.pack(attr.st_mode, attr.st_uid, attr.st_gid, attr.st_nlink, attr.st_blksize, attr.st_ino,
                             attr.st_rdev, attr.st_size, attr.st_blocks, attr.st_atime_ns, attr.st_mtime_ns,
                             attr.st_ctime_ns)
    except struct.error:
        return None


def from_fields(fields: tuple[int, ...]) -> Attr:
    """The record with ``fields`` (as :meth:`Attr.fields` gives them)."""
    mode, ino, nlink, uid, gid, rdev, size, blocks, blksize, atime, mtime, ctime = fields
    return Attr(mode, ino, nlink, uid, gid, rdev, size, blocks, blksize, atime, mtime, ctime)


def from_compact(record: bytes) -> Attr:
    """The record :func:`compact` made ``record`` from (a new one, with no ``packed`` form yet)."""
    mode, uid, gid, nlink, blksize, ino, rdev, size, blocks, atime, mtime, ctime = _COMPACT.unpack(record)
    return Attr(mode, ino, nlink, uid, gid, rdev, size, blocks, blksize, atime, mtime, ctime)

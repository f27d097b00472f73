"""The FUSE kernel protocol (``include/uapi/linux/fuse.h``) as ``struct.Struct`` layouts and constants.

Only what this daemon speaks: protocol 7.x with x >= 31 (kernel 5.10); newer features are used where the
kernel's INIT offers them (:func:`negotiate`).  Every layout is little-endian with the C sizes checked in
``tests/unit/test_lowlevel_abi.py``.  Attribute packing lives in ONE function, :func:`pack_attr`.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from unionfs.fs.attr import Attr

KERNEL_MAJOR: Final = 7
KERNEL_MINOR: Final = 45
"""The newest protocol minor this code knows; the kernel's INIT may offer less (never below :data:`MIN_MINOR`)."""
MIN_MINOR: Final = 31
ROOT_ID: Final = 1

# -- opcodes ------------------------------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = 27, 28, 29, 30, 31, 32, 33, 34, 35
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE = 36, 37, 38, 39, 40, 41, 42, 43
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING = 44, 45, 46, 47, 48, 49
SYNCFS, TMPFILE, STATX, COPY_FILE_RANGE_64 = 50, 51, 52, 53

OPCODE_NAMES: Final = {
    LOOKUP: "lookup", FORGET: "forget", GETATTR: "getattr", SETATTR: "setattr", READLINK: "readlink",
    SYMLINK: "symlink", MKNOD: "mknod", MKDIR: "mkdir", UNLINK: "unlink", RMDIR: "rmdir", RENAME: "rename",
    LINK: "link", OPEN: "open", READ: "read", WRITE: "write", STATFS: "statfs", RELEASE: "release",
    FSYNC: "fsync", SETXATTR: "setxattr", GETXATTR: "getxattr", LISTXATTR: "listxattr",
    REMOVEXATTR: "removexattr", FLUSH: "flush", INIT: "init", OPENDIR: "opendir", READDIR: "readdir",
    RELEASEDIR: "releasedir", FSYNCDIR: "fsyncdir", GETLK: "getlk", SETLK: "setlk", SETLKW: "setlkw",
    ACCESS: "access", CREATE: "create", INTERRUPT: "interrupt", BMAP: "bmap", DESTROY: "destroy",
    IOCTL: "ioctl", POLL: "poll", NOTIFY_REPLY: "notify_reply", BATCH_FORGET: "batch_forget",
    FALLOCATE: "fallocate", READDIRPLUS: "readdirplus", RENAME2: "rename2", LSEEK: "lseek",
    COPY_FILE_RANGE: "copy_file_range", SETUPMAPPING: "setupmapping", REMOVEMAPPING: "removemapping",
    SYNCFS: "syncfs", TMPFILE: "tmpfile", STATX: "statx", COPY_FILE_RANGE_64: "copy_file_range_64",
}
"""Opcode -> the operation's name in ``unionfs stats``."""

# -- INIT flags (flags: bits 0-31, flags2: bits 32-63) -------------------------------------------------------
ASYNC_READ: Final = 1 << 0
POSIX_LOCKS: Final = 1 << 1
ATOMIC_O_TRUNC: Final = 1 << 3
EXPORT_SUPPORT: Final = 1 << 4
BIG_WRITES: Final = 1 << 5
DONT_MASK: Final = 1 << 6
FLOCK_LOCKS: Final = 1 << 10
AUTO_INVAL_DATA: Final = 1 << 12
DO_READDIRPLUS: Final = 1 << 13
READDIRPLUS_AUTO: Final = 1 << 14
ASYNC_DIO: Final = 1 << 15
WRITEBACK_CACHE: Final = 1 << 16
NO_OPEN_SUPPORT: Final = 1 << 17
PARALLEL_DIROPS: Final = 1 << 18
POSIX_ACL: Final = 1 << 20
ABORT_ERROR: Final = 1 << 21
MAX_PAGES: Final = 1 << 22
CACHE_SYMLINKS: Final = 1 << 23
NO_OPENDIR_SUPPORT: Final = 1 << 24
EXPLICIT_INVAL_DATA: Final = 1 << 25
HANDLE_KILLPRIV_V2: Final = 1 << 28
SETXATTR_EXT: Final = 1 << 29
INIT_EXT: Final = 1 << 30
PASSTHROUGH: Final = 1 << 37

# -- other flags --------------------------------------------------------------------------------------------
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_CACHE_DIR: Final = 1 << 3
FOPEN_PASSTHROUGH: Final = 1 << 7

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
FATTR_LOCKOWNER, FATTR_CTIME, FATTR_KILL_SUIDGID = 1 << 9, 1 << 10, 1 << 11

GETATTR_FH: Final = 1 << 0
WRITE_KILL_SUIDGID: Final = 1 << 2
RELEASE_FLUSH: Final = 1 << 0
FSYNC_FDATASYNC: Final = 1 << 0

NOTIFY_INVAL_INODE: Final = 2
NOTIFY_INVAL_ENTRY: Final = 3

FUSE_DEV_IOC_CLONE: Final = 0x8004E500
FUSE_DEV_IOC_BACKING_OPEN: Final = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE: Final = 0x4004E502
FUSE_DEV_IOC_SYNC_INIT: Final = 0xE503

MIN_READ_BUFFER: Final = 8192

# -- layouts ------------------------------------------------------------------------------------------------
IN_HEADER: Final = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER: Final = struct.Struct("<IiQ")           # len error unique
ATTR: Final = struct.Struct("<3Q3q10I")             # ino size blocks, signed times, nsec ×3, mode …
ENTRY_OUT_HEAD: Final = struct.Struct("<QQQQII")    # nodeid generation entry_valid attr_valid (nsec ×2)
ATTR_OUT_HEAD: Final = struct.Struct("<QII")        # attr_valid attr_valid_nsec dummy
INIT_IN: Final = struct.Struct("<IIII")             # major minor max_readahead flags
INIT_IN_FLAGS2: Final = struct.Struct("<I")         # flags2, at offset 16 (7.36+)
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHIIH22x")
OPEN_IN: Final = struct.Struct("<II")               # flags open_flags
OPEN_OUT: Final = struct.Struct("<QIi")             # fh open_flags backing_id
CREATE_IN: Final = struct.Struct("<IIII")           # flags mode umask open_flags
MKDIR_IN: Final = struct.Struct("<II")              # mode umask
MKNOD_IN: Final = struct.Struct("<IIII")            # mode rdev umask padding
RENAME_IN: Final = struct.Struct("<Q")              # newdir
RENAME2_IN: Final = struct.Struct("<QII")           # newdir flags padding
LINK_IN: Final = struct.Struct("<Q")                # oldnodeid
SETATTR_IN: Final = struct.Struct("<IIQQQqqqIIIIIIII")  # times are signed (before 1970)
GETATTR_IN: Final = struct.Struct("<IIQ")           # getattr_flags dummy fh
READ_IN: Final = struct.Struct("<QQIIQII")          # fh offset size read_flags lock_owner flags padding
WRITE_IN: Final = struct.Struct("<QQIIQII")
WRITE_OUT: Final = struct.Struct("<II")
RELEASE_IN: Final = struct.Struct("<QIIQ")          # fh flags release_flags lock_owner
FLUSH_IN: Final = struct.Struct("<QIIQ")
FSYNC_IN: Final = struct.Struct("<QII")             # fh fsync_flags padding
SETXATTR_IN: Final = struct.Struct("<II")           # size flags (no SETXATTR_EXT)
GETXATTR_IN: Final = struct.Struct("<II")           # size padding
GETXATTR_OUT: Final = struct.Struct("<II")
ACCESS_IN: Final = struct.Struct("<II")
FALLOCATE_IN: Final = struct.Struct("<QQQII")       # fh offset length mode padding
FORGET_IN: Final = struct.Struct("<Q")
BATCH_FORGET_IN: Final = struct.Struct("<II")
FORGET_ONE: Final = struct.Struct("<QQ")
INTERRUPT_IN: Final = struct.Struct("<Q")
STATFS_OUT: Final = struct.Struct("<5Q4I24x")
DIRENT_HEAD: Final = struct.Struct("<QQII")         # ino off namelen type
NOTIFY_INVAL_INODE_OUT: Final = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT: Final = struct.Struct("<QII")
BACKING_MAP: Final = struct.Struct("<iIQ")

ENTRY_OUT_SIZE: Final = ENTRY_OUT_HEAD.size + ATTR.size
DIRENTPLUS_HEAD_SIZE: Final = ENTRY_OUT_SIZE + DIRENT_HEAD.size


def pack_attr(attr: Attr, *, nlink: int | None = None) -> bytes:
    """``fuse_attr`` from the core's attribute record — the ONE place that reads it.  The packed form is kept
    in the record's ``packed`` slot (a cached lower record is packed once).  ``nlink`` overrides ``st_nlink``."""
    if nlink is None and attr.packed is not None and len(attr.packed) == ATTR.size:
        return attr.packed
    atime, mtime, ctime = attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns
    packed = ATTR.pack(attr.st_ino, attr.st_size, attr.st_blocks,
                       atime // 1_000_000_000, mtime // 1_000_000_000, ctime // 1_000_000_000,
                       atime % 1_000_000_000, mtime % 1_000_000_000, ctime % 1_000_000_000,
                       attr.st_mode, attr.st_nlink if nlink is None else nlink,
                       attr.st_uid & 0xFFFFFFFF, attr.st_gid & 0xFFFFFFFF, attr.st_rdev & 0xFFFFFFFF,
                       attr.st_blksize or 4096, 0)
    if nlink is None:
        attr.packed = packed
    return packed


def dirent(ino: int, offset: int, kind: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` padded to 8 bytes (``kind``: st_mode type bits)."""
    head = DIRENT_HEAD.pack(ino, offset, len(name), (kind >> 12) & 0o17)
    return head + name + b"\0" * (-(DIRENT_HEAD.size + len(name)) % 8)


def dirent_size(name: bytes) -> int:
    return (DIRENT_HEAD.size + len(name) + 7) & ~7


def split_seconds(seconds: float) -> tuple[int, int]:
    """A timeout as (seconds, nanoseconds) for an entry/attr reply."""
    whole = int(seconds)
    return whole, round((seconds - whole) * 1e9)


class Negotiated(NamedTuple):
    """What INIT settled: the protocol minor and the capabilities both sides use."""

    minor: int
    flags: int
    max_write: int
    max_readahead: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def parse_init(body: bytes | memoryview) -> tuple[int, int, int, int]:
    """(major, minor, max_readahead, offered flags incl. flags2 << 32) from an INIT request's body."""
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body, 0)
    if flags & INIT_EXT and len(body) >= INIT_IN.size + INIT_IN_FLAGS2.size:
        flags |= INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)[0] << 32
    return major, minor, max_readahead, flags


def negotiate(offered: int, wanted: int) -> int:
    """The flags to answer: those wanted that the kernel offered (INIT_EXT whenever flags2 is used)."""
    flags = offered & wanted
    if flags >> 32:
        flags |= INIT_EXT
    return flags


def init_reply(*, minor: int, max_readahead: int, flags: int, max_write: int, max_pages: int,
               max_background: int = 64, congestion_threshold: int = 48, time_gran: int = 1,
               max_stack_depth: int = 0) -> bytes:
    """The ``fuse_init_out`` body."""
    return INIT_OUT.pack(KERNEL_MAJOR, minor, max_readahead, flags & 0xFFFFFFFF, max_background,
                         congestion_threshold, max_write, time_gran, max_pages, 0, (flags >> 32) & 0xFFFFFFFF,
                         max_stack_depth, 0)

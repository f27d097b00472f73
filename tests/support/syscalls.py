"""System calls the differential tests need and Python does not bind."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) of two paths (relative to the cwd or absolute); raises OSError with the errno."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src)


AT_EMPTY_PATH = 0x1000


def link_descriptor(fd: int, dst: str) -> None:
    """linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH): a new name for the object of descriptor ``fd`` (root:
    CAP_DAC_READ_SEARCH); OSError with the errno."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(dst), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


_SYS_GETDENTS64 = 217  # x86_64


def getdents(fd: int, size: int) -> list[str]:
    """One getdents64(2) of at most ``size`` bytes on directory descriptor ``fd``: the names it returned
    (empty at the end of the directory); OSError with the errno."""
    buf = ctypes.create_string_buffer(size)
    got = _libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    names: list[str] = []
    pos = 0
    while pos < got:
        reclen = int.from_bytes(buf.raw[pos + 16:pos + 18], "little")
        name = buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        names.append(os.fsdecode(name))
        pos += reclen
    return names

"""open flags, reads and writes, mmap, sync, fallocate, statfs, access and read-only mounts, vs the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import WHITEOUT, File

CASES = Catalog()
T = TypeVar("T")

TOP = {
    "f": File("0123456789\n", mode=0o640, uid=1000, gid=1000),
    "g": "gggg\n",
    "x": File("#!/bin/sh\n", mode=0o750),
    "ro": File("read only\n", mode=0o444),
    "none": File("no permissions\n", mode=0o000),
    "big": File(bytes(range(256)) * 1024),  # 256 KiB
    "d/in": "in\n",
    "gone": WHITEOUT,
}
BOTTOM = {"gone": "bottom gone\n", "d/below": "below\n"}

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError like the os module."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _with_fd(path: str, flags: int, fn: Callable[[int], T]) -> T:
    """Open ``path`` with ``flags``, return ``fn(fd)``, always close."""
    fd = os.open(path, flags, 0o644)
    try:
        return fn(fd)
    finally:
        os.close(fd)


@CASES.scenario(TOP, BOTTOM)
def open_o_trunc_on_lower_file(r: Recorder) -> None:
    """O_TRUNC on a lower file empties it (copy-up keeps mode and owner); on a read-only open it still truncates."""
    r.write("O_WRONLY|O_TRUNC f", "f", b"new\n", flags=os.O_WRONLY | os.O_TRUNC)
    r.read("read f", "f")
    r.stat("stat f", "f")
    r.call("O_RDONLY|O_TRUNC g", lambda: os.close(os.open("g", os.O_RDONLY | os.O_TRUNC)))
    r.stat("stat g", "g")
    r.call("O_TRUNC dir", os.open, "d", os.O_WRONLY | os.O_TRUNC)


@CASES.scenario(TOP, BOTTOM)
def open_o_append_on_lower_file(r: Recorder) -> None:
    """O_APPEND writes go to the end of the copied-up file even after a seek or a pwrite offset."""
    r.write("append f", "f", b"appended\n", flags=os.O_WRONLY | os.O_APPEND)

    def seek_then_append(fd: int) -> int:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"again\n")
        return os.lseek(fd, 0, os.SEEK_CUR)
    r.value("seek then append", _with_fd, "f", os.O_WRONLY | os.O_APPEND, seek_then_append)
    r.read("read f", "f")
    r.write("append creates", "newfile", b"first\n", flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    r.read("read newfile", "newfile")


@CASES.scenario(TOP, BOTTOM)
def open_o_excl_and_o_creat(r: Recorder) -> None:
    """O_CREAT|O_EXCL: EEXIST on lower files, dirs and dangling symlinks; works on a whited-out name."""
    excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    r.call("excl lower file", os.open, "f", excl)
    r.call("excl lower dir", os.open, "d", excl)
    r.call("symlink dangle", os.symlink, "nowhere", "dangle")
    r.call("excl dangling symlink", os.open, "dangle", excl)
    r.write("excl whited-out name (lower whiteout)", "gone", b"born again\n", flags=excl)
    r.read("read gone", "gone")
    r.call("unlink g", os.unlink, "g")
    r.write("O_CREAT without O_EXCL on unlinked lower name", "g", b"", flags=os.O_WRONLY | os.O_CREAT)
    r.stat("stat g", "g")
    r.call("O_CREAT on a dir", os.open, "d", os.O_WRONLY | os.O_CREAT)
    r.call("O_CREAT through dangling symlink", lambda: os.close(os.open("dangle", os.O_WRONLY | os.O_CREAT)))
    r.call("O_CREAT in a missing dir", os.open, "nodir/x", os.O_WRONLY | os.O_CREAT)
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def write_at_offsets_and_sparse(r: Recorder) -> None:
    """pwrite at offsets inside, at the end and far beyond (sparse, zero-filled) of lower and new files."""
    r.write("pwrite inside f", "f", b"AB", flags=os.O_WRONLY, offset=3)
    r.write("pwrite at end of g", "g", b"!", flags=os.O_WRONLY, offset=5)
    r.write("pwrite 1 MiB into f", "f", b"far", flags=os.O_WRONLY, offset=1 << 20)
    r.write("pwrite into big", "big", b"\xff" * 5000, flags=os.O_WRONLY, offset=100_000)
    r.write("sparse new file", "sparse", b"end", flags=os.O_WRONLY | os.O_CREAT, offset=3 << 20)
    for name in ("f", "g", "big", "sparse"):
        r.read(f"read {name}", name)
        r.stat(f"stat {name}", name)
    r.value("pread big", _with_fd, "big", os.O_RDONLY, lambda fd: os.pread(fd, 16, 99_995))
    r.value("read past end", _with_fd, "g", os.O_RDONLY, lambda fd: os.pread(fd, 10, 1000))


@CASES.scenario(TOP, BOTTOM)
def mmap_write_then_read(r: Recorder) -> None:
    """Writes through a shared mapping of a lower file reach the file (read back via read and stat)."""
    r.mmap_write("mmap write f", "f", 2, b"MM")
    r.read("read f", "f")
    r.mmap_write("mmap write big", "big", 200_000, b"mapped")
    r.value("pread big", _with_fd, "big", os.O_RDONLY, lambda fd: os.pread(fd, 8, 199_999))
    r.stat("stat big", "big")


@CASES.scenario(TOP, BOTTOM)
def fsync_and_fdatasync(r: Recorder) -> None:
    """fsync/fdatasync succeed on lower files (read-only and read-write fds), new files and dirs."""
    r.value("fsync lower rdonly", _with_fd, "g", os.O_RDONLY, os.fsync)
    r.value("fdatasync lower rdonly", _with_fd, "g", os.O_RDONLY, os.fdatasync)

    def write_and_sync(fd: int) -> None:
        os.write(fd, b"synced\n")
        os.fsync(fd)
        os.fdatasync(fd)
    r.value("write+sync lower", _with_fd, "f", os.O_WRONLY | os.O_TRUNC, write_and_sync)
    r.value("write+sync new", _with_fd, "new", os.O_WRONLY | os.O_CREAT, write_and_sync)
    r.value("fsync dir", _with_fd, "d", os.O_RDONLY | os.O_DIRECTORY, os.fsync)
    r.read("read f", "f")


@CASES.scenario(TOP, BOTTOM)
def fallocate_and_punch_hole(r: Recorder) -> None:
    """posix_fallocate extends a lower file; KEEP_SIZE keeps the size; PUNCH_HOLE zeroes a range."""
    r.value("posix_fallocate g", _with_fd, "g", os.O_RDWR, lambda fd: os.posix_fallocate(fd, 0, 8192))
    r.stat("stat g", "g")
    r.value("keep size f", _with_fd, "f", os.O_RDWR, lambda fd: _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 16))
    r.stat("stat f", "f")
    r.value("punch hole big", _with_fd, "big", os.O_RDWR,
            lambda fd: _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192))
    r.read("read big", "big")
    r.value("fallocate rdonly fd", _with_fd, "g", os.O_RDONLY, lambda fd: os.posix_fallocate(fd, 0, 10))


@CASES.scenario(TOP, BOTTOM)
def statfs_and_access(r: Recorder) -> None:
    """statvfs works (name length 255, writable) and access() answers as root does: X needs an x bit."""
    st = r.call("statvfs", os.statvfs, ".")
    if st is not None:
        r.record("namemax", st.f_namemax)
        r.record("read-only flag", bool(st.f_flag & os.ST_RDONLY))
        r.record("has blocks", st.f_blocks > 0 and st.f_bsize > 0)
    r.value("fstatvfs", _with_fd, "f", os.O_RDONLY, lambda fd: os.fstatvfs(fd).f_namemax)
    for name in ("f", "x", "ro", "none", "d", "gone", "missing"):
        for mode, what in ((os.F_OK, "F"), (os.R_OK, "R"), (os.W_OK, "W"), (os.X_OK, "X")):
            r.value(f"access {name} {what}", os.access, name, mode)


@CASES.scenario(TOP, BOTTOM, readonly=True)
def read_only_mount_refuses_changes(r: Recorder) -> None:
    """Without an upper dir every change is EROFS; reads, listings and stats work."""
    r.read("read f", "f")
    r.listdir("ls .")
    r.write("write f", "f", b"x", flags=os.O_WRONLY)
    r.write("create", "new", b"x")
    r.call("unlink", os.unlink, "g")
    r.call("mkdir", os.mkdir, "newdir")
    r.call("rmdir", os.rmdir, "d")
    r.call("rename", os.rename, "f", "f2")
    r.call("chmod", os.chmod, "f", 0o600)
    r.call("chown", os.chown, "f", 1, 1)
    r.call("utime", os.utime, "f", ns=(1, 1))
    r.call("truncate", os.truncate, "f", 0)
    r.call("setxattr", os.setxattr, "f", "user.x", b"y")
    r.call("symlink", os.symlink, "f", "l")
    r.call("link", os.link, "f", "l")
    r.call("mkfifo", os.mkfifo, "p")
    r.value("access W", os.access, "f", os.W_OK)
    r.value("statvfs read-only", lambda: bool(os.statvfs(".").f_flag & os.ST_RDONLY))
    r.call("open O_RDWR", os.open, "f", os.O_RDWR)


@CASES.scenario(TOP, BOTTOM)
def read_and_write_through_one_fd(r: Recorder) -> None:
    """An O_RDWR fd on a lower file reads the old data, then sees its own writes; a second fd sees them too."""
    def rw(fd: int) -> list[bytes]:
        seen = [os.read(fd, 4)]
        os.write(fd, b"XY")
        seen.append(os.pread(fd, 11, 0))
        seen.append(_with_fd("f", os.O_RDONLY, lambda fd2: os.read(fd2, 11)))
        return seen
    r.value("rdwr f", _with_fd, "f", os.O_RDWR, rw)

    def open_rdonly_before_copy_up() -> bytes:
        early = os.open("g", os.O_RDONLY)
        try:
            _with_fd("g", os.O_WRONLY | os.O_TRUNC, lambda fd: os.write(fd, b"rewritten"))
            return os.read(early, 100)
        finally:
            os.close(early)
    r.value("fd opened before copy-up", open_rdonly_before_copy_up)


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir as the kernel's overlayfs."""
    assert_same_as_kernel(case, tmp_path)

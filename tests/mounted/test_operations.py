"""Operations through a real unionfs mount that the differential scenarios do not reach: files used after
unlink, mmap writes, O_APPEND from several descriptors, large files, fifos that pass data, sockets, many
open files, concurrent writers, and what the upper dir holds afterwards."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import unionfs_mount

pytestmark = pytest.mark.mounted


@pytest.fixture
def union(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "data").write_bytes(b"0123456789" * 1000)
    (lower / "dir").mkdir()
    (lower / "dir" / "inner").write_text("inner\n")
    with unionfs_mount([lower], upper, work, mnt):
        yield mnt, upper


def test_an_unlinked_open_file_keeps_working_and_leaves_nothing_in_the_upper(union: tuple[Path, Path]) -> None:
    mnt, upper = union
    fd = os.open(mnt / "scratch", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before unlink")
        os.unlink(mnt / "scratch")
        assert not (mnt / "scratch").exists()
        os.pwrite(fd, b" and after", 13)
        os.ftruncate(fd, 20)
        assert os.fstat(fd).st_size == 20
        assert os.pread(fd, 100, 0) == b"before unlink and af"
    finally:
        os.close(fd)
    assert sorted(p.name for p in upper.iterdir()) == [], "hidden or leftover files in the upper dir"


def test_an_unlinked_lower_file_open_for_reading_still_reads(union: tuple[Path, Path]) -> None:
    mnt, upper = union
    with open(mnt / "data", "rb") as fh:
        os.unlink(mnt / "data")
        assert fh.read(10) == b"0123456789"
    assert stat.S_ISCHR(os.lstat(upper / "data").st_mode), "a whiteout must hide the lower file"


def test_mmap_writes_reach_the_file_and_the_upper_copy(union: tuple[Path, Path]) -> None:
    mnt, upper = union
    with open(mnt / "data", "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        mm[0:5] = b"HELLO"
        mm.flush()
    assert (mnt / "data").read_bytes()[:12] == b"HELLO5678901"
    assert (upper / "data").read_bytes()[:12] == b"HELLO5678901"


def test_o_append_from_two_descriptors_appends_both(union: tuple[Path, Path]) -> None:
    mnt, _ = union
    a = os.open(mnt / "dir/inner", os.O_WRONLY | os.O_APPEND)
    b = os.open(mnt / "dir/inner", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"a\n")
        os.write(b, b"b\n")
        os.write(a, b"c\n")
    finally:
        os.close(a)
        os.close(b)
    assert (mnt / "dir/inner").read_text() == "inner\na\nb\nc\n"


def test_a_large_file_round_trips(union: tuple[Path, Path]) -> None:
    mnt, upper = union
    block = os.urandom(1 << 20)
    with open(mnt / "big", "wb") as fh:
        for _ in range(24):
            fh.write(block)
    assert (mnt / "big").stat().st_size == 24 << 20
    with open(mnt / "big", "rb") as fh:
        fh.seek(17 << 20)
        assert fh.read(1 << 20) == block
    assert (upper / "big").stat().st_size == 24 << 20


def test_a_fifo_created_in_the_union_passes_data(union: tuple[Path, Path]) -> None:
    mnt, _ = union
    os.mkfifo(mnt / "pipe")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((mnt / "pipe").read_bytes()))
    reader.start()
    with open(mnt / "pipe", "wb") as fh:
        fh.write(b"through the fifo")
    reader.join(10)
    assert got == [b"through the fifo"]


def test_a_unix_socket_can_be_bound_in_the_union(union: tuple[Path, Path]) -> None:
    mnt, upper = union
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(mnt / "sock"))
        assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    assert stat.S_ISSOCK(os.lstat(upper / "sock").st_mode)


def test_many_files_open_at_once(union: tuple[Path, Path]) -> None:
    mnt, _ = union
    fds = []
    try:
        for i in range(2000):
            fds.append(os.open(mnt / "data" if i % 2 else mnt / "dir/inner", os.O_RDONLY))
        assert all(os.pread(fd, 1, 0) in (b"0", b"i") for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_concurrent_writers_to_distinct_files(union: tuple[Path, Path]) -> None:
    mnt, _ = union
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                path = mnt / f"w{n}-{i}"
                path.write_bytes(bytes([n]) * (i + 1))
                assert path.read_bytes() == bytes([n]) * (i + 1)
                if i % 3 == 0:
                    path.unlink()
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    names = {p.name for p in mnt.iterdir()}
    expected = {f"w{n}-{i}" for n in range(6) for i in range(50) if i % 3}
    assert expected <= names
    assert not {f"w{n}-{i}" for n in range(6) for i in range(50) if i % 3 == 0} & names


def test_rename_noreplace_refuses_an_existing_target(union: tuple[Path, Path]) -> None:
    mnt, _ = union
    (mnt / "src").write_text("s")
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(-100, os.fsencode(mnt / "src"), -100, os.fsencode(mnt / "data"), 1)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert (mnt / "src").read_text() == "s"


def test_programs_in_the_union_can_be_executed(union: tuple[Path, Path]) -> None:
    """execve through the mount (the kernel's open for exec carries a flag that openat2 must not see)."""
    mnt, _ = union
    shutil.copy2("/bin/true", mnt / "true-copy")
    assert subprocess.run([str(mnt / "true-copy")], timeout=30).returncode == 0
    script = mnt / "dir" / "hello.sh"
    script.write_text("#!/bin/sh\necho hello from the union\n")
    script.chmod(0o755)
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)
    assert out.stdout == "hello from the union\n"

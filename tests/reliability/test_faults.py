"""Faults and bad input: a full upper fs, a read-only upper fs, a lower layer deleted while mounted, 10k open
files, and a battery of odd requests. The caller gets an errno; nothing is corrupted; the daemon stays up and
the mount keeps working once the fault is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import alive, pid_of, sha, wait_for
from support.mounts import unionfs_mount

pytestmark = pytest.mark.mounted

MiB = 1 << 20


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


def fill(path: Path) -> int:
    """Write to ``path`` until the fs is full; return the errno that stopped it."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * MiB)
        except OSError as exc:
            return exc.errno or 0


def test_full_upper_gives_enospc_and_recovers(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    big = os.urandom(3 * MiB)
    (lower / "big").write_bytes(big)
    (lower / "small").write_bytes(b"small lower\n")
    with small_tmpfs(tmp_path / "fs", "8m") as fs:
        upper, work, mnt = fs / "upper", fs / "work", tmp_path / "mnt"
        upper.mkdir()
        work.mkdir()
        mnt.mkdir()
        with unionfs_mount([lower], upper, work, mnt) as m:
            pid = pid_of(m)
            assert fill(m / "filler") == errno.ENOSPC
            # copy-up of a 3 MiB lower file cannot fit: ENOSPC, and the union still shows the lower content
            assert errno_of(lambda: open(m / "big", "r+b").close()) == errno.ENOSPC
            assert (m / "big").read_bytes() == big
            assert not (upper / "big").exists(), "a partial copy-up is visible in the upper dir"
            assert errno_of(os.mkdir, m / "newdir") in (0, errno.ENOSPC)
            assert (m / "small").read_bytes() == b"small lower\n"
            assert alive(pid)
            os.unlink(m / "filler")
            # the space comes back when the daemon lets the removed file go, at the kernel's FORGET of its
            # node, a moment after unlink returns (docs/semantics.md, "A file whose name is gone")
            assert wait_for(lambda: shutil.disk_usage(fs).free >= len(big) + MiB, 10), "space never came back"
            with open(m / "big", "r+b") as f:
                f.write(b"NEW")
            assert (m / "big").read_bytes() == b"NEW" + big[3:]
            (m / "after").write_bytes(b"space again\n")
            assert (m / "after").read_bytes() == b"space again\n"
            assert os.listdir(work / "work") == []
        assert (lower / "big").read_bytes() == big


def test_read_only_upper_gives_erofs_and_recovers(tmp_path: Path) -> None:
    """The upper fs is remounted read-only under a running mount (the kernel overlay answers EROFS too)."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(b"lower\n")
    with small_tmpfs(tmp_path / "fs", "16m") as fs:
        upper, work, mnt = fs / "upper", fs / "work", tmp_path / "mnt"
        upper.mkdir()
        work.mkdir()
        mnt.mkdir()
        with unionfs_mount([lower], upper, work, mnt) as m:
            (m / "before").write_bytes(b"before\n")
            # close(2) returns before the daemon's RELEASE closes its descriptor: until then the fs is busy
            assert wait_for(lambda: subprocess.run(["mount", "-o", "remount,ro", str(fs)],
                                                   stderr=subprocess.DEVNULL).returncode == 0, timeout=5.0)
            try:
                assert errno_of(lambda: open(m / "f", "ab").close()) == errno.EROFS
                assert errno_of(lambda: (m / "new").write_bytes(b"x")) == errno.EROFS
                assert errno_of(os.unlink, m / "f") == errno.EROFS
                assert errno_of(os.mkdir, m / "d") == errno.EROFS
                assert (m / "f").read_bytes() == b"lower\n"
                assert (m / "before").read_bytes() == b"before\n"
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
            (m / "new").write_bytes(b"works again\n")
            with open(m / "f", "ab") as f:
                f.write(b"more\n")
            assert (m / "f").read_bytes() == b"lower\nmore\n"
            assert alive(pid_of(m))


def test_lower_deleted_while_mounted_gives_errors_not_a_crash(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for layer in (top, bottom):
        (layer / "d").mkdir(parents=True)
    for i in range(50):
        (bottom / "d" / f"b{i}").write_bytes(b"bottom %d\n" % i)
    (top / "keep").write_bytes(b"kept\n")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with unionfs_mount([top, bottom], upper, work, mnt) as m:
        pid = pid_of(m)
        assert len(os.listdir(m / "d")) == 50
        shutil.rmtree(bottom / "d")
        (bottom / "late").write_bytes(b"late\n")
        outcomes = set()
        for i in range(50):
            p = m / "d" / f"b{i}"
            for fn in (lambda q: q.read_bytes(), lambda q: open(q, "ab").write(b"+"),  # noqa: SIM115
                       os.unlink, lambda q: os.rename(q, q.with_name(q.name + "r"))):
                try:
                    fn(p)
                    outcomes.add("ok")
                except OSError as exc:
                    outcomes.add(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
        with contextlib.suppress(OSError):
            os.listdir(m / "d")
        assert alive(pid), f"the daemon died (outcomes {outcomes})"
        assert (m / "keep").read_bytes() == b"kept\n"
        (m / "fresh").write_bytes(b"fresh\n")
        assert (m / "fresh").read_bytes() == b"fresh\n"
        print("outcomes after deleting a lower dir:", sorted(outcomes))


def test_ten_thousand_open_files(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 12000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for i in range(2000):
        (lower / f"f{i:04}").write_bytes(b"%d\n" % i)
    fds: list[tuple[int, int]] = []
    try:
        with unionfs_mount([lower], upper, work, mnt) as m:
            pid = pid_of(m)
            for i in range(10_000):
                flags = os.O_RDWR if i % 10 == 0 else os.O_RDONLY  # every 10th open copies up
                fds.append((i % 2000, os.open(m / f"f{i % 2000:04}", flags)))
            for n, fd in fds:
                assert os.pread(fd, 16, 0) == b"%d\n" % n
            for _, fd in fds[::10]:
                os.pwrite(fd, b"w", 0)
            for _, fd in fds:
                os.close(fd)
            fds.clear()
            assert alive(pid)
            assert (m / "f0000").read_bytes() == b"w\n"
            assert (m / "f0001").read_bytes() == b"1\n"
    finally:
        for _, fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_odd_requests_never_kill_the_daemon(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_bytes(b"lower f\n")
    (lower / "d").mkdir()
    (lower / "d" / "x").write_bytes(b"x\n")
    with unionfs_mount([lower], upper, work, mnt) as m:
        pid = pid_of(m)
        f, d = m / "f", m / "d"
        results = {}
        requests = {
            "setxattr bad namespace": lambda: os.setxattr(f, "bogus.name", b"v"),
            "setxattr empty name": lambda: os.setxattr(f, "user.", b"v"),
            "setxattr huge value": lambda: os.setxattr(f, "user.big", b"v" * 70000),
            "setxattr private": lambda: os.setxattr(f, "trusted.overlay.opaque", b"y"),
            "getxattr private": lambda: os.getxattr(d, "trusted.overlay.opaque"),
            "removexattr missing": lambda: os.removexattr(f, "user.none"),
            "name too long": lambda: open(m / ("n" * 256), "w").close(),
            "name 255": lambda: open(m / ("n" * 255), "w").close(),
            "mknod socket": lambda: os.mknod(m / "sock", 0o140644),
            "mkfifo": lambda: os.mkfifo(m / "fifo"),
            "link dir": lambda: os.link(d, m / "dlink"),
            "rename exchange": lambda: _renameat2(f, d, 2),
            "rename whiteout": lambda: _renameat2(f, m / "w", 4),
            "rename noreplace": lambda: _renameat2(f, d, 1),
            "rename into own subdir": lambda: os.rename(d, d / "x" / "y"),
            "rmdir non-empty": lambda: os.rmdir(d),
            "rmdir file": lambda: os.rmdir(f),
            "unlink dir": lambda: os.unlink(d),
            "truncate huge": lambda: os.truncate(f, 1 << 60),
            "truncate negative": lambda: os.truncate(f, -1),
            "utime extreme": lambda: os.utime(f, ns=(2**62, -(2**62))),
            "chown -1": lambda: os.chown(f, -1, -1),
            "chown huge": lambda: os.chown(f, 2**32 - 2, 2**32 - 2),
            "chmod all bits": lambda: os.chmod(f, 0o7777),
            "O_TMPFILE": lambda: os.close(os.open(m, os.O_TMPFILE | os.O_RDWR, 0o600)),
            "O_DIRECT": lambda: os.close(os.open(f, os.O_RDWR | os.O_DIRECT)),
            "fallocate punch": lambda: _fallocate(f),
            "ioctl": lambda: _ioctl(f),
            "flock": lambda: _flock(f),
            "seek data": lambda: _seek(f),
            "open dir for write": lambda: os.open(d, os.O_WRONLY),
            "opendir on file": lambda: os.listdir(f),
            "symlink long target": lambda: os.symlink("t" * 4095, m / "longlink"),
            "symlink too long": lambda: os.symlink("t" * 5000, m / "toolong"),
        }
        for name, fn in requests.items():
            try:
                fn()
                results[name] = "ok"
            except OSError as exc:
                results[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            assert alive(pid), f"the daemon died on {name!r} (answers so far: {results})"
        assert sorted(os.listdir(m))
        (m / "still").write_bytes(b"works\n")
        assert sha(m / "still")
        assert "EIO" not in results.values(), f"an unexpected exception inside the daemon: {results}"
        print(results)


def _fallocate(p: Path) -> None:
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) != 0:  # PUNCH_HOLE|KEEP_SIZE
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _ioctl(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x80086601, b"\0" * 8)  # FS_IOC_GETFLAGS
    finally:
        os.close(fd)


def _flock(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def _seek(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
        os.lseek(fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)

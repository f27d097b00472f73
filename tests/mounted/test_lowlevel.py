"""The protocol frontend (``-o frontend=lowlevel``): passthrough of file data to backing files, and what the
node ids make possible (an open file whose name is gone)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.mounts import kernel_overlay_mount, unionfs_mount

from unionfs.control import daemon_pid

pytestmark = pytest.mark.mounted
UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")
LOWLEVEL = ("frontend=lowlevel",)


def _stats(mnt: Path) -> dict:
    out = subprocess.run([UNIONFS, "stats", "--json", str(mnt)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dirs(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    dirs = tuple(tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in dirs:
        d.mkdir()
    return dirs  # type: ignore[return-value]


def test_reads_pass_through_and_writes_reach_the_daemon(tmp_path: Path) -> None:
    """A read-only open of an upper file sends no READ; a write open's data comes through the daemon (so that
    a pause for a commit holds it, and set-id bits are cleared as on any FUSE file)."""
    lower, upper, work, mnt = _dirs(tmp_path)
    data = os.urandom(4 << 20)
    with unionfs_mount([lower], upper, work, mnt, LOWLEVEL):
        (mnt / "f").write_bytes(data)
        assert (mnt / "f").read_bytes() == data
        with open(mnt / "f", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[:4] = b"MMAP"
        # close(2) returns before the kernel sends RELEASE: wait until the daemon closed every writer
        assert _wait_for(lambda: _stats(mnt)["open_files"] == 0)
        before = _stats(mnt)
        with open(mnt / "f", "rb") as f:  # passes through, and sees what the writer wrote
            assert f.read() == b"MMAP" + data[4:]
        stats = _stats(mnt)
        assert stats["frontend"] == "lowlevel"
        assert stats["passthrough"]["enabled"] is True
        assert stats["passthrough"]["backing_opens"] > before["passthrough"]["backing_opens"]
        reads = before["operations"].get("read", {}).get("calls", 0)
        assert stats["operations"].get("read", {}).get("calls", 0) == reads
        assert stats["operations"]["write"]["calls"] >= 1
    assert (upper / "f").read_bytes() == b"MMAP" + data[4:]


def test_passthrough_off_serves_data_through_the_daemon(tmp_path: Path) -> None:
    lower, upper, work, mnt = _dirs(tmp_path)
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "passthrough=off")):
        (mnt / "f").write_bytes(b"x" * 100_000)
        assert (mnt / "f").read_bytes() == b"x" * 100_000
        stats = _stats(mnt)
        assert stats["passthrough"]["enabled"] is False and stats["passthrough"]["reason"] == "passthrough=off"
        assert stats["operations"]["write"]["calls"] >= 1


def test_lower_files_pass_through_on_a_read_only_mount(tmp_path: Path) -> None:
    lower, _, _, mnt = _dirs(tmp_path)
    data = os.urandom(1 << 20)
    (lower / "f").write_bytes(data)
    with unionfs_mount([lower], None, None, mnt, LOWLEVEL):
        assert (mnt / "f").read_bytes() == data
        stats = _stats(mnt)
        assert stats["passthrough"]["lower_files"] is True
        assert "read" not in stats["operations"]  # nothing but this read-only open here


def test_passthrough_all_passes_lower_reads_and_upper_writes_through_their_backing(tmp_path: Path) -> None:
    """``passthrough=all``: a lower file is read without READ requests; a write open after it copies up and
    is retried on a new node (ESTALE once, inside the kernel), so the lower layer is never written, and its
    data goes to the upper file without WRITE requests; a new
    open reads the upper copy, and a descriptor opened before the copy-up keeps reading the lower file (the
    documented difference from the kernel's overlayfs of this mode)."""
    lower, upper, work, mnt = _dirs(tmp_path)
    data = os.urandom(1 << 20)
    (lower / "f").write_bytes(data)
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "passthrough=all")):
        early = os.open(mnt / "f", os.O_RDONLY)
        try:
            assert os.pread(early, len(data), 0) == data
            assert "read" not in _stats(mnt)["operations"]
            with open(mnt / "f", "r+b") as f:
                f.write(b"NEW!")
            assert (mnt / "f").read_bytes() == b"NEW!" + data[4:]
            assert os.pread(early, 8, 0) == data[:8]
            stats = _stats(mnt)
            assert stats["passthrough"]["lower_files"] is True and stats["passthrough"]["writes"] is True
            assert stats["passthrough"]["stale_retries"] >= 1
            assert "read" not in stats["operations"] and "write" not in stats["operations"]
        finally:
            os.close(early)
    assert (lower / "f").read_bytes() == data
    assert (upper / "f").read_bytes() == b"NEW!" + data[4:]


@pytest.mark.parametrize("mode", ["on", "all"])
def test_racing_read_and_write_opens_never_change_a_lower_layer(tmp_path: Path, mode: str) -> None:
    """Readers (read(2) and mmap) and writers (O_RDWR, O_APPEND, O_TRUNC) race on the same lower files:
    afterwards every lower layer is byte for byte what it was, and each file reads as one of the writes
    (with ``passthrough=all`` the readers hold lower backing files while the writers copy up)."""
    base, top, upper, work, mnt = (tmp_path / n for n in ("base", "top", "upper", "work", "mnt"))
    for d in (base, top, upper, work, mnt):
        d.mkdir()
    rng = random.Random(13)
    names = [f"f{i}" for i in range(12)]
    mapped = names[:6]  # read through mmap too, so never truncated (a mapping past EOF faults)
    for name in names:
        (base / name).write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    for name in names[::2]:
        (top / name).write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    before = {"base": _digests(base), "top": _digests(top)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                path = mnt / r.choice(names)
                with open(path, "rb") as f:
                    f.read()
                    if path.name in mapped and os.fstat(f.fileno()).st_size:
                        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                            m[:64]
        except BaseException as exc:
            errors.append(exc)

    def writer(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(60):
                path = mnt / r.choice(names)
                modes = [os.O_RDWR, os.O_WRONLY | os.O_APPEND]
                mode = r.choice(modes if path.name in mapped else [*modes, os.O_WRONLY | os.O_TRUNC])
                fd = os.open(path, mode)
                try:
                    os.write(fd, b"written by %d\n" % seed)
                finally:
                    os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    with unionfs_mount([top, base], upper, work, mnt, (*LOWLEVEL, f"passthrough={mode}")):
        readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        writers = [threading.Thread(target=writer, args=(100 + i,)) for i in range(3)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert not errors, errors
        merged = {name: (mnt / name).read_bytes() for name in names}
        stats = _stats(mnt)["passthrough"]
        assert stats["enabled"] is True and stats["lower_files"] is (mode == "all")
    assert {"base": _digests(base), "top": _digests(top)} == before
    for name in names:
        if (upper / name).exists():
            assert (upper / name).read_bytes() == merged[name]
            assert b"written by" in merged[name]


def test_an_open_file_keeps_working_after_its_name_is_gone(tmp_path: Path) -> None:
    """fstat, fchmod, ftruncate, read and write through a descriptor whose name was unlinked (the fusepy
    frontend answers ESTALE: it has no node for a name that is gone)."""
    lower, upper, work, mnt = _dirs(tmp_path)
    (lower / "lower").write_text("lower data\n")
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "passthrough=off")):
        fd = os.open(mnt / "new", os.O_RDWR | os.O_CREAT, 0o644)
        low = os.open(mnt / "lower", os.O_RDONLY)
        try:
            os.write(fd, b"0123456789")
            os.unlink(mnt / "new")
            os.unlink(mnt / "lower")
            assert os.fstat(fd).st_nlink == 0
            os.fchmod(fd, 0o600)
            assert os.fstat(fd).st_mode & 0o777 == 0o600
            os.ftruncate(fd, 4)
            assert os.pread(fd, 100, 0) == b"0123"
            os.pwrite(fd, b"xy", 4)
            assert os.fstat(fd).st_size == 6
            assert os.pread(low, 100, 0) == b"lower data\n"
            assert os.fstat(low).st_size == 11
        finally:
            os.close(fd)
            os.close(low)
        assert sorted(os.listdir(mnt)) == []


def _kept_upper_files(pid: int, upper: Path) -> list[str]:
    """The daemon's descriptors of files of ``upper`` whose names are gone."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(upper)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def test_an_object_whose_name_is_gone_is_kept_until_the_kernel_lets_it_go(tmp_path: Path) -> None:
    """An open(2) through a node whose name is gone (here: the /proc magic link of a descriptor, which opens
    the node without a lookup) opens the old file; the daemon keeps nothing of it once the last descriptor
    is closed (the node's last FORGET), so the upper file's space is freed."""
    lower, upper, work, mnt = _dirs(tmp_path)
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "passthrough=off")):
        pid = daemon_pid(str(mnt))
        assert pid is not None
        fd = os.open(mnt / "gone", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"still here")
            os.unlink(mnt / "gone")
            assert _kept_upper_files(pid, upper) != []
            again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                os.pwrite(again, b"STILL", 0)
                assert os.pread(fd, 100, 0) == b"STILL here"
                assert os.fstat(again).st_nlink == 0
            finally:
                os.close(again)
        finally:
            os.close(fd)
        assert _wait_for(lambda: _kept_upper_files(pid, upper) == []), _kept_upper_files(pid, upper)
        assert not (mnt / "gone").exists()
        assert os.listdir(upper) == []


def test_chown_to_minus_one_copies_up_as_the_kernel_does(tmp_path: Path) -> None:
    lower, upper, work, mnt = _dirs(tmp_path)
    (lower / "f").write_text("f\n")
    with unionfs_mount([lower], upper, work, mnt, LOWLEVEL):
        os.chown(mnt / "f", -1, -1)
        assert (upper / "f").read_text() == "f\n"


def test_a_lower_directory_renames_under_a_cwd_and_an_open_file(tmp_path: Path) -> None:
    """``redirect_dir=on``: a directory of the lower layer renames (twice, the second time out of its parent)
    while a process has its cwd below it and a file in it open; the node ids keep both working, the old names
    are gone, and what is made below the moved directory lands there."""
    lower, upper, work, mnt = _dirs(tmp_path)
    (lower / "d" / "sub").mkdir(parents=True)
    (lower / "d" / "f").write_text("f\n")
    (lower / "d" / "sub" / "g").write_text("g\n")
    script = (
        "import os, sys\n"
        "m = sys.argv[1]\n"
        "os.chdir(m + '/d/sub')\n"
        "fd = os.open(m + '/d/f', os.O_RDONLY)\n"
        "os.rename(m + '/d', m + '/e')\n"
        "os.rename(m + '/e/sub', m + '/s2')\n"
        "print(os.getcwd(), open('g').read().strip(), os.pread(fd, 10, 0).decode().strip())\n"
        "open('new', 'w').write('n')\n"
    )
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "redirect_dir=on")):
        out = subprocess.run([sys.executable, "-c", script, str(mnt)], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [str(mnt / "s2"), "g", "f"]
        assert sorted(os.listdir(mnt)) == ["e", "s2"]
        assert sorted(os.listdir(mnt / "e")) == ["f"]
        assert sorted(os.listdir(mnt / "s2")) == ["g", "new"]
        assert _stats(mnt)["frontend"] == "lowlevel"
    assert os.getxattr(upper / "e", "trusted.overlay.redirect") == b"d"
    assert os.getxattr(upper / "s2", "trusted.overlay.redirect") == b"/d/sub"
    assert (upper / "s2" / "new").read_text() == "n"


def test_a_change_through_one_name_of_an_indexed_link_reaches_the_kernels_view_of_the_others(
        tmp_path: Path) -> None:
    """With index=on the kernel holds every name of a lower hard link with attributes cached for an hour: a
    write, a chmod, an unlink through one name is seen at once through the others (size, mode, nlink and
    ctime), so the daemon invalidates the kernel's view of each other name it knows."""
    lower, upper, work, mnt = _dirs(tmp_path)
    (lower / "x").write_bytes(b"linked\n")
    (lower / "d").mkdir()
    os.link(lower / "x", lower / "y")
    os.link(lower / "x", lower / "d" / "z")
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "index=on")):
        before = {name: os.stat(mnt / name) for name in ("x", "y", "d/z")}  # cached by the kernel now
        assert {st.st_nlink for st in before.values()} == {3}
        with open(mnt / "x", "ab") as f:
            f.write(b"more\n")
        for name in ("y", "d/z"):
            st = os.stat(mnt / name)
            assert (st.st_size, st.st_nlink, st.st_ino) == (12, 3, before["x"].st_ino)
            assert (mnt / name).read_bytes() == b"linked\nmore\n"
        os.chmod(mnt / "d" / "z", 0o600)
        assert os.stat(mnt / "y").st_mode & 0o777 == 0o600
        ctime = os.stat(mnt / "y").st_ctime_ns
        os.unlink(mnt / "x")
        st = os.stat(mnt / "y")
        assert st.st_nlink == 2 and os.stat(mnt / "d" / "z").st_nlink == 2
        assert st.st_ctime_ns >= ctime


@pytest.mark.parametrize("mode", ["on", "all", "off"])
def test_an_unprivileged_write_clears_set_id_bits_as_on_the_kernel(mode: str) -> None:
    """A write by a user without CAP_FSETID clears the set-user-id bit and the set-group-id bit of a
    group-executable file, whether its data goes through the daemon or through a passthrough backing; the
    modes are compared with the kernel's overlayfs on the same layers (one documented difference)."""
    results = {}
    root = Path(tempfile.mkdtemp(prefix="unionfs-setid-", dir="/tmp"))  # pytest's tmp dirs are 0700
    root.chmod(0o755)
    try:
        for system in ("kernel", "unionfs"):
            results[system] = _write_as_user_1000(root / system, system, mode)
    finally:
        shutil.rmtree(root)
    # the kernel's FUSE layer clears set-group-id on a write only where the group may execute (the rule
    # before Linux 6.2); the kernel's overlayfs also clears it for a writer outside the file's group
    # (docs/semantics.md, "Set-id bits on a write")
    assert results["kernel"].pop("lower-sgid-noexec") == (oct(0o766), b"lower\nmore")
    assert results["unionfs"].pop("lower-sgid-noexec") == (oct(0o2766), b"lower\nmore")
    assert results["unionfs"] == results["kernel"]
    assert results["kernel"]["upper-suid"] == (oct(0o777), b"upper\nmore")


def _write_as_user_1000(base: Path, system: str, mode: str) -> dict[str, tuple[str, bytes]]:
    """Each file's mode and data after user 1000 appended to it, on ``system`` ("kernel" or "unionfs")."""
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
    for name, perm in (("lower-suid", 0o6777), ("lower-sgid-noexec", 0o2766)):
        (lower / name).write_bytes(b"lower\n")
        os.chmod(lower / name, perm)
    base.chmod(0o755)
    ctx = (kernel_overlay_mount([lower], upper, work, mnt) if system == "kernel"
           else unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, f"passthrough={mode}")))
    with ctx:
        (mnt / "upper-suid").write_bytes(b"upper\n")
        os.chmod(mnt / "upper-suid", 0o6777)
        modes = {}
        for name in ("lower-suid", "lower-sgid-noexec", "upper-suid"):
            subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c",
                            'printf more >> "$1"', "sh", str(mnt / name)], check=True)
            modes[name] = (oct(os.stat(mnt / name).st_mode & 0o7777), (mnt / name).read_bytes())
    return modes

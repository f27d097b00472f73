"""Helpers shared by the reliability tests: iteration counts, daemon pids, crash-tolerant mounts, tree views.

``UNIONFS_STRESS_SCALE`` (default 1) multiplies the iteration counts and run times of the ``stress`` variants,
so ``make test-stress`` can be made longer without editing the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from support.mounts import MountError, unionfs_mount

from unionfs.control import daemon_pid
from unionfs.mountinfo import find_mount

STRESS_SCALE_ENV = "UNIONFS_STRESS_SCALE"


def stress_scale() -> float:
    """The factor ``make test-stress`` may set through ``$UNIONFS_STRESS_SCALE``."""
    return float(os.environ.get(STRESS_SCALE_ENV, "1"))


def scaled(n: float) -> int:
    return max(1, round(n * stress_scale()))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def pid_of(mnt: Path) -> int:
    """The daemon serving ``mnt`` (which must be a mount of the program under test)."""
    pid = daemon_pid(str(mnt))
    assert pid is not None, f"no daemon registered for {mnt}"
    return pid


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def lazy_unmount(mnt: Path) -> None:
    """``umount -l`` and wait until the mount is gone from mountinfo."""
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False, timeout=30)
    assert wait_for(lambda: find_mount(mnt) is None), f"{mnt} is still mounted after umount -l"


_KILLED: set[int] = set()
"""Daemons the tests killed on purpose (see ``sigkill``)."""


def expect_exit(pid: int) -> None:
    """The body of ``killable_mount`` is about to end the daemon itself (a signal other than SIGKILL)."""
    _KILLED.add(pid)


def sigkill(pid: int) -> None:
    """SIGKILL a daemon on purpose: ``killable_mount`` then expects it dead."""
    _KILLED.add(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def killable_mount(lowers: Sequence[Path], upper: Path, work: Path, mnt: Path,
                   options: Sequence[str] = ()) -> Iterator[tuple[Path, int]]:
    """``unionfs_mount`` whose daemon the body may kill with :func:`sigkill`: yields (mountpoint, daemon pid).

    When the body killed the daemon, the "daemon died" report of ``unionfs_mount`` is expected and swallowed;
    a daemon that died on its own still fails the test.
    """
    pid = -1
    try:
        with unionfs_mount(lowers, upper, work, mnt, options) as root:
            pid = pid_of(root)
            yield root, pid
            if pid in _KILLED:
                assert wait_for(lambda: not alive(pid)), "the daemon survived SIGKILL"
    except MountError as exc:
        if not (pid in _KILLED and "died while mounted" in str(exc)):
            raise
    finally:
        _KILLED.discard(pid)


def sha(path: Path | str | bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


View = dict[bytes, tuple[str, ...]]


def view(root: Path, *, unhashed: frozenset[bytes] = frozenset()) -> View:
    """What a tree shows: relative path (bytes) -> ("dir",) | ("file", sha256) | ("symlink", target) | (type,).

    Files in ``unhashed`` are described by their size only (``"size:N"``), to spare reading big files.
    """
    out: View = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, broot)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", f"size:{st.st_size}" if rel in unhashed else sha(full))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.fsdecode(os.readlink(full)))
            else:
                out[rel] = (stat.filemode(st.st_mode)[0],)
    return out

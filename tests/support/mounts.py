"""Real overlay mounts for tests: the program under test (FUSE) and the kernel's overlayfs.

Both context managers wait until ``/proc/self/mountinfo`` shows the mount with the expected filesystem
type, yield the mountpoint, and ALWAYS unmount on the way out (also when the body raises): a plain
``umount`` first (retried while busy), then ``umount -l``, then they wait until the mount is gone from
mountinfo and, for FUSE, until the daemon process has exited.

The program under test is ``$UNIONFS_MOUNT_PROG`` (default: ``unionfs-mount`` next to the running
interpreter, i.e. the project's venv). It must accept fuse-overlayfs's command line
``PROG -o lowerdir=L1:L2,upperdir=U,workdir=W[,opts] MOUNTPOINT`` and return 0 once the mount is ready.
The special value ``kernel`` makes the kernel's overlayfs play the program under test, which checks
that the differential harness itself is deterministic (every scenario must then pass).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from unionfs.mountinfo import find_mount

MOUNT_PROG_ENV = "UNIONFS_MOUNT_PROG"
EXTRA_OPTIONS_ENV = "UNIONFS_TEST_OPTIONS"
"""Extra ``-o`` options for every mount of the program under test (e.g. ``writeback_cache``), so a suite can
check that an option keeps the semantics."""
KERNEL_AS_PROGRAM = "kernel"

KERNEL_OPTIONS: tuple[str, ...] = ("redirect_dir=off", "index=off", "metacopy=off", "xino=off")
"""Pinned so the oracle does not depend on the kernel's build-time defaults (these are Debian's).  A test
passes its own ``redirect_dir=…`` in ``options`` to change it (a later option wins)."""

PROGRAM_DEFAULTS: tuple[str, ...] = ("redirect_dir=off", "index=off")
"""Given to the program under test before a test's own options: the oracle's pinned ``redirect_dir`` and
``index``, so that both sides rename directories and copy up hard links alike unless a test asks for
``redirect_dir=on`` or ``index=on`` on both."""

FRONTEND_ENV = "UNIONFS_FRONTEND"
"""Read by the daemon itself: which frontend serves mounts made without ``-o frontend=`` (``lowlevel`` or
``fusepy``), so that ``UNIONFS_FRONTEND=lowlevel pytest tests/mounted`` runs a suite on that frontend."""

MOUNT_TIMEOUT = 20.0
UNMOUNT_TIMEOUT = 10.0


class MountError(RuntimeError):
    """A mount could not be made or removed; the message carries the program's output."""


def frontend() -> str:
    """The frontend mounts of the program under test use (``$UNIONFS_FRONTEND``, else the daemon's default)."""
    from mountd.lifecycle import DEFAULT_FRONTEND

    return os.environ.get(FRONTEND_ENV) or DEFAULT_FRONTEND


def mount_program() -> str:
    """The program under test: ``$UNIONFS_MOUNT_PROG`` or the venv's ``unionfs-mount``."""
    prog = os.environ.get(MOUNT_PROG_ENV)
    if prog:
        return prog
    return str(Path(sys.prefix) / "bin" / "unionfs-mount")


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# --- processes -------------------------------------------------------------------------------------------

def _pids_with_arg(arg: str) -> set[int]:
    """Processes (other than us) with ``arg`` as one of their command-line arguments."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(arg) in args:
            pids.add(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


# --- unmounting ------------------------------------------------------------------------------------------

_ACTIVE: dict[str, set[int]] = {}
"""Mountpoints this module has mounted and not yet unmounted, with their daemon pids."""


def _read_log(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        return log.read_text(errors="replace").strip()
    except OSError:
        return ""


def unmount(mnt: Path, *, daemon_pids: Collection[int] = (), log: Path | None = None,
            timeout: float = UNMOUNT_TIMEOUT) -> None:
    """Unmount ``mnt`` and wait until it is gone from mountinfo and ``daemon_pids`` have exited.

    Tries ``umount`` (retrying while EBUSY for up to a second), then ``umount -l``. A daemon that does
    not exit within ``timeout`` after the unmount is killed, and MountError is raised: exiting on umount
    is part of the mount program's contract.
    """
    errors: list[str] = []
    deadline = time.monotonic() + 1.0
    while find_mount(mnt) is not None:
        rc, out = _run_bounded(["umount", str(mnt)], timeout)
        if rc == 0:
            break
        errors.append(out)
        if rc is None or time.monotonic() > deadline:
            warnings.warn(f"umount {mnt} failed ({out}); falling back to umount -l", stacklevel=2)
            _run_bounded(["umount", "-l", str(mnt)], timeout)
            break
        time.sleep(0.05)
    if not _wait(lambda: find_mount(mnt) is None, timeout):
        _kill(daemon_pids)  # a dead daemon aborts the FUSE connection; then try once more
        _run_bounded(["umount", "-l", str(mnt)], timeout)
        if not _wait(lambda: find_mount(mnt) is None, timeout):
            raise MountError(f"{mnt} is still mounted after umount and umount -l: {errors}")
    _ACTIVE.pop(str(mnt), None)
    if not _wait(lambda: not any(_alive(p) for p in daemon_pids), timeout):
        survivors = _kill(daemon_pids)
        raise MountError(f"daemon {survivors} for {mnt} did not exit after umount; killed it.\n"
                         f"{_read_log(log)}")


def _run_bounded(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run a helper command for at most ``timeout`` seconds: (exit code or None if killed, output)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=2)
        return None, f"{' '.join(argv)} did not finish within {timeout}s"
    return proc.returncode, out.strip()


def _kill(pids: Collection[int]) -> list[int]:
    """SIGKILL those of ``pids`` (daemons we started) that are still alive; return them."""
    alive = [p for p in pids if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


def unmount_leftovers() -> list[str]:
    """Unmount whatever this module mounted and did not unmount (a safety net); return those paths."""
    left = list(_ACTIVE)
    for mnt in reversed(left):
        with contextlib.suppress(MountError):
            unmount(Path(mnt), daemon_pids=_ACTIVE.get(mnt, set()))
    return left


# --- mounting --------------------------------------------------------------------------------------------

def _check_paths(paths: Sequence[Path]) -> None:
    for p in paths:
        if not p.is_absolute():
            raise ValueError(f"{p}: layer paths must be absolute")
        if any(c in str(p) for c in ",:\\\n"):
            raise ValueError(f"{p}: overlay option strings cannot carry ',' ':' or '\\' here")


def _overlay_options(lowers: Sequence[Path], upper: Path | None, work: Path | None) -> list[str]:
    if not lowers:
        raise ValueError("at least one lower layer is needed")
    if (upper is None) != (work is None):
        raise ValueError("upper and work go together")
    _check_paths([*lowers, *([upper, work] if upper and work else [])])
    opts = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None and work is not None:
        opts += [f"upperdir={upper}", f"workdir={work}"]
    return opts


def _prepare_mountpoint(mnt: Path) -> Path:
    mnt = Path(os.path.realpath(mnt))  # mountinfo shows the resolved path
    if find_mount(mnt) is not None:
        raise MountError(f"{mnt} is already a mountpoint")
    if not mnt.is_dir():
        raise MountError(f"{mnt} is not a directory")
    return mnt


@contextlib.contextmanager
def unionfs_mount(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                  options: Sequence[str] = (), *, program: str | None = None,
                  timeout: float = MOUNT_TIMEOUT, hang_timeout: float | None = None) -> Iterator[Path]:
    """Mount the program under test; yield the mountpoint; always unmount.

    ``lowers[0]`` is the top lower layer. Without ``upper`` (and ``work``) the mount is read-only.
    ``options`` are appended to ``-o`` (e.g. ``"whiteout=oci"``). Raises MountError, with everything the
    program wrote to stdout/stderr, when it exits non-zero, does not return within ``timeout``, returns
    without a FUSE mount appearing, dies while mounted, or does not exit after the unmount.

    A watchdog kills the daemon if the mount is still in use after ``hang_timeout`` seconds (default
    ``$UNIONFS_TEST_HANG_TIMEOUT`` or 120): a hung daemon then fails the test (ENOTCONN, MountError)
    instead of blocking the test run forever.
    """
    program = program or mount_program()
    if program == KERNEL_AS_PROGRAM:
        with kernel_overlay_mount(lowers, upper, work, mnt, options) as root:
            yield root
        return
    if hang_timeout is None:
        hang_timeout = float(os.environ.get("UNIONFS_TEST_HANG_TIMEOUT", "120"))
    mnt = _prepare_mountpoint(mnt)
    extra = [o for o in os.environ.get(EXTRA_OPTIONS_ENV, "").split(",") if o]
    opts = ",".join([*_overlay_options(lowers, upper, work), *PROGRAM_DEFAULTS, *options, *extra])
    argv = [program, "-o", opts, str(mnt)]
    command = " ".join(argv)
    # The output goes to a file, not a pipe: a daemon that keeps the inherited stderr open must not
    # make us wait for EOF, and whatever it logs later is still there to show on failure.
    fd, name = tempfile.mkstemp(prefix="unionfs-mount-", suffix=".log")
    os.close(fd)
    log = Path(name)
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        if rc != 0:
            daemons = _pids_with_arg(str(mnt))
            _kill(daemons)
            with contextlib.suppress(MountError):
                unmount(mnt, daemon_pids=daemons)
            what = f"did not return within {timeout}s" if rc is None else f"exited {rc}"
            raise MountError(f"{command} {what}:\n{_read_log(log)}")
        if not _wait(lambda: (m := find_mount(mnt)) is not None and m.fstype.startswith("fuse"), timeout):
            found = find_mount(mnt)
            with contextlib.suppress(MountError):
                unmount(mnt, daemon_pids=_pids_with_arg(str(mnt)))
            raise MountError(f"{command} returned 0 but no FUSE mount appeared at {mnt} "
                             f"(found {found}):\n{_read_log(log)}")
        pids = _pids_with_arg(str(mnt))
        _ACTIVE[str(mnt)] = pids
        hung = threading.Event()

        def watchdog() -> None:
            hung.set()
            _kill(pids)

        timer = threading.Timer(hang_timeout, watchdog)
        timer.daemon = True
        timer.start()
        try:
            yield mnt
        finally:
            timer.cancel()
            died = bool(pids) and not any(_alive(p) for p in pids) and not hung.is_set()
            unmount(mnt, daemon_pids=pids, log=log)
            if hung.is_set():
                raise MountError(f"{command}: mount still busy after {hang_timeout}s, daemon killed:\n"
                                 f"{_read_log(log)}")
            if died:
                raise MountError(f"{command}: the daemon died while mounted:\n{_read_log(log)}")
    finally:
        log.unlink(missing_ok=True)


IN_USE_WAIT = 60.0
"""How long a kernel mount waits for an upper dir another overlay holds (see :func:`kernel_overlay_mount`)."""


def _dmesg_tail() -> str:
    _, out = _run_bounded(["dmesg"], 5)
    return "\n".join(line for line in out.splitlines()[-20:] if "overlay" in line)


@contextlib.contextmanager
def kernel_overlay_mount(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                         options: Sequence[str] = ()) -> Iterator[Path]:
    """Mount the kernel's overlayfs (``KERNEL_OPTIONS`` pinned); yield the mountpoint; always unmount.

    ``lowers[0]`` is the top lower layer; without ``upper`` the mount is read-only. The kernel wants at
    least two lowers for a read-only mount, so a single lower gets an empty layer added below it (which
    changes nothing visible).
    """
    mnt = _prepare_mountpoint(mnt)
    extra: Path | None = None
    lowers = list(lowers)
    try:
        if upper is None and len(lowers) == 1:
            extra = Path(tempfile.mkdtemp(prefix="empty-lower-"))
            lowers.append(extra)
        opts = ",".join([*_overlay_options(lowers, upper, work), *KERNEL_OPTIONS, *options])
        argv = ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)]
        rc, out = _run_bounded(argv, MOUNT_TIMEOUT)
        deadline = time.monotonic() + IN_USE_WAIT
        while rc != 0 and "already mounted" in out and time.monotonic() < deadline:
            # EBUSY: with index=on the kernel refuses an upper dir that another overlay still holds.  An
            # earlier mount of this upper, unmounted here, lives on while a mount namespace copied from
            # this one (a container, unshare) keeps it: wait for that namespace to go.
            time.sleep(0.2)
            rc, out = _run_bounded(argv, MOUNT_TIMEOUT)
        if rc != 0:
            raise MountError(f"{' '.join(argv)} failed: {out}\n{_dmesg_tail()}")
        if not _wait(lambda: (m := find_mount(mnt)) is not None and m.fstype == "overlay", MOUNT_TIMEOUT):
            raise MountError(f"overlay mount at {mnt} did not appear in mountinfo")
        _ACTIVE[str(mnt)] = set()
        try:
            yield mnt
        finally:
            unmount(mnt)
    finally:
        if extra is not None:
            extra.rmdir()

"""The command line of the daemon, for real: ``unionfs-mount`` (fuse-overlayfs' argv) and ``unionfs mount/umount``.

What these prove: ``--version`` and ``-h``; the program returns only once the mount is there, with the daemon
detached (not our descendant, its own session, umask 0, cwd /, stdio on /dev/null, our pipes not held — every
run here captures stdout/stderr through pipes and would time out otherwise) and every layer already open;
``umount`` and SIGTERM/SIGINT end the daemon; ``-f`` stays in the foreground until unmounted; and every kind
of bad input gives one line on stderr, the documented exit status, no mount and no write in any directory.

Every mount is made through :class:`Cleanup`, which always unmounts (``umount``, then ``umount -l``) and
waits for the daemons to exit, killing one that does not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.mounts import mount_program

from unionfs.control import daemon_pid
from unionfs.mountinfo import mounts

pytestmark = pytest.mark.mounted

PROG = mount_program()
UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")
TIMEOUT = 30.0


# -- helpers ------------------------------------------------------------------------------------------------

def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with stdin on /dev/null and stdout/stderr captured through pipes."""
    return subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False, cwd=cwd)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def proc_stat(pid: int) -> tuple[int, int]:
    """(ppid, session id) of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[3])


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        pid = proc_stat(pid)[0]
        chain.append(pid)
    return chain


def fstype_at(path: Path) -> str | None:
    found = [m for m in mounts() if m.mountpoint == str(path)]
    return found[-1].fstype if found else None


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """The mounts below ``root`` (other test runs on this machine mount elsewhere at the same time)."""
    return [(m.mountpoint, m.fstype) for m in mounts() if m.mountpoint.startswith(str(root) + "/")]


def tree_state(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path below ``root`` with (mode, size, mtime, ctime); mount points are listed, not entered."""
    state: dict[str, tuple[int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if os.path.ismount(path):
                state[path] = (0, 0, 0, 0)
                continue
            st = os.lstat(path)
            state[path] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
    return state


def _unmounted(mnt: Path) -> Callable[[], bool]:
    return lambda: fstype_at(mnt) is None


class Cleanup:
    """Mounts and daemons a test made; :meth:`close` unmounts them all and waits for the daemons."""

    def __init__(self) -> None:
        self.mountpoints: list[Path] = []
        self.pids: set[int] = set()

    def mounted(self, mnt: Path, pid: int | None = None) -> None:
        self.mountpoints.append(mnt)
        if pid is not None:
            self.pids.add(pid)

    def close(self) -> None:
        for mnt in reversed(self.mountpoints):
            if fstype_at(mnt) is None:
                continue
            if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            assert wait_for(_unmounted(mnt)), f"{mnt} is still mounted"
        if not wait_for(lambda: not any(alive(p) for p in self.pids)):
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"daemons {self.pids} did not exit after their unmount")


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        c.close()


@dataclass(frozen=True)
class Dirs:
    root: Path
    l1: Path
    l2: Path
    upper: Path
    work: Path
    mnt: Path

    def options(self, *extra: str) -> str:
        return ",".join([f"lowerdir={self.l1}:{self.l2},upperdir={self.upper},workdir={self.work}", *extra])


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    d = Dirs(tmp_path, tmp_path / "l1", tmp_path / "l2", tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
    for path in (d.l1, d.l2 / "sub", d.upper, d.work, d.mnt):
        path.mkdir(parents=True)
    (d.l1 / "a").write_text("from l1\n")
    (d.l2 / "a").write_text("from l2, hidden\n")
    (d.l2 / "sub" / "b").write_text("from l2\n")
    return d


def mount(d: Dirs, cleanup: Cleanup, *extra: str, mnt: Path | None = None) -> int:
    """Mount with ``unionfs-mount``; check it returned 0 silently with the mount in place; return the
    daemon's pid."""
    mnt = mnt or d.mnt
    proc = run(PROG, "-o", d.options(*extra), mnt)
    cleanup.mounted(mnt)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert fstype_at(mnt) == "fuse.unionfs", "the program returned before the mount was there"
    pid = daemon_pid(str(mnt))
    assert pid is not None
    cleanup.mounted(mnt, pid)
    return pid


@contextlib.contextmanager
def tmpfs(path: Path, cleanup: Cleanup) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(path)], check=True)
    cleanup.mounted(path)
    yield path


# -- version and help ---------------------------------------------------------------------------------------

def test_version() -> None:
    proc = run(PROG, "--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert re.fullmatch(r"unionfs-mount \S+ \(frontend (lowlevel|fusepy); fusepy: binding (mfusepy|fusepy), "
                        r"libfuse [23]\)\n", proc.stdout)


def test_help() -> None:
    proc = run(PROG, "-h")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: unionfs-mount [SOURCE] MOUNTPOINT -o lowerdir=")
    assert "Accepted and ignored:" in proc.stdout and "userxattr" in proc.stdout


def test_unionfs_version_and_help_without_fuse() -> None:
    assert run(UNIONFS, "--version").stdout.startswith("unionfs ")
    proc = run(UNIONFS, "mount", "-h")
    assert proc.returncode == 0 and "--lower DIR" in proc.stdout


# -- mounting -----------------------------------------------------------------------------------------------

def test_mount_returns_ready_with_the_daemon_detached(dirs: Dirs, cleanup: Cleanup) -> None:
    pid = mount(dirs, cleanup)
    assert (dirs.mnt / "a").read_text() == "from l1\n"
    assert (dirs.mnt / "sub" / "b").read_text() == "from l2\n"
    assert os.getpid() not in ancestors(pid), "the daemon is still a descendant of the caller"
    assert proc_stat(pid)[1] == pid, "the daemon did not start its own session"
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^Umask:\s+0000$", status, re.M)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"


def test_writes_go_to_the_upper_dir(dirs: Dirs, cleanup: Cleanup) -> None:
    mount(dirs, cleanup)
    (dirs.mnt / "new").write_text("new\n")
    assert (dirs.upper / "new").read_text() == "new\n"


def test_relative_paths_against_the_callers_cwd(dirs: Dirs, cleanup: Cleanup) -> None:
    """containers/storage runs the program in its overlay dir."""
    proc = run(PROG, "-o", "lowerdir=l1:l2,upperdir=upper,workdir=work", "mnt", cwd=dirs.root)
    cleanup.mounted(dirs.mnt, daemon_pid(str(dirs.mnt)))
    assert proc.returncode == 0, proc.stderr
    assert (dirs.mnt / "a").read_text() == "from l1\n"


def test_every_layer_is_open_when_the_program_returns(dirs: Dirs, cleanup: Cleanup, tmp_path: Path) -> None:
    """containers/storage detaches the (idmapped) lower mounts right after the program returns."""
    bind = tmp_path / "bound-lower"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(dirs.l1), str(bind)], check=True)
    cleanup.mounted(bind)
    link = tmp_path / "link-to-lower"
    link.symlink_to(bind)
    proc = run(PROG, "-o", f"lowerdir={link}:{dirs.l2},upperdir={dirs.upper},workdir={dirs.work}", dirs.mnt)
    cleanup.mounted(dirs.mnt, daemon_pid(str(dirs.mnt)))
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["umount", "-l", str(bind)], check=True)
    link.unlink()
    assert (dirs.mnt / "a").read_text() == "from l1\n"


def test_read_only_without_upperdir(dirs: Dirs, cleanup: Cleanup) -> None:
    proc = run(PROG, "-o", f"lowerdir={dirs.l1}:{dirs.l2}", dirs.mnt)
    cleanup.mounted(dirs.mnt, daemon_pid(str(dirs.mnt)))
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(OSError) as info:
        (dirs.mnt / "new").write_text("x")
    assert info.value.errno == errno.EROFS


def test_ro_with_an_upperdir_writes_nothing(dirs: Dirs, cleanup: Cleanup) -> None:
    (dirs.upper / "up").write_text("in the upper\n")
    before = tree_state(dirs.root)
    mount(dirs, cleanup, "ro")
    assert (dirs.mnt / "up").read_text() == "in the upper\n"
    with pytest.raises(OSError) as info:
        (dirs.mnt / "a").write_text("x")
    assert info.value.errno == errno.EROFS
    cleanup.close()
    assert tree_state(dirs.root) == before


# -- ending a mount -----------------------------------------------------------------------------------------

def test_umount_ends_the_daemon(dirs: Dirs, cleanup: Cleanup) -> None:
    pid = mount(dirs, cleanup)
    assert run("umount", dirs.mnt).returncode == 0
    assert wait_for(lambda: not alive(pid)), "the daemon kept running after umount"
    assert fstype_at(dirs.mnt) is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_and_ends_the_daemon(dirs: Dirs, cleanup: Cleanup, sig: signal.Signals) -> None:
    pid = mount(dirs, cleanup)
    os.kill(pid, sig)
    assert wait_for(lambda: not alive(pid)), f"the daemon ignored {sig.name}"
    assert fstype_at(dirs.mnt) is None, f"{sig.name} left the mount behind"


def test_foreground_runs_until_unmounted(dirs: Dirs, cleanup: Cleanup, tmp_path: Path) -> None:
    log = tmp_path / "fg.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PROG, "-f", "-o", dirs.options(), str(dirs.mnt)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    cleanup.mounted(dirs.mnt, proc.pid)
    try:
        assert wait_for(lambda: daemon_pid(str(dirs.mnt)) is not None), log.read_text()
        assert daemon_pid(str(dirs.mnt)) == proc.pid
        assert proc.poll() is None
        assert (dirs.mnt / "a").read_text() == "from l1\n"
        assert run("umount", dirs.mnt).returncode == 0
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            cleanup.close()
            proc.wait(timeout=TIMEOUT)


def test_debug_logs_to_stderr_in_the_foreground(dirs: Dirs, cleanup: Cleanup, tmp_path: Path) -> None:
    log = tmp_path / "debug.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PROG, "-d", "-o", dirs.options(), str(dirs.mnt)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    cleanup.mounted(dirs.mnt, proc.pid)
    assert wait_for(lambda: daemon_pid(str(dirs.mnt)) == proc.pid)
    assert run("umount", dirs.mnt).returncode == 0
    assert proc.wait(timeout=TIMEOUT) == 0
    assert f"unionfs-mount: INFO: mounted {dirs.mnt}" in log.read_text()


def test_unionfs_mount_and_umount(dirs: Dirs, cleanup: Cleanup) -> None:
    proc = run(UNIONFS, "mount", "--lower", dirs.l1, "--lower", dirs.l2, "--upper", dirs.upper,
               "--work", dirs.work, dirs.mnt)
    pid = daemon_pid(str(dirs.mnt))
    cleanup.mounted(dirs.mnt, pid)
    assert proc.returncode == 0, proc.stderr
    assert pid is not None
    assert (dirs.mnt / "a").read_text() == "from l1\n"
    proc = run(UNIONFS, "umount", dirs.mnt)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert not alive(pid), "unionfs umount returned before the daemon exited"
    assert fstype_at(dirs.mnt) is None


def test_unionfs_umount_refuses_what_is_not_ours(dirs: Dirs, cleanup: Cleanup) -> None:
    proc = run(UNIONFS, "umount", dirs.mnt)
    assert (proc.returncode, proc.stderr) == (1, f"unionfs: error: '{dirs.mnt}' is not mounted\n")
    with tmpfs(dirs.mnt, cleanup):
        proc = run(UNIONFS, "umount", dirs.mnt)
        assert (proc.returncode, proc.stderr) == (1, f"unionfs: error: '{dirs.mnt}' is not a unionfs mount "
                                                     "(tmpfs)\n")
        assert fstype_at(dirs.mnt) == "tmpfs"


# -- bad input ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    """A bad command line: ``argv`` for the program, the one line it must print, its exit status."""

    argv: list[str]
    message: str
    status: int


def _rw(d: Dirs, *, lowers: str | None = None, upper: Path | None = None, work: Path | None = None,
        mnt: Path | None = None, extra: str = "") -> list[str]:
    opts = f"lowerdir={lowers or f'{d.l1}:{d.l2}'},upperdir={upper or d.upper},workdir={work or d.work}"
    return ["-o", opts + extra, str(mnt or d.mnt)]


def bad_missing_lower(d: Dirs, c: Cleanup) -> Bad:
    nope = d.root / "nope"
    return Bad(_rw(d, lowers=f"{d.l1}:{nope}"), f"lowerdir '{nope}': no such directory", 1)


def bad_lower_is_a_file(d: Dirs, c: Cleanup) -> Bad:
    return Bad(_rw(d, lowers=f"{d.l1 / 'a'}"), f"lowerdir '{d.l1 / 'a'}': not a directory", 1)


def bad_missing_upper(d: Dirs, c: Cleanup) -> Bad:
    nope = d.root / "nope"
    return Bad(_rw(d, upper=nope), f"upperdir '{nope}': no such directory", 1)


def bad_missing_work(d: Dirs, c: Cleanup) -> Bad:
    nope = d.root / "nope"
    return Bad(_rw(d, work=nope), f"workdir '{nope}': no such directory", 1)


def bad_upper_without_work(d: Dirs, c: Cleanup) -> Bad:
    return Bad(["-o", f"lowerdir={d.l1},upperdir={d.upper}", str(d.mnt)],
               "upperdir and workdir must be given together", 2)


def bad_upper_inside_a_lower(d: Dirs, c: Cleanup) -> Bad:
    inner = d.l2 / "sub"
    return Bad(_rw(d, upper=inner), f"upperdir '{inner}' is inside lowerdir '{d.l2}'", 1)


def bad_work_inside_upper(d: Dirs, c: Cleanup) -> Bad:
    inner = d.upper / "w"
    inner.mkdir()
    return Bad(_rw(d, work=inner), f"workdir '{inner}' is inside upperdir '{d.upper}'", 1)


def bad_lower_inside_upper(d: Dirs, c: Cleanup) -> Bad:
    inner = d.upper / "l"
    inner.mkdir()
    return Bad(_rw(d, lowers=f"{d.l1}:{inner}"), f"lowerdir '{inner}' is inside upperdir '{d.upper}'", 1)


def bad_mountpoint_inside_a_layer(d: Dirs, c: Cleanup) -> Bad:
    inner = d.l2 / "sub"
    return Bad(_rw(d, mnt=inner), f"mountpoint '{inner}' is inside lowerdir '{d.l2}'", 1)


def bad_layer_is_the_mountpoint(d: Dirs, c: Cleanup) -> Bad:
    return Bad(_rw(d, mnt=d.l1), f"lowerdir '{d.l1}' and mountpoint '{d.l1}' are the same directory", 1)


def bad_workdir_on_another_filesystem(d: Dirs, c: Cleanup) -> Bad:
    other = d.root / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(other)], check=True)
    c.mounted(other)
    work = other / "work"
    work.mkdir()
    return Bad(_rw(d, work=work), f"workdir '{work}' is not on the same filesystem as upperdir '{d.upper}'", 1)


def bad_unknown_option(d: Dirs, c: Cleanup) -> Bad:
    return Bad(_rw(d, extra=",frobnicate=1"), "unknown option 'frobnicate=1'", 2)


def bad_mountpoint_missing(d: Dirs, c: Cleanup) -> Bad:
    nope = d.root / "nope"
    return Bad(_rw(d, mnt=nope), f"mountpoint '{nope}': no such directory", 1)


def bad_mountpoint_already_a_mount(d: Dirs, c: Cleanup) -> Bad:
    subprocess.run(["mount", "-t", "tmpfs", "none", str(d.mnt)], check=True)
    c.mounted(d.mnt)
    return Bad(_rw(d), f"mountpoint '{d.mnt}' is already a mount point (tmpfs)", 1)


def bad_workdir_in_use(d: Dirs, c: Cleanup) -> Bad:
    mount(d, c)
    upper2, mnt2 = d.root / "upper2", d.root / "mnt2"
    upper2.mkdir()
    mnt2.mkdir()
    return Bad(_rw(d, lowers=str(d.l2), upper=upper2, mnt=mnt2), f"workdir '{d.work}' is in use by another mount",
               1)


def bad_whiteout_format(d: Dirs, c: Cleanup) -> Bad:
    return Bad(_rw(d, extra=",whiteout=bogus"), "whiteout=bogus: expected one of auto, kernel, oci", 2)


def bad_missing_mountpoint_argument(d: Dirs, c: Cleanup) -> Bad:
    return Bad(["-o", f"lowerdir={d.l1}"], "missing MOUNTPOINT", 2)


BAD_INPUT = [bad_missing_lower, bad_lower_is_a_file, bad_missing_upper, bad_missing_work, bad_upper_without_work,
             bad_upper_inside_a_lower, bad_work_inside_upper, bad_lower_inside_upper,
             bad_mountpoint_inside_a_layer, bad_layer_is_the_mountpoint, bad_workdir_on_another_filesystem,
             bad_unknown_option, bad_mountpoint_missing, bad_mountpoint_already_a_mount, bad_workdir_in_use,
             bad_whiteout_format, bad_missing_mountpoint_argument]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[f.__name__.removeprefix("bad_") for f in BAD_INPUT])
def test_bad_input(case: Callable[[Dirs, Cleanup], Bad], dirs: Dirs, cleanup: Cleanup) -> None:
    """One line on stderr, the documented exit status, nothing mounted, nothing written."""
    bad = case(dirs, cleanup)
    mounted_before, tree_before = mounts_under(dirs.root), tree_state(dirs.root)
    proc = run(PROG, *bad.argv)
    assert proc.stderr == f"unionfs-mount: error: {bad.message}\n"
    assert (proc.returncode, proc.stdout) == (bad.status, "")
    assert mounts_under(dirs.root) == mounted_before, "something was mounted"
    assert tree_state(dirs.root) == tree_before, "something was written"


def test_bad_input_through_unionfs_mount(dirs: Dirs, cleanup: Cleanup) -> None:
    tree_before = tree_state(dirs.root)
    proc = run(UNIONFS, "mount", "--lower", dirs.root / "nope", dirs.mnt)
    assert (proc.returncode, proc.stderr) == (1, f"unionfs: error: lowerdir '{dirs.root / 'nope'}': "
                                                 "no such directory\n")
    proc = run(UNIONFS, "mount", "--lower", dirs.l1, "-o", "frobnicate", dirs.mnt)
    assert (proc.returncode, proc.stderr) == (2, "unionfs: error: unknown option 'frobnicate'\n")
    assert mounts_under(dirs.root) == []
    assert tree_state(dirs.root) == tree_before

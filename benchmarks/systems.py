"""The systems under test and how to mount them.

Every system turns a :class:`Stack` of lower directories (top first, as in ``lowerdir=``) into a directory to
run a workload in:

- ``native``: no union at all. Read-only workloads use the bottom lower directly; workloads that write get a
  fresh copy of the (single) lower.
- ``kernel``: the kernel's overlayfs (``mount -t overlay``).
- ``fuse-overlayfs``: ``/usr/bin/fuse-overlayfs -o lowerdir=…,upperdir=…,workdir=… MOUNTPOINT``.
- ``unionfs``: ``unionfs-mount`` with exactly the same command line. ``BENCH_UNIONFS_MOUNT`` replaces the
  command (for example with ``/usr/bin/fuse-overlayfs`` to exercise the harness before the daemon exists).

Every mount is a context manager that unmounts on the way out, whatever happened inside, and waits for a FUSE
daemon to exit so that the next run starts clean.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.mountinfo import mounts

MOUNT_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 30.0
DAEMON_EXIT_TIMEOUT_S = 30.0
UNIONFS_ENV = "BENCH_UNIONFS_MOUNT"


class MountError(RuntimeError):
    """A system could not be mounted or unmounted."""


@dataclass(frozen=True)
class Stack:
    """Lower directories, top first (``lowerdir=A:B:C`` has A on top). Immutable while mounted."""

    lowers: tuple[Path, ...]

    def __post_init__(self) -> None:
        if not self.lowers:
            raise ValueError("a stack needs at least one lower directory")
        for p in self.lowers:
            if not p.is_absolute() or any(c in str(p) for c in ":,\\"):
                raise ValueError(f"lower paths must be absolute, without ':' ',' '\\': {p}")

    @property
    def bottom(self) -> Path:
        return self.lowers[-1]


@dataclass(frozen=True)
class SystemInfo:
    """What the result file records about a system: whether it ran, which version, with which command."""

    name: str
    available: bool
    version: str = ""
    command: str = ""
    reason: str = ""


@dataclass
class Mount:
    """A mounted (or, for native, prepared) system. ``root`` is where the workload runs."""

    system: System
    stack: Stack
    run_dir: Path
    root: Path
    writable: bool
    mount_seconds: float = 0.0
    daemon_pids: list[int] = field(default_factory=list)

    def remount(self) -> float:
        """Unmount and mount again over the same upper and work dirs (kernel caches of the mount are lost).

        Returns the new mount time in seconds; a no-op (0.0) for native.
        """
        return self.system.remount(self)

    def daemon_rss_bytes(self) -> tuple[int, int] | None:
        """(VmRSS, VmHWM) summed over the FUSE daemon's processes; None when there is no daemon."""
        if not self.daemon_pids:
            return None
        rss = hwm = 0
        for pid in self.daemon_pids:
            status = _read_status(pid)
            rss += status.get("VmRSS", 0)
            hwm += status.get("VmHWM", 0)
        return rss, hwm


class System(ABC):
    """One filesystem under test."""

    name: str

    @property
    def slug(self) -> str:
        """The name as a directory name (a layer path may hold no ``:`` or ``,``)."""
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.name)

    @abstractmethod
    def probe(self, scratch: Path) -> SystemInfo:
        """Find out whether this system can run here (may mount a tiny stack under ``scratch``)."""

    @abstractmethod
    def _enter(self, stack: Stack, run_dir: Path, writable: bool) -> Mount: ...

    @abstractmethod
    def _exit(self, mount: Mount) -> None: ...

    @abstractmethod
    def remount(self, mount: Mount) -> float: ...

    @contextlib.contextmanager
    def mount(self, stack: Stack, run_dir: Path, *, writable: bool) -> Iterator[Mount]:
        """Mount ``stack`` with a fresh upper/work under ``run_dir``; always unmount on exit."""
        run_dir.mkdir(parents=True, exist_ok=True)
        m = self._enter(stack, run_dir, writable)
        try:
            yield m
        finally:
            self._exit(m)


class Native(System):
    """The plain host filesystem: the baseline every union is compared with."""

    name = "native"

    def probe(self, scratch: Path) -> SystemInfo:
        return SystemInfo(self.name, True, version=f"{_fs_type(scratch)} on {platform.release()}")

    def _enter(self, stack: Stack, run_dir: Path, writable: bool) -> Mount:
        if not writable:
            return Mount(self, stack, run_dir, stack.bottom, writable)
        if len(stack.lowers) != 1:
            raise ValueError("native can only copy a single-layer stack for a writing workload")
        root = run_dir / "native"
        # cp -a keeps modes, owners and times, like the lower the unions see.
        subprocess.run(["cp", "-a", f"{stack.bottom}/.", str(root)], check=True)
        return Mount(self, stack, run_dir, root, writable)

    def _exit(self, mount: Mount) -> None:
        pass

    def remount(self, mount: Mount) -> float:
        return 0.0


class _Overlay(System):
    """Shared mount/unmount logic of the three union systems."""

    def _dirs(self, run_dir: Path) -> tuple[Path, Path, Path]:
        upper, work, mnt = run_dir / "upper", run_dir / "work", run_dir / "mnt"
        for d in (upper, work, mnt):
            d.mkdir(parents=True, exist_ok=True)
        return upper, work, mnt

    @abstractmethod
    def _command(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> tuple[list[str], Path | None]:
        """argv and cwd that mount ``stack`` at ``mnt``."""

    def _has_daemon(self) -> bool:
        return True

    def _do_mount(self, stack: Stack, run_dir: Path, timeout: float = MOUNT_TIMEOUT_S) -> tuple[float, list[int]]:
        upper, work, mnt = self._dirs(run_dir)
        argv, cwd = self._command(stack, upper, work, mnt)
        log = run_dir / f"{self.slug}-mount.log"
        start = time.perf_counter()
        # stderr goes to a file, not a pipe: a daemon that keeps its stderr would otherwise block us forever.
        with open(log, "ab") as err:
            try:
                proc = subprocess.run(
                    argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    timeout=timeout, check=False,
                )
            except subprocess.TimeoutExpired as e:
                _unmount_quietly(mnt)
                raise MountError(f"{self.name}: mount command timed out after {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise MountError(f"{self.name}: mount exited {proc.returncode}: {_tail(log)}")
        while not os.path.ismount(mnt):
            if time.perf_counter() - start > timeout:
                raise MountError(f"{self.name}: {mnt} not mounted {timeout:.0f} s after the command")
            time.sleep(0.002)
        elapsed = time.perf_counter() - start
        pids = find_daemon_pids(mnt) if self._has_daemon() else []
        return elapsed, pids

    def _enter(self, stack: Stack, run_dir: Path, writable: bool) -> Mount:
        elapsed, pids = self._do_mount(stack, run_dir)
        return Mount(self, stack, run_dir, run_dir / "mnt", writable, elapsed, pids)

    def _exit(self, mount: Mount) -> None:
        unmount(mount.root, mount.daemon_pids)

    def remount(self, mount: Mount) -> float:
        unmount(mount.root, mount.daemon_pids)
        mount.daemon_pids = []
        mount.mount_seconds, mount.daemon_pids = self._do_mount(mount.stack, mount.run_dir)
        return mount.mount_seconds

    def _probe_mount(self, scratch: Path) -> str:
        """Mount a two-layer stack, check the merge and a write, unmount. Returns '' or why it failed."""
        base = scratch / "probe" / self.slug
        shutil.rmtree(base, ignore_errors=True)
        lo1, lo2, run_dir = base / "l1", base / "l2", base / "run"
        for d in (lo1, lo2, run_dir):
            d.mkdir(parents=True)
        (lo1 / "top").write_text("1")
        (lo2 / "bottom").write_text("2")
        mnt = run_dir / "mnt"
        pids: list[int] = []
        reason = ""
        try:
            _, pids = self._do_mount(Stack((lo1, lo2)), run_dir, timeout=PROBE_TIMEOUT_S)
            names = sorted(os.listdir(mnt))
            if names != ["bottom", "top"]:
                reason = f"probe mount lists {names}, expected ['bottom', 'top']"
            else:
                (mnt / "new").write_text("3")
        except (MountError, OSError, subprocess.SubprocessError) as e:
            reason = str(e)
        finally:
            try:
                unmount(mnt, pids)
            except MountError as e:
                reason = reason or str(e)
            if not os.path.ismount(mnt):
                shutil.rmtree(base, ignore_errors=True)
        return reason


class KernelOverlay(_Overlay):
    """The kernel's overlayfs.

    mount(2) takes at most one page of options, so the layers are passed relative to their common parent
    (the trick containers/storage uses): 500 layers then fit.
    """

    name = "kernel"

    def _has_daemon(self) -> bool:
        return False

    def _command(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> tuple[list[str], Path | None]:
        cwd = Path(os.path.commonpath([str(p) for p in stack.lowers]))
        if len(stack.lowers) == 1:
            cwd = cwd.parent
        lowers = ":".join(os.path.relpath(p, cwd) for p in stack.lowers)
        opts = f"lowerdir={lowers},upperdir={os.path.relpath(upper, cwd)},workdir={os.path.relpath(work, cwd)}"
        return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], cwd

    def probe(self, scratch: Path) -> SystemInfo:
        if os.geteuid() != 0:
            return SystemInfo(self.name, False, reason="needs root")
        reason = self._probe_mount(scratch)
        return SystemInfo(self.name, not reason, version=platform.release(), command="mount -t overlay",
                          reason=reason)


class FuseOverlay(_Overlay):
    """A FUSE daemon with fuse-overlayfs's command line (fuse-overlayfs itself, or unionfs-mount)."""

    def __init__(self, name: str, command: Sequence[str], extra_opts: str = "") -> None:
        self.name = name
        self.command = list(command)
        self.extra_opts = extra_opts

    def _command(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> tuple[list[str], Path | None]:
        opts = f"lowerdir={':'.join(map(str, stack.lowers))},upperdir={upper},workdir={work}"
        if self.extra_opts:
            opts += "," + self.extra_opts
        return [*self.command, "-o", opts, str(mnt)], None

    def probe(self, scratch: Path) -> SystemInfo:
        cmdline = shlex.join(self.command) + (f" -o …,{self.extra_opts}" if self.extra_opts else "")
        exe = shutil.which(self.command[0])
        if exe is None:
            return SystemInfo(self.name, False, command=cmdline, reason=f"{self.command[0]} not found")
        version = _version(self.command)
        reason = self._probe_mount(scratch)
        return SystemInfo(self.name, not reason, version=version, command=cmdline, reason=reason)


def make_systems(names: Sequence[str], *, unionfs_opts: str = "") -> list[System]:
    """The systems to run, in the order given. Unknown names raise ValueError."""
    out: list[System] = []
    for name in names:
        if name == "native":
            out.append(Native())
        elif name == "kernel":
            out.append(KernelOverlay())
        elif name == "fuse-overlayfs":
            out.append(FuseOverlay("fuse-overlayfs", ["/usr/bin/fuse-overlayfs"]))
        elif name == "unionfs":
            out.append(FuseOverlay("unionfs", unionfs_command(), unionfs_opts))
        elif name.startswith("unionfs:") and name != "unionfs:":
            # a second unionfs in the same interleaved run, with its own options ("+" between them)
            opts = ",".join(o for o in [unionfs_opts, *name[len("unionfs:"):].split("+")] if o)
            out.append(FuseOverlay(name, unionfs_command(), opts))
        else:
            raise ValueError(f"unknown system {name!r} (native, kernel, fuse-overlayfs, unionfs, "
                             "unionfs:OPT[+OPT…])")
    return out


def unionfs_command() -> list[str]:
    """``$BENCH_UNIONFS_MOUNT`` if set, else the ``unionfs-mount`` next to this Python, else on PATH."""
    override = os.environ.get(UNIONFS_ENV)
    if override:
        return shlex.split(override)
    beside = Path(sys.prefix) / "bin" / "unionfs-mount"
    if beside.exists():
        return [str(beside)]
    return ["unionfs-mount"]


def drop_caches() -> None:
    """Write back dirty data, then drop the page, dentry and inode caches (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def unmount(mnt: Path, daemon_pids: Sequence[int] = ()) -> None:
    """``umount mnt``, retrying while busy, lazily as a last resort; then wait for the daemon to exit."""
    if os.path.ismount(mnt):
        for _ in range(50):
            proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, check=False)
            if proc.returncode == 0 or not os.path.ismount(mnt):
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            if os.path.ismount(mnt):
                raise MountError(f"cannot unmount {mnt}: {proc.stderr.strip()}")
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT_S
    for pid in daemon_pids:
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"daemon {pid} of {mnt} still running {DAEMON_EXIT_TIMEOUT_S:.0f} s after umount")
            time.sleep(0.01)


def unmount_stale(scratch: Path) -> list[str]:
    """Unmount whatever an interrupted earlier run left mounted under ``scratch``; returns the mountpoints."""
    prefix = str(scratch.resolve()) + "/"
    stale = [m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)]
    for mp in sorted(stale, key=len, reverse=True):
        proc = subprocess.run(["umount", mp], capture_output=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    return stale


def find_daemon_pids(mnt: Path) -> list[int]:
    """Processes whose command line names ``mnt``: the FUSE daemon serving it.

    Among several candidates, those holding ``/dev/fuse`` open win.
    """
    target = str(mnt)
    me = os.getpid()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace").rstrip("/") == target for a in args):
            found.append(int(entry))
    with_fuse = [pid for pid in found if _holds_dev_fuse(pid)]
    return with_fuse or found


def _holds_dev_fuse(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    return True
    except OSError:
        pass
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_status(pid: int) -> dict[str, int]:
    """Sizes from /proc/PID/status, in bytes."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    resolved = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mp = parts[1].encode().decode("unicode_escape")
            if (resolved == mp or resolved.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                best, fstype = mp, parts[2]
    return fstype


def _version(command: Sequence[str]) -> str:
    try:
        proc = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    own = [ln for ln in lines if Path(command[-1]).name in ln and "version" in ln.lower()]
    return (own or lines or ["?"])[0]


def _tail(log: Path, limit: int = 600) -> str:
    try:
        text = log.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[-limit:]


def _unmount_quietly(mnt: Path) -> None:
    with contextlib.suppress(MountError, OSError):
        unmount(mnt)

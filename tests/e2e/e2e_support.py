"""podman and buildah in private storage roots, and the cached Debian base image (no pytest in here).

Every storage root lives in a directory of its own with its own ``containers.conf`` and ``storage.conf``
(passed through ``CONTAINERS_CONF`` / ``CONTAINERS_STORAGE_CONF``), configured for this machine: runtime
``runc`` with ``cgroup_manager = "cgroupfs"`` (crun fails on the hybrid cgroup layout here), no network
namespace, fixed ulimits, events in a file.  The overlay driver runs either on the kernel's overlayfs (the
reference) or through a ``mount_program``: fuse-overlayfs (the program we replace) or ``unionfs-mount``.

The base image is ``debootstrap --variant=minbase --include=gcc,libc6-dev bookworm``, trimmed and tarred
once per machine into ``/var/cache/unionfs-e2e/`` (``$UNIONFS_E2E_CACHE``) under a versioned name, then
``podman import``-ed into each storage root.  Building it takes about a minute here; ``DEBOOTSTRAP_TIMEOUT``
bounds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.mounts import KERNEL_AS_PROGRAM, mount_program

from unionfs.mountinfo import mounts

BASE_KEY = "bookworm-minbase-gcc-v1"
"""Names the cached base tarball; change it whenever ``build_base_tarball`` makes something different."""
BASE_IMAGE = "localhost/e2e-base:latest"
CACHE_ENV = "UNIONFS_E2E_CACHE"
DEFAULT_CACHE = Path("/var/cache/unionfs-e2e")
MIRROR_ENV = "UNIONFS_E2E_MIRROR"
DEBOOTSTRAP_TIMEOUT = 900
COMMAND_TIMEOUT = 600
"""Any one podman/buildah command; a build through a FUSE program is the slowest."""

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
REQUIRED_PROGRAMS = ("podman", "buildah", "runc", "conmon", "debootstrap", "fuse-overlayfs")
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/locale", "usr/share/man", "usr/share/doc")
"""Emptied in the base tree: nothing a test uses, and the tarball (and every import) is 40% smaller."""


class E2EError(RuntimeError):
    """A command or a setup step failed; the message carries its output."""


def missing_requirements() -> list[str]:
    """What this machine lacks to run the end-to-end tests (empty: nothing)."""
    missing = [prog for prog in REQUIRED_PROGRAMS if shutil.which(prog) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


# --- commands --------------------------------------------------------------------------------------------

def run(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on time-out kill the group; on failure raise E2EError."""
    with subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise E2EError(f"{' '.join(argv)} did not finish in {timeout} s\n"
                           f"--- stdout\n{out.decode(errors='replace')[-4000:]}\n"
                           f"--- stderr\n{err.decode(errors='replace')[-4000:]}") from None
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise E2EError(f"{' '.join(argv)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                       f"--- stderr\n{result.stderr[-4000:]}")
    return result


# --- the base tarball ------------------------------------------------------------------------------------

def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 ``.sources`` or ``sources.list``), or ``$UNIONFS_E2E_MIRROR``."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split():
                return fields.get("URIs", "").split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if m:
                    return m.group(1)
    return "http://deb.debian.org/debian"


def _empty_dir(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def build_base_tarball(dest: Path) -> float:
    """debootstrap the base tree, trim it and tar it to ``dest`` (atomically); return the seconds it took."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
    try:
        rootfs = work / "rootfs"
        argv = ["debootstrap", "--variant=minbase", "--include=gcc,libc6-dev", "bookworm", str(rootfs),
                debian_mirror()]
        result = run(argv, timeout=DEBOOTSTRAP_TIMEOUT, check=False)
        if result.returncode != 0:
            raise E2EError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
        for rel in TRIM:
            _empty_dir(rootfs / rel)
        partial = work / "base.tar"
        run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs), "-cf", str(partial),
             "."])
        os.replace(partial, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return time.monotonic() - start


def ensure_base_tarball(cache: Path | None = None) -> Path:
    """The cached base tarball, built now (under a lock, once per machine) if it is missing."""
    cache = cache or Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{BASE_KEY}.tar"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tarball.exists():
            seconds = build_base_tarball(tarball)
            info = {"key": BASE_KEY, "mirror": debian_mirror(), "build_seconds": round(seconds, 1),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (cache / f"{BASE_KEY}.json").write_text(json.dumps(info, indent=1) + "\n")
    return tarball


# --- storage roots ---------------------------------------------------------------------------------------

def storage_conf(home: Path, program: str | None) -> str:
    """``storage.conf`` for a private root under ``home``; ``program`` is the overlay ``mount_program``."""
    lines = ["[storage]", 'driver = "overlay"', f'graphroot = "{home}/root"', f'runroot = "{home}/runroot"',
             "", "[storage.options.overlay]"]
    if program is not None:
        lines.append(f'mount_program = "{program}"')
    return "\n".join(lines) + "\n"


def containers_conf(home: Path) -> str:
    """``containers.conf`` that works on this machine (runc, cgroupfs, no network), all state under ``home``."""
    return "\n".join([
        "[containers]",
        'netns = "none"',
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]',
        "",
        "[engine]",
        'runtime = "runc"',
        'cgroup_manager = "cgroupfs"',
        'events_logger = "file"',
        f'events_logfile_path = "{home}/events.log"',
        f'tmp_dir = "{home}/tmp"',
        f'static_dir = "{home}/root/libpod"',
        f'volume_path = "{home}/root/volumes"',
    ]) + "\n"


NAIVE_DIFF_FEATURE = "native-diff()-false"


def force_naive_diff(runroot: Path) -> None:
    """Make the kernel driver compute ``podman diff`` as it does for every mount program: by comparing trees.

    containers/storage always uses its "naive" diff (walk the mounted layer and its parent, compare) when a
    mount_program is set, but reads the kernel's upper dir directly ("native" diff) otherwise; the two report
    a replaced directory or a copied-up but unchanged file differently.  The driver caches its probe of
    native-diff support in ``RUNROOT/overlay/native-diff(MOUNTOPTS)-true|false``; seeding the ``false``
    record makes the reference use the same algorithm, so the diffs compare filesystems, not algorithms.
    """
    (runroot / "overlay").mkdir(parents=True, exist_ok=True)
    (runroot / "overlay" / NAIVE_DIFF_FEATURE).write_text("native diff disabled: compare as mount programs do")


def _pids_naming(home: Path) -> list[int]:
    """Processes whose command line names a path under ``home`` (mount daemons, conmon)."""
    needle = os.fsencode(str(home) + "/")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


@dataclass
class Storage:
    """A private containers/storage root with the overlay driver, for podman and buildah."""

    name: str
    """``kernel`` (the kernel's overlayfs) or the name of the mount program."""
    program: str | None
    """The ``mount_program`` (absolute path), None for the kernel's overlayfs."""
    home: Path
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        for sub in ("root", "runroot", "tmp"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        (self.home / "storage.conf").write_text(storage_conf(self.home, self.program))
        if self.program is None:
            force_naive_diff(self.home / "runroot")
        (self.home / "containers.conf").write_text(containers_conf(self.home))
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.home / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(self.home / "storage.conf")}

    def podman(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` on this storage root."""
        return run(["podman", *args], env=self.env, check=check, timeout=timeout, cwd=cwd)

    def buildah(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``buildah ARGS`` on this storage root."""
        return run(["buildah", *args], env=self.env, check=check, timeout=timeout, cwd=cwd)

    def import_base(self, tarball: Path) -> None:
        """``podman import`` the base tarball as ``BASE_IMAGE``."""
        self.podman("import", "--quiet", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_IMAGE)

    def mounts_below(self) -> list[str]:
        """Mountpoints under this root, deepest first."""
        prefix = str(self.home) + "/"
        return sorted({m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)},
                      key=lambda p: p.count("/"), reverse=True)

    def destroy(self) -> tuple[list[str], list[int]]:
        """Remove containers, images, mounts, daemons and files.

        Returns what a correct run leaves nothing of: the mountpoints still mounted after ``podman system
        reset`` (then unmounted here), and the processes still naming the root after that (then killed).
        """
        for argv in (["podman", "rm", "--all", "--force", "--time", "0"], ["buildah", "rm", "--all"],
                     ["podman", "system", "reset", "--force"]):
            with contextlib.suppress(E2EError):
                run(argv, env=self.env, timeout=120, check=False)
        left = self.mounts_below()
        for mnt in left:
            if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        deadline = time.monotonic() + 10
        while _pids_naming(self.home) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = _pids_naming(self.home)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)
        return left, survivors


# --- programs --------------------------------------------------------------------------------------------

def unionfs_program() -> str | None:
    """The unionfs-mount under test (``$UNIONFS_MOUNT_PROG`` or the venv's), None when the kernel stands in."""
    prog = mount_program()
    if prog == KERNEL_AS_PROGRAM:
        return None
    return str(Path(prog).absolute())


def program_path(name: str) -> str | None:
    """``kernel`` → None (no mount program); ``fuse-overlayfs`` and ``unionfs`` → the absolute path."""
    if name == "kernel":
        return None
    if name == "fuse-overlayfs":
        return FUSE_OVERLAYFS
    if name == "unionfs":
        prog = unionfs_program()
        if prog is None:
            raise E2EError(f"$UNIONFS_MOUNT_PROG is {KERNEL_AS_PROGRAM!r}: no unionfs program for podman")
        return prog
    raise ValueError(f"unknown mount program {name!r}")

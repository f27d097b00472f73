"""Running one RUN step in a container whose root is a mounted union.

**runc** (the default, as buildah's ``--isolation=oci``): a bundle with a generated ``config.json`` — new
mount, pid, ipc, uts and network namespaces (the network namespace is empty: no network), the step's
environment, working directory and user, docker's default capabilities, ``/proc``, a ``/dev`` tmpfs with
the usual devices, ``/dev/pts``, ``/dev/shm``, ``/sys`` read-only and a generated ``/etc/hosts`` bound
read-only.  **Fallback** where runc is missing (as buildah's ``--isolation=chroot``): ``unshare`` (the same
namespaces) and ``chroot``, with the same mounts made by a small shell script; it says so when it is used,
and it has no seccomp filter and no capability drop.

Mountpoints the runtime had to create in the root (``/proc``, ``/dev``, ``/sys`` where the image lacks
them) are removed again before the step is committed, and nothing is ever bound onto a path that is not in
the image already (``/etc/hosts`` only where the image has that file), so none of it ends up in the layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import stat as stat_mod
import subprocess
from dataclasses import dataclass
from typing import Any, TextIO

from unionfs.fs.fsio import HostDir
from unionfs.image.build.rootfs import resolve

RUNC = "runc"
UNSHARE = "unshare"
HOSTNAME = "unionfs-build"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + HOSTNAME + "\n"
DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
"""docker's default capability set."""
MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MOUNT_DIRS = ("proc", "dev", "sys")


class RuntimeFailure(Exception):
    """The container could not be started at all (not: the command failed); ``str()`` is one line."""


@dataclass(frozen=True)
class Process:
    """What to run: ``argv`` with ``env`` in ``cwd`` (an absolute image path) as ``uid``/``gid``."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()


def isolation_available(name: str) -> bool:
    """Is the runtime ``oci`` (runc) or ``chroot`` (unshare) installed?"""
    return shutil.which(RUNC if name == "oci" else UNSHARE) is not None


def default_isolation() -> str:
    """``oci`` where runc is installed, else ``chroot``."""
    return "oci" if isolation_available("oci") else "chroot"


class Container:
    """One RUN: prepare the root (:meth:`prepare`), run (:meth:`run`), clean the root (:meth:`cleanup`).

    ``root`` is the mounted union's directory, ``bundle`` an empty scratch directory outside it.
    """

    def __init__(self, *, root: str, bundle: str, name: str, isolation: str) -> None:
        self.root = root
        self.bundle = bundle
        self.name = name
        self.isolation = isolation
        self.created: list[str] = []
        self.hosts = False
        self.proc: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        """Create the mountpoints the image lacks (remembered, removed by :meth:`cleanup`)."""
        with contextlib.closing(HostDir(self.root)) as host:
            for name in MOUNT_DIRS:
                st = host.try_lstat(name)
                if st is None:
                    host.mkdir(name, 0o755)
                    self.created.append(name)
            hosts = host.try_lstat(resolve(host, "/etc/hosts"))
            self.hosts = hosts is not None and stat_mod.S_ISREG(hosts.st_mode)
        with open(os.path.join(self.bundle, "hosts"), "w", encoding="utf-8") as f:
            f.write(HOSTS)

    def cleanup(self) -> None:
        """Remove what :meth:`prepare` created (children first); the runtime's mounts are gone by now."""
        with contextlib.closing(HostDir(self.root)) as host:
            for rel in reversed(self.created):
                st = host.try_lstat(rel)
                if st is None:
                    continue
                with contextlib.suppress(OSError):
                    if stat_mod.S_ISDIR(st.st_mode):
                        host.rmdir(rel)
                    elif st.st_size == 0:
                        host.unlink(rel)
        self.created = []

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, process: Process, *, stdout: TextIO | int | None, stderr: TextIO | int | None) -> int:
        """Run ``process``; its output goes to ``stdout``/``stderr``.  Returns its exit status (128+N when
        a signal N ended it).  RuntimeFailure when the runtime cannot start the container."""
        argv = self._runc_argv(process) if self.isolation == "oci" else self._chroot_argv(process)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                         cwd=self.bundle)
        except OSError as exc:
            raise RuntimeFailure(f"cannot start {argv[0]}: {exc.strerror}") from None
        try:
            status = self.proc.wait()
        finally:
            self.proc = None
        return 128 - status if status < 0 else status

    def stop(self) -> None:
        """Kill the container (Ctrl-C, a failure elsewhere) and wait until it is gone."""
        if self.isolation == "oci":
            for argv in ([RUNC, "--root", self._state_dir(), "kill", self.name, "KILL"],
                         [RUNC, "--root", self._state_dir(), "delete", "--force", self.name]):
                subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.proc = None

    def _state_dir(self) -> str:
        return os.path.join(self.bundle, "runc")

    def _runc_argv(self, process: Process) -> list[str]:
        with open(os.path.join(self.bundle, "config.json"), "w", encoding="utf-8") as f:
            json.dump(oci_config(self.root, process, hosts=os.path.join(self.bundle, "hosts") if self.hosts
                                 else None), f, indent=1)
        return [RUNC, "--root", self._state_dir(), "run", "--bundle", self.bundle, self.name]

    def _chroot_argv(self, process: Process) -> list[str]:
        r = shlex.quote(self.root)
        lines = ["set -e", "mount --make-rprivate /",
                 f"mount -t proc -o nosuid,nodev,noexec proc {r}/proc",
                 f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {r}/sys",
                 f"mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs {r}/dev",
                 f"mkdir -p {r}/dev/pts {r}/dev/shm",
                 f"mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts {r}/dev/pts",
                 f"mount -t tmpfs -o nosuid,nodev,mode=1777 shm {r}/dev/shm",
                 f"for d in null zero full random urandom tty; do touch {r}/dev/$d; "
                 f"mount --bind /dev/$d {r}/dev/$d; done",
                 f"ln -s /proc/self/fd {r}/dev/fd; ln -s pts/ptmx {r}/dev/ptmx"]
        if self.hosts:
            lines.append(f"mount --bind -o ro {shlex.quote(os.path.join(self.bundle, 'hosts'))} {r}/etc/hosts")
        groups = ",".join(str(g) for g in process.groups) or str(process.gid)
        inner = ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', process.cwd, *process.argv]
        lines.append("exec env -i " + " ".join(shlex.quote(e) for e in process.env) +
                     f" chroot --userspec={process.uid}:{process.gid} --groups={groups} {r} " +
                     " ".join(shlex.quote(a) for a in inner))
        return [UNSHARE, "--mount", "--pid", "--fork", "--ipc", "--uts", "--net", "--kill-child",
                "--", "/bin/sh", "-c", "\n".join(lines)]


def oci_config(root: str, process: Process, *, hosts: str | None) -> dict[str, Any]:
    """The OCI runtime ``config.json`` of one RUN (see the module doc)."""
    caps = list(DEFAULT_CAPS)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if hosts is not None:
        mounts.append({"destination": "/etc/hosts", "type": "bind", "source": hosts,
                       "options": ["rbind", "ro", "nosuid", "nodev"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": process.uid, "gid": process.gid, "additionalGids": list(process.groups)},
            "args": list(process.argv),
            "env": list(process.env),
            "cwd": process.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile[1], "soft": nofile[0]}],
            "noNewPrivileges": False,
        },
        "root": {"path": root, "readonly": False},
        "hostname": HOSTNAME,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
        },
    }


def describe_status(status: int) -> str:
    """``exit status 3`` or ``killed by signal 9``."""
    if status > 128:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(status - 128).name}"
    return f"exit status {status}"


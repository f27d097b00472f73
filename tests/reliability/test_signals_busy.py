"""Signals and busy mountpoints, beyond tests/mounted/test_cli.py (which covers SIGTERM/SIGINT on an idle
mount and a mountpoint that is already a tmpfs): a second ``unionfs-mount`` on a mountpoint our own daemon is
serving, while a file there is open, is refused and leaves the first mount working; SIGTERM on a busy mount
(an open file, a process with its cwd inside) still ends the daemon and leaves no mount behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from kit import alive, expect_exit, killable_mount, lazy_unmount, pid_of, wait_for
from support.mounts import mount_program, unionfs_mount

from unionfs.mountinfo import find_mount

pytestmark = pytest.mark.mounted


def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    out = tuple(tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in out:
        d.mkdir()
    (out[0] / "f").write_bytes(b"lower\n")
    return out  # type: ignore[return-value]


def test_second_mount_on_a_busy_unionfs_mountpoint_is_refused(tmp_path: Path) -> None:
    lower, upper, work, mnt = layers(tmp_path)
    upper2, work2 = tmp_path / "upper2", tmp_path / "work2"
    upper2.mkdir()
    work2.mkdir()
    with unionfs_mount([lower], upper, work, mnt) as m, open(m / "f", "rb") as held:
        pid = pid_of(m)
        proc = subprocess.run([mount_program(), "-o", f"lowerdir={lower},upperdir={upper2},workdir={work2}",
                               str(m)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                              check=False)
        assert proc.returncode != 0, "a second mount over a busy mountpoint was accepted"
        assert "already a mount point" in proc.stderr
        assert held.read() == b"lower\n"
        assert alive(pid) and (m / "f").read_bytes() == b"lower\n"
        assert os.listdir(upper2) == [] and os.listdir(work2) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_on_a_busy_mount_ends_the_daemon(tmp_path: Path, sig: signal.Signals) -> None:
    lower, upper, work, mnt = layers(tmp_path)
    with killable_mount([lower], upper, work, mnt) as (m, pid):
        expect_exit(pid)
        held = open(m / "f", "rb")  # noqa: SIM115 - kept open across the signal
        sleeper = subprocess.Popen(["sleep", "60"], cwd=m)
        try:
            os.kill(pid, sig)
            assert wait_for(lambda: not alive(pid), 20), f"the daemon ignored {sig.name} on a busy mount"
            # busy: the kernel keeps the mount until its users are gone (a lazy unmount), or reports it dead
            with contextlib.suppress(OSError):
                held.read()
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the detached mount's daemon is gone
                held.close()
            sleeper.kill()
            sleeper.wait()
        assert wait_for(lambda: find_mount(m) is None, 10) or not lazy_unmount(m), "the mount stayed"

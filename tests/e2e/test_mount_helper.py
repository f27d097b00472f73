"""``mount -t fuse.unionfs-mount`` through mount(8) and mount.fuse, with the wrappers ``make install-system`` puts
in /usr/local/bin.

mount.fuse runs ``/bin/sh -c 'unionfs-mount SOURCE MOUNTPOINT -o rw,OPTS,dev,suid'`` with an almost empty
environment (no PATH: the shell's default one), so the venv is not on PATH: the wrapper must exec the venv's
interpreter by absolute path.  The mount is made here with ``env -i`` to prove nothing else is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import unmount

from unionfs.mountinfo import find_mount

pytestmark = pytest.mark.e2e

SYSTEM_BIN = Path("/usr/local/bin")
FSTYPE = "fuse.unionfs-mount"


@pytest.fixture
def installed_wrapper() -> Path:
    """The installed ``unionfs-mount`` wrapper; skips unless ``make install-system`` ran for this checkout."""
    if os.geteuid() != 0 or not Path("/sbin/mount.fuse").exists():
        pytest.skip("needs root and mount.fuse (fuse3)")
    wrapper = SYSTEM_BIN / "unionfs-mount"
    if not wrapper.exists():
        pytest.skip(f"{wrapper} is not installed: run `make install-system`")
    venv_bin = str(Path(sys.prefix) / "bin")
    if venv_bin not in wrapper.read_text(errors="replace"):
        pytest.skip(f"{wrapper} runs another checkout's venv, not {venv_bin}: run `make install-system` here")
    return wrapper


def _daemons_for(mnt: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if os.fsencode(str(mnt)) in args:
                pids.append(int(entry))
    return pids


def system_mount(*args: str) -> subprocess.CompletedProcess[str]:
    """``mount ARGS`` with the environment a boot-time or fstab mount has."""
    return subprocess.run(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "mount", *args], cwd="/",
                          capture_output=True, text=True, timeout=60, check=False)


def make_layers(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("l1", "l2", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["l1"] / "top").write_text("from l1\n")
    (dirs["l1"] / "shared").write_text("l1 wins\n")
    (dirs["l2"] / "shared").write_text("hidden by l1\n")
    (dirs["l2"] / "bottom").write_text("from l2\n")
    (dirs["l2"] / "dir").mkdir()
    (dirs["l2"] / "dir" / "old").write_text("old\n")
    return dirs


def test_mount_t_fuse_read_write(installed_wrapper: Path, tmp_path: Path) -> None:
    """A read-write union mounted by mount(8) merges, copies up, whites out, and its daemon exits on umount."""
    d = make_layers(tmp_path)
    mnt = d["mnt"]
    opts = f"lowerdir={d['l1']}:{d['l2']},upperdir={d['upper']},workdir={d['work']}"
    result = system_mount("-t", FSTYPE, "unionfs", str(mnt), "-o", opts)
    assert result.returncode == 0, f"mount failed: {result.stderr}"
    pids = _daemons_for(mnt)
    try:
        info = find_mount(mnt)
        assert info is not None and info.fstype.startswith("fuse") and info.source == "unionfs", info
        assert sorted(os.listdir(mnt)) == ["bottom", "dir", "shared", "top"]
        assert (mnt / "shared").read_text() == "l1 wins\n"
        (mnt / "bottom").write_text("changed\n")
        (mnt / "dir" / "old").unlink()
        (mnt / "new").write_text("new\n")
        assert sorted(os.listdir(mnt / "dir")) == []
    finally:
        unmount(mnt, daemon_pids=pids)
    assert (d["upper"] / "bottom").read_text() == "changed\n"
    assert (d["upper"] / "new").read_text() == "new\n"
    assert (d["l2"] / "bottom").read_text() == "from l2\n"
    assert (d["l2"] / "dir" / "old").exists()
    whiteout = d["upper"] / "dir" / "old"
    kernel_style = whiteout.is_char_device() and os.lstat(whiteout).st_rdev == 0
    assert kernel_style or (d["upper"] / "dir" / ".wh.old").exists()


def test_mount_t_fuse_read_only(installed_wrapper: Path, tmp_path: Path) -> None:
    """Lower layers only: a read-only union; writes fail with EROFS."""
    d = make_layers(tmp_path)
    mnt = d["mnt"]
    result = system_mount("-t", FSTYPE, "unionfs", str(mnt), "-o", f"lowerdir={d['l1']}:{d['l2']}")
    assert result.returncode == 0, f"mount failed: {result.stderr}"
    pids = _daemons_for(mnt)
    try:
        assert (mnt / "bottom").read_text() == "from l2\n"
        with pytest.raises(OSError) as exc:
            (mnt / "new").write_text("x")
        assert exc.value.errno == 30  # EROFS
    finally:
        unmount(mnt, daemon_pids=pids)


def test_system_wrappers_run(installed_wrapper: Path) -> None:
    """Both wrappers start the project's programs with no PATH at all."""
    for name in ("unionfs-mount", "unionfs"):
        result = subprocess.run(["env", "-i", str(SYSTEM_BIN / name), "--version"], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(name), result.stdout


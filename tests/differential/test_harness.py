"""The differential harness checks itself: layer building, copying, format conversion, snapshots, mounts that
always unmount, and comparisons that do fail when the two sides differ."""

from __future__ import annotations

import os
import signal
import stat
import time
import warnings
from pathlib import Path

import pytest
from support import layers as L
from support.differential import Catalog, Recorder, SideResult, compare, run_differential
from support.mounts import MountError, kernel_overlay_mount, unionfs_mount
from support.snapshot import NEW, Entry, snapshot, upper_snapshot

from unionfs.mountinfo import find_mount

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"

RICH = {
    "file": L.File("content", mode=0o4750, uid=12, gid=34, xattrs={"user.k": "v", "trusted.t": "x"}),
    "link": L.Symlink("file", uid=5, gid=6),
    "hard": L.Hardlink("file"),
    "fifo": L.Fifo(mode=0o600),
    "dev": L.Device(1, 7, kind="b", mode=0o640),
    "gone": L.WHITEOUT,
    "dir": L.Dir({"inner": "i", "sub/deep": "d"}, mode=0o710, uid=3, gid=4, opaque=True),
    "dir/gone": L.WHITEOUT,
}


def test_build_layer_writes_every_kind_of_object(tmp_path: Path) -> None:
    """Every spec node becomes the right on-disk object with its attributes; kernel whiteout formats."""
    layer = L.build_layer(RICH, tmp_path / "layer")
    st = os.lstat(layer / "file")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink) == (0o4750, 12, 34, 2)
    assert st.st_mtime_ns == L.FIXED_MTIME_NS
    assert os.getxattr(layer / "file", "trusted.t") == b"x"
    assert os.readlink(layer / "link") == "file"
    assert os.lstat(layer / "hard").st_ino == st.st_ino
    assert stat.S_ISFIFO(os.lstat(layer / "fifo").st_mode)
    dev = os.lstat(layer / "dev")
    assert stat.S_ISBLK(dev.st_mode) and (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (1, 7)
    wh = os.lstat(layer / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(layer / "dir", "trusted.overlay.opaque") == b"y"
    assert os.lstat(layer / "dir").st_mtime_ns == L.FIXED_MTIME_NS
    assert (layer / "dir/sub/deep").read_text() == "d"


def test_oci_layer_converts_to_the_kernel_layer(tmp_path: Path) -> None:
    """An OCI-format build converted with oci_to_kernel is identical to the kernel-format build."""
    oci = L.build_layer(RICH, tmp_path / "oci", whiteouts="oci")
    assert sorted(os.listdir(oci / "dir")) == [".wh..wh..opq", ".wh.gone", "inner", "sub"]
    assert (oci / ".wh.gone").is_file()
    assert upper_snapshot(oci) == upper_snapshot(L.build_layer(RICH, tmp_path / "k"))  # markers read alike
    L.oci_to_kernel(oci)
    kernel = L.build_layer(RICH, tmp_path / "kernel")
    assert upper_snapshot(oci) == upper_snapshot(kernel)
    assert not [n for n in os.listdir(oci / "dir") if n.startswith(".wh.")]
    assert os.lstat(oci / "dir").st_mtime_ns == L.FIXED_MTIME_NS


def test_copy_tree_is_faithful(tmp_path: Path) -> None:
    """A copy keeps types, modes, owners, all xattrs, hard links, device numbers and exact mtimes."""
    src = L.build_layer(RICH, tmp_path / "src")
    dst = L.copy_tree(src, tmp_path / "dst")
    assert upper_snapshot(dst) == upper_snapshot(src)
    assert os.getxattr(dst / "dir", "trusted.overlay.opaque") == b"y"
    assert os.lstat(dst / "file").st_ino == os.lstat(dst / "hard").st_ino


def test_snapshot_normalises_times_and_inode_relations(tmp_path: Path) -> None:
    """Old mtimes are kept exactly, recent ones become NEW; shared inodes are a relation, not a number."""
    root = L.build_layer({"old": "x", "h": L.Hardlink("old"), "d": {}}, tmp_path / "t")
    cutoff = os.lstat(root / "old").st_mtime_ns + 1
    (root / "fresh").write_text("y")
    snap = snapshot(root, changed_after=cutoff)
    assert snap["old"].mtime == L.FIXED_MTIME_NS
    assert snap["fresh"].mtime == NEW
    assert snap["old"].same_ino == ("h",) and snap["h"].same_ino == ("old",)
    assert snap["d"].mtime is None and snap["d"].size is None
    assert snapshot(root, changed_after=cutoff) == snap


def test_compare_reports_each_kind_of_difference() -> None:
    """compare() is empty for equal sides and names outcome, tree, remount and upper differences."""
    def side(errno: str, mode: int) -> SideResult:
        tree = {".": Entry(type="dir", mode=mode)}
        return SideResult(results=[("unlink", errno)], visible=tree, results_after_remount=[],
                          visible_after_remount=tree, upper=tree, lowers_changed=[])
    assert compare(side("ok", 0o755), side("ok", 0o755)) == []
    found = "\n".join(compare(side("ok", 0o755), side("ENOENT", 0o700)))
    for title in ("operation outcomes differ", "visible tree differs", "after remount", "upper dir differs"):
        assert title in found
    assert "ENOENT" in found


@pytest.mark.mounted
def test_kernel_mount_is_removed_when_the_body_raises(tmp_path: Path) -> None:
    """The context manager unmounts even when the test body fails."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with pytest.raises(RuntimeError, match="boom"), kernel_overlay_mount(ls.lowers, ls.upper, ls.work, ls.mnt):
        assert find_mount(ls.mnt) is not None
        raise RuntimeError("boom")
    assert find_mount(ls.mnt) is None


@pytest.mark.mounted
def test_busy_mount_falls_back_to_lazy_unmount(tmp_path: Path) -> None:
    """An fd left open inside the mount makes umount fail; the lazy fallback still removes the mount."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernel_overlay_mount(ls.lowers, ls.upper, ls.work, ls.mnt) as root:
            fd = os.open(root / "a", os.O_RDONLY)
        os.close(fd)
    assert find_mount(ls.mnt) is None
    assert any("umount -l" in str(w.message) for w in caught)


@pytest.mark.mounted
def test_read_only_kernel_mount_with_one_lower(tmp_path: Path) -> None:
    """A read-only kernel mount of a single lower works (an empty layer is added) and is EROFS."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")], readonly=True)
    with kernel_overlay_mount(ls.lowers, None, None, ls.mnt) as root:
        assert os.listdir(root) == ["a"]
        with pytest.raises(OSError, match="Read-only"):
            (root / "b").write_text("b")
    assert find_mount(ls.mnt) is None


@pytest.mark.mounted
def test_mountpoint_with_a_space_is_found(tmp_path: Path) -> None:
    """mountinfo escapes spaces as \\040; find_mount undoes that."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    mnt = tmp_path / "mount point"
    mnt.mkdir()
    with kernel_overlay_mount(ls.lowers, ls.upper, ls.work, mnt):
        info = find_mount(mnt)
        assert info is not None and info.fstype == "overlay"
    assert find_mount(mnt) is None


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.mounted
def test_failing_mount_program_reports_its_stderr(tmp_path: Path) -> None:
    """A mount program that exits non-zero gives MountError carrying what it printed."""
    prog = _script(tmp_path / "bad-mount", 'echo "cannot use lowerdir: $2" >&2\nexit 3\n')
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with pytest.raises(MountError, match=r"exited 3:\ncannot use lowerdir: lowerdir="), \
            unionfs_mount(ls.lowers, ls.upper, ls.work, ls.mnt, program=prog):
        pytest.fail("the body must not run")


@pytest.mark.mounted
def test_mount_program_that_mounts_nothing_is_an_error(tmp_path: Path) -> None:
    """Returning 0 without a FUSE mount appearing is a MountError (after the timeout), not a silent pass."""
    prog = _script(tmp_path / "lazy-mount", "echo ready\nexit 0\n")
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with pytest.raises(MountError, match="no FUSE mount appeared"), \
            unionfs_mount(ls.lowers, ls.upper, ls.work, ls.mnt, program=prog, timeout=0.3):
        pytest.fail("the body must not run")


@pytest.mark.mounted
def test_mount_program_that_hangs_is_killed(tmp_path: Path) -> None:
    """A mount program that never returns is killed after the timeout and reported."""
    prog = _script(tmp_path / "stuck-mount", "exec sleep 60\n")
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with pytest.raises(MountError, match=r"did not return within 0\.3s"), \
            unionfs_mount(ls.lowers, ls.upper, ls.work, ls.mnt, program=prog, timeout=0.3):
        pytest.fail("the body must not run")


@pytest.mark.mounted
def test_daemon_that_dies_while_mounted_is_an_error(tmp_path: Path) -> None:
    """A daemon gone before the unmount (a crash) fails the test, and the dead mount is still removed."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with pytest.raises(MountError, match="died while mounted"), \
            unionfs_mount(ls.lowers, ls.upper, ls.work, ls.mnt, program=FUSE_OVERLAYFS):
        for pid in _daemons(ls.mnt):
            os.kill(pid, signal.SIGKILL)
        assert _wait_dead(_daemons(ls.mnt))
    assert find_mount(ls.mnt) is None


@pytest.mark.mounted
def test_watchdog_kills_a_daemon_that_stays_busy(tmp_path: Path) -> None:
    """A mount still in use after hang_timeout gets its daemon killed and the test fails, never hangs."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with pytest.raises(MountError, match=r"still busy after 0\.2s"), \
            unionfs_mount(ls.lowers, ls.upper, ls.work, ls.mnt, program=FUSE_OVERLAYFS, hang_timeout=0.2):
        assert _wait_dead(_daemons(ls.mnt))
    assert find_mount(ls.mnt) is None


def _daemons(mnt: Path) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _has_arg(int(p), str(mnt))]


def _has_arg(pid: int, arg: str) -> bool:
    try:
        return arg.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def _wait_dead(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() and b"Z" not in Path(f"/proc/{p}/stat").read_bytes().split()[2:3]
              for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.mounted
def test_fuse_mount_and_daemon_are_gone_after_the_context(tmp_path: Path) -> None:
    """A FUSE mount (fuse-overlayfs as a stand-in) is unmounted and its daemon has exited afterwards."""
    ls = L.new_layer_set(tmp_path / "set", [L.build_layer({"a": "a"}, tmp_path / "l")])
    with unionfs_mount(ls.lowers, ls.upper, ls.work, ls.mnt, program=FUSE_OVERLAYFS) as root:
        assert (root / "a").read_text() == "a"
        info = find_mount(ls.mnt)
        assert info is not None and info.fstype.startswith("fuse")
    assert find_mount(ls.mnt) is None
    assert _daemons(ls.mnt) == []


HARNESS = Catalog()


@HARNESS.scenario({"d/a": "a"}, {"d/b": "b"})
def merged_dir_link_count(r: Recorder) -> None:
    """The link count of a merged dir (the kernel says 1; fuse-overlayfs counts subdirs)."""
    r.value("nlink d", lambda: os.lstat("d").st_nlink)


@pytest.mark.mounted
@pytest.mark.differential
def test_a_real_difference_is_detected(tmp_path: Path) -> None:
    """Run against a different implementation (fuse-overlayfs), the harness reports the known difference."""
    comparison = run_differential(HARNESS.items[0], tmp_path, program=FUSE_OVERLAYFS)
    text = comparison.explain()
    assert "operation outcomes differ" in text and "('nlink d', 1)" in text


@pytest.mark.mounted
@pytest.mark.differential
def test_kernel_against_itself_is_identical(tmp_path: Path) -> None:
    """The harness is deterministic: the kernel compared with itself shows no difference."""
    comparison = run_differential(HARNESS.items[0], tmp_path, program="kernel")
    assert comparison.mismatches == []
    assert comparison.kernel.results == [("nlink d", 1)]

"""Metadata, copy-up, xattrs, inode numbers and link counts, compared with the kernel's overlayfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import Dir, File, Symlink

CASES = Catalog()

OLD_NS = 1_500_000_000_123_456_789  # an mtime set by utime: older than the run, so compared exactly

TOP = {
    "f": File("file\n", mode=0o640, uid=1000, gid=1001, xattrs={"user.one": "1", "user.two": b"\x00\xff"}),
    "suid": File("#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000),
    "d": Dir({"in": "in"}, mode=0o750, uid=1000, gid=1001, xattrs={"user.dir": "yes"}),
    "d/sub/x": "x",
    "link": Symlink("f", uid=1000, gid=1000),
    "big": File(bytes(range(256)) * 512),  # 128 KiB
    "plain": "plain\n",
    "m": {},
}
BOTTOM = {
    "m/bottom": "b",
    "m/deep/a": "a",
    "lonely/sub1/x": "x",
    "lonely/sub2/y": "y",
    "lonely/file": "f",
}


@CASES.scenario(TOP, BOTTOM)
def chmod_lower_file_and_dir(r: Recorder) -> None:
    """chmod of lower objects changes only the mode (content, owner, xattrs, mtime kept by copy-up)."""
    r.call("chmod f", os.chmod, "f", 0o604)
    r.call("chmod d", os.chmod, "d", 0o711)
    r.call("chmod m (merged)", os.chmod, "m", 0o700)
    r.call("chmod suid", os.chmod, "suid", 0o2755)
    r.stat("stat f", "f")
    r.stat("stat d", "d")
    r.stat("stat m", "m")
    r.stat("stat suid", "suid")
    r.read("read f", "f")


@CASES.scenario(TOP, BOTTOM)
def chown_lower_file_dir_and_symlink(r: Recorder) -> None:
    """chown/lchown of lower objects; chown of a set-uid file clears the set-uid bit as on any fs."""
    r.call("chown f", os.chown, "f", 2000, 2001)
    r.call("chown d", os.chown, "d", 0, 2001)
    r.call("lchown link", os.lchown, "link", 3000, 3001)
    r.call("chown suid", os.chown, "suid", 1000, 1000)
    for name in ("f", "d", "link", "suid", "plain"):
        r.stat(f"lstat {name}", name)
    r.stat("stat link (follows to f)", "link", follow=True)


@CASES.scenario(TOP, BOTTOM)
def utime_ns_lower_file_and_dir(r: Recorder) -> None:
    """os.utime with nanoseconds on lower files, dirs and symlinks sets exactly those times."""
    r.call("utime f", os.utime, "f", ns=(OLD_NS, OLD_NS + 1))
    r.call("utime d", os.utime, "d", ns=(OLD_NS, OLD_NS + 2))
    r.call("utime m (merged)", os.utime, "m", ns=(OLD_NS, OLD_NS + 3))
    r.call("lutime link", os.utime, "link", ns=(OLD_NS, OLD_NS + 4), follow_symlinks=False)
    for name in ("f", "d", "m", "link"):
        r.value(f"mtime_ns {name}", lambda n=name: os.lstat(n).st_mtime_ns)
    r.value("atime_ns f", lambda: os.stat("f").st_atime_ns)
    r.call("utime now", os.utime, "plain")
    r.stat("stat plain (mtime is new)", "plain")


@CASES.scenario(TOP, BOTTOM)
def truncate_lower_file(r: Recorder) -> None:
    """truncate shrinks and extends (with zeros) a lower file; ftruncate via an fd works the same."""
    r.call("truncate f 2", os.truncate, "f", 2)
    r.read("read f", "f")
    r.call("truncate plain 10000", os.truncate, "plain", 10000)
    r.stat("stat plain", "plain")
    r.read("read plain", "plain")

    def ftruncate() -> None:
        fd = os.open("big", os.O_RDWR)
        try:
            os.ftruncate(fd, 1000)
        finally:
            os.close(fd)
    r.call("ftruncate big", ftruncate)
    r.stat("stat big", "big")
    r.call("truncate 0 m/bottom", os.truncate, "m/bottom", 0)
    r.call("truncate dir", os.truncate, "d", 0)
    r.call("truncate negative", os.truncate, "plain", -1)


@CASES.scenario(TOP, BOTTOM)
def copy_up_preserves_metadata(r: Recorder) -> None:
    """Opening for write copies up without changing mode, owner, mtime, xattrs (files and parent dirs)."""
    def open_for_write(path: str) -> None:
        os.close(os.open(path, os.O_WRONLY))
    r.call("open f for write", open_for_write, "f")
    r.call("open suid for write", open_for_write, "suid")
    r.call("open d/in for write", open_for_write, "d/in")
    r.call("open m/deep/a for write", open_for_write, "m/deep/a")
    for name in ("f", "suid", "d", "d/in", "m/deep", "m/deep/a"):
        r.stat(f"stat {name}", name)


@CASES.scenario(TOP, BOTTOM)
def st_ino_stable_across_copy_up(r: Recorder) -> None:
    """The same object keeps its st_ino across copy-up (file, dir, symlink) and across remount."""
    names = ("f", "d", "m", "link", "m/deep/a")
    for name in names:
        r.memo[name] = r.ino(name)
    r.call("chmod f", os.chmod, "f", 0o600)
    r.call("mkdir d/new (copies up d)", os.mkdir, "d/new")
    r.write("create m/n (copies up merged m)", "m/n", b"")
    r.call("lchown link", os.lchown, "link", 5, 5)
    r.write("write m/deep/a", "m/deep/a", b"changed")
    for name in names:
        r.record(f"{name} same st_ino after copy-up", r.ino(name) == r.memo[name])
    r.record("distinct st_ino", len({r.ino(n) for n in names}) == len(names))


@st_ino_stable_across_copy_up.then_after_remount
def _st_ino_stable_after_remount(r: Recorder) -> None:
    for name in ("f", "d", "m", "link", "m/deep/a"):
        r.record(f"{name} same st_ino after remount", r.ino(name) == r.memo[name])


@CASES.scenario(TOP, BOTTOM)
def nlink_of_merged_and_lower_dirs(r: Recorder) -> None:
    """Directory link counts as the kernel reports them: merged dirs, lower-only dirs, upper-only dirs."""
    for name in (".", "m", "d", "d/sub", "lonely", "lonely/sub1"):
        r.value(f"nlink {name}", lambda n=name: os.lstat(n).st_nlink)
    r.call("mkdir up", os.mkdir, "up")
    r.call("mkdir up/a", os.mkdir, "up/a")
    r.call("mkdir up/b", os.mkdir, "up/b")
    r.call("mkdir lonely/sub3", os.mkdir, "lonely/sub3")
    for name in (".", "up", "lonely", "m"):
        r.value(f"nlink after mkdir {name}", lambda n=name: os.lstat(n).st_nlink)


@CASES.scenario(TOP, BOTTOM)
def user_xattrs_on_lower_file(r: Recorder) -> None:
    """user.* xattrs of a lower file: get, list, set (copy-up), replace, remove; ENODATA when missing."""
    r.value("get user.one", os.getxattr, "f", "user.one")
    r.value("get user.two", os.getxattr, "f", "user.two")
    r.value("list", lambda: sorted(os.listxattr("f")))
    r.value("get missing", os.getxattr, "f", "user.missing")
    r.call("set user.three", os.setxattr, "f", "user.three", b"3")
    r.call("replace user.one", os.setxattr, "f", "user.one", b"one", os.XATTR_REPLACE)
    r.call("create existing user.one", os.setxattr, "f", "user.one", b"x", os.XATTR_CREATE)
    r.call("replace missing", os.setxattr, "f", "user.nope", b"x", os.XATTR_REPLACE)
    r.call("remove user.two", os.removexattr, "f", "user.two")
    r.call("remove missing", os.removexattr, "f", "user.two")
    r.value("list after", lambda: sorted(os.listxattr("f")))
    r.value("get user.one after", os.getxattr, "f", "user.one")
    r.call("set empty value", os.setxattr, "plain", "user.empty", b"")
    r.value("get empty value", os.getxattr, "plain", "user.empty")


@CASES.scenario(TOP, BOTTOM)
def user_xattrs_on_upper_objects_and_dirs(r: Recorder) -> None:
    """user.* xattrs on new files, lower dirs and merged dirs; EPERM on symlinks, ENODATA when missing."""
    r.write("create", "new", b"n")
    r.call("set on new", os.setxattr, "new", "user.k", b"v")
    r.value("get on new", os.getxattr, "new", "user.k")
    r.call("remove on new", os.removexattr, "new", "user.k")
    r.value("get removed", os.getxattr, "new", "user.k")
    r.value("list new", os.listxattr, "new")
    r.value("get on lower dir", os.getxattr, "d", "user.dir")
    r.call("set on merged dir", os.setxattr, "m", "user.m", b"merged")
    r.call("remove on lower dir", os.removexattr, "d", "user.dir")
    r.value("list d", os.listxattr, "d")
    r.value("list m", os.listxattr, "m")
    r.call("set on symlink", os.setxattr, "link", "user.l", b"x", follow_symlinks=False)
    r.call("set through symlink", os.setxattr, "link", "user.via", b"x")
    r.value("get through symlink", os.getxattr, "f", "user.via")
    r.value("get missing on dir", os.getxattr, "m", "user.none")


@CASES.scenario(TOP, BOTTOM)
def private_overlay_xattrs_are_hidden(r: Recorder) -> None:
    """The overlay's own trusted.overlay.* xattrs never show through the mount and cannot be set."""
    r.call("unlink m/deep/a", os.unlink, "m/deep/a")
    r.call("rmdir m/deep", os.rmdir, "m/deep")
    r.call("mkdir m/deep (opaque in upper)", os.mkdir, "m/deep")
    r.call("chmod f (copy-up records origin)", os.chmod, "f", 0o600)
    r.value("list trusted on m/deep", lambda: sorted(n for n in os.listxattr("m/deep") if n.startswith("trusted.")))
    r.value("list trusted on f", lambda: sorted(n for n in os.listxattr("f") if n.startswith("trusted.")))
    r.value("get opaque", os.getxattr, "m/deep", "trusted.overlay.opaque")
    r.value("get origin", os.getxattr, "f", "trusted.overlay.origin")
    r.call("set trusted.other", os.setxattr, "f", "trusted.other", b"t")
    r.value("get trusted.other", os.getxattr, "f", "trusted.other")
    r.value("list trusted on f after", lambda: sorted(n for n in os.listxattr("f") if n.startswith("trusted.")))


@CASES.scenario(TOP, BOTTOM)
def overlay_xattrs_set_through_the_mount_are_escaped(r: Recorder) -> None:
    """Since Linux 6.7 a trusted.overlay.* xattr set through the mount is stored escaped and reads back.

    (Nested overlays rely on it; older kernels refused with EPERM.)
    """
    r.call("set trusted.overlay.x", os.setxattr, "f", "trusted.overlay.x", b"y")
    r.value("get trusted.overlay.x", os.getxattr, "f", "trusted.overlay.x")
    r.value("list trusted", lambda: sorted(n for n in os.listxattr("f") if n.startswith("trusted.")))
    r.call("remove trusted.overlay.x", os.removexattr, "f", "trusted.overlay.x")
    r.value("list trusted after", lambda: sorted(n for n in os.listxattr("f") if n.startswith("trusted.")))


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir as the kernel's overlayfs."""
    assert_same_as_kernel(case, tmp_path)

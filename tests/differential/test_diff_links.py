"""Hard links, symbolic links, fifos and device nodes across layers, compared with the kernel's overlayfs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import Device, Fifo, File, Hardlink, Symlink

CASES = Catalog()

TOP = {
    "f": File("target file\n", mode=0o640, uid=7, gid=8),
    "g": "g\n",
    "d/inner": "inner\n",
    "rel": Symlink("f"),
    "rel-up": Symlink("../f"),
    "abs": Symlink("/"),
    "dangling": Symlink("does/not/exist"),
    "todir": Symlink("d"),
    "loop1": Symlink("loop2"),
    "loop2": Symlink("loop1"),
    "self": Symlink("self"),
    "chain": Symlink("rel"),
    "fifo": Fifo(mode=0o600),
    "null": Device(1, 3, mode=0o666),
    "hl1": "hard linked\n",
    "hl2": Hardlink("hl1"),
}
BOTTOM = {
    "d/below": "below\n",
    "sub/rel-up": Symlink("../f"),
}


@CASES.scenario(TOP, BOTTOM)
def hardlink_to_lower_file_then_write(r: Recorder) -> None:
    """link() to a lower file gives two names of one inode: nlink 2, same st_ino, a write shows through both."""
    r.call("link f f2", os.link, "f", "f2")
    r.call("link g d/g-link", os.link, "g", "d/g-link")
    r.stat("stat f", "f")
    r.stat("stat f2", "f2")
    r.record("f and f2 share st_ino", r.ino("f") == r.ino("f2"))
    r.write("write via f2", "f2", b"through the second name\n", flags=os.O_WRONLY | os.O_TRUNC)
    r.read("read f", "f")
    r.write("append via d/g-link", "d/g-link", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    r.read("read g", "g")
    r.call("unlink f", os.unlink, "f")
    r.stat("stat f2 after unlink f", "f2")


@hardlink_to_lower_file_then_write.then_after_remount
def _hardlink_after_remount(r: Recorder) -> None:
    r.stat("stat f2", "f2")
    r.stat("stat g", "g")
    r.stat("stat d/g-link", "d/g-link")
    r.record("g and d/g-link share st_ino", r.ino("g") == r.ino("d/g-link"))


@CASES.scenario(TOP, BOTTOM)
def hardlink_errors(r: Recorder) -> None:
    """link() to a dir is EPERM, from a missing name ENOENT, onto an existing name EEXIST."""
    r.call("link dir", os.link, "d", "d2")
    r.call("link missing", os.link, "missing", "x")
    r.call("link onto lower file", os.link, "f", "g")
    r.call("link onto lower dir", os.link, "f", "d")
    r.call("link symlink itself", os.link, "dangling", "dangling2", follow_symlinks=False)
    r.stat("lstat dangling2", "dangling2")
    r.call("link into missing dir", os.link, "f", "nodir/x")


@CASES.scenario(TOP, BOTTOM)
def hardlinks_inside_a_lower_layer(r: Recorder) -> None:
    """Two names of one lower inode show nlink 2 and one st_ino (read-only use; no copy-up)."""
    r.stat("stat hl1", "hl1")
    r.stat("stat hl2", "hl2")
    r.record("same st_ino", r.ino("hl1") == r.ino("hl2"))
    r.read("read hl2", "hl2")


@CASES.scenario(TOP, BOTTOM)
def lower_symlinks_of_every_kind(r: Recorder) -> None:
    """readlink/lstat/stat of lower symlinks: relative, ../, absolute, dangling (ENOENT), to dir, loops (ELOOP)."""
    for name in ("rel", "rel-up", "abs", "dangling", "todir", "loop1", "self", "chain", "sub/rel-up"):
        r.value(f"readlink {name}", os.readlink, name)
        r.stat(f"lstat {name}", name)
        r.stat(f"stat {name}", name, follow=True)
    r.read("read via rel", "rel")
    r.read("read via chain", "chain")
    r.read("read via sub/rel-up", "sub/rel-up")
    r.listdir("ls todir/", "todir/")
    r.read("read todir/below", "todir/below")
    r.call("open loop", os.open, "loop1", os.O_RDONLY)
    r.call("open O_NOFOLLOW", os.open, "rel", os.O_RDONLY | os.O_NOFOLLOW)
    r.value("readlink a file", os.readlink, "f")
    r.value("readlink missing", os.readlink, "missing")


@CASES.scenario(TOP, BOTTOM)
def create_and_use_symlinks(r: Recorder) -> None:
    """New symlinks of every kind, writing through a dir symlink, replacing and removing lower symlinks."""
    r.call("symlink relative", os.symlink, "g", "new-rel")
    r.call("symlink absolute", os.symlink, "/proc/self", "new-abs")
    r.call("symlink dangling", os.symlink, "nowhere/at/all", "new-dangling")
    r.call("symlink loop", os.symlink, "new-loop", "new-loop")
    r.call("symlink over existing", os.symlink, "g", "f")
    r.call("symlink long target", os.symlink, "x" * 4000, "new-long")
    for name in ("new-rel", "new-dangling", "new-loop"):
        r.value(f"readlink {name}", os.readlink, name)
        r.stat(f"lstat {name}", name)
    r.value("readlink new-long", lambda: os.readlink("new-long") == "x" * 4000)
    r.stat("stat new-loop", "new-loop", follow=True)
    r.write("create through todir", "todir/made-via-link", b"x")
    r.listdir("ls d", "d")
    r.call("unlink lower symlink", os.unlink, "dangling")
    r.call("replace lower symlink", os.symlink, "f", "dangling")
    r.value("readlink replaced", os.readlink, "dangling")
    r.call("rmdir through dir symlink", os.rmdir, "todir")
    r.call("unlink dir symlink", os.unlink, "todir")
    r.stat("stat d (still there)", "d")


@CASES.scenario(TOP, BOTTOM)
def copy_up_of_symlink_keeps_target_and_mtime(r: Recorder) -> None:
    """lchown of a lower symlink copies it up with target and mtime intact."""
    r.call("lchown rel", os.lchown, "rel", 11, 12)
    r.call("lchown loop1", os.lchown, "loop1", 13, 14)
    r.stat("lstat rel", "rel")
    r.stat("lstat loop1", "loop1")
    r.read("read via rel", "rel")


@CASES.scenario(TOP, BOTTOM)
def mkfifo_and_mknod(r: Recorder) -> None:
    """mkfifo and mknod (char and block devices) create those types; lower fifo/device nodes stat alike."""
    r.call("mkfifo", os.mkfifo, "p", 0o640)
    r.call("mknod char", os.mknod, "c", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    r.call("mknod block", os.mknod, "b", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    r.call("mknod regular", os.mknod, "reg", stat.S_IFREG | 0o600)
    r.call("mkfifo over lower file", os.mkfifo, "f")
    r.call("mknod in missing dir", os.mknod, "nodir/x", stat.S_IFIFO | 0o600)
    for name in ("p", "c", "b", "reg", "fifo", "null"):
        r.stat(f"lstat {name}", name)
    r.call("chmod lower fifo", os.chmod, "fifo", 0o644)
    r.stat("lstat fifo after chmod", "fifo")
    r.call("unlink lower device", os.unlink, "null")
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def mknod_whiteout_device(r: Recorder) -> None:
    """Creating a char device 0/0 (the whiteout format) through the mount: the kernel's answer, kept."""
    r.call("mknod 0/0 new name", os.mknod, "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    r.stat("lstat wh", "wh")
    r.call("mknod 0/0 over unlinked lower name", lambda: (os.unlink("g"),
                                                         os.mknod("g", stat.S_IFCHR | 0o600, 0)))
    r.stat("lstat g", "g")
    r.listdir("ls .")


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir as the kernel's overlayfs."""
    assert_same_as_kernel(case, tmp_path)

"""rename(2) across layers, compared with the kernel's overlayfs (``redirect_dir=off``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import WHITEOUT, File

CASES = Catalog()

TOP = {
    "a": File("lower a\n", mode=0o640, uid=1000, gid=100, xattrs={"user.tag": "a"}),
    "b": "lower b\n",
    "src/f": "src f\n",
    "src/g": "src g\n",
    "dst/existing": "dst existing\n",
    "full/x": "x",
    "empty": {},
    "plain": "plain file\n",
}
BOTTOM = {
    "merged/from-bottom": "m",
    "src/h": "bottom h\n",
    "gone": "bottom gone\n",
}
TOP_MERGED = {**TOP, "merged/from-top": "t", "gone": WHITEOUT}


@CASES.scenario(TOP, BOTTOM)
def rename_lower_file_over_lower_file(r: Recorder) -> None:
    """Renaming a lower file over another keeps the source's content and metadata; the old name is gone."""
    r.call("rename a b", os.rename, "a", "b")
    r.stat("stat a", "a")
    r.stat("stat b", "b")
    r.read("read b", "b")
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def rename_file_into_other_dir(r: Recorder) -> None:
    """Moving lower files between lower dirs (new name, and over an existing one) works and whiteouts the source."""
    r.call("rename src/f dst/f", os.rename, "src/f", "dst/f")
    r.call("rename src/h dst/existing", os.rename, "src/h", "dst/existing")
    r.listdir("ls src", "src")
    r.listdir("ls dst", "dst")
    r.read("read dst/existing", "dst/existing")
    r.stat("stat src/f", "src/f")


@CASES.scenario(TOP, BOTTOM)
def rename_pure_upper_dir(r: Recorder) -> None:
    """A dir created in the mount (upper only) renames like on any filesystem, children and all."""
    r.call("mkdir n", os.mkdir, "n")
    r.write("n/x", "n/x", b"x")
    r.call("mkdir n/sub", os.mkdir, "n/sub")
    r.write("n/sub/y", "n/sub/y", b"y")
    r.call("rename n m", os.rename, "n", "m")
    r.call("rename m src/m (into a lower dir)", os.rename, "m", "src/m")
    r.listdir("ls src/m", "src/m")
    r.read("read src/m/sub/y", "src/m/sub/y")
    r.stat("stat n", "n")
    r.call("rename src/m empty (over empty lower dir)", os.rename, "src/m", "empty")
    r.listdir("ls empty", "empty")


@CASES.scenario(TOP_MERGED, BOTTOM)
def rename_lower_dir_is_exdev(r: Recorder) -> None:
    """Renaming a dir that exists in a lower layer (merged or not) fails with the kernel's errno (EXDEV)."""
    r.call("rename src (merged) s2", os.rename, "src", "s2")
    r.call("rename full (lower only) f2", os.rename, "full", "f2")
    r.call("rename empty (lower, empty) e2", os.rename, "empty", "e2")
    r.call("rename merged into dst", os.rename, "merged", "dst/merged")
    r.call("rename full over src (onto a non-empty dir: EXDEV comes first)", os.rename, "full", "src")
    r.call("rename full over plain (onto a file: the VFS answers ENOTDIR first)", os.rename, "full", "plain")
    r.listdir("ls .")
    r.listdir("ls src", "src")


@CASES.scenario(TOP, BOTTOM)
def rename_dir_over_nonempty_dir(r: Recorder) -> None:
    """Renaming a dir over a non-empty dir (upper or lower) is ENOTEMPTY; over an emptied one it works."""
    r.call("mkdir u1", os.mkdir, "u1")
    r.call("mkdir u2", os.mkdir, "u2")
    r.write("u2/x", "u2/x", b"x")
    r.call("rename u1 u2 (upper, non-empty)", os.rename, "u1", "u2")
    r.call("rename u1 full (lower, non-empty)", os.rename, "u1", "full")
    r.call("rename u1 src (merged, non-empty)", os.rename, "u1", "src")
    r.call("unlink full/x", os.unlink, "full/x")
    r.call("rename u1 full (emptied lower dir)", os.rename, "u1", "full")
    r.listdir("ls .")
    r.listdir("ls full", "full")


@CASES.scenario(TOP_MERGED, BOTTOM)
def rename_dir_over_file_and_file_over_dir(r: Recorder) -> None:
    """dir over file is ENOTDIR, file over dir is EISDIR, a dir into its own subtree is EINVAL."""
    r.call("mkdir u", os.mkdir, "u")
    r.call("mkdir u/in", os.mkdir, "u/in")
    r.call("rename u plain", os.rename, "u", "plain")
    r.call("rename plain u", os.rename, "plain", "u")
    r.call("rename plain empty", os.rename, "plain", "empty")
    r.call("rename u u/in/x", os.rename, "u", "u/in/x")
    r.call("rename missing x", os.rename, "missing", "x")
    r.call("rename gone x (whited out)", os.rename, "gone", "x")
    r.call("rename a nodir/x", os.rename, "a", "nodir/x")
    r.stat("stat plain", "plain")


@CASES.scenario(TOP_MERGED, BOTTOM)
def rename_onto_whited_out_name(r: Recorder) -> None:
    """Renaming onto a name a lower layer still has under a whiteout shows only the renamed file."""
    r.stat("stat gone", "gone")
    r.write("create n", "n", b"new")
    r.call("rename n gone", os.rename, "n", "gone")
    r.read("read gone", "gone")
    r.call("unlink b", os.unlink, "b")
    r.call("rename plain b", os.rename, "plain", "b")
    r.read("read b", "b")
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def rename_lower_file_away_and_back(r: Recorder) -> None:
    """A lower file renamed away and back keeps content, mode, owner, xattrs and mtime."""
    r.call("rename a z", os.rename, "a", "z")
    r.listdir("ls . (moved)")
    r.call("rename z a", os.rename, "z", "a")
    r.stat("stat a", "a")
    r.read("read a", "a")
    r.call("rename a a (same name)", os.rename, "a", "a")
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def rename_keeps_inode_number(r: Recorder) -> None:
    """st_ino follows a renamed lower file (the kernel reports the origin's inode after copy-up)."""
    r.memo["a"] = r.ino("a")
    r.memo["src/h"] = r.ino("src/h")
    r.call("rename a a2", os.rename, "a", "a2")
    r.call("rename src/h dst/h", os.rename, "src/h", "dst/h")
    r.record("a2 has a's st_ino", r.ino("a2") == r.memo["a"])
    r.record("dst/h has src/h's st_ino", r.ino("dst/h") == r.memo["src/h"])


@rename_keeps_inode_number.then_after_remount
def _rename_keeps_inode_number_after_remount(r: Recorder) -> None:
    r.record("a2 keeps a's st_ino after remount", r.ino("a2") == r.memo["a"])
    r.record("dst/h keeps src/h's st_ino after remount", r.ino("dst/h") == r.memo["src/h"])


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir as the kernel's overlayfs."""
    assert_same_as_kernel(case, tmp_path)

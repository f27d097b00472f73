"""Deletion, whiteouts, opaque directories and the merging of layers, compared with the kernel's overlayfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import WHITEOUT, Dir, File

CASES = Catalog()

BASE = {
    "a": "lower a\n",
    "b": "lower b\n",
    "d/f": "lower d/f\n",
    "d/g": File("lower d/g\n", mode=0o600, uid=1000, gid=1000),
    "d/sub/deep": "deep\n",
    "e": {},
}
BELOW = {
    "a": "hidden by the top layer\n",
    "d/h": "from the bottom layer\n",
    "d/sub/other": "bottom other\n",
    "bottom-only": "bottom\n",
}


@CASES.scenario(BASE, BELOW)
def unlink_lower_file(r: Recorder) -> None:
    """Unlinking a lower file hides it: ENOENT on stat/open/unlink, gone from readdir, a whiteout in upper."""
    r.call("unlink a", os.unlink, "a")
    r.stat("lstat a", "a")
    r.call("open a", os.open, "a", os.O_RDONLY)
    r.call("unlink a again", os.unlink, "a")
    r.listdir("ls .")
    r.call("unlink d/h (bottom layer)", os.unlink, "d/h")
    r.listdir("ls d")
    r.call("unlink bottom-only", os.unlink, "bottom-only")
    r.listdir("ls . after")


@CASES.scenario(BASE, BELOW)
def unlink_and_recreate_lower_file(r: Recorder) -> None:
    """A recreated name shows only the new file (new content, default mode), nothing of the old one."""
    r.call("unlink", os.unlink, "d/g")
    r.write("create", "d/g", b"new\n", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r.read("read", "d/g")
    r.stat("stat", "d/g")
    r.call("unlink a", os.unlink, "a")
    r.call("mkdir a", os.mkdir, "a")
    r.listdir("ls a", "a")
    r.listdir("ls d", "d")


@CASES.scenario(BASE, BELOW)
def rm_rf_lower_dir_and_recreate(r: Recorder) -> None:
    """``rm -rf`` of a merged dir then ``mkdir``: the new dir is empty (opaque), lower children stay hidden."""
    r.rmtree("rm -rf d", "d")
    r.stat("stat d", "d")
    r.stat("stat d/f", "d/f")
    r.call("mkdir d", os.mkdir, "d", 0o750)
    r.listdir("ls d (empty)", "d")
    r.stat("stat d/h", "d/h")
    r.write("create d/new", "d/new", b"n")
    r.call("mkdir d/sub", os.mkdir, "d/sub")
    r.listdir("ls d", "d")
    r.listdir("ls d/sub (empty)", "d/sub")


@CASES.scenario(BASE, BELOW)
def rmdir_merged_nonempty_dir(r: Recorder) -> None:
    """rmdir of a dir with children from any layer is ENOTEMPTY and changes nothing."""
    r.call("rmdir d", os.rmdir, "d")
    r.call("rmdir d/sub", os.rmdir, "d/sub")
    r.call("mkdir e/x", os.mkdir, "e/x")
    r.call("rmdir e (upper child)", os.rmdir, "e")
    r.listdir("ls d", "d")


@CASES.scenario(BASE, BELOW)
def rmdir_dir_whose_children_are_whited_out(r: Recorder) -> None:
    """A merged dir whose every child was unlinked is empty: rmdir succeeds, the name disappears."""
    for name in ("deep", "other"):
        r.call(f"unlink d/sub/{name}", os.unlink, f"d/sub/{name}")
    r.listdir("ls d/sub", "d/sub")
    r.call("rmdir d/sub", os.rmdir, "d/sub")
    r.stat("stat d/sub", "d/sub")
    r.listdir("ls d", "d")


@CASES.scenario({"d/a": WHITEOUT, "d/b": WHITEOUT, "x": "x"}, {"d/a": "a", "d/b": "b"})
def rmdir_dir_emptied_by_lower_whiteouts(r: Recorder) -> None:
    """A dir that only holds whiteouts (in a lower layer) over the names below lists empty and can be removed."""
    r.listdir("ls d", "d")
    r.stat("stat d/a", "d/a")
    r.call("rmdir d", os.rmdir, "d")
    r.stat("stat d", "d")
    r.listdir("ls .")


@CASES.scenario(BASE)
def unlink_upper_only_file_leaves_no_whiteout(r: Recorder) -> None:
    """Removing a file or dir that exists only in upper leaves no trace (no whiteout) in the upper dir."""
    r.write("create", "new", b"x")
    r.call("unlink", os.unlink, "new")
    r.call("mkdir", os.mkdir, "e/newdir")
    r.call("rmdir", os.rmdir, "e/newdir")
    r.listdir("ls .")
    r.listdir("ls e", "e")


@CASES.scenario({"top": "t"}, {"a": WHITEOUT, "d/b": WHITEOUT, "d/keep": "m"},
                {"a": "bottom a", "d/b": "bottom b", "d/c": "bottom c"})
def whiteout_in_middle_layer(r: Recorder) -> None:
    """A whiteout in a middle layer hides the bottom layer's name; creating the name afterwards works."""
    r.stat("stat a", "a")
    r.stat("stat d/b", "d/b")
    r.listdir("ls .")
    r.listdir("ls d", "d")
    r.write("create a", "a", b"again", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r.read("read a", "a")
    r.call("mkdir d/b", os.mkdir, "d/b")
    r.listdir("ls d after", "d")


@CASES.scenario({"d": Dir({"x": "top x"}, opaque=True), "o": "o"},
                {"d/x": "bottom x", "d/y": "bottom y", "d/z/deep": "z"})
def opaque_dir_in_lower(r: Recorder) -> None:
    """An opaque dir in a lower layer hides everything below it under that name."""
    r.listdir("ls d", "d")
    r.read("read d/x", "d/x")
    r.stat("stat d/y", "d/y")
    r.stat("stat d/z", "d/z")
    r.write("create d/y", "d/y", b"new y")
    r.call("unlink d/x", os.unlink, "d/x")
    r.listdir("ls d after", "d")


@CASES.scenario({"a/b/c/top": "1", "a/t": "t"},
                {"a/b/c/mid": "2", "a/b/m": "m", "a/x": WHITEOUT, "m": "mid"},
                {"a/b/c/low": "3", "a/x": "gone", "a/b/l": "l", "l": "low"})
def readdir_merges_at_every_level(r: Recorder) -> None:
    """Merged listings at each depth are the union of the layers, minus whiteouts, with no marker names."""
    for d in (".", "a", "a/b", "a/b/c"):
        r.listdir(f"ls {d}", d)
    r.value("scandir types", lambda: sorted((e.name, e.is_dir(follow_symlinks=False),
                                             e.is_file(follow_symlinks=False)) for e in os.scandir("a/b")))


@CASES.scenario({"d/one": "1", "d/common": "top", "d/gone": WHITEOUT},
                {"d/two": "2", "d/common": "second", "d/sub/s2": "s"},
                {"d/three": "3", "d/common": "third", "d/gone": "never seen", "d/sub/s3": "s"},
                {"d/four": "4", "d/common": "fourth", "d/sub/s4": "s", "root4": "r"})
def four_lower_layers_merge(r: Recorder) -> None:
    """With 4 lowers, names come from every layer, the highest copy wins, a whiteout hides those below."""
    r.listdir("ls d", "d")
    r.listdir("ls d/sub", "d/sub")
    r.read("read d/common", "d/common")
    r.read("read d/four", "d/four")
    r.stat("stat d/gone", "d/gone")
    r.write("append d/three", "d/three", b"+", flags=os.O_WRONLY | os.O_APPEND)
    r.read("read d/three", "d/three")


@CASES.scenario({"x": "a file on top", "y/child": "y child"},
                {"x/child": "dir below", "x/sub/deep": "d", "y": "file below"})
def file_over_dir_and_dir_over_file(r: Recorder) -> None:
    """A file above a dir hides the whole dir (ENOTDIR below it); a dir above a file is just that dir."""
    r.stat("stat x", "x")
    r.listdir("ls x", "x")
    r.stat("stat x/child", "x/child")
    r.stat("stat y", "y")
    r.listdir("ls y", "y")
    r.call("rmdir y", os.rmdir, "y")
    r.call("unlink y/child", os.unlink, "y/child")
    r.call("rmdir y again", os.rmdir, "y")
    r.stat("stat y after", "y")


@CASES.scenario(BASE, BELOW)
def replace_lower_file_with_dir_and_dir_with_file(r: Recorder) -> None:
    """A name can change type: file -> dir (empty, writable) and dir -> file, through unlink/rmdir."""
    r.call("unlink b", os.unlink, "b")
    r.call("mkdir b", os.mkdir, "b")
    r.write("create b/in", "b/in", b"in")
    r.listdir("ls b", "b")
    r.rmtree("rm -rf d", "d")
    r.write("create file d", "d", b"now a file")
    r.stat("stat d", "d")
    r.stat("stat d/f", "d/f")
    r.listdir("ls .")


@CASES.scenario(BASE, BELOW, upper={"a": WHITEOUT, "d": Dir({"up": "u"}, opaque=True), "u": "upper"})
def prepopulated_upper_with_whiteouts(r: Recorder) -> None:
    """An existing upper dir's whiteouts and opaque dirs are honoured, and can be overwritten again."""
    r.listdir("ls .")
    r.listdir("ls d", "d")
    r.stat("stat a", "a")
    r.write("create a", "a", b"back")
    r.call("unlink d/up", os.unlink, "d/up")
    r.listdir("ls d after", "d")
    r.call("rmdir d", os.rmdir, "d")


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir as the kernel's overlayfs."""
    assert_same_as_kernel(case, tmp_path)

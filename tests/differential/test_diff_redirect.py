"""Directories that rename: both sides mounted with ``redirect_dir=on`` (family ``redirect``).

A directory with a lower copy moves with a redirect xattr on its upper copy (its old name when it stays in
its parent, else the absolute path of its lower copies) and a whiteout at its old name; the snapshots of the
upper dirs compare the redirects too.  The scenarios of ``test_diff_rename`` run again in this family.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import WHITEOUT
from support.syscalls import RENAME_EXCHANGE, renameat2
from test_diff_rename import CASES as RENAME_CASES

CASES = Catalog(family="redirect")

TOP = {
    "a/f": "a f\n",
    "a/sub/g": "a sub g\n",
    "b/x": "b x\n",
    "src/f": "src f\n",
    "dst/existing": "dst existing\n",
    "empty": {},
    "plain": "plain\n",
    "gone": WHITEOUT,
}
BOTTOM = {
    "a/from-bottom": "bottom a\n",
    "a/sub/deep/h": "bottom deep h\n",
    "src/h": "bottom h\n",
    "gone/y": "gone y\n",
    "only-bottom/z": "z\n",
}


def _look(r: Recorder, *paths: str) -> None:
    for path in paths:
        r.listdir(f"ls {path}", path)


@CASES.scenario(TOP, BOTTOM)
def rename_merged_dir_in_its_parent(r: Recorder) -> None:
    """A dir merged from two lowers renamed in its parent keeps every child (relative redirect)."""
    r.call("rename a a2", os.rename, "a", "a2")
    _look(r, ".", "a2", "a2/sub", "a2/sub/deep")
    r.read("read a2/from-bottom", "a2/from-bottom")
    r.stat("stat a", "a")


@rename_merged_dir_in_its_parent.then_after_remount
def _rename_merged_dir_in_its_parent_after(r: Recorder) -> None:
    _look(r, "a2", "a2/sub/deep")


@CASES.scenario(TOP, BOTTOM)
def rename_lower_dirs_across_parents(r: Recorder) -> None:
    """Dirs moved into other dirs (absolute redirects), a child of a moved dir moved again, its parent too."""
    r.call("rename a a2", os.rename, "a", "a2")
    r.call("rename a2/sub b/sub2", os.rename, "a2/sub", "b/sub2")
    r.call("rename b b3", os.rename, "b", "b3")
    r.call("rename only-bottom dst/ob", os.rename, "only-bottom", "dst/ob")
    _look(r, ".", "a2", "b3", "b3/sub2", "b3/sub2/deep", "dst", "dst/ob")
    r.read("read b3/sub2/deep/h", "b3/sub2/deep/h")


@rename_lower_dirs_across_parents.then_after_remount
def _rename_lower_dirs_across_parents_after(r: Recorder) -> None:
    _look(r, ".", "b3/sub2", "b3/sub2/deep", "dst/ob")


@CASES.scenario(TOP, BOTTOM)
def change_inside_a_renamed_dir(r: Recorder) -> None:
    """Below a renamed dir, files copy up from their old place, deletions whiteout, new names appear."""
    r.call("rename src moved", os.rename, "src", "moved")
    r.write("write moved/h", "moved/h", b"changed h\n")
    r.call("unlink moved/f", os.unlink, "moved/f")
    r.call("rename a/sub moved/sub", os.rename, "a/sub", "moved/sub")
    r.call("chmod moved/sub/deep/h", os.chmod, "moved/sub/deep/h", 0o600)
    r.call("mkdir moved/sub/deep/new", os.mkdir, "moved/sub/deep/new")
    _look(r, "moved", "moved/sub", "moved/sub/deep", "a")
    r.read("read moved/h", "moved/h")
    r.stat("stat moved/sub/deep/h", "moved/sub/deep/h")


@CASES.scenario(TOP, BOTTOM)
def rename_away_and_back_and_again(r: Recorder) -> None:
    """A dir moved away and back keeps its redirect; moved twice across dirs it keeps the absolute one."""
    r.call("rename a dst/a", os.rename, "a", "dst/a")
    r.call("rename dst/a a", os.rename, "dst/a", "a")
    r.call("rename src src2", os.rename, "src", "src2")
    r.call("rename src2 dst/src3", os.rename, "src2", "dst/src3")
    r.call("rename dst/src3 empty/src4", os.rename, "dst/src3", "empty/src4")
    _look(r, ".", "a", "a/sub", "dst", "empty", "empty/src4")


@CASES.scenario(TOP, BOTTOM)
def rename_lower_dir_over_empty_and_whited_out_names(r: Recorder) -> None:
    """Onto an empty lower dir, onto a whited-out name, onto an emptied merged dir; RENAME_NOREPLACE."""
    r.call("rename b empty", os.rename, "b", "empty")
    r.call("rename only-bottom gone", os.rename, "only-bottom", "gone")
    r.call("rename a src (not empty)", os.rename, "a", "src")
    r.call("unlink src/f", os.unlink, "src/f")
    r.call("unlink src/h", os.unlink, "src/h")
    r.call("rename a src (emptied)", os.rename, "a", "src")
    _look(r, ".", "empty", "gone", "src", "src/sub")


@CASES.scenario(TOP, BOTTOM)
def new_dir_at_the_old_name(r: Recorder) -> None:
    """After a move, a dir made at the old name is new and opaque; the moved dir can be emptied and removed."""
    r.call("rename only-bottom ob", os.rename, "only-bottom", "ob")
    r.call("mkdir only-bottom", os.mkdir, "only-bottom")
    _look(r, "only-bottom", "ob")
    r.call("unlink ob/z", os.unlink, "ob/z")
    r.call("rmdir ob", os.rmdir, "ob")
    r.call("rename a only-bottom/a", os.rename, "a", "only-bottom/a")
    _look(r, ".", "only-bottom", "only-bottom/a")


@CASES.scenario(TOP, BOTTOM)
def exchange_lower_dirs(r: Recorder) -> None:
    """renameat2(RENAME_EXCHANGE) of two lower dirs (same parent, and across parents) swaps them whole."""
    r.call("exchange a src", renameat2, "a", "src", RENAME_EXCHANGE)
    r.call("exchange b/.. (src) dst", renameat2, "src", "dst", RENAME_EXCHANGE)
    r.call("exchange a/sub dst/existing (a dir and a file)", renameat2, "a/sub", "dst/existing",
           RENAME_EXCHANGE)
    _look(r, ".", "a", "src", "dst", "src/sub")


@CASES.scenario(TOP, BOTTOM)
def upper_dir_and_lower_dir_into_merged_dirs(r: Recorder) -> None:
    """A new dir moved into a merged dir is opaque, a lower dir moved there gets a redirect instead."""
    r.call("mkdir n", os.mkdir, "n")
    r.write("n/x", "n/x", b"x")
    r.call("rename n a/n", os.rename, "n", "a/n")
    r.call("rename b a/b", os.rename, "b", "a/b")
    r.call("rename a moved", os.rename, "a", "moved")
    _look(r, "moved", "moved/n", "moved/b")


@CASES.scenario(TOP, BOTTOM)
def new_dirs_in_merged_dirs_are_opaque(r: Recorder) -> None:
    """With redirect_dir=on the kernel marks a dir made in a merged dir opaque (a lower-only dir's copy-up
    makes it merged first), but not one made in a purely upper dir."""
    r.call("mkdir a/n (merged parent)", os.mkdir, "a/n")
    r.call("mkdir only-bottom/n (lower-only parent)", os.mkdir, "only-bottom/n")
    r.call("mkdir up", os.mkdir, "up")
    r.call("mkdir up/n (upper-only parent)", os.mkdir, "up/n")
    _look(r, "a", "only-bottom", "up")


@CASES.scenario(TOP, BOTTOM)
def rename_lower_dir_over_a_full_upper_dir_is_enotempty(r: Recorder) -> None:
    """A dir with a lower copy renamed over a non-empty purely upper dir: ENOTEMPTY comes from the upper fs,
    after the kernel copied the source up and wrote its redirect (kept: the upper dirs compare it), in its
    parent and across parents."""
    r.call("mkdir up", os.mkdir, "up")
    r.call("mkdir up/full", os.mkdir, "up/full")
    r.write("write up/full/x", "up/full/x", b"x\n")
    r.call("mkdir full", os.mkdir, "full")
    r.write("write full/x", "full/x", b"x\n")
    r.call("rename only-bottom full", os.rename, "only-bottom", "full")
    r.call("rename a up/full", os.rename, "a", "up/full")
    r.call("rename b up/full", os.rename, "b", "up/full")
    _look(r, ".", "a", "only-bottom", "up/full")
    r.call("rename a a2 (after)", os.rename, "a", "a2")
    _look(r, ".", "a2", "a2/sub")


REDIRECT_RENAME_CASES = [dataclasses.replace(s, family="redirect") for s in RENAME_CASES]


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", [*CASES.params(), *REDIRECT_RENAME_CASES], ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir (redirects included) as the
    kernel's overlayfs, both with redirect_dir=on."""
    assert_same_as_kernel(case, tmp_path)

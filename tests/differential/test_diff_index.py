"""Hard links that survive copy-up: both sides mounted with ``redirect_dir=on,index=on`` (family ``index``).

Every name of a lower hard link shows one file once any of them is copied up (open for write, chmod,
truncate, an xattr, link(2)): the same st_ino, st_nlink and data, also after a remount; unlink and rename of
names count the union's links as the kernel counts them.  The snapshots compare every name's attributes and
which names share an inode; the upper dirs compare their link counts (the index entry is one of them).  The
scenarios of ``test_diff_links`` and ``test_diff_redirect`` run again in this family.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import Hardlink
from support.syscalls import RENAME_EXCHANGE, renameat2
from test_diff_links import CASES as LINK_CASES
from test_diff_redirect import CASES as REDIRECT_CASES

CASES = Catalog(family="index")

TOP = {
    "h1": "hard linked\n",
    "h2": Hardlink("h1"),
    "d/h3": Hardlink("h1"),
    "p1": "pair\n",
    "p2": Hardlink("p1"),
    "solo": "solo\n",
    "d/other": "other\n",
}
BOTTOM = {
    "b1": "bottom linked\n",
    "b2": Hardlink("b1"),
    "e/b3": Hardlink("b1"),
    "h1": "hidden below\n",
    "e/f": "bottom f\n",
}

NAMES = ("h1", "h2", "d/h3", "p1", "p2", "b1", "b2", "e/b3")


def _look(r: Recorder, *paths: str) -> None:
    for path in paths or NAMES:
        r.stat(f"stat {path}", path)


def _same_file(r: Recorder, label: str, *paths: str) -> None:
    """Record whether every one of ``paths`` shows one inode (a relation, never a number)."""
    inos = {r.ino(path) for path in paths}
    r.record(label, len(inos) == 1 and None not in inos)


@CASES.scenario(TOP, BOTTOM)
def write_through_one_name(r: Recorder) -> None:
    """A write through one name is seen through every other, in the same dir and across dirs."""
    _look(r)
    r.write("append h1", "h1", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    _look(r, "h1", "h2", "d/h3")
    r.read("read h2", "h2")
    r.read("read d/h3", "d/h3")
    _same_file(r, "h1 h2 d/h3 one file", "h1", "h2", "d/h3")


@write_through_one_name.then_after_remount
def _write_through_one_name_after(r: Recorder) -> None:
    _look(r, "h1", "h2", "d/h3")
    r.read("read d/h3", "d/h3")
    r.write("append d/h3", "d/h3", b"again\n", flags=os.O_WRONLY | os.O_APPEND)
    r.read("read h2", "h2")
    _same_file(r, "h1 h2 d/h3 one file", "h1", "h2", "d/h3")


@CASES.scenario(TOP, BOTTOM)
def copy_up_through_each_kind_of_change(r: Recorder) -> None:
    """chmod of one name, truncate of another, an xattr on a third: one file throughout."""
    r.call("chmod h2", os.chmod, "h2", 0o600)
    _look(r, "h1", "h2", "d/h3")
    r.call("truncate d/h3", os.truncate, "d/h3", 4)
    r.read("read h1", "h1")
    r.call("setxattr b2", os.setxattr, "b2", "user.tag", b"v")
    r.value("getxattr e/b3", os.getxattr, "e/b3", "user.tag")
    r.value("listxattr b1", lambda: sorted(os.listxattr("b1")))
    r.write("O_TRUNC open of p2", "p2", b"new pair\n")
    r.read("read p1", "p1")
    _look(r)


@copy_up_through_each_kind_of_change.then_after_remount
def _copy_up_through_each_kind_of_change_after(r: Recorder) -> None:
    _look(r)


@CASES.scenario(TOP, BOTTOM)
def unlink_names(r: Recorder) -> None:
    """Unlinking a name that was never copied up counts the union's links; the last name takes the file."""
    r.call("unlink h2", os.unlink, "h2")
    _look(r, "h1", "d/h3")
    r.call("unlink h1", os.unlink, "h1")
    _look(r, "d/h3")
    r.write("append d/h3", "d/h3", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    r.call("unlink b1", os.unlink, "b1")
    r.call("unlink b2", os.unlink, "b2")
    _look(r, "e/b3")
    r.call("unlink e/b3", os.unlink, "e/b3")
    r.listdir("ls", ".")
    r.listdir("ls e", "e")


@unlink_names.then_after_remount
def _unlink_names_after(r: Recorder) -> None:
    _look(r, "d/h3", "h1", "b1", "e/b3")
    r.read("read d/h3", "d/h3")


@CASES.scenario(TOP, BOTTOM)
def rename_names(r: Recorder) -> None:
    """A name moved, a name moved onto another name of its own file (nothing happens), a file moved over a
    name of a link (which loses that link)."""
    r.call("rename h2 d/h2b", os.rename, "h2", "d/h2b")
    _look(r, "h1", "d/h2b", "d/h3")
    r.call("rename p1 p2", os.rename, "p1", "p2")
    _look(r, "p1", "p2")
    r.call("rename solo h1", os.rename, "solo", "h1")
    _look(r, "h1", "d/h2b", "d/h3")
    r.call("rename b1 e/b3", os.rename, "b1", "e/b3")
    _look(r, "b1", "b2", "e/b3")
    _same_file(r, "d/h2b d/h3 one file", "d/h2b", "d/h3")


@rename_names.then_after_remount
def _rename_names_after(r: Recorder) -> None:
    _look(r, "h1", "d/h2b", "d/h3", "p1", "p2", "b2", "e/b3")


@CASES.scenario(TOP, BOTTOM)
def link_of_a_lower_link_name(r: Recorder) -> None:
    """link(2) of a name of a lower hard link: one more name of the same file, every name counts it."""
    r.call("link b2 new", os.link, "b2", "new")
    _look(r, "b1", "b2", "e/b3", "new")
    r.write("append new", "new", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    r.read("read e/b3", "e/b3")
    r.call("link d/h3 e/h4", os.link, "d/h3", "e/h4")
    r.call("unlink h1", os.unlink, "h1")
    _look(r, "h2", "d/h3", "e/h4")
    _same_file(r, "b1 b2 e/b3 new one file", "b1", "b2", "e/b3", "new")


@link_of_a_lower_link_name.then_after_remount
def _link_of_a_lower_link_name_after(r: Recorder) -> None:
    _look(r, "b1", "b2", "e/b3", "new", "h2", "d/h3", "e/h4")


@CASES.scenario(TOP, BOTTOM)
def links_in_a_renamed_dir(r: Recorder) -> None:
    """A dir holding a name of a link renamed (a redirect), then the link copied up through that name."""
    r.call("rename d d2", os.rename, "d", "d2")
    r.call("rename e e2", os.rename, "e", "e2")
    r.write("append d2/h3", "d2/h3", b"via d2\n", flags=os.O_WRONLY | os.O_APPEND)
    _look(r, "h1", "h2", "d2/h3", "b1", "e2/b3")
    r.call("chmod e2/b3", os.chmod, "e2/b3", 0o640)
    _look(r, "b1", "b2", "e2/b3")
    r.read("read h1", "h1")


@links_in_a_renamed_dir.then_after_remount
def _links_in_a_renamed_dir_after(r: Recorder) -> None:
    _look(r, "h1", "h2", "d2/h3", "b1", "b2", "e2/b3")


@CASES.scenario(TOP, BOTTOM)
def exchange_names_of_one_link(r: Recorder) -> None:
    """renameat2(RENAME_EXCHANGE) of two names of one lower hard link (across dirs, in one dir, and after
    one name was copied up) is one inode to the VFS: nothing is exchanged, nothing copied up, no dir merged."""
    r.call("exchange h1 d/h3", renameat2, "h1", "d/h3", RENAME_EXCHANGE)
    r.stat("stat d", "d")
    r.call("exchange b2 b1", renameat2, "b2", "b1", RENAME_EXCHANGE)
    r.call("chmod e/b3", os.chmod, "e/b3", 0o600)
    r.call("exchange e/b3 b1", renameat2, "e/b3", "b1", RENAME_EXCHANGE)
    r.stat("stat e", "e")
    _look(r)
    _same_file(r, "h1 h2 d/h3 one file", "h1", "h2", "d/h3")


@exchange_names_of_one_link.then_after_remount
def _exchange_names_of_one_link_after(r: Recorder) -> None:
    _look(r)


@CASES.scenario(TOP, BOTTOM)
def xattrs_through_names_not_copied_up(r: Recorder) -> None:
    """Once one name of a link is copied up, an xattr set or removed through another name (and a failing
    XATTR_REPLACE) changes the shared file in place: the kernel copies no further name up."""
    r.call("chmod h1", os.chmod, "h1", 0o600)
    r.call("setxattr h2", os.setxattr, "h2", "user.tag", b"v")
    r.call("replace missing on d/h3", os.setxattr, "d/h3", "user.none", b"1", os.XATTR_REPLACE)
    r.value("getxattr h1", os.getxattr, "h1", "user.tag")
    r.value("listxattr d/h3", lambda: sorted(os.listxattr("d/h3")))
    r.call("removexattr missing on d/h3", os.removexattr, "d/h3", "user.none")
    r.call("removexattr d/h3", os.removexattr, "d/h3", "user.tag")
    r.value("listxattr h1", lambda: sorted(os.listxattr("h1")))
    _look(r, "h1", "h2", "d/h3")
    _same_file(r, "h1 h2 d/h3 one file", "h1", "h2", "d/h3")


@xattrs_through_names_not_copied_up.then_after_remount
def _xattrs_through_names_not_copied_up_after(r: Recorder) -> None:
    r.call("setxattr d/h3", os.setxattr, "d/h3", "user.again", b"w")
    r.value("listxattr h2", lambda: sorted(os.listxattr("h2")))
    _look(r, "h1", "h2", "d/h3")


INDEX_CASES = [dataclasses.replace(s, family="index") for s in [*LINK_CASES, *REDIRECT_CASES]]


@pytest.mark.parametrize("case", [*CASES.params(), *INDEX_CASES], ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    assert_same_as_kernel(case, tmp_path)

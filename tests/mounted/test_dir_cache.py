"""Directory listings kept in the kernel (``dir_cache=on``, the protocol frontend's default): no OPENDIR or
RELEASEDIR requests, a listing read again costs no READDIR, and every change of what a listing shows reaches
it, whether the kernel made it in that directory itself or the daemon made it elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.mounts import unionfs_mount
from support.syscalls import getdents

pytestmark = pytest.mark.mounted
UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")
LOWLEVEL = ("frontend=lowlevel",)


def _stats(mnt: Path) -> dict:
    out = subprocess.run([UNIONFS, "stats", "--json", str(mnt)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _calls(stats: dict, op: str) -> int:
    return int(stats["operations"].get(op, {}).get("calls", 0))


def _listing_requests(mnt: Path) -> dict[str, int]:
    stats = _stats(mnt)
    return {op: _calls(stats, op) for op in ("opendir", "readdir", "readdirplus", "releasedir")}


def _ls(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@contextmanager
def _union(tmp_path: Path, *options: str) -> Iterator[tuple[Path, Path, Path]]:
    """A lower layer with ``d/{a,b}``, ``d/sub/x``, ``e/y`` and ``f``; yields (mountpoint, lower, upper)."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt, lower / "d" / "sub", lower / "e"):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("d/a", "d/b", "d/sub/x", "e/y", "f"):
        (lower / name).write_text(name)
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, *options)):
        yield mnt, lower, upper


def test_a_listing_read_again_costs_no_request(tmp_path: Path) -> None:
    with _union(tmp_path) as (mnt, _, _):
        assert _ls(mnt / "d") == ["a", "b", "sub"]
        before = _listing_requests(mnt)
        for _ in range(5):
            assert _ls(mnt / "d") == ["a", "b", "sub"]
        assert _listing_requests(mnt) == before
        assert before["opendir"] <= 1  # the first one, answered ENOSYS: the kernel stops asking
        assert before["releasedir"] == 0


def test_dir_cache_off_reads_every_listing_from_the_daemon(tmp_path: Path) -> None:
    with _union(tmp_path, "dir_cache=off") as (mnt, _, _):
        assert _ls(mnt / "d") == ["a", "b", "sub"]
        before = _listing_requests(mnt)
        for _ in range(3):
            assert _ls(mnt / "d") == ["a", "b", "sub"]
        after = _listing_requests(mnt)
        assert after["opendir"] == before["opendir"] + 3
        assert after["readdir"] + after["readdirplus"] >= before["readdir"] + before["readdirplus"] + 3


def test_ls_l_of_a_cached_listing_sends_nothing(tmp_path: Path) -> None:
    """The first READDIRPLUS gave the kernel every child's entry and attributes; a cached listing read
    again, with a stat of every child, then reaches the daemon not at all (the first listing read from the
    cache refreshes the directory's attributes once: the kernel's atime rule)."""
    with _union(tmp_path) as (mnt, _, _):
        names = _ls(mnt / "d")
        _ls(mnt / "d")
        before = _stats(mnt)["operations"]
        for name in _ls(mnt / "d"):
            os.lstat(mnt / "d" / name)
        after = _stats(mnt)["operations"]
        assert names == ["a", "b", "sub"]
        assert {op: v["calls"] for op, v in after.items() if op not in ("statfs",)} \
            == {op: v["calls"] for op, v in before.items() if op not in ("statfs",)}


def test_local_changes_reach_a_cached_listing(tmp_path: Path) -> None:
    """create, unlink, mkdir, rmdir, rename (within and across directories), link and symlink, each between
    two reads of the directories it changes."""
    with _union(tmp_path, "redirect_dir=on") as (mnt, _, _):
        d, e = mnt / "d", mnt / "e"
        assert _ls(d) == ["a", "b", "sub"] and _ls(e) == ["y"]
        (d / "new").write_text("n")
        assert _ls(d) == ["a", "b", "new", "sub"]
        os.unlink(d / "a")
        assert _ls(d) == ["b", "new", "sub"]
        os.mkdir(d / "m")
        assert _ls(d) == ["b", "m", "new", "sub"]
        os.rmdir(d / "m")
        assert _ls(d) == ["b", "new", "sub"]
        os.rename(d / "b", d / "c")
        assert _ls(d) == ["c", "new", "sub"]
        os.rename(d / "c", e / "c")
        assert _ls(d) == ["new", "sub"] and _ls(e) == ["c", "y"]
        os.link(e / "y", d / "y2")
        assert _ls(d) == ["new", "sub", "y2"]
        os.symlink("y", e / "s")
        assert _ls(e) == ["c", "s", "y"]
        os.rename(d / "sub", e / "sub")  # a lower directory: moved with a redirect
        assert _ls(d) == ["new", "y2"] and _ls(e) == ["c", "s", "sub", "y"]
        assert _ls(e / "sub") == ["x"]
        os.mkdir(d / "sub")  # over the whiteout the move left: a new, opaque directory
        assert _ls(d / "sub") == []


def test_a_copy_up_that_breaks_a_lower_hard_link_reaches_its_parents_listing(tmp_path: Path) -> None:
    """Lower ``x`` and ``y`` are one file; a write to ``x`` copies it up with an inode number of its own, as
    the kernel's overlayfs shows it.  The kernel saw no change in the (already merged) directory: the daemon
    invalidates its listing, whose d_ino for ``x`` is stale otherwise."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "d", upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "d" / "x").write_text("x")
    os.link(lower / "d" / "x", lower / "d" / "y")
    with unionfs_mount([lower], upper, work, mnt, LOWLEVEL):
        d = mnt / "d"
        (d / "z").write_text("z")  # d is merged from now on: the copy-up below leaves it alone
        before = {e.name: e.inode() for e in os.scandir(d)}
        assert before["x"] == before["y"]
        fd = os.open(d / "x", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"more")
        finally:
            os.close(fd)
        after = {e.name: e.inode() for e in os.scandir(d)}
        assert after["x"] == os.lstat(d / "x").st_ino != before["x"]
        assert after["y"] == before["y"] == os.lstat(d / "y").st_ino


@pytest.mark.parametrize("dir_cache", ["on", "off"])
def test_a_reader_that_deletes_as_it_goes_sees_every_name_while_others_list(tmp_path: Path, dir_cache: str) -> None:
    """``rm -r``'s pattern beside another lister: one reader takes a few entries at a time and unlinks them,
    another lists the whole directory in between (so the kernel's cached listing is refilled without the
    removed names).  The first reader must still get every name it did not remove yet: offsets are stable
    across listings, not positions in one of them."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "d", upper, work, mnt):
        d.mkdir(parents=True)
    names = {f"entry-{i:04d}-{'x' * 40}" for i in range(300)}
    for name in names:
        (lower / "d" / name).write_text("x")
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, f"dir_cache={dir_cache}")):
        d = mnt / "d"
        assert set(os.listdir(d)) == names
        seen: set[str] = set()
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while chunk := getdents(fd, 2048):
                for name in chunk:
                    if name not in (".", ".."):
                        seen.add(name)
                        os.unlink(d / name)
                assert set(os.listdir(d)) == names - seen  # the other lister
        finally:
            os.close(fd)
        assert seen == names
        assert os.listdir(d) == []


def test_a_renamed_lower_directory_shows_the_merged_link_count(tmp_path: Path) -> None:
    """A lower directory with subdirectories (the layer's ``st_nlink``) renamed with a redirect is copied up
    and merged: ``st_nlink`` 1 at its new name, as on the kernel's overlayfs.  The copy-up's invalidation
    names the node by the name the kernel knew when the core made it, not by the one it has once the rename's
    node moved (which found nothing: the attributes stayed cached, also through listings read from the
    kernel's cache)."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt):
        d.mkdir()
    rounds = 20
    for i in range(rounds):
        (lower / f"x{i}" / "sub1").mkdir(parents=True)
        (lower / f"x{i}" / "sub2").mkdir()
    with unionfs_mount([lower], upper, work, mnt, (*LOWLEVEL, "redirect_dir=on")):
        for i in range(rounds):
            assert os.lstat(mnt / f"x{i}").st_nlink == 4
            _ls(mnt)
        for i in range(rounds):
            os.rename(mnt / f"x{i}", mnt / f"a{i}")
            assert (i, os.lstat(mnt / f"a{i}").st_nlink) == (i, 1)
        assert sorted(_ls(mnt)) == sorted(f"a{i}" for i in range(rounds))


def test_a_write_through_one_name_of_a_hard_link_shows_at_the_other(tmp_path: Path) -> None:
    """The data of a write through a descriptor of one name goes straight to the backing file (passthrough):
    the other name's size and mtime must not stay what the kernel cached, also when the listings of its
    directory are read from the kernel's cache (no READDIRPLUS refreshes them)."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    with unionfs_mount([lower], upper, work, mnt, LOWLEVEL):
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"x")
        os.link(mnt / "d" / "f", mnt / "g")
        assert os.lstat(mnt / "g").st_size == 1
        _ls(mnt / "d")
        _ls(mnt)
        fd = os.open(mnt / "d" / "f", os.O_WRONLY)
        try:
            os.pwrite(fd, b"written\n", 4096)
            _ls(mnt)
            assert os.lstat(mnt / "g").st_size == 4104
            assert os.lstat(mnt / "d" / "f").st_size == 4104
        finally:
            os.close(fd)
        assert (mnt / "g").read_bytes()[4096:] == b"written\n"

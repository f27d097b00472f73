"""Objects whose name is gone (``UnionFS.pin`` and the ``orphan_*`` operations), without FUSE: what a frontend
holding a handle on a name gets once the name is unlinked, removed or replaced (kernel overlayfs semantics,
checked against the kernel in tests/differential/test_regressions.py)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import pytest
from support.layers import Symlink
from unitkit import Env, assert_errno, create_file, read_all, staging_entries

from unionfs.fs.union import UTIME_OMIT, UnionFS

LOWER = {"low": "lower data\n", "d/f": "in d\n", "plain": {}, "link": Symlink("low")}


@pytest.fixture(params=["kernel", "oci"])
def union(request: pytest.FixtureRequest, mkenv: Callable[..., Env]) -> tuple[Env, UnionFS]:
    env = mkenv([LOWER], fmt=request.param)
    return env, env.open(whiteout=request.param)


def test_an_upper_file_unlinked_keeps_answering(union: tuple[Env, UnionFS]) -> None:
    env, fs = union
    create_file(fs, "new", b"0123456789")
    ino = fs.getattr("new").st_ino
    orphan = fs.pin("new")
    assert orphan is not None and orphan.on_upper
    fs.unlink("new")
    assert not (env.upper / "new").exists()
    attrs = fs.orphan_getattr(orphan)
    assert (attrs.st_nlink, attrs.st_size, attrs.st_ino) == (0, 10, ino)
    fs.orphan_setattr(orphan, mode=0o600, size=4, atime_ns=1_000_000_000, mtime_ns=2_000_000_000)
    attrs = fs.orphan_getattr(orphan)
    assert (stat.S_IMODE(attrs.st_mode), attrs.st_size, attrs.st_mtime_ns) == (0o600, 4, 2_000_000_000)
    handle = fs.orphan_open(orphan, os.O_RDWR)
    try:
        fs.write(handle, b"XY", 4)
        assert fs.read(handle, 100, 0) == b"0123XY"
    finally:
        fs.release(handle)
    fs.orphan_setxattr(orphan, "user.k", b"v", 0)
    assert fs.orphan_xattr_or_none(orphan, "user.k") == b"v"
    assert fs.orphan_listxattr(orphan) == ["user.k"]
    fs.orphan_removexattr(orphan, "user.k")
    assert fs.orphan_xattr_or_none(orphan, "user.k") is None
    orphan.close()
    orphan.close()  # idempotent
    assert sorted(os.listdir(env.upper)) == []
    assert staging_entries(env) == []  # nothing was kept on disk for it


def test_a_lower_file_whose_name_is_gone_reads_its_layer_and_cannot_change(union: tuple[Env, UnionFS]) -> None:
    env, fs = union
    orphan = fs.pin("low")
    assert orphan is not None and not orphan.on_upper
    fs.unlink("low")
    attrs = fs.orphan_getattr(orphan)
    assert (attrs.st_nlink, attrs.st_size) == (1, 11)
    handle = fs.orphan_open(orphan, os.O_RDONLY)
    try:
        assert fs.read(handle, 100, 0) == b"lower data\n"
    finally:
        fs.release(handle)
    # the kernel's copy-up finds the whiteout where the name was
    assert_errno(errno.EEXIST, fs.orphan_open, orphan, os.O_RDWR)
    assert_errno(errno.EEXIST, fs.orphan_setattr, orphan)
    assert_errno(errno.EEXIST, fs.orphan_setattr, orphan, mode=0o600)
    assert_errno(errno.EEXIST, fs.orphan_setxattr, orphan, "user.k", b"v", 0)
    assert_errno(errno.ENODATA, fs.orphan_removexattr, orphan, "user.k")
    assert fs.orphan_xattr_or_none(orphan, "user.k") is None
    orphan.close()
    assert (env.lowers[0] / "low").read_text() == "lower data\n"
    assert "low" not in [n for n, _, _ in fs.readdir("")]


def test_directories_whose_name_is_gone(union: tuple[Env, UnionFS]) -> None:
    _, fs = union
    fs.mkdir("new", 0o755)
    fs.unlink("d/f")
    pinned = {name: fs.pin(name) for name in ("new", "d", "plain")}
    for name in pinned:
        fs.rmdir(name)
    nlinks = {name: fs.orphan_getattr(o).st_nlink for name, o in pinned.items() if o is not None}
    # a new upper dir: the host's 0; a merged one: 1, as the kernel shows merged dirs; a lower one: its layer's
    assert nlinks == {"new": 0, "d": 1, "plain": 2}
    assert_errno(errno.ENOTDIR, fs.orphan_setattr, pinned["plain"], mode=0o700)
    assert_errno(errno.EISDIR, fs.orphan_open, pinned["new"], os.O_RDWR)
    for o in pinned.values():
        assert o is not None
        o.close()


def test_a_file_replaced_by_a_rename_and_a_hard_link_left(union: tuple[Env, UnionFS]) -> None:
    _, fs = union
    create_file(fs, "a", b"linked")
    fs.link("a", "b")
    create_file(fs, "other", b"other")
    orphan = fs.pin("a")
    assert orphan is not None
    fs.rename("other", "a")
    assert fs.orphan_getattr(orphan).st_nlink == 1  # its name b is left
    told: list[str] = []
    fs.invalidate = told.append
    fs.getattr("b")  # the union learns the name b
    fs.orphan_setattr(orphan, mode=0o640)
    assert stat.S_IMODE(fs.getattr("b").st_mode) == 0o640
    assert "b" in told  # the kernel's cache of the other name is dropped
    assert read_all(fs, "a") == b"other"
    orphan.close()


def test_pin_of_nothing_and_of_a_symlink(union: tuple[Env, UnionFS]) -> None:
    _, fs = union
    assert fs.pin("missing") is None
    orphan = fs.pin("link")
    assert orphan is not None
    fs.unlink("link")
    assert stat.S_ISLNK(fs.orphan_getattr(orphan).st_mode)
    assert_errno(errno.ELOOP, fs.orphan_open, orphan, os.O_RDONLY)  # never through a layer's symlink
    orphan.close()


def test_setattr_of_nothing_keeps_an_upper_orphan(union: tuple[Env, UnionFS]) -> None:
    _, fs = union
    create_file(fs, "f", b"x")
    orphan = fs.pin("f")
    assert orphan is not None
    fs.unlink("f")
    before: Any = fs.orphan_getattr(orphan)
    fs.orphan_setattr(orphan, uid=-1, gid=-1, atime_ns=UTIME_OMIT, mtime_ns=UTIME_OMIT)
    after = fs.orphan_getattr(orphan)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (before.st_mode, before.st_size,
                                                                  before.st_mtime_ns)
    orphan.close()


def test_readlink_link_and_access_of_orphans(union: tuple[Env, UnionFS]) -> None:
    """A removed symlink still reads its target; a removed name of an upper hard link can be linked again
    (the other name sees the count), one with no link left or a lower one cannot (ENOENT, the kernel's
    answers); access answers for all of them."""
    env, fs = union
    fs.symlink("up target", "uplink")
    create_file(fs, "a", b"linked")
    fs.link("a", "b")
    create_file(fs, "new", b"new")
    orphans = {name: fs.pin(name) for name in ("uplink", "link", "a", "new", "low")}
    for name in orphans:
        fs.unlink(name)
    got = {name: o for name, o in orphans.items() if o is not None}
    assert sorted(got) == sorted(orphans)
    assert fs.orphan_readlink(got["uplink"]) == "up target"
    assert fs.orphan_readlink(got["link"]) == "low"
    assert_errno(errno.EINVAL, fs.orphan_readlink, got["a"])
    fs.orphan_link(got["a"], "c")
    assert (env.upper / "c").stat().st_ino == (env.upper / "b").stat().st_ino
    assert (fs.getattr("b").st_nlink, read_all(fs, "c")) == (2, b"linked")
    assert_errno(errno.ENOENT, fs.orphan_link, got["new"], "n2")  # no link left
    assert_errno(errno.ENOENT, fs.orphan_link, got["low"], "l2")  # lower: cannot be copied up any more
    assert_errno(errno.EEXIST, fs.orphan_link, got["a"], "b")
    assert not (env.upper / "n2").exists() and not (env.upper / "l2").exists()
    for orphan in got.values():
        fs.orphan_access(orphan, os.R_OK | os.W_OK)
        orphan.close()

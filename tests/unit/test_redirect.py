"""Redirects (``redirect_dir``) in the core, without FUSE: reading the ones the kernel writes, in the upper
and in lower layers, relative and absolute, and writing them when a directory with a lower copy moves."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support.layers import WHITEOUT, Dir
from unitkit import Env, assert_errno, names, read_all, upper_state, write_file, xattr

REDIRECT = "trusted.overlay.redirect"

BOTTOM = {
    "old/f": "old f\n",
    "old/sub/g": "old sub g\n",
    "far/away/h": "far h\n",
    "keep/k": "k\n",
}


def _redirected(host_dir: Path, value: str) -> None:
    os.setxattr(host_dir, REDIRECT, value.encode(), follow_symlinks=False)


def test_relative_redirect_in_a_lower_layer_leads_to_the_old_name(mkenv: Callable[..., Env]) -> None:
    """A top lower that a kernel wrote (``new`` with redirect ``old``, a whiteout at ``old``) shows the
    bottom's ``old`` under ``new`` only."""
    env = mkenv([{"new": Dir({"own": "own\n"}), "old": WHITEOUT}, BOTTOM])
    _redirected(env.lowers[0] / "new", "old")
    fs = env.open()
    assert sorted(names(fs)) == ["far", "keep", "new"]
    assert sorted(names(fs, "new")) == ["f", "own", "sub"]
    assert read_all(fs, "new/sub/g") == b"old sub g\n"


def test_absolute_redirect_in_the_upper_reaches_any_path(mkenv: Callable[..., Env]) -> None:
    """An upper dir with an absolute redirect merges the lower dir at that path; its own children, copy-up
    of a child from there, and a whiteout below it all work."""
    env = mkenv([BOTTOM], {"keep/moved": Dir({"mine": "mine\n"}), "far": Dir({"away": WHITEOUT})})
    assert env.upper is not None
    _redirected(env.upper / "keep" / "moved", "/far/away")
    fs = env.open()
    assert sorted(names(fs, "keep/moved")) == ["h", "mine"]
    write_file(fs, "keep/moved/h", b"changed\n")
    assert read_all(fs, "keep/moved/h") == b"changed\n"
    assert (env.upper / "keep" / "moved" / "h").read_bytes() == b"changed\n"
    assert (env.lowers[0] / "far" / "away" / "h").read_bytes() == b"far h\n"
    fs.unlink("keep/moved/h")
    assert names(fs, "keep/moved") == ["mine"]


@pytest.mark.parametrize("value", ["a/b", "/far//away", "..", "/far/../keep"])
def test_an_invalid_redirect_is_einval(mkenv: Callable[..., Env], value: str) -> None:
    """A relative redirect with a slash, an empty component, ``.``/``..`` (which could leave the layer) are
    refused, as the kernel refuses them."""
    env = mkenv([BOTTOM], {"d": Dir({"x": "x\n"})})
    assert env.upper is not None
    _redirected(env.upper / "d", value)
    fs = env.open()
    assert_errno(errno.EINVAL, names, fs, "d")


def test_nofollow_refuses_a_redirect_that_finds_a_lower_copy(mkenv: Callable[..., Env]) -> None:
    """``redirect_dir=nofollow``: EPERM where a redirect would lead to a lower copy; nothing without one."""
    env = mkenv([BOTTOM], {"d": Dir({"x": "x\n"}), "e": Dir({"y": "y\n"}), "old": WHITEOUT})
    assert env.upper is not None
    _redirected(env.upper / "d", "old")
    _redirected(env.upper / "e", "missing")
    fs = env.open(redirect_dir="nofollow")
    assert_errno(errno.EPERM, names, fs, "d")
    assert names(fs, "e") == ["y"]
    assert sorted(names(env.remount(fs, redirect_dir="follow"), "d")) == ["f", "sub", "x"]


def test_rename_writes_the_kernels_redirects(mkenv: Callable[..., Env]) -> None:
    """In its parent the old name; across dirs the absolute path of the lower copies (an ancestor's redirect
    standing for its part); a second move in the same parent keeps an absolute one; whiteouts at old names
    that a lower copy has."""
    env = mkenv([BOTTOM])
    assert env.upper is not None
    fs = env.open()
    fs.rename("old", "old2")
    fs.rename("old2/sub", "keep/sub2")
    fs.rename("keep/sub2", "keep/sub3")
    assert xattr(env.upper / "old2", REDIRECT) == b"old"
    assert xattr(env.upper / "keep" / "sub3", REDIRECT) == b"/old/sub"
    state = upper_state(env.upper)
    assert state["old"] == "wh" and state["old2/sub"] == "wh"
    assert "keep/sub2" not in state  # no lower copy has that name: nothing to hide
    assert read_all(fs, "keep/sub3/g") == b"old sub g\n"
    fs = env.remount(fs)
    assert sorted(names(fs)) == ["far", "keep", "old2"]
    assert sorted(names(fs, "keep")) == ["k", "sub3"]
    assert read_all(fs, "keep/sub3/g") == b"old sub g\n"


def test_a_redirect_longer_than_the_kernels_limit_is_exdev(mkenv: Callable[..., Env]) -> None:
    """A move whose absolute redirect would pass 256 bytes answers EXDEV (``mv`` then copies); nothing
    changes."""
    deep = "/".join(["d" * 60] * 5)
    env = mkenv([{f"{deep}/x": "x\n", "to": Dir()}])
    assert env.upper is not None
    fs = env.open()
    before = upper_state(env.upper)
    assert_errno(errno.EXDEV, fs.rename, f"{deep}", "to/moved")
    assert upper_state(env.upper) == before


def test_off_still_follows_redirects(mkenv: Callable[..., Env]) -> None:
    """``off`` reads redirects (the kernel built with redirect_always_follow, Debian's) but moves no dir."""
    env = mkenv([{"new": Dir({"own": "own\n"}), "old": WHITEOUT}, BOTTOM])
    _redirected(env.lowers[0] / "new", "old")
    fs = env.open(redirect_dir="off")
    assert sorted(names(fs, "new")) == ["f", "own", "sub"]
    assert_errno(errno.EXDEV, fs.rename, "keep", "keep2")


def test_an_absolute_search_walks_the_parents_as_the_kernel_does(mkenv: Callable[..., Env]) -> None:
    """In a middle layer, a parent with a relative redirect rewrites the path for the layers below, an opaque
    parent ends the search after its layer, a whiteout parent ends it at once."""
    middle = {"p2": Dir({"t": Dir({"mid": "mid\n"})}), "o": Dir({"t": Dir({"o-mid": "o\n"})}, opaque=True),
              "w": WHITEOUT}
    bottom = {"p/t/deep": "deep\n", "o/t/below-opaque": "hidden\n", "w/t/below-whiteout": "hidden\n"}
    env = mkenv([middle, bottom], {"a": Dir({"own": "1\n"}), "b": Dir(), "c": Dir()})
    assert env.upper is not None
    _redirected(env.lowers[0] / "p2", "p")
    for name, target in (("a", "/p2/t"), ("b", "/o/t"), ("c", "/w/t")):
        _redirected(env.upper / name, target)
    fs = env.open()
    assert sorted(names(fs, "a")) == ["deep", "mid", "own"]
    assert names(fs, "b") == ["o-mid"]
    assert names(fs, "c") == []


def test_a_listings_attributes_below_a_renamed_dir_come_from_where_the_layers_hold_them(
        mkenv: Callable[..., Env]) -> None:
    """``getattr_children`` (READDIRPLUS) below a directory with a redirect reads the lower objects at the
    old path, as ``getattr`` does: every listed name has attributes, the same ones."""
    env = mkenv([BOTTOM], {"keep/moved": Dir({"mine": "mine\n"}), "far": Dir({"away": WHITEOUT})})
    assert env.upper is not None
    _redirected(env.upper / "keep" / "moved", "/far/away")
    _redirected(env.upper / "keep", "old")  # and its parent is a renamed directory too
    fs = env.open()
    for directory in ("keep", "keep/moved"):
        listed = names(fs, directory)
        got = fs.getattr_children(directory, listed)
        assert all(a is not None for a in got), (directory, listed, got)
        expected = [fs.getattr(f"{directory}/{n}") for n in listed]
        # a directory is read to learn whether it is merged, which may move its atime between two stats
        assert [a.replace(st_atime_ns=0) for a in got if a is not None] == \
            [a.replace(st_atime_ns=0) for a in expected]
    assert sorted(names(fs, "keep")) == ["f", "moved", "sub"]

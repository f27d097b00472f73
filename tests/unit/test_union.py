"""UnionFS operations without FUSE: visible results, errnos, and what lands in the upper dir (either whiteout
format), checked against the kernel overlayfs's semantics (docs/architecture.md, "Semantics in brief")."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

import pytest
from support.layers import WHITEOUT, Dir, File, Symlink
from unitkit import (
    Env,
    assert_errno,
    create_file,
    host_tree,
    names,
    read_all,
    staging_entries,
    upper_state,
    visible_tree,
    write_file,
    xattr,
)

from unionfs.fs.attr import Attr
from unionfs.fs.fsio import RENAME_EXCHANGE, RENAME_NOREPLACE
from unionfs.fs.union import UnionFS

TOP = {
    "a": "top a\n",
    "d/f": File("top d/f\n", xattrs={"user.old": b"old"}),
    "d/sub/x": "x\n",
    "e": {},
    "only-top": "t\n",
    "link": Symlink("a"),
}
BOTTOM = {
    "a": "bottom a\n",
    "b": "bottom b\n",
    "d/g": "bottom d/g\n",
    "m/y": "y\n",
    "e/gone": WHITEOUT,
}
LONG = "n" * 256
MAX = "m" * 255


@pytest.fixture(params=["kernel", "oci"])
def fmt(request: pytest.FixtureRequest) -> str:
    """The whiteout format the union writes (layers are built in the same format)."""
    return str(request.param)


@pytest.fixture
def union(mkenv: Callable[..., Env], fmt: str) -> Callable[..., tuple[Env, UnionFS]]:
    """``union(lowers=[TOP, BOTTOM], upper=None)`` → (env, a UnionFS writing ``fmt`` whiteouts)."""
    def make(lowers: Any = None, upper: Any = None, **options: Any) -> tuple[Env, UnionFS]:
        env = mkenv(lowers if lowers is not None else [TOP, BOTTOM], upper, fmt=fmt)
        return env, env.open(whiteout=fmt, **options)
    return make


def clean(env: Env) -> None:
    """Nothing may be left in workdir/work after an operation."""
    assert staging_entries(env) == []


# ============================================================ read-only stacks

WRITE_OPS: dict[str, Callable[[UnionFS], object]] = {
    "create": lambda fs: fs.create("new", os.O_WRONLY | os.O_CREAT, 0o644),
    "mkdir": lambda fs: fs.mkdir("newdir", 0o755),
    "mknod": lambda fs: fs.mknod("fifo", stat.S_IFIFO | 0o644, 0),
    "symlink": lambda fs: fs.symlink("a", "newlink"),
    "link": lambda fs: fs.link("a", "hard"),
    "unlink": lambda fs: fs.unlink("a"),
    "rmdir": lambda fs: fs.rmdir("e"),
    "rename": lambda fs: fs.rename("a", "renamed"),
    "rename-dir": lambda fs: fs.rename("e", "e2"),
    "chmod": lambda fs: fs.chmod("a", 0o600),
    "chown": lambda fs: fs.chown("a", 1, 1),
    "utimens": lambda fs: fs.utimens("a", 0, 0),
    "truncate": lambda fs: fs.truncate("a", 0),
    "open-wronly": lambda fs: fs.open("a", os.O_WRONLY),
    "open-rdwr": lambda fs: fs.open("a", os.O_RDWR),
    "open-trunc": lambda fs: fs.open("a", os.O_RDONLY | os.O_TRUNC),
    "setxattr": lambda fs: fs.setxattr("a", "user.x", b"1", 0),
    "removexattr": lambda fs: fs.removexattr("d/f", "user.old"),
    "access-w": lambda fs: fs.access("a", os.W_OK),
}


@pytest.mark.parametrize("op", WRITE_OPS)
def test_read_only_union_answers_erofs_to_every_write(mkenv: Callable[..., Env], op: str) -> None:
    """Without an upper every modifying operation is EROFS, and the lowers stay exactly as they were."""
    env = mkenv([TOP, BOTTOM], readonly=True)
    before = [host_tree(p) for p in env.lowers]
    fs = env.open()
    assert_errno(errno.EROFS, WRITE_OPS[op], fs)
    assert [host_tree(p) for p in env.lowers] == before
    assert read_all(fs, "a") == b"top a\n"


def test_read_only_union_reads_normally(mkenv: Callable[..., Env]) -> None:
    env = mkenv([TOP, BOTTOM], readonly=True)
    fs = env.open()
    assert names(fs) == ["a", "b", "d", "e", "link", "m", "only-top"]
    assert names(fs, "d") == ["f", "g", "sub"]
    assert fs.getxattr("d/f", "user.old") == b"old"
    fs.access("a", os.R_OK)
    assert fs.statfs()["f_namemax"] >= 255


# ============================================================ unlink

def test_unlink_lower_file_writes_a_whiteout(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Unlinking a name a lower layer has leaves a whiteout; the name is gone (ENOENT, not listed), and a
    name further below (bottom's ``a``) does not reappear."""
    env, fs = union()
    fs.unlink("a")
    fs.unlink("d/g")
    assert_errno(errno.ENOENT, fs.getattr, "a")
    assert_errno(errno.ENOENT, fs.open, "a", os.O_RDONLY)
    assert_errno(errno.ENOENT, fs.unlink, "a")
    assert "a" not in names(fs)
    assert names(fs, "d") == ["f", "sub"]
    assert upper_state(env.upper) == {"a": "wh", "d": "dir", "d/g": "wh"}  # type: ignore[arg-type]
    clean(env)
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert "a" not in names(fs2) and names(fs2, "d") == ["f", "sub"]


def test_unlink_upper_only_file_leaves_no_whiteout(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A file that exists only in the upper is simply removed: no whiteout, in the root or a merged dir."""
    env, fs = union()
    create_file(fs, "new", b"n")
    create_file(fs, "d/new", b"n")
    fs.mkdir("e/newdir", 0o755)
    fs.unlink("new")
    fs.unlink("d/new")
    fs.rmdir("e/newdir")
    assert upper_state(env.upper) == {"d": "dir", "e": "dir"}  # type: ignore[arg-type]
    clean(env)


def test_no_whiteout_for_a_name_already_whited_out_below(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """``e/gone`` is whited out inside the bottom layer: recreating and deleting it needs no new whiteout."""
    env, fs = union()
    assert names(fs, "e") == []
    create_file(fs, "e/gone", b"back")
    assert names(fs, "e") == ["gone"]
    fs.unlink("e/gone")
    assert upper_state(env.upper) == {"e": "dir"}  # type: ignore[arg-type]


def test_no_whiteout_inside_an_opaque_directory(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Inside a recreated (opaque) directory the lowers' names are hidden already: deleting a new file of the
    same name as a lower one writes no whiteout."""
    env, fs = union()
    for child in ("f", "g", "sub/x"):
        fs.unlink(f"d/{child}")
    fs.rmdir("d/sub")
    fs.rmdir("d")
    fs.mkdir("d", 0o755)
    create_file(fs, "d/f", b"new")
    fs.unlink("d/f")
    assert upper_state(env.upper) == {"d": "dir+opaque"}  # type: ignore[arg-type]
    clean(env)


def test_unlink_upper_copy_of_a_lower_file_whites_it_out(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """After copy-up, unlink removes the upper copy and hides the lower one."""
    env, fs = union()
    write_file(fs, "a", b"changed")
    fs.unlink("a")
    assert_errno(errno.ENOENT, fs.getattr, "a")
    assert upper_state(env.upper) == {"a": "wh"}  # type: ignore[arg-type]


def test_unlink_errors(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """EISDIR for a directory, ENOENT for a missing name, ENOTDIR through a file."""
    env, fs = union()
    assert_errno(errno.EISDIR, fs.unlink, "d")
    assert_errno(errno.ENOENT, fs.unlink, "missing")
    assert_errno(errno.ENOENT, fs.unlink, "missing/child")
    assert_errno(errno.ENOTDIR, fs.unlink, "a/child")
    assert os.listdir(env.upper) == []  # type: ignore[arg-type]


def test_unlink_symlink_removes_the_link_not_its_target(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    _env, fs = union()
    fs.unlink("link")
    assert read_all(fs, "a") == b"top a\n"
    assert_errno(errno.ENOENT, fs.getattr, "link")


def test_open_handle_survives_unlink(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A file open for reading can still be read and fstat'ed after its name was unlinked."""
    _env, fs = union()
    handle = fs.open("a", os.O_RDONLY)
    try:
        fs.unlink("a")
        assert fs.read(handle, 100, 0) == b"top a\n"
        assert fs.fgetattr(handle).st_size == 6
    finally:
        fs.release(handle)


def test_read_cached_answers_what_the_page_cache_holds_and_stops_at_the_end(
        union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A read from the page cache alone: the bytes read() gives (the file was just read, so it is cached),
    a short count only at the end of the file, 0 beyond it."""
    _env, fs = union()
    handle = fs.open("a", os.O_RDONLY)
    try:
        assert fs.read(handle, 100, 0) == b"top a\n"  # now in the page cache
        buffer = memoryview(bytearray(100))
        assert fs.read_cached(handle, buffer, 0) == 6
        assert bytes(buffer[:6]) == b"top a\n"
        assert fs.read_cached(handle, buffer[:3], 4) == 2
        assert bytes(buffer[:2]) == b"a\n"
        assert fs.read_cached(handle, buffer, 50) == 0
    finally:
        fs.release(handle)


# ============================================================ rmdir

def test_rmdir_non_empty_is_enotempty(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A directory with entries in any layer is not empty; neither is one whose only entry is upper."""
    _env, fs = union()
    assert_errno(errno.ENOTEMPTY, fs.rmdir, "d")
    assert_errno(errno.ENOTEMPTY, fs.rmdir, "m")
    assert_errno(errno.ENOTEMPTY, fs.rmdir, "d/sub")
    create_file(fs, "e/x")
    assert_errno(errno.ENOTEMPTY, fs.rmdir, "e")
    assert names(fs, "d") == ["f", "g", "sub"]


def test_rmdir_after_emptying_a_merged_dir(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A merged dir that only looks empty (its entries are whited out) can be removed: a single whiteout
    replaces the upper copy with its whiteouts inside, the lowers' subtrees are gone."""
    env, fs = union()
    fs.unlink("d/f")
    fs.unlink("d/g")
    fs.unlink("d/sub/x")
    fs.rmdir("d/sub")
    assert names(fs, "d") == []
    fs.rmdir("d")
    assert_errno(errno.ENOENT, fs.getattr, "d")
    assert_errno(errno.ENOENT, fs.getattr, "d/f")
    assert_errno(errno.ENOENT, fs.readdir, "d")
    assert "d" not in names(fs)
    assert upper_state(env.upper) == {"d": "wh"}  # type: ignore[arg-type]
    clean(env)


def test_rmdir_of_lower_and_upper_only_dirs(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """An empty lower dir leaves a whiteout; an upper-only dir leaves nothing."""
    env, fs = union()
    fs.rmdir("e")
    fs.mkdir("fresh", 0o755)
    fs.mkdir("fresh/inner", 0o755)
    fs.rmdir("fresh/inner")
    fs.rmdir("fresh")
    assert upper_state(env.upper) == {"e": "wh"}  # type: ignore[arg-type]
    assert "e" not in names(fs) and "fresh" not in names(fs)
    clean(env)


def test_rmdir_errors(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """ENOTDIR for a file or symlink, ENOENT for a missing name, EBUSY for the root."""
    _env, fs = union()
    assert_errno(errno.ENOTDIR, fs.rmdir, "a")
    assert_errno(errno.ENOTDIR, fs.rmdir, "link")
    assert_errno(errno.ENOENT, fs.rmdir, "missing")
    assert_errno(errno.EBUSY, fs.rmdir, "")


# ============================================================ creating

@pytest.mark.parametrize("redirect_dir", ["on", "off"])
def test_mkdir_create_symlink_mknod(union: Callable[..., tuple[Env, UnionFS]], redirect_dir: str) -> None:
    """New objects appear with the type, mode and owner asked for, in the upper, inside merged dirs too; a
    new dir in a merged dir is opaque with redirect_dir=on only, as the kernel marks it."""
    env, fs = union(redirect_dir=redirect_dir)
    fs.mkdir("d/newdir", 0o700, 1000, 1000)
    create_file(fs, "d/newdir/file", b"content", 0o640)
    fs.symlink("../a", "d/sl")
    fs.mknod("d/fifo", stat.S_IFIFO | 0o600, 0)
    attrs = fs.getattr("d/newdir")
    assert stat.S_ISDIR(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o700
    assert (attrs.st_uid, attrs.st_gid) == (1000, 1000)
    assert read_all(fs, "d/newdir/file") == b"content"
    assert fs.readlink("d/sl") == "../a"
    assert stat.S_ISFIFO(fs.getattr("d/fifo").st_mode)
    assert names(fs, "d") == ["f", "fifo", "g", "newdir", "sl", "sub"]
    assert upper_state(env.upper) == {  # type: ignore[arg-type]
        "d": "dir", "d/newdir": "dir+opaque" if redirect_dir == "on" else "dir", "d/newdir/file": "file",
        "d/sl": "symlink", "d/fifo": "other"}
    clean(env)


CREATORS: dict[str, Callable[[UnionFS, str], object]] = {
    "mkdir": lambda fs, p: fs.mkdir(p, 0o755),
    "create": lambda fs, p: fs.release(fs.create(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
    "symlink": lambda fs, p: fs.symlink("target", p),
    "mknod": lambda fs, p: fs.mknod(p, stat.S_IFIFO | 0o644, 0),
    "link": lambda fs, p: fs.link("b", p),
}


@pytest.mark.parametrize("op", CREATORS)
def test_creating_over_an_existing_name_is_eexist(union: Callable[..., tuple[Env, UnionFS]], op: str) -> None:
    """EEXIST over a lower file, a lower dir, a merged dir, an upper file, a symlink and the root."""
    env, fs = union()
    create_file(fs, "mine")
    for existing in ("a", "only-top", "e", "d", "m/y", "mine", "link", ""):
        assert_errno(errno.EEXIST, CREATORS[op], fs, existing)
    clean(env)


@pytest.mark.parametrize("op", CREATORS)
def test_creating_under_a_missing_or_non_dir_parent(union: Callable[..., tuple[Env, UnionFS]], op: str) -> None:
    """ENOENT under a missing parent (or a deleted one), ENOTDIR under a file."""
    _env, fs = union()
    fs.unlink("m/y")
    fs.rmdir("m")
    assert_errno(errno.ENOENT, CREATORS[op], fs, "missing/x")
    assert_errno(errno.ENOENT, CREATORS[op], fs, "m/x")
    assert_errno(errno.ENOTDIR, CREATORS[op], fs, "a/x")


@pytest.mark.parametrize("op", CREATORS)
def test_creating_a_256_byte_name_is_enametoolong(union: Callable[..., tuple[Env, UnionFS]], op: str) -> None:
    """NAME_MAX is 255 bytes: 256 is ENAMETOOLONG (never ENOENT), 255 works."""
    env, fs = union()
    assert_errno(errno.ENAMETOOLONG, CREATORS[op], fs, LONG)
    assert_errno(errno.ENAMETOOLONG, CREATORS[op], fs, f"d/{LONG}")
    CREATORS[op](fs, MAX)
    assert MAX in names(fs)
    clean(env)


def test_rename_to_a_256_byte_name_is_enametoolong(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    _env, fs = union()
    assert_errno(errno.ENAMETOOLONG, fs.rename, "a", LONG)
    assert_errno(errno.ENAMETOOLONG, fs.rename, "a", f"d/{LONG}")
    fs.rename("a", MAX)
    assert read_all(fs, MAX) == b"top a\n"


def _all_or_nothing(env: Env, fs: UnionFS, op: Callable[[], object], before: dict[str, Any],
                    after_success: Callable[[dict[str, Any]], None]) -> None:
    """Run ``op``: on success ``after_success(tree)`` must hold; on failure the visible tree is ``before``
    (directory attributes aside: copying up the parent is allowed).  Either way the union's view equals a
    fresh union's and work/ is empty."""
    def shape(tree: dict[str, Any]) -> dict[str, Any]:
        return {p: row[0] if row[0] == stat.S_IFDIR else row for p, row in tree.items()}

    try:
        op()
    except OSError:
        assert shape(visible_tree(fs, inodes=False)) == shape(before), "a failed operation changed the tree"
    else:
        after_success(visible_tree(fs, inodes=False))
    clean(env)
    seen = visible_tree(fs, inodes=False, dir_nlink=False)
    assert visible_tree(env.remount(fs, whiteout="oci"), inodes=False, dir_nlink=False) == seen


@pytest.mark.parametrize("op", ["unlink", "rmdir", "rename"])
def test_oci_format_with_a_name_too_long_for_its_whiteout(mkenv: Callable[..., Env], op: str) -> None:
    """In the OCI format a lower name of 255 bytes cannot get a ``.wh.`` whiteout (259 bytes).  Removing or
    renaming it must then fail cleanly (or succeed completely): never half done."""
    name = "n" * 255
    env = mkenv([{name: "lower", "d": {name: {}}}], fmt="oci")
    fs = env.open(whiteout="oci")
    before = visible_tree(fs, inodes=False)

    def gone(tree: dict[str, Any]) -> None:
        assert name not in tree and f"d/{name}" not in tree

    if op == "unlink":
        _all_or_nothing(env, fs, lambda: fs.unlink(name), before, gone)
    elif op == "rmdir":
        _all_or_nothing(env, fs, lambda: fs.rmdir(f"d/{name}"), before, gone)
    else:
        _all_or_nothing(env, fs, lambda: fs.rename(name, "x"),
                        before, lambda tree: (gone(tree), tree["x"][5] == b"lower"))


LOOKUPS: dict[str, Callable[[UnionFS, str], object]] = {
    "getattr": lambda fs, p: fs.getattr(p),
    "open": lambda fs, p: fs.open(p, os.O_RDONLY),
    "readdir": lambda fs, p: fs.readdir(p),
    "unlink": lambda fs, p: fs.unlink(p),
    "rmdir": lambda fs, p: fs.rmdir(p),
    "chmod": lambda fs, p: fs.chmod(p, 0o644),
    "rename-src": lambda fs, p: fs.rename(p, "x"),
}


@pytest.mark.parametrize("op", LOOKUPS)
def test_looking_up_a_256_byte_name_is_enametoolong(union: Callable[..., tuple[Env, UnionFS]], op: str) -> None:
    """Any operation on a 256-byte name answers ENAMETOOLONG, as the kernel's lookup does (pjdfstest checks
    it for stat, open, unlink, rmdir, chmod, rename …)."""
    _env, fs = union()
    assert_errno(errno.ENAMETOOLONG, LOOKUPS[op], fs, LONG)
    assert_errno(errno.ENAMETOOLONG, LOOKUPS[op], fs, f"d/{LONG}")


def test_create_returns_a_usable_handle(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """The handle of create() writes the new file; its inode number is the one getattr reports."""
    _env, fs = union()
    handle = fs.create("d/new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fs.write(handle, b"hello", 0)
        assert fs.read(handle, 10, 0) == b"hello"
        assert handle.ino == fs.getattr("d/new").st_ino
        fs.ftruncate(handle, 2)
        fs.fsync(handle, False)
        assert fs.fgetattr(handle).st_size == 2
    finally:
        fs.release(handle)
    assert read_all(fs, "d/new") == b"he"


# ============================================================ delete + recreate

def test_delete_and_recreate_a_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A recreated name shows only the new file: new data, new mode, none of the old xattrs, no whiteout."""
    env, fs = union()
    fs.unlink("d/f")
    create_file(fs, "d/f", b"fresh", 0o600)
    assert read_all(fs, "d/f") == b"fresh"
    assert stat.S_IMODE(fs.getattr("d/f").st_mode) == 0o600
    assert fs.listxattr("d/f") == []
    assert_errno(errno.ENODATA, fs.getxattr, "d/f", "user.old")
    assert upper_state(env.upper) == {"d": "dir", "d/f": "file"}  # type: ignore[arg-type]
    clean(env)
    assert read_all(env.remount(fs, whiteout=fs.upper.writer.format.value), "d/f") == b"fresh"  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["symlink", "mkdir", "mknod"])
def test_delete_a_file_and_recreate_another_type(union: Callable[..., tuple[Env, UnionFS]], kind: str) -> None:
    """A whited-out file name can be reused for any type; nothing of the lower file shows."""
    env, fs = union()
    fs.unlink("a")
    CREATORS[kind](fs, "a")
    attrs = fs.getattr("a")
    expected = {"symlink": stat.S_IFLNK, "mkdir": stat.S_IFDIR, "mknod": stat.S_IFIFO}[kind]
    assert stat.S_IFMT(attrs.st_mode) == expected
    if kind == "mkdir":
        assert names(fs, "a") == []
    assert "a" not in {k for k, v in upper_state(env.upper).items() if v == "wh"}  # type: ignore[arg-type]
    clean(env)


def test_delete_and_recreate_a_directory_makes_it_opaque(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """rmdir of an (emptied) lower dir then mkdir gives an empty, opaque directory: the lower children never
    come back, not even after a remount."""
    env, fs = union()
    fs.unlink("m/y")
    fs.rmdir("m")
    fs.mkdir("m", 0o711)
    assert names(fs, "m") == []
    assert_errno(errno.ENOENT, fs.getattr, "m/y")
    assert stat.S_IMODE(fs.getattr("m").st_mode) == 0o711
    assert upper_state(env.upper) == {"m": "dir+opaque"}  # type: ignore[arg-type]
    create_file(fs, "m/new", b"n")
    assert names(fs, "m") == ["new"]
    clean(env)
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert names(fs2, "m") == ["new"]
    assert_errno(errno.ENOENT, fs2.getattr, "m/y")


def test_delete_a_directory_and_recreate_a_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    fs.rmdir("e")
    create_file(fs, "e", b"now a file")
    assert read_all(fs, "e") == b"now a file"
    assert upper_state(env.upper) == {"e": "file"}  # type: ignore[arg-type]


def test_recreated_directory_in_a_nested_lower_dir(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Deep: d/sub removed and recreated is opaque; its parent d stays merged."""
    env, fs = union()
    fs.unlink("d/sub/x")
    fs.rmdir("d/sub")
    fs.mkdir("d/sub", 0o755)
    assert names(fs, "d/sub") == []
    assert names(fs, "d") == ["f", "g", "sub"]
    assert upper_state(env.upper) == {"d": "dir", "d/sub": "dir+opaque"}  # type: ignore[arg-type]


# ============================================================ rename

def test_rename_lower_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A lower file renamed: the new name has its data and inode number, the old name is whited out."""
    env, fs = union()
    ino = fs.getattr("d/f").st_ino
    fs.rename("d/f", "moved")
    assert_errno(errno.ENOENT, fs.getattr, "d/f")
    assert read_all(fs, "moved") == b"top d/f\n"
    assert fs.getattr("moved").st_ino == ino
    assert fs.getxattr("moved", "user.old") == b"old"
    assert names(fs, "d") == ["g", "sub"]
    assert upper_state(env.upper) == {"d": "dir", "d/f": "wh", "moved": "file"}  # type: ignore[arg-type]
    clean(env)


def test_rename_upper_only_file_leaves_no_whiteout(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    create_file(fs, "new", b"n")
    fs.rename("new", "d/new2")
    assert upper_state(env.upper) == {"d": "dir", "d/new2": "file"}  # type: ignore[arg-type]
    assert read_all(fs, "d/new2") == b"n"


def test_rename_over_an_existing_lower_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Replacing a lower file: the destination shows the source's data; both lower copies stay hidden."""
    env, fs = union()
    fs.rename("only-top", "a")
    assert read_all(fs, "a") == b"t\n"
    assert "only-top" not in names(fs)
    assert upper_state(env.upper) == {"a": "file", "only-top": "wh"}  # type: ignore[arg-type]
    clean(env)


def test_rename_onto_a_whited_out_name(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Renaming onto a deleted lower name replaces the whiteout with the file."""
    env, fs = union()
    fs.unlink("a")
    create_file(fs, "src", b"s")
    fs.rename("src", "a")
    assert read_all(fs, "a") == b"s"
    assert upper_state(env.upper) == {"a": "file"}  # type: ignore[arg-type]
    clean(env)


def test_rename_whited_out_onto_whited_out(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Lower file onto a deleted lower name: both names need a whiteout / the file."""
    env, fs = union()
    fs.unlink("a")
    fs.rename("b", "a")
    assert read_all(fs, "a") == b"bottom b\n"
    assert_errno(errno.ENOENT, fs.getattr, "b")
    assert upper_state(env.upper) == {"a": "file", "b": "wh"}  # type: ignore[arg-type]
    clean(env)


def test_rename_upper_dir_with_contents(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A pure-upper directory renames normally, contents included; no whiteout at its old name. Moved into
    a merged dir (``d`` is in a lower layer) it is marked opaque, as the kernel marks it, although no lower
    layer has ``d/u2``."""
    env, fs = union()
    fs.mkdir("u", 0o755)
    create_file(fs, "u/inner", b"i")
    fs.rename("u", "d/u2")
    assert read_all(fs, "d/u2/inner") == b"i"
    assert_errno(errno.ENOENT, fs.getattr, "u")
    assert_errno(errno.ENOENT, fs.getattr, "u/inner")
    assert upper_state(env.upper) == {  # type: ignore[arg-type]
        "d": "dir", "d/u2": "dir+opaque", "d/u2/inner": "file"}
    clean(env)


def test_rename_upper_dir_within_a_dir_that_is_not_merged_leaves_it_unmarked(
        union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Only a merged parent makes a moved dir opaque: inside a pure-upper dir a rename (or exchange) of a
    pure-upper dir writes no mark.  (redirect_dir=off: with on, ``p`` itself is made opaque in the merged
    root.)"""
    env, fs = union(redirect_dir="off")
    fs.mkdir("p", 0o755)
    fs.mkdir("p/q", 0o755)
    fs.mkdir("p/r", 0o755)
    fs.rename("p/q", "p/q2")
    fs.rename("p/r", "p/q2", RENAME_EXCHANGE)
    assert names(fs, "p") == ["q2", "r"]
    assert upper_state(env.upper) == {"p": "dir", "p/q2": "dir", "p/r": "dir"}  # type: ignore[arg-type]
    clean(env)


def test_rename_upper_dir_onto_an_empty_lower_dir_makes_it_opaque(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A pure-upper dir replacing an empty lower dir must hide what the lowers may hold there: opaque."""
    env, fs = union()
    fs.mkdir("u", 0o755)
    create_file(fs, "u/inner", b"i")
    fs.rename("u", "e")
    assert names(fs, "e") == ["inner"]
    assert upper_state(env.upper) == {"e": "dir+opaque", "e/inner": "file"}  # type: ignore[arg-type]
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert names(fs2, "e") == ["inner"]


def test_rename_recreated_opaque_dir_away(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A dir recreated over a deleted lower dir holds nothing of the lowers, so it may move: the old name
    gets a whiteout, the lower dir stays hidden."""
    env, fs = union()
    fs.rmdir("e")
    fs.mkdir("e", 0o755)
    create_file(fs, "e/n", b"n")
    fs.rename("e", "e2")
    assert names(fs, "e2") == ["n"]
    assert_errno(errno.ENOENT, fs.getattr, "e")
    state = upper_state(env.upper)  # type: ignore[arg-type]
    assert state["e"] == "wh" and state["e2/n"] == "file"
    clean(env)


@pytest.mark.parametrize("src", ["e", "d", "d/sub", "m"])
@pytest.mark.parametrize("mode", ["off", "follow", "nofollow"])
def test_rename_of_a_lower_or_merged_dir_is_exdev(union: Callable[..., tuple[Env, UnionFS]], src: str,
                                                  mode: str) -> None:
    """A directory that exists in a lower layer (alone or merged with an upper copy) answers EXDEV, as the
    kernel does without redirect_dir=on; nothing changes."""
    env, fs = union(redirect_dir=mode)
    create_file(fs, "d/upper-child")  # d is now merged (upper + lowers)
    before = upper_state(env.upper)  # type: ignore[arg-type]
    assert_errno(errno.EXDEV, fs.rename, src, "elsewhere")
    assert_errno(errno.EXDEV, fs.rename, src, "m" if src != "m" else "d")  # EXDEV before ENOTEMPTY
    assert upper_state(env.upper) == before  # type: ignore[arg-type]
    assert src.rsplit("/", 1)[-1] in names(fs, src.rpartition("/")[0])
    clean(env)


def test_rename_errors(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """EISDIR file onto dir, ENOTDIR dir onto file, ENOTEMPTY onto a non-empty dir, EINVAL into itself,
    ENOENT missing source or destination parent, EEXIST with RENAME_NOREPLACE, EBUSY for the root."""
    env, fs = union()
    fs.mkdir("u", 0o755)
    fs.mkdir("u/sub", 0o755)
    assert_errno(errno.EISDIR, fs.rename, "a", "e")
    assert_errno(errno.ENOTDIR, fs.rename, "u", "a")
    assert_errno(errno.ENOTEMPTY, fs.rename, "u", "d")
    assert_errno(errno.ENOTEMPTY, fs.rename, "u/sub", "m")
    assert_errno(errno.EINVAL, fs.rename, "u", "u/sub/inside")
    assert_errno(errno.ENOENT, fs.rename, "missing", "x")
    assert_errno(errno.ENOENT, fs.rename, "a", "missing/x")
    assert_errno(errno.ENOTDIR, fs.rename, "a", "b/x")
    assert_errno(errno.EEXIST, fs.rename, "a", "b", RENAME_NOREPLACE)
    assert_errno(errno.EBUSY, fs.rename, "", "x")
    assert read_all(fs, "a") == b"top a\n" and read_all(fs, "b") == b"bottom b\n"
    clean(env)


def test_rename_noreplace_to_a_free_name(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    _env, fs = union()
    fs.rename("a", "free", RENAME_NOREPLACE)
    assert read_all(fs, "free") == b"top a\n"


def test_rename_exchange_swaps_two_lower_files(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """RENAME_EXCHANGE swaps two names: data and inode numbers travel with the objects, both names stay
    (copied up, no whiteout), and a remount sees the same."""
    env, fs = union()
    ino_a, ino_b = fs.getattr("a").st_ino, fs.getattr("d/g").st_ino
    fs.rename("a", "d/g", RENAME_EXCHANGE)
    assert read_all(fs, "a") == b"bottom d/g\n" and read_all(fs, "d/g") == b"top a\n"
    assert fs.getattr("a").st_ino == ino_b and fs.getattr("d/g").st_ino == ino_a
    assert upper_state(env.upper) == {"a": "file", "d": "dir", "d/g": "file"}  # type: ignore[arg-type]
    clean(env)
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert read_all(fs2, "a") == b"bottom d/g\n" and fs2.getattr("a").st_ino == ino_b


def test_rename_exchange_of_an_upper_dir_and_a_lower_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A pure-upper directory exchanged with a lower file takes a name a lower layer has: it becomes opaque."""
    env, fs = union()
    fs.mkdir("u", 0o755)
    create_file(fs, "u/inner", b"i")
    fs.rename("u", "b", RENAME_EXCHANGE)
    assert names(fs, "b") == ["inner"]
    assert read_all(fs, "u") == b"bottom b\n"
    assert upper_state(env.upper) == {"b": "dir+opaque", "b/inner": "file", "u": "file"}  # type: ignore[arg-type]
    clean(env)


def test_rename_exchange_errors(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """Both names must exist (ENOENT); a lower or merged directory is EXDEV as for rename (without
    redirect_dir=on); a directory cannot be swapped into its own subtree (EINVAL); EXCHANGE with NOREPLACE is
    EINVAL; nothing changes."""
    env, fs = union(redirect_dir="off")
    fs.mkdir("u", 0o755)
    fs.mkdir("u/sub", 0o755)
    assert_errno(errno.ENOENT, fs.rename, "a", "missing", RENAME_EXCHANGE)
    assert_errno(errno.ENOENT, fs.rename, "missing", "a", RENAME_EXCHANGE)
    assert_errno(errno.EXDEV, fs.rename, "e", "a", RENAME_EXCHANGE)
    assert_errno(errno.EXDEV, fs.rename, "a", "d", RENAME_EXCHANGE)
    assert_errno(errno.EINVAL, fs.rename, "u", "u/sub", RENAME_EXCHANGE)
    assert_errno(errno.EINVAL, fs.rename, "a", "b", RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert read_all(fs, "a") == b"top a\n" and read_all(fs, "b") == b"bottom b\n"
    assert upper_state(env.upper) == {"u": "dir", "u/sub": "dir"}  # type: ignore[arg-type]


def test_rename_to_itself_changes_nothing(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    fs.rename("a", "a")
    assert read_all(fs, "a") == b"top a\n"
    assert os.listdir(env.upper) == []  # type: ignore[arg-type]


def test_rename_upper_dir_onto_an_empty_upper_dir(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    fs.mkdir("u", 0o755)
    create_file(fs, "u/f", b"f")
    fs.mkdir("v", 0o755)
    fs.rename("u", "v")
    assert names(fs, "v") == ["f"]
    assert "u" not in names(fs)
    clean(env)


def test_rename_upper_dir_onto_an_emptied_merged_dir(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """The destination looks empty (its lower entries are whited out): it is replaced, opaque."""
    env, fs = union()
    fs.unlink("m/y")
    fs.mkdir("u", 0o755)
    create_file(fs, "u/f", b"f")
    fs.rename("u", "m")
    assert names(fs, "m") == ["f"]
    assert upper_state(env.upper) == {"m": "dir+opaque", "m/f": "file"}  # type: ignore[arg-type]
    clean(env)


# ============================================================ link

def test_link_a_lower_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """link copies the source up first; both names show the same data, st_ino and nlink 2; a write through
    one name shows through the other."""
    env, fs = union()
    ino = fs.getattr("b").st_ino
    fs.link("b", "d/b2")
    for name in ("b", "d/b2"):
        attrs = fs.getattr(name)
        assert attrs.st_nlink == 2
        assert attrs.st_ino == ino
    write_file(fs, "d/b2", b"through the link")
    assert read_all(fs, "b") == b"through the link"
    up = env.upper
    assert up is not None
    assert os.lstat(up / "b").st_ino == os.lstat(up / "d" / "b2").st_ino
    fs.unlink("b")
    assert fs.getattr("d/b2").st_nlink == 1
    assert upper_state(up)["b"] == "wh"
    clean(env)


@pytest.mark.parametrize("src", ["b", "u1"])
def test_rename_onto_another_name_of_the_same_file_does_nothing(union: Callable[..., tuple[Env, UnionFS]],
                                                               src: str) -> None:
    """rename(2): "if oldpath and newpath are existing hard links referring to the same file, rename() does
    nothing, and returns a success status" — both names stay, in this union and after a remount."""
    env, fs = union()
    if src == "u1":
        create_file(fs, "u1", b"upper")
    fs.link(src, "c")
    fs.rename(src, "c")
    assert {src, "c"} <= set(names(fs))
    assert fs.getattr(src).st_nlink == 2
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert {src, "c"} <= set(names(fs2))
    assert upper_state(env.upper)[src] == "file"  # type: ignore[arg-type]


def test_link_errors(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """EPERM for a directory source, ENOENT for a missing one, EEXIST for an existing destination."""
    _env, fs = union()
    assert_errno(errno.EPERM, fs.link, "d", "d2")
    assert_errno(errno.ENOENT, fs.link, "missing", "x")
    assert_errno(errno.EEXIST, fs.link, "a", "b")


def test_link_onto_a_whited_out_name(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    fs.unlink("a")
    fs.link("b", "a")
    assert read_all(fs, "a") == b"bottom b\n"
    assert upper_state(env.upper) == {"a": "file", "b": "file"}  # type: ignore[arg-type]


# ============================================================ metadata

def test_chmod_chown_utimens_truncate(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    fs.chmod("d/f", 0o4711)
    fs.chown("d/f", 123, 456)
    fs.utimens("d/f", 10**9, 2 * 10**9)
    attrs = fs.getattr("d/f")
    assert stat.S_IMODE(attrs.st_mode) == 0o711, "chown clears set-uid (Linux does, for root too)"
    assert (attrs.st_uid, attrs.st_gid) == (123, 456)
    assert (attrs.st_atime_ns, attrs.st_mtime_ns) == (10**9, 2 * 10**9)
    fs.truncate("a", 3)
    assert read_all(fs, "a") == b"top"
    assert_errno(errno.EISDIR, fs.truncate, "d", 0)
    assert_errno(errno.ENOENT, fs.chmod, "missing", 0o600)
    fs.chmod("e", 0o700)
    assert stat.S_IMODE(fs.getattr("e").st_mode) == 0o700
    assert names(fs, "e") == []
    clean(env)


def test_utimens_now_and_omit(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """None sets both to now; UTIME_OMIT keeps a time."""
    _env, fs = union()
    before = fs.getattr("a")
    fs.utimens("a", (1 << 30) - 2, 5 * 10**9)
    attrs = fs.getattr("a")
    assert attrs.st_atime_ns == before.st_atime_ns and attrs.st_mtime_ns == 5 * 10**9
    fs.utimens("a", None, None)
    assert fs.getattr("a").st_mtime_ns > 5 * 10**9


def test_chmod_of_the_root(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    fs.chmod("", 0o750)
    assert stat.S_IMODE(fs.getattr("").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(env.upper).st_mode) == 0o750  # type: ignore[arg-type]


def test_open_errors(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    _env, fs = union()
    assert_errno(errno.EISDIR, fs.open, "d", os.O_WRONLY)
    assert_errno(errno.ENOENT, fs.open, "missing", os.O_RDONLY)
    assert_errno(errno.ENOTDIR, fs.open, "a/x", os.O_RDONLY)
    assert_errno(errno.EINVAL, fs.readlink, "a")


# ============================================================ xattrs

def test_xattrs_through_the_union(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """user.* xattrs can be set, read, listed, removed; the overlay-private namespaces are refused (EPERM to
    set, ENODATA to read/remove) and never listed; removing a missing xattr of a lower file copies nothing
    up."""
    env, fs = union()
    assert_errno(errno.ENODATA, fs.removexattr, "a", "user.none")
    assert os.listdir(env.upper) == []  # type: ignore[arg-type]
    fs.setxattr("a", "user.k", b"v", 0)
    assert fs.getxattr("a", "user.k") == b"v"
    assert fs.listxattr("a") == ["user.k"]
    fs.removexattr("a", "user.k")
    assert fs.listxattr("a") == []
    for private in ("user.overlay.x", "trusted.unionfs.origin", "user.unionfs.x", "user.fuseoverlayfs.opaque"):
        assert_errno(errno.EPERM, fs.setxattr, "a", private, b"y", 0)
        assert_errno(errno.ENODATA, fs.getxattr, "a", private)
        assert_errno(errno.ENODATA, fs.removexattr, "a", private)
    assert fs.listxattr("a") == []


def test_the_umask_given_applies_unless_the_parent_has_a_default_acl(
        union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """With POSIX ACLs on, the kernel leaves the umask to the union: create/mkdir/mknod apply it, except in a
    directory whose default ACL decides (the host then applies that ACL, also to what replaces a whiteout)."""
    env, fs = union()
    os.close(fs.create("plain", os.O_WRONLY | os.O_CREAT, 0o666, umask=0o022).fd)
    fs.mkdir("plaindir", 0o777, umask=0o027)
    fs.mknod("fifo", stat.S_IFIFO | 0o666, 0, umask=0o077)
    assert [stat.S_IMODE(os.lstat(env.upper / n).st_mode)  # type: ignore[operator]
            for n in ("plain", "plaindir", "fifo")] == [0o644, 0o750, 0o600]
    default = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in
                                              ((0x01, 7), (0x04, 5), (0x10, 7), (0x20, 5)))
    fs.setxattr("d", "system.posix_acl_default", default, 0)  # copies d up
    os.close(fs.create("d/new", os.O_WRONLY | os.O_CREAT, 0o666, umask=0o022).fd)
    fs.unlink("d/g")
    os.close(fs.create("d/g", os.O_WRONLY | os.O_CREAT, 0o666, umask=0o022).fd)  # over the whiteout
    for name in ("new", "g"):
        assert stat.S_IMODE(os.lstat(env.upper / "d" / name).st_mode) == 0o664  # type: ignore[operator]
    clean(env)


def test_xattr_or_none_is_getxattr_with_none_for_a_missing_attribute(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """``xattr_or_none`` answers what ``getxattr`` answers, None where getxattr says ENODATA (lower, upper and
    private names alike); a missing path is still ENOENT."""
    env, fs = union()
    assert fs.xattr_or_none("a", "user.none") is None
    assert fs.xattr_or_none("a", "trusted.unionfs.origin") is None
    fs.setxattr("a", "user.k", b"v", 0)  # copies "a" up
    assert (env.upper / "a").exists()  # type: ignore[operator]
    assert fs.xattr_or_none("a", "user.k") == fs.getxattr("a", "user.k") == b"v"
    assert fs.xattr_or_none("a", "user.other") is None
    assert_errno(errno.ENODATA, fs.getxattr, "a", "user.other")
    assert_errno(errno.ENOENT, fs.xattr_or_none, "missing", "user.k")


def test_trusted_overlay_xattrs_are_escaped(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """``trusted.overlay.X`` set through the union is stored escaped (``trusted.overlay.overlay.X``, as Linux
    6.7+ does for nested overlays): it reads back under its own name and never acts as a marker in the upper
    (a directory given ``trusted.overlay.opaque=y`` this way stays merged)."""
    env, fs = union()
    fs.setxattr("d", "trusted.overlay.opaque", b"y", 0)
    assert fs.getxattr("d", "trusted.overlay.opaque") == b"y"
    assert fs.listxattr("d") == ["trusted.overlay.opaque"]
    up = env.upper / "d"  # type: ignore[operator]
    assert xattr(up, "trusted.overlay.opaque") is None
    assert xattr(up, "trusted.overlay.overlay.opaque") == b"y"
    assert names(fs, "d") == ["f", "g", "sub"]
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert names(fs2, "d") == ["f", "g", "sub"]
    assert fs2.getxattr("d", "trusted.overlay.opaque") == b"y"
    fs2.removexattr("d", "trusted.overlay.opaque")
    assert fs2.listxattr("d") == []


def test_directory_markers_are_not_xattrs(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """An opaque (recreated) directory lists no xattrs through the union."""
    _env, fs = union()
    fs.rmdir("e")
    fs.mkdir("e", 0o755)
    assert fs.listxattr("e") == []
    assert_errno(errno.ENODATA, fs.getxattr, "e", "trusted.overlay.opaque")


def test_xattrs_on_the_root(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """The union root accepts user.* xattrs like any directory."""
    env, fs = union()
    fs.setxattr("", "user.root", b"r", 0)
    assert fs.getxattr("", "user.root") == b"r"
    assert "user.root" in fs.listxattr("")
    assert os.getxattr(env.upper, "user.root") == b"r"  # type: ignore[arg-type]


# ============================================================ misc

def test_statfs_reports_the_upper_filesystem(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    env, fs = union()
    sv = os.statvfs(env.upper)  # type: ignore[arg-type]
    got = fs.statfs()
    assert got["f_bsize"] == sv.f_bsize and got["f_blocks"] == sv.f_blocks and got["f_namemax"] == 255


def test_constructor_rejects_unknown_whiteout_format(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{}])
    with pytest.raises(ValueError, match="whiteout"):
        env.open(whiteout="aufs")


def test_auto_format_as_root_writes_kernel_whiteouts(mkenv: Callable[..., Env]) -> None:
    """With mknod and trusted xattrs available (root), "auto" chooses the kernel's format."""
    env = mkenv([{"a": "a"}])
    fs = env.open(whiteout="auto")
    fs.unlink("a")
    assert host_tree(env.upper) == {"a": "wh"}  # type: ignore[arg-type]


def test_every_operation_leaves_workdir_empty(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A long mixed sequence; after each step workdir/work is empty and the visible tree equals that of a
    fresh union over the same dirs."""
    env, fs = union()
    steps: list[Callable[[], object]] = [
        lambda: write_file(fs, "d/f", b"changed"),
        lambda: fs.unlink("d/g"),
        lambda: fs.mkdir("d/new", 0o755),
        lambda: create_file(fs, "d/new/x", b"x"),
        lambda: fs.rename("d/new", "moved"),
        lambda: fs.unlink("d/sub/x"),
        lambda: fs.rmdir("d/sub"),
        lambda: fs.mkdir("d/sub", 0o700),
        lambda: fs.link("moved/x", "d/sub/x2"),
        lambda: fs.symlink("moved", "sl"),
        lambda: fs.rename("b", "a"),
        lambda: fs.chmod("m/y", 0o600),
        lambda: fs.truncate("only-top", 1),
        lambda: fs.setxattr("m", "user.m", b"1", 0),
    ]
    for step in steps:
        step()
        clean(env)
    expected = visible_tree(fs)
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert visible_tree(fs2) == expected
    assert_errno(errno.ENOENT, fs2.getattr, "d/sub/x")
    assert names(fs2, "d/sub") == ["x2"]


def test_dir_with_entries_only_in_a_lower_opaque_chain(mkenv: Callable[..., Env]) -> None:
    """An upper copy of a directory that is opaque in the top lower still merges only down to that lower."""
    env = mkenv([{"d": Dir({"a": "a"}, opaque=True)}, {"d/b": "b"}])
    fs = env.open()
    create_file(fs, "d/c", b"c")
    assert names(fs, "d") == ["a", "c"]
    fs2 = env.remount(fs)
    assert names(fs2, "d") == ["a", "c"]


# ============================================================ an upper written in another format

def _upper_with_kernel_whiteouts(mkenv: Callable[..., Env]) -> Env:
    """Lowers TOP/BOTTOM and an upper written in the kernel's format (e.g. by an earlier mount that could use
    it): char 0/0 whiteouts of ``a`` and ``e``, ``m`` opaque by ``trusted.overlay.opaque=y``."""
    upper: dict[str, object] = {"a": WHITEOUT, "e": WHITEOUT, "m": Dir({"new": "n"}, opaque=True)}
    return mkenv([TOP, BOTTOM], upper, fmt="kernel")


@pytest.mark.parametrize("op", ["create", "mkdir", "symlink", "link", "rename"])
def test_oci_writer_recreates_over_kernel_whiteouts(mkenv: Callable[..., Env], op: str) -> None:
    """Whiteouts are read in every format, so a union writing ``.wh.`` files can recreate a name whited out
    by a char 0/0 device; the device disappears from the upper ("recreating a whited-out name removes the
    whiteout") and no ``.wh.`` file is left for it."""
    env = _upper_with_kernel_whiteouts(mkenv)
    fs = env.open(whiteout="oci")
    assert "a" not in names(fs) and "e" not in names(fs) and names(fs, "m") == ["new"]
    if op == "rename":
        fs.rename("b", "a")
    elif op == "link":
        fs.link("b", "a")
    else:
        CREATORS[op](fs, "a")
    assert "a" in names(fs)
    raw = host_tree(env.upper)  # type: ignore[arg-type]
    assert raw.get("a") not in (None, "wh"), raw
    assert ".wh.a" not in raw
    clean(env)
    assert "a" in names(env.remount(fs, whiteout="oci"))


def test_oci_writer_keeps_a_kernel_opaque_dir_opaque(mkenv: Callable[..., Env]) -> None:
    """A directory made opaque by ``trusted.overlay.opaque=y`` stays opaque under a union writing the OCI
    format, while it is changed and after a remount."""
    env = _upper_with_kernel_whiteouts(mkenv)
    fs = env.open(whiteout="oci")
    create_file(fs, "m/more", b"m")
    fs.unlink("m/new")
    assert names(fs, "m") == ["more"]
    fs2 = env.remount(fs, whiteout="oci")
    assert names(fs2, "m") == ["more"]
    assert_errno(errno.ENOENT, fs2.getattr, "m/y")


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_wh_names_in_the_upper_are_markers_whatever_format_is_written(mkenv: Callable[..., Env],
                                                                       fmt: str) -> None:
    """Every layer, the upper included, is read in every format: an upper holding ``.wh.a`` and an opaque
    marker (as fuse-overlayfs writes them unprivileged) hides ``a`` and the lower ``m`` even when the union
    writes the kernel's format."""
    env = mkenv([TOP, BOTTOM], {".wh.a": "", "m/.wh..wh..opq": "", "m/new": "n"}, fmt="kernel")
    fs = env.open(whiteout=fmt)
    assert "a" not in names(fs) and ".wh.a" not in names(fs)
    assert names(fs, "m") == ["new"]
    create_file(fs, "a", b"back again")
    fs2 = env.remount(fs, whiteout=fmt)
    assert read_all(fs2, "a") == b"back again"
    assert names(fs2, "m") == ["new"]


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_names_that_are_markers_cannot_be_created(mkenv: Callable[..., Env], fmt: str) -> None:
    """A file named ``.wh.*`` would read back as a whiteout and hide another name, so creating or renaming
    to one is EPERM in either format, and nothing changes."""
    env = mkenv([TOP, BOTTOM], fmt=fmt)
    fs = env.open(whiteout=fmt)
    for creator in CREATORS.values():
        assert_errno(errno.EPERM, creator, fs, ".wh.a")
        assert_errno(errno.EPERM, creator, fs, "d/.wh..wh..opq")
    assert_errno(errno.EPERM, fs.rename, "b", ".wh.a")
    assert "a" in names(fs) and names(fs, "d") == ["f", "g", "sub"]
    assert os.listdir(env.upper) in ([], ["d"])  # type: ignore[arg-type]
    clean(env)


def test_mknod_of_the_whiteout_device_is_refused(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """A char device 0/0 is the kernel's whiteout: mknod of one is EPERM, as overlayfs answers."""
    env, fs = union()
    assert_errno(errno.EPERM, fs.mknod, "wh", stat.S_IFCHR | 0o644, 0)
    assert host_tree(env.upper) == {}  # type: ignore[arg-type]
    assert_errno(errno.EPERM, fs.mknod, "d/wh", stat.S_IFCHR | 0o644, 0)
    fs.mknod("null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert fs.getattr("null").st_rdev == os.makedev(1, 3)
    assert "wh" not in names(fs)


# ============================================================ inode numbers after rename

def test_renamed_lower_file_keeps_its_inode_number_in_getattr(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """st_ino follows a copied-up file through a rename and a remount."""
    env, fs = union()
    ino = fs.getattr("d/f").st_ino
    fs.rename("d/f", "d/sub/renamed")
    assert fs.getattr("d/sub/renamed").st_ino == ino
    fs2 = env.remount(fs, whiteout=fs.upper.writer.format.value)  # type: ignore[union-attr]
    assert fs2.getattr("d/sub/renamed").st_ino == ino


def test_readdir_inode_of_a_renamed_copied_up_file(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """readdir's d_ino agrees with getattr's st_ino after a copied-up file is renamed (overlayfs keeps them
    consistent; `find`, `ls -i` and readdirplus rely on it)."""
    _env, fs = union()
    ino = fs.getattr("d/f").st_ino
    fs.rename("d/f", "renamed")
    listed = {n: i for n, _k, i in fs.readdir("")}
    assert listed["renamed"] == ino == fs.getattr("renamed").st_ino


# ============================================================ the cache against a fresh union (property)

PROP_LOWERS: list[dict[str, object]] = [
    {"a": "L0 a", "d/f": File("L0 d/f", xattrs={"user.x": b"1"}), "d/s/x": "L0 x", "e": {}, "l": Symlink("a")},
    {"a": "L1 a", "b": "L1 b", "d/g": "L1 g", "d/s/y": "L1 y", "m/z": "L1 z", "e/w": WHITEOUT},
]
PROP_PATHS = ["a", "b", "c", "d", "e", "m", "n", "l", "d/f", "d/g", "d/s", "d/n", "d/s/x", "d/s/y", "d/s/n",
              "e/n", "e/w", "m/z", "m/n", "n/n", "n/n/n", ".wh.a", "d/.wh..wh..opq"]


def _prop_ops() -> Any:
    from hypothesis import strategies as st
    path = st.sampled_from(PROP_PATHS)
    data = st.binary(max_size=8)
    return st.one_of(
        st.tuples(st.just("create"), path, data),
        st.tuples(st.just("write"), path, data),
        st.tuples(st.just("truncate"), path, st.integers(0, 12)),
        st.tuples(st.just("unlink"), path),
        st.tuples(st.just("mkdir"), path),
        st.tuples(st.just("rmdir"), path),
        st.tuples(st.just("rename"), path, path),
        st.tuples(st.just("link"), path, path),
        st.tuples(st.just("symlink"), path),
        st.tuples(st.just("chmod"), path, st.sampled_from([0o600, 0o755])),
        st.tuples(st.just("setxattr"), path, data),
        st.tuples(st.just("removexattr"), path),
        st.tuples(st.just("open-trunc"), path),
        st.tuples(st.just("mknod"), path),
        st.tuples(st.just("rename-noreplace"), path, path),
        st.tuples(st.just("rename-exchange"), path, path),
    )


def _apply(fs: UnionFS, op: tuple[Any, ...]) -> int:
    """Run one generated operation; its errno (0 for success)."""
    kind, path, *rest = op
    try:
        if kind == "create":
            create_file(fs, path, rest[0])
        elif kind == "write":
            write_file(fs, path, rest[0], flags=os.O_WRONLY)
        elif kind == "truncate":
            fs.truncate(path, rest[0])
        elif kind == "unlink":
            fs.unlink(path)
        elif kind == "mkdir":
            fs.mkdir(path, 0o755)
        elif kind == "rmdir":
            fs.rmdir(path)
        elif kind == "rename":
            fs.rename(path, rest[0])
        elif kind == "link":
            fs.link(path, rest[0])
        elif kind == "symlink":
            fs.symlink("target", path)
        elif kind == "chmod":
            fs.chmod(path, rest[0])
        elif kind == "setxattr":
            fs.setxattr(path, "user.p", rest[0], 0)
        elif kind == "removexattr":
            fs.removexattr(path, "user.p")
        elif kind == "open-trunc":
            fs.release(fs.open(path, os.O_WRONLY | os.O_TRUNC))
        elif kind == "mknod":  # a device (1/3, like /dev/null): a fifo would block a later open for writing
            fs.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
        elif kind == "rename-noreplace":
            fs.rename(path, rest[0], RENAME_NOREPLACE)
        elif kind == "rename-exchange":
            fs.rename(path, rest[0], RENAME_EXCHANGE)
    except OSError as exc:
        return exc.errno
    return 0


def _whiteouts_are_needed(env: Env, lowers_only: UnionFS) -> None:
    """Every whiteout in the upper hides a name some lower has, under no opaque upper ancestor."""
    state = upper_state(env.upper)  # type: ignore[arg-type]
    for rel, kind in state.items():
        if kind != "wh":
            continue
        parts = rel.split("/")
        for i in range(1, len(parts)):
            assert state.get("/".join(parts[:i])) != "dir+opaque", f"whiteout {rel} under an opaque dir"
        try:
            lowers_only.getattr(rel)
        except OSError:
            pytest.fail(f"whiteout {rel} hides nothing in the lowers")


def test_cached_union_agrees_with_a_fresh_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Random operation sequences on one long-lived UnionFS: after every step each operation answered the
    same errno as on a fresh union over a copy of the same dirs, the visible trees agree, work/ is empty and
    every whiteout is needed; at the end a fresh UnionFS (a remount) shows the same tree, inode numbers
    and link counts included.  The long-lived union runs with a normal cache or one small enough to evict
    directory tables in the middle of operations."""
    import shutil

    from hypothesis import given
    from hypothesis import strategies as st
    from support.layers import copy_tree
    from unitkit import make_env

    from unionfs.fs.layers import LayerStack

    root = tmp_path_factory.mktemp("prop")
    counter = iter(range(1_000_000))

    @given(fmt=st.sampled_from(["kernel", "oci"]), ops=st.lists(_prop_ops(), max_size=20),
           cache_entries=st.sampled_from([1_000_000, 4]))
    def run(fmt: str, ops: list[tuple[Any, ...]], cache_entries: int) -> None:
        base = root / f"ex{next(counter)}"
        env = make_env(base, PROP_LOWERS, fmt=fmt)
        lowers_only = UnionFS(LayerStack.open(lowers=[str(p) for p in env.lowers], upper=None, work=None))
        try:
            live = env.open(whiteout=fmt, cache_entries=cache_entries)
            for step, op in enumerate(ops):
                twin = Env(base / f"twin{step}", env.lowers)
                twin.base.mkdir()
                twin.upper = copy_tree(env.upper, twin.base / "upper")  # type: ignore[arg-type]
                twin.work = twin.base / "work"
                twin.work.mkdir()
                fresh = twin.open(whiteout=fmt)
                got, want = _apply(live, op), _apply(fresh, op)
                assert got == want, f"{op}: {errno.errorcode.get(got)} on the cached union, " \
                                    f"{errno.errorcode.get(want)} on a fresh one"
                assert staging_entries(env) == [], op
                assert visible_tree(live, inodes=False, dir_nlink=False) == \
                    visible_tree(fresh, inodes=False, dir_nlink=False), op
                twin.close_all()
                shutil.rmtree(twin.base)
                _whiteouts_are_needed(env, lowers_only)
            before = visible_tree(live, readdir_inodes=False)
            after = visible_tree(env.remount(live, whiteout=fmt), readdir_inodes=False)
            assert after == before
        finally:
            lowers_only.close()
            env.close_all()
            shutil.rmtree(base)

    run()


# ============================================================ owners, set-gid directories

def test_new_objects_in_a_setgid_dir_inherit_its_group(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    """In a set-gid directory (copied up first) a new file and a new directory take the directory's group,
    whatever the caller's gid; the new directory is set-gid too."""
    env, fs = union([{"sg": Dir({"old": "o"}, mode=0o2775, uid=0, gid=100)}])
    create = fs.create("sg/f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 1000, 1000)
    fs.release(create)
    fs.mkdir("sg/sub", 0o755, 1000, 1000)
    assert stat.S_IMODE(fs.getattr("sg").st_mode) == 0o2775
    f, sub = fs.getattr("sg/f"), fs.getattr("sg/sub")
    assert (f.st_uid, f.st_gid) == (1000, 100)
    assert (sub.st_uid, sub.st_gid) == (1000, 100)
    assert sub.st_mode & stat.S_ISGID
    assert os.lstat(env.upper / "sg" / "f").st_gid == 100  # type: ignore[operator]


# ============================================================ symlinks inside layers

def test_symlinks_in_layers_are_never_followed_by_the_union(mkenv: Callable[..., Env]) -> None:
    """Paths through a layer symlink pointing outside (absolute, ``../..``, ``/``) are ENOTDIR for every
    operation; operations on the link itself act on the link; the outside stays untouched."""
    env = mkenv([{"abs": Symlink("/tmp"), "up": Symlink("../../.."), "root": Symlink("/"), "f": "f"}])
    canary_dir = env.base.parent / "outside"
    canary_dir.mkdir()
    canary = canary_dir / "canary"
    canary.write_bytes(b"canary")
    os.symlink(canary_dir, env.lowers[0] / "out")
    os.symlink(canary, env.lowers[0] / "canary-link")
    fs = env.open()
    for through in ("out/canary", "abs/x", "up/etc", "root/etc"):
        assert_errno(errno.ENOTDIR, fs.getattr, through)
        assert_errno(errno.ENOTDIR, fs.open, through, os.O_RDONLY)
        assert_errno(errno.ENOTDIR, fs.unlink, through)
        assert_errno(errno.ENOTDIR, fs.chmod, through, 0o777)
        assert_errno(errno.ENOTDIR, fs.truncate, through, 0)
        assert_errno(errno.ENOTDIR, CREATORS["create"], fs, through)
        assert_errno(errno.ENOTDIR, CREATORS["mkdir"], fs, through)
    for deep in ("out/canary/x", "root/etc/passwd", "up/tmp/x"):
        for attempt in (fs.getattr, lambda p: fs.open(p, os.O_RDONLY), lambda p: CREATORS["create"](fs, p)):
            with pytest.raises(OSError):
                attempt(deep)
    assert_errno(errno.ENOTDIR, fs.readdir, "out")
    assert_errno(errno.ENOTDIR, fs.readdir, "root")
    assert_errno(errno.ENOTDIR, fs.rename, "f", "out/stolen")
    assert_errno(errno.ENOTDIR, fs.link, "f", "out/hard")
    fs.chown("canary-link", 4321, 4321)
    fs.utimens("canary-link", 10**9, 10**9)
    assert os.lstat(env.upper / "canary-link").st_uid == 4321  # type: ignore[operator]
    with pytest.raises(OSError):
        fs.setxattr("canary-link", "user.x", b"1", 0)
    fs.unlink("out")
    assert canary.read_bytes() == b"canary"
    st = os.stat(canary)
    assert (st.st_uid, st.st_mtime_ns != 10**9) == (0, True)
    assert xattr(canary, "user.x") is None
    assert sorted(os.listdir(canary_dir)) == ["canary"]


# ============================================================ special files

@pytest.mark.parametrize("kind", ["fifo", "dev"])
def test_truncate_of_a_non_regular_file_is_einval(mkenv: Callable[..., Env], kind: str) -> None:
    """truncate(2) of anything but a regular file or directory is EINVAL (the kernel's vfs_truncate); the
    union must never open a fifo for writing, which would block until a reader comes."""
    import threading

    from support.layers import Device, Fifo
    node = {"fifo": Fifo(), "dev": Device(1, 3)}[kind]
    env = mkenv([{"a": "a", "x": node}])
    fs = env.open()
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            fs.truncate("x", 0)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(3)
    if worker.is_alive():  # blocked opening the fifo: give it a reader so the thread ends, then fail
        for where in (env.upper, env.lowers[0]):
            if os.path.exists(where / "x"):  # type: ignore[operator]
                fd = os.open(where / "x", os.O_RDONLY | os.O_NONBLOCK)  # type: ignore[operator]
                worker.join(3)
                os.close(fd)
        pytest.fail("truncate blocked opening a fifo for writing")
    assert outcome and isinstance(outcome[0], OSError), outcome
    assert outcome[0].errno == errno.EINVAL


# ============================================================ attributes of a whole listing

def test_getattr_children_answers_as_getattr_does(union: Callable[..., tuple[Env, UnionFS]], fmt: str) -> None:
    env, fs = union()
    fs.chmod("a", 0o600)  # copied up: its inode number is the lower one's (origin)
    fs.release(fs.create("d/new", os.O_WRONLY | os.O_CREAT, 0o644))
    fs.link("b", "d/hard")  # a lower file copied up and hard-linked into d
    fs.mkdir("d/sub/deeper", 0o755)
    fs.unlink("d/g")
    asked: dict[str, list[str]] = {}
    for directory in ("", "d", "d/sub", "e", "m"):
        listed = [name for name, _, _ in fs.readdir(directory)]
        asked[directory] = [*listed, "g", "gone", "no-such-name"]  # whited out, whited out below, missing
        expected = [_getattr_or_none(fs, _join(directory, n)) for n in asked[directory]]
        assert _no_atime(fs.getattr_children(directory, asked[directory])) == _no_atime(expected), directory
    fs.close()
    fresh = env.open(whiteout=fmt)  # nothing cached: the batch reads everything itself
    for directory, wanted in asked.items():
        got = fresh.getattr_children(directory, wanted)
        expected = [_getattr_or_none(fresh, _join(directory, n)) for n in wanted]
        assert _no_atime(got) == _no_atime(expected), directory
        assert sum(a is not None for a in got) == len(wanted) - 3


def _no_atime(attrs: list[Attr | None]) -> list[Attr | None]:
    """Reading a directory to learn whether it is merged may move its atime between two stats."""
    return [None if a is None else a.replace(st_atime_ns=0) for a in attrs]


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _getattr_or_none(fs: UnionFS, path: str) -> Attr | None:
    try:
        return fs.getattr(path)
    except FileNotFoundError:
        return None


def test_getattr_children_of_a_file_or_a_missing_dir(union: Callable[..., tuple[Env, UnionFS]]) -> None:
    _, fs = union()
    assert_errno(errno.ENOTDIR, fs.getattr_children, "a", ["x"])
    assert_errno(errno.ENOENT, fs.getattr_children, "nowhere", ["x"])

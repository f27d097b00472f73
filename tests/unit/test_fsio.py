"""fsio.HostDir: the one door to host paths never follows a symlink inside a layer and never leaves the tree."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.layers import Symlink, build_layer
from unitkit import assert_errno

from unionfs.fs import fsio
from unionfs.fs.fsio import HostDir

CANARY_DATA = b"outside the layer\n"
REFUSED = (errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EINVAL, errno.ENOENT)
"""What a walk through a symlink may answer: anything but success."""


@pytest.fixture(params=["openat2", "walk"])
def resolver_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every safety test runs with openat2 and with the component-by-component fallback walk."""
    if request.param == "walk":
        monkeypatch.setattr(fsio, "_have_openat2", False)
    elif not fsio._have_openat2:
        pytest.skip("openat2 is not available on this kernel")
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["mutable", "immutable"])
def immutable(request: pytest.FixtureRequest) -> bool:
    """HostDir with plain per-call descriptors, and as for a lower layer (directory descriptors kept)."""
    return bool(request.param)


@pytest.fixture
def escape(tmp_path: Path, resolver_mode: str, immutable: bool) -> Iterator[tuple[HostDir, Path]]:
    """A layer whose symlinks point outside it (absolute, ``../..``, ``/``), and a canary dir outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(CANARY_DATA)
    os.chmod(outside / "canary", 0o644)
    (outside / "sub").mkdir()
    (tmp_path / "layer").mkdir()
    layer = build_layer({
        "abs": Symlink(str(outside)),
        "up": Symlink("../../outside"),
        "rel": Symlink("../outside"),
        "root": Symlink("/"),
        "canary-link": Symlink(str(outside / "canary")),
        "d/back": Symlink("../.."),
        "d/file": "inside\n",
    }, tmp_path / "layer" / "l")
    host = HostDir(str(layer), immutable=immutable, dir_cache=2)
    yield host, outside
    host.close()
    assert (outside / "canary").read_bytes() == CANARY_DATA, "the canary outside the layer was changed"
    assert stat.S_IMODE(os.stat(outside / "canary").st_mode) == 0o644
    assert sorted(os.listdir(outside)) == ["canary", "sub"], "something was created outside the layer"


THROUGH = ["abs/canary", "up/canary", "rel/canary", "root/etc/passwd", "d/back/outside/canary", "abs/sub/x"]


@pytest.mark.parametrize("rel", THROUGH)
def test_lstat_through_symlink_is_refused(escape: tuple[HostDir, Path], rel: str) -> None:
    """lstat of a path whose parent is a symlink fails instead of reaching the target."""
    host, _ = escape
    with pytest.raises(OSError) as info:
        host.lstat(rel)
    assert info.value.errno in REFUSED
    assert host.try_lstat(rel) is None


@pytest.mark.parametrize("rel", THROUGH)
def test_open_through_symlink_is_refused(escape: tuple[HostDir, Path], rel: str) -> None:
    """open (read or write) of a path through a symlink fails; the canary keeps its data."""
    host, _ = escape
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(OSError) as info:
            os.close(host.open(rel, flags, 0o644))
        assert info.value.errno in REFUSED


@pytest.mark.parametrize("rel", ["abs", "up", "rel", "root", "d/back", "canary-link"])
def test_listing_through_symlink_is_refused(escape: tuple[HostDir, Path], rel: str) -> None:
    """scandir/open_dir of a symlinked directory fails (ENOTDIR/ELOOP) instead of listing the target."""
    host, _ = escape
    with pytest.raises(OSError) as info:
        host.scandir(rel)
    assert info.value.errno in REFUSED
    with pytest.raises(OSError) as info:
        os.close(host.open_dir(rel))
    assert info.value.errno in REFUSED


@pytest.mark.parametrize("rel", ["abs", "canary-link", "root"])
def test_final_symlink_is_the_link_itself(escape: tuple[HostDir, Path], rel: str) -> None:
    """lstat/readlink of a symlink describe the link, and opening it for data fails with ELOOP."""
    host, _ = escape
    assert stat.S_ISLNK(host.lstat(rel).st_mode)
    assert host.readlink(rel)
    assert_errno(errno.ELOOP, host.open, rel, os.O_RDONLY)
    assert_errno(errno.ELOOP, host.open, rel, os.O_WRONLY | os.O_TRUNC)


def test_changes_through_symlink_are_refused(escape: tuple[HostDir, Path]) -> None:
    """mkdir, mknod, symlink, unlink, rename, link, xattrs, chmod, chown, utime through a symlinked parent
    all fail and leave the outside untouched (checked by the fixture)."""
    host, _ = escape
    attempts = [
        lambda: host.mkdir("abs/new", 0o755),
        lambda: host.mknod("abs/new", stat.S_IFREG | 0o644),
        lambda: host.symlink("x", "abs/new"),
        lambda: host.unlink("abs/canary"),
        lambda: host.rmdir("abs/sub"),
        lambda: host.rename("d/file", "abs/moved"),
        lambda: host.rename("abs/canary", "d/stolen"),
        lambda: host.link("abs/canary", "d/hard"),
        lambda: host.link("d/file", "abs/hard"),
        lambda: host.setxattr("abs/canary", "user.x", b"1"),
        lambda: host.getxattr("abs/canary", "user.x"),
        lambda: host.listxattr("up/canary"),
        lambda: host.removexattr("abs/canary", "user.x"),
        lambda: host.chmod("abs/canary", 0o777),
        lambda: host.chown("abs/canary", 1234, 1234),
        lambda: host.utime("abs/canary", (0, 0)),
        lambda: host.truncate("abs/canary", 0),
        lambda: host.readlink("d/back/outside/canary"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno in REFUSED, attempt


def test_metadata_changes_on_a_final_symlink_do_not_reach_its_target(escape: tuple[HostDir, Path]) -> None:
    """chmod of a symlink is EOPNOTSUPP (as Linux answers); chown/utime change the link, not the target."""
    host, outside = escape
    assert_errno(errno.EOPNOTSUPP, host.chmod, "canary-link", 0o777)
    before = os.stat(outside / "canary")
    host.chown("canary-link", 4321, 4321)
    host.utime("canary-link", (10**9, 10**9))
    after = os.stat(outside / "canary")
    assert (after.st_uid, after.st_gid, after.st_mtime_ns) == (before.st_uid, before.st_gid, before.st_mtime_ns)
    assert host.lstat("canary-link").st_uid == 4321


def test_truncate_changes_a_regular_file_only(escape: tuple[HostDir, Path]) -> None:
    """truncate of a final symlink is EINVAL (truncate(2) on a symlink's own inode), its target is left
    alone (checked by the fixture); a directory is EINVAL too; a file gets its new size."""
    host, _ = escape
    assert_errno(errno.EINVAL, host.truncate, "canary-link", 0)
    assert_errno(errno.EINVAL, host.truncate, "d", 0)
    host.truncate("d/file", 3)
    assert host.lstat("d/file").st_size == 3


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x", "d/../../x", "d/./file", "d//file", "./d"])
def test_malformed_relative_paths_are_rejected(escape: tuple[HostDir, Path], rel: str) -> None:
    """Absolute paths, ``..``, ``.`` and empty components are EINVAL for open, open_dir and lstat."""
    host, _ = escape
    assert_errno(errno.EINVAL, host.open, rel, os.O_RDONLY)
    assert_errno(errno.EINVAL, host.open_dir, rel)
    assert_errno(errno.EINVAL, host.lstat, rel)


def test_dotdot_as_the_final_component_never_leaves_the_tree(tmp_path: Path) -> None:
    """``..`` alone names the layer's parent: HostDir refuses it (EINVAL) for queries and changes alike."""
    layer = build_layer({"f": "x"}, tmp_path / "l")
    before = os.stat(tmp_path)
    host = HostDir(str(layer))
    try:
        for attempt in (lambda: host.lstat(".."), lambda: host.listxattr(".."),
                        lambda: host.chown("..", 4321, 4321), lambda: host.utime("..", (0, 0)),
                        lambda: host.setxattr("..", "user.escaped", b"1")):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EINVAL
    finally:
        host.close()
        after = os.stat(tmp_path)
        os.chown(tmp_path, before.st_uid, before.st_gid)
        assert (after.st_uid, after.st_mtime_ns) == (before.st_uid, before.st_mtime_ns)


def test_errors_carry_the_host_errno(tmp_path: Path) -> None:
    """Missing → ENOENT, file used as a dir → ENOTDIR, existing → EEXIST, long name → ENAMETOOLONG."""
    layer = build_layer({"f": "x", "d": {}}, tmp_path / "l")
    host = HostDir(str(layer))
    try:
        assert_errno(errno.ENOENT, host.lstat, "missing")
        assert host.try_lstat("missing") is None
        assert host.try_lstat("f/x") is None
        assert_errno(errno.ENOTDIR, host.lstat, "f/x")
        assert_errno(errno.ENOTDIR, host.scandir, "f")
        assert_errno(errno.EEXIST, host.mkdir, "d", 0o755)
        assert_errno(errno.ENAMETOOLONG, host.mkdir, "n" * 256, 0o755)
        assert_errno(errno.ENAMETOOLONG, host.lstat, "n" * 256)
        assert host.try_getxattr("f", "user.none") is None
    finally:
        host.close()


def test_plain_operations_inside_the_tree(tmp_path: Path) -> None:
    """The door works for ordinary use: create, write, list, xattrs, rename with flags, link, remove."""
    layer = build_layer({"d": {}}, tmp_path / "l")
    host = HostDir(str(layer))
    try:
        fd = host.open("d/f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"hello")
        os.close(fd)
        assert sorted(n for n, _k, _i in host.scandir("d")) == ["f"]
        kinds = {n: k for n, k, _i in host.scandir("")}
        assert kinds == {"d": stat.S_IFDIR}
        host.setxattr("d/f", "user.k", b"v")
        assert host.getxattr("d/f", "user.k") == b"v"
        assert "user.k" in host.listxattr("d/f")
        host.removexattr("d/f", "user.k")
        assert host.try_getxattr("d/f", "user.k") is None
        host.symlink("f", "d/s")
        host.link("d/f", "d/g")
        assert host.lstat("d/g").st_nlink == 2
        assert_errno(errno.EEXIST, host.rename, "d/f", "d/g", fsio.RENAME_NOREPLACE)
        host.rename("d/f", "d/s", fsio.RENAME_EXCHANGE)
        assert stat.S_ISREG(host.lstat("d/s").st_mode)
        assert stat.S_ISLNK(host.lstat("d/f").st_mode)
        host.unlink("d/f")
        host.mknod("d/wh", stat.S_IFCHR, 0)
        assert stat.S_ISCHR(host.lstat("d/wh").st_mode)
        host.chmod("d/s", 0o600)
        assert stat.S_IMODE(host.lstat("d/s").st_mode) == 0o600
        host.utime("d/s", (5 * 10**9, 7 * 10**9))
        assert host.lstat("d/s").st_mtime_ns == 7 * 10**9
        assert host.statvfs().f_namemax >= 255
    finally:
        host.close()
    assert sorted(os.listdir(layer / "d")) == ["g", "s", "wh"]


def test_xattrs_of_the_tree_root(tmp_path: Path) -> None:
    """The root itself ("") supports xattrs like any directory (set, get, list)."""
    layer = build_layer({}, tmp_path / "l")
    host = HostDir(str(layer))
    try:
        host.setxattr("", "user.root", b"r")
        assert host.getxattr("", "user.root") == b"r"
        assert "user.root" in host.listxattr("")
    finally:
        host.close()
    assert os.getxattr(layer, "user.root") == b"r"


def test_split_and_join() -> None:
    """split/join are inverse on relative paths; the root's parent is ""."""
    assert fsio.split("a/b/c") == ("a/b", "c")
    assert fsio.split("a") == ("", "a")
    assert fsio.join("", "a") == "a"
    assert fsio.join("a/b", "c") == "a/b/c"


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("cache", [2, 3, 64])
def test_kept_directory_descriptors_are_bounded_and_released(tmp_path: Path, cache: int) -> None:
    """An immutable HostDir keeps at most ``dir_cache`` directory descriptors, answers correctly however often
    they are evicted, and close() releases every one of them."""
    spec = {f"d{i}/e/f{i}": f"{i}" for i in range(10)}
    layer = build_layer(spec, tmp_path / "l")
    before = _open_fds()
    host = HostDir(str(layer), immutable=True, dir_cache=cache)
    for _round in range(3):
        for i in range(10):
            assert host.lstat(f"d{i}/e/f{i}").st_size == len(str(i))
            assert [n for n, _k, _i in host.scandir(f"d{i}/e")] == [f"f{i}"]
            assert len(host._dirfds) <= cache
    assert len(_open_fds() - before) <= cache + 1
    host.close()
    assert _open_fds() - before == set()


def test_a_union_closes_every_descriptor(tmp_path: Path) -> None:
    """Opening and closing a LayerStack + UnionFS and walking the tree leaks no descriptor."""
    from unitkit import make_env, visible_tree
    env = make_env(tmp_path / "u", [{f"d{i}/f": "x" for i in range(5)}, {"d0/g": "g"}])
    before = _open_fds()
    fs = env.open()
    visible_tree(fs)
    fs.chmod("d0/g", 0o600)
    env.close_all()
    assert _open_fds() - before == set()


def test_children_queries_go_through_one_descriptor_and_never_follow(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    os.setxattr(root / "d" / "f", "user.k", b"v")
    (root / "d" / "link").symlink_to(tmp_path)  # a symlink to outside: stat'ed as a link, never followed
    host = HostDir(str(root))
    try:
        stats = host.lstat_children("d", ["f", "link", "missing"])
        assert stats[0] is not None and stats[0].st_size == 1
        assert stats[1] is not None and stat.S_ISLNK(stats[1].st_mode)
        assert stats[2] is None
        assert host.getxattr_children("d", ["f", "link", "missing"], "user.k") == [b"v", None, None]
        for bad in ("../root", "a/b", ".", ""):
            with pytest.raises(OSError) as info:
                host.lstat_children("d", [bad])
            assert info.value.errno == errno.EINVAL
    finally:
        host.close()


@pytest.mark.parametrize("way", ["libc", "syscall"])
def test_renameat2_flags_through_libc_and_through_this_architectures_syscall_number(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    """RENAME_NOREPLACE, RENAME_EXCHANGE and RENAME_WHITEOUT work through the C library's renameat2 and through
    the system call number listed for this machine's architecture (the path without a libc wrapper)."""
    if way == "syscall":
        monkeypatch.setattr(fsio, "_renameat2", fsio._syscall_renameat2)
    else:
        assert fsio._renameat2 is not fsio._syscall_renameat2, "this C library has renameat2"
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    host = HostDir(str(tmp_path))
    try:
        assert_errno(errno.EEXIST, host.rename, "a", "b", fsio.RENAME_NOREPLACE)
        host.rename("a", "b", fsio.RENAME_EXCHANGE)
        assert ((tmp_path / "a").read_text(), (tmp_path / "b").read_text()) == ("b", "a")
        host.rename("a", "c", fsio.RENAME_WHITEOUT)
        left = os.lstat(tmp_path / "a")
        assert stat.S_ISCHR(left.st_mode) and left.st_rdev == 0, "a whiteout is left where the source was"
        assert (tmp_path / "c").read_text() == "b"
        assert_errno(errno.EINVAL, host.rename, "c", "d", 1 << 30)
    finally:
        host.close()


def test_renameat2_without_a_syscall_number_for_the_architecture_is_enosys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsio, "_RENAMEAT2_SYSCALL", {})  # no number for this machine's architecture
    monkeypatch.setattr(fsio, "_renameat2", fsio._syscall_renameat2)
    (tmp_path / "a").write_text("a")
    host = HostDir(str(tmp_path))
    try:
        assert_errno(errno.ENOSYS, host.rename, "a", "b", fsio.RENAME_NOREPLACE)
    finally:
        host.close()
    assert (tmp_path / "a").read_text() == "a"


def test_kept_directory_descriptors_follow_renames_and_removals(tmp_path: Path) -> None:
    """A changing tree whose directory descriptors are kept: after a rename or an rmdir through the same
    object, no access reaches the directory that moved or went through its old name."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("old")
    host = HostDir(str(tmp_path), keep_dirs=True, dir_cache=4)
    try:
        assert host.read_bytes("a/b/f") == b"old"  # a/b kept
        host.rename("a", "moved")
        assert_errno(errno.ENOENT, host.lstat, "a/b/f")
        assert host.read_bytes("moved/b/f") == b"old"
        host.unlink("moved/b/f")
        host.rmdir("moved/b")
        host.mkdir("moved/b", 0o755)
        fd = host.open("moved/b/g", os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        assert sorted(name for name, _, _ in host.scandir("moved/b")) == ["g"]
        assert (tmp_path / "moved" / "b" / "g").exists()
        for i in range(10):  # more directories than kept: the oldest are closed, the rest still right
            host.mkdir(f"d{i}", 0o755)
            host.mkdir(f"d{i}/sub", 0o755)
            assert host.lstat(f"d{i}/sub").st_ino == (tmp_path / f"d{i}" / "sub").stat().st_ino
        assert len(host._dirfds) <= 4 and not host._users
    finally:
        host.close()


def test_a_kept_descriptor_dropped_while_in_use_is_closed_by_its_user(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    host = HostDir(str(tmp_path), keep_dirs=True)
    try:
        with host.dirfd("d") as fd:
            host._forget_dirs("d")
            assert os.fstat(fd).st_ino == (tmp_path / "d").stat().st_ino  # still open for its user
        assert_errno(errno.EBADF, os.fstat, fd)
    finally:
        host.close()

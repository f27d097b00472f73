"""The inode index (``index=on``) in the core, without FUSE: the file handles and index names checked against
what the kernel writes, the union's link counts, and the mount-time checks and cleanup."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.layers import Hardlink
from support.mounts import kernel_overlay_mount
from unitkit import Env, assert_errno, host_tree, make_env, read_all, write_file, xattr

from unionfs.fs import upper as upper_mod
from unionfs.fs.fsio import HostDir
from unionfs.fs.index import (
    FLAG_PATH_UPPER,
    NLINK_XATTR,
    ORIGIN_XATTR,
    UPPER_XATTR,
    decode_fh,
    encode_fh,
    format_nlink,
    index_name,
    parse_nlink,
    union_nlink,
)
from unionfs.fs.union import UnionFS

LOWER = {"x": "linked\n", "y": Hardlink("x"), "d/z": Hardlink("x"), "solo": "solo\n"}


def _fh(root: Path, rel: str = "", *, upper: bool = False) -> bytes:
    host = HostDir(str(root))
    try:
        handle_type, fid = host.file_handle(rel)
        return encode_fh(handle_type, fid, host.fs_uuid(), upper=upper)
    finally:
        host.close()


@pytest.fixture(params=["disk", "tmpfs"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the test's disk, or on a tmpfs of its own (its uuid is random, the disk's may be null)."""
    if request.param == "disk":
        yield tmp_path
        return
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_file_handles_and_index_names_are_the_kernels(base: Path) -> None:
    """The kernel copies up a name of a lower hard link with index=on: its index entry's name, the origin
    xattrs and the index dir's upper xattr are what unionfs computes for the same objects."""
    env = make_env(base / "k", [LOWER])
    assert env.upper is not None and env.work is not None
    mnt = base / "mnt"
    mnt.mkdir()
    with kernel_overlay_mount(env.lowers, env.upper, env.work, mnt, ("index=on",)) as root, \
            open(root / "y", "ab") as f:
        f.write(b"more\n")
    entries = os.listdir(env.work / "index")
    lower_fh = _fh(env.lowers[0], "x")
    assert entries == [index_name(lower_fh)]
    assert xattr(env.upper / "y", ORIGIN_XATTR) == lower_fh
    assert xattr(env.upper, ORIGIN_XATTR) == _fh(env.lowers[0])
    assert xattr(env.work / "index", UPPER_XATTR) == _fh(env.upper, upper=True)
    assert xattr(env.upper / "y", NLINK_XATTR) == format_nlink(3, 2) == b"U+1"
    assert os.stat(env.upper / "y").st_nlink == 2  # the upper name and the index entry


def test_unionfs_writes_what_the_kernel_writes(base: Path) -> None:
    """The same copy-up through unionfs leaves the same entry, xattrs and link counts."""
    env = make_env(base / "u", [LOWER])
    assert env.upper is not None and env.work is not None
    fs = env.open(index=True)
    write_file(fs, "y", b"linked\nmore\n")
    lower_fh = _fh(env.lowers[0], "x")
    assert os.listdir(env.work / "index") == [index_name(lower_fh)]
    assert xattr(env.upper / "y", ORIGIN_XATTR) == lower_fh
    assert xattr(env.upper, ORIGIN_XATTR) == _fh(env.lowers[0])
    assert xattr(env.work / "index", UPPER_XATTR) == _fh(env.upper, upper=True)
    assert xattr(env.upper / "y", NLINK_XATTR) == b"U+1"
    assert os.stat(env.upper / "y").st_nlink == 2
    env.close_all()


def test_handle_encoding_round_trips() -> None:
    fh = encode_fh(1, b"\x01\x02\x03\x04\x05\x06\x07\x08", bytes(range(16)), upper=True)
    assert fh[:5] == bytes((0, 0xFB, 29, FLAG_PATH_UPPER, 1))
    decoded = decode_fh(fh)
    assert decoded is not None
    assert (decoded.handle_type, decoded.uuid) == (1, bytes(range(16)))
    assert decoded.fid == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert index_name(fh) == fh.hex()
    assert decode_fh(bytes((1,)) + fh[1:]) is None  # a newer version: "origin unknown"
    with pytest.raises(ValueError):
        decode_fh(b"\x00\xfa" + fh[2:])


@pytest.mark.parametrize(("value", "upper", "lower", "expected"), [
    (b"U+0", 2, 5, 2), (b"U-1", 3, 5, 2), (b"L+1", 3, 2, 3), (b"L-2", 3, 2, 7),
    (b"U-5", 3, 5, 7), (b"X+1", 3, 5, 7), (None, 3, 5, 7), (b"U+", 3, 5, 7),
])
def test_union_link_count(value: bytes | None, upper: int, lower: int, expected: int) -> None:
    """``ovl_get_nlink``: the recorded difference on the upper or lower count; the fallback (7 here) where
    it is missing, invalid or would not be positive."""
    assert union_nlink(value, upper_nlink=upper, lower_nlink=lower, fallback=7) == expected
    assert parse_nlink(b"U-12") == ("U", -12)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = make_env(tmp_path / "u", [LOWER])
    yield made
    made.close_all()


def test_every_name_shows_the_copied_up_file(env: Env) -> None:
    fs = env.open(index=True)
    before = fs.getattr("y")
    write_file(fs, "d/z", b"linked\nmore\n")
    for name in ("x", "y", "d/z"):
        attrs = fs.getattr(name)
        assert (attrs.st_ino, attrs.st_nlink, attrs.st_size) == (before.st_ino, 3, 12)
        assert read_all(fs, name) == b"linked\nmore\n"
    fs.chmod("x", 0o600)
    assert fs.getattr("y").st_mode & 0o777 == 0o600
    fs = env.remount(fs, index=True)
    assert fs.getattr("y").st_ino == before.st_ino
    assert read_all(fs, "y") == b"linked\nmore\n"


def test_a_later_copy_up_links_to_the_index_entry(env: Env) -> None:
    assert env.upper is not None
    fs = env.open(index=True)
    write_file(fs, "x", b"new\n")
    fs.chmod("y", 0o640)
    assert os.stat(env.upper / "x").st_ino == os.stat(env.upper / "y").st_ino
    assert os.stat(env.upper / "x").st_nlink == 3
    assert fs.getattr("x").st_nlink == 3


def test_unlinking_every_name_removes_the_index_entry(env: Env) -> None:
    assert env.work is not None
    fs = env.open(index=True)
    fs.unlink("y")  # never copied up: the kernel copies it up first, to count the union's links
    assert len(os.listdir(env.work / "index")) == 1
    assert fs.getattr("x").st_nlink == 2
    fs.unlink("x")
    assert fs.getattr("d/z").st_nlink == 1
    fs.unlink("d/z")
    assert os.listdir(env.work / "index") == []


def test_index_off_breaks_the_link(env: Env) -> None:
    assert env.work is not None
    fs = env.open()
    write_file(fs, "x", b"new\n")
    assert read_all(fs, "y") == b"linked\n"
    assert fs.getattr("x").st_ino != fs.getattr("y").st_ino
    assert not (env.work / "index").exists()


def _state(env: Env) -> dict[str, str]:
    assert env.upper is not None and env.work is not None
    return {**host_tree(env.upper), **{f"work/{k}": v for k, v in host_tree(env.work).items()},
            "upper-origin": repr(xattr(env.upper, ORIGIN_XATTR))}


def test_the_same_upper_over_another_lower_stack_is_refused(tmp_path: Path, env: Env) -> None:
    """The kernel's "failed to verify upper root origin" (ESTALE), and nothing is written."""
    fs = env.open(index=True)
    write_file(fs, "x", b"new\n")
    env.close_all()
    other = make_env(tmp_path / "other", [LOWER])
    env.lowers = other.lowers
    before = _state(env)
    with pytest.raises(OSError) as caught:
        env.open(index=True)
    assert caught.value.errno == errno.ESTALE
    assert "failed to verify upper root origin" in str(caught.value)
    assert _state(env) == before


def test_an_index_dir_of_another_upper_is_refused(tmp_path: Path, env: Env) -> None:
    assert env.work is not None
    env.open(index=True)
    env.close_all()
    os.setxattr(env.work / "index", UPPER_XATTR, _fh(tmp_path, upper=True))
    before = _state(env)
    assert_errno(errno.ESTALE, env.open, index=True)
    assert _state(env) == before


def test_an_index_entry_that_is_no_file_handle_fails_the_mount(env: Env) -> None:
    assert env.work is not None
    env.open(index=True)
    env.close_all()
    (env.work / "index" / "not-a-handle").write_bytes(b"")
    assert_errno(errno.EINVAL, env.open, index=True)


def test_an_index_entry_without_origin_fails_the_mount_and_stays(env: Env) -> None:
    """The kernel aborts a mount whose index holds a file without an origin xattr (ENODATA) rather than
    guess what it is; nothing is removed."""
    assert env.work is not None
    env.open(index=True)
    env.close_all()
    name = index_name(_fh(env.lowers[0], "x"))
    (env.work / "index" / name).write_bytes(b"")
    assert_errno(errno.ENODATA, env.open, index=True)
    assert os.listdir(env.work / "index") == [name]


def test_mount_cleans_the_index_as_the_kernel_does(env: Env) -> None:
    """Left-over temporary entries, entries whose origin is not their name, and orphans (the union's count
    0) go; a live entry stays."""
    assert env.work is not None
    fs = env.open(index=True)
    write_file(fs, "x", b"new\n")
    env.close_all()
    index = env.work / "index"
    live = os.listdir(index)[0]
    (index / "#leftover").write_bytes(b"")
    stale = index_name(_fh(env.lowers[0], "solo"))
    (index / stale).write_bytes(b"")
    os.setxattr(index / stale, ORIGIN_XATTR, bytes.fromhex(live))
    orphan_src = env.lowers[0] / "orphan"
    orphan_src.write_bytes(b"o")
    os.link(orphan_src, env.lowers[0] / "orphan2")
    orphan = index_name(_fh(env.lowers[0], "orphan"))
    (index / orphan).write_bytes(b"o")
    os.setxattr(index / orphan, ORIGIN_XATTR, bytes.fromhex(orphan))
    os.setxattr(index / orphan, NLINK_XATTR, b"U-1")
    env.open(index=True)
    assert os.listdir(index) == [live]


def test_index_needs_trusted_xattrs(monkeypatch: pytest.MonkeyPatch, env: Env) -> None:
    """Where the daemon may not write trusted.* xattrs the kernel refuses userxattr,index=on: so do we."""
    monkeypatch.setattr(upper_mod, "probe_kernel_format", lambda work, sub: False)
    assert_errno(errno.EINVAL, env.open, whiteout="auto", index=True)


def test_index_is_ignored_on_a_read_only_union(tmp_path: Path) -> None:
    ro = make_env(tmp_path / "ro", [LOWER], readonly=True)
    fs: UnionFS = ro.open(index=True)
    assert fs.index is None
    assert read_all(fs, "y") == b"linked\n"
    ro.close_all()


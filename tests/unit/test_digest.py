"""Layer digests: the same content gives the same digest whatever the format, order or machine state; any
change a mount would show gives another one."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from support.image_specs import layer_specs
from support.layers import (
    FIXED_MTIME_NS,
    WHITEOUT,
    Device,
    Dir,
    Fifo,
    File,
    Hardlink,
    Symlink,
    build_layer,
    copy_tree,
)

from unionfs.fs.fsio import HostDir
from unionfs.fs.whiteout import read_layer_dir
from unionfs.image.digest import Entry, digest_entries, hash_file, layer_digest, scan
from unionfs.image.walk import OpenDir, read_dir

RICH = {
    "etc/passwd": File(b"root:x:0:0\n", mode=0o644),
    "etc/shadow": File(b"secret", mode=0o600, gid=42),
    "bin/sh": File(b"\x7fELF" + bytes(5000), mode=0o755, xattrs={"user.tag": b"shell"}),
    "bin/su": File(b"su", mode=0o4755),
    "lib/link": Symlink("../bin/sh"),
    "hard": Hardlink("bin/sh"),
    "dev/null": Device(1, 3),
    "dev/sda": Device(8, 0, kind="b", mode=0o660),
    "run/fifo": Fifo(),
    "gone": WHITEOUT,
    "var": Dir({"cache": Dir({"x": "1"}, opaque=True), "old": WHITEOUT}),
}


def digest_of(spec: object, tmp: Path, *, whiteouts: str = "kernel", name: str = "layer") -> str:
    return layer_digest(str(build_layer(spec, tmp / name, whiteouts=whiteouts)))  # type: ignore[arg-type]


def test_both_whiteout_formats_give_one_digest(tmp_path: Path) -> None:
    assert digest_of(RICH, tmp_path, whiteouts="kernel", name="k") == \
        digest_of(RICH, tmp_path, whiteouts="oci", name="o")


def test_xattr_whiteouts_read_as_the_same_mark(tmp_path: Path) -> None:
    """The kernel's "xwhiteout" format: a zero-size file with overlay.whiteout in a dir marked opaque=x."""
    kernel = build_layer({"d": Dir({"x": "1", "y": WHITEOUT})}, tmp_path / "k")
    xw = build_layer({"d": Dir({"x": "1", "y": ""})}, tmp_path / "x")
    os.setxattr(xw / "d/y", "trusted.overlay.whiteout", b"")
    os.setxattr(xw / "d", "trusted.overlay.opaque", b"x")
    for p in (xw / "d/y", xw / "d"):
        os.utime(p, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS), follow_symlinks=False)
    assert layer_digest(str(kernel)) == layer_digest(str(xw))


def test_creation_order_does_not_matter(tmp_path: Path) -> None:
    forward = dict(RICH)
    backward = dict(reversed(list(RICH.items())))
    assert digest_of(forward, tmp_path, name="f") == digest_of(backward, tmp_path, name="b")


def test_a_copy_in_another_place_has_the_same_digest(tmp_path: Path) -> None:
    """Another directory, other inode numbers, other ctimes and atimes: the same digest."""
    first = build_layer(RICH, tmp_path / "one")
    second = copy_tree(first, tmp_path / "two")
    os.utime(second / "etc/passwd", ns=(1, FIXED_MTIME_NS))  # atime only
    assert layer_digest(str(first)) == layer_digest(str(second))


def test_directory_mtimes_and_private_xattrs_are_left_out(tmp_path: Path) -> None:
    layer = build_layer(RICH, tmp_path / "l")
    before = layer_digest(str(layer))
    os.utime(layer / "etc", ns=(5, 5))
    os.setxattr(layer / "bin/sh", "trusted.overlay.origin", b"x")
    os.setxattr(layer / "etc", "user.overlay.impure", b"y")
    os.setxattr(layer / "etc", "trusted.unionfs.origin", b"42")
    assert layer_digest(str(layer)) == before


def test_sparse_and_dense_files_with_the_same_bytes_agree(tmp_path: Path) -> None:
    sparse = build_layer({}, tmp_path / "s")
    dense = build_layer({}, tmp_path / "d")
    with open(sparse / "f", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
    with open(dense / "f", "wb") as f:
        f.write(bytes(1 << 20) + b"middle" + bytes((2 << 20) - 6))
    for layer in (sparse, dense):
        os.utime(layer / "f", ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))
    assert os.stat(sparse / "f").st_blocks < os.stat(dense / "f").st_blocks
    assert layer_digest(str(sparse)) == layer_digest(str(dense))


def test_an_entry_with_a_whiteout_of_its_own_name_is_the_entry(tmp_path: Path) -> None:
    """``.wh.d`` next to a dir ``d``: the union shows ``d`` and hides every lower copy — an opaque dir."""
    both = build_layer({"d": Dir({"x": "1"}), "f": "data"}, tmp_path / "both", whiteouts="oci")
    for name in (".wh.d", ".wh.f"):
        (both / name).touch()
    os.utime(both, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))
    opaque = build_layer({"d": Dir({"x": "1"}, opaque=True), "f": "data"}, tmp_path / "opaque")
    assert layer_digest(str(both)) == layer_digest(str(opaque))


def test_sockets_are_reported_and_left_out(tmp_path: Path) -> None:
    layer = build_layer({"run": {}}, tmp_path / "l")
    before = layer_digest(str(layer))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(layer / "run/s.sock"))
        os.utime(layer / "run", ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))
        host = HostDir(str(layer))
        manifest = scan(host)
        host.close()
    finally:
        sock.close()
    assert manifest.sockets == ["run/s.sock"]
    assert manifest.digest == before


CHANGES: dict[str, Callable[[Path], None]] = {
    "one bit of data": lambda p: p.joinpath("bin/sh").write_bytes(b"\x7fELG" + bytes(5000)),
    "mode": lambda p: os.chmod(p / "etc/passwd", 0o640),
    "set-id bit": lambda p: os.chmod(p / "bin/su", 0o755),
    "owner": lambda p: os.chown(p / "etc/passwd", 1, 0),
    "group": lambda p: os.chown(p / "etc/passwd", 0, 1),
    "dir mode": lambda p: os.chmod(p / "etc", 0o700),
    "dir owner": lambda p: os.chown(p / "etc", 7, 7),
    "xattr value": lambda p: os.setxattr(p / "bin/sh", "user.tag", b"shelL"),
    "xattr added": lambda p: os.setxattr(p / "etc/passwd", "user.new", b""),
    "dir xattr": lambda p: os.setxattr(p / "etc", "user.new", b"1"),
    "file mtime": lambda p: os.utime(p / "etc/passwd", ns=(FIXED_MTIME_NS, FIXED_MTIME_NS + 1)),
    "symlink target": lambda p: (os.unlink(p / "lib/link"), os.symlink("../bin/su", p / "lib/link")),
    "device number": lambda p: (os.unlink(p / "dev/null"), os.mknod(p / "dev/null", 0o20644, os.makedev(1, 5))),
    "fifo becomes file": lambda p: (os.unlink(p / "run/fifo"), (p / "run/fifo").touch(0o644)),
    "hard link becomes copy": lambda p: (os.unlink(p / "hard"), copy_tree(p / "bin/sh", p / "hard")),
    "whiteout removed": lambda p: os.unlink(p / "gone"),
    "opaque mark removed": lambda p: os.removexattr(p / "var/cache", "trusted.overlay.opaque"),
    "file renamed": lambda p: os.rename(p / "etc/shadow", p / "etc/shadow-"),
    "empty dir added": lambda p: os.mkdir(p / "new"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_visible_change_changes_the_digest(tmp_path: Path, change: str) -> None:
    layer = build_layer(RICH, tmp_path / "l")
    before = layer_digest(str(layer))
    CHANGES[change](layer)
    assert layer_digest(str(layer)) != before


def test_the_encoding_is_unambiguous() -> None:
    """Length framing: moving bytes between fields never gives the same digest."""
    a = [Entry("ab", "file", content="c"), Entry("a", "dir")]
    b = [Entry("a", "bfile", content="c"), Entry("a", "dir")]
    assert digest_entries(a) != digest_entries(b)
    assert digest_entries([Entry("x", "file", xattrs=(("user.a", b"bc"),))]) != \
        digest_entries([Entry("x", "file", xattrs=(("user.ab", b"c"),))])
    one = Entry("x", "file", mtime_ns=5)
    assert digest_entries([one]) != digest_entries([replace(one, mtime_ns=6)])
    assert digest_entries([Entry("d", "dir", mtime_ns=5)]) == digest_entries([Entry("d", "dir", mtime_ns=6)])


def test_hash_file_copies_data_and_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"data")
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        digest, seen = hash_file(sfd, 8 << 20, sink=dfd)
        os.ftruncate(dfd, 8 << 20)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert seen == 8 << 20
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert os.stat(tmp_path / "dst").st_blocks <= 64
    sfd = os.open(tmp_path / "dst", os.O_RDONLY)
    try:
        assert hash_file(sfd, 8 << 20)[0] == digest
    finally:
        os.close(sfd)


def test_scan_counts(tmp_path: Path) -> None:
    host = HostDir(str(build_layer(RICH, tmp_path / "l")))
    try:
        m = scan(host)
    finally:
        host.close()
    c = m.counts
    assert (c.files, c.links, c.symlinks, c.specials, c.whiteouts, c.opaque_dirs) == (5, 1, 1, 3, 2, 1)
    assert c.dirs == 8  # root, etc, bin, lib, dev, run, var, var/cache
    assert c.size == len(b"root:x:0:0\n") + 6 + 5004 + 2 + 1
    assert [e.path for e in m.entries] == sorted((e.path for e in m.entries),
                                                 key=lambda p: [os.fsencode(c) for c in p.split("/")])


def test_read_dir_agrees_with_the_union_reader(tmp_path: Path) -> None:
    """hostwalk.read_dir and whiteout.read_layer_dir see the same entries, whiteouts and opacity."""
    for fmt in ("kernel", "oci"):
        layer = build_layer(RICH, tmp_path / fmt, whiteouts=fmt)  # type: ignore[arg-type]
        host = HostDir(str(layer))
        try:
            for rel in ("", "var", "var/cache", "etc"):
                with OpenDir(host, rel) as d:
                    ours = read_dir(d)
                theirs = read_layer_dir(host, rel)
                assert {c.name for c in ours.children} == set(theirs.entries)
                assert ours.whiteouts == theirs.whiteouts
                assert ours.opaque == theirs.opaque
        finally:
            host.close()


@given(layer_specs(upper=True))
def test_any_layer_digest_survives_copies_and_formats(spec: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        kernel = build_layer(spec, base / "k")  # type: ignore[arg-type]
        oci = build_layer(spec, base / "o", whiteouts="oci")  # type: ignore[arg-type]
        copy = copy_tree(kernel, base / "c")
        digests = {layer_digest(str(p)) for p in (kernel, oci, copy)}
        assert len(digests) == 1

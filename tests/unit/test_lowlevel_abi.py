"""The protocol layouts of ``mountd.lowlevel.abi`` against the C sizes of ``linux/fuse.h`` (7.45), and the
one attribute packer."""

from __future__ import annotations

import struct

import pytest

from mountd.lowlevel import abi
from unionfs.fs.attr import Attr


@pytest.mark.parametrize(("layout", "size"), [
    (abi.IN_HEADER, 40), (abi.OUT_HEADER, 16), (abi.ATTR, 88), (abi.INIT_OUT, 64), (abi.SETATTR_IN, 88),
    (abi.READ_IN, 40), (abi.WRITE_IN, 40), (abi.OPEN_OUT, 16), (abi.CREATE_IN, 16), (abi.MKNOD_IN, 16),
    (abi.RELEASE_IN, 24), (abi.FLUSH_IN, 24), (abi.FSYNC_IN, 16), (abi.STATFS_OUT, 80), (abi.FALLOCATE_IN, 32),
    (abi.FORGET_ONE, 16), (abi.RENAME2_IN, 16), (abi.GETATTR_IN, 16), (abi.NOTIFY_INVAL_INODE_OUT, 24),
    (abi.NOTIFY_INVAL_ENTRY_OUT, 16), (abi.BACKING_MAP, 16),
], ids=lambda v: str(v) if isinstance(v, int) else v.format)
def test_layouts_have_the_kernels_sizes(layout: struct.Struct, size: int) -> None:
    assert layout.size == size


def test_entry_and_direntplus_sizes() -> None:
    assert abi.ENTRY_OUT_SIZE == 128
    assert abi.DIRENTPLUS_HEAD_SIZE == 152
    assert abi.ATTR_OUT_HEAD.size + abi.ATTR.size == 104


def test_pack_attr_splits_nanoseconds_keeps_every_field_and_signed_times() -> None:
    attrs = Attr(st_mode=0o100644, st_ino=7, st_nlink=2, st_uid=1000, st_gid=100, st_rdev=0, st_size=10,
                 st_blocks=8, st_blksize=4096, st_atime_ns=1_500_000_001, st_mtime_ns=2_000_000_002,
                 st_ctime_ns=-1)
    fields = abi.ATTR.unpack(abi.pack_attr(attrs))
    assert fields == (7, 10, 8, 1, 2, -1, 500_000_001, 2, 999_999_999, 0o100644, 2, 1000, 100, 0, 4096, 0)
    assert attrs.packed is not None  # kept in the record's slot for the next reply
    assert abi.ATTR.unpack(abi.pack_attr(attrs, nlink=0))[10] == 0


def test_dirent_is_padded_to_eight_bytes() -> None:
    for name in (b"a", b"abcdefgh", b"x" * 13):
        packed = abi.dirent(5, 3, 0o100000, name)
        assert len(packed) % 8 == 0 and len(packed) == abi.dirent_size(name)
        ino, off, namelen, kind = abi.DIRENT_HEAD.unpack_from(packed)
        assert (ino, off, namelen, kind) == (5, 3, len(name), 8)  # DT_REG
        assert packed[abi.DIRENT_HEAD.size:abi.DIRENT_HEAD.size + namelen] == name


def test_negotiation_keeps_only_what_the_kernel_offers() -> None:
    offered = abi.BIG_WRITES | abi.MAX_PAGES | abi.PASSTHROUGH | abi.INIT_EXT
    wanted = abi.BIG_WRITES | abi.PARALLEL_DIROPS | abi.PASSTHROUGH
    got = abi.negotiate(offered, wanted)
    assert got & abi.BIG_WRITES and got & abi.PASSTHROUGH
    assert not got & abi.PARALLEL_DIROPS and not got & abi.MAX_PAGES
    assert got & abi.INIT_EXT  # flags2 is read only with INIT_EXT in the reply
    assert abi.negotiate(abi.BIG_WRITES, abi.BIG_WRITES) == abi.BIG_WRITES


def test_parse_init_reads_flags2_only_with_init_ext() -> None:
    body = abi.INIT_IN.pack(7, 45, 131072, abi.INIT_EXT | abi.BIG_WRITES) + struct.pack("<I", 1 << 5) + bytes(44)
    assert abi.parse_init(body) == (7, 45, 131072, abi.INIT_EXT | abi.BIG_WRITES | abi.PASSTHROUGH)
    old = abi.INIT_IN.pack(7, 31, 4096, abi.BIG_WRITES) + struct.pack("<I", 1 << 5)
    assert abi.parse_init(old)[3] == abi.BIG_WRITES


def test_init_reply_carries_flags2_in_its_own_field() -> None:
    reply = abi.init_reply(minor=45, max_readahead=4096, flags=abi.BIG_WRITES | abi.PASSTHROUGH | abi.INIT_EXT,
                           max_write=1 << 20, max_pages=256, max_stack_depth=1)
    fields = abi.INIT_OUT.unpack(reply)
    assert fields[:4] == (7, 45, 4096, abi.BIG_WRITES | abi.INIT_EXT)
    assert fields[6] == 1 << 20 and fields[8] == 256
    assert fields[10] == 1 << 5 and fields[11] == 1

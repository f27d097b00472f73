"""The binding's callback wrapper: results and errnos are answered directly, anything else is handled by the
binding's own rules (logged, EINVAL, under either binding), every callback keeps its thread's Python state, and
the xattr callbacks answer sizes, values, ERANGE and ENODATA themselves."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from typing import Any

import pytest

from mountd.highlevel import binding
from mountd.highlevel.binding import UnionFUSE
from unionfs.fs.attr import Attr


def _fuse() -> Any:
    return object.__new__(UnionFUSE)  # the wrapper needs no mount


def test_a_result_is_returned_and_none_is_zero() -> None:
    fuse = _fuse()
    assert fuse._wrapper(lambda a, b: a + b, 2, 3) == 5
    assert fuse._wrapper(lambda: None) == 0


def test_an_oserror_becomes_its_negative_errno() -> None:
    def fails(path: str) -> int:
        raise OSError(errno.ENODATA, "no data", path)

    assert _fuse()._wrapper(fails, "/x") == -errno.ENODATA


def test_other_failures_go_to_the_binding_which_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int:
        raise ValueError("a bug")

    def bad_errno() -> int:
        raise OSError(-5, "negative")

    with caplog.at_level(logging.ERROR):
        assert _fuse()._wrapper(broken) == -errno.EINVAL
        assert _fuse()._wrapper(bad_errno) == -errno.EINVAL
    assert "broken" in caplog.text and "a bug" in caplog.text
    assert "bad_errno" in caplog.text


def test_a_callback_thread_keeps_its_thread_state() -> None:
    seen: list[bool] = []

    def run() -> None:
        seen.append(getattr(binding._adopted, "done", False))
        _fuse()._wrapper(lambda: 0)
        seen.append(getattr(binding._adopted, "done", False))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [False, True]


class _XattrOps:
    """An adapter with one file ``/f`` holding ``user.a`` = b"xyz"."""

    def getxattr(self, path: str, name: str) -> bytes | None:
        if path != "/f":
            raise OSError(errno.ENOENT, "missing", path)
        return b"xyz" if name == "user.a" else None

    def listxattr(self, path: str) -> list[str]:
        return ["user.a", "user.b\udcff"] if path == "/f" else []


def _xattr_fuse() -> Any:
    fuse = _fuse()
    fuse.operations = _XattrOps()
    fuse.encoding = "utf-8"
    return fuse


def test_getxattr_answers_value_size_erange_and_enodata() -> None:
    fuse = _xattr_fuse()
    buf = ctypes.create_string_buffer(8)
    assert fuse._wrapper(fuse.getxattr, b"/f", b"user.a", None, 0) == 3  # the size alone
    assert fuse._wrapper(fuse.getxattr, b"/f", b"user.a", buf, 8) == 3
    assert buf.raw[:3] == b"xyz"
    assert fuse._wrapper(fuse.getxattr, b"/f", b"user.a", buf, 2) == -errno.ERANGE
    assert fuse._wrapper(fuse.getxattr, b"/f", b"user.none", buf, 8) == -errno.ENODATA
    assert fuse._wrapper(fuse.getxattr, b"/gone", b"user.a", buf, 8) == -errno.ENOENT


def test_listxattr_answers_nul_terminated_names_in_the_path_encoding() -> None:
    fuse = _xattr_fuse()
    expected = b"user.a\0user.b\xff\0"
    buf = ctypes.create_string_buffer(32)
    assert fuse._wrapper(fuse.listxattr, b"/f", None, 0) == len(expected)
    assert fuse._wrapper(fuse.listxattr, b"/f", buf, 32) == len(expected)
    assert buf.raw[:len(expected)] == expected
    assert fuse._wrapper(fuse.listxattr, b"/f", buf, len(expected) - 1) == -errno.ERANGE
    assert fuse._wrapper(fuse.listxattr, b"/empty", buf, 32) == 0


def test_pack_stat_fills_every_field_as_the_binding_would_and_packs_a_record_once() -> None:
    """The frontend packs the core's :class:`Attr` itself: the same bytes as the binding's own conversion of
    the same attributes (times in ns), kept in the record's ``packed`` slot and reused."""
    attr = Attr(stat.S_IFREG | 0o4751, 1 << 50 | 7, 3, 1000, 1001, os.makedev(8, 1), 12345, 24, 4096,
                1_700_000_000_123_456_789, 1_600_000_000_000_000_001, 1_500_000_000_999_999_999)
    reference = binding._c_stat()
    fields = {name: getattr(attr, name) for name in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid",
                                                     "st_rdev", "st_size", "st_blocks", "st_blksize")}
    fields.update(st_atime=attr.st_atime_ns, st_mtime=attr.st_mtime_ns, st_ctime=attr.st_ctime_ns)
    binding._module.set_st_attrs(reference, fields, use_ns=True)
    packed = binding.pack_stat(attr)
    assert packed == ctypes.string_at(ctypes.addressof(reference), ctypes.sizeof(reference))
    unpacked = binding._c_stat.from_buffer_copy(packed)
    assert (unpacked.st_mtimespec.tv_sec, unpacked.st_mtimespec.tv_nsec) == (1_600_000_000, 1)
    assert attr.packed is packed and binding.pack_stat(attr) is packed

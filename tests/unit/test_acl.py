"""What a parent's default ACL makes of a new child's mode (``posix_acl_create``): each class keeps what
both the ACL and the requested mode allow; the group class is the mask where there is one."""

from __future__ import annotations

import struct

import pytest

from unionfs.fs.acl import inherited_mode

USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def value(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


WITH_MASK = value((USER_OBJ, 7, NO_ID), (USER, 7, 1), (GROUP_OBJ, 5, NO_ID), (MASK, 7, NO_ID), (OTHER, 5, NO_ID))
WITHOUT_MASK = value((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 0, NO_ID))


@pytest.mark.parametrize(("acl", "mode", "expected"), [
    (WITH_MASK, 0o666, 0o664),      # the mask (rwx), not the owning group (r-x), is the group class
    (WITH_MASK, 0o777, 0o775),
    (WITH_MASK, 0o640, 0o640),
    (WITH_MASK, 0o2750, 0o2750),    # set-id and sticky bits are the mode's
    (WITHOUT_MASK, 0o777, 0o640),
    (WITHOUT_MASK, 0o604, 0o600),
])
def test_each_class_keeps_what_both_allow(acl: bytes, mode: int, expected: int) -> None:
    assert inherited_mode(acl, mode) == expected


@pytest.mark.parametrize("bad", [
    b"",
    struct.pack("<I", 1) + struct.pack("<HHI", USER_OBJ, 7, NO_ID),   # another version
    WITH_MASK[:-1],                                                    # a torn entry
    value((USER_OBJ, 7, NO_ID), (OTHER, 5, NO_ID)),                    # no owning-group entry
])
def test_what_is_not_an_acl_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        inherited_mode(bad, 0o666)

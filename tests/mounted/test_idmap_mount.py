"""uidmapping=/gidmapping=/squash_to_root through a real mount: owners are shown mapped, and a chown through
the mount stores the unmapped owner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.mounts import unionfs_mount

pytestmark = pytest.mark.mounted


def _dirs(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_text("f")
    os.chown(lower / "f", 7, 8)
    return lower, upper, work, mnt


def test_mapped_owners_through_the_mount(tmp_path: Path) -> None:
    lower, upper, work, mnt = _dirs(tmp_path)
    opts = ["uidmapping=0:100000:65536", "gidmapping=0:200000:65536"]
    with unionfs_mount([lower], upper, work, mnt, options=opts):
        st = os.lstat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (100007, 200008)
        os.chown(mnt / "f", 100001, 200002)
        st = os.lstat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (100001, 200002)
    st = os.lstat(upper / "f")
    assert (st.st_uid, st.st_gid) == (1, 2)


def test_squash_to_root_shows_everything_as_root(tmp_path: Path) -> None:
    lower, upper, work, mnt = _dirs(tmp_path)
    with unionfs_mount([lower], upper, work, mnt, options=["squash_to_root"]):
        st = os.lstat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.lstat(lower / "f").st_uid == 7

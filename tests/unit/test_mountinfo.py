"""unionfs.mountinfo: the one reader of /proc/self/mountinfo undoes the kernel's octal escapes and only those."""

from __future__ import annotations

from pathlib import Path

import pytest

from unionfs import mountinfo
from unionfs.mountinfo import MountInfo, mounts, unescape

SAMPLE = (
    "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
    "90 22 0:50 / /mnt/with\\040space\\011tab rw shared:5 - overlay over\\134lay "
    "rw,lowerdir=/l\\054x:/m,upperdir=/u\n"
    "91 22 0:51 / /mnt/caf\u00e9 rw - fuse.unionfs-mount unionfs rw,user_id=0\n"
    "garbage line\n"
    "92 22 0:52 / /mnt/caf\u00e9 rw - tmpfs tmpfs rw\n"
)


def test_fields_are_unescaped_and_super_options_kept(tmp_path: Path) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_text(SAMPLE, encoding="utf-8")
    found = mounts(str(sample))
    assert [m.mount_id for m in found] == [22, 90, 91, 92], "the malformed line is skipped"
    spaced = found[1]
    assert spaced == MountInfo(90, "0:50", "/mnt/with space\ttab", "overlay", "over\\lay",
                               "rw,lowerdir=/l\\054x:/m,upperdir=/u")
    assert found[2].mountpoint == "/mnt/caf\u00e9", "UTF-8 names stay as they are"


def test_unescape_leaves_what_is_not_an_octal_escape() -> None:
    assert unescape("a\\134b") == "a\\b"
    assert unescape("a\\1b") == "a\\1b"
    assert unescape("a\\189") == "a\\189", "8 and 9 are not octal digits"
    assert unescape("plain") == "plain"


def test_find_mount_answers_the_topmost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_text(SAMPLE, encoding="utf-8")
    monkeypatch.setattr(mountinfo, "MOUNTINFO", str(sample))
    top = mountinfo.find_mount(Path("/mnt/caf\u00e9"))
    assert top is not None and top.fstype == "tmpfs"
    assert mountinfo.find_mount("/mnt/none") is None

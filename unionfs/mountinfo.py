"""The one reader of ``/proc/self/mountinfo``: which mounts this mount namespace has.

A line is ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS``; the kernel
writes space, tab, newline and backslash (and, in overlay options, comma) inside a field as ``\\ooo`` octal
escapes, which :func:`unescape` undoes (the super options stay escaped: their commas separate options, see
:func:`unionfs.mountopts.split_options`).  Names that are not UTF-8 keep their bytes as surrogate escapes, as
``os.fsdecode`` would.  Callers: the in-use checks, the mount lifecycle, the demo, the tests, the benchmarks.
"""

from __future__ import annotations

import os
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"


class MountInfo(NamedTuple):
    """One line of mountinfo; ``mountpoint`` and ``source`` are unescaped, ``super_options`` is not."""

    mount_id: int
    device: str
    mountpoint: str
    fstype: str
    source: str
    super_options: str


def unescape(field: str) -> str:
    r"""Undo mountinfo's ``\ooo`` octal escapes (a backslash not followed by three octal digits stays)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(path: str | None = None) -> list[MountInfo]:
    """Every mount of this mount namespace (``path``: another mountinfo file) in mountinfo order (a later
    line is on top of an earlier one at the same mount point).  Malformed lines are skipped."""
    out = []
    with open(path or MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            if len(lf) < 5 or len(rf) < 2 or not lf[0].isdigit():
                continue
            out.append(MountInfo(int(lf[0]), lf[2], unescape(lf[4]), rf[0], unescape(rf[1]),
                                 rf[2] if len(rf) > 2 else ""))
    return out


def find_mount(mountpoint: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at ``mountpoint`` (an absolute path, compared as given), or None."""
    wanted = os.fspath(mountpoint)
    found = [m for m in mounts() if m.mountpoint == wanted]
    return found[-1] if found else None

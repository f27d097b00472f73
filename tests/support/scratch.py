"""Scratch space for differential runs on a private tmpfs.

The upper filesystem decides some observable details: ext4 reuses an inode number as soon as it is freed
(which makes "kept its st_ino" ambiguous across steps) and updates mtime on every truncate, tmpfs never reuses
inode numbers within a mount and leaves mtime alone when ``truncate(2)`` keeps the size. Running the same
scenarios on both shows more.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def private_tmpfs(path: Path, *, size: str = "512m") -> Iterator[Path]:
    """Mount a tmpfs at the existing empty directory ``path``; yield it; always unmount (lazily if busy)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "unionfs-scratch", str(path)],
                   check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def scratch_area(path: Path) -> Iterator[Path]:
    """``private_tmpfs(path)``, or just ``path`` when ``UNIONFS_SM_TMPFS=0``."""
    if os.environ.get("UNIONFS_SM_TMPFS", "1") == "0":
        yield path
        return
    with private_tmpfs(path) as area:
        yield area

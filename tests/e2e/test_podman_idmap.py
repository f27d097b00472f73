"""A container with ``--uidmap``/``--gidmap``: podman passes ``uidmapping=``/``gidmapping=`` and idmapped lower
mounts, then removes those mounts as soon as the program returns.  unionfs must show and store owners exactly
as fuse-overlayfs does, and keep working after the idmapped lowers are gone (the layers were opened before the
program returned)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import StoragePool
from e2e_support import BASE_IMAGE, Storage

from unionfs.mountinfo import mounts

pytestmark = pytest.mark.e2e

PROBE = r"""
set -e
cd "$1"
find etc/passwd etc/shadow usr/bin/su tmp root usr/bin -maxdepth 0 -printf '%U %G %m %p\n'
find etc -maxdepth 1 -printf '%U %G %m %y %p\n' | sort
cat etc/debian_version
touch new.file && mkdir new.dir && ln -s new.file new.link && echo more >> etc/issue.net
chown 100007:200008 new.file
find new.file new.dir new.link etc/issue.net -maxdepth 0 -printf '%U %G %m %y %p\n'
"""


def _mounted_with_uidmap(storage: Storage) -> tuple[str, list[str], list[str]]:
    """Create a container with id maps, ``podman mount`` it, probe the tree through the mount; return the
    program's mount options, the probe's lines and the owners stored in the container's upper dir."""
    name = f"idmap-{uuid.uuid4().hex[:8]}"
    storage.podman("create", "--name", name, "--uidmap", "0:100000:65536", "--gidmap", "0:200000:65536",
                   BASE_IMAGE, "true")
    try:
        merged = storage.podman("mount", name).stdout.strip()
        try:
            entry = next(m for m in mounts() if m.mountpoint == merged)
            leftover = [m.mountpoint for m in mounts() if "/mapped/" in m.mountpoint]
            assert leftover == [], f"idmapped lowers still mounted: {leftover}"
            probe = subprocess.run(["sh", "-c", PROBE, "probe", merged], capture_output=True, text=True,
                                   check=True).stdout.splitlines()
            upper = Path(merged).parent / "diff"
            stored = subprocess.run(["find", ".", "-printf", r"%U %G %y %p\n"], cwd=upper, capture_output=True,
                                    text=True, check=True).stdout.splitlines()
        finally:
            storage.podman("umount", name)
    finally:
        storage.podman("rm", name)
    return entry.fstype, probe, sorted(stored)


def test_uidmap_mount_matches_fuse_overlayfs(storage_pool: StoragePool) -> None:
    """Owners shown, owners stored, and the tree itself: the same as fuse-overlayfs gives podman."""
    fstype, ours, ours_stored = _mounted_with_uidmap(storage_pool.get("unionfs"))
    _, theirs, theirs_stored = _mounted_with_uidmap(storage_pool.get("fuse-overlayfs"))
    assert fstype == "fuse.unionfs"
    assert ours == theirs
    # fuse-overlayfs also marks the directories it creates opaque with a ``.wh..opq`` whiteout of its own;
    # unionfs writes the kernel's format (tests/differential), so markers are left out of the comparison
    assert ours_stored == [line for line in theirs_stored if "/.wh." not in line]
    # the chown through the mount stored the unmapped owner
    assert "7 8 f ./new.file" in ours_stored
    assert any(line.endswith(" etc/issue.net") for line in ours)

"""Both FUSE bindings of the fusepy frontend (``frontend=fusepy``) serve the same union: mfusepy on libfuse3
(its default) and plain fusepy on libfuse2 (the fallback, chosen with UNIONFS_BINDING=fusepy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import unionfs_mount

pytestmark = pytest.mark.mounted


@pytest.mark.parametrize("binding,libfuse", [("mfusepy", "3"), ("fusepy", "2")])
def test_each_binding_mounts_and_serves_the_union(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  binding: str, libfuse: str) -> None:
    version = subprocess.run([str(Path(sys.prefix) / "bin" / "unionfs-mount"), "--version"],
                             env={**os.environ, "UNIONFS_BINDING": binding}, capture_output=True, text=True)
    assert f"binding {binding}" in version.stdout and f"libfuse {libfuse}" in version.stdout, version.stdout
    monkeypatch.setenv("UNIONFS_BINDING", binding)
    monkeypatch.setenv("UNIONFS_FRONTEND", "fusepy")
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "keep").write_text("lower data\n")
    (lower / "gone").write_text("x")
    os.utime(lower / "keep", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    with unionfs_mount([lower], upper, work, mnt):
        st = os.stat(mnt / "keep")
        assert st.st_mtime_ns == 1_600_000_000_123_456_789
        assert st.st_ino == os.stat(lower / "keep").st_ino
        with open(mnt / "keep", "a") as fh:
            fh.write("appended\n")
        os.unlink(mnt / "gone")
        os.rename(mnt / "keep", mnt / "moved")
        os.truncate(mnt / "moved", 5)
        assert sorted(os.listdir(mnt)) == ["moved"]
        assert (mnt / "moved").read_text() == "lower"
    assert (upper / "moved").read_text() == "lower"

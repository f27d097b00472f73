"""Permissions through the mount (``allow_other,default_permissions``, added by the daemon as root).

A forked child that drops to uid/gid 1 or 65534 (``setresgid``/``setresuid``, no supplementary groups) cannot
read a 0600 root file, write a 0644 root file, or remove/rename a root file in a sticky dir it does not own;
a write by a non-owner to a 06777 file clears set-uid and set-gid. Every answer (errno or result) is compared
with the kernel's overlayfs over a copy of the same layers, and checked against the expected values.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.mounts import kernel_overlay_mount, unionfs_mount

pytestmark = pytest.mark.mounted

Results = dict[str, object]


@pytest.fixture
def base() -> Iterator[Path]:
    """A dir other users can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="unionfs-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def build(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
        d.chmod(0o755)
    (lower / "secret").write_bytes(b"root only\n")
    (lower / "secret").chmod(0o600)
    (lower / "pub").write_bytes(b"read only for others\n")
    (lower / "pub").chmod(0o644)
    sticky = lower / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "victim").write_bytes(b"root's\n")
    (sticky / "mine").write_bytes(b"theirs\n")
    for n in ("secret", "pub", "suid", "sgid"):
        (lower / n).touch()
    (lower / "suid").chmod(0o6777)
    (lower / "sgid").chmod(0o2777)
    (upper / "up-suid").write_bytes(b"upper\n")
    (upper / "up-suid").chmod(0o6777)
    return lower, upper, work, mnt


def as_user(uid: int, fn: Callable[[], Results]) -> Results:
    """Run ``fn`` in a forked child with real, effective and saved uid/gid ``uid``; return its results."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = json.dumps(fn()).encode()
        except BaseException as exc:  # reported to the parent
            out = json.dumps({"child error": repr(exc)}).encode()
        os.write(w, out)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result: Results = json.loads(data)
    return result


def probe(mnt: Path, uid: int) -> Results:
    def err(fn: Callable[[], object]) -> object:
        try:
            fn()
            return 0
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, exc.errno)

    def write(name: str) -> None:
        fd = os.open(mnt / name, os.O_WRONLY)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    def ops() -> Results:
        return {
            "read secret": err(lambda: os.close(os.open(mnt / "secret", os.O_RDONLY))),
            "write pub": err(lambda: os.close(os.open(mnt / "pub", os.O_WRONLY))),
            "truncate pub": err(lambda: os.truncate(mnt / "pub", 0)),
            "chmod pub": err(lambda: os.chmod(mnt / "pub", 0o666)),
            "read pub": err(lambda: os.close(os.open(mnt / "pub", os.O_RDONLY))),
            "unlink sticky victim": err(lambda: os.unlink(mnt / "sticky" / "victim")),
            "rename sticky victim": err(lambda: os.rename(mnt / "sticky" / "victim", mnt / "sticky" / "v2")),
            "create in sticky": err(lambda: os.close(os.open(mnt / "sticky" / f"new{uid}",
                                                             os.O_CREAT | os.O_WRONLY, 0o644))),
            "unlink own in sticky": err(lambda: os.unlink(mnt / "sticky" / f"new{uid}")),
            "create in root dir": err(lambda: os.close(os.open(mnt / f"x{uid}", os.O_CREAT | os.O_WRONLY))),
            "write suid": err(lambda: write("suid")),
            "write sgid": err(lambda: write("sgid")),
            "write up-suid": err(lambda: write("up-suid")),
        }

    result = as_user(uid, ops)
    for name in ("suid", "sgid", "up-suid", "pub", "secret"):
        result[f"mode {name}"] = oct(stat.S_IMODE(os.stat(mnt / name).st_mode))
    result["sticky listing"] = sorted(os.listdir(mnt / "sticky"))
    return result


EXPECTED = {
    "read secret": "EACCES", "write pub": "EACCES", "truncate pub": "EACCES", "chmod pub": "EPERM",
    "read pub": 0, "unlink sticky victim": "EPERM", "rename sticky victim": "EPERM", "create in sticky": 0,
    "unlink own in sticky": 0, "create in root dir": "EACCES", "write suid": 0, "write sgid": 0,
    "write up-suid": 0, "mode suid": "0o777", "mode sgid": "0o777", "mode up-suid": "0o777",
    "mode pub": "0o644", "mode secret": "0o600", "sticky listing": ["mine", "victim"],
}


@pytest.mark.parametrize("uid", [1, 65534])
def test_non_root_callers_get_the_kernels_answers(base: Path, uid: int) -> None:
    lower, upper, work, mnt = build(base / "u")
    with unionfs_mount([lower], upper, work, mnt) as m:
        ours = probe(m, uid)
    klower, kupper, kwork, kmnt = build(base / "k")
    with kernel_overlay_mount([klower], kupper, kwork, kmnt) as m:
        kernel = probe(m, uid)
    assert ours == kernel
    assert ours == EXPECTED

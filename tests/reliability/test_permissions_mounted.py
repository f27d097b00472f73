"""Permissions through the mount (``allow_other,default_permissions``, added by the daemon as root), POSIX
ACLs included.

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
import struct
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


def as_user(uid: int, fn: Callable[[], Results], groups: tuple[int, ...] = ()) -> Results:
    """Run ``fn`` in a forked child with real, effective and saved uid/gid ``uid`` and the supplementary
    ``groups``; return its results."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups(list(groups))
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


def outcome(fn: Callable[[], object]) -> object:
    """0 if ``fn`` succeeds, else the name of its errno."""
    try:
        fn()
        return 0
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, exc.errno)


def probe(mnt: Path, uid: int) -> Results:
    def write(name: str) -> None:
        fd = os.open(mnt / name, os.O_WRONLY)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    def ops() -> Results:
        return {
            "read secret": outcome(lambda: os.close(os.open(mnt / "secret", os.O_RDONLY))),
            "write pub": outcome(lambda: os.close(os.open(mnt / "pub", os.O_WRONLY))),
            "truncate pub": outcome(lambda: os.truncate(mnt / "pub", 0)),
            "chmod pub": outcome(lambda: os.chmod(mnt / "pub", 0o666)),
            "read pub": outcome(lambda: os.close(os.open(mnt / "pub", os.O_RDONLY))),
            "unlink sticky victim": outcome(lambda: os.unlink(mnt / "sticky" / "victim")),
            "rename sticky victim": outcome(lambda: os.rename(mnt / "sticky" / "victim", mnt / "sticky" / "v2")),
            "create in sticky": outcome(lambda: os.close(os.open(mnt / "sticky" / f"new{uid}",
                                                             os.O_CREAT | os.O_WRONLY, 0o644))),
            "unlink own in sticky": outcome(lambda: os.unlink(mnt / "sticky" / f"new{uid}")),
            "create in root dir": outcome(lambda: os.close(os.open(mnt / f"x{uid}", os.O_CREAT | os.O_WRONLY))),
            "write suid": outcome(lambda: write("suid")),
            "write sgid": outcome(lambda: write("sgid")),
            "write up-suid": outcome(lambda: write("up-suid")),
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


def on_both(base: Path, build_layers: Callable[[Path], tuple[Path, Path, Path, Path]],
            probe_mount: Callable[[Path], Results]) -> tuple[Results, Results]:
    """``probe_mount`` on unionfs and on the kernel's overlayfs, each over its own copy of the layers
    ``build_layers`` makes; (unionfs's results, the kernel's)."""
    lower, upper, work, mnt = build_layers(base / "u")
    with unionfs_mount([lower], upper, work, mnt) as m:
        ours = probe_mount(m)
    klower, kupper, kwork, kmnt = build_layers(base / "k")
    with kernel_overlay_mount([klower], kupper, kwork, kmnt) as m:
        kernel = probe_mount(m)
    return ours, kernel


@pytest.mark.parametrize("uid", [1, 65534])
def test_non_root_callers_get_the_kernels_answers(base: Path, uid: int) -> None:
    ours, kernel = on_both(base, build, lambda m: probe(m, uid))
    assert ours == kernel
    assert ours == EXPECTED


# -- POSIX ACLs -------------------------------------------------------------------------------------------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_NO_ID = 0xFFFFFFFF
ACCESS_ACL = "system.posix_acl_access"
USERS_GROUP = 100


def acl_xattr(*entries: tuple[int, int, int]) -> bytes:
    """The ``system.posix_acl_access`` value of (tag, permission bits, id) entries, in the kernel's order."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in entries)


def build_acls(root: Path) -> tuple[Path, Path, Path, Path]:
    """``deny``: 0664 root:users with ``user:65534:---`` (the group class alone would let a member of users
    in); ``grant``: 0660 root:root with ``user:1:rw-`` (the mode alone would keep uid 1 out)."""
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
        d.chmod(0o755)
    (lower / "deny").write_bytes(b"not for 65534\n")
    os.chown(lower / "deny", 0, USERS_GROUP)
    os.setxattr(lower / "deny", ACCESS_ACL, acl_xattr(
        (ACL_USER_OBJ, 6, ACL_NO_ID), (ACL_USER, 0, 65534), (ACL_GROUP_OBJ, 6, ACL_NO_ID), (ACL_MASK, 6, ACL_NO_ID),
        (ACL_OTHER, 4, ACL_NO_ID)))
    (lower / "grant").write_bytes(b"for uid 1\n")
    os.setxattr(lower / "grant", ACCESS_ACL, acl_xattr(
        (ACL_USER_OBJ, 6, ACL_NO_ID), (ACL_USER, 6, 1), (ACL_GROUP_OBJ, 4, ACL_NO_ID), (ACL_MASK, 6, ACL_NO_ID),
        (ACL_OTHER, 0, ACL_NO_ID)))
    return lower, upper, work, mnt


def probe_acls(mnt: Path) -> Results:
    def read(name: str) -> Callable[[], Results]:
        return lambda: {"r": outcome(lambda: os.close(os.open(mnt / name, os.O_RDONLY)))}

    def write(name: str) -> Callable[[], Results]:
        return lambda: {"w": outcome(lambda: os.close(os.open(mnt / name, os.O_WRONLY)))}

    result: Results = {
        "65534 in users reads deny": as_user(65534, read("deny"), groups=(USERS_GROUP,))["r"],
        "1 in users reads deny": as_user(1, read("deny"), groups=(USERS_GROUP,))["r"],
        "1 reads grant": as_user(1, read("grant"))["r"],
        "1 writes grant": as_user(1, write("grant"))["w"],
        "2 reads grant": as_user(2, read("grant"))["r"],
        "mode grant": oct(stat.S_IMODE(os.stat(mnt / "grant").st_mode)),
    }
    os.chmod(mnt / "grant", 0o600)  # the group class, i.e. the ACL's mask, goes to ---
    result["1 reads grant after chmod 600"] = as_user(1, read("grant"))["r"]
    result["acl kept by the copy-up"] = os.getxattr(mnt / "grant", ACCESS_ACL)[:4] == struct.pack("<I", 2)
    return result


ACL_EXPECTED: Results = {
    "65534 in users reads deny": "EACCES", "1 in users reads deny": 0, "1 reads grant": 0, "1 writes grant": 0,
    "2 reads grant": "EACCES", "mode grant": "0o660", "1 reads grant after chmod 600": "EACCES",
    "acl kept by the copy-up": True,
}


def test_posix_acls_are_enforced_as_by_the_kernel(base: Path) -> None:
    """A named-user entry denies what the group class would allow, and grants what the mode would not; a
    chmod through the mount narrows the ACL's mask (the copy-up keeps the ACL)."""
    ours, kernel = on_both(base, build_acls, probe_acls)
    assert ours == kernel
    assert ours == ACL_EXPECTED


def test_noacl_leaves_permissions_to_the_mode_bits(base: Path) -> None:
    """``-o noacl`` (fuse-overlayfs's option): the kernel no longer reads the ACLs, only the mode bits."""
    lower, upper, work, mnt = build_acls(base / "u")
    with unionfs_mount([lower], upper, work, mnt, ("noacl",)) as m:
        assert as_user(65534, lambda: {"r": _read_errno(m / "deny")}, groups=(USERS_GROUP,))["r"] == 0
        assert as_user(1, lambda: {"r": _read_errno(m / "grant")})["r"] == "EACCES"


def _read_errno(path: Path) -> object:
    return outcome(lambda: os.close(os.open(path, os.O_RDONLY)))


DEFAULT_ACL = "system.posix_acl_default"


def build_default_acl(root: Path) -> tuple[Path, Path, Path, Path]:
    """``d`` with a default ACL granting uid 1 rwx, holding a lower file and dir to delete and re-create
    (the new objects then replace whiteouts)."""
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "d").mkdir()
    (lower / "d" / "old").write_bytes(b"old\n")
    (lower / "d" / "olddir").mkdir()
    os.setxattr(lower / "d", DEFAULT_ACL, acl_xattr(
        (ACL_USER_OBJ, 7, ACL_NO_ID), (ACL_USER, 7, 1), (ACL_GROUP_OBJ, 5, ACL_NO_ID), (ACL_MASK, 7, ACL_NO_ID),
        (ACL_OTHER, 5, ACL_NO_ID)))
    return lower, upper, work, mnt


def create_under_default_acl(mnt: Path) -> Results:
    """New objects with umask 022: in ``d`` the default ACL decides (the umask plays no part), also over
    whiteouts; at the top the umask applies."""
    old_umask = os.umask(0o022)
    try:
        os.close(os.open(mnt / "d" / "new", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(mnt / "d" / "sub", 0o777)
        os.unlink(mnt / "d" / "old")
        os.close(os.open(mnt / "d" / "old", os.O_CREAT | os.O_WRONLY, 0o640))
        os.rmdir(mnt / "d" / "olddir")
        os.mkdir(mnt / "d" / "olddir", 0o750)
        os.mkfifo(mnt / "d" / "fifo", 0o666)
        os.close(os.open(mnt / "top", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old_umask)

    def xattr(path: Path, name: str) -> str:
        try:
            return os.getxattr(path, name).hex()
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc.errno))

    result: Results = {}
    for rel in ("d/new", "d/sub", "d/old", "d/olddir", "d/fifo", "top"):
        path = mnt / rel
        result[rel] = [oct(os.lstat(path).st_mode), xattr(path, ACCESS_ACL), xattr(path, DEFAULT_ACL)]
    result["uid 1 reads d/old"] = as_user(1, lambda: {"r": _read_errno(mnt / "d" / "old")})["r"]
    result["uid 2 reads d/old"] = as_user(2, lambda: {"r": _read_errno(mnt / "d" / "old")})["r"]
    return result


def test_default_acls_and_the_umask_decide_new_modes_as_in_the_kernel(base: Path) -> None:
    ours, kernel = on_both(base, build_default_acl, create_under_default_acl)
    assert ours == kernel
    assert ours["d/new"][0] == "0o100664" and ours["d/sub"][0] == "0o40775"  # the umask played no part
    assert ours["top"][0] == "0o100644" and ours["top"][1] == "ENODATA"  # the umask applied, no ACL
    assert ours["d/old"][1] != "ENODATA" and ours["d/olddir"][2] != "ENODATA"  # inherited over whiteouts
    # the inherited named entry lets uid 1 read the 0640 file that "other" may not
    assert (ours["uid 1 reads d/old"], ours["uid 2 reads d/old"]) == (0, "EACCES")

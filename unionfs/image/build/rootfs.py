"""Paths and users inside an image's root, read through a :class:`HostDir` of it (a mounted union).

A path in a COPY destination or a WORKDIR means a path *in the image*: a symlink on the way is resolved as
the container would resolve it (an absolute target starts again at the image's root, ``..`` stops at it),
never on the host, so an image cannot send a build outside its root.  User and group names are looked up in
the image's ``/etc/passwd`` and ``/etc/group``.
"""

from __future__ import annotations

import errno
import posixpath
import stat as stat_mod

from unionfs.fs.fsio import HostDir, join

_MAX_LINKS = 40


class RootfsError(ValueError):
    """A path or user that cannot be resolved in the image; ``str()`` is one line for the user."""


def resolve(root: HostDir, path: str, *, follow_last: bool = True) -> str:
    """The image path ``path`` (absolute) as a relative path of ``root`` without symlinks in it (the last
    component is resolved only with ``follow_last``); missing components are kept as they are."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        rel = join("/".join(done), part)
        st = root.try_lstat(rel)
        if st is None or not stat_mod.S_ISLNK(st.st_mode) or (not parts and not follow_last):
            done.append(part)
            continue
        hops += 1
        if hops > _MAX_LINKS:
            raise RootfsError(f"{path}: too many levels of symbolic links in the image")
        target = root.readlink(rel)
        if target.startswith("/"):
            done = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return "/".join(done)


def makedirs(root: HostDir, rel: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
    """Create the directory ``rel`` (resolved, see :func:`resolve`) and its missing parents, owned by
    ``uid:gid``; RootfsError where a non-directory is in the way."""
    done = ""
    for part in rel.split("/") if rel else []:
        done = join(done, part)
        st = root.try_lstat(done)
        if st is None:
            root.mkdir(done, mode)
            root.chown(done, uid, gid)
            root.chmod(done, mode)
        elif not stat_mod.S_ISDIR(st.st_mode):
            raise RootfsError(f"/{done} exists in the image and is not a directory")


def _read(root: HostDir, rel: str) -> str:
    try:
        data = root.read_bytes(resolve(root, "/" + rel))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return ""
        raise
    return data.decode(errors="replace")


def _table(root: HostDir, rel: str) -> dict[str, tuple[int, int]]:
    """name → (id, primary gid or -1) from a passwd- or group-style file."""
    out: dict[str, tuple[int, int]] = {}
    for line in _read(root, rel).splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            gid = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else -1
            out.setdefault(fields[0], (int(fields[2]), gid))
    return out


def user_ids(root: HostDir, spec: str, *, what: str = "USER") -> tuple[int, int]:
    """``USER``/``--chown`` ``user[:group]`` (names or numbers) → (uid, gid).  A user without a group gets
    its primary group from ``/etc/passwd`` (0 for a number not listed there).  RootfsError for an unknown
    name."""
    user, _, group = spec.partition(":")
    if not user:
        return 0, 0
    users = _table(root, "etc/passwd")
    if user.isdigit():
        uid = int(user)
        primary = next((g for u, g in users.values() if u == uid), 0)
    elif user in users:
        uid, primary = users[user]
    else:
        raise RootfsError(f"{what} {spec}: no user {user!r} in the image's /etc/passwd")
    if not group:
        return uid, max(primary, 0)
    if group.isdigit():
        return uid, int(group)
    groups = _table(root, "etc/group")
    if group not in groups:
        raise RootfsError(f"{what} {spec}: no group {group!r} in the image's /etc/group")
    return uid, groups[group][0]


def home_of(root: HostDir, uid: int) -> str | None:
    """The home directory ``/etc/passwd`` gives the user ``uid``, or None."""
    for line in _read(root, "etc/passwd").splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and fields[2] == str(uid) and fields[5].startswith("/"):
            return fields[5]
    return None


def supplementary_groups(root: HostDir, user: str) -> list[int]:
    """The groups of ``/etc/group`` that list ``user`` (a name) as a member."""
    out = []
    for line in _read(root, "etc/group").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and user in fields[3].split(","):
            out.append(int(fields[2]))
    return out


def exists(root: HostDir, path: str) -> bool:
    """Does the image path ``path`` exist (symlinks resolved in the image)?"""
    return root.try_lstat(resolve(root, path)) is not None if posixpath.normpath(path) != "/" else True

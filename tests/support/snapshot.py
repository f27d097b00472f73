"""Normalised snapshots of directory trees, comparable across mounts, copies and implementations.

``snapshot(root)`` describes what a mount SHOWS: every path (``"."`` is the root) maps to an ``Entry``
with type, permission bits, owner, size (not for dirs), link count, content hash, symlink target, sorted
``user.*`` xattrs, device numbers and — as a *relation*, never a number — which other paths share its
inode number. Ignored: atime, ctime, st_dev, directory sizes and directory mtimes. A non-directory's
mtime is kept when it predates ``changed_after`` (e.g. the fixed layer time, which copy-up must
preserve) and reported as ``"new"`` otherwise, so two runs made seconds apart still compare equal.

``upper_snapshot(upper)`` describes what a mount WROTE into its upper dir: whiteouts in any format
become type ``"whiteout"``, opaque markers become ``Entry.opaque``, private xattrs are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

NEW = "new"

PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "trusted.unionfs.", "user.unionfs.",
                          "user.fuseoverlayfs.", "trusted.fuseoverlayfs.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
XATTR_WHITEOUTS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_MARKER = ".wh..wh..opq"

Snapshot = dict[str, "Entry"]


@dataclass(frozen=True)
class Entry:
    """One path of a snapshot. Fields that do not apply to the type are None."""

    type: str  # file, dir, symlink, fifo, chr, blk, sock, whiteout, or "error:ERRNO"
    mode: int | None = None  # permission bits (S_IMODE), shown in octal by __repr__
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    nlink: int | None = None
    sha: str | None = None
    target: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    rdev: tuple[int, int] | None = None
    mtime: int | str | None = None
    same_ino: tuple[str, ...] = ()  # other paths of the snapshot with the same st_ino
    opaque: bool = False  # upper snapshots only
    redirect: str | None = None  # upper snapshots only: a renamed directory's overlay redirect xattr

    def __repr__(self) -> str:
        parts = [self.type]
        if self.mode is not None:
            parts.append(f"mode={self.mode:o}")
        for name in ("uid", "gid", "size", "nlink", "sha", "target", "rdev", "mtime", "redirect"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.xattrs:
            parts.append(f"xattrs={dict(self.xattrs)!r}")
        if self.same_ino:
            parts.append(f"same_ino={list(self.same_ino)}")
        if self.opaque:
            parts.append("OPAQUE")
        return "<" + " ".join(parts) + ">"


def type_name(mode: int) -> str:
    """The snapshot name of a file type."""
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return f"unknown:{mode:o}"


def errno_name(code: int | None) -> str:
    """``ENOENT`` for 2; the number itself if it has no name."""
    return errno.errorcode.get(code or 0, str(code))


def _content_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def _xattrs(path: str | Path, keep: tuple[str, ...], drop: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                   if n.startswith(keep) and not n.startswith(drop))
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def stat_entry(path: str | Path, *, follow: bool = False, changed_after: int | None = None,
               xattrs: bool = True) -> Entry:
    """The normalised description of one object (``lstat`` unless ``follow``); errors become
    ``Entry(type="error:ERRNO")``. ``same_ino`` is left empty (it is a property of a whole snapshot).
    Pass a ``str`` to keep a trailing slash (``"file/"`` is ENOTDIR); ``Path`` drops it.
    """
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as e:
        return Entry(type="error:" + errno_name(e.errno))
    kind = type_name(st.st_mode)
    entry = Entry(type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                  nlink=st.st_nlink)
    if kind != "dir":
        mtime: int | str = st.st_mtime_ns
        if changed_after is not None and st.st_mtime_ns >= changed_after:
            mtime = NEW
        entry = replace(entry, size=st.st_size, mtime=mtime)
    try:
        if kind == "file":
            entry = replace(entry, sha=_content_hash(path))
        elif kind == "symlink":
            entry = replace(entry, target=os.readlink(path), mode=None)
        elif kind in ("chr", "blk"):
            entry = replace(entry, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        if xattrs and kind != "symlink":
            entry = replace(entry, xattrs=_xattrs(path, ("user.",), PRIVATE_XATTR_PREFIXES))
    except OSError as e:
        return replace(entry, type=f"{kind}+error:{errno_name(e.errno)}")
    return entry


def _with_same_ino(entries: dict[str, Entry], inos: dict[str, int]) -> Snapshot:
    groups: dict[int, list[str]] = defaultdict(list)
    for path, ino in inos.items():
        groups[ino].append(path)
    out = {}
    for path in sorted(entries):
        entry = entries[path]
        if path in inos:
            others = tuple(sorted(p for p in groups[inos[path]] if p != path))
            if others:
                entry = replace(entry, same_ino=others)
        out[path] = entry
    return out


def snapshot(root: Path, *, changed_after: int | None = None) -> Snapshot:
    """What the tree under ``root`` shows, as ``{relative path: Entry}`` (root is ``"."``).

    Directory listings that fail are recorded as ``Entry(type="dir+error:ERRNO")`` for the directory.
    """
    entries: dict[str, Entry] = {}
    inos: dict[str, int] = {}

    def visit(rel: str) -> None:
        path = root / rel
        entry = stat_entry(path, changed_after=changed_after)
        entries[rel] = entry
        with contextlib.suppress(OSError):
            inos[rel] = os.lstat(path).st_ino
        if entry.type != "dir":
            return
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            entries[rel] = replace(entry, type="dir+error:" + errno_name(e.errno))
            return
        for name in names:
            visit(name if rel == "." else f"{rel}/{name}")

    visit(".")
    return _with_same_ino(entries, inos)


def _is_xattr_whiteout(path: Path, st: os.stat_result) -> bool:
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    names = os.listxattr(path, follow_symlinks=False)
    return any(n in names for n in XATTR_WHITEOUTS)


def upper_snapshot(upper: Path, *, changed_after: int | None = None) -> Snapshot:
    """What an overlay wrote into ``upper`` (or what a layer holds), with whiteout formats unified.

    A character device 0/0, a ``.wh.NAME`` file or an xattr whiteout all become ``NAME: whiteout``; a
    ``.wh..wh..opq`` file or an opaque xattr (value ``y``) sets ``opaque`` on its directory, a redirect xattr
    (``trusted.`` or ``user.overlay.redirect``) its ``redirect``. Other private xattrs
    (``PRIVATE_XATTR_PREFIXES``) are dropped; other ``user.*`` and ``trusted.*`` ones are kept.
    Directory link counts are left out: they count subdirectories, which says nothing more here.
    """
    entries: dict[str, Entry] = {}
    inos: dict[str, int] = {}

    def visit(rel: str) -> None:
        path = upper / rel
        st = os.lstat(path)
        if (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or _is_xattr_whiteout(path, st):
            entries[rel] = Entry(type="whiteout")
            return
        entry = stat_entry(path, changed_after=changed_after, xattrs=False)
        if entry.type != "symlink":
            entry = replace(entry, xattrs=_xattrs(path, ("user.", "trusted."), PRIVATE_XATTR_PREFIXES))
        inos[rel] = st.st_ino
        if entry.type != "dir":
            entries[rel] = entry
            return
        names = sorted(os.listdir(path))
        opaque = OCI_OPAQUE_MARKER in names or any(
            os.getxattr(path, n) == b"y" for n in OPAQUE_XATTRS if n in os.listxattr(path))
        redirects = [os.getxattr(path, n) for n in REDIRECT_XATTRS if n in os.listxattr(path)]
        entries[rel] = replace(entry, opaque=opaque, nlink=None,
                               redirect=os.fsdecode(redirects[0]) if redirects else None)
        for name in names:
            child = name if rel == "." else f"{rel}/{name}"
            if name == OCI_OPAQUE_MARKER:
                continue
            if name.startswith(OCI_WHITEOUT_PREFIX):
                hidden = name[len(OCI_WHITEOUT_PREFIX):]
                entries[hidden if rel == "." else f"{rel}/{hidden}"] = Entry(type="whiteout")
                continue
            visit(child)

    visit(".")
    return _with_same_ino(entries, inos)


def diff_snapshots(a: Snapshot, b: Snapshot, *, names: tuple[str, str] = ("a", "b")) -> list[str]:
    """Human-readable differences, one line per path; empty when equal."""
    lines = []
    for path in sorted(set(a) | set(b)):
        ea, eb = a.get(path), b.get(path)
        if ea != eb:
            lines.append(f"  {path}:\n    {names[0]}: {ea!r}\n    {names[1]}: {eb!r}")
    return lines

"""Whiteouts and opaque directories: read every format, write the one chosen at mount.

Formats read (docs/architecture.md, "Semantics in brief"):

* whiteout: a character device 0/0 (kernel); a ``.wh.NAME`` file (OCI/AUFS); a zero-size regular file with
  xattr ``trusted.overlay.whiteout`` / ``user.overlay.whiteout`` inside a directory whose ``overlay.opaque``
  xattr is ``x`` (the kernel's "xwhiteout" format);
* opaque directory: xattr ``trusted.overlay.opaque=y``, ``user.overlay.opaque=y``,
  ``user.fuseoverlayfs.opaque=y``, or a ``.wh..wh..opq`` file inside it.

Formats written: ``kernel`` (char 0/0 + ``trusted.overlay.opaque=y``) or ``oci`` (``.wh.NAME`` +
``.wh..wh..opq``).  Markers never appear in a listing of the union.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat as stat_mod
from collections.abc import Callable
from enum import Enum

from unionfs.fs.fsio import HostDir, join

WH_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
XWHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
KERNEL_OPAQUE_XATTR = "trusted.overlay.opaque"
USER_OPAQUE_XATTR = "user.overlay.opaque"
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
"""Where a directory renamed with ``redirect_dir=on`` records the path of its lower copies (read: both)."""
REDIRECT_MAX = 256
"""The longest redirect the kernel writes (its ``redirect_max`` module parameter): a longer one is EXDEV."""
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "trusted.unionfs.",
                          "user.unionfs.")
"""Overlay-private xattrs: hidden from getxattr/listxattr through the union, never copied up."""


class WhiteoutFormat(Enum):
    KERNEL = "kernel"
    OCI = "oci"


KERNEL_PREFIX = "trusted.overlay."
ESCAPED_PREFIX = "trusted.overlay.overlay."
"""Since Linux 6.7 a ``trusted.overlay.X`` xattr set through an overlay is stored as
``trusted.overlay.overlay.X`` (so overlays nest); it reads back under its own name."""


def is_private_xattr(name: str) -> bool:
    """True for a host xattr name that belongs to the overlay machinery (escaped user names excepted)."""
    return name.startswith(PRIVATE_XATTR_PREFIXES) and not name.startswith(ESCAPED_PREFIX)


def xattr_to_host(name: str) -> str | None:
    """The host name under which the union's xattr ``name`` is stored; None where it cannot be set."""
    if name.startswith(KERNEL_PREFIX):
        return ESCAPED_PREFIX + name[len(KERNEL_PREFIX):]
    if is_private_xattr(name):
        return None
    return name


def xattr_from_host(name: str) -> str | None:
    """The union's name of host xattr ``name``; None for overlay-private ones (hidden)."""
    if name.startswith(ESCAPED_PREFIX):
        return KERNEL_PREFIX + name[len(ESCAPED_PREFIX):]
    if is_private_xattr(name):
        return None
    return name


def is_kernel_whiteout(st: os.stat_result) -> bool:
    return stat_mod.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_marker_name(name: str) -> bool:
    """True for names that are whiteout/opaque markers in the OCI format (never shown)."""
    return name.startswith(WH_PREFIX)


# -- the one classifier of markers: every reader of a layer directory asks these ------------------------------

def dir_marks(opaque_value: bytes | None) -> tuple[bool, bool]:
    """What a directory's overlay opaque xattr (its first one set, None if none) says: ``(opaque,
    xwhiteouts)``; ``y`` hides the layers below, ``x`` means its children may be xattr whiteouts."""
    return opaque_value == b"y", opaque_value == b"x"


def marker_name(name: str) -> tuple[bool, str] | None:
    """An OCI marker name: ``(True, "")`` for the opaque marker ``.wh..wh..opq``, ``(False, NAME)`` for the
    whiteout ``.wh.NAME``; None for an ordinary name."""
    if not name.startswith(WH_PREFIX):
        return None
    if name == OPAQUE_MARKER:
        return True, ""
    return False, name[len(WH_PREFIX):]


_SUSPECT_KINDS = frozenset({0, stat_mod.S_IFCHR})
_SUSPECT_KINDS_XWHITEOUTS = _SUSPECT_KINDS | {stat_mod.S_IFREG}


def suspect_kinds(*, xwhiteouts: bool) -> frozenset[int]:
    """The kinds a directory listing reports (0: unknown) of entries that may still be whiteouts, in a
    directory marked for xattr whiteouts or not: only those need :func:`is_whiteout`; every other entry is
    what its listing says."""
    return _SUSPECT_KINDS_XWHITEOUTS if xwhiteouts else _SUSPECT_KINDS


def is_whiteout(st: os.stat_result, has_xattr: Callable[[str], bool] | None) -> bool:
    """Is the entry with lstat ``st`` a whiteout: a char 0/0 device, or (where ``has_xattr`` is given: in a
    directory marked for xattr whiteouts) a zero-size regular file with an overlay whiteout xattr?"""
    if is_kernel_whiteout(st):
        return True
    return has_xattr is not None and stat_mod.S_ISREG(st.st_mode) and st.st_size == 0 and any(
        has_xattr(a) for a in XWHITEOUT_XATTRS)


def write_opaque_xattr(setxattr: Callable[[str, bytes], None], attr: str = KERNEL_OPAQUE_XATTR) -> str:
    """Mark a directory opaque with ``setxattr(name, value)``: ``trusted.overlay.opaque=y``, or
    ``user.overlay.opaque=y`` where ``trusted.*`` is refused (EPERM).  Returns the name written, which a
    caller marking many directories passes back as ``attr``."""
    try:
        setxattr(attr, b"y")
    except PermissionError:
        if attr == USER_OPAQUE_XATTR:
            raise
        attr = USER_OPAQUE_XATTR
        setxattr(attr, b"y")
    return attr


class LayerDir:
    """One layer's copy of one directory, as far as the union cares.

    ``entries`` maps visible names to their file type (``S_IFMT`` bits), ``inos`` to their host inode
    numbers; ``whiteouts`` are names this layer
    hides in the layers below; ``opaque`` hides every layer below entirely.
    """

    __slots__ = ("entries", "inos", "opaque", "whiteouts")

    def __init__(self) -> None:
        self.entries: dict[str, int] = {}
        self.inos: dict[str, int] = {}
        self.whiteouts: set[str] = set()
        self.opaque = False

    def __repr__(self) -> str:
        return (f"LayerDir(entries={self.entries!r}, inos={self.inos!r}, whiteouts={self.whiteouts!r}, "
                f"opaque={self.opaque!r})")


def dir_opaque_value(host: HostDir, rel: str) -> bytes | None:
    """The first overlay opaque xattr of directory ``rel`` that is set (``b"y"``, ``b"x"`` …), else None."""
    for attr in OPAQUE_XATTRS:
        value = host.try_getxattr(rel, attr)
        if value is not None:
            return value
    return None


def dir_is_opaque(host: HostDir, rel: str) -> bool:
    """Is directory ``rel`` of a layer opaque (an opaque xattr ``y`` or a ``.wh..wh..opq`` inside), as
    :func:`read_layer_dir` would find, without reading the directory?"""
    return dir_marks(dir_opaque_value(host, rel))[0] or host.try_lstat(join(rel, OPAQUE_MARKER)) is not None


def dir_redirect(host: HostDir, rel: str) -> str | None:
    """The redirect of directory ``rel`` (the first overlay redirect xattr set), else None.

    A redirect is either one name (the directory's lower copies have that name in its parent's lower copies)
    or an absolute path ``/a/b`` from the root of the layers below.  EINVAL for anything else (a relative
    path with a slash, an empty component), as the kernel refuses such a lookup."""
    for attr in REDIRECT_XATTRS:
        value = host.try_getxattr(rel, attr)
        if value is None:
            continue
        text = os.fsdecode(value)
        parts = text[1:].split("/") if text.startswith("/") else text.split("/")
        if len(parts) > 1 and not text.startswith("/"):
            parts.append("")  # a relative redirect is one name
        if not all(parts) or any(p in (".", "..") for p in parts):
            raise OSError(errno.EINVAL, f"invalid redirect {text!r}", rel)
        return text
    return None


def _has_xattr(host: HostDir, rel: str, attr: str) -> bool:
    return host.try_getxattr(rel, attr) is not None


def read_layer_dir(host: HostDir, rel: str) -> LayerDir:
    """Scan directory ``rel`` of a layer: its entries, the whiteouts it holds and whether it is opaque.

    Raises OSError from the host (ENOENT/ENOTDIR where the directory is gone).
    """
    out = LayerDir()
    out.opaque, xwhiteouts = dir_marks(dir_opaque_value(host, rel))
    suspect = suspect_kinds(xwhiteouts=xwhiteouts)
    for name, kind, ino in host.scandir(rel):
        marker = marker_name(name) if name.startswith(WH_PREFIX) else None  # (most names are not markers)
        if marker is not None:
            if marker[0]:
                out.opaque = True
            else:
                out.whiteouts.add(marker[1])
            continue
        if kind in suspect:
            path = join(rel, name)
            try:
                st = host.lstat(path)
            except FileNotFoundError:
                continue
            if is_whiteout(st, functools.partial(_has_xattr, host, path) if xwhiteouts else None):
                out.whiteouts.add(name)
                continue
            kind = stat_mod.S_IFMT(st.st_mode)
        out.entries[name] = kind
        out.inos[name] = ino
    return out


class WhiteoutWriter:
    """Writes whiteouts and opaque marks in one format into the upper layer, through the work dir.

    ``work_rel`` is the staging directory (relative to ``work``) that is emptied at mount.
    """

    def __init__(self, fmt: WhiteoutFormat, upper: HostDir, work: HostDir, work_rel: str) -> None:
        self.format = fmt
        self.upper = upper
        self.work = work
        self.work_rel = work_rel

    # A kernel whiteout is made in the work dir and renamed into place, so that it appears atomically.
    def make_whiteout_in_work(self, tmp_name: str) -> str:
        rel = join(self.work_rel, tmp_name)
        if self.format is WhiteoutFormat.KERNEL:
            self.work.mknod(rel, stat_mod.S_IFCHR | 0o000, 0)
        else:
            fd = self.work.open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)
            os.close(fd)
        return rel

    def whiteout_rel(self, rel: str) -> str:
        """Where the whiteout for upper path ``rel`` lives in this format."""
        if self.format is WhiteoutFormat.KERNEL:
            return rel
        parent, _, name = rel.rpartition("/")
        return join(parent, WH_PREFIX + name)

    def mark_opaque(self, host: HostDir, rel: str) -> None:
        """Make directory ``rel`` of ``host`` (upper or work) opaque."""
        if self.format is WhiteoutFormat.KERNEL:
            write_opaque_xattr(lambda attr, value: host.setxattr(rel, attr, value))
        else:
            fd = host.open(join(rel, OPAQUE_MARKER), os.O_WRONLY | os.O_CREAT, 0o000)
            os.close(fd)

    def remove_whiteout(self, rel: str) -> bool:
        """Remove the whiteout of ``rel`` in the upper (a kernel one, and in the OCI format its ``.wh.`` file);
        True if one was there."""
        removed = False
        for candidate in (rel, self.whiteout_rel(rel)):
            try:
                st = self.upper.lstat(candidate)
            except OSError:
                continue
            if candidate == rel and not is_whiteout(st, functools.partial(_has_xattr, self.upper, rel)):
                continue
            self.upper.unlink(candidate)
            removed = True
        return removed


def probe_kernel_format(work: HostDir, work_rel: str) -> bool:
    """Can this daemon write kernel whiteouts here (mknod 0/0 and ``trusted.*`` xattrs in the work dir)?"""
    rel = join(work_rel, ".unionfs-probe")
    try:
        work.mknod(rel, stat_mod.S_IFCHR, 0)
    except OSError:
        return False
    try:
        work.setxattr(rel, "trusted.overlay.probe", b"y")
    except OSError as exc:
        return exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES)
    finally:
        with contextlib.suppress(OSError):
            work.unlink(rel)
    return True

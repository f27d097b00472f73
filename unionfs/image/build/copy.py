"""COPY and ADD: files of the build context written into an image's root (a mounted union's directory).

The rules (docker's): a directory source copies its *contents* into the destination; a file goes to
``DEST/NAME`` when the destination ends in ``/`` or is a directory, else to ``DEST`` itself; several sources
need a directory destination ending in ``/``.  Missing parents are created (root, 0755).  What is copied is
owned by root, or by ``--chown``; keeps its permission bits, or takes ``--chmod``; keeps its mtime.  ADD
unpacks a local tar archive (plain, gzip, bzip2 or xz) into the destination directory, keeping the
archive's owners and modes; an archive member that would land outside the destination is refused.

Reads go through the :class:`Context`, writes through a :class:`HostDir` of the root with destination paths
resolved in the image (:mod:`.rootfs`): neither side ever follows a symlink on the host.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import posixpath
import stat as stat_mod
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from unionfs.fs.fsio import HostDir, join, split
from unionfs.image.build.context import Context, Source
from unionfs.image.build.rootfs import RootfsError, makedirs, resolve
from unionfs.image.digest import hash_file

_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


@dataclass(frozen=True)
class Ownership:
    """Who gets what is copied: ``uid``/``gid``; ``chmod`` replaces permission bits when set."""

    uid: int = 0
    gid: int = 0
    chmod: int | None = None


@dataclass
class CopyCount:
    """What a COPY/ADD wrote."""

    entries: int = 0
    nbytes: int = 0


def copy_sources(ctx: Context, root: HostDir, *, keyword: str, sources: tuple[str, ...], dest: str,
                 owner: Ownership, count: CopyCount | None = None) -> CopyCount:
    """Copy ``sources`` (context paths) to the image path ``dest`` in ``root``.  Raises ContextError,
    RootfsError (a destination that cannot be made) or OSError."""
    count = count or CopyCount()
    resolved = [src for source in sources for src in ctx.resolve(source)]
    dest_rel = resolve(root, dest)
    st = root.try_lstat(dest_rel)
    into_dir = dest.endswith("/") or (st is not None and stat_mod.S_ISDIR(st.st_mode))
    if len(resolved) > 1 and not into_dir:
        raise RootfsError(f"{keyword} with several sources needs a directory destination ending in '/' "
                          f"(got {dest})")
    buf = bytearray(1 << 20)
    for src in resolved:
        if src.is_dir:
            makedirs(root, dest_rel)
            _copy_tree(ctx, root, src, dest_rel, owner, count, buf)
        elif keyword == "ADD" and (kind := _archive_kind(ctx, src.rel)) is not None:
            makedirs(root, dest_rel)
            _extract(ctx, root, src, kind, dest_rel, count)
        else:
            target = join(dest_rel, src.name) if into_dir else dest_rel
            parent, _name = split(target)
            makedirs(root, parent)
            _copy_entry(ctx, root, src.rel, ctx.host.lstat(src.rel),
                        target, owner, count, buf)
    return count


def _copy_tree(ctx: Context, root: HostDir, src: Source, dest_rel: str, owner: Ownership, count: CopyCount,
               buf: bytearray) -> None:
    dirs = []
    for rel, st in ctx.walk(src):
        if not rel:
            continue
        target = join(dest_rel, rel)
        _copy_entry(ctx, root, join(src.rel, rel) if src.rel else rel, st, target, owner, count, buf)
        if stat_mod.S_ISDIR(st.st_mode):
            dirs.append((target, st))
    for target, st in reversed(dirs):  # after their children: writing into them changed their mtime
        root.utime(target, (st.st_atime_ns, st.st_mtime_ns))


def _make_room(root: HostDir, target: str, *, is_dir: bool) -> bool:
    """Clear the way for a new entry at ``target``; True when a directory is already there (kept)."""
    st = root.try_lstat(target)
    if st is None:
        return False
    if stat_mod.S_ISDIR(st.st_mode):
        if is_dir:
            return True
        raise RootfsError(f"cannot replace directory /{target} with a non-directory")
    root.unlink(target)
    return False


def _copy_entry(ctx: Context, root: HostDir, src_rel: str, st: os.stat_result, target: str, owner: Ownership,
                count: CopyCount, buf: bytearray) -> None:
    mode = stat_mod.S_IMODE(st.st_mode) if owner.chmod is None else owner.chmod
    kind = stat_mod.S_IFMT(st.st_mode)
    count.entries += 1
    if kind == stat_mod.S_IFDIR:
        if not _make_room(root, target, is_dir=True):
            root.mkdir(target, 0o700)
        root.chown(target, owner.uid, owner.gid)
        root.chmod(target, mode)
        return
    _make_room(root, target, is_dir=False)
    if kind == stat_mod.S_IFREG:
        sfd = ctx.host.open(src_rel, os.O_RDONLY)
        try:
            dfd = root.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _content, seen = hash_file(sfd, st.st_size, sink=dfd, buf=buf)
                os.ftruncate(dfd, seen)
                os.fchown(dfd, owner.uid, owner.gid)
                os.fchmod(dfd, mode)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        count.nbytes += st.st_size
        return
    if kind == stat_mod.S_IFLNK:
        root.symlink(ctx.host.readlink(src_rel), target)
    elif kind in (stat_mod.S_IFIFO, stat_mod.S_IFCHR, stat_mod.S_IFBLK):
        root.mknod(target, kind | 0o600, st.st_rdev)
    else:  # a socket: nothing to copy (as docker does)
        count.entries -= 1
        return
    root.chown(target, owner.uid, owner.gid)
    if kind != stat_mod.S_IFLNK:
        root.chmod(target, mode)
    root.utime(target, (st.st_atime_ns, st.st_mtime_ns))


# -- ADD of a local archive --------------------------------------------------------------------------------------

def _archive_kind(ctx: Context, rel: str) -> str | None:
    """``"gz"``, ``"bz2"``, ``"xz"`` or ``""`` (plain tar) when the file is a tar archive, else None."""
    fd = ctx.host.open(rel, os.O_RDONLY)
    try:
        head = os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 262 and head[257:262] == b"ustar":
        return ""
    return None


@contextlib.contextmanager
def _open_archive(ctx: Context, rel: str, kind: str) -> Iterator[tarfile.TarFile]:
    """The archive ``rel`` read as a stream; the file and the decompressor are closed on the way out."""
    with os.fdopen(ctx.host.open(rel, os.O_RDONLY), "rb") as raw:
        stream: Any
        if kind == "gz":
            stream = gzip.GzipFile(fileobj=raw)
        elif kind == "bz2":
            stream = bz2.BZ2File(raw)
        elif kind == "xz":
            stream = lzma.LZMAFile(raw)  # noqa: SIM115 - closed by the with below
        else:
            stream = contextlib.nullcontext(raw)
        with stream, tarfile.open(fileobj=raw if kind == "" else stream, mode="r|") as archive:
            yield archive


def _member_path(name: str, archive: str) -> str:
    clean = posixpath.normpath("/" + name).lstrip("/")
    if name.startswith("/") or ".." in name.split("/"):
        raise RootfsError(f"ADD {archive}: archive member {name!r} leaves the destination; refusing the archive")
    return clean


def _extract(ctx: Context, root: HostDir, src: Source, kind: str, dest_rel: str, count: CopyCount) -> None:
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    try:
        with _open_archive(ctx, src.rel, kind) as archive:
            for member in archive:
                _extract_member(root, archive, member, src.rel, dest_rel, count, dirs)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise RootfsError(f"ADD {src.rel}: broken archive ({exc})") from None
    for target, member in reversed(dirs):
        _member_attrs(root, target, member)


def _extract_member(root: HostDir, archive: tarfile.TarFile, member: tarfile.TarInfo, archive_name: str,
                    dest_rel: str, count: CopyCount, dirs: list[tuple[str, tarfile.TarInfo]]) -> None:
    rel = _member_path(member.name, archive_name)
    if not rel:
        return
    parent, name = split(rel)
    where = resolve(root, "/" + join(dest_rel, parent))
    makedirs(root, where)
    target = join(where, name)
    count.entries += 1
    if member.isdir():
        if not _make_room(root, target, is_dir=True):
            root.mkdir(target, 0o700)
        dirs.append((target, member))
        return
    _make_room(root, target, is_dir=False)
    if member.isreg():
        data = archive.extractfile(member)
        assert data is not None
        dfd = root.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while chunk := data.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dfd, view):]
        finally:
            os.close(dfd)
        count.nbytes += member.size
    elif member.issym():
        root.symlink(member.linkname, target)
    elif member.islnk():
        link_src = resolve(root, "/" + join(dest_rel, _member_path(member.linkname, archive_name)),
                           follow_last=False)
        root.link(link_src, target)
        return
    elif member.isfifo():
        root.mknod(target, stat_mod.S_IFIFO | 0o600)
    elif member.ischr() or member.isblk():
        bits = stat_mod.S_IFCHR if member.ischr() else stat_mod.S_IFBLK
        root.mknod(target, bits | 0o600, os.makedev(member.devmajor, member.devminor))
    else:
        count.entries -= 1
        return
    _member_attrs(root, target, member)


def _member_attrs(root: HostDir, target: str, member: tarfile.TarInfo) -> None:
    root.chown(target, member.uid, member.gid)
    if not member.issym():
        root.chmod(target, member.mode & 0o7777)
    mtime = int(member.mtime) * 1_000_000_000
    root.utime(target, (mtime, mtime))

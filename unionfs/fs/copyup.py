"""Atomic copy-up: a lower object is rebuilt in the work dir, then renamed into the upper layer.

Order (docs/architecture.md, "Semantics in brief"): parents first; data, then owner, mode, times, then xattrs
other than overlay-private ones; the finished object is renamed into place, so a crash leaves either nothing or
the whole copy, never a half-copied file in the upper layer.  The work dir is emptied at mount (:func:`clean_workdir`).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat as stat_mod
from collections.abc import Callable

from unionfs.fs.fsio import RENAME_NOREPLACE, HostDir, join
from unionfs.fs.whiteout import is_private_xattr

_COPY_CHUNK = 1 << 20
_counter = itertools.count()


def temp_name(kind: str) -> str:
    """A fresh name for an object being staged in the work dir."""
    return f"#{kind}-{os.getpid()}-{next(_counter)}"


def copy_xattrs(src: HostDir, src_rel: str, dst: HostDir, dst_rel: str) -> None:
    """Copy every xattr of ``src_rel`` except the overlay-private ones (best effort where unsupported)."""
    try:
        names = src.listxattr(src_rel)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            value = src.getxattr(src_rel, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        dst.setxattr(dst_rel, name, value)


def copy_data(src_fd: int, dst_fd: int, length: int) -> None:
    """Copy ``length`` bytes from offset 0 of one descriptor to the other (copy_file_range, then read/write)."""
    offset = 0
    try:
        while offset < length:
            n = os.copy_file_range(src_fd, dst_fd, min(_COPY_CHUNK * 64, length - offset), offset, offset)
            if n == 0:
                break
            offset += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while offset < length:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, length - offset), offset)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            written = os.pwrite(dst_fd, view, offset)
            view = view[written:]
            offset += written


def stage_copy(src: HostDir, rel: str, st: os.stat_result, work: HostDir, tmp: str, *,
               data_limit: int | None, sync: bool, mark: Callable[[str], None] | None = None,
               truncate_to: int | None = None) -> None:
    """Build a copy of ``src``:``rel`` (whose lstat is ``st``) at ``work``:``tmp``.

    ``data_limit`` copies only that many bytes of a regular file (0 for a metadata-only copy, e.g. before
    ``O_TRUNC``); None copies all.  ``truncate_to`` (a regular file, for truncate(2)) stages the copy at
    the full size with only the bytes below ``truncate_to`` copied (the rest a hole), then truncates it
    with truncate(2), so the host stamps mtime exactly as after a full copy-up and a truncate of it (the
    kernel's order: tmpfs leaves an unchanged size's mtime alone), before the copy becomes visible.
    ``mark`` is called on the staged path to add the origin record.
    On any error the staged object is removed and the error raised.
    """
    mode = st.st_mode
    if truncate_to is not None:
        data_limit = truncate_to
    try:
        if stat_mod.S_ISREG(mode):
            sfd = src.open(rel, os.O_RDONLY)
            try:
                dfd = work.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    length = st.st_size if data_limit is None else min(data_limit, st.st_size)
                    copy_data(sfd, dfd, length)
                    if (data_limit is not None and data_limit > st.st_size) or truncate_to is not None:
                        os.ftruncate(dfd, st.st_size)
                    os.fchown(dfd, st.st_uid, st.st_gid)
                    os.fchmod(dfd, stat_mod.S_IMODE(mode))
                    if sync:
                        os.fsync(dfd)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        elif stat_mod.S_ISDIR(mode):
            work.mkdir(tmp, 0o700)
            work.chown(tmp, st.st_uid, st.st_gid)
            work.chmod(tmp, stat_mod.S_IMODE(mode))
        elif stat_mod.S_ISLNK(mode):
            work.symlink(src.readlink(rel), tmp)
            work.chown(tmp, st.st_uid, st.st_gid)
        else:
            work.mknod(tmp, mode, st.st_rdev)
            work.chown(tmp, st.st_uid, st.st_gid)
            work.chmod(tmp, stat_mod.S_IMODE(mode))
        if not stat_mod.S_ISLNK(mode):
            copy_xattrs(src, rel, work, tmp)
        if mark is not None:
            mark(tmp)
        work.utime(tmp, (st.st_atime_ns, st.st_mtime_ns))
        if truncate_to is not None and stat_mod.S_ISREG(mode):
            work.truncate(tmp, truncate_to)
            if sync:
                fd = work.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except BaseException:
        work.remove_tree(tmp)
        raise


def publish(work: HostDir, tmp: str, upper: HostDir, rel: str) -> None:
    """Move a staged object into the upper layer; fails with EEXIST rather than replace anything."""
    work.rename(tmp, rel, RENAME_NOREPLACE, dst_dir=upper)


def clean_workdir(work: HostDir, work_rel: str) -> None:
    """Empty the staging dir (left-overs of a crash), creating it if needed."""
    try:
        st = work.lstat(work_rel)
    except FileNotFoundError:
        work.mkdir(work_rel, 0o700)
        return
    if not stat_mod.S_ISDIR(st.st_mode):
        work.unlink(work_rel)
        work.mkdir(work_rel, 0o700)
        return
    for name, _kind, _ino in work.scandir(work_rel):
        work.remove_tree(join(work_rel, name))

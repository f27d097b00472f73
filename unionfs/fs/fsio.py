"""The one safe door to host paths.

Every access to a layer, upper or work directory goes through this module.  A :class:`HostDir` holds an
``O_PATH`` descriptor of a directory tree's root; every operation takes a *relative* path inside that tree
(``""`` is the root itself, components separated by ``/``, never ``..``) and resolves it with ``openat2``
(``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``): no symlink inside a layer is ever followed
on the host side, and nothing outside the tree is reached.  Where ``openat2`` is missing the parent is walked
one component at a time with ``O_NOFOLLOW``.

Every function raises ``OSError`` with the real errno of the host filesystem; nothing else escapes.
Callers: the modules of ``unionfs`` only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat as stat_mod
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc.syscall.restype = ctypes.c_long


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _probe_openat2() -> bool:
    root = os.open("/", _DIR_FLAGS)
    try:
        os.close(_openat2(root, ".", _DIR_FLAGS))
    except OSError as exc:
        return exc.errno not in (errno.ENOSYS, errno.EPERM)
    finally:
        os.close(root)
    return True


_have_openat2 = _probe_openat2()


_RENAMEAT2_SYSCALL = {"x86_64": 316, "i386": 353, "i686": 353, "aarch64": 276, "riscv64": 276,
                      "loongarch64": 276, "armv7l": 382, "armv8l": 382, "ppc64le": 357, "ppc64": 357,
                      "s390x": 347, "mips64": 5311}
"""renameat2's system call number by ``uname -m``, for a C library without the wrapper (glibc < 2.28)."""


def _syscall_renameat2(sfd: int, src: bytes, dfd: int, dst: bytes, flags: int) -> int:
    number = _RENAMEAT2_SYSCALL.get(os.uname().machine)
    if number is None:
        ctypes.set_errno(errno.ENOSYS)
        return -1
    return int(_libc.syscall(number, ctypes.c_int(sfd), src, ctypes.c_int(dfd), dst, ctypes.c_uint(flags)))


def _libc_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    func = getattr(_libc, "renameat2", None)  # glibc >= 2.28, musl >= 1.2.3
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


_renameat2: Callable[[int, bytes, int, bytes, int], int] = _libc_renameat2() or _syscall_renameat2


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with every mode (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE …) on an open descriptor."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fd_xattr(fd: int, attr: str) -> bytes | None:
    """The value of ``attr`` on the open file ``fd`` (no path is resolved), or None where it is not set."""
    return _xattr_or_none(fd, attr)


def _xattr_or_none(target: int | str, attr: str, follow: bool = True) -> bytes | None:
    """getxattr(2) of ``target`` (a descriptor or a path), or None where the attribute, support for it, or
    the name itself is missing (:data:`_XATTR_MISSING`)."""
    try:
        return os.getxattr(target, attr, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _XATTR_MISSING:
            return None
        raise


def split(rel: str) -> tuple[str, str]:
    """Split a relative path into (parent, name); ``"a/b/c"`` → ``("a/b", "c")``, ``"a"`` → ``("", "a")``."""
    parent, _, name = rel.rpartition("/")
    return parent, name


def join(parent: str, name: str) -> str:
    """Join a relative parent path and a name."""
    return f"{parent}/{name}" if parent else name


def _check(rel: str) -> None:
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise OSError(errno.EINVAL, "invalid relative path", rel)


_XATTR_MISSING = (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.ENOENT)
"""What a getxattr answers where the attribute, support for it, or the name itself is missing."""


def _check_component(name: str) -> None:
    if not name or name in (".", "..") or "/" in name:
        raise OSError(errno.EINVAL, "invalid name", name)


def resolve_root(path: str) -> tuple[str, int]:
    """The real path of a directory given by the user (a layer root may itself be a symlink: container
    storage passes ``l/ID`` links) and its st_dev.  Raises FileNotFoundError, NotADirectoryError or OSError."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if not stat_mod.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return real, st.st_dev


_AT_EMPTY_PATH = 0x1000
_MAX_HANDLE_SZ = 128
_FS_IOC_GETFSUUID = 0x80111500
"""``_IOR(0x15, 0, struct fsuuid2)``: a file system's ``s_uuid`` (Linux 6.5+)."""


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_SZ)]


def _handle_of_fd(fd: int) -> tuple[int, bytes]:
    """``name_to_handle_at(fd, "", AT_EMPTY_PATH)``: the file handle (type, bytes) of the object ``fd`` holds."""
    fh = _FileHandle()
    fh.handle_bytes = _MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    rc = _libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), _AT_EMPTY_PATH)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


def _open_by_handle(mount_fd: int, handle_type: int, handle: bytes) -> int:
    """``open_by_handle_at(mount_fd, handle, O_PATH)``: a descriptor of the object, on ``mount_fd``'s file
    system (ESTALE where it is gone; needs CAP_DAC_READ_SEARCH)."""
    if len(handle) > _MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "file handle too long")
    fh = _FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


class Pinned:
    """One object of a host tree held by an ``O_PATH`` descriptor: still reachable once its name is gone
    (unlinked, replaced by a rename), as the kernel's overlayfs holds the inode of an open file.

    Made only by :meth:`HostDir.pin` (which never follows a symlink); every call acts on the object itself
    through the descriptor's ``/proc/self/fd`` magic link, which names that inode and nothing else (a
    symlink pinned stays the symlink: calls that would follow it answer as on the symlink).  The caller
    closes it.  Raises ``OSError`` with the host's errno.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def _proc(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def reopen(self, flags: int) -> int:
        """A new descriptor of the object opened with ``flags`` (never creating anything)."""
        if stat_mod.S_ISLNK(os.fstat(self.fd).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        return os.open(self._proc, (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC)

    def readlink(self) -> str:
        """The target of a pinned symlink (``readlinkat(fd, "")``; ENOENT for anything else)."""
        return os.readlink("", dir_fd=self.fd)

    def chmod(self, mode: int) -> None:
        if stat_mod.S_ISLNK(os.fstat(self.fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        os.chmod(self._proc, mode)

    def chown(self, uid: int, gid: int) -> None:
        os.chown(self._proc, uid, gid)

    def utime(self, ns: tuple[int, int]) -> None:
        os.utime(self._proc, ns=ns)

    def truncate(self, length: int) -> None:
        """truncate(2) of a regular file (EINVAL for anything else, as truncate(2) answers)."""
        if not stat_mod.S_ISREG(os.fstat(self.fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        os.truncate(self._proc, length)

    def getxattr(self, attr: str) -> bytes:
        return os.getxattr(self._proc, attr)

    def try_getxattr(self, attr: str) -> bytes | None:
        """The xattr's value, or None where it (or support for it) is missing."""
        return _xattr_or_none(self._proc, attr)

    def listxattr(self) -> list[str]:
        return os.listxattr(self._proc)

    def setxattr(self, attr: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(self._proc, attr, value, flags)

    def removexattr(self, attr: str) -> None:
        os.removexattr(self._proc, attr)


class HostDir:
    """A directory tree on the host, reached only beneath its root descriptor.

    ``path`` is the absolute host path the root was opened from (already resolved by the caller; the root
    itself may have been reached through a symlink, everything beneath it never is).
    """

    def __init__(self, path: str, *, immutable: bool = False, dir_cache: int = 64,
                 keep_dirs: bool | None = None) -> None:
        """``immutable``: the tree does not change while this object lives (a lower layer).  ``keep_dirs``
        (default: ``immutable``): descriptors of its directories are kept (at most ``dir_cache``) and reused,
        so that an access costs one system call instead of three; in a tree that changes (the upper layer)
        that is right only while every change of its directories goes through this object, whose
        :meth:`rmdir`, :meth:`remove_tree` and :meth:`rename` drop what they move or remove."""
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.fd).st_dev
        self.immutable = immutable
        self.keep_dirs = immutable if keep_dirs is None else keep_dirs
        self.dir_cache = dir_cache
        self._dirfds: OrderedDict[str, int] = OrderedDict()
        self._users: dict[int, int] = {}
        """Kept descriptors in use -> by how many callers (one dropped meanwhile is closed by its last)."""
        self._dropped: set[int] = set()
        self._dirfds_lock = threading.Lock()

    @staticmethod
    def _split(rel: str) -> tuple[str, str]:
        """(parent, name) of a relative path, refusing absolute paths and ``.``/``..``/empty components."""
        if rel:
            _check(rel)
        return split(rel)

    def close(self) -> None:
        with self._dirfds_lock:
            for fd in self._dirfds.values():
                self._drop(fd)
            self._dirfds.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- descriptors -------------------------------------------------------------------------------------

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        """Open ``rel`` beneath the root without following any symlink; returns a new descriptor."""
        if rel == "":
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fd)
        _check(rel)
        if _have_openat2:
            return _openat2(self.fd, rel, flags | os.O_NOFOLLOW, mode)
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=pfd)

    def pin(self, rel: str) -> Pinned:
        """Hold the object ``rel`` (never a symlink's target) by an ``O_PATH`` descriptor."""
        return Pinned(self.open(rel, os.O_PATH))

    def file_handle(self, rel: str) -> tuple[int, bytes]:
        """The host file handle of ``rel`` (never a symlink's target: the object is held by an ``O_PATH``
        descriptor first), as ``name_to_handle_at(2)`` makes it: ``(handle_type, bytes)``.  EOPNOTSUPP where
        the file system cannot make handles."""
        fd = self.open(rel, os.O_PATH)
        try:
            return _handle_of_fd(fd)
        finally:
            os.close(fd)

    def stat_by_handle(self, handle_type: int, handle: bytes) -> os.stat_result | None:
        """The ``fstat`` of the object a file handle names on this tree's file system (anywhere on it, as
        the kernel decodes a non-directory origin), or None where it is gone (ESTALE)."""
        root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)  # not O_PATH: refused
        try:
            fd = _open_by_handle(root, handle_type, handle)
        except OSError as exc:
            if exc.errno in (errno.ESTALE, errno.ENOENT):
                return None
            raise
        finally:
            os.close(root)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def fs_uuid(self) -> bytes:
        """The 16-byte ``s_uuid`` of the file system this tree is on (``FS_IOC_GETFSUUID``; all zeros where
        the file system has none).  ENOTTY where the kernel cannot tell (before Linux 6.5)."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            buf = bytearray(17)
            fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
        finally:
            os.close(fd)
        return bytes(buf[1:1 + min(buf[0], 16)]).ljust(16, b"\0")

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of regular file ``rel`` (opened as :meth:`open` opens, never through a symlink)."""
        fd = self.open(rel, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def open_dir(self, rel: str) -> int:
        """An ``O_PATH`` descriptor of directory ``rel`` (ENOTDIR/ELOOP if it is not a real directory)."""
        if rel == "":
            return os.dup(self.fd)
        if _have_openat2:
            _check(rel)
            return _openat2(self.fd, rel, _DIR_FLAGS)
        fd = os.dup(self.fd)
        try:
            for part in rel.split("/"):
                if part in ("", ".", ".."):
                    raise OSError(errno.EINVAL, "invalid relative path", rel)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def dirfd(self, rel: str) -> Iterator[int]:
        """Context manager around :meth:`open_dir` that always closes the descriptor (or, where directories
        are kept, holds a kept one for the block)."""
        if rel == "":
            yield self.fd
            return
        if self.keep_dirs:
            fd = self._acquire_dirfd(rel)
            try:
                yield fd
            finally:
                self._release_dirfd(fd)
            return
        fd = self.open_dir(rel)
        try:
            yield fd
        finally:
            os.close(fd)

    def _acquire_dirfd(self, rel: str) -> int:
        with self._dirfds_lock:
            fd = self._dirfds.get(rel)
            if fd is not None:
                self._dirfds.move_to_end(rel)
                self._users[fd] = self._users.get(fd, 0) + 1
                return fd
        fd = self.open_dir(rel)
        with self._dirfds_lock:
            other = self._dirfds.get(rel)
            if other is not None:
                os.close(fd)
                fd = other
            else:
                self._dirfds[rel] = fd
                while len(self._dirfds) > self.dir_cache:
                    self._drop(self._dirfds.popitem(last=False)[1])
            self._users[fd] = self._users.get(fd, 0) + 1
            return fd

    def _release_dirfd(self, fd: int) -> None:
        with self._dirfds_lock:
            left = self._users[fd] - 1
            if left:
                self._users[fd] = left
                return
            del self._users[fd]
            if fd in self._dropped:
                self._dropped.discard(fd)
                os.close(fd)

    def _drop(self, fd: int) -> None:
        """No longer keep ``fd`` (lock held): closed now, or by its last user."""
        if fd in self._users:
            self._dropped.add(fd)
        else:
            os.close(fd)

    def _forget_dirs(self, rel: str) -> None:
        """Stop keeping descriptors of directory ``rel`` and everything below it (it moves or goes)."""
        if not self.keep_dirs or not self._dirfds:
            return
        prefix = rel + "/"
        with self._dirfds_lock:
            for key in [k for k in self._dirfds if k == rel or k.startswith(prefix)]:
                self._drop(self._dirfds.pop(key))

    # -- queries -----------------------------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        """``lstat`` of ``rel``; raises OSError (ENOENT, ENOTDIR, ELOOP for a symlinked parent …)."""
        if rel == "":
            return os.stat(self.fd)
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)

    def try_lstat(self, rel: str) -> os.stat_result | None:
        """``lstat`` that answers None where the path does not exist (ENOENT, ENOTDIR, ELOOP on a parent)."""
        try:
            return self.lstat(rel)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise

    def scandir(self, rel: str) -> list[tuple[str, int, int]]:
        """The entries of directory ``rel`` as ``(name, d_type bits as S_IFMT or 0, inode)``."""
        fd = self.open_dir_readable(rel)
        try:
            out: list[tuple[str, int, int]] = []
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        if entry.is_symlink():
                            kind = stat_mod.S_IFLNK
                        elif entry.is_dir(follow_symlinks=False):
                            kind = stat_mod.S_IFDIR
                        elif entry.is_file(follow_symlinks=False):
                            kind = stat_mod.S_IFREG
                        else:
                            kind = 0
                    except OSError:
                        kind = 0
                    out.append((entry.name, kind, entry.inode()))
            return out
        finally:
            os.close(fd)

    def lstat_children(self, rel: str, names: Sequence[str]) -> list[os.stat_result | None]:
        """``lstat`` of each of ``names`` (single components) inside directory ``rel``, through one descriptor
        of it; None for a name that is gone.  One ``fstatat`` per name, instead of an open, a stat and a close."""
        out: list[os.stat_result | None] = []
        with self.dirfd(rel) as pfd:
            for name in names:
                _check_component(name)
                try:
                    out.append(os.stat(name, dir_fd=pfd, follow_symlinks=False))
                except FileNotFoundError:
                    out.append(None)
        return out

    def getxattr_children(self, rel: str, names: Sequence[str], attr: str) -> list[bytes | None]:
        """The xattr ``attr`` of each of ``names`` (single components, never followed) inside directory
        ``rel``, through one descriptor of it; None where it (or support for it, or the name) is missing."""
        out: list[bytes | None] = []
        with self.dirfd(rel) as pfd:
            for name in names:
                _check_component(name)
                path, follow = self._xpath(pfd, name)
                out.append(_xattr_or_none(path, attr, follow))
        return out

    def open_dir_readable(self, rel: str) -> int:
        """A readable descriptor of directory ``rel`` (for listing)."""
        return self.open(rel, os.O_RDONLY | os.O_DIRECTORY)

    def readlink(self, rel: str) -> str:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            return os.readlink(name, dir_fd=pfd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(f"/proc/self/fd/{self.fd}")

    # -- xattrs (the final component is never followed; the parent is pinned by its descriptor) ----------

    def _xpath(self, pfd: int, name: str) -> tuple[str, bool]:
        """The path and follow flag for an xattr call on ``name`` in the directory ``pfd``: the final
        component is never followed; the root itself is reached through its descriptor's magic link."""
        if name:
            return f"/proc/self/fd/{pfd}/{name}", False
        return f"/proc/self/fd/{pfd}", True

    def getxattr(self, rel: str, attr: str) -> bytes:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            path, follow = self._xpath(pfd, name)
            return os.getxattr(path, attr, follow_symlinks=follow)

    def try_getxattr(self, rel: str, attr: str) -> bytes | None:
        """The xattr's value, or None where it (or support for it) is missing (the name or a parent too)."""
        try:
            return self.getxattr(rel, attr)
        except OSError as exc:
            if exc.errno in _XATTR_MISSING:
                return None
            raise

    def listxattr(self, rel: str) -> list[str]:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            path, follow = self._xpath(pfd, name)
            return os.listxattr(path, follow_symlinks=follow)

    def setxattr(self, rel: str, attr: str, value: bytes, flags: int = 0) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            path, follow = self._xpath(pfd, name)
            os.setxattr(path, attr, value, flags, follow_symlinks=follow)

    def removexattr(self, rel: str, attr: str) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            path, follow = self._xpath(pfd, name)
            os.removexattr(path, attr, follow_symlinks=follow)

    # -- changes (used on the upper and work dirs only) -----------------------------------------------------

    def mkdir(self, rel: str, mode: int) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            os.mkdir(name, mode, dir_fd=pfd)

    def mknod(self, rel: str, mode: int, device: int = 0) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            os.mknod(name, mode, device, dir_fd=pfd)

    def symlink(self, target: str, rel: str) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            os.symlink(target, name, dir_fd=pfd)

    def unlink(self, rel: str) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, rel: str) -> None:
        parent, name = self._split(rel)
        self._forget_dirs(rel)
        with self.dirfd(parent) as pfd:
            os.rmdir(name, dir_fd=pfd)

    def remove_tree(self, rel: str) -> None:
        """Remove ``rel`` (a file or a whole tree; nothing where it is missing) without following symlinks,
        depth first without recursion.  Directories the caller owns but cannot write (mode 0555 in a layer)
        are made writable first where the caller is not root."""
        st = self.try_lstat(rel)
        if st is None:
            return
        if not stat_mod.S_ISDIR(st.st_mode):
            self.unlink(rel)
            return
        self._forget_dirs(rel)
        stack = [(rel, False)]
        while stack:
            path, listed = stack.pop()
            if listed:
                self.rmdir(path)
                continue
            if os.geteuid() != 0:
                with suppress(OSError):
                    self.chmod(path, 0o700)
            stack.append((path, True))
            for name, kind, _ino in self.scandir(path):
                child = join(path, name)
                if kind == stat_mod.S_IFDIR:
                    stack.append((child, False))
                else:
                    try:
                        self.unlink(child)
                    except IsADirectoryError:
                        stack.append((child, False))

    def truncate(self, rel: str, length: int) -> None:
        """truncate(2) of regular file ``rel`` (EINVAL for anything else, as truncate(2) answers).

        Only the new size is asked for: whether an unchanged size still gets a new mtime is the host
        filesystem's rule (ext4 always sets it, tmpfs keeps an empty file's), as under the kernel's overlayfs.
        ftruncate(2) of a descriptor would always ask for a new mtime too."""
        fd = self.open(rel, os.O_PATH)
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), rel)
            os.truncate(f"/proc/self/fd/{fd}", length)
        finally:
            os.close(fd)

    def chmod(self, rel: str, mode: int) -> None:
        """chmod of a non-symlink (Linux cannot chmod a symlink: EOPNOTSUPP, as the kernel answers)."""
        fd = self.open(rel, os.O_PATH)
        try:
            if stat_mod.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), rel)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            if name:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            else:
                os.chown(f"/proc/self/fd/{pfd}", uid, gid)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        """Set atime/mtime in nanoseconds (``UTIME_OMIT``/``UTIME_NOW`` are resolved by the caller)."""
        parent, name = self._split(rel)
        with self.dirfd(parent) as pfd:
            if name:
                os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
            else:
                os.utime(f"/proc/self/fd/{pfd}", ns=ns)

    def link(self, src: str, dst: str, *, src_dir: HostDir | None = None) -> None:
        """Hard link ``dst`` (in this tree) to ``src`` (in ``src_dir``, default this tree)."""
        source = src_dir or self
        sp, sn = source._split(src)
        dp, dn = self._split(dst)
        with source.dirfd(sp) as sfd, self.dirfd(dp) as dfd:
            os.link(sn, dn, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def link_pinned(self, pinned: Pinned, dst: str) -> None:
        """Hard link ``dst`` (in this tree) to the object ``pinned`` holds (through its ``/proc/self/fd``
        magic link, which names that inode only); ENOENT for one with no link left, as linkat(2) answers."""
        dp, dn = self._split(dst)
        with self.dirfd(dp) as dfd:
            os.link(pinned._proc, dn, dst_dir_fd=dfd, follow_symlinks=True)

    def lock_exclusive(self) -> int:
        """Take a non-blocking exclusive flock on the root; returns the descriptor that holds it (close it to
        release).  Raises BlockingIOError when another process holds it."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def rename(self, src: str, dst: str, flags: int = 0, *, dst_dir: HostDir | None = None) -> None:
        """``renameat2`` from ``src`` to ``dst`` (in ``dst_dir``, default this tree) with RENAME_* flags."""
        target = dst_dir or self
        sp, sn = self._split(src)
        dp, dn = self._split(dst)
        self._forget_dirs(src)
        target._forget_dirs(dst)
        with self.dirfd(sp) as sfd, target.dirfd(dp) as dfd:
            if flags == 0:
                os.rename(sn, dn, src_dir_fd=sfd, dst_dir_fd=dfd)
                return
            rc = _renameat2(sfd, os.fsencode(sn), dfd, os.fsencode(dn), flags)
            if rc < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), dst)

"""The FUSE binding: mfusepy on libfuse3 by default, plain fusepy (libfuse2) as the fallback.

``UNIONFS_BINDING=mfusepy|fusepy`` forces one.  Both expose the fusepy API: ``FUSE``, ``Operations``,
``FuseOSError``, ``fuse_get_context``.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from unionfs.fs.attr import Attr

_SONAMES = {"mfusepy": "libfuse3.so.3", "fuse": "libfuse.so.2"}


def _load() -> tuple[ModuleType, str]:
    wanted = os.environ.get("UNIONFS_BINDING", "")
    order = {"mfusepy": ["mfusepy"], "fusepy": ["fuse"], "": ["mfusepy", "fuse"]}.get(wanted)
    if order is None:
        raise ImportError(f"UNIONFS_BINDING={wanted!r}: expected 'mfusepy' or 'fusepy'")
    errors = []
    chosen_by_user = bool(os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME"))
    for name in order:
        if not chosen_by_user:
            # The library's soname, for dlopen: mfusepy would otherwise prefer libfuse2, and both bindings
            # would run ``ldconfig -p`` (ctypes.util.find_library) at every start.
            os.environ["FUSE_LIBRARY_PATH"] = _SONAMES[name]
        try:
            return importlib.import_module(name), ("fusepy" if name == "fuse" else name)
        except (ImportError, OSError) as exc:  # a missing libfuse raises OSError
            errors.append(f"{name}: {exc}")
        finally:
            if not chosen_by_user:
                os.environ.pop("FUSE_LIBRARY_PATH", None)
    raise ImportError("no FUSE binding could be loaded (" + "; ".join(errors) + ")")


_module, BINDING_NAME = _load()
FUSE: Any = _module.FUSE
Operations: Any = _module.Operations
FuseOSError: Any = _module.FuseOSError
fuse_get_context: Any = _module.fuse_get_context
LIBFUSE_MAJOR: int = int(getattr(_module, "fuse_version_major", 2))


FUSE_READDIR_PLUS = 1
FUSE_FILL_DIR_PLUS = 2
_c_stat: Any = _module.c_stat
_STAT_SIZE = ctypes.sizeof(_c_stat)
_PLUS_CHUNK = 16
"""Entries whose attributes a READDIRPLUS reply reads at a time: about what one reply holds, so that a big
directory served in many replies does not read attributes that the next reply would read again."""


_adopted = threading.local()
_gil_state_ensure = ctypes.pythonapi.PyGILState_Ensure


def adopt_thread() -> None:
    """Keep the Python thread state of the calling libfuse worker thread for the life of the thread.

    ctypes runs a callback on a thread Python did not create under a thread state it makes for that one call
    and deletes after it, together with the 16 KiB frame stack it maps.  Per request that is an ``mmap`` and a
    ``munmap``, and the ``munmap`` of a multi-threaded process flushes the TLB of every CPU: half the system
    time of a metadata walk (benchmarks/RESULTS.md, "Per-request cost").  One more ``PyGILState_Ensure``,
    never released, keeps the state.  libfuse keeps its worker threads (at most ``max_threads``), so this
    holds one thread state per worker, as a thread Python started would.
    """
    if not getattr(_adopted, "done", False):
        _gil_state_ensure()
        _adopted.done = True


def _replay(func: Callable[..., Any], failure: BaseException) -> Callable[..., Any]:
    """A callable named like ``func`` that raises ``failure``: the binding then handles it as ``func``'s."""

    def replay(*args: Any, **kwargs: Any) -> Any:
        raise failure

    replay.__name__ = func.__name__
    return replay


def _copy_out(data: bytes, buf: Any, size: int) -> int:
    """Answer a request that takes a buffer of ``size`` bytes (xattr values and lists): the length when
    only the size is asked (no buffer), ERANGE when ``data`` does not fit, else ``data`` copied in."""
    if not buf:
        return len(data)
    if len(data) > size:
        return -errno.ERANGE
    ctypes.memmove(buf, data, len(data))
    return len(data)


class UnionFUSE(FUSE):  # type: ignore[misc]
    """The binding's FUSE class with the libfuse3 callbacks that drop arguments fixed: ``rename`` keeps its
    RENAME_* flags and ``truncate`` keeps the file handle of an ``ftruncate``; ``getattr`` reuses a packed
    ``struct stat`` per attribute record (:func:`pack_stat`); every callback runs under a kept thread state
    (:func:`adopt_thread`)."""

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one callback.  The common outcomes, a result or an ``OSError`` with its errno, are answered
        here; anything else goes to the binding's own handling (its logging, ``init``'s rules), replayed."""
        adopt_thread()
        try:
            return func(*args, **kwargs) or 0
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                return -exc.errno
            failure: BaseException = exc
        except BaseException as exc:
            failure = exc
        return super()._wrapper(_replay(func, failure))

    def _decode(self, path: bytes | None) -> str | None:
        # fusepy has no ``errors`` attribute; mfusepy decodes with surrogateescape
        return None if path is None else path.decode(self.encoding, getattr(self, "errors", "surrogateescape"))

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        attrs = self.operations.getattr(self._decode(path), fh)
        ctypes.memmove(buf, pack_stat(attrs), _STAT_SIZE)
        return 0

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        """The adapter answers None for "no such attribute", the common answer (a tree walk asks every
        entry for ``security.capability``): ENODATA goes back without an exception raised on the way."""
        found = self.operations.getxattr(self._decode(path), self._decode(name))
        if found is None:
            return -errno.ENODATA
        return _copy_out(found, value, size)

    def listxattr(self, path: bytes, namebuf: Any, size: int) -> int:
        names = self.operations.listxattr(self._decode(path))
        encoding, errors = self.encoding, getattr(self, "errors", "surrogateescape")
        return _copy_out(b"".join(n.encode(encoding, errors) + b"\0" for n in names), namebuf, size)

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """libfuse 3's readdir with offsets, so that a READDIRPLUS request carries full attributes with the
        names (``ls -l`` then needs no LOOKUP round trip per entry).  The listing is taken once per open
        directory (``opendir`` handle) and served from ``offset`` on."""
        fh = fip.contents.fh if fip else 0
        dir_path = self._decode(path)
        entries = self.operations.listing(dir_path, fh, offset)
        plus = FUSE_FILL_DIR_PLUS if flags & FUSE_READDIR_PLUS else 0
        st = _c_stat()
        start = offset
        while start < len(entries):
            end = min(start + _PLUS_CHUNK, len(entries))
            attrs: list[Attr | None] = []
            first = max(start, 2)  # "." and ".." go without attributes
            if plus and first < end:
                try:
                    attrs = self.operations.attrs_of(dir_path, [entries[i][0] for i in range(first, end)])
                except OSError:  # the directory itself is gone since the listing was taken
                    attrs = [None] * (end - first)
            for index in range(start, end):
                _, encoded, mode, ino = entries[index]
                if plus and index >= 2:
                    entry_attrs = attrs[index - first]
                    if entry_attrs is None:
                        continue  # gone since the listing was taken
                    ctypes.memmove(ctypes.addressof(st), pack_stat(entry_attrs), _STAT_SIZE)
                else:
                    ctypes.memset(ctypes.addressof(st), 0, _STAT_SIZE)
                    st.st_mode = mode
                    st.st_ino = ino
                if filler(buf, encoded, st, index + 1, plus) != 0:
                    return 0
            start = end
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(self.operations.rename(self._decode(old), self._decode(new), flags) or 0)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return int(self.operations.truncate(self._decode(path), length, fh) or 0)


def pack_stat(attr: Attr) -> bytes:
    """``attr`` as the binding's ``struct stat``, packed once per record and kept in :attr:`Attr.packed` (the
    core hands a cached lower object's record out again, so its conversion to C is paid once)."""
    packed = attr.packed
    if packed is None:
        st = _c_stat()
        st.st_mode = attr.st_mode
        st.st_ino = attr.st_ino
        st.st_nlink = attr.st_nlink
        st.st_uid = attr.st_uid
        st.st_gid = attr.st_gid
        st.st_rdev = attr.st_rdev
        st.st_size = attr.st_size
        st.st_blocks = attr.st_blocks
        st.st_blksize = attr.st_blksize
        st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(attr.st_atime_ns, 1_000_000_000)
        st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(attr.st_mtime_ns, 1_000_000_000)
        st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(attr.st_ctime_ns, 1_000_000_000)
        packed = attr.packed = ctypes.string_at(ctypes.addressof(st), _STAT_SIZE)
    return packed


def request_umask() -> int:
    """The umask of the caller of the current request (libfuse 3's context; 0 where the binding has none).
    Call it from inside a FUSE callback."""
    lib = getattr(_module, "_libfuse", None)
    if lib is None or LIBFUSE_MAJOR < 3:
        return 0
    return int(lib.fuse_get_context().contents.umask)


def kernel_invalidator() -> Callable[[str], None] | None:
    """A function that tells the kernel to drop its cached attributes and data of a path (libfuse3's
    ``fuse_invalidate_path``), bound to the running session; call it from inside a FUSE callback (``init``).
    None where the library has no such call (libfuse2)."""
    lib = getattr(_module, "_libfuse", None)
    if lib is None or not hasattr(lib, "fuse_invalidate_path"):
        return None
    fuse_ptr = ctypes.c_void_p(lib.fuse_get_context().contents.fuse)
    func = lib.fuse_invalidate_path
    func.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    func.restype = ctypes.c_int

    def invalidate(path: str) -> None:
        func(fuse_ptr, os.fsencode(path))

    return invalidate

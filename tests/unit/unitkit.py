"""Helpers for the core's unit tests: build layers, open a union over them, and describe what it shows.

Everything here talks to :mod:`unionfs` directly (no FUSE).  A union path is relative (``""`` = root).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.layers import Spec, build_layer

from unionfs.fs.layers import WORK_SUBDIR, LayerStack
from unionfs.fs.union import UnionFS

WhiteoutFmt = str  # "kernel" | "oci"
"""The format layer specs are written in and the format the union writes."""


def errno_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call ``fn`` expecting an OSError; return its errno name-checked by the caller."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def assert_errno(code: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    got = errno_of(fn, *args, **kwargs)
    assert got == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(got, got)}"


@dataclass
class Env:
    """The host directories of one union under a test's tmp dir."""

    base: Path
    lowers: list[Path] = field(default_factory=list)
    upper: Path | None = None
    work: Path | None = None
    opened: list[UnionFS] = field(default_factory=list)

    @property
    def staging(self) -> Path:
        """The workdir's staging directory (``work/work``), emptied at every construction."""
        assert self.work is not None
        return self.work / WORK_SUBDIR

    def open(self, *, whiteout: WhiteoutFmt = "kernel", **kwargs: Any) -> UnionFS:
        """A new UnionFS over these directories (a "mount"); closed by :meth:`close_all`."""
        stack = LayerStack.open(lowers=[str(p) for p in self.lowers],
                                upper=str(self.upper) if self.upper else None,
                                work=str(self.work) if self.work else None)
        fs = UnionFS(stack, whiteout=whiteout, **kwargs)
        self.opened.append(fs)
        return fs

    def remount(self, fs: UnionFS, *, whiteout: WhiteoutFmt = "kernel", **kwargs: Any) -> UnionFS:
        """Close ``fs`` and open a fresh union over the same directories (nothing cached)."""
        fs.close()
        self.opened.remove(fs)
        return self.open(whiteout=whiteout, **kwargs)

    def close_all(self) -> None:
        for fs in self.opened:
            fs.close()
        self.opened.clear()


def make_env(base: Path, lowers: Sequence[Spec], upper: Spec | None = None, *, fmt: WhiteoutFmt = "kernel",
             readonly: bool = False) -> Env:
    """Build ``lowers`` (top-down) and, unless ``readonly``, an upper (``upper`` spec or empty) and a workdir."""
    base.mkdir(parents=True, exist_ok=True)
    env = Env(base)
    for i, spec in enumerate(lowers):
        env.lowers.append(build_layer(spec, base / f"lower{i}", whiteouts=fmt))  # type: ignore[arg-type]
    if not readonly:
        env.upper = build_layer(upper or {}, base / "upper", whiteouts=fmt)  # type: ignore[arg-type]
        env.work = base / "work"
        env.work.mkdir()
    return env


# --- what the union shows ---------------------------------------------------------------------------------

def read_all(fs: UnionFS, path: str) -> bytes:
    handle = fs.open(path, os.O_RDONLY)
    try:
        out = b""
        while True:
            chunk = fs.read(handle, 1 << 16, len(out))
            if not chunk:
                return out
            out += chunk
    finally:
        fs.release(handle)


def write_file(fs: UnionFS, path: str, data: bytes, *, flags: int = os.O_WRONLY | os.O_TRUNC) -> None:
    handle = fs.open(path, flags)
    try:
        fs.write(handle, data, 0)
    finally:
        fs.release(handle)


def create_file(fs: UnionFS, path: str, data: bytes = b"", mode: int = 0o644) -> None:
    handle = fs.create(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IFREG | mode)
    try:
        if data:
            fs.write(handle, data, 0)
    finally:
        fs.release(handle)


def names(fs: UnionFS, path: str = "") -> list[str]:
    """The sorted names of a directory's listing."""
    return sorted(name for name, _kind, _ino in fs.readdir(path))


def visible_tree(fs: UnionFS, *, inodes: bool = True, dir_nlink: bool = True,
                 readdir_inodes: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything the union shows: path → (type, mode, uid, gid, size, content or link target, user xattrs
    [, nlink][, ino]).

    Also checks, on the way, that readdir's types (and, with ``readdir_inodes``, inode numbers) agree with
    getattr.
    """
    out: dict[str, tuple[Any, ...]] = {}

    def one(path: str) -> None:
        attrs = fs.getattr(path)
        mode = attrs.st_mode
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            payload: Any = read_all(fs, path)
        elif kind == stat.S_IFLNK:
            payload = fs.readlink(path)
        else:
            payload = None
        xattrs = () if kind == stat.S_IFLNK else tuple(
            (name, fs.getxattr(path, name)) for name in sorted(fs.listxattr(path)))
        row: tuple[Any, ...] = (kind, stat.S_IMODE(mode), attrs.st_uid, attrs.st_gid,
                                None if kind == stat.S_IFDIR else attrs.st_size, payload, xattrs)
        if dir_nlink or kind != stat.S_IFDIR:
            row += (attrs.st_nlink,)
        if inodes:
            row += (attrs.st_ino,)
        out[path or "."] = row
        if kind == stat.S_IFDIR:
            for name, dkind, dino in sorted(fs.readdir(path)):
                child = f"{path}/{name}" if path else name
                cattrs = fs.getattr(child)
                assert dkind == stat.S_IFMT(cattrs.st_mode), f"readdir type of {child}"
                if inodes and readdir_inodes:
                    assert dino == cattrs.st_ino, f"readdir ino of {child}"
                one(child)

    one("")
    return out


# --- what the upper dir holds on disk ----------------------------------------------------------------------

def is_char00(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def host_tree(root: Path) -> dict[str, str]:
    """The raw host tree: relative path → a short description (``dir``, ``file``, ``wh`` for char 0/0, …)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if is_char00(p):
                out[rel] = "wh"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir+opaque" if xattr(p, "trusted.overlay.opaque") == b"y" else "dir"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = "symlink"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = "file"
            else:
                out[rel] = "other"
    return out


def upper_state(root: Path) -> dict[str, str]:
    """The upper dir in format-independent terms: ``wh`` for a whiteout of either format (``.wh.X`` is
    reported as ``X``), ``dir+opaque`` for a directory opaque in either format, markers folded away."""
    raw = host_tree(root)
    out: dict[str, str] = {}
    for rel, kind in raw.items():
        parent, _, name = rel.rpartition("/")
        if name == ".wh..wh..opq":
            continue
        if name.startswith(".wh."):
            out[f"{parent}/{name[4:]}" if parent else name[4:]] = "wh"
            continue
        if kind == "dir" and f"{rel}/.wh..wh..opq" in raw:
            kind = "dir+opaque"
        out[rel] = kind
    return out


def staging_entries(env: Env) -> list[str]:
    """What is left in ``workdir/work`` (must be nothing between operations)."""
    return sorted(os.listdir(env.staging))


__all__ = [
    "Env",
    "assert_errno",
    "create_file",
    "errno_of",
    "host_tree",
    "is_char00",
    "make_env",
    "names",
    "read_all",
    "staging_entries",
    "upper_state",
    "visible_tree",
    "write_file",
    "xattr",
]

"""Build overlay layer trees from a compact Python spec, copy them faithfully, convert whiteout formats.

A *spec* is a mapping from names to nodes. Keys may contain ``/``: ``{"d/e/f": "x"}`` creates the
directories ``d`` and ``d/e`` with default attributes. Node forms:

- ``str`` or ``bytes``: a regular file with that content (``File`` with defaults);
- ``dict``: a directory with those entries (``Dir`` with defaults);
- ``File``, ``Dir``, ``Symlink``, ``Hardlink``, ``Fifo``, ``Device``: the object with explicit attributes;
- ``WHITEOUT``: a whiteout for that name; ``Dir(opaque=True)``: an opaque directory.

Whiteouts and opaque markers are written in either on-disk format (``build_layer(..., whiteouts=...)``):

- ``"kernel"``: a whiteout is a character device 0/0 (mode 0, as the kernel writes it), an opaque directory
  carries ``trusted.overlay.opaque=y``;
- ``"oci"``: a whiteout is an empty regular file ``.wh.<name>``, an opaque directory contains an empty file
  ``.wh..wh..opq`` (the OCI image-spec and AUFS form).

Every object gets a fixed mtime (``FIXED_MTIME_NS`` unless the node says otherwise) so that two builds or
two copies are indistinguishable, and a snapshot can tell "still the layer's time" from "changed just now".
All functions need root (owners, device nodes, ``trusted.*`` xattrs).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias, Union

FIXED_MTIME_NS = 1_600_000_000 * 10**9
"""2020-09-13T12:26:40Z: the mtime (and atime) of every object a spec creates unless it gives its own."""

OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_MARKER = ".wh..wh..opq"
KERNEL_OPAQUE_XATTR = "trusted.overlay.opaque"

WhiteoutFormat = Literal["kernel", "oci"]
XattrMap = Mapping[str, bytes | str]


@dataclass(frozen=True)
class File:
    """A regular file."""

    data: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: XattrMap = field(default_factory=dict)
    mtime_ns: int = FIXED_MTIME_NS


@dataclass(frozen=True)
class Dir:
    """A directory; ``opaque`` hides everything the layers below have under this name."""

    entries: Mapping[str, Node] = field(default_factory=dict)
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: XattrMap = field(default_factory=dict)
    opaque: bool = False
    mtime_ns: int = FIXED_MTIME_NS


@dataclass(frozen=True)
class Symlink:
    """A symbolic link; ``target`` is stored verbatim (relative, absolute, dangling: all allowed)."""

    target: str
    uid: int = 0
    gid: int = 0
    mtime_ns: int = FIXED_MTIME_NS


@dataclass(frozen=True)
class Hardlink:
    """Another name for the regular file at ``target`` (a path from the layer root, in the same layer)."""

    target: str


@dataclass(frozen=True)
class Fifo:
    """A named pipe."""

    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = FIXED_MTIME_NS


@dataclass(frozen=True)
class Device:
    """A character (``kind="c"``) or block (``kind="b"``) device node."""

    major: int
    minor: int
    kind: Literal["c", "b"] = "c"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = FIXED_MTIME_NS


@dataclass(frozen=True)
class Whiteout:
    """Marks the name as deleted: the layers below must not show it."""


WHITEOUT = Whiteout()

Node: TypeAlias = Union[  # a recursive alias needs the string form inside Union
    str, bytes, "Mapping[str, Node]", File, Dir, Symlink, Hardlink, Fifo, Device, Whiteout]
Spec: TypeAlias = Mapping[str, Node]


@dataclass
class _Tree:
    """A directory of the normalised spec: explicit attributes plus children."""

    attrs: Dir
    children: dict[str, _Tree | Node] = field(default_factory=dict)


def _as_tree(node: Mapping[str, Node] | Dir) -> _Tree:
    """Normalise a directory node: expand ``a/b/c`` keys into nested directories."""
    attrs = node if isinstance(node, Dir) else Dir()
    entries = node.entries if isinstance(node, Dir) else node
    tree = _Tree(attrs=Dir(mode=attrs.mode, uid=attrs.uid, gid=attrs.gid, xattrs=attrs.xattrs,
                           opaque=attrs.opaque, mtime_ns=attrs.mtime_ns))
    for key, child in entries.items():
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"bad spec key {key!r}")
        here = tree
        for part in parts[:-1]:
            sub = here.children.get(part)
            if sub is None:
                sub = here.children[part] = _Tree(attrs=Dir())
            if not isinstance(sub, _Tree):
                raise ValueError(f"spec key {key!r} goes through non-directory {part!r}")
            here = sub
        leaf = parts[-1]
        if isinstance(child, Mapping | Dir):
            new = _as_tree(child)
            old = here.children.get(leaf)
            if isinstance(old, _Tree):  # merge: "d/x" seen before "d" itself
                new.children = {**old.children, **new.children}
            here.children[leaf] = new
        else:
            if leaf in here.children:
                raise ValueError(f"spec key {key!r} given twice")
            here.children[leaf] = child
    return tree


def _b(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _set_times(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _set_owner_mode(path: Path, *, uid: int, gid: int, mode: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)  # before chmod: chown clears set-id bits
    os.chmod(path, mode)


def _set_xattrs(path: Path, xattrs: XattrMap) -> None:
    for name, value in xattrs.items():
        os.setxattr(path, name, _b(value), follow_symlinks=False)


def _empty_marker(path: Path) -> None:
    """An empty 0644 root-owned file with the fixed mtime (OCI whiteout or opaque marker)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.chmod(path, 0o644)
    _set_times(path, FIXED_MTIME_NS)


def _kernel_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    _set_times(path, FIXED_MTIME_NS)


def _build_dir(tree: _Tree, path: Path, fmt: WhiteoutFormat, hardlinks: list[tuple[Path, str]]) -> None:
    for name, child in tree.children.items():
        target = path / name
        if isinstance(child, _Tree):
            target.mkdir()
            _build_dir(child, target, fmt, hardlinks)
            continue
        if isinstance(child, str | bytes):
            child = File(data=child)
        if isinstance(child, File):
            target.write_bytes(_b(child.data))
            _set_owner_mode(target, uid=child.uid, gid=child.gid, mode=child.mode)
            _set_xattrs(target, child.xattrs)  # after chown, which clears security.capability
            _set_times(target, child.mtime_ns)
        elif isinstance(child, Symlink):
            os.symlink(child.target, target)
            os.chown(target, child.uid, child.gid, follow_symlinks=False)
            _set_times(target, child.mtime_ns)
        elif isinstance(child, Hardlink):
            hardlinks.append((target, child.target))
        elif isinstance(child, Fifo):
            os.mkfifo(target)
            _set_owner_mode(target, uid=child.uid, gid=child.gid, mode=child.mode)
            _set_times(target, child.mtime_ns)
        elif isinstance(child, Device):
            kind = stat.S_IFCHR if child.kind == "c" else stat.S_IFBLK
            os.mknod(target, kind | child.mode, os.makedev(child.major, child.minor))
            _set_owner_mode(target, uid=child.uid, gid=child.gid, mode=child.mode)
            _set_times(target, child.mtime_ns)
        elif isinstance(child, Whiteout):
            if fmt == "kernel":
                _kernel_whiteout(target)
            else:
                _empty_marker(path / (OCI_WHITEOUT_PREFIX + name))
        else:  # pragma: no cover - the type union is closed
            raise TypeError(f"unknown spec node {child!r}")


def _finish_dirs(tree: _Tree, path: Path, fmt: WhiteoutFormat) -> None:
    """Directory attributes last (bottom-up), so that creating children does not disturb the mtimes."""
    for name, child in tree.children.items():
        if isinstance(child, _Tree):
            _finish_dirs(child, path / name, fmt)
    attrs = tree.attrs
    if attrs.opaque:
        if fmt == "kernel":
            os.setxattr(path, KERNEL_OPAQUE_XATTR, b"y")
        else:
            _empty_marker(path / OCI_OPAQUE_MARKER)
    _set_xattrs(path, attrs.xattrs)
    _set_owner_mode(path, uid=attrs.uid, gid=attrs.gid, mode=attrs.mode)
    _set_times(path, attrs.mtime_ns)


def build_layer(spec: Spec | Dir, path: Path, *, whiteouts: WhiteoutFormat = "kernel") -> Path:
    """Create the layer ``spec`` as a new directory ``path`` (which must not exist); return ``path``.

    The spec's root attributes (a ``Dir`` at the top) apply to ``path`` itself; a plain mapping gives the
    root mode 0755, owner root. Hardlink targets must be regular files of the same spec.
    """
    tree = _as_tree(spec)
    path.mkdir(parents=False)
    hardlinks: list[tuple[Path, str]] = []
    _build_dir(tree, path, whiteouts, hardlinks)
    for link, target in hardlinks:
        os.link(path / target, link)
    _finish_dirs(tree, path, whiteouts)
    return path


def spec_has_markers(spec: Spec | Dir) -> bool:
    """True when the spec contains a whiteout or an opaque directory (so its format matters)."""
    def walk(tree: _Tree) -> bool:
        if tree.attrs.opaque:
            return True
        return any(isinstance(c, Whiteout) or (isinstance(c, _Tree) and walk(c))
                   for c in tree.children.values())
    return walk(_as_tree(spec))


# --- faithful copies -------------------------------------------------------------------------------------

def _copy_xattrs(src: Path, dst: Path) -> None:
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy the tree ``src`` to the new path ``dst`` keeping everything an overlay looks at.

    Kept: types (files, dirs, symlinks, fifos, device nodes incl. 0/0 whiteouts), content, mode, owner,
    all xattrs (``trusted.*`` too), hard links within the tree, atime/mtime. Unlike ``shutil.copytree``
    this never opens a fifo or device. Returns ``dst``.
    """
    seen: dict[tuple[int, int], Path] = {}
    dirs: list[tuple[Path, os.stat_result]] = []

    def one(s: Path, d: Path) -> None:
        st = os.lstat(s)
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in seen:
            os.link(seen[key], d)
            return
        if stat.S_ISDIR(mode):
            d.mkdir()
            for name in sorted(os.listdir(s)):
                one(s / name, d / name)
            dirs.append((d, st))  # children first: attributes are applied bottom-up below
            _copy_xattrs(s, d)
            return
        if stat.S_ISREG(mode):
            with open(s, "rb") as fs, open(d, "xb") as fd:
                shutil.copyfileobj(fs, fd)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(d, stat.S_IFMT(mode) | stat.S_IMODE(mode), st.st_rdev)
        else:
            raise ValueError(f"cannot copy {s} (mode {mode:o})")
        seen[key] = d
        _copy_xattrs(s, d)
        os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(d, stat.S_IMODE(mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    one(src, dst)
    for d, st in dirs:  # innermost first (appended after their children)
        os.chown(d, st.st_uid, st.st_gid)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    return dst


@dataclass(frozen=True)
class LayerSet:
    """The directories one overlay mount uses. ``lowers[0]`` is the TOP lower (overlay order)."""

    lowers: tuple[Path, ...]
    upper: Path | None
    work: Path | None
    mnt: Path


def new_layer_set(base: Path, lowers: Sequence[Path], *, upper: Path | None = None,
                  readonly: bool = False) -> LayerSet:
    """Copy ``lowers`` (and ``upper``, if given) under the new directory ``base`` for one mount.

    Creates ``base/lower<i>``, ``base/upper`` (a copy of ``upper`` or empty; none when ``readonly``),
    ``base/work`` and an empty mountpoint ``base/mnt``. Every mount needs its own set because a
    mount writes into its upper and work directories.
    """
    base.mkdir(parents=True)
    copies = tuple(copy_tree(src, base / f"lower{i}") for i, src in enumerate(lowers))
    up: Path | None = None
    work: Path | None = None
    if not readonly:
        if upper is not None:
            up = copy_tree(upper, base / "upper")
        else:
            up = base / "upper"
            up.mkdir(mode=0o755)
        work = base / "work"
        work.mkdir(mode=0o755)
    mnt = base / "mnt"
    mnt.mkdir(mode=0o755)
    return LayerSet(lowers=copies, upper=up, work=work, mnt=mnt)


# --- whiteout format conversion --------------------------------------------------------------------------

def oci_to_kernel(layer: Path) -> None:
    """Rewrite, in place, the OCI whiteouts of a layer tree into the kernel overlay format.

    ``.wh..wh..opq`` becomes ``trusted.overlay.opaque=y`` on its directory; ``.wh.NAME`` becomes a
    character device 0/0 named ``NAME``. The mtimes of the directories touched are preserved.
    Raises ``ValueError`` if a layer has both ``NAME`` and ``.wh.NAME`` (invalid in OCI).
    """
    for dirpath, dirnames, filenames in os.walk(layer):
        here = Path(dirpath)
        markers = [n for n in filenames if n.startswith(OCI_WHITEOUT_PREFIX)]
        if not markers:
            continue
        st = os.stat(here)
        for name in markers:
            os.unlink(here / name)
            if name == OCI_OPAQUE_MARKER:
                os.setxattr(here, KERNEL_OPAQUE_XATTR, b"y")
                continue
            hidden = name[len(OCI_WHITEOUT_PREFIX):]
            if hidden in filenames or hidden in dirnames:
                raise ValueError(f"{here / name}: layer has both the whiteout and the name")
            _kernel_whiteout(here / hidden)
        os.utime(here, ns=(st.st_atime_ns, st.st_mtime_ns))

"""A layer tree ⇄ an OCI layer tar (image-spec layer.md), with whiteout translation both ways.

**Export** (:func:`write_tar`): the canonical tar of a stored layer.  Entries in the digest walk's order
(:func:`unionfs.image.digest.scan`: depth first, names sorted by their bytes), PAX format, numeric owners
with empty user and group names, integer-second mtimes (clamped to ``clamp`` — ``SOURCE_DATE_EPOCH`` —
when given), no atime/ctime, xattrs as ``SCHILY.xattr.*`` records (``security.capability`` included,
overlay-private ones dropped), hard links within the layer as link entries.  A whiteout (char 0/0) becomes
an empty ``.wh.NAME`` file and an opaque directory its entry followed by ``DIR/.wh..wh..opq``; markers are
mode 0644, owner 0:0, mtime 0.  The same tree always gives the same bytes.

**Import** (:class:`Extractor`): a tar stream read once, in order, into an empty directory the caller owns
(the store's staging dir), in the store's lowerdir format: ``.wh.NAME`` becomes a char 0/0 whiteout, and
``.wh..wh..opq`` marks its directory opaque (``trusted.overlay.opaque=y``; ``user.overlay.opaque=y`` where
``trusted.*`` is refused).  Every host access goes through :class:`unionfs.fs.fsio.HostDir` (no symlink is
ever followed, nothing outside the directory is reached), and hostile entries are refused with
:class:`LayerError` before anything is written for them:

* absolute names and names with a ``..`` component;
* an entry below a symlink of the layer (a file "written through" it) or below a non-directory;
* a hard link whose target is not an earlier non-directory entry of the same layer;
* devices this process may not create (EPERM from mknod);
* entry types a layer cannot hold (GNU long-name leftovers are handled by tarfile; sockets, unknown types).

An entry that replaces an earlier one of the same name (tar semantics) replaces it, except that a directory
is never replaced by a non-directory (refused).  A whiteout of a name the layer itself holds is dropped
(the entry wins; for a directory it becomes opaque), as :mod:`unionfs.image.digest` normalises it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash

from unionfs.fs.fsio import HostDir, join, split
from unionfs.fs.whiteout import (
    KERNEL_OPAQUE_XATTR,
    OPAQUE_MARKER,
    OPAQUE_XATTRS,
    WH_PREFIX,
    is_private_xattr,
    write_opaque_xattr,
)
from unionfs.image.digest import Entry, scan
from unionfs.image.walk import DirCache

CHUNK = 1 << 20
XATTR_PREFIX = "SCHILY.xattr."
MARKER_MODE = 0o644
_TAR_ENCODING = "utf-8"


class LayerError(Exception):
    """A layer tar that cannot be imported (hostile or broken); ``str()`` is one line meant for the user."""


# -- export --------------------------------------------------------------------------------------------------

def _pax_value(value: bytes) -> str:
    """A PAX record value carrying ``value``'s exact bytes (tarfile writes hdrcharset=BINARY when needed)."""
    return value.decode(_TAR_ENCODING, "surrogateescape")


def _mtime(ns: int, clamp: int | None) -> int:
    seconds = ns // 1_000_000_000
    return min(seconds, clamp) if clamp is not None else max(seconds, 0)


def _info(name: str, entry: Entry, clamp: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = _mtime(entry.mtime_ns, clamp)
    if entry.xattrs:
        info.pax_headers = {XATTR_PREFIX + attr: _pax_value(value) for attr, value in entry.xattrs}
    return info


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = MARKER_MODE
    info.uname = info.gname = ""
    info.mtime = 0
    return info


class _FileReader:
    """A file of the layer read with ``pread`` for tarfile's ``copyfileobj`` (exactly ``size`` bytes)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        data = os.pread(self.fd, CHUNK if n < 0 else n, self.offset)
        self.offset += len(data)
        return data


def write_tar(layer: HostDir, out: BinaryIO, *, clamp: int | None = None) -> int:
    """Write the canonical tar of the layer tree ``layer`` to ``out`` (a writer with ``tell()``, written
    strictly in order); return the number of entries.

    Raises OSError from the host (ESTALE where a file changed size while it was written).
    """
    manifest = scan(layer, content=False)
    count = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding=_TAR_ENCODING,
                      errors="surrogateescape") as tar, DirCache(layer) as dirs:
        tar.copybufsize = CHUNK  # type: ignore[attr-defined]
        for entry in manifest.entries:
            path, kind = entry.path, entry.kind
            if kind == "whiteout":
                parent, name = split(path)
                tar.addfile(_marker(join(parent, WH_PREFIX + name)))
                count += 1
                continue
            if path == "":  # the root's own attributes are not part of a layer; its opacity is
                if entry.opaque:
                    tar.addfile(_marker(OPAQUE_MARKER))
                    count += 1
                continue
            info = _info(path, entry, clamp)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                if entry.opaque:
                    tar.addfile(_marker(join(path, OPAQUE_MARKER)))
                    count += 1
            elif kind == "file":
                info.type = tarfile.REGTYPE
                info.size = entry.size
                parent, name = split(path)
                fd = dirs.get(parent).open(name, os.O_RDONLY)
                try:
                    if os.fstat(fd).st_size != entry.size:
                        raise OSError(errno.ESTALE, "file changed size while being exported", path)
                    tar.addfile(info, _FileReader(fd))  # type: ignore[arg-type]
                finally:
                    os.close(fd)
            elif kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
                tar.addfile(info)
            elif kind == "link":
                info = _marker(path)
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
                tar.addfile(info)
            elif kind in ("chr", "blk"):
                info.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                info.devmajor, info.devminor = entry.rdev
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:  # pragma: no cover - scan() yields only the kinds above
                raise OSError(errno.EINVAL, f"cannot export an entry of kind {kind}", path)
            count += 1
    return count


# -- import --------------------------------------------------------------------------------------------------

def clean_name(raw: str) -> str:
    """The layer-relative path of a tar member name: ``./`` and empty components dropped, ``""`` for the
    root.  LayerError for an absolute name or a ``..`` component."""
    if raw.startswith("/"):
        raise LayerError(f"refused: absolute path {raw!r} in the layer")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"refused: path {raw!r} in the layer climbs out with '..'")
    return "/".join(parts)


def mtime_ns(m: tarfile.TarInfo) -> int:
    """A member's mtime in nanoseconds: exact from a PAX ``mtime`` record (``SECONDS[.FRACTION]``), else the
    header's whole seconds."""
    text = m.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.partition(".")
        with contextlib.suppress(ValueError):
            sign = -1 if whole.startswith("-") else 1
            return int(whole) * 1_000_000_000 + sign * int((frac + "000000000")[:9] or "0")
    return int(m.mtime) * 1_000_000_000


MAX_EXTENDED_HEADER = 1 << 20
"""The largest PAX or GNU long-name record read (tarfile holds one whole in memory)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A member whose extended header records are refused beyond :data:`MAX_EXTENDED_HEADER`, so that a
    hostile tar cannot make the reader hold an arbitrarily large header in memory."""

    def _bound(self) -> None:
        if self.size > MAX_EXTENDED_HEADER:
            raise LayerError(f"refused: an extended tar header of {self.size} bytes "
                             f"(at most {MAX_EXTENDED_HEADER})")

    def _proc_pax(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._bound()
        return super()._proc_pax(tarfile)  # type: ignore[misc, no-any-return]

    def _proc_gnulong(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._bound()
        return super()._proc_gnulong(tarfile)  # type: ignore[misc, no-any-return]


@dataclass
class _Dir:
    """A directory's attributes, set when the extraction is over (mtime in ns)."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    opaque: bool = False


@dataclass
class ExtractStats:
    entries: int = 0
    files: int = 0
    nbytes: int = 0
    whiteouts: int = 0


class Extractor:
    """Reads one layer tar into the empty directory ``dest`` (see the module doc).

    After :meth:`run`, the tree is complete (directory attributes are set last, children first).
    """

    def __init__(self, dest: HostDir) -> None:
        self.dest = dest
        self.kinds: dict[str, str] = {"": "dir"}
        """What this extraction made at each path: dir, file, symlink, special, whiteout."""
        self.dirs: dict[str, _Dir] = {"": _Dir()}
        self.stats = ExtractStats()
        self.ids = (os.geteuid(), os.getegid())
        self.hashes: dict[int, tuple[int, str]] = {}
        """inode → (size, xxh3-128) of every file written: what :func:`unionfs.image.digest.scan` takes as
        ``known``, so that the tree is not read again to be digested."""
        self.opaque_xattr = KERNEL_OPAQUE_XATTR
        self.buf = bytearray(CHUNK)

    def run(self, stream: BinaryIO) -> ExtractStats:
        """Extract the tar read from ``stream`` (read once, in order) and finish the directories.  The
        stream is read up to the tar's end-of-archive marker; the caller drains and checks the rest."""
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", encoding=_TAR_ENCODING,  # noqa: SIM115 - closed below
                               errors="surrogateescape", bufsize=CHUNK, tarinfo=_BoundedTarInfo)
        except tarfile.ReadError as exc:
            raise LayerError(f"not a tar archive ({exc})") from None
        with DirCache(self.dest) as dirs:
            try:
                for member in tar:
                    self._member(tar, member, dirs)
            except tarfile.TarError as exc:
                raise LayerError(f"broken or truncated tar ({exc})") from None
            except EOFError:
                raise LayerError("the tar is truncated") from None
            finally:
                tar.close()
        self._finish_dirs()
        return self.stats

    # -- one member ------------------------------------------------------------------------------------
    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, dirs: DirCache) -> None:
        path = clean_name(m.name)
        self.stats.entries += 1
        parent, name = split(path)
        if name.startswith(WH_PREFIX) and (m.isreg() or m.islnk()):
            self._parents(parent, path, dirs)
            self._whiteout(parent, name, path, dirs)
            return
        if path == "":
            if m.isdir():
                self.dirs[""] = self._dir_attrs(m, self.dirs[""].opaque)
                return
            raise LayerError(f"refused: the layer's root {m.name!r} is not a directory")
        self._parents(parent, path, dirs)
        old = self.kinds.get(path)
        if m.isdir():
            if old == "dir":
                self.dirs[path] = self._dir_attrs(m, self.dirs[path].opaque)
                return
            opaque = old == "whiteout"  # the dir replaces a whiteout of the same name: it hides the lowers
            if old is not None:
                self.dest.unlink(path)
            dirs.get(parent).mkdir(name, 0o700)
            self.kinds[path] = "dir"
            self.dirs[path] = self._dir_attrs(m, opaque)
            return
        if old == "dir":
            raise LayerError(f"refused: {m.name!r} replaces a directory of the same layer with a non-directory")
        if old is not None:
            self.dest.unlink(path)
            self.kinds.pop(path)
        d = dirs.get(parent)
        if m.isreg():
            fd = d.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self._copy(tar, m, fd, path)
                self._attrs_fd(fd, m, path)
            finally:
                os.close(fd)
            self.kinds[path] = "file"
            self.stats.files += 1
            return
        if m.islnk():
            target = clean_name(m.linkname)
            if self.kinds.get(target) not in ("file", "symlink", "special"):
                raise LayerError(f"refused: hard link {m.name!r} points outside the layer (to {m.linkname!r})")
            self.dest.link(target, path)
            self.kinds[path] = self.kinds[target]
            return
        if m.issym():
            d.symlink(m.linkname, name)
            self.kinds[path] = "symlink"
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat_mod.S_IFCHR if m.ischr() else stat_mod.S_IFBLK if m.isblk() else stat_mod.S_IFIFO
            try:
                d.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor) if kind != stat_mod.S_IFIFO else 0)
            except PermissionError:
                raise LayerError(f"refused: device {m.name!r}: this process may not create devices "
                                 "(no CAP_MKNOD)") from None
            if kind == stat_mod.S_IFCHR and (m.devmajor, m.devminor) == (0, 0):
                self.kinds[path] = "whiteout"  # a kernel-format whiteout in the tar
                self.stats.whiteouts += 1
                return
            self.kinds[path] = "special"
        else:
            raise LayerError(f"refused: {m.name!r} has a type a layer cannot hold ({m.type!r})")
        self._attrs_path(path, m, symlink=m.issym())

    def _parents(self, parent: str, path: str, dirs: DirCache) -> None:
        """Make sure every parent of ``path`` is a directory of this layer (creating missing ones, as tar
        does); refuse a parent that is a symlink or another non-directory."""
        if self.kinds.get(parent) == "dir":
            return
        parts = parent.split("/")
        for i in range(len(parts)):
            sub = "/".join(parts[:i + 1])
            kind = self.kinds.get(sub)
            if kind == "dir":
                continue
            if kind == "symlink":
                raise LayerError(f"refused: {path!r} would be written through the symlink {sub!r}")
            if kind is not None and kind != "whiteout":
                raise LayerError(f"refused: {path!r} is below {sub!r}, which is not a directory")
            up, name = split(sub)
            if kind == "whiteout":
                self.dest.unlink(sub)
            dirs.get(up).mkdir(name, 0o700)
            self.kinds[sub] = "dir"
            self.dirs[sub] = _Dir(opaque=kind == "whiteout")

    def _whiteout(self, parent: str, name: str, path: str, dirs: DirCache) -> None:
        self.stats.whiteouts += 1
        if name == OPAQUE_MARKER:
            self.dirs[parent].opaque = True
            return
        hidden = name[len(WH_PREFIX):]
        if not hidden or hidden in (".", "..") or hidden.startswith(WH_PREFIX):
            raise LayerError(f"refused: invalid whiteout {path!r}")
        target = join(parent, hidden)
        kind = self.kinds.get(target)
        if kind is not None:  # the layer itself has the name: the entry wins (a dir hides the lowers)
            if kind == "dir":
                self.dirs[target].opaque = True
            return
        dirs.get(parent).mknod(hidden, stat_mod.S_IFCHR, 0)
        self.kinds[target] = "whiteout"

    # -- data and attributes ---------------------------------------------------------------------------
    def _copy(self, tar: tarfile.TarFile, m: tarfile.TarInfo, fd: int, path: str) -> None:
        src = tar.extractfile(m)
        if src is None:  # pragma: no cover - a regular member always has a file object
            raise LayerError(f"cannot read {m.name!r}")
        left = m.size
        view = memoryview(self.buf)
        h = xxhash.xxh3_128()
        while left > 0:
            n = src.readinto(view[:min(CHUNK, left)])  # type: ignore[attr-defined]
            if not n:
                raise LayerError(f"the tar is truncated inside {m.name!r}")
            h.update(view[:n])
            done = 0
            while done < n:
                done += os.write(fd, view[done:n])
            left -= n
            self.stats.nbytes += n
        self.hashes[os.fstat(fd).st_ino] = (m.size, h.hexdigest())

    @staticmethod
    def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
        out = {}
        for key, value in m.pax_headers.items():
            if key.startswith(XATTR_PREFIX):
                out[key[len(XATTR_PREFIX):]] = value.encode(_TAR_ENCODING, "surrogateescape")
        return out

    def _dir_attrs(self, m: tarfile.TarInfo, opaque: bool) -> _Dir:
        xattrs = self._xattrs(m)
        if any(xattrs.get(attr) == b"y" for attr in OPAQUE_XATTRS):  # a tar written from an overlay upper
            opaque = True
        return _Dir(stat_mod.S_IMODE(m.mode), m.uid, m.gid, mtime_ns(m), xattrs, opaque)

    def _attrs_fd(self, fd: int, m: tarfile.TarInfo, path: str) -> None:
        if (m.uid, m.gid) != self.ids:
            os.fchown(fd, m.uid, m.gid)  # before chmod: chown clears set-id bits
        os.fchmod(fd, stat_mod.S_IMODE(m.mode))
        for attr, value in self._xattrs(m).items():  # after chown: it clears security.capability
            if not is_private_xattr(attr):
                self._setxattr(f"/proc/self/fd/{fd}", attr, value, path, follow=True)
        ns = mtime_ns(m)
        os.utime(fd, ns=(ns, ns))

    def _attrs_path(self, path: str, m: tarfile.TarInfo, *, symlink: bool) -> None:
        self.dest.chown(path, m.uid, m.gid)
        if not symlink:
            self.dest.chmod(path, stat_mod.S_IMODE(m.mode))
        for attr, value in self._xattrs(m).items():
            if not is_private_xattr(attr):
                try:
                    self.dest.setxattr(path, attr, value)
                except OSError as exc:
                    self._xattr_error(exc, attr, path)
        ns = mtime_ns(m)
        self.dest.utime(path, (ns, ns))

    def _setxattr(self, target: str, attr: str, value: bytes, path: str, *, follow: bool) -> None:
        try:
            os.setxattr(target, attr, value, follow_symlinks=follow)
        except OSError as exc:
            self._xattr_error(exc, attr, path)

    @staticmethod
    def _xattr_error(exc: OSError, attr: str, path: str) -> None:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise LayerError(f"cannot set xattr {attr} on {path!r}: {exc.strerror}") from None
        raise exc

    def _finish_dirs(self) -> None:
        for path in sorted(self.dirs, key=lambda p: p.count("/") + (p != ""), reverse=True):
            attrs = self.dirs[path]
            self.dest.chown(path, attrs.uid, attrs.gid)
            self.dest.chmod(path, attrs.mode)
            for attr, value in attrs.xattrs.items():
                if not is_private_xattr(attr):
                    try:
                        self.dest.setxattr(path, attr, value)
                    except OSError as exc:
                        self._xattr_error(exc, attr, path)
            if attrs.opaque:
                self._mark_opaque(path)
            self.dest.utime(path, (attrs.mtime, attrs.mtime))

    def _mark_opaque(self, path: str) -> None:
        self.opaque_xattr = write_opaque_xattr(lambda attr, value: self.dest.setxattr(path, attr, value),
                                               self.opaque_xattr)

def extract(stream: BinaryIO, dest: str) -> ExtractStats:
    """Extract the layer tar read from ``stream`` into the empty directory at host path ``dest``."""
    host = HostDir(dest)
    try:
        return Extractor(host).run(stream)
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) else ""
        raise LayerError(f"cannot write the layer: {exc.strerror}: {where}") from None
    finally:
        host.close()


def export(path: str, out: BinaryIO, *, clamp: int | None = None) -> int:
    """Write the canonical tar of the layer tree at host path ``path`` to ``out`` (see :func:`write_tar`)."""
    host = HostDir(path)
    try:
        return write_tar(host, out, clamp=clamp)
    finally:
        host.close()


def source_date_epoch() -> int | None:
    """``$SOURCE_DATE_EPOCH`` as an integer, None when unset; LayerError when it is not a number."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    with contextlib.suppress(ValueError):
        if int(value) >= 0:
            return int(value)
    raise LayerError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")

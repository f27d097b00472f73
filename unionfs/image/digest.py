"""Content digests of layer trees: xxh3-128 over a canonical, sorted walk (docs/architecture.md, "The layer store").

A layer tree is read as an overlay reads it (every whiteout and opaque format, see :mod:`unionfs.image.walk`)
and turned into a :class:`Manifest`: one normalised :class:`Entry` per path, in canonical order (depth
first, the names of a directory sorted by their bytes).  The digest is xxh3-128 over a version tag and the
length-framed encoding of every entry.  Two trees have the same digest exactly when an overlay mount of
either shows the same thing, so a layer is stored once whatever its on-disk format or creation order.

What an entry records, by kind:

* every entry: its path (bytes, relative to the layer root, the root is ``""``) and kind;
* ``dir``: permission bits (incl. set-id and sticky), uid, gid, sorted xattrs, and the opaque mark;
* ``file``: permission bits, uid, gid, size, mtime (ns), xxh3-128 of the data (holes read as zeros),
  xattrs;
* ``symlink``: uid, gid, mtime, target, xattrs;  ``fifo``: bits, uid, gid, mtime, xattrs;
  ``chr``/``blk``: bits, uid, gid, mtime, ``major:minor`` (not the machine's ``dev_t`` encoding), xattrs;
* ``whiteout``: nothing more — a char 0/0 device, a ``.wh.NAME`` file and an xattr whiteout are one mark;
* ``link``: the first path (in canonical order) of its hard-link group; the group's other fields are those
  of that first path.

Times: a non-directory's **mtime is part of the digest**: a mount of the layer shows it, copy-up and tar
preserve it, and a layer found by digest must reproduce the tree that was committed (dedup that silently
swapped mtimes would make ``make`` and caches see changes that did not happen).  **Excluded**: atime and
ctime (they change by being read or copied), directory mtimes (a by-product of how the tree was built:
every create, delete or whiteout changes them; a deduplicated layer keeps those of its first commit), inode
numbers, link counts (hard-link groups are recorded instead) and the device.  Overlay-private xattrs
(``trusted.overlay.*``, ``user.overlay.*``, ours) are excluded; the opaque mark stands for them.

Normalisation: a name that is both an entry and a whiteout in one directory is the entry (for a directory,
an opaque one: the union shows it and hides every lower copy).  A directory renamed with ``redirect_dir=on``
(a redirect xattr: its lower copies are elsewhere) is flattened where :func:`scan` is told the layers the tree
was mounted over: it becomes a full, opaque copy of what the union shows there (the whiteout at its old name
is in the tree already), so a layer never depends on a redirect.  Likewise the names that a file copied up
through the inode index (``index=on``) still has only in the layers below, in plain directories or below a
renamed one, become hard links of its copy, so a layer never depends on an index entry.  Sockets are not
part of a layer (as with ``docker commit``): they are reported in :attr:`Manifest.sockets` and skipped.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import xxhash

from unionfs.fs.cache import LookupCache
from unionfs.fs.fsio import HostDir, join, split
from unionfs.fs.index import NLINK_XATTR, ORIGIN_XATTR, decode_fh, parse_nlink
from unionfs.fs.layers import Layer, LayerStack
from unionfs.fs.lookup import Resolver
from unionfs.fs.whiteout import REDIRECT_XATTRS
from unionfs.image.walk import Child, DirCache, OpenDir, Xattrs, read_dir, sort_key

DIGEST_ALGORITHM = "xxh3-128/unionfs-layer-v1"
"""Names the digest function and the encoding; stored with every layer."""

_VERSION_TAG = b"unionfs-layer-v1\n"
_CHUNK = 1 << 20
KEEP_FILE_MAX = 256 << 10
"""The largest file whose data :func:`scan` keeps in memory when asked to."""
_ZEROS = bytes(_CHUNK)

Progress = Callable[[int, int], None]
"""Called as ``progress(files, nbytes)`` after each entry: one more entry, and the bytes it held."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a layer, normalised.  Fields that do not apply to the kind are zero/empty.

    ``atime_ns``, a directory's ``mtime_ns`` and ``sparse`` are carried (a commit uses them) but not
    digested.
    """

    path: str
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    content: str = ""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: Xattrs = ()
    opaque: bool = False
    sparse: bool = False
    """A file that may have holes (a hint for copying; not digested)."""
    source: tuple[int, str] | None = None
    """Where a flattened entry is read from: (index into :attr:`Manifest.sources`, path there); None: the
    tree itself at ``path`` (not digested)."""

    def encode(self) -> bytes:
        """The canonical bytes of this entry (what the digest hashes)."""
        kind = self.kind
        parts: list[bytes] = [os.fsencode(self.path), kind.encode()]
        if kind == "whiteout":
            return _frame(parts)
        if kind == "link":
            return _frame([*parts, os.fsencode(self.target)])
        if kind != "symlink":
            parts.append(_int(self.mode))
        parts += [_int(self.uid), _int(self.gid)]
        if kind == "dir":
            parts.append(b"opaque" if self.opaque else b"")
        else:
            parts.append(_int(self.mtime_ns))
        if kind == "file":
            parts += [_int(self.size), self.content.encode()]
        elif kind == "symlink":
            parts.append(os.fsencode(self.target))
        elif kind in ("chr", "blk"):
            parts.append(f"{self.rdev[0]}:{self.rdev[1]}".encode())
        parts.append(_frame([_frame([name.encode(), value]) for name, value in self.xattrs]))
        return _frame(parts)


def _int(value: int) -> bytes:
    return str(value).encode()


def _frame(parts: list[bytes]) -> bytes:
    """``count, len_1 … len_n`` (little-endian u32) then the parts: unambiguous, and cheap to build."""
    return struct.pack(f"<{len(parts) + 1}I", len(parts), *map(len, parts)) + b"".join(parts)


@dataclass(frozen=True, kw_only=True)
class LayerCounts:
    """What a layer holds, by kind of entry: a manifest has them, a layer's metadata keeps them.  ``size``
    counts the data bytes of regular files, each hard-link group once (a ``link`` entry adds nothing)."""

    size: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    links: int = 0

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> LayerCounts:
        counts = dict.fromkeys(("size", "files", "dirs", "symlinks", "specials", "whiteouts", "opaque_dirs",
                                "links"), 0)
        plural = {"file": "files", "dir": "dirs", "symlink": "symlinks", "whiteout": "whiteouts", "link": "links"}
        for entry in entries:
            counts[plural.get(entry.kind, "specials")] += 1
            if entry.kind == "file":
                counts["size"] += entry.size
            elif entry.kind == "dir":
                counts["opaque_dirs"] += entry.opaque
        return cls(**counts)


@dataclass(slots=True)
class Manifest:
    """A layer tree read and normalised: its entries in canonical order, its digest and its counts.

    ``overlay_only`` lists paths that carry an overlay redirect or metacopy xattr (they cannot stand alone in
    a layer).
    """

    entries: list[Entry] = field(default_factory=list)
    digest: str = ""
    counts: LayerCounts = field(default_factory=LayerCounts)
    sockets: list[str] = field(default_factory=list)
    overlay_only: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """The host paths of the layers below the tree that flattened entries come from (see ``Entry.source``)."""
    flattened: list[str] = field(default_factory=list)
    """The renamed directories that were flattened into full opaque copies."""
    data: dict[str, bytes] = field(default_factory=dict)
    """The contents of small files read while hashing (see :func:`scan`'s ``keep``), by path."""


def digest_entries(entries: Iterable[Entry]) -> str:
    """The digest of entries given in canonical order (32 lowercase hex digits)."""
    h = xxhash.xxh3_128(_VERSION_TAG)
    for entry in entries:
        h.update(entry.encode())
    return h.hexdigest()


def hash_file(fd: int, size: int, *, sink: int = -1, buf: bytearray | None = None,
              sparse: bool = True) -> tuple[str, int]:
    """xxh3-128 of the first ``size`` bytes of ``fd``, holes read as zeros; returns (hex digest, bytes seen).

    With ``sink`` (a descriptor of a new, empty file) the data is also written there at the same offsets,
    holes left as holes; the caller sets the final length.  Fewer bytes seen than ``size`` means the file
    shrank while being read.  Reads with ``pread``: the descriptor's offset is not used.  ``sparse=False``
    (the file has as many blocks as bytes) skips looking for holes.
    """
    h = xxhash.xxh3_128()
    buffer = buf if buf is not None else bytearray(_CHUNK)
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        data_at, hole_at = _next_segment(fd, offset, size) if sparse else (offset, size)
        while offset < data_at:
            n = min(_CHUNK, data_at - offset)
            h.update(_ZEROS[:n])
            offset += n
        while offset < hole_at:
            n = os.preadv(fd, [view[:min(_CHUNK, hole_at - offset)]], offset)
            if n == 0:
                return h.hexdigest(), offset
            h.update(view[:n])
            if sink >= 0:
                _pwrite_all(sink, view[:n], offset)
            offset += n
    return h.hexdigest(), offset


def _next_segment(fd: int, offset: int, size: int) -> tuple[int, int]:
    """(start of the next data, end of that data) at or after ``offset``, both clamped to ``size``."""
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a hole up to the end
            return size, size
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
            return offset, size
        raise
    data_at = min(data_at, size)
    hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), size) if data_at < size else size
    return data_at, hole_at


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def may_be_sparse(st: os.stat_result) -> bool:
    """False when a file has at least as many allocated bytes as its size (it has no holes to look for)."""
    return st.st_blocks * 512 < st.st_size


_KINDS = {stat_mod.S_IFREG: "file", stat_mod.S_IFDIR: "dir", stat_mod.S_IFLNK: "symlink",
          stat_mod.S_IFIFO: "fifo", stat_mod.S_IFCHR: "chr", stat_mod.S_IFBLK: "blk", stat_mod.S_IFSOCK: "sock"}


def kind_of(mode: int) -> str:
    """The entry kind of an ``st_mode`` (sockets are ``sock``; they never become entries)."""
    fmt = stat_mod.S_IFMT(mode)
    return _KINDS.get(fmt) or f"unknown:{fmt:o}"


def entry_from_stat(path: str, st: os.stat_result, xattrs: Xattrs, *, content: str = "",
                    target: str = "", opaque: bool = False) -> Entry:
    """An :class:`Entry` for ``path`` from its lstat (content hash and link target supplied by the caller)."""
    kind = kind_of(st.st_mode)
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else (0, 0)
    return Entry(path=path, kind=kind, mode=stat_mod.S_IMODE(st.st_mode) if kind != "symlink" else 0,
                 uid=st.st_uid, gid=st.st_gid, size=st.st_size if kind == "file" else 0,
                 mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns, content=content, target=target,
                 rdev=rdev, xattrs=xattrs, opaque=opaque, sparse=kind == "file" and may_be_sparse(st))


def _path_key(path: str) -> tuple[bytes, ...]:
    """The canonical (depth-first, names by bytes) order of paths, as a sort key."""
    return tuple(sort_key(part) for part in path.split("/")) if path else ()


class _Walker:
    """The canonical walk of one tree (depth first, names by bytes), without recursion."""

    def __init__(self, host: HostDir, *, content: bool, progress: Progress | None, keep: int,
                 known: Mapping[int, tuple[int, str]] | None = None) -> None:
        self.known = known or {}
        self.host = host
        self.dev = host.dev
        self.content = content
        self.progress = progress
        self.keep = keep
        self.manifest = Manifest()
        self.groups: dict[tuple[int, int], str] = {}
        self.buf = bytearray(_CHUNK)
        self.below: list[str] = []
        self.stack: LayerStack | None = None
        self.resolver: Resolver | None = None
        """The union of the tree over the layers ``below`` it, opened at the first renamed directory."""
        self.pending_links: list[tuple[str, Child, tuple[bytes, int]]] = []
        """Indexed files with names left in the layers below (see :meth:`_flatten_links`)."""
        self.shown: dict[tuple[int, str], list[str]] = {}
        """Where a flattened directory shows a non-directory of a layer below: (index of that layer in
        :attr:`stack`, its path there) -> the union paths that show it."""

    def run(self) -> Manifest:
        with OpenDir(self.host, "") as root:
            xattrs = root.public_xattrs("")
            st = os.fstat(root.fd)
        # A task is (parent rel, Child, forced opaque) for an entry, or (parent rel, None, name) for a whiteout.
        tasks: list[tuple[str, Child | None, str | bool]] = [("", Child("", st, xattrs), False)]
        with DirCache(self.host) as dirs:
            while tasks:
                parent, child, extra = tasks.pop()
                if child is None:
                    self._emit(Entry(path=join(parent, str(extra)), kind="whiteout"))
                    continue
                path = join(parent, child.name) if child.name else ""
                if child.st.st_dev != self.dev:
                    raise OSError(errno.EXDEV, "another filesystem is mounted inside the tree", path)
                if child.overlay_only in REDIRECT_XATTRS and self.below and stat_mod.S_ISDIR(child.st.st_mode):
                    self._flatten(path, child)
                    continue
                left = self._names_left_below(dirs.get(parent), child)
                if left is not None and self.below:
                    self.pending_links.append((path, child, left))
                elif child.overlay_only or left is not None:
                    self.manifest.overlay_only.append(path)
                if stat_mod.S_ISDIR(child.st.st_mode):
                    tasks.extend(reversed(self._dir(dirs, path, child, bool(extra))))
                else:
                    self._emit(self._leaf(dirs.get(parent), path, child))
        if self.pending_links:
            self._flatten_links()
        self.manifest.digest = digest_entries(self.manifest.entries)
        self.manifest.counts = LayerCounts.of(self.manifest.entries)
        return self.manifest

    def _dir(self, dirs: DirCache, path: str, child: Child,
             forced_opaque: bool) -> list[tuple[str, Child | None, str | bool]]:
        listing = read_dir(dirs.get(path))
        self._emit(entry_from_stat(path, child.st, child.xattrs, opaque=listing.opaque or forced_opaque))
        self.manifest.sockets.extend(join(path, name) for name in listing.sockets)
        by_name = {c.name: c for c in listing.children}
        tasks: list[tuple[str, Child | None, str | bool]] = []
        for name in sorted(by_name.keys() | listing.whiteouts, key=sort_key):
            found = by_name.get(name)
            if found is None:
                tasks.append((path, None, name))
            else:
                tasks.append((path, found, name in listing.whiteouts))
        return tasks

    def _flatten(self, path: str, child: Child) -> None:
        """Emit renamed directory ``path`` as a full opaque copy of the union's view of it, in canonical
        order (each object read from the layer that shows it)."""
        self._open_view()
        self.manifest.flattened.append(path)
        self._emit(entry_from_stat(path, child.st, child.xattrs, opaque=True))
        tasks = [(path, name) for name in reversed(self._view_names(path))]
        while tasks:
            parent, name = tasks.pop()
            entry_path = join(parent, name)
            entry = self._view_entry(parent, name)
            if entry is None:
                continue
            self._emit(entry)
            if entry.kind == "dir":
                tasks.extend((entry_path, n) for n in reversed(self._view_names(entry_path)))

    @staticmethod
    def _names_left_below(d: OpenDir, child: Child) -> tuple[bytes, int] | None:
        """Where ``child`` is a name of a lower hard link copied up through the inode index (``index=on``)
        whose union link count says some of its names are still only in the lower layers: (its origin
        handle, how many such names; -1: unknown).  A layer holds them only as hard links of the copy."""
        if child.st.st_nlink < 2 or stat_mod.S_ISDIR(child.st.st_mode):
            return None
        value = d.getxattr(child.name, NLINK_XATTR)
        if value is None:
            return None
        parsed = parse_nlink(value)
        origin = d.getxattr(child.name, ORIGIN_XATTR) or b""
        if parsed is None or parsed[0] != "U":
            return origin, -1
        # upper names = the inode's links less the index entry; "U%+d" leaves d + 1 names below
        return (origin, parsed[1] + 1) if parsed[1] >= 0 else None

    def _open_view(self) -> Resolver:
        """The union of the tree over the layers below it (opened once; ``Manifest.sources`` names them)."""
        if self.resolver is None:
            try:
                self.stack = LayerStack.open(lowers=[self.host.path, *self.below], upper=None, work=None)
            except ValueError as exc:  # LayerError: a layer below is missing or unusable
                raise OSError(errno.ENOENT, f"the layers below cannot be read ({exc})", "") from None
            self.resolver = Resolver.of_stack(self.stack, LookupCache(1_000_000))
            self.manifest.sources = [self.host.path, *self.below]
        return self.resolver

    def _flatten_links(self) -> None:
        """Add the names that an indexed file (``index=on``) still has only in the layers below, as hard
        links of its copy (the first name in canonical order holds the data), with the directories above
        them that the tree lacks.  A name below a renamed directory is one the flattened copy of that
        directory holds already (read from the lower file): it becomes a link of the copy too.  An upper
        whose such names cannot all be found where the union shows them stays in
        :attr:`Manifest.overlay_only`."""
        resolver = self._open_view()
        assert self.stack is not None
        layers = self.stack.lowers[1:]  # the layers below the tree, top first
        by_path = {e.path: i for i, e in enumerate(self.manifest.entries)}
        files: dict[tuple[int, int], tuple[str, int, tuple[int, int] | None]] = {}
        for path, child, (origin, count) in self.pending_links:  # each file once, whatever its upper names
            key = (child.st.st_dev, child.st.st_ino)
            if key not in files:
                files[key] = (path, count, self._lower_object(layers, origin))
        lower_names = self._lower_names(resolver, layers, {obj for _, _, obj in files.values() if obj})
        claimed: set[tuple[int, int]] = set()
        for key, (path, count, obj) in files.items():
            found = lower_names.get(obj, []) if obj else []
            # a handle that names nothing, a count that does not match, two copies of one lower file: refused
            if obj is None or count < 0 or len(found) != count or obj in claimed:
                self.manifest.overlay_only.append(path)
                continue
            claimed.add(obj)
            first = self.groups.get(key, path)
            names = sorted({first, *found, *(e.path for e in self.manifest.entries
                                              if e.kind == "link" and e.target == first)}, key=_path_key)
            head = names[0]
            if head != first:  # a lower name comes first: it holds the data, read from the copy
                entry = self.manifest.entries[by_path[first]]
                data = self.manifest.data.get(first)
                if data is not None:
                    self.manifest.data[head] = data
                else:  # what a flattened directory read there is the lower file's old data
                    self.manifest.data.pop(head, None)
                self._put(by_path, replace(entry, path=head, source=None if data is not None else (0, first)))
            for name in names[1:]:
                self.manifest.data.pop(name, None)
                self._put(by_path, Entry(path=name, kind="link", target=head))
            for name in found:
                parent = split(name)[0]
                while parent and parent not in by_path:
                    grand, base = split(parent)
                    above = self._view_entry(grand, base)
                    if above is not None:
                        self._put(by_path, above)
                    parent = grand
        self.manifest.entries.sort(key=lambda e: _path_key(e.path))

    def _put(self, by_path: dict[str, int], entry: Entry) -> None:
        """Set the entry of ``entry.path``: in place of the one there, else added (``by_path`` kept)."""
        index = by_path.get(entry.path)
        if index is None:
            by_path[entry.path] = len(self.manifest.entries)
            self.manifest.entries.append(entry)
        else:
            self.manifest.entries[index] = entry

    @staticmethod
    def _lower_object(layers: Sequence[Layer], origin: bytes) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the object that file handle ``origin`` names, decoded on the first layer below
        of the handle's file system (a handle names an object anywhere on it); None where it is gone."""
        try:
            fh = decode_fh(origin)
        except ValueError:
            return None
        if fh is None:
            return None
        for layer in layers:
            host = layer.host
            if host.fs_uuid() != fh.uuid:
                continue
            st = host.stat_by_handle(fh.handle_type, fh.fid)
            if st is not None and st.st_dev == host.dev:
                return st.st_dev, st.st_ino
        return None

    def _lower_names(self, resolver: Resolver, layers: Sequence[Layer],
                     objects: set[tuple[int, int]]) -> dict[tuple[int, int], list[str]]:
        """The union paths where the union shows each of the lower ``objects`` ((st_dev, st_ino)): their names
        in the first layer that has them, each at the same path where no renamed directory is above it, and
        where a flattened directory shows it (:attr:`shown`).  One pass over each layer that is needed."""
        out: dict[tuple[int, int], set[str]] = {}
        left = set(objects)
        for layer in layers:
            host = layer.host
            wanted = {ino for dev, ino in left if dev == host.dev}
            if not wanted:
                continue
            todo = [""]
            while todo:
                rel = todo.pop()
                for name, kind, ino in host.scandir(rel):
                    where = join(rel, name)
                    if kind == stat_mod.S_IFDIR:
                        todo.append(where)
                    elif ino in wanted:
                        paths = out.setdefault((host.dev, ino), set())
                        node = resolver.lookup(where)
                        if node is not None and node.layer == layer.index and node.source == where:
                            paths.add(where)
                        paths.update(self.shown.get((layer.index, where), ()))
            left -= out.keys()
            if not left:
                break
        return {obj: sorted(paths, key=_path_key) for obj, paths in out.items()}

    def _view_names(self, rel: str) -> list[str]:
        assert self.resolver is not None
        state = self.resolver.dir_state(rel)
        if state is None:
            raise OSError(errno.ENOTDIR, "a renamed directory's view changed while being read", rel)
        return sorted(state.visible_names(), key=sort_key)

    def _view_entry(self, parent: str, name: str) -> Entry | None:
        """The entry of ``parent/name`` as the union shows it (None: a socket, or gone)."""
        resolver = self.resolver
        assert resolver is not None
        state = resolver.dir_state(parent)
        node = None if state is None else resolver.child(state, name)
        if node is None:
            return None
        entry_path = join(parent, name)
        parent_source, base = split(node.source)
        with OpenDir(resolver.hosts[node.layer], parent_source) as d:
            found = Child(base, d.lstat(base), d.public_xattrs(base))
            if stat_mod.S_ISSOCK(found.st.st_mode):
                self.manifest.sockets.append(entry_path)
                return None
            if node.is_dir:
                return entry_from_stat(entry_path, found.st, found.xattrs)
            if node.layer == 0:  # the tree's own copy, maybe an indexed file with names left below
                left = self._names_left_below(d, found)
                if left is not None:
                    self.pending_links.append((entry_path, found, left))
            else:
                self.shown.setdefault((node.layer, node.source), []).append(entry_path)
            entry = self._leaf(d, entry_path, found, own=node.layer == 0)
        if entry.kind == "file" and entry_path not in self.manifest.data:
            entry = replace(entry, source=(node.layer, node.source))
        return entry

    def _leaf(self, d: OpenDir, path: str, child: Child, *, own: bool = True) -> Entry:
        """The entry of non-directory ``child`` of ``d``; ``own``: it is in the tree itself (not in a layer
        below a flattened directory), so ``known`` hashes apply to it."""
        st = child.st
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.groups.get(key)
            if first is not None:
                return Entry(path=path, kind="link", target=first)
            self.groups[key] = path
        if stat_mod.S_ISREG(st.st_mode):
            digest = ""
            hit = self.known.get(st.st_ino) if own else None
            if hit is not None and hit[0] == st.st_size:
                return entry_from_stat(path, st, child.xattrs, content=hit[1])
            if self.content:
                fd = d.open(child.name, os.O_RDONLY)
                try:
                    if st.st_size <= KEEP_FILE_MAX and st.st_size <= self.keep:
                        data = os.pread(fd, st.st_size + 1, 0)
                        digest, seen = xxhash.xxh3_128_hexdigest(data), len(data)
                        self.manifest.data[path] = data
                        self.keep -= len(data)
                    else:
                        digest, seen = hash_file(fd, st.st_size, buf=self.buf, sparse=may_be_sparse(st))
                finally:
                    os.close(fd)
                if seen != st.st_size:
                    raise OSError(errno.ESTALE, "file changed size while being read", path)
            return entry_from_stat(path, st, child.xattrs, content=digest)
        if stat_mod.S_ISLNK(st.st_mode):
            return entry_from_stat(path, st, child.xattrs, target=d.readlink(child.name))
        return entry_from_stat(path, st, child.xattrs)

    def _emit(self, entry: Entry) -> None:
        self.manifest.entries.append(entry)
        if self.progress is not None:
            self.progress(1, entry.size)


def scan(host: HostDir, *, content: bool = True, progress: Progress | None = None, keep: int = 0,
         known: Mapping[int, tuple[int, str]] | None = None, below: Sequence[str] = ()) -> Manifest:
    """Read the layer tree under ``host`` into a :class:`Manifest` (entries, digest, counts).

    ``content=False`` skips reading file data (``Entry.content`` stays empty and the digest is then
    meaningless: for listings that only need the shape).  Raises ``OSError`` from the host; EXDEV where
    another filesystem is mounted inside the tree (a layer is one directory tree, never a set of mounts);
    ESTALE where a file changed size while it was read.  ``keep`` bytes of the data of small files (up to
    :data:`KEEP_FILE_MAX` each) are kept in :attr:`Manifest.data`, exactly as hashed, so that a copy can be
    written without reading them again.  ``known`` maps inode numbers of files whose content hash the
    caller computed while writing them (a tree it owns and nothing else changes) to ``(size, hash)``: those
    files are not read again.

    ``below``: the host paths of the layers the tree (an upper dir) was mounted over, top first.  With them a
    directory with a redirect is flattened (see the module doc); without them it stays in
    :attr:`Manifest.overlay_only`, as every metacopy file does.
    """
    walker = _Walker(host, content=content, progress=progress, keep=keep, known=known)
    walker.below = list(below)
    try:
        return walker.run()
    finally:
        if walker.stack is not None:
            walker.stack.close()


def layer_digest(path: str) -> str:
    """The digest of the layer tree at host path ``path`` (a convenience for tools and tests)."""
    host = HostDir(path)
    try:
        return scan(host).digest
    finally:
        host.close()

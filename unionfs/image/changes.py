"""What an upper dir (or a layer) changes, and what an image's layers cost: ``unionfs diff`` and ``inspect``.

**diff** compares two views of a union: the *old* one (the lower layers alone) and the *new* one (the upper
over them), for every path the upper holds.  ``A`` — the path is new; ``C`` — it was there and the upper
has its own copy (a non-directory: always; a directory: when its mode, owner, mtime or xattrs differ, when
it is opaque, or when anything beneath it changed — so every parent of a change is listed, as ``docker
diff`` does); ``D`` — a whiteout (or an opaque directory) hides a path the old view had.  Below a new or
replaced directory everything is ``A``; a deleted directory is one ``D`` line, not one per file.  Paths are
shown with a leading ``/`` and sorted by their bytes.  Sockets count like files here (they are changes),
although a commit leaves them out.

**inspect** applies diff to each layer of an image against the layers below it (entries added, modified,
removed), and measures waste as ``dive`` does: the data bytes of a layer that the image never shows,
because a higher layer overwrote or deleted them (a hard-link group is wasted only when none of its names
is visible).  ``efficiency = 1 - wasted / total`` (1.0 for an image without data).
"""

from __future__ import annotations

import os
import stat as stat_mod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from unionfs.fs.cache import LookupCache
from unionfs.fs.dirstate import LowerEntry
from unionfs.fs.fsio import HostDir, join, split
from unionfs.fs.lookup import Node, Resolver
from unionfs.fs.whiteout import REDIRECT_XATTRS
from unionfs.image.commit import union_at
from unionfs.image.digest import scan
from unionfs.image.records import Image
from unionfs.image.store import Store, StoreError, short
from unionfs.image.walk import Child, DirCache, read_dir, sort_key

S_IFDIR = stat_mod.S_IFDIR


class ChangesError(Exception):
    """A diff or inspect that cannot be done; ``str()`` is one line meant for the user."""


class UnionView:
    """What an overlay of ``hosts`` (top-down, ``hosts[0]`` the top) shows, read lazily a directory at a
    time through the union's own resolver (:class:`unionfs.fs.lookup.Resolver`) and kept in its cache (the
    layers must not change while the view is used).  Layer numbers are indices into ``hosts``."""

    def __init__(self, hosts: Sequence[HostDir]) -> None:
        self.hosts = list(hosts)
        self.resolver = Resolver.of_lowers(self.hosts, LookupCache())

    def table(self, path: str) -> dict[str, LowerEntry] | None:
        """The merged entries of directory ``path`` (``""`` is the root), or None where the view has no
        directory there."""
        state = self.resolver.dir_state(path)
        return None if state is None else state.lower

    def lookup(self, path: str) -> Node | None:
        """The visible node at ``path`` (its kind and top layer), or None."""
        return self.resolver.lookup(path)


# -- diff ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One line of a diff.  ``implied``: listed only because something beneath it changed."""

    kind: str
    path: str
    is_dir: bool = False
    implied: bool = False

    def line(self) -> str:
        return f"{self.kind} {self.path}"


def _show(path: str) -> str:
    return "/" + path


def _dir_differs(child: Child, path: str, view: UnionView, old: LowerEntry) -> bool:
    """True when the upper copy of directory ``path`` has other mode, owner, mtime or xattrs than its top
    lower copy."""
    host = view.hosts[old.layer]
    st = host.lstat(path)
    ours = child.st
    if (ours.st_mode, ours.st_uid, ours.st_gid, ours.st_mtime_ns) != (st.st_mode, st.st_uid, st.st_gid,
                                                                      st.st_mtime_ns):
        return True
    parent, name = split(path)
    with DirCache(host) as dirs:
        return dirs.get(parent).public_xattrs(name) != child.xattrs


def _new_view_below(resolver: Resolver, path: str) -> list[tuple[str, bool]]:
    """Every path the union of ``resolver`` shows below directory ``path``, with whether it is a dir."""
    out: list[tuple[str, bool]] = []
    todo = [path]
    while todo:
        rel = todo.pop()
        state = resolver.dir_state(rel)
        if state is None:
            continue
        for name in state.visible_names():
            node = resolver.child(state, name)
            if node is None:
                continue
            out.append((join(rel, name), node.is_dir))
            if node.is_dir:
                todo.append(join(rel, name))
    return out


def diff(upper: HostDir, view: UnionView) -> list[Change]:
    """The changes the layer ``upper`` makes over ``view`` (see the module doc), sorted by path.

    A directory renamed with ``redirect_dir=on`` (a redirect: its lower copies are elsewhere) is new at its
    new name with everything the union shows below it (``A``, or ``C`` where the old view had a directory
    there, with ``D`` for what that one held), and deleted at its old name (the whiteout there)."""
    found: dict[str, Change] = {}

    def add(kind: str, path: str, is_dir: bool) -> None:
        found[path] = Change(kind, _show(path), is_dir)

    def new_view() -> Resolver:
        """The union of ``upper`` over the view's layers (read only where a renamed directory is met)."""
        return Resolver.of_lowers([upper, *view.hosts], LookupCache())

    _diff_walk(upper, view, add, new_view)
    for path in list(found):
        parent = split(path)[0]
        while parent and parent not in found:
            found[parent] = Change("C", _show(parent), True, implied=True)
            parent = split(parent)[0]
    return [found[p] for p in sorted(found, key=sort_key)]


def _diff_walk(upper: HostDir, view: UnionView, add: Callable[[str, str, bool], None],
               new_view: Callable[[], Resolver]) -> None:
    """:func:`diff`'s walk of the upper: ``add(kind, path, is_dir)`` for each change found."""
    resolver: Resolver | None = None

    # (path in the upper, compare with the old view?, forced opaque?)
    stack: list[tuple[str, bool, bool]] = [("", True, False)]
    with DirCache(upper) as dirs:
        while stack:
            path, compare, forced_opaque = stack.pop()
            listing = read_dir(dirs.get(path))
            old = view.table(path) if compare else None
            opaque = listing.opaque or forced_opaque
            names = {c.name for c in listing.children} | set(listing.sockets)
            if old is not None:
                hidden = set(old) if opaque else listing.whiteouts & set(old)
                for name in hidden - names:
                    add("D", join(path, name), old[name].kind == S_IFDIR)
                if opaque and path and old:
                    add("C", path, True)
            for name in listing.sockets:
                add("C" if old is not None and name in old else "A", join(path, name), False)
            for child in listing.children:
                cpath = join(path, child.name)
                is_dir = stat_mod.S_ISDIR(child.st.st_mode)
                prev = old.get(child.name) if old is not None else None
                if is_dir and child.overlay_only in REDIRECT_XATTRS:
                    resolver = resolver or new_view()
                    below = _new_view_below(resolver, cpath)
                    replaced = prev is not None and prev.kind == S_IFDIR
                    add("C" if prev is not None else "A", cpath, True)
                    if replaced:
                        shown = {p for p, _ in below}
                        for name, entry in (view.table(cpath) or {}).items():
                            if join(cpath, name) not in shown:
                                add("D", join(cpath, name), entry.kind == S_IFDIR)
                    for sub, sub_is_dir in below:
                        add("A", sub, sub_is_dir)
                    continue
                if prev is None:
                    add("A", cpath, is_dir)
                elif not (is_dir and prev.kind == S_IFDIR):
                    add("C", cpath, is_dir)
                elif _dir_differs(child, cpath, view, prev):
                    add("C", cpath, True)
                if is_dir:
                    same_dir = prev is not None and prev.kind == S_IFDIR
                    # below an opaque dir (or a whiteout of the same name) a dir no longer merges with
                    # its old copy: it replaces it
                    stack.append((cpath, same_dir, same_dir and (opaque or child.name in listing.whiteouts)))


# -- inspect -------------------------------------------------------------------------------------------------

@dataclass
class LayerReport:
    """One layer of an image as ``inspect`` shows it (entries are files, dirs, links … alike)."""

    digest: str
    created_by: str
    size: int
    added: int
    modified: int
    removed: int
    wasted: int


@dataclass
class Inspection:
    """An image's layers bottom-up, its total and wasted data bytes, and the wasted paths (largest first)."""

    image: str
    id: str
    layers: list[LayerReport] = field(default_factory=list)
    total_bytes: int = 0
    wasted_bytes: int = 0
    wasted_paths: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        return 1.0 if self.total_bytes == 0 else 1.0 - self.wasted_bytes / self.total_bytes

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["efficiency"] = self.efficiency
        data["wasted_paths"] = [{"path": p, "layer": d, "bytes": n} for p, d, n in self.wasted_paths]
        return data


def _wasted(host: HostDir, index: int, top: UnionView) -> tuple[int, list[tuple[str, int]]]:
    """The data bytes of layer ``index`` of ``top`` that ``top`` does not show, and the paths holding them
    (the first name of each hard-link group)."""
    groups: dict[str, tuple[int, bool]] = {}  # first path -> (size, some name visible)
    for entry in scan(host, content=False).entries:
        if entry.kind not in ("file", "link"):
            continue
        first = entry.target if entry.kind == "link" else entry.path
        node = top.lookup(entry.path)
        visible = node is not None and node.layer == index and node.kind != S_IFDIR
        size, seen = groups.get(first, (entry.size, False))
        groups[first] = (size, seen or visible)
    waste = [(path, size) for path, (size, seen) in groups.items() if not seen and size]
    return sum(size for _, size in waste), waste


def inspect_image(store: Store, image: Image) -> Inspection:
    """Per layer: entries added/modified/removed over the layers below, bytes, wasted bytes; the image's
    efficiency.  StoreError where a layer is missing."""
    report = Inspection(image.name, image.id)
    hosts = []
    try:
        for digest in image.layers:
            if not store.has_layer(digest):
                raise StoreError(f"image {image.name!r}: layer {short(digest)} is missing")
            hosts.append(HostDir(store.layer_path(digest)))
        top = UnionView(list(reversed(hosts)))
        history = {h.layer: h for h in image.history if not h.empty_layer}
        for i, (digest, host) in enumerate(zip(image.layers, hosts, strict=True)):
            changes = [c for c in diff(host, UnionView(list(reversed(hosts[:i])))) if not c.implied]
            wasted, paths = _wasted(host, len(hosts) - 1 - i, top)
            meta = store.layer(digest)
            entry = history.get(digest)
            report.layers.append(LayerReport(
                digest, entry.created_by if entry else meta.created_by, meta.size,
                sum(c.kind == "A" for c in changes), sum(c.kind == "C" for c in changes),
                sum(c.kind == "D" for c in changes), wasted))
            report.total_bytes += meta.size
            report.wasted_bytes += wasted
            report.wasted_paths += [(_show(p), digest, n) for p, n in paths]
    finally:
        for host in hosts:
            host.close()
    report.wasted_paths.sort(key=lambda item: (-item[2], item[0]))
    return report


# -- sources for diff ----------------------------------------------------------------------------------------

@dataclass
class DiffSource:
    """An upper dir and the lowers (top-down host paths) it is compared against."""

    upper: str
    lowers: list[str]


def diff_source(store: Store, path: str, *, base_image: str | None = None,
                lowerdirs: Sequence[str] | None = None) -> DiffSource:
    """What ``unionfs diff PATH`` compares: for a union mountpoint its upper and lowers; for an upper dir
    the lowers of ``lowerdirs`` (top-down), else of ``base_image``, else of the record ``unionfs mount``
    left for it.  ChangesError when none is known or PATH is not usable."""
    mount = union_at(store, path)
    if mount is not None:
        if mount.upper is None:
            what = "a read-only union mount" if mount.lowers else "a union mount whose daemon was not found"
            raise ChangesError(f"{path} is {what}: no upper dir to compare")
        return DiffSource(mount.upper, list(mount.lowers))
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ChangesError(f"upper {path}: not a directory" if os.path.lexists(real)
                           else f"upper {path}: no such directory")
    if lowerdirs is not None:
        return DiffSource(real, [os.path.realpath(p) for p in lowerdirs])
    layers: Sequence[str] | None = None
    if base_image is not None:
        layers = store.image(base_image).layers
    else:
        record = store.container_for(real)
        layers = record.layers if record is not None else None
    if layers is None:
        raise ChangesError(f"cannot tell added from changed in {path}: give --from IMAGE or --lowerdir DIRS")
    missing = [d for d in layers if not store.has_layer(d)]
    if missing:
        raise StoreError(f"layer {short(missing[0])} of the base is not in the store")
    return DiffSource(real, [store.layer_path(d) for d in reversed(layers)])


def diff_paths(source: DiffSource) -> list[Change]:
    """:func:`diff` of ``source.upper`` over ``source.lowers``; ChangesError where a dir cannot be read."""
    hosts: list[HostDir] = []
    try:
        for p in [source.upper, *source.lowers]:
            try:
                hosts.append(HostDir(p))
            except OSError as exc:
                raise ChangesError(f"cannot open {p}: {exc.strerror}") from None
        return diff(hosts[0], UnionView(hosts[1:]))
    except OSError as exc:
        raise ChangesError(f"cannot read {exc.filename}: {exc.strerror}") from None
    finally:
        for host in hosts:
            host.close()

"""Top-down resolution of union paths and merged directory listings.

Paths here are *relative* union paths: ``""`` is the root, ``"a/b"`` a child (no leading slash).  A name
resolves in the highest layer that has it; a non-directory hides everything below it; directories merge
their name lists down to the first opaque copy; whiteouts hide names in the layers below them.
A missing path is ``None``, never an exception.  Host errors other than "not there" raise ``OSError``.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from unionfs.fs.cache import LookupCache
from unionfs.fs.dirstate import DirState, merge_lower
from unionfs.fs.fsio import HostDir, split
from unionfs.fs.layers import LayerStack
from unionfs.fs.whiteout import LayerDir, read_layer_dir

S_IFDIR = stat_mod.S_IFDIR
NAME_MAX = 255


def path_error(code: int, path: str) -> OSError:
    """The error the union raises for union path ``path`` (shown with its leading ``/``)."""
    return OSError(code, os.strerror(code), "/" + path)


def check_name(path: str) -> None:
    """ENAMETOOLONG where the last component of ``path`` is longer than NAME_MAX bytes."""
    if len(os.fsencode(split(path)[1])) > NAME_MAX:
        raise path_error(errno.ENAMETOOLONG, path)


class Node(NamedTuple):
    """A visible object: its type, whether its top copy is in the upper layer, the index of the layer of
    its top copy, and for directories the lower layers that may merge into it.  (A named tuple: every
    request makes one, and a tuple is made in a third of a frozen dataclass's time.)"""

    kind: int
    in_upper: bool
    layer: int
    merge_layers: tuple[int, ...]

    @property
    def is_dir(self) -> bool:
        return self.kind == S_IFDIR


class Resolver:
    """Resolves paths against layer directories through a :class:`LookupCache`.

    ``hosts`` maps each layer index to its directory; ``upper`` is the upper layer's (index 0) where the union
    has one; ``lowers`` are the lower indices, top-down.  :meth:`of_stack` makes the resolver of a mount,
    :meth:`of_lowers` one of read-only layers alone (what an overlay of them shows).
    """

    def __init__(self, hosts: Mapping[int, HostDir], cache: LookupCache, *, upper: HostDir | None,
                 lowers: tuple[int, ...]) -> None:
        self.cache = cache
        self.hosts = dict(hosts)
        self.upper = upper
        self.root = Node(S_IFDIR, upper is not None, 0, lowers)

    @classmethod
    def of_stack(cls, stack: LayerStack, cache: LookupCache) -> Resolver:
        return cls({layer.index: layer.host for layer in stack.layers}, cache,
                   upper=stack.upper.host if stack.upper else None, lowers=stack.lower_indices)

    @classmethod
    def of_lowers(cls, hosts: Sequence[HostDir], cache: LookupCache) -> Resolver:
        """The layers ``hosts`` alone, top-down, numbered from 0, with no upper layer."""
        return cls(dict(enumerate(hosts)), cache, upper=None, lowers=tuple(range(len(hosts))))

    # -- nodes --------------------------------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        """The node at ``path``, or None where nothing is visible there."""
        if path == "":
            return self.root
        parent_path, name = split(path)
        parent = self.dir_state(parent_path)
        if parent is None:
            return None
        return self.child(parent, name)

    def require(self, path: str) -> Node:
        """The node at ``path``; where nothing is visible ENAMETOOLONG, ENOTDIR (a parent is not a
        directory) or ENOENT, as the kernel answers."""
        node = self.lookup(path)
        if node is None:
            check_name(path)
            parent = split(path)[0]
            if path and self.dir_state(parent) is None and self.lookup(parent) is not None:
                raise path_error(errno.ENOTDIR, path)
            raise path_error(errno.ENOENT, path)
        return node

    def child(self, parent: DirState, name: str) -> Node | None:
        """The node ``name`` inside the visible directory ``parent``, or None."""
        upper = parent.upper_kinds
        if upper is not None:
            kind = upper.get(name)
            if kind is not None:
                merge_layers: tuple[int, ...] = ()
                if kind == S_IFDIR and not parent.upper_opaque:
                    low = parent.lower.get(name)
                    if low is not None and low.kind == S_IFDIR:
                        merge_layers = low.merge_layers
                return Node(kind, True, 0, merge_layers)
            if name in parent.upper_wh:
                return None
        if parent.upper_opaque:
            return None
        low = parent.lower.get(name)
        if low is None:
            return None
        return Node(low.kind, False, low.layer, low.merge_layers)

    def lookup_parent(self, path: str) -> DirState:
        """The state of ``path``'s parent directory; raises ENOENT/ENOTDIR as the kernel would."""
        parent_path, _ = split(path)
        state = self.dir_state(parent_path)
        if state is None:
            node = self.lookup(parent_path)
            raise OSError(errno.ENOTDIR if node is not None else errno.ENOENT, "parent", parent_path)
        return state

    # -- directories --------------------------------------------------------------------------------------
    def dir_state(self, path: str) -> DirState | None:
        """The merged state of directory ``path`` (cached), or None if it is missing or not a directory."""
        state = self.cache.get_dir(path)
        if state is not None:
            return state
        node = self.lookup(path)
        if node is None or not node.is_dir:
            return None
        state = self.build_dir_state(path, node)
        self.cache.put_dir(state)
        return state

    def build_dir_state(self, path: str, node: Node) -> DirState:
        upper: dict[str, int] | None = None
        upper_wh: set[str] = set()
        opaque = False
        if node.in_upper and self.upper is not None:
            try:
                ud = read_layer_dir(self.upper, path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
            else:
                upper, upper_wh, opaque = ud.entries, ud.whiteouts, ud.opaque
        lower_layers: list[int] = []
        scans: list[LayerDir] = []
        if not opaque:
            for index in node.merge_layers:
                try:
                    ld = read_layer_dir(self.hosts[index], path)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                        continue
                    raise
                lower_layers.append(index)
                scans.append(ld)
                if ld.opaque:
                    break
        return DirState(path, upper, upper_wh, opaque, tuple(lower_layers),
                        merge_lower(lower_layers, scans))

    def listdir(self, path: str) -> list[str] | None:
        """The merged names of directory ``path`` (no markers, no duplicates), or None if not a dir."""
        state = self.dir_state(path)
        return None if state is None else state.visible_names()

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
from unionfs.fs.fsio import HostDir, join, split
from unionfs.fs.layers import LayerStack
from unionfs.fs.whiteout import LayerDir, dir_marks, dir_opaque_value, dir_redirect, read_layer_dir

S_IFDIR = stat_mod.S_IFDIR
NAME_MAX = 255
SAME_NAME, RELATIVE, ABSOLUTE = 0, 1, 2
"""How a lower copy of a directory is looked for: under its own name in its parent's lower copies, under a
relative redirect's name there, or at an absolute redirect's path from a layer's root."""


def path_error(code: int, path: str) -> OSError:
    """The error the union raises for union path ``path`` (shown with its leading ``/``)."""
    return OSError(code, os.strerror(code), "/" + path)


def check_name(path: str) -> None:
    """ENAMETOOLONG where the last component of ``path`` is longer than NAME_MAX bytes."""
    if len(os.fsencode(split(path)[1])) > NAME_MAX:
        raise path_error(errno.ENAMETOOLONG, path)


class Node(NamedTuple):
    """A visible object: its type, whether its top copy is in the upper layer, the index of the layer of
    its top copy, for directories the lower layers that may merge into it under the same name (a redirect
    read when the directory's state is built may send them elsewhere), and ``source``, the path of the top
    copy inside its layer (the union path, except below a renamed directory).  (A named tuple: every
    request makes one, and a tuple is made in a third of a frozen dataclass's time.)"""

    kind: int
    in_upper: bool
    layer: int
    merge_layers: tuple[int, ...]
    source: str

    @property
    def is_dir(self) -> bool:
        return self.kind == S_IFDIR


class Resolver:
    """Resolves paths against layer directories through a :class:`LookupCache`.

    ``hosts`` maps each layer index to its directory; ``upper`` is the upper layer's (index 0) where the union
    has one; ``lowers`` are the lower indices, top-down.  :meth:`of_stack` makes the resolver of a mount,
    :meth:`of_lowers` one of read-only layers alone (what an overlay of them shows).

    ``follow_redirects``: a directory's redirect leads to its lower copies (``redirect_dir=on``, ``follow``);
    without it a directory with a redirect that finds a lower copy is EPERM, as the kernel answers with
    ``redirect_dir=nofollow``.
    """

    def __init__(self, hosts: Mapping[int, HostDir], cache: LookupCache, *, upper: HostDir | None,
                 lowers: tuple[int, ...], follow_redirects: bool = True) -> None:
        self.cache = cache
        self.hosts = dict(hosts)
        self.upper = upper
        self.lowers = lowers
        self.follow_redirects = follow_redirects
        self.root = Node(S_IFDIR, upper is not None, 0, lowers, "")
        self.bottom = lowers[-1] if lowers else 0

    @classmethod
    def of_stack(cls, stack: LayerStack, cache: LookupCache, *, follow_redirects: bool = True) -> Resolver:
        return cls({layer.index: layer.host for layer in stack.layers}, cache,
                   upper=stack.upper.host if stack.upper else None, lowers=stack.lower_indices,
                   follow_redirects=follow_redirects)

    @classmethod
    def of_lowers(cls, hosts: Sequence[HostDir], cache: LookupCache, *,
                  follow_redirects: bool = True) -> Resolver:
        """The layers ``hosts`` alone, top-down, numbered from 0, with no upper layer."""
        return cls(dict(enumerate(hosts)), cache, upper=None, lowers=tuple(range(len(hosts))),
                   follow_redirects=follow_redirects)

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
                return Node(kind, True, 0, merge_layers, join(parent.path, name))
            if name in parent.upper_wh:
                return None
        if parent.upper_opaque:
            return None
        low = parent.lower.get(name)
        if low is None:
            return None
        return Node(low.kind, False, low.layer, low.merge_layers, parent.lower_path(low.layer, name))

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
        """Read the state of visible directory ``path`` (``node``) from its layers.

        Its lower copies are, top-down, those of the same name in the parent's lower copies, until one is
        opaque; a copy (upper or lower, the bottom layer excepted) with a redirect sends the search for
        the copies below it to the redirect's name in the parent's lower copies (relative) or to the
        redirect's path from the root of each layer below (absolute), as the kernel's lookup does."""
        upper: dict[str, int] | None = None
        upper_wh: set[str] = set()
        opaque = False
        redirect: str | None = None
        if node.in_upper and self.upper is not None:
            try:
                ud = read_layer_dir(self.upper, path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
            else:
                upper, upper_wh, opaque = ud.entries, ud.whiteouts, ud.opaque
                if path and not opaque and self.lowers:
                    redirect = dir_redirect(self.upper, path)
        lower_layers: list[int] = []
        lower_paths: dict[int, str] = {}
        scans: list[LayerDir] = []
        if not opaque:
            parent_path, name = split(path)
            parent = self.dir_state(parent_path) if path else None
            candidates: list[tuple[int, str, int]]
            if redirect is not None:
                candidates = self._redirected(parent, redirect, below=node.layer)
            else:
                candidates = [(index, parent.lower_path(index, name) if parent else path, SAME_NAME)
                              for index in node.merge_layers]
            k = 0
            while k < len(candidates):
                index, where, how = candidates[k]
                k += 1
                host = self.hosts[index]
                stop_after, below_target = False, where
                if how == ABSOLUTE:  # the path's parents, as the kernel walks them in each layer
                    outcome, stop_after, below_target = self._walk_parents(host, where, last=index == self.bottom)
                    if outcome == "missing":
                        continue
                    if outcome == "stop":
                        break
                if how != SAME_NAME:  # a redirected name: a whiteout or a non-directory there ends the search
                    st = host.try_lstat(where)
                    if st is None:
                        if stop_after:
                            break
                        if below_target != where:
                            candidates = self._redirected(parent, "/" + below_target, below=index)
                            k = 0
                        continue
                    if not stat_mod.S_ISDIR(st.st_mode):
                        break
                try:
                    ld = read_layer_dir(host, where)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                        continue
                    raise
                if redirect is not None and not self.follow_redirects:
                    raise path_error(errno.EPERM, path)  # "refusing to follow redirect"
                lower_layers.append(index)
                scans.append(ld)
                if where != path:
                    lower_paths[index] = where
                if ld.opaque:
                    break
                found = dir_redirect(host, where) if index != self.bottom else None
                if found is not None:
                    if not self.follow_redirects:
                        raise path_error(errno.EPERM, path)
                    if how == ABSOLUTE and not found.startswith("/"):
                        found = "/" + join(split(below_target)[0], found)  # a name within an absolute search
                    redirect = found
                    candidates = self._redirected(parent, found, below=index)
                    k = 0
                    continue
                if stop_after:  # an opaque parent on the way, and no absolute redirect after it
                    break
                if below_target != where:  # a parent's redirect changed the path for the layers below
                    candidates = self._redirected(parent, "/" + below_target, below=index)
                    k = 0
        return DirState(path, upper, upper_wh, opaque, tuple(lower_layers),
                        merge_lower(lower_layers, scans), lower_paths=lower_paths)

    def _redirected(self, parent: DirState | None, redirect: str,
                    *, below: int) -> list[tuple[int, str, int]]:
        """Where the lower copies of a directory with ``redirect`` (found in layer ``below``) are looked
        for: ``(layer, path, RELATIVE or ABSOLUTE)`` top-down."""
        if redirect.startswith("/"):
            target = redirect.strip("/")
            return [(index, target, ABSOLUTE) for index in self.lowers if index > below]
        if parent is None:
            return []
        return [(index, parent.lower_path(index, redirect), RELATIVE)
                for index in parent.lower_layers if index > below]

    def _walk_parents(self, host: HostDir, target: str, *, last: bool) -> tuple[str, bool, str]:
        """Walk the parents of ``target`` (an absolute search's path) in one layer as the kernel does:
        ``("missing", …)`` where one is not there, ``("stop", …)`` where one is a whiteout or not a directory
        (the search ends in every layer); else ``("go", stop_after, path for the layers below)``: an opaque
        parent ends the search after this layer unless an absolute redirect below it restarts it, and a
        parent's redirect rewrites the path for the layers below (none of that in the bottom layer)."""
        parts = target.split("/")
        rewritten = list(parts)
        stop_after = False
        for i in range(len(parts) - 1):
            prefix = "/".join(parts[:i + 1])
            st = host.try_lstat(prefix)
            if st is None:
                return "missing", stop_after, "/".join(rewritten)
            if not stat_mod.S_ISDIR(st.st_mode):
                return "stop", stop_after, "/".join(rewritten)
            if last:
                continue
            if dir_marks(dir_opaque_value(host, prefix))[0]:
                stop_after = True
                continue
            found = dir_redirect(host, prefix)
            if found is None:
                continue
            tail = len(parts) - 1 - i  # components after this one
            if found.startswith("/"):
                rewritten = [*found.strip("/").split("/"), *rewritten[len(rewritten) - tail:]]
                stop_after = False
            else:
                rewritten[len(rewritten) - tail - 1] = found
        return "go", stop_after, "/".join(rewritten)

    def listdir(self, path: str) -> list[str] | None:
        """The merged names of directory ``path`` (no markers, no duplicates), or None if not a dir."""
        state = self.dir_state(path)
        return None if state is None else state.visible_names()

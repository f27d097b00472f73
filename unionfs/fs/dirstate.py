"""The merged-directory model: what the union knows of one visible directory, and how lower copies merge.

A :class:`DirState` holds a directory's upper entries (with its whiteouts and opacity) and the merged table of
its lower copies (:class:`LowerEntry` per name), built by :func:`merge_lower` from each layer's
:class:`~unionfs.fs.whiteout.LayerDir`.  The resolver (:mod:`unionfs.fs.lookup`) builds states and the lookup
cache (:mod:`unionfs.fs.cache`) keeps them; the write side updates a state after it changed the upper layer.
"""

from __future__ import annotations

import stat as stat_mod

from unionfs.fs.fsio import join
from unionfs.fs.whiteout import LayerDir

S_IFDIR = stat_mod.S_IFDIR


class LowerEntry:
    """A name as the lower layers show it: its type, the top lower layer that holds it and, for a directory,
    every lower layer whose copy merges into it (top-down, before opacity of the child itself is known).
    ``attr`` is the lower object's attribute record in its compact form (:func:`unionfs.fs.attr.compact`)
    once the lookup cache holds it: kept here, in its directory's table, rather than in a table keyed by
    path (see :mod:`unionfs.fs.cache`).  Equal when every field is."""

    __slots__ = ("attr", "ino", "kind", "layer", "merge_layers")

    def __init__(self, kind: int, layer: int, merge_layers: tuple[int, ...], ino: int = 0,
                 attr: bytes | None = None) -> None:
        self.kind = kind
        self.layer = layer
        self.merge_layers = merge_layers
        self.ino = ino
        self.attr = attr

    def _key(self) -> tuple[int, int, tuple[int, ...], int, bytes | None]:
        return self.kind, self.layer, self.merge_layers, self.ino, self.attr

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LowerEntry):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"LowerEntry(kind={self.kind:o}, layer={self.layer}, merge_layers={self.merge_layers}, ino={self.ino})"


class DirState:
    """Everything needed to resolve names inside one visible directory of the union.

    ``upper`` is None when the upper layer has no copy of the directory; otherwise it maps the upper's
    entries to their type, with ``upper_wh`` the names whited out there and ``upper_opaque`` its opacity.
    ``lower`` is the merged table of the lower layers (``lower_layers``) that show through.  A lower copy
    lives at the directory's own path in its layer unless a redirect (a renamed directory, ``redirect_dir``)
    led elsewhere: ``lower_paths`` maps such a layer to the path of its copy there.
    """

    __slots__ = ("attrs_held", "lower", "lower_layers", "lower_paths", "path", "size", "upper_kinds",
                 "upper_opaque", "upper_wh")

    def __init__(self, path: str, upper_kinds: dict[str, int] | None, upper_wh: set[str], upper_opaque: bool,
                 lower_layers: tuple[int, ...], lower: dict[str, LowerEntry], *,
                 lower_paths: dict[int, str] | None = None) -> None:
        self.path = path
        self.upper_kinds = upper_kinds
        self.upper_wh = upper_wh
        self.upper_opaque = upper_opaque
        self.lower_layers = lower_layers
        self.lower = lower
        self.size = 0
        """What the directory counts in the lookup cache's bound (set by the cache)."""
        self.lower_paths: dict[int, str] = {} if lower_paths is None else lower_paths
        self.attrs_held = 0
        """How many of ``lower``'s entries hold an ``attr`` (counted by the lookup cache, which sets them)."""

    def __repr__(self) -> str:
        return (f"DirState(path={self.path!r}, upper={self.upper_kinds!r}, upper_wh={self.upper_wh!r}, "
                f"upper_opaque={self.upper_opaque}, lower_layers={self.lower_layers}, lower={len(self.lower)} names)")

    def lower_path(self, layer: int, name: str) -> str:
        """The path of child ``name``'s copy in lower layer ``layer`` (one of ``lower_layers``)."""
        return join(self.lower_paths.get(layer, self.path), name)

    # -- the updates the union makes after it changed the upper layer --------------------------------------
    def upper_set(self, name: str, kind: int) -> None:
        if self.upper_kinds is None:
            self.upper_kinds = {}
        self.upper_kinds[name] = kind
        self.upper_wh.discard(name)

    def upper_remove(self, name: str) -> None:
        if self.upper_kinds is not None:
            self.upper_kinds.pop(name, None)

    def upper_whiteout(self, name: str) -> None:
        if self.upper_kinds is None:
            self.upper_kinds = {}
        self.upper_kinds.pop(name, None)
        self.upper_wh.add(name)

    def visible_names(self) -> list[str]:
        """The merged listing: upper entries, then lower names not hidden by the upper (no markers)."""
        upper = self.upper_kinds or {}
        names = list(upper)
        if not self.upper_opaque:
            wh = self.upper_wh
            names.extend(n for n in self.lower if n not in upper and n not in wh)
        return names


def merge_lower(layers: list[int], scans: list[LayerDir]) -> dict[str, LowerEntry]:
    """Merge lower layers' copies of one directory (top-down) into one table.

    A whiteout in layer i hides the name in the layers below i; a non-directory hides everything below
    it; a directory's chain collects the lower copies that are directories, until something stops it.
    """
    merged: dict[str, LowerEntry] = {}
    hidden: set[str] = set()
    closed: set[str] = set()
    for index, scan in zip(layers, scans, strict=True):
        for name, kind in scan.entries.items():
            if name in hidden or name in closed:
                continue
            have = merged.get(name)
            if have is None:
                merged[name] = LowerEntry(kind, index, (index,) if kind == S_IFDIR else (), scan.inos[name])
                if kind != S_IFDIR:
                    closed.add(name)
            elif kind == S_IFDIR and have.kind == S_IFDIR:
                have.merge_layers = (*have.merge_layers, index)
            else:
                closed.add(name)
        for name in scan.whiteouts:
            if name in merged:
                closed.add(name)
            else:
                hidden.add(name)
    return merged

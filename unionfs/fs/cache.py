"""The hot-path lookup cache: per-directory merged tables and lower-layer attributes, bounded, counted.

Lower layers never change while mounted, so what is learnt about them is kept for the life of the mount
(subject only to the size bound).  The upper parts of a directory's table are updated by the operation that
changes the upper layer (through :meth:`DirState.upper_set` and friends), and a directory rename or rmdir
drops the whole subtree (:meth:`LookupCache.invalidate_subtree`): one place that invalidates.

Memory: after a walk of a large tree the cache holds a record for every name of it, so records are kept
compact.  The attribute record of a lower object is kept in its compact form (:func:`unionfs.fs.attr.compact`,
one ``bytes``; a hit makes an :class:`~unionfs.fs.attr.Attr` of it again) and lives in its directory's
table (the ``attr`` of its :class:`~unionfs.fs.dirstate.LowerEntry`, under the name string the table
already holds), not in a second table keyed by full paths; it is counted in its directory's size and goes
with it.  Only a record whose directory is not cached (the root's, or one whose directory was evicted)
falls back to the path-keyed :attr:`LookupCache.attrs`.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

from unionfs.fs.attr import Attr, compact, from_compact
from unionfs.fs.dirstate import DirState, LowerEntry


class CacheStats:
    """The counters ``unionfs stats`` shows."""

    __slots__ = ("evictions", "hits", "invalidations", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.evictions = 0


class LookupCache:
    """Bounded LRU of directory states and lower attribute records.

    ``max_entries`` bounds the sum of names held in directory tables plus cached attribute and xattr
    records (a directory's ``size``: 1, its names and the attribute records its table holds).
    Not thread-safe: the union serialises access under its lock.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self.dirs: OrderedDict[str, DirState] = OrderedDict()
        self.attrs: OrderedDict[str, bytes] = OrderedDict()
        """Attribute records of lower objects whose directory's table is not cached, by path."""
        self.xattrs: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        """Every xattr of a lower object by path (lower facts never change): a miss is a dict lookup too."""
        self.inos: dict[str, int] = {}
        """st_ino of upper objects by path (their recorded origin or their own), saving an xattr read."""
        self.entries = 0
        self.stats = CacheStats()

    # -- directories ---------------------------------------------------------------------------------------
    def get_dir(self, path: str) -> DirState | None:
        state = self.dirs.get(path)
        if state is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.dirs.move_to_end(path)
        return state

    def peek_dir(self, path: str) -> DirState | None:
        """The cached state without counting or reordering (for updates after a change)."""
        return self.dirs.get(path)

    def put_dir(self, state: DirState) -> None:
        old = self.dirs.pop(state.path, None)
        if old is not None:
            self.entries -= old.size
        state.size = 1 + len(state.lower) + len(state.upper_kinds or ()) + state.attrs_held
        self.dirs[state.path] = state
        self.entries += state.size
        self._shrink()

    # -- lower attributes ---------------------------------------------------------------------------------
    def _entry(self, path: str) -> tuple[DirState, LowerEntry] | None:
        """The cached directory table of ``path``'s parent and ``path``'s lower entry in it, if both are held."""
        if not path:
            return None
        parent, _, name = path.rpartition("/")
        state = self.dirs.get(parent)
        if state is None:
            return None
        entry = state.lower.get(name)
        return None if entry is None else (state, entry)

    def get_attrs(self, path: str) -> Attr | None:
        """The attribute record of lower object ``path`` (a hit: a new record each time), or None (a miss)."""
        found = self._entry(path)
        if found is not None and found[1].attr is not None:
            self.stats.hits += 1
            self.dirs.move_to_end(found[0].path)
            return from_compact(found[1].attr)
        record = self.attrs.get(path)
        if record is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.attrs.move_to_end(path)
        return from_compact(record)

    def put_attrs(self, path: str, attrs: Attr) -> None:
        """Keep the attribute record of lower object ``path`` (in its directory's table where it has one)."""
        record = compact(attrs)
        if record is None:
            self.drop_attrs(path)
            return
        found = self._entry(path)
        if found is not None:
            state, entry = found
            if entry.attr is None:
                state.attrs_held += 1
                state.size += 1
                self.entries += 1
            entry.attr = record
        else:
            if self.attrs.pop(path, None) is None:
                self.entries += 1
            self.attrs[path] = record
        self._shrink()

    def drop_attrs(self, path: str) -> None:
        """Forget the attribute record of ``path`` (its object changed layer or name)."""
        found = self._entry(path)
        if found is not None and found[1].attr is not None:
            state, entry = found
            entry.attr = None
            state.attrs_held -= 1
            state.size -= 1
            self.entries -= 1
        if self.attrs.pop(path, None) is not None:
            self.entries -= 1

    # -- lower xattrs --------------------------------------------------------------------------------------
    def get_xattrs(self, path: str) -> dict[str, bytes] | None:
        found = self.xattrs.get(path)
        if found is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.xattrs.move_to_end(path)
        return found

    def put_xattrs(self, path: str, xattrs: dict[str, bytes]) -> None:
        if self.xattrs.pop(path, None) is None:
            self.entries += 1
        self.xattrs[path] = xattrs
        self._shrink()

    # -- upper inode numbers ---------------------------------------------------------------------------------
    def get_ino(self, path: str) -> int | None:
        return self.inos.get(path)

    def put_ino(self, path: str, ino: int) -> None:
        if len(self.inos) >= self.max_entries:
            self.inos.clear()
        self.inos[path] = ino

    def drop_ino(self, path: str) -> None:
        self.inos.pop(path, None)

    # -- invalidation ---------------------------------------------------------------------------------------
    def invalidate_subtree(self, path: str) -> None:
        """Forget ``path`` and everything below it (after a directory rename or rmdir)."""
        prefix = path + "/" if path else ""
        found = self._entry(path)
        if found is not None and found[1].attr is not None:
            self.drop_attrs(path)
            self.stats.invalidations += 1
        for table in (self.dirs, self.attrs, self.xattrs):
            doomed = [k for k in table if k == path or k.startswith(prefix)]
            for key in doomed:
                value = table.pop(key)
                if isinstance(value, DirState):
                    self.entries -= value.size
                    self.stats.invalidations += value.attrs_held
                else:
                    self.entries -= 1
            self.stats.invalidations += len(doomed)
        for key in [k for k in self.inos if k == path or k.startswith(prefix)]:
            del self.inos[key]

    def clear(self) -> None:
        self.dirs.clear()
        self.attrs.clear()
        self.xattrs.clear()
        self.inos.clear()
        self.entries = 0

    def _shrink(self) -> None:
        while self.entries > self.max_entries and (self.dirs or self.attrs or self.xattrs):
            # Evict xattr and attribute dicts first (cheap to rebuild), then the least recently used directory.
            if self.xattrs:
                self.xattrs.popitem(last=False)
                self.entries -= 1
            elif self.attrs and (len(self.attrs) * 4 >= self.entries or not self.dirs):
                self.attrs.popitem(last=False)
                self.entries -= 1
            else:
                _, state = self.dirs.popitem(last=False)
                self.entries -= state.size
            self.stats.evictions += 1

    def snapshot(self) -> dict[str, int]:
        """Counters for ``unionfs stats`` and the benchmarks."""
        return {
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "invalidations": self.stats.invalidations,
            "evictions": self.stats.evictions,
            "entries": self.entries,
            "dirs": len(self.dirs),
            "attrs": len(self.attrs),
            "max_entries": self.max_entries,
            "bytes": sys.getsizeof(self.dirs) + sys.getsizeof(self.attrs),
        }

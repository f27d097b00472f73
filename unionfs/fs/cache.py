"""The hot-path lookup cache: per-directory merged tables and lower-layer attributes, bounded, counted.

Lower layers never change while mounted, so what is learnt about them is kept for the life of the mount
(subject only to the size bound).  The upper parts of a directory's table are updated by the operation that
changes the upper layer (through :meth:`DirState.upper_set` and friends), and a directory rename or rmdir
drops the whole subtree (:meth:`LookupCache.invalidate_subtree`): one place that invalidates.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

from unionfs.fs.attr import Attr
from unionfs.fs.dirstate import DirState


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    evictions: int = 0


class LookupCache:
    """Bounded LRU of directory states and lower attribute records.

    ``max_entries`` bounds the sum of names held in directory tables plus cached attribute records.
    Not thread-safe: the union serialises access under its lock.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self.dirs: OrderedDict[str, DirState] = OrderedDict()
        self.attrs: OrderedDict[str, Attr] = OrderedDict()
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
        state.size = 1 + len(state.lower) + len(state.upper_kinds or ())
        self.dirs[state.path] = state
        self.entries += state.size
        self._shrink()

    # -- lower attributes ---------------------------------------------------------------------------------
    def get_attrs(self, path: str) -> Attr | None:
        attrs = self.attrs.get(path)
        if attrs is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.attrs.move_to_end(path)
        return attrs

    def put_attrs(self, path: str, attrs: Attr) -> None:
        if self.attrs.pop(path, None) is None:
            self.entries += 1
        self.attrs[path] = attrs
        self._shrink()

    def drop_attrs(self, path: str) -> None:
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
        for table in (self.dirs, self.attrs, self.xattrs):
            doomed = [k for k in table if k == path or k.startswith(prefix)]
            for key in doomed:
                value = table.pop(key)
                self.entries -= value.size if isinstance(value, DirState) else 1
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

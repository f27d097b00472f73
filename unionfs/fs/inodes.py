"""Inode numbers of the union and the names of upper hard links.

``st_ino`` is stable across copy-up and remount, as the kernel's overlayfs keeps it: a lower object shows its
own inode number, tagged with the index of its layer's file system where layers sit on several (the top 16
bits); an upper object shows the number recorded in its origin xattr when it was copied up, else its own.
The origin xattr is ``trusted.unionfs.origin`` where the daemon may write trusted xattrs, else
``user.unionfs.origin`` (:meth:`unionfs.fs.upper.Upper.prepare` decides).

Hard links of the upper layer: the kernel caches attributes and data per name, so after a change through one
name the other known names of the same inode are reported to ``notify`` (which the frontend forwards to the
kernel as invalidations).  Not thread-safe: the union calls it under its lock.
"""

from __future__ import annotations

import os
import stat as stat_mod
from collections.abc import Callable

from unionfs.fs.cache import LookupCache
from unionfs.fs.fsio import HostDir
from unionfs.fs.layers import LayerStack

ORIGIN_TRUSTED = "trusted.unionfs.origin"
ORIGIN_USER = "user.unionfs.origin"


class Inodes:
    """The union's inode numbering over ``stack`` (see the module docstring)."""

    def __init__(self, stack: LayerStack, cache: LookupCache, *, origin_xattr: str,
                 notify: Callable[[str], None]) -> None:
        self.cache = cache
        self.origin_xattr = origin_xattr
        self.upper_dir: HostDir | None = stack.upper.host if stack.upper else None
        self.notify = notify
        devs: dict[int, int] = {}
        self.layer_fs: dict[int, int] = {}
        """Layer index → index of its host file system (0 for the first seen: its numbers stay as they are)."""
        for layer in stack.layers:
            self.layer_fs[layer.index] = devs.setdefault(layer.host.dev, len(devs))
        self.links: dict[tuple[int, int], set[str]] = {}
        """Union paths seen of each upper non-directory with several links, by (st_dev, st_ino)."""
        self.overlay_origin: Callable[[str, os.stat_result], int | None] | None = None
        """The st_ino of an upper object without our origin record, from the kernel's
        (``trusted.overlay.origin``) where the union reads it (``index=on``), else None."""

    def ino(self, layer: int, real_ino: int) -> int:
        """The union's st_ino of an object whose host inode number in layer ``layer`` is ``real_ino``."""
        fs = self.layer_fs[layer]
        return real_ino if fs == 0 else (real_ino & ((1 << 48) - 1)) | (fs << 48)

    def upper_ino(self, path: str, st: os.stat_result) -> int:
        """The st_ino of upper object ``path`` (whose lstat is ``st``): its recorded origin where it was
        copied up, else its own; remembered in the cache."""
        cached = self.cache.get_ino(path)
        if cached is not None:
            return cached
        try:
            value = self.upper_dir.getxattr(path, self.origin_xattr) if self.upper_dir else None
        except OSError:  # no origin recorded (or no xattrs here at all): the object's own number
            value = None
        ino = self.origin_ino(value, st)
        if not value and self.overlay_origin is not None:
            ino = self.overlay_origin(path, st) or ino
        self.cache.put_ino(path, ino)
        return ino

    def origin_ino(self, value: bytes | None, st: os.stat_result) -> int:
        """The st_ino of an upper object whose origin xattr is ``value`` (None: not copied up)."""
        if value:
            try:
                return int(value)
            except ValueError:
                pass
        return self.ino(0, st.st_ino)

    def note_links(self, path: str, st: os.stat_result) -> None:
        """Remember ``path`` as a name of upper non-directory ``st`` if it has several links."""
        if st.st_nlink > 1 and not stat_mod.S_ISDIR(st.st_mode):
            self.links.setdefault((st.st_dev, st.st_ino), set()).add(path)

    def forget_name(self, path: str, st: os.stat_result) -> None:
        """``path``, a name of upper ``st`` (its lstat before), was removed."""
        self.links.get((st.st_dev, st.st_ino), set()).discard(path)

    def invalidate_other_names(self, path: str, st: os.stat_result | None = None) -> None:
        """After upper ``path`` (lstat ``st``, read here if None) changed: report its other known names to
        :attr:`notify`; a file left with one link forgets them."""
        if st is None:
            if self.upper_dir is None:
                return
            st = self.upper_dir.try_lstat(path)
            if st is None:
                return
        names = self.links.get((st.st_dev, st.st_ino))
        if not names:
            return
        for other in list(names):
            if other != path:
                self.notify(other)
        if st.st_nlink <= 1:
            names.clear()

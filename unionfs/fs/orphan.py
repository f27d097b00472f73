"""Objects of the union whose name is gone, kept as the kernel's overlayfs keeps an inode it still holds.

Under the kernel's overlayfs a file that was unlinked (or replaced by a rename) while something still held
it goes on answering: an open descriptor reads, writes, fstat()s it (``st_nlink`` 0 for an upper file that
lost its last link, the layer's own count for a lower one), and an ``open(2)`` that looked the name up just
before it went opens the old inode.  A frontend that hands out its own handles on objects (node ids) gets
the same by asking :meth:`unionfs.fs.union.UnionFS.pin` for an :class:`Orphan` *before* it removes a name
it holds, and by calling the ``orphan_*`` methods of the union on it once the name is gone.

An orphan is an ``O_PATH`` descriptor of the object's top copy (:class:`unionfs.fs.fsio.Pinned`, so the
host side still never follows a symlink nor writes outside the upper dir) plus what the union showed of it:
its ``st_ino``, where it lives, its type.  Nothing is written anywhere for it, so a crash leaves nothing to
clean; the holder closes it (:meth:`Orphan.close`) when the last reference to the object goes.

What the kernel's overlayfs does that this reproduces (checked on 6.18):
- an upper object is changed in place (chmod, chown, truncate, times, xattrs) through its inode;
- a lower object can no longer be copied up: every change, and an open for writing, fails as the kernel's
  copy-up does when it finds the whiteout where the name was (EEXIST; ENOTDIR for a directory); reads go
  to the layer, which still has it;
- a directory shows the host's count (0 for an upper one, the layer's for a lower one), a merged one 1.
"""

from __future__ import annotations

import stat as stat_mod

from unionfs.fs.fsio import Pinned


class Orphan:
    """An object of the union held after its name is gone (see the module docstring)."""

    __slots__ = ("ino", "kind", "nlink", "on_upper", "path", "pinned")

    def __init__(self, pinned: Pinned, path: str, ino: int, on_upper: bool, kind: int,
                 nlink: int | None = None) -> None:
        self.pinned = pinned
        self.path = path
        """The union path it had when it was pinned (for the names of a hard link it still has)."""
        self.ino = ino
        """The ``st_ino`` the union showed for it."""
        self.on_upper = on_upper
        self.kind = kind
        """Its ``S_IFMT`` bits."""
        self.nlink = nlink
        """Shown instead of the host's link count (a merged directory: 1), else None."""

    def __repr__(self) -> str:
        return f"Orphan(path={self.path!r}, ino={self.ino}, on_upper={self.on_upper}, kind={self.kind:o})"

    @property
    def is_dir(self) -> bool:
        return self.kind == stat_mod.S_IFDIR

    def close(self) -> None:
        """Let the object go (idempotent)."""
        self.pinned.close()

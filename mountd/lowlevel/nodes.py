"""Node ids: the kernel's handles on objects of the union, mapped to union paths.

The core is keyed by path; the kernel by node id.  A node is one name the kernel has looked up: its
parent node and its name, so that a rename moves a whole subtree by changing one record.  The kernel
counts lookups (``nlookup``: +1 per LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK, LINK reply and READDIRPLUS entry)
and gives them back with FORGET/BATCH_FORGET; a node is dropped when its count is 0 and no file is open on it.

Hard links are per path, as the kernel's overlayfs without ``index=on`` shows them: every name is a node of
its own (with the same ``st_ino`` where the layers share the inode); a change through one name invalidates
the kernel's caches of the others (the core's ``invalidate`` hook).

A node whose name is gone (unlink, rmdir, a rename over it) keeps its id without a parent and holds the
object itself: the :class:`unionfs.fs.orphan.Orphan` the core pinned before the removal.  Requests on it
(GETATTR, SETATTR, OPEN, READ, WRITE, the xattrs) then reach the object as on the kernel's overlayfs, which
holds the inode; the orphan is let go when the node is dropped (its last FORGET and its last open file),
and :meth:`NodeTable.clear` lets every one go at unmount.  Nothing is kept on disk for it.  A node given up
for a fresh one (a passthrough copy-up, see ``dispatch``) has no parent and no orphan: every request
on it that needs its name (OPEN, and GETATTR, SETATTR, READDIR without an open file) answers ESTALE, so that
the kernel looks the name up again; ENOENT there would fail an open(2) whose permission check asked for the
node's attributes.

Paths are asked for on every request, so :meth:`NodeTable.path` keeps the paths it built; any change of
the tree's shape (a rename, an unlink) forgets them all, and they are built again on the next request.

After a walk the kernel may hold a node for every name of a large tree (a million, until memory pressure
makes it forget them), so a node is not a Python object: it is a slot of three parallel arrays (parent id,
lookup count, generation) and a list of names, 28 bytes a node instead of a 64-byte object and its entry in
a table keyed by id.  A forgotten node's slot goes to a free list and is taken by the next new node with its
generation bumped; a node id is the slot in its low 32 bits and the slot's generation in the high 32, so an
id names one node only (an id comes back only after 2³² reuses of its slot, and only ever one the kernel
forgot long before).  The few nodes with open files or an orphan have them in two side tables, and the names
a parent holds are one dict per parent node (keyed by the name string the core's directory table already
holds).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from array import array

from mountd.lowlevel.abi import ROOT_ID
from unionfs.fs.orphan import Orphan

_NO_FHS: frozenset[int] = frozenset()
"""The open files of a node no file is open on."""

_SLOT_BITS = 32
_SLOT = (1 << _SLOT_BITS) - 1
_GENERATION = (1 << 32) - 1
_NO_PARENT = 0
"""The parent of the root, and of a node whose name is gone (node id 0 is never one)."""


def _stale() -> OSError:
    return OSError(errno.ESTALE, os.strerror(errno.ESTALE))


class NodeTable:
    """Node id <-> (parent id, name), with lookup counts.  Thread-safe (one lock, held briefly)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # slot 0 is never a node (node id 0 means none to the kernel); slot 1 is the root
        self._parent = array("Q", [_NO_PARENT, _NO_PARENT])
        """Per slot, the parent node's id; 0 once the name is gone (unlinked, or replaced by a rename)."""
        self._nlookup = array("Q", [0, 1])
        self._generation = array("I", [0, 0])
        self._names: list[str | None] = [None, ""]
        """Per slot, the node's name; None for a free slot."""
        self._free = array("I")
        """Slots of forgotten nodes, taken again by new ones."""
        self._count = 1
        self._children: dict[int, dict[str, int]] = {}
        """Per parent node id, the node ids of the names in it the kernel holds."""
        self._open: dict[int, set[int]] = {}
        """The file handles open on a node, for the nodes with any."""
        self._orphans: dict[int, Orphan] = {}
        """The object itself of a node whose name is gone (see the module docstring)."""
        self.held_inos: dict[int, int] = {}
        """The ``st_ino`` of every non-directory such a node holds, with how many hold it: a write through one
        of them passed to the backing file changes the object under its other names unseen by the daemon."""
        self._given_up: set[int] = set()
        """Nodes whose name was given a fresh node (see :meth:`give_up`)."""
        self._paths: dict[int, str] = {ROOT_ID: ""}
        """Paths built by :meth:`path` since the tree last changed shape (filled and emptied under the lock)."""
        self._shape = 0
        """Bumped (under the lock) whenever a name moves or goes: a path built before then is not kept."""

    def __len__(self) -> int:
        return self._count

    def _slot(self, nodeid: int) -> int:
        """The slot of node ``nodeid``, or -1 when there is no such node (forgotten, or never made)."""
        slot = nodeid & _SLOT
        try:
            if self._generation[slot] == nodeid >> _SLOT_BITS and self._names[slot] is not None:
                return slot
        except IndexError:
            pass
        return -1

    def check(self, nodeid: int) -> None:
        """ESTALE when the kernel names a node it was told to forget (a bug) or never had."""
        if self._slot(nodeid) < 0:
            raise _stale()

    def orphan(self, nodeid: int) -> Orphan | None:
        """The object node ``nodeid`` holds since its name is gone (None: it has a name, or was given up)."""
        return self._orphans.get(nodeid)

    def open_fhs(self, nodeid: int) -> frozenset[int]:
        """The file handles open on node ``nodeid`` (a copy)."""
        with self._lock:
            fhs = self._open.get(nodeid)
            return _NO_FHS if fhs is None else frozenset(fhs)

    def path(self, nodeid: int) -> str | None:
        """The union path of ``nodeid`` ("" for the root), or None when its name (or a parent's) is gone."""
        known = self._paths.get(nodeid)
        if known is not None:
            return known
        shape = self._shape
        parts: list[str] = []
        names, parents, generations = self._names, self._parent, self._generation
        first = slot = nodeid & _SLOT
        generation = nodeid >> _SLOT_BITS
        try:
            if generations[slot] != generation:
                return None
        except IndexError:
            return None
        # a parent is held while the kernel holds a child, so the chain needs no generation checks
        while slot != ROOT_ID:
            name = names[slot]
            parent = parents[slot]
            if name is None or parent == _NO_PARENT:
                return None
            parts.append(name)
            slot = parent & _SLOT
        if len(parts) == 1:
            path = parts[0]
        else:
            parts.reverse()
            path = "/".join(parts)
        with self._lock:
            if shape == self._shape and names[first] is not None and generations[first] == generation:
                self._paths[nodeid] = path
        return path

    def _reshaped(self) -> None:
        """A name moved or went (lock held): forget every path built so far."""
        self._shape += 1
        self._paths.clear()
        self._paths[ROOT_ID] = ""

    def child_path(self, parent: int, name: str) -> str:
        """The union path of ``name`` inside node ``parent``; ENOENT when the parent's name is gone."""
        base = self.path(parent)
        if base is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return f"{base}/{name}" if base else name

    def find(self, parent: int, name: str) -> int | None:
        """The node id the kernel knows for ``name`` in ``parent``, if any (no count taken)."""
        kids = self._children.get(parent)
        return None if kids is None else kids.get(name)

    def find_path(self, path: str) -> int | None:
        """The node id of union path ``path`` if the kernel holds one ("" is the root)."""
        nodeid: int | None = ROOT_ID
        if path:
            for part in path.split("/"):
                kids = self._children.get(nodeid)  # type: ignore[arg-type]
                nodeid = None if kids is None else kids.get(part)
                if nodeid is None:
                    return None
        return nodeid

    def remember(self, parent: int, name: str) -> int:
        """Count one lookup of ``name`` in ``parent`` (made a node if new); returns its id."""
        with self._lock:
            kids = self._children.get(parent)
            if kids is None:
                kids = self._children[parent] = {}
            nodeid = kids.get(name)
            if nodeid is None:
                nodeid = kids[name] = self._new(parent, name)
            self._nlookup[nodeid & _SLOT] += 1
            return nodeid

    def _new(self, parent: int, name: str) -> int:
        """A node for ``name`` in ``parent``, in a free slot if there is one (lock held); returns its id."""
        self._count += 1
        if self._free:
            slot = self._free.pop()
            generation = (self._generation[slot] + 1) & _GENERATION
            self._generation[slot] = generation
            self._parent[slot] = parent
            self._nlookup[slot] = 0
            self._names[slot] = name
            return slot | generation << _SLOT_BITS
        slot = len(self._names)
        if slot > _SLOT:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        self._generation.append(0)
        self._parent.append(parent)
        self._nlookup.append(0)
        self._names.append(name)
        return slot

    def _unlink(self, parent: int, name: str) -> int | None:
        """Take ``name`` out of ``parent``'s names (lock held); returns the node id it had."""
        kids = self._children.get(parent)
        if kids is None:
            return None
        nodeid = kids.pop(name, None)
        if not kids:
            del self._children[parent]
        return nodeid

    def _link(self, parent: int, name: str, nodeid: int) -> None:
        """Put ``nodeid`` at ``name`` in ``parent`` (lock held)."""
        kids = self._children.get(parent)
        if kids is None:
            kids = self._children[parent] = {}
        kids[name] = nodeid

    def _release_name(self, nodeid: int) -> bool:
        """Take node ``nodeid``'s name out of its parent's names if it still stands for it (lock held; a name
        may have a newer node already); returns whether it did."""
        slot = nodeid & _SLOT
        parent, name = self._parent[slot], self._names[slot]
        if parent == _NO_PARENT or name is None or self.find(parent, name) != nodeid:
            return False
        self._unlink(parent, name)
        return True

    def _place(self, nodeid: int, parent: int, name: str) -> None:
        """Node ``nodeid`` is now ``name`` in ``parent`` (lock held; the names' dicts are the caller's)."""
        slot = nodeid & _SLOT
        self._parent[slot] = parent
        self._names[slot] = name

    def forget(self, nodeid: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of ``nodeid``."""
        if nodeid == ROOT_ID:
            return
        with self._lock:
            slot = self._slot(nodeid)
            if slot < 0:
                return
            left = self._nlookup[slot] - count
            if left > 0:
                self._nlookup[slot] = left
            else:
                self._nlookup[slot] = 0
                self._drop_if_unused(nodeid)

    def _drop_if_unused(self, nodeid: int) -> None:
        """Free node ``nodeid`` if the kernel holds no lookup of it and no file is open on it (lock held)."""
        slot = nodeid & _SLOT
        if self._nlookup[slot] or nodeid in self._open or nodeid == ROOT_ID:
            return
        self._release_name(nodeid)
        self._names[slot] = None
        self._parent[slot] = _NO_PARENT
        self._free.append(slot)
        self._count -= 1
        self._paths.pop(nodeid, None)
        if self._given_up:
            self._given_up.discard(nodeid)
        if self._orphans:
            self._let_go(nodeid)

    def _keep(self, nodeid: int, orphan: Orphan) -> None:
        """Node ``nodeid`` holds ``orphan`` (lock held)."""
        self._orphans[nodeid] = orphan
        if orphan.kind != stat.S_IFDIR:
            self.held_inos[orphan.ino] = self.held_inos.get(orphan.ino, 0) + 1

    def _let_go(self, nodeid: int) -> None:
        """Close the object node ``nodeid`` holds, if any (lock held)."""
        orphan = self._orphans.pop(nodeid, None)
        if orphan is None:
            return
        if orphan.kind != stat.S_IFDIR:
            left = self.held_inos.pop(orphan.ino, 1) - 1
            if left:
                self.held_inos[orphan.ino] = left
        orphan.close()

    def opened(self, nodeid: int, fh: int) -> None:
        with self._lock:
            if self._slot(nodeid) >= 0:
                self._open.setdefault(nodeid, set()).add(fh)

    def closed(self, nodeid: int, fh: int) -> None:
        with self._lock:
            if self._slot(nodeid) >= 0:
                fhs = self._open.get(nodeid)
                if fhs is not None:
                    fhs.discard(fh)
                    if not fhs:
                        del self._open[nodeid]
                self._drop_if_unused(nodeid)

    def held(self, parent: int, name: str) -> bool:
        """Does the kernel hold a node for ``name`` in ``parent`` (so that its removal must keep the object)?"""
        return self.find(parent, name) is not None

    def detach(self, parent: int, name: str, orphan: Orphan | None = None) -> int | None:
        """``name`` in ``parent`` is gone (unlink, rmdir, replaced by a rename): its node, if any, keeps its
        id and open files but has no path any more, and holds ``orphan`` (the object, pinned before the
        removal) until it is dropped.  Without a node the orphan is let go at once.  Returns the node's id."""
        with self._lock:
            nodeid = self._unlink(parent, name)
            if nodeid is None:
                if orphan is not None:
                    orphan.close()
                return None
            self._parent[nodeid & _SLOT] = _NO_PARENT
            self._let_go(nodeid)
            if orphan is not None:
                self._keep(nodeid, orphan)
            self._reshaped()
            self._drop_if_unused(nodeid)
            return nodeid

    def give_up(self, nodeid: int) -> None:
        """Node ``nodeid`` no longer stands for its name, which gets a fresh node at its next lookup (a
        passthrough copy-up, see ``dispatch``): every request on it that needs the name answers ESTALE
        (:meth:`gone_errno`), so that the kernel looks the name up again instead of failing."""
        with self._lock:
            slot = self._slot(nodeid)
            if slot < 0:
                return
            self._given_up.add(nodeid)
            if self._release_name(nodeid):
                self._parent[slot] = _NO_PARENT
                self._reshaped()
            self._drop_if_unused(nodeid)

    def gone_errno(self, nodeid: int) -> int:
        """The errno of a request that needs the name of node ``nodeid``, which has none: ESTALE for a node
        given up for a fresh one (the name is still there), ENOENT for a name that is gone."""
        return errno.ESTALE if nodeid in self._given_up else errno.ENOENT

    def clear(self) -> None:
        """Let every kept object go (the mount ended: the kernel holds nothing any more)."""
        with self._lock:
            for nodeid in list(self._orphans):
                self._let_go(nodeid)

    def move(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        """A rename: the node at (parent, name), if any, now is (new_parent, new_name); whatever the kernel
        held there before must have been detached first."""
        with self._lock:
            nodeid = self._unlink(parent, name)
            if nodeid is None:
                return
            self._place(nodeid, new_parent, new_name)
            self._link(new_parent, new_name, nodeid)
            self._reshaped()

    def exchange(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        """RENAME_EXCHANGE: the nodes of the two names swap places."""
        with self._lock:
            first = self._unlink(parent, name)
            second = self._unlink(new_parent, new_name)
            self._reshaped()
            if first is not None:
                self._place(first, new_parent, new_name)
                self._link(new_parent, new_name, first)
            if second is not None:
                self._place(second, parent, name)
                self._link(parent, name, second)

"""Node ids: the kernel's handles on objects of the union, mapped to union paths.

The core is keyed by path; the kernel by node id.  A :class:`Node` is one name the kernel has looked up:
its parent node and its name, so that a rename moves a whole subtree by changing one record.  The kernel
counts lookups (``nlookup``: +1 per LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK, LINK reply and READDIRPLUS entry)
and gives them back with FORGET/BATCH_FORGET; a node is dropped when its count is 0 and no file is open on it.
Node ids are never reused (the generation stays 0).

Hard links are per path, as the kernel's overlayfs without ``index=on`` shows them: every name is a node of
its own (with the same ``st_ino`` where the layers share the inode); a change through one name invalidates
the kernel's caches of the others (the core's ``invalidate`` hook).

A node whose name is gone (unlink, rmdir, a rename over it) keeps its id with ``parent`` None and holds the
object itself: the :class:`unionfs.fs.orphan.Orphan` the core pinned before the removal.  Requests on it
(GETATTR, SETATTR, OPEN, READ, WRITE, the xattrs) then reach the object as on the kernel's overlayfs, which
holds the inode; the orphan is let go when the node is dropped (its last FORGET and its last open file),
and :meth:`NodeTable.clear` lets every one go at unmount.  Nothing is kept on disk for it.  A node given up
for a fresh one (a passthrough copy-up, see ``dispatch``) has ``parent`` None and no orphan: every request
on it that needs its name (OPEN, and GETATTR, SETATTR, READDIR without an open file) answers ESTALE, so that
the kernel looks the name up again; ENOENT there would fail an open(2) whose permission check asked for the
node's attributes.

Paths are asked for on every request, so :meth:`NodeTable.path` keeps the paths it built; any change of
the tree's shape (a rename, an unlink) forgets them all, and they are built again on the next request.

After a walk the kernel may hold a node for every name of a large tree (a million, until memory pressure
makes it forget them), so a node is kept small: a ``__slots__`` record of its id, parent, name and lookup
count; the few nodes with open files or an orphan have them in two side tables, and the names a parent
holds are one dict per parent node (keyed by the name string the core's directory table already holds)
rather than a table keyed by ``(parent, name)`` tuples.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading

from mountd.lowlevel.abi import ROOT_ID
from unionfs.fs.orphan import Orphan

_NO_FHS: frozenset[int] = frozenset()
"""The open files of a node no file is open on."""


class Node:
    """One name of the union the kernel holds."""

    __slots__ = ("name", "nlookup", "nodeid", "parent")

    def __init__(self, nodeid: int, parent: int | None, name: str) -> None:
        self.nodeid = nodeid
        self.parent = parent
        """The parent node's id; None once the name is gone (unlinked, or replaced by a rename)."""
        self.name = name
        self.nlookup = 0


class NodeTable:
    """Node id <-> (parent id, name), with lookup counts.  Thread-safe (one lock, held briefly)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        root = Node(ROOT_ID, None, "")
        root.nlookup = 1
        self._nodes: dict[int, Node] = {ROOT_ID: root}
        self._children: dict[int, dict[str, int]] = {}
        """Per parent node id, the node ids of the names in it the kernel holds."""
        self._open: dict[int, set[int]] = {}
        """The file handles open on a node, for the nodes with any."""
        self._orphans: dict[int, Orphan] = {}
        """The object itself of a node whose name is gone (see the module docstring)."""
        self._given_up: set[int] = set()
        """Nodes whose name was given a fresh node (see :meth:`give_up`)."""
        self._ids = itertools.count(ROOT_ID + 1)
        self._paths: dict[int, str] = {ROOT_ID: ""}
        """Paths built by :meth:`path` since the tree last changed shape (filled and emptied under the lock)."""
        self._shape = 0
        """Bumped (under the lock) whenever a name moves or goes: a path built before then is not kept."""

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, nodeid: int) -> Node:
        """The node ``nodeid``; ESTALE when the kernel names one it was told to forget (a bug) or never had."""
        node = self._nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return node

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
        nodes = self._nodes
        node = nodes.get(nodeid)
        while node is not None and node.nodeid != ROOT_ID:
            if node.parent is None:
                return None
            parts.append(node.name)
            node = nodes.get(node.parent)
        if node is None:
            return None
        parts.reverse()
        path = "/".join(parts)
        with self._lock:
            if shape == self._shape and nodeid in nodes:
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
                nodeid = next(self._ids)
                self._nodes[nodeid] = Node(nodeid, parent, name)
                kids[name] = nodeid
            self._nodes[nodeid].nlookup += 1
            return nodeid

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

    def forget(self, nodeid: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of ``nodeid``."""
        if nodeid == ROOT_ID:
            return
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None:
                return
            node.nlookup = max(0, node.nlookup - count)
            self._drop_if_unused(node)

    def _drop_if_unused(self, node: Node) -> None:
        if node.nlookup or node.nodeid in self._open or node.nodeid == ROOT_ID:
            return
        del self._nodes[node.nodeid]
        self._paths.pop(node.nodeid, None)
        if node.parent is not None and self.find(node.parent, node.name) == node.nodeid:
            self._unlink(node.parent, node.name)
        self._given_up.discard(node.nodeid)
        orphan = self._orphans.pop(node.nodeid, None)
        if orphan is not None:
            orphan.close()

    def opened(self, nodeid: int, fh: int) -> None:
        with self._lock:
            if nodeid in self._nodes:
                self._open.setdefault(nodeid, set()).add(fh)

    def closed(self, nodeid: int, fh: int) -> None:
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is not None:
                fhs = self._open.get(nodeid)
                if fhs is not None:
                    fhs.discard(fh)
                    if not fhs:
                        del self._open[nodeid]
                self._drop_if_unused(node)

    def held(self, parent: int, name: str) -> bool:
        """Does the kernel hold a node for ``name`` in ``parent`` (so that its removal must keep the object)?"""
        return self.find(parent, name) is not None

    def detach(self, parent: int, name: str, orphan: Orphan | None = None) -> Node | None:
        """``name`` in ``parent`` is gone (unlink, rmdir, replaced by a rename): its node, if any, keeps its
        id and open files but has no path any more, and holds ``orphan`` (the object, pinned before the
        removal) until it is dropped.  Without a node the orphan is let go at once."""
        with self._lock:
            nodeid = self._unlink(parent, name)
            if nodeid is None:
                if orphan is not None:
                    orphan.close()
                return None
            node = self._nodes[nodeid]
            node.parent = None
            old = self._orphans.pop(nodeid, None)
            if old is not None:
                old.close()
            if orphan is not None:
                self._orphans[nodeid] = orphan
            self._reshaped()
            self._drop_if_unused(node)
            return node

    def give_up(self, nodeid: int) -> None:
        """Node ``nodeid`` no longer stands for its name, which gets a fresh node at its next lookup (a
        passthrough copy-up, see ``dispatch``): every request on it that needs the name answers ESTALE
        (:meth:`gone_errno`), so that the kernel looks the name up again instead of failing."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None:
                return
            self._given_up.add(nodeid)
            if node.parent is not None and self.find(node.parent, node.name) == nodeid:
                self._unlink(node.parent, node.name)
                node.parent = None
                self._reshaped()
            self._drop_if_unused(node)

    def gone_errno(self, nodeid: int) -> int:
        """The errno of a request that needs the name of node ``nodeid``, which has none: ESTALE for a node
        given up for a fresh one (the name is still there), ENOENT for a name that is gone."""
        return errno.ESTALE if nodeid in self._given_up else errno.ENOENT

    def clear(self) -> None:
        """Let every kept object go (the mount ended: the kernel holds nothing any more)."""
        with self._lock:
            for orphan in self._orphans.values():
                orphan.close()
            self._orphans.clear()

    def move(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        """A rename: the node at (parent, name), if any, now is (new_parent, new_name); whatever the kernel
        held there before must have been detached first."""
        with self._lock:
            nodeid = self._unlink(parent, name)
            if nodeid is None:
                return
            node = self._nodes[nodeid]
            node.parent, node.name = new_parent, new_name
            self._link(new_parent, new_name, nodeid)
            self._reshaped()

    def exchange(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        """RENAME_EXCHANGE: the nodes of the two names swap places."""
        with self._lock:
            first = self._unlink(parent, name)
            second = self._unlink(new_parent, new_name)
            self._reshaped()
            if first is not None:
                node = self._nodes[first]
                node.parent, node.name = new_parent, new_name
                self._link(new_parent, new_name, first)
            if second is not None:
                node = self._nodes[second]
                node.parent, node.name = parent, name
                self._link(parent, name, second)

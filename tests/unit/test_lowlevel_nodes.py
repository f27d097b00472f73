"""Node ids of the protocol frontend: lookup counts, forgetting, and names that move or go away."""

from __future__ import annotations

import errno
import stat

import pytest

from mountd.lowlevel.abi import ROOT_ID
from mountd.lowlevel.nodes import NodeTable


def test_a_name_keeps_its_node_while_the_kernel_counts_lookups() -> None:
    table = NodeTable()
    first = table.remember(ROOT_ID, "a")
    assert table.remember(ROOT_ID, "a") == first
    assert table.path(first) == "a"
    table.forget(first, 1)
    assert table.find(ROOT_ID, "a") == first
    table.forget(first, 1)
    assert table.find(ROOT_ID, "a") is None
    with pytest.raises(OSError) as info:
        table.check(first)
    assert info.value.errno == errno.ESTALE
    assert table.remember(ROOT_ID, "a") != first  # an id names one node only


def test_a_forgotten_nodes_slot_is_taken_again_under_a_new_id() -> None:
    """The table keeps as many slots as nodes the kernel held at once: a node forgotten gives its slot to the
    next new one, whose id differs (the slot's generation): the old id answers ESTALE and has no path, and
    nothing kept under the old id (open files, a path built) reaches the new node."""
    table = NodeTable()
    d = table.remember(ROOT_ID, "d")
    seen: set[int] = set()
    slots: set[int] = set()
    for i in range(1000):
        f = table.remember(d, f"f{i}")
        assert table.path(f) == f"d/f{i}"
        assert f not in seen
        seen.add(f)
        slots.add(f & 0xFFFFFFFF)
        table.forget(f, 1)
        assert table.path(f) is None
        with pytest.raises(OSError) as info:
            table.check(f)
        assert info.value.errno == errno.ESTALE
    assert len(slots) == 1 and len(table) == 2  # the root and d
    kept = table.remember(d, "kept")
    table.opened(kept, 5)
    table.forget(kept, 1)
    assert table.path(kept) == "d/kept"  # still open
    table.closed(kept, 5)
    fresh = table.remember(ROOT_ID, "fresh")
    assert fresh & 0xFFFFFFFF == kept & 0xFFFFFFFF and fresh != kept
    assert table.open_fhs(fresh) == frozenset() and table.path(fresh) == "fresh"
    table.closed(kept, 5)  # a late close of the old id does not touch the new node
    table.forget(kept, 1)
    assert table.path(fresh) == "fresh" and table.find(ROOT_ID, "fresh") == fresh


def test_a_rename_moves_the_subtree_under_the_node() -> None:
    table = NodeTable()
    d = table.remember(ROOT_ID, "d")
    f = table.remember(d, "f")
    e = table.remember(ROOT_ID, "e")
    table.move(ROOT_ID, "d", e, "moved")
    assert table.path(f) == "e/moved/f"
    assert table.find_path("e/moved/f") == f
    assert table.find(ROOT_ID, "d") is None


def test_an_unlinked_open_node_keeps_its_id_without_a_path() -> None:
    table = NodeTable()
    f = table.remember(ROOT_ID, "f")
    table.opened(f, 10)
    assert table.detach(ROOT_ID, "f") is not None
    table.forget(f, 1)
    table.check(f)  # still open: no ESTALE
    assert table.path(f) is None
    new = table.remember(ROOT_ID, "f")
    assert new != f and table.path(new) == "f"
    table.closed(f, 10)
    with pytest.raises(OSError):
        table.check(f)
    assert table.find(ROOT_ID, "f") == new  # dropping the old node left the new name alone


def test_a_node_given_up_for_a_fresh_one_answers_estale_and_an_unlinked_one_enoent() -> None:
    """A node given up (a passthrough copy-up) leaves its name to a fresh node: a request that needs its
    name answers ESTALE (the kernel then looks the name up again; ENOENT would fail the open(2) whose
    permission check asked for its attributes); a node whose name is gone answers ENOENT."""
    table = NodeTable()
    old = table.remember(ROOT_ID, "f")
    gone = table.remember(ROOT_ID, "g")
    table.give_up(old)
    table.detach(ROOT_ID, "g")
    assert table.path(old) is None and table.find(ROOT_ID, "f") is None
    assert table.gone_errno(old) == errno.ESTALE
    assert table.gone_errno(gone) == errno.ENOENT
    fresh = table.remember(ROOT_ID, "f")
    assert fresh != old and table.path(fresh) == "f"
    table.give_up(old)  # again, after the name has its fresh node: the fresh node keeps it
    assert table.find(ROOT_ID, "f") == fresh
    table.forget(old, 1)
    with pytest.raises(OSError) as info:
        table.check(old)
    assert info.value.errno == errno.ESTALE
    assert table.gone_errno(old) == errno.ENOENT  # forgotten with the node


def test_children_of_a_removed_directory_have_no_path() -> None:
    table = NodeTable()
    d = table.remember(ROOT_ID, "d")
    f = table.remember(d, "f")
    table.detach(ROOT_ID, "d")
    assert table.path(f) is None
    with pytest.raises(OSError) as info:
        table.child_path(d, "g")
    assert info.value.errno == errno.ENOENT


def test_exchange_swaps_two_nodes() -> None:
    table = NodeTable()
    a = table.remember(ROOT_ID, "a")
    b = table.remember(ROOT_ID, "b")
    table.exchange(ROOT_ID, "a", ROOT_ID, "b")
    assert (table.path(a), table.path(b)) == ("b", "a")
    assert table.find(ROOT_ID, "a") == b


class _Kept:
    """Stands for the object a node keeps once its name is gone (counts its closes)."""

    def __init__(self, ino: int = 99, kind: int = stat.S_IFREG) -> None:
        self.closes = 0
        self.ino = ino
        self.kind = kind

    def close(self) -> None:
        self.closes += 1


def test_a_node_whose_name_is_gone_keeps_its_object_until_dropped() -> None:
    table = NodeTable()
    f = table.remember(ROOT_ID, "f")
    assert table.held(ROOT_ID, "f")
    kept = _Kept()
    table.opened(f, 7)
    table.detach(ROOT_ID, "f", kept)  # type: ignore[arg-type]
    assert not table.held(ROOT_ID, "f")
    assert table.orphan(f) is kept
    table.forget(f, 1)
    assert kept.closes == 0  # still open
    table.closed(f, 7)
    assert kept.closes == 1  # last FORGET and last close: let go


def test_an_object_without_a_node_is_let_go_at_once_and_all_at_unmount() -> None:
    table = NodeTable()
    kept = _Kept()
    assert table.detach(ROOT_ID, "never-looked-up", kept) is None  # type: ignore[arg-type]
    assert kept.closes == 1
    g = table.remember(ROOT_ID, "g")
    other = _Kept()
    table.detach(ROOT_ID, "g", other)  # type: ignore[arg-type]
    assert table.orphan(g) is other and other.closes == 0
    table.clear()
    assert other.closes == 1


def test_paths_asked_before_a_rename_or_an_unlink_are_not_answered_after_it() -> None:
    table = NodeTable()
    d = table.remember(ROOT_ID, "d")
    f = table.remember(d, "f")
    e = table.remember(ROOT_ID, "e")
    assert table.path(f) == "d/f"  # built and kept
    table.move(ROOT_ID, "d", e, "moved")
    assert table.path(f) == "e/moved/f"
    x = table.remember(ROOT_ID, "x")
    assert table.path(x) == "x"
    table.exchange(e, "moved", ROOT_ID, "x")
    assert table.path(f) == "x/f"
    assert table.path(x) == "e/moved"
    table.detach(ROOT_ID, "x")
    assert table.path(f) is None
    assert table.path(e) == "e"


def test_the_inodes_of_held_files_are_known_while_held() -> None:
    """A file a node whose name is gone holds is counted under its st_ino (its other names' attributes must
    not be kept by the kernel: a write passed through the held node changes them unseen); a directory is
    not counted; the count goes with the last node that holds it."""
    table = NodeTable()
    f = table.remember(ROOT_ID, "f")
    g = table.remember(ROOT_ID, "g")
    table.remember(ROOT_ID, "d")
    table.opened(f, 1)
    table.opened(g, 2)
    table.detach(ROOT_ID, "f", _Kept(ino=7))  # type: ignore[arg-type]
    table.detach(ROOT_ID, "g", _Kept(ino=7))  # type: ignore[arg-type]
    table.detach(ROOT_ID, "d", _Kept(ino=8, kind=stat.S_IFDIR))  # type: ignore[arg-type]
    assert table.held_inos == {7: 2}
    table.forget(f, 1)
    table.closed(f, 1)
    assert table.held_inos == {7: 1}
    table.forget(g, 1)
    table.closed(g, 2)
    assert table.held_inos == {}
    h = table.remember(ROOT_ID, "h")
    table.detach(ROOT_ID, "h", _Kept(ino=9))  # type: ignore[arg-type]
    assert table.held_inos == {9: 1}
    table.clear()
    assert table.held_inos == {} and table.orphan(h) is None

"""Owner mapping (uidmapping=/gidmapping=/squash_to_*): stored ids are shown mapped, ids given through the
union are stored unmapped, unmapped ids are refused before anything is created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs.fs.idmap import OVERFLOW_ID, IdMap
from unionfs.fs.layers import LayerStack
from unionfs.fs.union import UnionFS

MAP = IdMap(uids=((0, 100000, 1000),), gids=((0, 200000, 1000),))


def test_shown_and_stored_are_inverse_inside_the_ranges() -> None:
    assert MAP.shown(0, 0) == (100000, 200000)
    assert MAP.shown(999, 5) == (100999, 200005)
    assert MAP.stored(100999, 200005) == (999, 5)
    assert MAP.stored(-1, 200000) == (-1, 0)


def test_stored_ids_outside_every_range_show_as_overflow() -> None:
    assert MAP.shown(1000, 5000) == (OVERFLOW_ID, OVERFLOW_ID)


def test_ids_outside_every_range_are_stored_as_overflow() -> None:
    assert MAP.stored(5, 200000) == (OVERFLOW_ID, 0)


def test_squash_shows_one_owner_and_keeps_what_is_stored() -> None:
    squash = IdMap(squash_uid=0, squash_gid=0)
    assert squash.shown(1234, 4321) == (0, 0)
    assert squash.stored(1234, 4321) == (1234, 4321)
    assert IdMap().identity and not squash.identity


@pytest.fixture
def fs(tmp_path: Path):
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("f")
    os.chown(lower / "f", 7, 8)
    union = UnionFS(LayerStack.open(lowers=[str(lower)], upper=str(upper), work=str(work)), idmap=MAP)
    yield union, upper
    union.close()


def test_the_union_shows_mapped_owners_and_stores_unmapped_ones(fs) -> None:
    union, upper = fs
    attrs = union.getattr("f")
    assert (attrs.st_uid, attrs.st_gid) == (100007, 200008)
    union.chown("f", 100001, 200002)
    assert (os.lstat(upper / "f").st_uid, os.lstat(upper / "f").st_gid) == (1, 2)
    assert (union.getattr("f").st_uid, union.getattr("f").st_gid) == (100001, 200002)
    union.mkdir("d", 0o755, 100003, 200004)
    assert (os.lstat(upper / "d").st_uid, os.lstat(upper / "d").st_gid) == (3, 4)


def test_an_unmapped_caller_creates_objects_owned_by_the_overflow_id(fs) -> None:
    union, upper = fs
    union.mkdir("d", 0o755, 0, 0)
    st = os.lstat(upper / "d")
    assert (st.st_uid, st.st_gid) == (OVERFLOW_ID, OVERFLOW_ID)
    assert (union.getattr("d").st_uid, union.getattr("d").st_gid) == (OVERFLOW_ID, OVERFLOW_ID)

"""diff and inspect against hand-built expectations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.layers import WHITEOUT, Dir, File, Hardlink, build_layer
from support.mounts import kernel_overlay_mount

from unionfs.image.changes import ChangesError, diff_paths, diff_source, inspect_image
from unionfs.image.commit import commit_upper, import_dir
from unionfs.image.records import ContainerRecord, container_id
from unionfs.image.store import Store

BASE = {
    "etc/passwd": "root",
    "etc/hosts": "h",
    "usr/bin/sh": File(b"sh", mode=0o755),
    "usr/lib/x": "x",
    "var/log/syslog": "s",
    "opt/app": {"a": "a", "b": "b"},
    "keep": "k",
    "dir2file": {"x": "x"},
    "file2dir": "f",
}

UPPER = {
    "etc": Dir({"passwd": "root\nme"}),
    "usr/bin/new": "n",
    "var": Dir({"log": WHITEOUT}),
    "opt": Dir({"app": Dir({"c": "c"}, opaque=True)}),
    "new/deep/file": "f",
    "dir2file": "now a file",
    "file2dir": Dir({"inner": "i"}, opaque=True),
    "ghost": WHITEOUT,
}

EXPECTED = [
    "C /dir2file",
    "C /etc",
    "C /etc/passwd",
    "C /file2dir",
    "A /file2dir/inner",
    "A /new",
    "A /new/deep",
    "A /new/deep/file",
    "C /opt",
    "C /opt/app",
    "D /opt/app/a",
    "D /opt/app/b",
    "A /opt/app/c",
    "C /usr",
    "C /usr/bin",
    "A /usr/bin/new",
    "C /var",
    "D /var/log",
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(str(tmp_path / "store"), writable=True) as s:
        yield s


@pytest.fixture
def base(store: Store, tmp_path: Path) -> str:
    return import_dir(store, str(build_layer(BASE, tmp_path / "base")), image="base").digest


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_diff_of_an_upper(store: Store, base: str, tmp_path: Path, fmt: str) -> None:
    upper = build_layer(UPPER, tmp_path / "upper", whiteouts=fmt)  # type: ignore[arg-type]
    changes = diff_paths(diff_source(store, str(upper), base_image="base"))
    assert [c.line() for c in changes] == EXPECTED
    implied = {c.path for c in changes if c.implied}
    assert implied == {"/etc", "/opt", "/usr", "/usr/bin", "/var"}


def test_diff_with_lowerdirs_and_with_a_record(store: Store, base: str, tmp_path: Path) -> None:
    upper = build_layer(UPPER, tmp_path / "upper")
    by_dirs = diff_paths(diff_source(store, str(upper), lowerdirs=[str(tmp_path / "base")]))
    store.put_container(ContainerRecord(container_id(str(upper)), "base", (base,), str(upper), "w"))
    by_record = diff_paths(diff_source(store, str(upper)))
    assert [c.line() for c in by_dirs] == [c.line() for c in by_record] == EXPECTED


def test_diff_of_a_mountpoint(store: Store, base: str, tmp_path: Path) -> None:
    upper = build_layer(UPPER, tmp_path / "upper")
    (tmp_path / "work").mkdir()
    (tmp_path / "mnt").mkdir()
    with kernel_overlay_mount([tmp_path / "base"], upper, tmp_path / "work", tmp_path / "mnt") as mnt:
        source = diff_source(store, str(mnt))
        assert (source.upper, source.lowers) == (str(upper), [str(tmp_path / "base")])
        assert [c.line() for c in diff_paths(source)] == EXPECTED


def test_diff_of_a_read_only_mount_is_refused(store: Store, tmp_path: Path) -> None:
    lower = build_layer({"a": "1"}, tmp_path / "lower")
    (tmp_path / "mnt").mkdir()
    with kernel_overlay_mount([lower], None, None, tmp_path / "mnt") as mnt, \
            pytest.raises(ChangesError, match="is a read-only union mount: no upper dir to compare"):
        diff_source(store, str(mnt))


def test_diff_needs_to_know_the_lowers(store: Store, tmp_path: Path) -> None:
    upper = build_layer({"a": "1"}, tmp_path / "upper")
    with pytest.raises(ChangesError, match=r"cannot tell added from changed in .*: give --from IMAGE or --lowerdir"):
        diff_source(store, str(upper))
    with pytest.raises(ChangesError, match="no such directory"):
        diff_source(store, str(tmp_path / "nope"), base_image="x")


def test_metadata_changes_of_a_directory_show_as_c(store: Store, base: str, tmp_path: Path) -> None:
    lower = tmp_path / "base"
    same = build_layer({"etc": Dir({})}, tmp_path / "same")  # copied up, unchanged: not a change
    assert diff_paths(diff_source(store, str(same), base_image="base")) == []
    chmod = build_layer({"etc": Dir({}, mode=0o700)}, tmp_path / "chmod")
    assert [c.line() for c in diff_paths(diff_source(store, str(chmod), base_image="base"))] == ["C /etc"]
    xattr = build_layer({"etc": Dir({}, xattrs={"user.k": b"v"})}, tmp_path / "xattr")
    assert [c.line() for c in diff_paths(diff_source(store, str(xattr), base_image="base"))] == ["C /etc"]
    assert os.stat(lower / "etc").st_mode & 0o777 == 0o755


def test_a_directory_whited_out_and_recreated_replaces_the_old_one(store: Store, base: str,
                                                                     tmp_path: Path) -> None:
    """OCI form: ``.wh.opt`` next to a new ``opt`` dir — the old contents are gone."""
    upper = build_layer({"opt": {"new": "n"}}, tmp_path / "upper", whiteouts="oci")
    (upper / ".wh.opt").touch()
    lines = [c.line() for c in diff_paths(diff_source(store, str(upper), base_image="base"))]
    assert lines == ["C /opt", "D /opt/app", "A /opt/new"]


# -- inspect -------------------------------------------------------------------------------------------------

def test_inspect_counts_changes_and_waste(store: Store, tmp_path: Path) -> None:
    l1 = import_dir(store, str(build_layer({
        "a": File(b"a" * 100), "b": File(b"b" * 200), "d/x": File(b"x" * 300), "h1": File(b"h" * 50),
        "h2": Hardlink("h1"), "big": File(b"B" * 1000)}, tmp_path / "l1")), image="one").digest
    l2 = commit_upper(store, str(build_layer({
        "a": File(b"A" * 10), "d": WHITEOUT, "new": File(b"n" * 5), "h1": File(b"H" * 7)}, tmp_path / "l2")),
        image="two", base_image="one").digest
    l3 = commit_upper(store, str(build_layer({"new": WHITEOUT, "big": File(b"G" * 2000)}, tmp_path / "l3")),
                      image="three", base_image="two", created_by="step 3").digest
    report = inspect_image(store, store.image("three"))
    rows = [(r.digest, r.size, r.added, r.modified, r.removed, r.wasted) for r in report.layers]
    assert rows == [
        (l1, 1650, 7, 0, 0, 1400),  # a, d/x, big overwritten or deleted; h1's data still seen as h2
        (l2, 22, 1, 2, 1, 5),
        (l3, 2000, 0, 1, 1, 0),
    ]
    assert report.layers[2].created_by == "step 3"
    assert (report.total_bytes, report.wasted_bytes) == (3672, 1405)
    assert report.efficiency == pytest.approx(1 - 1405 / 3672)
    assert report.wasted_paths == [("/big", l1, 1000), ("/d/x", l1, 300), ("/a", l1, 100), ("/new", l2, 5)]
    data = report.to_json()
    assert data["efficiency"] == report.efficiency
    assert data["wasted_paths"][0] == {"path": "/big", "layer": l1, "bytes": 1000}


def test_inspect_of_an_image_without_data(store: Store, tmp_path: Path) -> None:
    import_dir(store, str(build_layer({"d": {}}, tmp_path / "l")), image="empty")
    report = inspect_image(store, store.image("empty"))
    assert report.efficiency == 1.0 and report.wasted_paths == []


def test_a_renamed_directory_is_new_with_everything_below_it(store: Store, base: str, tmp_path: Path) -> None:
    """An upper where directories with lower copies were renamed (the kernel's redirect_dir=on format): the
    old names are deleted, the new names are added with every path the union shows below them (also what
    their lower copies hold)."""
    upper = build_layer({"opt": Dir({"app": WHITEOUT, "moved": Dir({"own": "o"})}),
                         "usr": Dir({"lib": WHITEOUT}), "etc": Dir({"lib2": Dir()})}, tmp_path / "upper")
    os.setxattr(upper / "opt" / "moved", "trusted.overlay.redirect", b"app")
    os.setxattr(upper / "etc" / "lib2", "trusted.overlay.redirect", b"/usr/lib")
    changes = diff_paths(diff_source(store, str(upper), base_image="base"))
    assert [c.line() for c in changes] == [
        "C /etc", "A /etc/lib2", "A /etc/lib2/x",
        "C /opt", "D /opt/app", "A /opt/moved", "A /opt/moved/a", "A /opt/moved/b", "A /opt/moved/own",
        "C /usr", "D /usr/lib"]

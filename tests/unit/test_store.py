"""The layer store: layout, images and their json, publishing, consistency checks and gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.layers import WHITEOUT, Dir, build_layer
from support.mounts import kernel_overlay_mount

from unionfs.image.commit import import_dir
from unionfs.image.digest import layer_digest
from unionfs.image.records import ContainerRecord, HistoryEntry, Image, ImageConfig, LayerMeta, container_id
from unionfs.image.store import Store, StoreError, check_name, default_root


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(str(tmp_path / "store"), writable=True) as s:
        yield s


def add_layer(store: Store, tmp: Path, spec: dict[str, object], image: str) -> str:
    src = build_layer(spec, tmp / f"src-{image}")  # type: ignore[arg-type]
    return import_dir(store, str(src), image=image).digest


def test_layout_is_created(store: Store) -> None:
    assert sorted(os.listdir(store.root)) == ["containers", "images", "layers", "lock", "tmp"]
    assert os.stat(os.path.join(store.root, "tmp")).st_mode & 0o777 == 0o700


def test_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIONFS_STORE", "/somewhere")
    assert default_root() == "/somewhere"
    monkeypatch.delenv("UNIONFS_STORE")
    assert default_root() == "/var/lib/unionfs"  # the tests run as root
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.data")
    assert default_root() == "/home/u/.data/unionfs"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_root() == "/home/u/.local/share/unionfs"


@pytest.mark.parametrize("name", ["base", "my-app_2.0", "web:latest", "A", "x" * 128])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "../x", "a b", "a:b:c", "x" * 129, "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(StoreError, match="invalid image name"):
        check_name(name)


def test_image_round_trip_and_listing(store: Store, tmp_path: Path) -> None:
    d1 = add_layer(store, tmp_path, {"a": "1"}, "one")
    d2 = add_layer(store, tmp_path, {"b": "2"}, "two")
    config = ImageConfig(cmd=("/bin/sh",), env=("A=1",), workdir="/w", labels=(("k", "v"),))
    image = Image("both:v1", (d1, d2), (HistoryEntry(d1, "t1", "by1", "c1"), HistoryEntry(d2, "t2", "by2", "")),
                  config, "t3")
    store.put_image(image)
    assert store.image("both:v1") == image
    assert [i.name for i in store.images()] == ["both:v1", "one", "two"]
    data = json.loads(Path(store.root, "images", "both:v1.json").read_text())
    assert data["layers"] == [d1, d2]  # bottom-up
    assert data["config"] == {"cmd": ["/bin/sh"], "env": ["A=1"], "workdir": "/w", "labels": {"k": "v"}}


def test_image_id_depends_on_layers_and_config_only() -> None:
    a = Image("a", ("1" * 32,), created="x")
    assert Image("b", ("1" * 32,), created="y").id == a.id
    assert Image("a", ("2" * 32,)).id != a.id
    assert Image("a", ("1" * 32,), config=ImageConfig(cmd=("x",))).id != a.id


def test_config_changes_merge() -> None:
    base = ImageConfig(cmd=("a",), env=("A=1", "B=2"), workdir="/", labels=(("x", "1"),))
    new = base.merged(env=("B=3", "C=4"), labels=(("y", "2"),))
    assert new == ImageConfig(cmd=("a",), env=("A=1", "B=3", "C=4"), workdir="/",
                              labels=(("x", "1"), ("y", "2")))
    assert base.merged(cmd=(), workdir="/w").cmd == ()


def test_unknown_image(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown image 'nope'"):
        store.image("nope")
    with pytest.raises(StoreError, match="unknown image"):
        store.remove_image("nope")


def test_an_image_needs_its_layers(store: Store) -> None:
    with pytest.raises(StoreError, match="is not in the store"):
        store.put_image(Image("x", ("0" * 32,)))
    assert store.images() == []


def test_remove_image_keeps_layers_until_gc(store: Store, tmp_path: Path) -> None:
    digest = add_layer(store, tmp_path, {"a": "1"}, "one")
    store.remove_image("one")
    assert store.images() == []
    assert store.has_layer(digest)
    report = store.gc()
    assert report.removed_layers == [digest]
    assert report.freed_bytes == 1
    assert not store.has_layer(digest) and not store.tree_exists(digest)


def test_missing_store_reads_as_empty(tmp_path: Path) -> None:
    with Store(str(tmp_path / "none")) as s:
        assert s.images() == [] and s.layer_digests() == [] and s.check() == []
        with pytest.raises(StoreError, match="unknown image"):
            s.image("x")
    assert not (tmp_path / "none").exists()


def test_store_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], check=True)
    try:
        with pytest.raises(StoreError, match=rf"store {ro}/s is not writable: Read-only file system"):
            Store(str(ro / "s"), writable=True)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)


def test_publish_of_a_tree_that_is_already_there_discards_the_copy(store: Store, tmp_path: Path) -> None:
    digest = add_layer(store, tmp_path, {"a": "1"}, "one")
    staging = store.new_staging()
    Path(store.root, staging, "a").write_text("1")
    assert store.publish_layer(staging, store.layer(digest)) is False
    assert not Path(store.root, staging).exists()


def test_check_finds_damage(store: Store, tmp_path: Path) -> None:
    d1 = add_layer(store, tmp_path, {"a": "1"}, "one")
    d2 = add_layer(store, tmp_path, {"b": "2"}, "two")
    d3 = add_layer(store, tmp_path, {"c": "3"}, "three")
    assert store.check(verify=True) == []
    Path(store.root, "layers", d1 + ".json").unlink()  # image one names a layer that is gone
    os.rename(Path(store.root, "layers", d2), Path(store.root, "tmp", "moved"))  # json without tree
    Path(store.root, "layers", d3, "c").write_text("X")  # content no longer matches the name
    Path(store.root, "images", "bad.json").write_text("{half")
    broken = store.check(verify=True)
    actual = layer_digest(store.layer_path(d3))
    assert broken[0].startswith("image 'bad': unreadable: ")
    assert broken[1] == f"image 'one': layer {d1[:12]} is missing"
    assert sorted(broken[2:]) == sorted([  # layers in digest order
        f"layer {d2[:12]}: metadata without its tree",
        f"layer {d3[:12]}: content digest is {actual[:12]}",
    ])
    without_verify = [line for line in broken if "content digest" not in line]
    assert store.gc(dry_run=True).broken == without_verify  # the content is not read
    assert store.gc(dry_run=True, verify=True).broken == broken


def test_gc_removes_what_nothing_uses(store: Store, tmp_path: Path) -> None:
    kept = add_layer(store, tmp_path, {"a": "1"}, "kept")
    dropped = add_layer(store, tmp_path, {"b": "22"}, "dropped")
    store.remove_image("dropped")
    # leftovers of interrupted commits: a staging dir, a half json, a whole tree without json
    store.new_staging()
    Path(store.root, "tmp", "json-1-abc").write_text("{")
    orphan = "f" * 32
    build_layer({"o": "o"}, Path(store.root, "layers", orphan))
    # a record of a mount whose upper is gone, and one whose upper is there
    live_upper = tmp_path / "live-upper"
    live_upper.mkdir()
    record_layer = add_layer(store, tmp_path, {"r": "r"}, "rec")
    store.remove_image("rec")
    store.put_container(ContainerRecord(container_id(str(live_upper)), "rec", (record_layer,), str(live_upper),
                                        str(tmp_path / "w")))
    store.put_container(ContainerRecord("dead", "rec", (dropped,), str(tmp_path / "gone"), "w"))

    preview = store.gc(dry_run=True)
    assert sorted(preview.removed_layers) == sorted([dropped, orphan])
    assert store.has_layer(dropped)

    report = store.gc()
    assert report.broken == []
    assert sorted(report.removed_layers) == sorted([dropped, orphan])
    assert len(report.removed_staging) == 2
    assert report.removed_records == ["dead"]
    assert report.freed_bytes == 2
    assert os.listdir(Path(store.root, "tmp")) == []
    assert store.layer_digests() == sorted([kept, record_layer])
    assert sorted(os.listdir(Path(store.root, "layers"))) == sorted(
        [kept, kept + ".json", record_layer, record_layer + ".json"])
    assert store.gc().removed_layers == []


def test_gc_removes_read_only_trees(store: Store, tmp_path: Path) -> None:
    digest = add_layer(store, tmp_path, {"d": Dir({"x": "1", "w": WHITEOUT}, mode=0o555)}, "ro")
    store.remove_image("ro")
    assert store.gc().removed_layers == [digest]
    assert not store.tree_exists(digest)


def test_container_records(store: Store, tmp_path: Path) -> None:
    upper = tmp_path / "u"
    upper.mkdir()
    record = ContainerRecord(container_id(str(upper)), "img", ("a" * 32,), str(upper), str(tmp_path / "w"))
    store.put_container(record)
    assert store.container_for(str(upper)) == record
    assert store.container_for(str(tmp_path / "u" / ".." / "u")) == record
    assert store.container_for(str(tmp_path)) is None
    up, work = store.new_container_dirs()
    assert os.path.isdir(up) and os.path.isdir(work)
    assert os.path.dirname(up) == os.path.dirname(work)


def test_layer_meta_json_round_trip(store: Store, tmp_path: Path) -> None:
    digest = add_layer(store, tmp_path, {"a": "xyz", "d": {"w": WHITEOUT}}, "one")
    meta = store.layer(digest)
    assert meta == LayerMeta.from_json(json.loads(Path(store.root, "layers", digest + ".json").read_text()))
    assert (meta.files, meta.dirs, meta.whiteouts, meta.size, meta.parent) == (1, 2, 1, 3, None)
    assert meta.algorithm == "xxh3-128/unionfs-layer-v1"


def test_mount_layers_are_top_down_and_each_once() -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    assert Image("x", (a, b, c)).mount_layers() == [c, b, a]
    assert Image("x", (a, b, a, c, b)).mount_layers() == [b, c, a]


def test_gc_keeps_layers_a_running_mount_uses(store: Store, tmp_path: Path) -> None:
    """A layer mounted without an image record (``--ro``, by hand) or held open by a daemon stays."""
    mounted = add_layer(store, tmp_path, {"m": "1"}, "mounted")
    held = add_layer(store, tmp_path, {"h": "22"}, "held")
    for name in ("mounted", "held"):
        store.remove_image(name)
    (tmp_path / "mnt").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; os.open(sys.argv[1], os.O_RDONLY); "
                               "print('open', flush=True); time.sleep(60)", store.layer_path(held)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        with kernel_overlay_mount([Path(store.layer_path(mounted))], None, None, tmp_path / "mnt"):
            assert store.gc().removed_layers == []
    finally:
        holder.kill()
        holder.wait()
    assert sorted(store.gc().removed_layers) == sorted([mounted, held])

"""unionfs and the container tools read each other's images: podman's saved images pulled and mounted show
what ``podman image mount`` shows; pushed images are read by skopeo, unpacked by umoci to the same tree,
and loaded and run by podman."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from images_support import Podman, mounted_image, ok, run, tiny_rootfs, tree, tree_diff
from support.layers import WHITEOUT, Dir, build_layer


@pytest.mark.parametrize("fmt", ["oci-dir", "docker-archive"])
def test_a_podman_image_pulled_mounts_as_podman_shows_it(podman: Podman, store: Path, tmp_path: Path,
                                                         fmt: str) -> None:
    saved = tmp_path / "saved"
    podman("save", "--format", fmt, "-o", str(saved), "localhost/tiny:2")
    ref = f"oci:{saved}" if fmt == "oci-dir" else f"docker-archive:{saved}"
    out = json.loads(ok(store, "pull", ref, "--image", "tiny", "--json"))
    assert out["layers"] == 2 and out["manifest"].startswith("sha256:")
    merged = Path(podman("image", "mount", "localhost/tiny:2").stdout.strip())
    try:
        expected = tree(merged)
    finally:
        podman("image", "unmount", "localhost/tiny:2")
    with mounted_image(store, "tiny", tmp_path / "mnt") as mnt:
        actual = tree(mnt)
    assert tree_diff(expected, actual) == []
    # what the comparison covers, spelled out
    assert "etc/a2" not in actual and "usr/share/doc/x" not in actual and "usr/share/doc/new/f" in actual
    assert ("security.capability", bytes.fromhex("0100000200200000000000000000000000000000")) in actual["bin/ping"][7]
    assert actual["etc/sub"][2:4] == (12, 34) and actual["bin/ping"][1] == 0o4755
    verify = json.loads(ok(store, "gc", "--dry-run", "--verify", "--json"))  # every layer is named by its digest
    assert verify["broken"] == [] and verify["removed_layers"] == []


def test_pulling_the_same_image_twice_stores_it_once(podman: Podman, store: Path, tmp_path: Path) -> None:
    podman("save", "--format", "oci-dir", "-o", str(tmp_path / "saved"), "localhost/tiny:2")
    first = json.loads(ok(store, "pull", f"oci:{tmp_path / 'saved'}", "--image", "a", "--json"))
    second = json.loads(ok(store, "pull", f"oci:{tmp_path / 'saved'}", "--image", "b", "--json"))
    assert first["new_layers"] == 2 and second["new_layers"] == 0 and second["downloaded"] == 0
    assert first["manifest"] == second["manifest"] and first["id"] == second["id"]


@pytest.fixture
def app_image(store: Path, tmp_path: Path, podman: Podman) -> str:
    """``app``: the tiny rootfs imported with ``import-dir`` plus a committed layer that deletes a hard link,
    replaces a directory (opaque) and sets a command."""
    rootfs = tmp_path / "rootfs"
    tiny_rootfs(rootfs)
    ok(store, "import-dir", str(rootfs), "--image", "base")
    upper = build_layer({"etc": {"a2": WHITEOUT}, "usr/share/doc": Dir(opaque=True, entries={"new": "n\n"})},
                        tmp_path / "upper")
    ok(store, "commit", str(upper), "--image", "app", "--from", "base", "--cmd", "/bin/echo", "hello-from-unionfs")
    return "app"


def test_a_pushed_image_is_read_by_skopeo_umoci_and_podman(app_image: str, podman: Podman, store: Path,
                                                           tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    pushed = json.loads(ok(store, "push", app_image, f"oci:{layout}:v1", "--json"))
    again = json.loads(ok(store, "push", app_image, f"oci:{tmp_path / 'layout2'}:v1", "--json"))
    assert pushed["manifest"] == again["manifest"] and pushed["config"] == again["config"]  # reproducible
    inspect = json.loads(run(["skopeo", "inspect", f"oci:{layout}:v1"]).stdout)
    assert inspect["Digest"] == pushed["manifest"] and len(inspect["Layers"]) == 2
    run(["umoci", "unpack", "--image", f"{layout}:v1", str(tmp_path / "bundle")])
    unpacked = tree(tmp_path / "bundle" / "rootfs", mtimes=False)
    with mounted_image(store, app_image, tmp_path / "mnt") as mnt:
        mounted = tree(mnt, mtimes=False)
    assert tree_diff(mounted, unpacked) == []
    assert "etc/a2" not in unpacked and sorted(p for p in unpacked if p.startswith("usr/share/doc/")) == \
        ["usr/share/doc/new"]

    archive = tmp_path / "app.tar"
    ok(store, "push", app_image, f"docker-archive:{archive}:localhost/app:v1")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"manifest.json", "index.json", "oci-layout"} <= names
    podman("load", "-i", str(archive))
    out = podman("run", "--rm", "localhost/app:v1").stdout
    assert out == "hello-from-unionfs\n"
    podman("rmi", "localhost/app:v1")
    back = json.loads(ok(store, "pull", f"docker-archive:{archive}", "--image", "back", "--json"))
    assert back["config"] == pushed["config"]  # the same layers: the same diff_ids and config
    with mounted_image(store, "back", tmp_path / "mnt2") as mnt:
        assert tree_diff(mounted, tree(mnt, mtimes=False)) == []


def test_an_image_pulled_and_pushed_unchanged_keeps_every_digest(podman: Podman, store: Path,
                                                                 tmp_path: Path) -> None:
    podman("save", "--format", "oci-dir", "-o", str(tmp_path / "saved"), "localhost/tiny:2")
    pulled = json.loads(ok(store, "pull", f"oci:{tmp_path / 'saved'}", "--image", "tiny", "--json"))
    pushed = json.loads(ok(store, "push", "tiny", f"oci-archive:{tmp_path / 'out.tar'}", "--json"))
    assert pushed["manifest"] == pulled["manifest"] and pushed["config"] == pulled["config"]
    assert pushed["reused"] == 2
    from_archive = json.loads(ok(store, "pull", f"oci-archive:{tmp_path / 'out.tar'}", "--image", "x", "--json"))
    assert from_archive["manifest"] == pulled["manifest"] and from_archive["downloaded"] == 0
    inspect = json.loads(run(["skopeo", "inspect", f"oci-archive:{tmp_path / 'out.tar'}"]).stdout)
    original = json.loads(run(["skopeo", "inspect", f"oci:{tmp_path / 'saved'}"]).stdout)
    assert inspect["Layers"] == original["Layers"] and inspect["Digest"] == original["Digest"]
    ok(store, "rmi", "x")
    images = json.loads(ok(store, "images", "--json"))
    assert [i["digest"] for i in images] == [pulled["manifest"]]
    ok(store, "tag", "tiny", "tiny:copy")
    assert {i["name"]: i["digest"] for i in json.loads(ok(store, "images", "--json"))} == \
        {"tiny": pulled["manifest"], "tiny:copy": pulled["manifest"]}


def test_an_image_pushed_with_another_compression_keeps_its_config(podman: Podman, store: Path,
                                                                    tmp_path: Path) -> None:
    podman("save", "--format", "oci-dir", "-o", str(tmp_path / "saved"), "localhost/tiny:2")
    pulled = json.loads(ok(store, "pull", f"oci:{tmp_path / 'saved'}", "--image", "tiny", "--json"))
    pushed = json.loads(ok(store, "push", "tiny", f"oci:{tmp_path / 'z'}:z", "--compression", "zstd", "--json"))
    assert pushed["reused"] == 0 and pushed["manifest"] != pulled["manifest"]

    def config(layout: Path, digest: str) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())
        return loaded
    original, rewritten = config(tmp_path / "saved", pulled["config"]), config(tmp_path / "z", pushed["config"])
    assert rewritten["history"] == original["history"] and rewritten["config"] == original["config"]
    assert rewritten["rootfs"] != original["rootfs"]
    out = podman("run", "--rm", f"oci:{tmp_path / 'z'}:z").stdout
    assert out == "hello from tiny\n"

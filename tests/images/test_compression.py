"""Every layer compression out and back (gzip, zstd, plain tar), reproducible pushes under
SOURCE_DATE_EPOCH, and the platform choice in a multi-platform index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from images_support import member, mounted_image, ok, run, sha, tar_bytes, tree, tree_diff, unionfs
from support.layers import File, build_layer


@pytest.fixture
def image(tools: None, store: Path, tmp_path: Path) -> str:
    layer = build_layer({"etc": {"motd": "hi\n"}, "bin": {"x": File(bytes(range(256)) * 4000, mode=0o755)}},
                        tmp_path / "layer")
    ok(store, "import-dir", str(layer), "--image", "img", "--cmd", "/bin/x")
    return "img"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_each_compression_pushes_and_pulls_back(image: str, store: Path, tmp_path: Path, compression: str) -> None:
    layout = tmp_path / "layout"
    pushed = json.loads(ok(store, "push", image, f"oci:{layout}:c", "--compression", compression, "--json"))
    manifest = json.loads((layout / "blobs" / "sha256" / pushed["manifest"][7:]).read_bytes())
    suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar" + suffix
    inspect = json.loads(run(["skopeo", "inspect", f"oci:{layout}:c"]).stdout)
    assert inspect["Digest"] == pushed["manifest"]
    pulled = json.loads(ok(store, "pull", f"oci:{layout}:c", "--image", "back", "--json"))
    assert pulled["manifest"] == pushed["manifest"]
    with mounted_image(store, image, tmp_path / "m1") as m1:
        original = tree(m1)
    with mounted_image(store, "back", tmp_path / "m2") as m2:
        assert tree_diff(original, tree(m2)) == []


def test_source_date_epoch_makes_pushes_reproducible(image: str, store: Path, tmp_path: Path) -> None:
    env = {"SOURCE_DATE_EPOCH": "1000000000"}
    first = json.loads(ok(store, "push", image, f"oci:{tmp_path / 'a'}:t", "--json", env=env))
    second = json.loads(ok(store, "push", image, f"oci:{tmp_path / 'b'}:t", "--json", env=env))
    assert first["manifest"] == second["manifest"]
    assert sorted(p.name for p in (tmp_path / "a" / "blobs" / "sha256").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "blobs" / "sha256").iterdir())
    config = json.loads((tmp_path / "a" / "blobs" / "sha256" / first["config"][7:]).read_bytes())
    assert config["created"] == "2001-09-09T01:46:40Z"
    bad = unionfs(store, "push", image, f"oci:{tmp_path / 'c'}:t", env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert bad.code == 1 and "SOURCE_DATE_EPOCH" in bad.err and bad.err.count("\n") == 1


def _platform_layout(path: Path) -> dict[str, str]:
    """A layout whose one tag is an index of two platforms, each with a one-file layer naming it."""
    (path / "blobs" / "sha256").mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        (path / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
        return sha(data)

    entries = []
    for arch in ("amd64", "arm64"):
        layer = tar_bytes([member("arch", data=arch.encode())])
        config = json.dumps({"architecture": arch, "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": put(layer),
                        "size": len(layer)}]}).encode()
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
                        "size": len(manifest), "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    top = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                                              "digest": put(index), "size": len(index),
                                              "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}
    (path / "index.json").write_text(json.dumps(top))
    return {e["platform"]["architecture"]: e["digest"] for e in entries}


def test_the_platform_is_chosen_from_an_index(tools: None, store: Path, tmp_path: Path) -> None:
    digests = _platform_layout(tmp_path / "layout")
    ref = f"oci:{tmp_path / 'layout'}:multi"
    arm = json.loads(ok(store, "pull", ref, "--image", "arm", "--platform", "linux/arm64", "--json"))
    assert arm["manifest"] == digests["arm64"]
    with mounted_image(store, "arm", tmp_path / "m") as mnt:
        assert (mnt / "arch").read_text() == "arm64"
    missing = unionfs(store, "pull", ref, "--image", "x", "--platform", "linux/s390x")
    assert missing.code == 1 and "no image for platform linux/s390x" in missing.err
    assert "linux/amd64" in missing.err and "linux/arm64" in missing.err


def test_gc_removes_the_blobs_of_removed_images(image: str, store: Path, tmp_path: Path) -> None:
    ok(store, "push", image, f"oci:{tmp_path / 'layout'}:t")
    ok(store, "pull", f"oci:{tmp_path / 'layout'}:t", "--image", "back")
    kept = sorted(p.name for p in (store / "blobs" / "sha256").iterdir())
    assert len(kept) == 3  # the layer as pulled, its config and manifest
    out = json.loads(ok(store, "gc", "--json"))
    assert out["removed_blobs"] == [] and sorted(p.name for p in (store / "blobs" / "sha256").iterdir()) == kept
    ok(store, "rmi", "back")  # the layer is the original's too (same tree): everything stays
    assert json.loads(ok(store, "gc", "--json"))["removed_blobs"] == []
    ok(store, "rmi", image)
    out = json.loads(ok(store, "gc", "--json"))
    assert sorted(out["removed_blobs"]) == sorted(f"sha256:{n}" for n in kept)
    assert list((store / "blobs" / "sha256").iterdir()) == [] and list((store / "oci" / "images").iterdir()) == []

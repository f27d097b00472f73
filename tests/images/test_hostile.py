"""Every hostile or broken input of a pull is refused with one clear line and exit status 1, and leaves the
store exactly as it was (and nothing written outside it)."""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

import pytest
from images_support import LayoutSpec, gz, member, ok, sha, store_state, tar_bytes, unionfs, write_layout

GOOD = tar_bytes([member("etc", tarfile.DIRTYPE, mode=0o755), member("etc/good", data=b"good\n")])


def hostile_cases(outside: Path) -> dict[str, tuple[LayoutSpec, str]]:
    bad_tar = tar_bytes([member("x", data=b"x")])
    big = gz(tar_bytes([member("big", data=os.urandom(200_000))]))
    cut = big[: len(big) // 2]
    return {
        "absolute name": (LayoutSpec([GOOD, gz(tar_bytes([member("/etc/evil", data=b"e")]))]), "absolute path"),
        "dot-dot name": (LayoutSpec([GOOD, gz(tar_bytes([member("etc/../../evil", data=b"e")]))]), "climbs out"),
        "write through a symlink": (
            LayoutSpec([GOOD, gz(tar_bytes([member("l", tarfile.SYMTYPE, linkname=str(outside)),
                                            member("l/pwned", data=b"p")]))]),
            "written through the symlink"),
        "hard link out of the layer": (
            LayoutSpec([GOOD, gz(tar_bytes([member("h", tarfile.LNKTYPE, linkname="etc/passwd")]))]),
            "points outside the layer"),
        "blob bigger than declared": (
            LayoutSpec([GOOD, gz(bad_tar)], declared=[(sha(GOOD), len(GOOD)), (sha(gz(bad_tar)), 10)]),
            "bigger than its declared size"),
        "truncated blob": (
            LayoutSpec([GOOD, cut], declared=[(sha(GOOD), len(GOOD)), (sha(cut), len(cut))],
                       diff_ids=[sha(GOOD), sha(gzip.decompress(big))]),
            "truncated"),
        "blob shorter than declared": (
            LayoutSpec([GOOD, gz(bad_tar)], declared=[(sha(GOOD), len(GOOD)), (sha(gz(bad_tar)), 10_000)]),
            "truncated"),
        "blob digest mismatch": (
            LayoutSpec([GOOD, gz(bad_tar)], declared=[(sha(GOOD), len(GOOD)), (sha(b"other"), len(gz(bad_tar)))]),
            "digest mismatch"),
        "diff_id mismatch": (LayoutSpec([GOOD, gz(bad_tar)], diff_ids=[sha(GOOD), sha(b"other")]),
                             "diff_id mismatch"),
        "manifest names a missing blob": (LayoutSpec([GOOD, gz(bad_tar)], skip_blobs={1}), "missing blob"),
        "not a tar": (LayoutSpec([GOOD, gz(b"\x00garbage" * 100)]), "tar"),
    }


CASES = list(hostile_cases(Path("/nonexistent")))


@pytest.fixture
def seeded_store(tools: None, store: Path, tmp_path: Path) -> Path:
    """A store that already holds an image, so that "unchanged" means something."""
    write_layout(tmp_path / "seed", LayoutSpec([GOOD]))
    ok(store, "pull", f"oci:{tmp_path / 'seed'}:t", "--image", "seed")
    return store


@pytest.mark.parametrize("case", CASES)
def test_hostile_pull_is_refused_and_changes_nothing(seeded_store: Path, tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    spec, message = hostile_cases(outside)[case]
    write_layout(tmp_path / "layout", spec)
    before = store_state(seeded_store)
    result = unionfs(seeded_store, "pull", f"oci:{tmp_path / 'layout'}:t", "--image", "evil")
    assert result.code == 1, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: error: ") and message in lines[0], result.err
    assert store_state(seeded_store) == before
    assert os.listdir(outside) == []


def test_a_device_is_refused_where_the_process_may_not_make_one(seeded_store: Path, tmp_path: Path) -> None:
    layer = tar_bytes([member("dev", tarfile.DIRTYPE, mode=0o755),
                       member("dev/sda", tarfile.BLKTYPE, major=8, minor=0, mode=0o600)])
    write_layout(tmp_path / "layout", LayoutSpec([GOOD, gz(layer)]))
    before = store_state(seeded_store)
    no_mknod = ["setpriv", "--bounding-set", "-mknod", "--inh-caps", "-mknod"]
    result = unionfs(seeded_store, "pull", f"oci:{tmp_path / 'layout'}:t", "--image", "dev", prefix=no_mknod)
    assert result.code == 1 and result.err.count("\n") == 1 and "may not create devices" in result.err, result
    assert store_state(seeded_store) == before
    ok(seeded_store, "pull", f"oci:{tmp_path / 'layout'}:t", "--image", "dev")  # with CAP_MKNOD it works
    assert (seeded_store / "layers").exists()


def test_bad_references_and_unknown_images_are_one_line_errors(seeded_store: Path, tmp_path: Path) -> None:
    for argv, message in [(["pull", "nosuch:x"], "unknown transport"),
                          (["pull", "docker://noregistry/app"], "must start with a registry host"),
                          (["pull", f"oci:{tmp_path / 'none'}"], "oci:"),
                          (["push", "nosuch", f"oci:{tmp_path / 'out'}"], "unknown image"),
                          (["pull", f"docker-archive:{tmp_path}"], "directory")]:
        before = store_state(seeded_store)
        result = unionfs(seeded_store, *argv)
        assert result.code == 1 and result.err.count("\n") == 1 and message in result.err, (argv, result)
        assert store_state(seeded_store) == before
    assert not (tmp_path / "out").exists()

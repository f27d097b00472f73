"""The image subcommands as a user sees them: listings against hand-built expectations (text and --json),
and every error as one line on stderr with exit status 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.layers import WHITEOUT, File, build_layer

import unionfs.image.commit
import unionfs.image.records
import unionfs.image.store
from mountd.cli.images import main

NOW = "2026-01-02T03:04:05Z"


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(unionfs.image.records, "now", lambda: NOW)
    monkeypatch.setattr(unionfs.image.commit, "now", lambda: NOW)
    monkeypatch.setenv("UNIONFS_STORE", str(tmp_path / "store"))


def fields(line: str) -> list[str]:
    """The columns of a table line (separated by three or more spaces)."""
    return re.split(r" {3,}", line.strip())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    base = build_layer({"etc/passwd": File(b"root\n" * 300), "tmp/junk": File(b"j" * 2048)}, tmp_path / "base")
    upper = build_layer({"etc/passwd": "root\nme\n", "tmp": {"junk": WHITEOUT}}, tmp_path / "upper")
    code, out, _ = run(capsys, "import-dir", str(base), "--image", "base", "-m", "debootstrap",
                       "--cmd", "/bin/sh", "--env", "PATH=/bin")
    assert code == 0
    d1 = out.split()[1]
    code, out, _ = run(capsys, "commit", str(upper), "--image", "app:1", "--from", "base",
                       "--created-by", "apt install me", "--label", "v=1")
    assert code == 0
    return d1, out.split()[1]


def test_commit_and_import_print_the_layer(two_images: tuple[str, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    d1, d2 = two_images
    assert len(d1) == len(d2) == 32
    code, out, err = run(capsys, "commit", str(tmp_path / "upper"), "--image", "again", "--from", "base")
    assert (code, err) == (0, "")
    assert out == f"again {d2}  (layer already in the store: no data written)\n"
    code, out, _ = run(capsys, "commit", str(tmp_path / "upper"), "--image", "j", "--from", "base", "--json")
    data = json.loads(out)
    assert data["layer"] == d2 and data["new_layer"] is False and data["files"] == 1 and data["bytes"] == 8


def test_images(two_images: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with unionfs.image.store.Store(os.environ["UNIONFS_STORE"]) as s:
        ids = {i.name: i.id for i in s.images()}
    code, out, _ = run(capsys, "images")
    assert code == 0
    assert out.splitlines() == [
        "NAME    ID             DIGEST   LAYERS   SIZE      CREATED",
        f"app:1   {ids['app:1'][:12]}   -        2        3.5 KiB   {NOW}",
        f"base    {ids['base'][:12]}   -        1        3.5 KiB   {NOW}",
    ]
    code, out, _ = run(capsys, "images", "--json")
    assert json.loads(out) == [
        {"name": "app:1", "id": ids["app:1"], "layers": 2, "size": 1500 + 2048 + 8, "created": NOW,
         "digest": None},
        {"name": "base", "id": ids["base"], "layers": 1, "size": 1500 + 2048, "created": NOW, "digest": None},
    ]


def test_images_of_an_empty_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "images", "--json") == (0, "[]\n", "")
    assert run(capsys, "images")[1] == "NAME   ID   DIGEST   LAYERS   SIZE   CREATED\n"


def test_history(two_images: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d1, d2 = two_images
    code, out, _ = run(capsys, "history", "app:1")
    assert code == 0
    assert [fields(line) for line in out.splitlines()] == [
        ["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
        [d2[:12], NOW, "apt install me", "8 B"],
        [d1[:12], NOW, f"unionfs import-dir {tmp_path}/base", "3.5 KiB", "debootstrap"],
    ]
    code, out, _ = run(capsys, "history", "app:1", "--json")
    assert json.loads(out) == [
        {"layer": d2, "created": NOW, "created_by": "apt install me", "comment": "", "size": 8},
        {"layer": d1, "created": NOW, "created_by": f"unionfs import-dir {tmp_path}/base",
         "comment": "debootstrap", "size": 3548},
    ]


def test_diff(two_images: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "diff", str(tmp_path / "upper"), "--from", "base")
    assert (code, out) == (0, "C /etc\nC /etc/passwd\nC /tmp\nD /tmp/junk\n")
    code, out, _ = run(capsys, "diff", str(tmp_path / "upper"), "--lowerdir", str(tmp_path / "base"), "--json")
    assert json.loads(out) == [{"kind": "C", "path": "/etc"}, {"kind": "C", "path": "/etc/passwd"},
                               {"kind": "C", "path": "/tmp"}, {"kind": "D", "path": "/tmp/junk"}]


def test_inspect(two_images: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d1, d2 = two_images
    code, out, _ = run(capsys, "inspect", "app:1", "--json")
    assert code == 0
    data = json.loads(out)
    assert [(layer["digest"], layer["added"], layer["modified"], layer["removed"], layer["wasted"])
            for layer in data["layers"]] == [(d1, 4, 0, 0, 1500 + 2048), (d2, 0, 1, 1, 0)]
    assert data["total_bytes"] == 3556 and data["wasted_bytes"] == 3548
    _code, out, _ = run(capsys, "inspect", "app:1")
    assert [fields(line) for line in out.splitlines()] == [
        [f"image app:1  id {data['id'][:12]}"],
        ["LAYER", "SIZE", "ADDED", "MODIFIED", "REMOVED", "WASTED", "CREATED BY"],
        [d1[:12], "3.5 KiB", "4", "0", "0", "3.5 KiB", f"unionfs import-dir {tmp_path}/base"],
        [d2[:12], "8 B", "0", "1", "1", "0 B", "apt install me"],
        ["total 3.5 KiB, wasted 3.5 KiB, efficiency 0.2 %"],
        ["largest wasted paths:"],
        ["BYTES", "LAYER", "PATH"],
        ["2.0 KiB", d1[:12], "/tmp/junk"],
        ["1.5 KiB", d1[:12], "/etc/passwd"],
    ]


def test_rmi_and_gc(two_images: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    _d1, d2 = two_images
    code, out, _ = run(capsys, "rmi", "app:1")
    assert code == 0 and out.startswith("removed app:1 (")
    code, out, _ = run(capsys, "gc", "--dry-run", "--json")
    assert json.loads(out) == {"removed_layers": [d2], "removed_staging": [], "removed_records": [],
                               "removed_cache": [], "freed_bytes": 8, "broken": [], "removed_blobs": []}
    code, out, _ = run(capsys, "gc")
    assert (code, out) == (0, f"removed layer {d2[:12]}\n1 layers, 8 B freed; 0 problems\n")


def test_gc_reports_damage(two_images: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    d1, _ = two_images
    os.unlink(Path(os.environ["UNIONFS_STORE"], "layers", d1 + ".json"))
    code, out, err = run(capsys, "gc", "--dry-run")
    assert code == 1
    assert f"broken: image 'app:1': layer {d1[:12]} is missing" in out.splitlines()
    assert err == "unionfs: error: the store has 2 problems (listed above)\n"


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["history", "nope"], ["inspect", "nope"], ["rmi", "nope"],
                                  ["diff", "/", "--from", "nope"]])
def test_unknown_image(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, *argv) == (1, "", "unionfs: error: unknown image 'nope'\n")


def test_store_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    upper = build_layer({"a": "1"}, tmp_path / "upper")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], check=True)
    try:
        code, out, err = run(capsys, "commit", str(upper), "--image", "x", "--store", str(ro))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)
    assert (code, out) == (1, "")
    assert err == f"unionfs: error: store {ro} is not writable: Read-only file system\n"


def test_upper_not_an_overlay_upper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    upper = build_layer({"d": {}}, tmp_path / "upper")
    os.setxattr(upper / "d", "trusted.overlay.metacopy", b"")
    code, _out, err = run(capsys, "commit", str(upper), "--image", "x")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"unionfs: error: upper {upper} is not a self-contained overlay upper: d carries")
    code, _, err = run(capsys, "commit", str(tmp_path / "missing"), "--image", "x")
    assert (code, err) == (1, f"unionfs: error: upper {tmp_path}/missing: no such directory\n")


def test_bad_key_value_and_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    upper = build_layer({}, tmp_path / "upper")
    assert run(capsys, "import-dir", str(upper), "--image", "x", "--env", "NOEQUALS")[2] == \
        "unionfs: error: --env 'NOEQUALS': expected KEY=VALUE\n"
    assert run(capsys, "import-dir", str(upper), "--image", "bad/name")[2].startswith(
        "unionfs: error: invalid image name 'bad/name'")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["commit", "/x"])
    assert exc.value.code == 2
    assert "--image" in capsys.readouterr().err


def test_names_that_are_not_utf8_are_printed_as_they_are(tmp_path: Path) -> None:
    upper = build_layer({}, tmp_path / "upper")
    (upper / os.fsdecode(b"caf\xe9")).write_text("x")
    proc = subprocess.run([str(Path(sys.prefix) / "bin" / "unionfs"), "diff", str(upper), "--lowerdir",
                           str(build_layer({}, tmp_path / "lower"))], capture_output=True, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"A /caf\xe9\n", b"")

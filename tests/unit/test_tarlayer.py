"""Layer trees ⇄ OCI layer tars, and the blob streams around them: translation of every entry kind, the
canonical (reproducible) export, and every hostile tar refused with nothing written outside the target."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from support.layers import WHITEOUT, Device, Dir, Fifo, File, Hardlink, Symlink, build_layer

from unionfs.image import blobio, tarlayer
from unionfs.image.digest import layer_digest

CAP = bytes.fromhex("0100000200200000000000000000000000000000")
SPEC = {
    "etc": Dir(mode=0o755, entries={"passwd": File(b"root:x:0:0\n"), "shadow": File(b"s", mode=0o640, gid=42)}),
    "bin": {"ping": File(b"\x7fELF", mode=0o4755, xattrs={"security.capability": CAP}),
            "sh": Symlink("busybox"), "busybox": File(b"bb", mode=0o755)},
    "data": {"a": File(b"x" * 70000, uid=1000, gid=1000, xattrs={"user.bin": b"\xff\x00\x80"}),
             "b": Hardlink("data/a")},
    "dev": {"null": Device(1, 3, mode=0o666), "loop9": Device(7, 9, kind="b"), "pipe": Fifo()},
    "gone": WHITEOUT,
    "opq": Dir(opaque=True, entries={"kept": "k"}),
    "d" * 150: {"f" * 150: "long names"},
    "empty": {},
}


def export_bytes(path: Path, clamp: int | None = None) -> bytes:
    out = io.BytesIO()
    tarlayer.export(str(path), out, clamp=clamp)
    return out.getvalue()


def test_export_then_import_gives_the_same_layer(tmp_path: Path) -> None:
    src = build_layer(SPEC, tmp_path / "src")
    data = export_bytes(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    stats = tarlayer.extract(io.BytesIO(data), str(dst))
    assert layer_digest(str(dst)) == layer_digest(str(src))
    assert stats.whiteouts == 2  # .wh.gone and opq/.wh..wh..opq
    assert os.getxattr(dst / "bin" / "ping", "security.capability") == CAP
    assert os.stat(dst / "bin" / "ping").st_mode & 0o7777 == 0o4755
    assert os.stat(dst / "data" / "a").st_ino == os.stat(dst / "data" / "b").st_ino
    assert stat.S_ISCHR(os.lstat(dst / "gone").st_mode) and os.lstat(dst / "gone").st_rdev == 0
    assert os.getxattr(dst / "opq", "trusted.overlay.opaque") == b"y"


def test_the_tar_uses_oci_whiteouts_pax_xattrs_and_numeric_owners(tmp_path: Path) -> None:
    src = build_layer(SPEC, tmp_path / "src")
    with tarfile.open(fileobj=io.BytesIO(export_bytes(src))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    names = [n for n in members if not n.rsplit("/", 1)[-1].startswith(".wh.")]
    assert names == sorted(names, key=lambda n: [os.fsencode(p) for p in n.split("/")])
    assert ".wh.gone" in members and members[".wh.gone"].size == 0
    assert "opq/.wh..wh..opq" in members
    assert members["data/b"].islnk() and members["data/b"].linkname == "data/a"
    assert members["bin/ping"].pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape") == CAP
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    assert members["data/a"].uid == 1000 and members["etc/shadow"].gid == 42
    assert f"{'d' * 150}/{'f' * 150}" in members
    assert not any("trusted.overlay" in k for m in members.values() for k in m.pax_headers)


def test_export_is_reproducible_and_clamps_to_source_date_epoch(tmp_path: Path) -> None:
    src = build_layer(SPEC, tmp_path / "src")
    assert export_bytes(src) == export_bytes(src)
    copy = build_layer(SPEC, tmp_path / "copy")  # other inodes, other creation order on disk
    assert export_bytes(copy) == export_bytes(src)
    clamped = export_bytes(src, clamp=1_000_000)
    with tarfile.open(fileobj=io.BytesIO(clamped)) as tar:
        assert max(m.mtime for m in tar.getmembers()) == 1_000_000


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_blob_streams_round_trip_with_digests(compression: str) -> None:
    payload = os.urandom(3 << 20)
    sink = io.BytesIO()
    blob = blobio.DigestWriter(sink)  # type: ignore[arg-type]
    packer = blobio.compressor(blob, compression)  # type: ignore[arg-type]
    diff = blobio.DigestWriter(packer)  # type: ignore[arg-type]
    diff.write(payload)
    packer.finish()
    data = sink.getvalue()
    reader = blobio.DigestReader(io.BytesIO(data), size=len(data))  # type: ignore[arg-type]
    inner, found = blobio.decompressed(reader)  # type: ignore[arg-type]
    assert found == compression
    tar_reader = blobio.DigestReader(inner)
    assert tar_reader.read() == payload
    assert tar_reader.finish() == diff.digest
    assert reader.finish(expected=blob.digest) == blob.digest


def test_gzip_blobs_have_a_fixed_header() -> None:
    def gz(data: bytes) -> bytes:
        sink = io.BytesIO()
        packer = blobio.compressor(sink, "gzip")  # type: ignore[arg-type]
        packer.write(data)
        packer.finish()
        return sink.getvalue()
    first = gz(b"layer")
    assert first == gz(b"layer")
    assert first[4:8] == b"\0\0\0\0"  # mtime 0
    assert first[3] & 0x08 == 0  # no file name


def test_a_blob_longer_or_shorter_than_declared_is_refused() -> None:
    with pytest.raises(blobio.BlobError, match="bigger than its declared size"):
        blobio.DigestReader(io.BytesIO(b"12345"), size=4).finish()  # type: ignore[arg-type]
    with pytest.raises(blobio.BlobError, match="truncated: 3 of 4"):
        blobio.DigestReader(io.BytesIO(b"123"), size=4).finish()  # type: ignore[arg-type]
    with pytest.raises(blobio.BlobError, match="digest mismatch"):
        blobio.DigestReader(io.BytesIO(b"1234"), size=4).finish("sha256:" + "0" * 64)  # type: ignore[arg-type]
    inner, _ = blobio.decompressed(io.BytesIO(gzip.compress(os.urandom(100000))[:20000]))  # type: ignore[arg-type]
    with pytest.raises(blobio.BlobError, match="truncated gzip"):
        inner.read()


def _tar(*members: tuple[str, bytes, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                data = extra if isinstance(extra, bytes) else extra.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = str(extra)
                if kind == tarfile.CHRTYPE:
                    info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(("members", "message"), [
    ([("/etc/passwd", tarfile.REGTYPE, "x")], "absolute path"),
    ([("a/../../escape", tarfile.REGTYPE, "x")], "climbs out"),
    ([("l", tarfile.SYMTYPE, "OUTSIDE"), ("l/pwned", tarfile.REGTYPE, "x")], "written through the symlink"),
    ([("h", tarfile.LNKTYPE, "etc/passwd")], "points outside the layer"),
    ([("h", tarfile.LNKTYPE, "../../etc/passwd")], "climbs out"),
    ([("f", tarfile.REGTYPE, "x"), ("f/g", tarfile.REGTYPE, "y")], "not a directory"),
    ([("d", tarfile.DIRTYPE, ""), ("d", tarfile.REGTYPE, "y")], "replaces a directory"),
    ([("dir/.wh.", tarfile.REGTYPE, "")], "invalid whiteout"),
])
def test_hostile_tars_are_refused(tmp_path: Path, members: list[tuple[str, bytes, str]], message: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    members = [(n, k, str(outside) if e == "OUTSIDE" else e) for n, k, e in members]
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(tarlayer.LayerError, match=message):
        tarlayer.extract(io.BytesIO(_tar(*members)), str(dst))
    assert os.listdir(outside) == []


def test_a_truncated_tar_is_refused(tmp_path: Path) -> None:
    data = _tar(("big", tarfile.REGTYPE, "z" * 100000))
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(tarlayer.LayerError, match="truncated"):
        tarlayer.extract(io.BytesIO(data[:20000]), str(dst))


def test_whiteout_of_a_name_the_layer_holds_is_dropped(tmp_path: Path) -> None:
    data = _tar(("d", tarfile.DIRTYPE, ""), (".wh.d", tarfile.REGTYPE, ""), ("f", tarfile.REGTYPE, "x"),
                (".wh.f", tarfile.REGTYPE, ""), (".wh.g", tarfile.REGTYPE, ""), ("g", tarfile.REGTYPE, "new"))
    dst = tmp_path / "dst"
    dst.mkdir()
    tarlayer.extract(io.BytesIO(data), str(dst))
    assert os.getxattr(dst / "d", "trusted.overlay.opaque") == b"y"
    assert (dst / "f").read_text() == "x" and (dst / "g").read_text() == "new"
    assert sorted(os.listdir(dst)) == ["d", "f", "g"]


def test_parallel_gzip_bytes_do_not_depend_on_the_thread_count() -> None:
    payload = os.urandom(1 << 20) + bytes(3 << 20) + b"tail"
    outputs = []
    for workers in (1, 2, 3):
        sink = io.BytesIO()
        packer = blobio.ParallelGzip(sink, workers=workers)  # type: ignore[arg-type]
        for i in range(0, len(payload), 300_000):
            packer.write(payload[i:i + 300_000])
        packer.finish()
        outputs.append(sink.getvalue())
    assert outputs[0] == outputs[1] == outputs[2]
    assert gzip.decompress(outputs[0]) == payload
    assert len(outputs[0]) < len(payload) // 3


def test_prefetched_reader_hands_on_data_and_errors() -> None:
    data = os.urandom(5 << 20)
    ahead = blobio.Prefetched(io.BytesIO(data), depth=2)
    assert ahead.read(1000) == data[:1000]
    ahead.finish()
    broken = blobio.Prefetched(blobio.DigestReader(io.BytesIO(data), size=100))  # type: ignore[arg-type]
    with pytest.raises(blobio.BlobError, match="bigger than its declared size"):
        while broken.read(1 << 16):
            pass
    broken.stop()


def test_an_oversized_extended_header_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (tarlayer.MAX_EXTENDED_HEADER + 10)}
        tar.addfile(info, io.BytesIO(b""))
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(tarlayer.LayerError, match="extended tar header"):
        tarlayer.extract(io.BytesIO(buf.getvalue()), str(dst))
    assert os.listdir(dst) == []

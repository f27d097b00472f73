"""Whiteouts and opaque directories: every on-disk format is read, markers never show, both formats are written."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from support.layers import WHITEOUT, Device, Dir, File, build_layer
from unitkit import Env, assert_errno, create_file, host_tree, is_char00, names, xattr

from unionfs.fs import whiteout
from unionfs.fs.fsio import HostDir
from unionfs.fs.whiteout import (
    OPAQUE_MARKER,
    WhiteoutFormat,
    WhiteoutWriter,
    is_marker_name,
    is_private_xattr,
    probe_kernel_format,
    read_layer_dir,
)

BELOW = {"x": "below x\n", "keep": "below keep\n", "d/x": "below d/x\n", "d/keep": "below d/keep\n",
         "sub/deep": "below deep\n", "n/inner/f": "below n/inner/f\n", "n/other": "below n/other\n"}
"""The bottom lower: the names the formats below try to hide."""


# --- how each whiteout format is put on disk (in the directory ``d`` of a layer, for ``name``) --------------

def wh_char00(d: Path, name: str) -> None:
    os.mknod(d / name, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def wh_oci(d: Path, name: str) -> None:
    (d / f".wh.{name}").write_bytes(b"")


def _xwhiteout(prefix: str) -> Callable[[Path, str], None]:
    def make(d: Path, name: str) -> None:
        (d / name).write_bytes(b"")
        os.setxattr(d / name, f"{prefix}.overlay.whiteout", b"y")
        os.setxattr(d, f"{prefix}.overlay.opaque", b"x")
    return make


WHITEOUT_FORMATS = {
    "char00": wh_char00,
    "oci": wh_oci,
    "xattr-trusted": _xwhiteout("trusted"),
    "xattr-user": _xwhiteout("user"),
}


def _opaque_xattr(name: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        os.setxattr(d, name, b"y")
    return make


def opaque_oci(d: Path) -> None:
    (d / OPAQUE_MARKER).write_bytes(b"")


OPAQUE_FORMATS = {
    "trusted.overlay.opaque": _opaque_xattr("trusted.overlay.opaque"),
    "user.overlay.opaque": _opaque_xattr("user.overlay.opaque"),
    "user.fuseoverlayfs.opaque": _opaque_xattr("user.fuseoverlayfs.opaque"),
    ".wh..wh..opq": opaque_oci,
}


def _lowers_with(tmp_path: Path, top: dict[str, object]) -> Env:
    env = Env(tmp_path)
    env.lowers = [build_layer(top, tmp_path / "top"), build_layer(BELOW, tmp_path / "below")]  # type: ignore[arg-type]
    env.upper = build_layer({}, tmp_path / "upper")
    env.work = tmp_path / "work"
    env.work.mkdir()
    return env


# --- reading ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", WHITEOUT_FORMATS)
@pytest.mark.parametrize("where", ["d", "sub"])
def test_every_whiteout_format_hides_the_name_below(tmp_path: Path, fmt: str, where: str) -> None:
    """A whiteout in the top lower (any format) hides the name of the bottom lower: ENOENT, not listed,
    and the marker itself never shows; names it does not cover still merge through."""
    env = _lowers_with(tmp_path, {"d/own": "top own\n", "sub": {}})
    d = env.lowers[0] / where
    victim = "x" if where == "d" else "deep"
    WHITEOUT_FORMATS[fmt](d, victim)
    fs = env.open()
    try:
        assert_errno(errno.ENOENT, fs.getattr, f"{where}/{victim}")
        assert_errno(errno.ENOENT, fs.open, f"{where}/{victim}", os.O_RDONLY)
        listing = names(fs, where)
        assert victim not in listing
        assert not any(n.startswith(".wh.") for n in listing)
        if where == "d":
            assert listing == ["keep", "own"]
        else:
            assert listing == []
    finally:
        env.close_all()


@pytest.mark.parametrize("fmt", WHITEOUT_FORMATS)
def test_every_whiteout_format_hides_a_whole_directory_below(tmp_path: Path, fmt: str) -> None:
    """A whiteout of a directory name hides the directory and its whole subtree."""
    env = _lowers_with(tmp_path, {"n/mine": "t\n"})
    WHITEOUT_FORMATS[fmt](env.lowers[0] / "n", "inner")
    fs = env.open()
    try:
        assert names(fs, "n") == ["mine", "other"]
        assert_errno(errno.ENOENT, fs.getattr, "n/inner")
        assert_errno(errno.ENOENT, fs.getattr, "n/inner/f")
        assert_errno(errno.ENOENT, fs.readdir, "n/inner")
    finally:
        env.close_all()


@pytest.mark.parametrize("fmt", ["xattr-trusted", "xattr-user"])
def test_xattr_whiteout_at_a_layer_root(tmp_path: Path, fmt: str) -> None:
    """The xattr whiteout format works in a layer's root directory too."""
    env = _lowers_with(tmp_path, {"top": "t\n"})
    WHITEOUT_FORMATS[fmt](env.lowers[0], "x")
    fs = env.open()
    try:
        assert names(fs) == ["d", "keep", "n", "sub", "top"]
    finally:
        env.close_all()


@pytest.mark.parametrize("fmt", ["oci", "char00"])
def test_whiteout_at_a_layer_root(tmp_path: Path, fmt: str) -> None:
    """char 0/0 and .wh. whiteouts in a layer's root hide the root names below."""
    env = _lowers_with(tmp_path, {"top": "t\n"})
    WHITEOUT_FORMATS[fmt](env.lowers[0], "x")
    fs = env.open()
    try:
        assert names(fs) == ["d", "keep", "n", "sub", "top"]
    finally:
        env.close_all()


@pytest.mark.parametrize("prefix", ["trusted", "user"])
def test_xattr_whiteout_needs_the_x_mark_on_its_directory(tmp_path: Path, prefix: str) -> None:
    """A zero-size file with ``overlay.whiteout`` in a directory that is NOT marked ``opaque=x`` is a plain file;
    in a marked directory a non-empty file with the xattr is a plain file too."""
    env = _lowers_with(tmp_path, {"d/own": "top own\n", "e/big": "not empty\n"})
    (env.lowers[0] / "d" / "x").write_bytes(b"")
    os.setxattr(env.lowers[0] / "d" / "x", f"{prefix}.overlay.whiteout", b"y")
    os.setxattr(env.lowers[0] / "e", f"{prefix}.overlay.opaque", b"x")
    os.setxattr(env.lowers[0] / "e" / "big", f"{prefix}.overlay.whiteout", b"y")
    fs = env.open()
    try:
        assert names(fs, "d") == ["keep", "own", "x"]
        assert fs.getattr("d/x").st_size == 0
        assert names(fs, "e") == ["big"]
    finally:
        env.close_all()


def test_x_marked_directory_is_not_opaque(tmp_path: Path) -> None:
    """``overlay.opaque=x`` only announces xattr whiteouts; the directory still merges with the ones below."""
    env = _lowers_with(tmp_path, {"d/own": "top own\n"})
    os.setxattr(env.lowers[0] / "d", "trusted.overlay.opaque", b"x")
    fs = env.open()
    try:
        assert names(fs, "d") == ["keep", "own", "x"]
    finally:
        env.close_all()


def test_a_real_character_device_is_not_a_whiteout(tmp_path: Path) -> None:
    """Only device number 0/0 is a whiteout; a char device 1/3 in the top lower hides ``x`` as a device."""
    env = _lowers_with(tmp_path, {"x": Device(1, 3)})
    fs = env.open()
    try:
        attrs = fs.getattr("x")
        assert stat.S_ISCHR(attrs.st_mode) and attrs.st_rdev == os.makedev(1, 3)
        assert "x" in names(fs)
    finally:
        env.close_all()


@pytest.mark.parametrize("fmt", OPAQUE_FORMATS)
def test_every_opaque_format_hides_the_lower_directory(tmp_path: Path, fmt: str) -> None:
    """An opaque directory (any format) shows only its own entries; the marker never shows."""
    env = _lowers_with(tmp_path, {"d/own": "top own\n"})
    OPAQUE_FORMATS[fmt](env.lowers[0] / "d")
    fs = env.open()
    try:
        assert names(fs, "d") == ["own"]
        assert_errno(errno.ENOENT, fs.getattr, "d/x")
        assert_errno(errno.ENOENT, fs.getattr, f"d/{OPAQUE_MARKER}")
        assert names(fs) == ["d", "keep", "n", "sub", "x"]
    finally:
        env.close_all()


@pytest.mark.parametrize("writer", ["kernel", "oci"])
@pytest.mark.parametrize("fmt", OPAQUE_FORMATS)
def test_opaque_directory_in_the_upper(tmp_path: Path, fmt: str, writer: str) -> None:
    """An opaque directory already in the upper (any format, whatever format the union writes) hides the
    lowers' copies the same way."""
    env = _lowers_with(tmp_path, {"top": "t\n"})
    (env.upper / "d").mkdir()  # type: ignore[operator]
    (env.upper / "d" / "mine").write_text("mine\n")  # type: ignore[operator]
    OPAQUE_FORMATS[fmt](env.upper / "d")  # type: ignore[operator]
    fs = env.open(whiteout=writer)
    try:
        assert names(fs, "d") == ["mine"]
    finally:
        env.close_all()


@pytest.mark.parametrize("writer", ["kernel", "oci"])
@pytest.mark.parametrize("fmt", WHITEOUT_FORMATS)
def test_whiteout_in_the_upper(tmp_path: Path, fmt: str, writer: str) -> None:
    """A whiteout already in the upper (any format, whatever format the union writes) hides the lower
    name."""
    env = _lowers_with(tmp_path, {"top": "t\n"})
    (env.upper / "d").mkdir()  # type: ignore[operator]
    WHITEOUT_FORMATS[fmt](env.upper / "d", "x")  # type: ignore[operator]
    fs = env.open(whiteout=writer)
    try:
        assert names(fs, "d") == ["keep"]
        assert_errno(errno.ENOENT, fs.getattr, "d/x")
    finally:
        env.close_all()


def test_whiteout_in_a_middle_layer_hides_only_what_is_below(tmp_path: Path) -> None:
    """Three lowers: a whiteout in the middle hides the bottom's name; the top's copy of the name still shows."""
    top = build_layer({"d/x": "top x\n"}, tmp_path / "l0")
    mid = build_layer({"d/x": WHITEOUT, "d/y": WHITEOUT}, tmp_path / "l1")
    bottom = build_layer({"d/x": "bottom x\n", "d/y": "bottom y\n", "d/z": "bottom z\n"}, tmp_path / "l2")
    env = Env(tmp_path, [top, mid, bottom])
    fs = env.open()
    try:
        assert names(fs, "d") == ["x", "z"]
        assert fs.getattr("d/x").st_size == len("top x\n")
    finally:
        env.close_all()


def test_read_layer_dir_reports_formats(tmp_path: Path) -> None:
    """read_layer_dir: whiteouts of every format are whiteouts, markers are not entries, opacity is seen."""
    layer = build_layer({"d": Dir({"f": "f", "e": {}}, opaque=True)}, tmp_path / "l", whiteouts="oci")
    d = layer / "d"
    wh_char00(d, "gone-char")
    wh_oci(d, "gone-oci")
    host = HostDir(str(layer))
    try:
        scan = read_layer_dir(host, "d")
        assert scan.opaque
        assert scan.entries == {"f": stat.S_IFREG, "e": stat.S_IFDIR}
        assert scan.whiteouts == {"gone-char", "gone-oci"}
        assert set(scan.inos) == {"f", "e"}
    finally:
        host.close()


def test_marker_and_private_names() -> None:
    """`.wh.` names are markers; overlay-private xattr namespaces are recognised, user.* ones are not."""
    assert is_marker_name(".wh.x") and is_marker_name(OPAQUE_MARKER) and not is_marker_name("x.wh.")
    for name in ("trusted.overlay.opaque", "user.overlay.origin", "user.fuseoverlayfs.opaque",
                 "trusted.unionfs.origin", "user.unionfs.origin"):
        assert is_private_xattr(name)
    for name in ("user.mine", "security.selinux", "trusted.other", "user.overlayx"):
        assert not is_private_xattr(name)


# --- writing ----------------------------------------------------------------------------------------------

def test_kernel_format_writes_char_devices_and_trusted_opaque(tmp_path: Path, mkenv: Callable[..., Env]) -> None:
    """whiteout="kernel": unlink/rmdir of lower names leave char 0/0 devices; a recreated directory carries
    trusted.overlay.opaque=y; no ``.wh.`` files anywhere."""
    env = mkenv([{"f": "f\n", "d/x": "x\n", "e": {}}])
    fs = env.open(whiteout="kernel")
    fs.unlink("f")
    fs.unlink("d/x")
    fs.rmdir("d")
    fs.mkdir("d", 0o755)
    fs.rmdir("e")
    up = env.upper
    assert up is not None
    assert is_char00(up / "f") and is_char00(up / "e")
    assert stat.S_ISDIR(os.lstat(up / "d").st_mode)
    assert xattr(up / "d", "trusted.overlay.opaque") == b"y"
    assert not any(".wh." in p for p in host_tree(up))
    assert os.listdir(up / "d") == []
    assert names(fs) == ["d"]


def test_oci_format_writes_wh_files_and_opaque_marker(mkenv: Callable[..., Env]) -> None:
    """whiteout="oci": ``.wh.NAME`` files, a ``.wh..wh..opq`` file in a recreated directory, no char devices,
    no trusted.overlay.opaque; the union still hides them all."""
    env = mkenv([{"f": "f\n", "d/x": "x\n", "e": {}}], fmt="oci")
    fs = env.open(whiteout="oci")
    fs.unlink("f")
    fs.unlink("d/x")
    fs.rmdir("d")
    fs.mkdir("d", 0o755)
    fs.rmdir("e")
    up = env.upper
    assert up is not None
    tree = host_tree(up)
    assert tree == {".wh.f": "file", ".wh.e": "file", "d": "dir", f"d/{OPAQUE_MARKER}": "file"}
    assert xattr(up / "d", "trusted.overlay.opaque") is None
    assert names(fs) == ["d"] and names(fs, "d") == []
    fs2 = env.remount(fs, whiteout="oci")
    assert names(fs2) == ["d"] and names(fs2, "d") == []


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_recreating_a_whited_out_name_removes_the_whiteout(mkenv: Callable[..., Env], fmt: str) -> None:
    """Creating a file over a whiteout leaves the new file and no whiteout of either format."""
    env = mkenv([{"f": "old\n"}], fmt=fmt)
    fs = env.open(whiteout=fmt)
    fs.unlink("f")
    create_file(fs, "f", b"new\n")
    assert host_tree(env.upper) == {"f": "file"}  # type: ignore[arg-type]
    assert (env.upper / "f").read_bytes() == b"new\n"  # type: ignore[operator]


def test_writer_probe_and_paths(tmp_path: Path) -> None:
    """As root the kernel format can be written; the probe leaves nothing behind; whiteout paths per format."""
    work_dir = tmp_path / "w"
    (work_dir / "work").mkdir(parents=True)
    up_dir = tmp_path / "u"
    up_dir.mkdir()
    work, upper = HostDir(str(work_dir)), HostDir(str(up_dir))
    try:
        assert probe_kernel_format(work, "work")
        assert os.listdir(work_dir / "work") == []
        assert WhiteoutWriter(WhiteoutFormat.KERNEL, upper, work, "work").whiteout_rel("a/b") == "a/b"
        assert WhiteoutWriter(WhiteoutFormat.OCI, upper, work, "work").whiteout_rel("a/b") == "a/.wh.b"
        assert WhiteoutWriter(WhiteoutFormat.OCI, upper, work, "work").whiteout_rel("b") == ".wh.b"
    finally:
        work.close()
        upper.close()


@pytest.mark.parametrize("fmt", [WhiteoutFormat.KERNEL, WhiteoutFormat.OCI])
def test_remove_whiteout_leaves_real_files_alone(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    """remove_whiteout deletes a whiteout of the writer's format (and a char 0/0 one in either) but never a
    real file of that name."""
    up_dir = build_layer({"real": File("data"), ".wh.real": File("")}, tmp_path / "u")
    wh_char00(up_dir, "gone")
    wh_oci(up_dir, "also")
    (tmp_path / "w" / "work").mkdir(parents=True)
    work, upper = HostDir(str(tmp_path / "w")), HostDir(str(up_dir))
    try:
        writer = WhiteoutWriter(fmt, upper, work, "work")
        assert writer.remove_whiteout("gone")
        if fmt is WhiteoutFormat.OCI:
            assert writer.remove_whiteout("also")
            assert writer.remove_whiteout("real")
            assert sorted(os.listdir(up_dir)) == ["real"]
        else:
            assert not writer.remove_whiteout("real")
            assert sorted(os.listdir(up_dir)) == [".wh.also", ".wh.real", "real"]
    finally:
        work.close()
        upper.close()


def test_the_marker_classifier_names_every_format(tmp_path: Path) -> None:
    """One classifier for every reader: marker names, a directory's opaque value, whiteout entries."""
    assert whiteout.marker_name(".wh..wh..opq") == (True, "")
    assert whiteout.marker_name(".wh.gone") == (False, "gone")
    assert whiteout.marker_name("plain") is None
    assert whiteout.dir_marks(b"y") == (True, False)
    assert whiteout.dir_marks(b"x") == (False, True)
    assert whiteout.dir_marks(None) == (False, False)
    os.mknod(tmp_path / "dev", stat.S_IFCHR, 0)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "full").write_bytes(b"x")
    marked = {"trusted.overlay.whiteout"}.__contains__
    assert whiteout.is_whiteout(os.lstat(tmp_path / "dev"), None)
    assert whiteout.is_whiteout(os.lstat(tmp_path / "empty"), marked)
    assert not whiteout.is_whiteout(os.lstat(tmp_path / "empty"), None), "xattr whiteouts only where marked"
    assert not whiteout.is_whiteout(os.lstat(tmp_path / "full"), marked), "an xattr whiteout is empty"
    assert not whiteout.is_whiteout(os.lstat(tmp_path / "empty"), set().__contains__)


def test_the_opaque_writer_falls_back_to_the_user_namespace_once() -> None:
    written: list[tuple[str, bytes]] = []

    def setxattr(attr: str, value: bytes) -> None:
        if attr.startswith("trusted."):
            raise PermissionError(errno.EPERM, "no trusted xattrs here")
        written.append((attr, value))

    attr = whiteout.write_opaque_xattr(setxattr)
    assert attr == "user.overlay.opaque" and written == [("user.overlay.opaque", b"y")]
    assert whiteout.write_opaque_xattr(setxattr, attr) == attr and len(written) == 2

    def refuses(attr: str, value: bytes) -> None:
        raise PermissionError(errno.EPERM, "no xattrs at all")

    with pytest.raises(PermissionError):
        whiteout.write_opaque_xattr(refuses)

"""Commit and import: the layer holds exactly the upper (normalised to the kernel format), identical content
is stored once, a killed commit leaves the store consistent, and every refusal is one clear message."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from support.image_specs import layer_specs
from support.layers import WHITEOUT, Device, Dir, Fifo, File, Hardlink, Symlink, build_layer, copy_tree
from support.mounts import kernel_overlay_mount
from support.snapshot import upper_snapshot

import unionfs.image.commit as commit_mod
from unionfs.image.commit import MOUNTED_MESSAGE, CommitError, commit_layer, commit_upper, import_dir
from unionfs.image.digest import KEEP_FILE_MAX, layer_digest
from unionfs.image.records import ContainerRecord, container_id
from unionfs.image.store import Store, StoreError
from unionfs.progress import TerminalProgress, for_stream

if TYPE_CHECKING:
    from unionfs.fs.attr import Attr
    from unionfs.fs.union import UnionFS

UPPER = {
    "etc": Dir({"passwd": File(b"root\nme\n", mode=0o644), "shadow": WHITEOUT}),
    "usr/bin/tool": File(b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000, xattrs={"user.x": b"1"}),
    "usr/bin/tool2": Hardlink("usr/bin/tool"),
    "var": Dir({"cache": Dir({"new": "n"}, opaque=True, mode=0o700)}),
    "link": Symlink("usr/bin/tool"),
    "fifo": Fifo(mode=0o600),
    "dev/tty9": Device(4, 9),
    "big": File(b"z" * (3 << 20)),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(str(tmp_path / "store"), writable=True) as s:
        yield s


def layer_is_kernel_format(layer: Path) -> bool:
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in dirnames + filenames:
            if name.startswith(".wh."):
                return False
            if "user.overlay.opaque" in os.listxattr(os.path.join(dirpath, name), follow_symlinks=False):
                return False
    return True


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_the_layer_holds_the_upper_in_kernel_format(store: Store, tmp_path: Path, fmt: str) -> None:
    upper = build_layer(UPPER, tmp_path / "upper", whiteouts=fmt)  # type: ignore[arg-type]
    result = commit_upper(store, str(upper), image="img")
    layer = Path(store.layer_path(result.digest))
    assert upper_snapshot(layer) == upper_snapshot(upper)
    assert layer_digest(str(layer)) == result.digest
    assert layer_is_kernel_format(layer)
    assert stat.S_ISCHR(os.lstat(layer / "etc/shadow").st_mode)
    assert os.getxattr(layer / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.lstat(layer / "usr/bin/tool").st_ino == os.lstat(layer / "usr/bin/tool2").st_ino
    assert result.new_layer and result.files == 4 and result.nbytes == (3 << 20) + 8 + 10 + 1
    assert os.listdir(Path(store.root, "tmp")) == []


@given(layer_specs(upper=True))
def test_any_upper_is_kept_exactly(spec: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp, Store(os.path.join(tmp, "store"), writable=True) as s:
        for fmt in ("kernel", "oci"):
            upper = build_layer(spec, Path(tmp, fmt), whiteouts=fmt)  # type: ignore[arg-type]
            result = commit_upper(s, str(upper), image=f"img-{fmt}")
            layer = Path(s.layer_path(result.digest))
            assert upper_snapshot(layer) == upper_snapshot(upper)
            assert layer_digest(str(layer)) == result.digest
        assert s.image("img-kernel").layers == s.image("img-oci").layers
        assert s.check(verify=True) == []


def test_sparse_files_stay_sparse(store: Store, tmp_path: Path) -> None:
    upper = build_layer({}, tmp_path / "upper")
    with open(upper / "disk.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"x")
    result = import_dir(store, str(upper), image="sparse")
    copy = Path(store.layer_path(result.digest), "disk.img")
    assert copy.stat().st_size == 64 << 20
    assert copy.stat().st_blocks * 512 < 1 << 20


def test_sockets_are_skipped_and_reported(store: Store, tmp_path: Path) -> None:
    upper = build_layer({"run": {}}, tmp_path / "upper")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(upper / "run/app.sock"))
        result = commit_upper(store, str(upper), image="img")
    finally:
        sock.close()
    assert result.sockets == ("run/app.sock",)
    assert os.listdir(Path(store.layer_path(result.digest), "run")) == []


# -- dedup -------------------------------------------------------------------------------------------------

def test_a_second_commit_of_the_same_content_writes_no_data(store: Store, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    upper = build_layer(UPPER, tmp_path / "upper")
    first = commit_upper(store, str(upper), image="one")
    layer = Path(store.layer_path(first.digest))
    before = (layer.stat().st_ino, (layer / "big").stat().st_ino, (layer / "big").stat().st_ctime_ns)

    def no_staging(*args: object, **kwargs: object) -> str:
        raise AssertionError("a deduplicated commit must not stage anything")

    monkeypatch.setattr(Store, "new_staging", no_staging)
    again = commit_upper(store, str(upper), image="two")
    elsewhere = commit_upper(store, str(copy_tree(upper, tmp_path / "copy")), image="three")
    assert again.digest == elsewhere.digest == first.digest
    assert not again.new_layer and not elsewhere.new_layer
    assert before == (layer.stat().st_ino, (layer / "big").stat().st_ino, (layer / "big").stat().st_ctime_ns)
    assert store.layer_digests() == [first.digest]


def test_a_tree_left_without_its_json_is_adopted(store: Store, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    upper = build_layer(UPPER, tmp_path / "upper")
    first = commit_upper(store, str(upper), image="one")
    store.remove_image("one")
    Path(store.root, "layers", first.digest + ".json").unlink()  # as if killed between rename and json
    monkeypatch.setattr(Store, "new_staging", lambda *a, **k: pytest.fail("the whole tree is there"))
    again = commit_upper(store, str(upper), image="two")
    assert again.digest == first.digest and not again.new_layer
    assert store.check(verify=True) == []


# -- bases and images --------------------------------------------------------------------------------------

def test_commit_on_a_base_image(store: Store, tmp_path: Path) -> None:
    base = import_dir(store, str(build_layer({"etc/passwd": "root\n"}, tmp_path / "base")), image="base",
                      comment="the base", changes=commit_mod.ConfigChanges(cmd=("/bin/sh",), env=("A=1",)))
    upper = build_layer(UPPER, tmp_path / "upper")
    result = commit_upper(store, str(upper), image="app:1", base_image="base", comment="add tool",
                          created_by="make install",
                          changes=commit_mod.ConfigChanges(env=("B=2",), labels=(("v", "1"),)))
    image = store.image("app:1")
    assert image.layers == (base.digest, result.digest)
    assert [(h.layer, h.created_by, h.comment) for h in image.history] == [
        (base.digest, f"unionfs import-dir {tmp_path / 'base'}", "the base"),
        (result.digest, "make install", "add tool")]
    assert image.config.cmd == ("/bin/sh",) and image.config.env == ("A=1", "B=2")
    assert image.config.labels == (("v", "1"),)
    assert store.layer(result.digest).parent == base.digest


def test_the_base_recorded_for_an_upper_is_used(store: Store, tmp_path: Path) -> None:
    base = import_dir(store, str(build_layer({"a": "1"}, tmp_path / "base")), image="base")
    upper = build_layer({"b": "2"}, tmp_path / "upper")
    store.put_container(ContainerRecord(container_id(str(upper)), "base", (base.digest,), str(upper),
                                        str(tmp_path / "work")))
    result = commit_upper(store, str(upper), image="next")
    assert store.image("next").layers == (base.digest, result.digest)
    store.remove_image("base")  # the record's layers still count, history comes from layer metadata
    commit_upper(store, str(upper), image="next2")
    assert store.image("next2").layers == (base.digest, result.digest)
    assert store.image("next2").history[0].created_by == f"unionfs import-dir {tmp_path / 'base'}"


# -- refusals ----------------------------------------------------------------------------------------------

def test_unknown_base_image_writes_nothing(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unknown image 'nope'"):
        commit_upper(store, str(build_layer({"a": "1"}, tmp_path / "u")), image="x", base_image="nope")
    assert store.layer_digests() == [] and store.images() == []


def test_bad_image_name(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="invalid image name 'a/b'"):
        commit_upper(store, str(build_layer({}, tmp_path / "u")), image="a/b")


def test_upper_missing_or_not_a_directory(store: Store, tmp_path: Path) -> None:
    with pytest.raises(CommitError, match=f"^upper {tmp_path}/nope: no such directory$"):
        commit_upper(store, str(tmp_path / "nope"), image="x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CommitError, match=r"not a directory$"):
        commit_upper(store, str(tmp_path / "file"), image="x")
    with pytest.raises(CommitError, match=r"^directory .*/nope: no such directory$"):
        import_dir(store, str(tmp_path / "nope"), image="x")


def test_upper_overlapping_the_store(store: Store, tmp_path: Path) -> None:
    with pytest.raises(CommitError, match="overlaps the store"):
        commit_upper(store, str(tmp_path), image="x")
    with pytest.raises(CommitError, match="overlaps the store"):
        commit_upper(store, os.path.join(store.root, "layers"), image="x")


def test_an_upper_a_kernel_mount_uses_is_refused(store: Store, tmp_path: Path) -> None:
    lower = build_layer({"a": "1"}, tmp_path / "lower")
    upper = build_layer({}, tmp_path / "upper")
    (tmp_path / "work").mkdir()
    (tmp_path / "mnt").mkdir()
    with kernel_overlay_mount([lower], upper, tmp_path / "work", tmp_path / "mnt") as mnt:
        with pytest.raises(CommitError) as exc:
            commit_upper(store, str(upper), image="x")
        assert str(exc.value) == (f"upper {upper} is in use by {mnt} (the kernel's overlayfs): "
                                  f"{MOUNTED_MESSAGE}")
        with pytest.raises(CommitError) as exc:
            commit_upper(store, str(mnt), image="x")
        assert str(exc.value) == f"{mnt} is a union mount (upper {upper}): {MOUNTED_MESSAGE}"
    assert store.layer_digests() == []


def test_a_read_only_union_mount_has_nothing_to_commit(store: Store, tmp_path: Path) -> None:
    lower = build_layer({"a": "1"}, tmp_path / "lower")
    (tmp_path / "mnt").mkdir()
    with kernel_overlay_mount([lower], None, None, tmp_path / "mnt") as mnt, \
            pytest.raises(CommitError, match="is a read-only union mount: it has no upper dir to commit"):
        commit_upper(store, str(mnt), image="x")


def test_an_upper_a_daemon_uses_is_refused(store: Store, tmp_path: Path) -> None:
    """A process with the fuse-overlayfs command line naming the upper (a daemon, or one starting)."""
    upper = build_layer({}, tmp_path / "upper")
    opts = f"lowerdir={tmp_path}/l,upperdir={upper},workdir={tmp_path}/w"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-o", opts,
                             str(tmp_path / "mnt")])
    try:
        deadline = time.monotonic() + 5
        while b"upperdir" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(CommitError, match=f"in use by {tmp_path}/mnt \\(process {proc.pid}\\)"):
            commit_upper(store, str(upper), image="x")
    finally:
        proc.kill()
        proc.wait()


def test_an_upper_whose_workdir_is_locked_is_refused(store: Store, tmp_path: Path) -> None:
    """The record of ``unionfs mount`` names the workdir; a running daemon holds its lock."""
    upper = build_layer({}, tmp_path / "upper")
    work = tmp_path / "work"
    work.mkdir()
    store.put_container(ContainerRecord(container_id(str(upper)), "x", (), str(upper), str(work)))
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CommitError) as exc:
            commit_upper(store, str(upper), image="x")
        assert str(exc.value) == (f"upper {upper} is in use by a unionfs daemon (workdir {work} is locked): "
                                  f"{MOUNTED_MESSAGE}")
    finally:
        os.close(fd)
    commit_upper(store, str(upper), image="x")  # unlocked: fine


def test_a_redirect_upper_is_not_self_contained(store: Store, tmp_path: Path) -> None:
    upper = build_layer({"moved": {"x": "1"}}, tmp_path / "upper")
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(CommitError, match="is not a self-contained overlay upper: moved carries an overlay"):
        commit_upper(store, str(upper), image="x")
    assert store.layer_digests() == []


def test_a_mount_inside_the_upper_is_refused(store: Store, tmp_path: Path) -> None:
    upper = build_layer({"proc": {}}, tmp_path / "upper")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(upper / "proc")], check=True)
    try:
        with pytest.raises(CommitError, match="proc: another filesystem is mounted inside the upper"):
            commit_upper(store, str(upper), image="x")
    finally:
        subprocess.run(["umount", "-l", str(upper / "proc")], check=True)


def test_a_file_changed_during_the_commit_fails_it_cleanly(store: Store, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A file too large to be kept by the read pass is read again while copied; a change in between (same
    size: only the content check can see it) fails the commit and leaves nothing."""
    size = KEEP_FILE_MAX + 1
    upper = build_layer({"a": File(b"o" * size), "b": "other"}, tmp_path / "upper")
    real_hash = commit_mod.hash_file

    def changing(fd: int, size: int, **kwargs: object) -> tuple[str, int]:
        if kwargs.get("sink", -1) != -1:
            (upper / "a").write_bytes(b"C" * size)
        return real_hash(fd, size, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(commit_mod, "hash_file", changing)
    with pytest.raises(CommitError, match=r"^a changed while it was being committed; try again$"):
        commit_upper(store, str(upper), image="x")
    assert store.layer_digests() == [] and store.images() == []
    assert os.listdir(Path(store.root, "tmp")) == []


def test_small_files_are_written_as_they_were_hashed(store: Store, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file changed between the passes: the layer holds the content its digest was made from."""
    upper = build_layer({"a": "original", "b": "other"}, tmp_path / "upper")
    real_stage = commit_mod._Stager.run

    def change_then_stage(self: commit_mod._Stager) -> None:
        (upper / "a").write_bytes(b"CHANGED!")
        real_stage(self)

    monkeypatch.setattr(commit_mod._Stager, "run", change_then_stage)
    result = commit_upper(store, str(upper), image="x")
    assert Path(store.layer_path(result.digest), "a").read_bytes() == b"original"
    assert store.check(verify=True) == []


# -- progress ----------------------------------------------------------------------------------------------

class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_only(store: Store, tmp_path: Path) -> None:
    assert type(for_stream(io.StringIO())).__name__ == "Progress"
    tty = FakeTty()
    progress = for_stream(tty)
    assert isinstance(progress, TerminalProgress)
    import_dir(store, str(build_layer(UPPER, tmp_path / "u")), image="x", progress=progress)
    out = tty.getvalue()
    assert "reading" in out and "copying" in out and "16/16 files" in out and "3.0 MiB/3.0 MiB" in out
    assert out.endswith("\r")


# -- crash safety ------------------------------------------------------------------------------------------

COMMIT_SCRIPT = """
import sys
from unionfs.image.store import Store
from unionfs.image.commit import commit_upper
print("ready", flush=True)
with Store(sys.argv[1], writable=True) as s:
    commit_upper(s, sys.argv[2], image=sys.argv[3])
"""


def _crash_upper(path: Path, variant: int) -> Path:
    spec: dict[str, object] = {f"d{i}/f{j}": File(bytes([i, j]) * 50) for i in range(30) for j in range(40)}
    spec["big"] = File(b"b" * (8 << 20))
    spec["variant"] = str(variant)
    spec["w"] = WHITEOUT
    spec["o"] = Dir({"x": "1"}, opaque=True)
    return build_layer(spec, path)  # type: ignore[arg-type]


def _start_commit(root: str, upper: Path, image: str) -> subprocess.Popen[bytes]:
    """A commit in a child process, returned once its imports are done (it is about to open the store)."""
    proc = subprocess.Popen([sys.executable, "-c", COMMIT_SCRIPT, root, str(upper), image],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def _whole_trees(root: str, checked: set[str]) -> None:
    """Every layer tree, with or without its json, is whole: its digest is its name."""
    for name in os.listdir(os.path.join(root, "layers")):
        if not name.endswith(".json") and name not in checked:
            assert layer_digest(os.path.join(root, "layers", name)) == name
            checked.add(name)


KILLS = 8


def test_killed_commits_leave_the_store_consistent(tmp_path: Path) -> None:
    """SIGKILL a commit at a random instant of its work, until that has happened KILLS times: never a
    partial layer or image, gc finds nothing broken, and a later commit of the same content succeeds with
    the same digest."""
    root = str(tmp_path / "store")
    seed = int(os.environ.get("CRASH_SEED", "1234"))
    rng = random.Random(seed)
    proc = _start_commit(root, _crash_upper(tmp_path / "u-ref", 0), "ref")
    started = time.monotonic()
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    duration = time.monotonic() - started
    kills = attempt = 0
    checked: set[str] = set()
    while kills < KILLS and attempt < 4 * KILLS:
        attempt += 1
        upper = _crash_upper(tmp_path / f"u{attempt}", attempt)
        proc = _start_commit(root, upper, f"img{attempt}")
        time.sleep(rng.uniform(0.0, duration))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        kills += code == -signal.SIGKILL
        with Store(root) as s:
            assert s.check() == [], f"seed {seed}, attempt {attempt}"
            _whole_trees(root, checked)
            if code == 0:  # a killed one may have finished just before the signal
                assert f"img{attempt}" in {i.name for i in s.images()}
        shutil.rmtree(upper)
    assert kills == KILLS, f"only {kills} of {attempt} commits were killed (seed {seed})"
    with Store(root, writable=True) as s:
        report = s.gc()
        assert report.broken == []
        assert os.listdir(os.path.join(root, "tmp")) == []
        again = _crash_upper(tmp_path / "again", 3)
        result = commit_upper(s, str(again), image="final")
        assert result.digest == layer_digest(str(again))
        assert s.check(verify=True) == []


def _core_entries(fs: UnionFS) -> Iterator[tuple[str, Attr, bytes]]:
    """Every name the union ``fs`` shows (through the core's facade, no mount): path, attributes, and a
    regular file's data (b"" for the others)."""
    todo = [""]
    while todo:
        rel = todo.pop()
        for name, _kind, _ino in fs.readdir(rel):
            path = f"{rel}/{name}" if rel else name
            attrs = fs.getattr(path)
            data = b""
            if stat.S_ISREG(attrs.st_mode):
                handle = fs.open(path, os.O_RDONLY)
                data = fs.read(handle, 1 << 20, 0)
                fs.release(handle)
            elif stat.S_ISDIR(attrs.st_mode):
                todo.append(path)
            yield path, attrs, data


def _union_tree(lowers: list[str], upper: str | None = None) -> dict[str, object]:
    """What a union of ``lowers`` (top first, with ``upper`` on top) shows: path → (kind bits, mode, data)."""
    from unionfs.fs.layers import LayerStack
    from unionfs.fs.union import UnionFS

    stack = LayerStack.open(lowers=[*([upper] if upper else []), *lowers], upper=None, work=None)
    fs = UnionFS(stack)
    try:
        return {path: (stat.S_IFMT(attrs.st_mode), stat.S_IMODE(attrs.st_mode), data)
                for path, attrs, data in _core_entries(fs)}
    finally:
        fs.close()


def _renaming_union(lowers: list[str], tmp_path: Path, *, index: bool = False) -> tuple[UnionFS, Path]:
    """A union of unionfs's core over ``lowers`` (top first) with a fresh upper dir (returned too) where
    directories with lower copies rename (``redirect_dir=on``); ``index``: ``index=on`` too."""
    from unionfs.fs.layers import LayerStack
    from unionfs.fs.union import UnionFS

    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    stack = LayerStack.open(lowers=lowers, upper=str(upper), work=str(work))
    return UnionFS(stack, redirect_dir="on", index=index), upper


def test_a_renamed_dir_is_flattened_into_a_whiteout_and_an_opaque_copy(store: Store, tmp_path: Path) -> None:
    """An upper where directories with lower copies were renamed (redirect_dir=on: redirects, relative and
    absolute, nested) commits on its base as a layer without any redirect: a whiteout at each old name and a
    full opaque copy at the new one, so the image shows the same tree as the union did."""
    base = import_dir(store, str(build_layer({"src/f": File("f\n", mode=0o640), "src/sub/g": "g\n",
                                              "src/big": File(b"b" * (KEEP_FILE_MAX + 1)),
                                              "keep/k": "k\n"}, tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path)
    try:
        fs.rename("src", "moved")
        fs.rename("moved/sub", "keep/sub2")
        handle = fs.create("moved/new", os.O_WRONLY | os.O_CREAT, 0o644)
        fs.write(handle, b"new\n", 0)
        fs.release(handle)
    finally:
        fs.close()
    assert os.getxattr(upper / "keep" / "sub2", "trusted.overlay.redirect") == b"/src/sub"
    seen = _union_tree([base_path], str(upper))
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in dirnames + filenames:
            names = os.listxattr(os.path.join(dirpath, name), follow_symlinks=False)
            assert not any(n.endswith("overlay.redirect") for n in names), os.path.join(dirpath, name)
    snap = upper_snapshot(layer)
    assert snap["src"].type == "whiteout"
    assert "moved/sub" not in snap  # an opaque copy needs no whiteout inside
    assert snap["moved"].opaque and snap["keep/sub2"].opaque and not snap["keep"].opaque
    assert (layer / "moved" / "f").read_text() == "f\n" and (layer / "keep" / "sub2" / "g").read_text() == "g\n"
    assert _union_tree([str(layer), base_path]) == seen
    assert layer_digest(str(layer)) == result.digest


def test_a_build_step_layer_flattens_a_renamed_dir_on_the_layers_it_was_mounted_over(
        store: Store, tmp_path: Path) -> None:
    """``commit_layer`` (a build step's upper) with ``below``, the layers the step's mount had: a directory
    renamed there becomes a whiteout and an opaque copy; without ``below`` the upper is refused and the store
    is left as it was."""
    base = import_dir(store, str(build_layer({"opt/app/bin": File("run\n", mode=0o755), "opt/app/lib/x": "x\n"},
                                             tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path)
    try:
        fs.rename("opt/app", "opt/app-1.0")
    finally:
        fs.close()
    seen = _union_tree([base_path], str(upper))
    layers_before = store.layer_digests()
    with pytest.raises(CommitError, match=r"is not a self-contained overlay upper: opt/app-1\.0 carries"):
        commit_layer(store, str(upper), parent=base.digest)
    assert store.layer_digests() == layers_before
    result = commit_layer(store, str(upper), parent=base.digest, below=[base_path])
    layer = Path(store.layer_path(result.digest))
    snap = upper_snapshot(layer)
    assert snap["opt/app"].type == "whiteout"
    assert snap["opt/app-1.0"].opaque and snap["opt/app-1.0"].redirect is None
    assert (layer / "opt" / "app-1.0" / "lib" / "x").read_text() == "x\n"
    assert _union_tree([str(layer), base_path]) == seen


def test_an_index_upper_commits_its_hard_links_as_hard_links(store: Store, tmp_path: Path) -> None:
    """Every name of a lower hard link copied up through the index (index=on): the layer holds them as hard
    links of one file, no index entry, no overlay xattr, and shows the tree the union showed."""
    base = import_dir(store, str(build_layer({"x": "linked\n", "y": Hardlink("x"), "d/z": Hardlink("x")},
                                             tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path, index=True)
    try:
        handle = fs.open("x", os.O_WRONLY)
        fs.write(handle, b"LINKED\n", 0)
        fs.release(handle)
        fs.chmod("y", 0o600)
        fs.chmod("d/z", 0o640)
    finally:
        fs.close()
    seen = _union_tree([base_path], str(upper))
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    for path in (layer / "x", layer / "y", layer / "d" / "z"):
        assert os.stat(path).st_nlink == 3
        assert not [n for n in os.listxattr(path) if "overlay." in n or "unionfs." in n]
    assert (layer / "y").read_text() == "LINKED\n"
    assert sorted(os.listdir(layer)) == ["d", "x", "y"]
    assert _union_tree([str(layer), base_path]) == seen


def test_an_index_upper_with_names_left_below_commits_them_as_hard_links(store: Store, tmp_path: Path) -> None:
    """A name copied up through the index while others are still only in the base (one in a directory the
    upper lacks): on its base the layer carries those names too, as hard links of the copy (the first name
    in canonical order holds the data), so the image shows the new data under every name."""
    base = import_dir(store, str(build_layer({"a/y": "linked\n", "x": Hardlink("a/y"), "z": Hardlink("a/y"),
                                              "a/keep": "keep\n"}, tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path, index=True)
    try:
        handle = fs.open("x", os.O_WRONLY)
        fs.write(handle, b"LINKED\n", 0)
        fs.release(handle)
    finally:
        fs.close()
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    assert sorted(os.listdir(layer)) == ["a", "x", "z"] and os.listdir(layer / "a") == ["y"]
    assert {os.stat(layer / p).st_ino for p in ("a/y", "x", "z")} == {os.stat(layer / "x").st_ino}
    image = _union_tree([str(layer), base_path])
    assert {path: data for path, (_kind, _mode, data) in image.items()  # type: ignore[misc]
            if path != "a"} == {"x": b"LINKED\n", "a/y": b"LINKED\n", "z": b"LINKED\n", "a/keep": b"keep\n"}
    assert layer_digest(str(layer)) == result.digest


def test_an_index_upper_with_names_left_below_and_no_known_base_is_refused(store: Store, tmp_path: Path) -> None:
    """Without the layers it was mounted over, those names cannot be found: refused, the store as it was."""
    base = import_dir(store, str(build_layer({"x": "linked\n", "y": Hardlink("x")}, tmp_path / "base")),
                      image="base")
    fs, upper = _renaming_union([store.layer_path(base.digest)], tmp_path, index=True)
    try:
        handle = fs.open("x", os.O_WRONLY)
        fs.write(handle, b"LINKED\n", 0)
        fs.release(handle)
    finally:
        fs.close()
    layers_before = sorted(os.listdir(Path(store.layer_path(base.digest)).parent))
    with pytest.raises(CommitError, match="index=on"):
        commit_upper(store, str(upper), image="app")
    assert sorted(os.listdir(Path(store.layer_path(base.digest)).parent)) == layers_before


# -- indexed files with names left below a renamed directory --------------------------------------------------

Tree = dict[str, tuple[int, int, int | None, bytes, tuple[str, ...]]]
"""path -> (file type bits, permission bits, link count (None for a directory), data, the other paths of its
hard-link group), as a union shows them."""


def _with_groups(seen: dict[str, tuple[int, int, int | None, bytes]], inos: dict[str, int]) -> Tree:
    return {path: (*facts, tuple(sorted(p for p, i in inos.items() if i == inos.get(path) and p != path)))
            for path, facts in seen.items()}


def _mounted_tree(root: Path) -> Tree:
    """What the mount at ``root`` shows (through the host's system calls)."""
    seen: dict[str, tuple[int, int, int | None, bytes]] = {}
    inos: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            path = os.path.relpath(full, root)
            st = os.lstat(full)
            data = Path(full).read_bytes() if stat.S_ISREG(st.st_mode) else b""
            is_dir = stat.S_ISDIR(st.st_mode)
            seen[path] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), None if is_dir else st.st_nlink, data)
            if not is_dir:
                inos[path] = st.st_ino
    return _with_groups(seen, inos)


def _core_tree(fs: UnionFS) -> Tree:
    """What the union ``fs`` shows (through the core's facade, no mount)."""
    seen: dict[str, tuple[int, int, int | None, bytes]] = {}
    inos: dict[str, int] = {}
    for path, attrs, data in _core_entries(fs):
        if stat.S_ISDIR(attrs.st_mode):
            seen[path] = (stat.S_IFDIR, stat.S_IMODE(attrs.st_mode), None, b"")
        else:
            seen[path] = (stat.S_IFMT(attrs.st_mode), stat.S_IMODE(attrs.st_mode), attrs.st_nlink, data)
            inos[path] = attrs.st_ino
    return _with_groups(seen, inos)


def _image_trees(layers: list[str], tmp_path: Path) -> tuple[Tree, Tree]:
    """What an image of ``layers`` (top first) shows mounted read-only on the kernel's overlayfs, and on the
    core of unionfs."""
    from unionfs.fs.layers import LayerStack
    from unionfs.fs.union import UnionFS

    mnt = tmp_path / "image-mnt"
    mnt.mkdir()
    with kernel_overlay_mount([Path(p) for p in layers], None, None, mnt) as root:
        kernel = _mounted_tree(root)
    fs = UnionFS(LayerStack.open(lowers=layers, upper=None, work=None))
    try:
        return kernel, _core_tree(fs)
    finally:
        fs.close()


def _write(fs: UnionFS, path: str, data: bytes) -> None:
    handle = fs.open(path, os.O_WRONLY | os.O_TRUNC)
    fs.write(handle, data, 0)
    fs.release(handle)


def _no_overlay_xattrs(layer: Path) -> None:
    """No redirect, index or origin record in the layer: only opaque marks."""
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in dirnames + filenames:
            names = os.listxattr(os.path.join(dirpath, name), follow_symlinks=False)
            private = [n for n in names if ("overlay." in n or "unionfs." in n) and n != "trusted.overlay.opaque"]
            assert not private, os.path.join(dirpath, name)


@pytest.mark.parametrize("new", [b"NEW DATA\n", b"N" * (KEEP_FILE_MAX + 1)], ids=["small", "large"])
def test_an_index_upper_with_a_name_left_below_a_renamed_dir_commits_it_as_a_link_of_the_copy(
        store: Store, tmp_path: Path, new: bytes) -> None:
    """The kernel's overlayfs (redirect_dir=on, index=on) over a lower hard link ``L/n`` + ``other``: ``mv L R``,
    then a write through ``other``; the union shows the new data at ``R/n`` too, with a link count of 2.  The
    commit on the base holds ``R`` as a full opaque copy whose ``n`` is a hard link of the copy at ``other``,
    and the image mounted (kernel and unionfs) shows the tree the union showed, data and links.  (A copy too
    large to be kept by the read pass is read from the upper, never the old data read at ``R/n``.)"""
    base = import_dir(store, str(build_layer({"L/n": "old\n", "L/keep": "keep\n", "other": Hardlink("L/n")},
                                             tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with kernel_overlay_mount([Path(base_path)], upper, work, mnt, ["redirect_dir=on", "index=on"]) as root:
        os.rename(root / "L", root / "R")
        (root / "other").write_bytes(new)
        seen = _mounted_tree(root)
    assert seen["R/n"] == (stat.S_IFREG, 0o644, 2, new, ("other",))
    assert os.getxattr(upper / "R", "trusted.overlay.redirect") == b"L"
    assert not (upper / "R" / "n").exists()  # the lower-only name: only the index knows it
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    snap = upper_snapshot(layer)
    assert snap["L"].type == "whiteout" and snap["R"].opaque and snap["R"].redirect is None
    assert snap["R/n"].same_ino == ("other",) and snap["R/n"].nlink == 2
    assert (layer / "R" / "n").read_bytes() == new and (layer / "R" / "keep").read_bytes() == b"keep\n"
    _no_overlay_xattrs(layer)
    assert layer_digest(str(layer)) == result.digest
    kernel, core = _image_trees([str(layer), base_path], tmp_path)
    assert kernel == seen
    assert core == seen


def test_an_index_upper_with_names_left_below_a_renamed_dir_and_in_a_plain_dir(store: Store,
                                                                               tmp_path: Path) -> None:
    """Two names left only in the base, one below a renamed directory and one in a directory the upper lacks:
    both become hard links of the copy, and the image shows the union's tree."""
    base = import_dir(store, str(build_layer({"L/n": "old\n", "P/q": Hardlink("L/n"), "other": Hardlink("L/n"),
                                              "P/p": "p\n"}, tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path, index=True)
    try:
        fs.rename("L", "R")
        _write(fs, "other", b"NEW DATA\n")
        seen = _core_tree(fs)
    finally:
        fs.close()
    assert seen["P/q"] == (stat.S_IFREG, 0o644, 3, b"NEW DATA\n", ("R/n", "other"))
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    assert sorted(os.listdir(layer)) == ["L", "P", "R", "other"] and os.listdir(layer / "P") == ["q"]
    assert {os.stat(layer / p).st_ino for p in ("P/q", "R/n", "other")} == {os.stat(layer / "other").st_ino}
    assert os.stat(layer / "other").st_nlink == 3
    _no_overlay_xattrs(layer)
    assert layer_digest(str(layer)) == result.digest
    kernel, core = _image_trees([str(layer), base_path], tmp_path)
    assert kernel == seen
    assert core == seen


def test_an_index_copy_below_a_renamed_dir_carries_the_names_left_in_plain_dirs(store: Store,
                                                                                tmp_path: Path) -> None:
    """The copy made through a name below a renamed directory (``R/n``, written after ``mv L R``), a second
    lower name there (``R/m``) and one in the base's root: the flattened copy of ``R`` and the root name are
    links of the copy, none shows the old data."""
    base = import_dir(store, str(build_layer({"L/n": "old\n", "L/m": Hardlink("L/n"), "other": Hardlink("L/n")},
                                             tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path, index=True)
    try:
        fs.rename("L", "R")
        _write(fs, "R/n", b"NEW DATA\n")
        seen = _core_tree(fs)
    finally:
        fs.close()
    assert seen["other"] == (stat.S_IFREG, 0o644, 3, b"NEW DATA\n", ("R/m", "R/n"))
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    assert {os.stat(layer / p).st_ino for p in ("R/m", "R/n", "other")} == {os.stat(layer / "other").st_ino}
    kernel, core = _image_trees([str(layer), base_path], tmp_path)
    assert kernel == seen
    assert core == seen


def test_an_index_file_with_two_upper_names_and_one_below_a_renamed_dir(store: Store, tmp_path: Path) -> None:
    """Two names copied up (``x``, ``y``), the third left below a renamed directory and first in canonical
    order (``R/n``): it holds the copy's data, the upper names are links of it, each name once."""
    base = import_dir(store, str(build_layer({"L/n": "old\n", "x": Hardlink("L/n"), "y": Hardlink("L/n")},
                                             tmp_path / "base")), image="base")
    base_path = store.layer_path(base.digest)
    fs, upper = _renaming_union([base_path], tmp_path, index=True)
    try:
        fs.rename("L", "R")
        _write(fs, "x", b"NEW DATA\n")
        fs.chmod("y", 0o600)
        seen = _core_tree(fs)
    finally:
        fs.close()
    assert sorted(os.listdir(upper)) == ["L", "R", "x", "y"]
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    snap = upper_snapshot(layer)
    assert snap["R/n"] == replace(snap["x"], same_ino=("x", "y"))
    assert snap["x"].mode == 0o600 and snap["x"].nlink == 3
    assert result.files == 1
    kernel, core = _image_trees([str(layer), base_path], tmp_path)
    assert kernel == seen
    assert core == seen


def test_index_files_of_two_layers_of_a_base(store: Store, tmp_path: Path) -> None:
    """A base of two layers on one file system (a handle decodes in either), each with a lower hard link
    below a directory that gets renamed: each file's names are looked for in the layer that holds it, not
    only in the first one where its handle decodes, and both become links of their copies."""
    bottom = import_dir(store, str(build_layer({"L/n": "old\n", "other": Hardlink("L/n")}, tmp_path / "b1")),
                        image="bottom")
    top = commit_upper(store, str(build_layer({"T/a": "top\n", "T/b": Hardlink("T/a")}, tmp_path / "b2")),
                       image="base", base_image="bottom")
    lowers = [store.layer_path(top.digest), store.layer_path(bottom.digest)]
    fs, upper = _renaming_union(lowers, tmp_path, index=True)
    try:
        fs.rename("L", "R")
        fs.rename("T", "U")
        _write(fs, "other", b"NEW DATA\n")
        _write(fs, "U/b", b"NEW TOP\n")
        seen = _core_tree(fs)
    finally:
        fs.close()
    assert seen["U/a"] == (stat.S_IFREG, 0o644, 2, b"NEW TOP\n", ("U/b",))
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = Path(store.layer_path(result.digest))
    assert os.stat(layer / "R" / "n").st_ino == os.stat(layer / "other").st_ino
    assert os.stat(layer / "U" / "a").st_ino == os.stat(layer / "U" / "b").st_ino
    kernel, core = _image_trees([str(layer), *lowers], tmp_path)
    assert kernel == seen
    assert core == seen


def test_an_index_upper_below_a_renamed_dir_whose_count_does_not_match_is_refused(store: Store,
                                                                                  tmp_path: Path) -> None:
    """A link count that says more names are left below than the union shows (one below the renamed
    directory): refused with one line, the store as it was; and without a known base, too."""
    base = import_dir(store, str(build_layer({"L/n": "old\n", "other": Hardlink("L/n")}, tmp_path / "base")),
                      image="base")
    fs, upper = _renaming_union([store.layer_path(base.digest)], tmp_path, index=True)
    try:
        fs.rename("L", "R")
        _write(fs, "other", b"NEW DATA\n")
    finally:
        fs.close()
    layers_before = sorted(os.listdir(Path(store.root, "layers")))
    with pytest.raises(CommitError, match=r"^upper .*: R carries an overlay redirect"):
        commit_upper(store, str(upper), image="app")
    assert os.getxattr(upper / "other", "trusted.overlay.nlink") == b"U+0"
    os.setxattr(upper / "other", "trusted.overlay.nlink", b"U+1")  # two names below, where one is
    with pytest.raises(CommitError, match=r"^upper .*: other carries an overlay metacopy xattr .*, or is a hard "
                                          r"link copied up with index=on whose link count does not match"):
        commit_upper(store, str(upper), image="app", base_image="base")
    assert sorted(os.listdir(Path(store.root, "layers"))) == layers_before
    assert [i.name for i in store.images()] == ["base"]
    assert os.listdir(Path(store.root, "tmp")) == []


def test_two_upper_files_claiming_one_lower_file_are_refused(store: Store, tmp_path: Path) -> None:
    """An upper where another file carries the origin and link count of an indexed copy (not what a mount
    writes): the names below cannot belong to both, so the commit is refused and the store left as it was."""
    base = import_dir(store, str(build_layer({"L/n": "old\n", "other": Hardlink("L/n")}, tmp_path / "base")),
                      image="base")
    fs, upper = _renaming_union([store.layer_path(base.digest)], tmp_path, index=True)
    try:
        fs.rename("L", "R")
        _write(fs, "other", b"NEW DATA\n")
    finally:
        fs.close()
    (upper / "twin").write_bytes(b"twin\n")
    os.link(upper / "twin", upper / "twin2")  # two names, as the copy's upper name and its index entry
    for attr in ("trusted.overlay.origin", "trusted.overlay.nlink"):
        os.setxattr(upper / "twin", attr, os.getxattr(upper / "other", attr))
    layers_before = sorted(os.listdir(Path(store.root, "layers")))
    with pytest.raises(CommitError, match=r"^upper .*: twin carries an overlay metacopy xattr .*, or is a hard "
                                          r"link copied up with index=on"):
        commit_upper(store, str(upper), image="app", base_image="base")
    assert sorted(os.listdir(Path(store.root, "layers"))) == layers_before
    assert os.listdir(Path(store.root, "tmp")) == []


INDEX_BASE = {"A/B/n": "old\n", "A/B/m": Hardlink("A/B/n"), "A/x": Hardlink("A/B/n"), "C/y": Hardlink("A/B/n"),
              "top": Hardlink("A/B/n"), "A/B/keep": "k\n", "C/keep": "c\n"}
"""Five names of one lower file, in nested, plain and root directories."""
INDEX_SCENARIOS: dict[str, list[tuple[str, ...]]] = {
    "nested-renames": [("rename", "A", "R"), ("rename", "R/B", "R/B2"), ("write", "top")],
    "moved-to-another-dir": [("rename", "A/B", "C/B"), ("write", "A/x")],
    "moved-and-parent-renamed": [("rename", "A/B", "C/B"), ("rename", "A", "Z"), ("write", "C/y")],
    "written-below-the-renamed-dir": [("rename", "A", "R"), ("write", "R/B/m")],
    "two-names-copied-up": [("rename", "A/B", "B"), ("chmod", "top"), ("chmod", "C/y")],
    "a-name-unlinked": [("rename", "A", "R"), ("unlink", "R/B/n"), ("write", "top")],
    "a-name-renamed": [("rename", "A", "R"), ("write", "top"), ("rename", "R/x", "R/B/x2")],
}


@pytest.mark.parametrize("scenario", INDEX_SCENARIOS)
def test_index_names_below_renamed_dirs_commit_as_the_kernel_showed_them(store: Store, tmp_path: Path,
                                                                         scenario: str) -> None:
    """Directories renamed in several ways over a lower file of five names, changed through one or two of
    them, on the kernel's overlayfs (redirect_dir=on, index=on): the image of the commit shows the kernel's
    tree, mounted on the kernel and read by unionfs."""
    base = import_dir(store, str(build_layer(INDEX_BASE, tmp_path / "base")), image="base")  # type: ignore[arg-type]
    base_path = store.layer_path(base.digest)
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with kernel_overlay_mount([Path(base_path)], upper, work, mnt, ["redirect_dir=on", "index=on"]) as root:
        for op, *args in INDEX_SCENARIOS[scenario]:
            if op == "rename":
                os.rename(root / args[0], root / args[1])
            elif op == "write":
                (root / args[0]).write_bytes(f"new through {args[0]}\n".encode())
            elif op == "chmod":
                os.chmod(root / args[0], 0o600)
            else:
                os.unlink(root / args[0])
        seen = _mounted_tree(root)
    result = commit_upper(store, str(upper), image="app", base_image="base")
    layer = store.layer_path(result.digest)
    _no_overlay_xattrs(Path(layer))
    kernel, core = _image_trees([layer, base_path], tmp_path)
    assert kernel == seen
    assert core == seen

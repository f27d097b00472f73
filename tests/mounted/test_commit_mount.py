"""Commit, then mount the new image: the same tree as the view that was committed.

What these prove: for random uppers (whiteouts, opaque dirs, hard links, xattrs, devices, fifos, symlinks)
over a random base, the image made by ``import-dir`` + ``commit`` mounts — with the kernel's overlayfs and
with the program under test — to exactly the tree the kernel showed for the upper over the base; a change
made through ``unionfs mount IMAGE`` and committed after the umount is in the new image; a mounted upper is
refused with one clear line.  Every mount is made through a context manager that always unmounts
(``umount``, then ``umount -l``) and waits until it is gone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from support.image_specs import layer_specs
from support.layers import WHITEOUT, Dir, Fifo, File, Hardlink, Symlink, build_layer
from support.mounts import kernel_overlay_mount, unionfs_mount, unmount
from support.snapshot import Snapshot, diff_snapshots, snapshot

from unionfs.image.commit import commit_upper, import_dir
from unionfs.image.store import Store
from unionfs.mountinfo import find_mount

pytestmark = pytest.mark.mounted

UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")


def run(*argv: str | Path, store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UNIONFS, *map(str, argv)], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "UNIONFS_STORE": str(store)}, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def image_mount(store: Path, image: str, mnt: Path, *extra: str) -> Iterator[Path]:
    """``unionfs mount IMAGE MNT …``; always unmounted on the way out."""
    mnt.mkdir(exist_ok=True)
    proc = run("mount", image, mnt, *extra, store=store)
    try:
        assert proc.returncode == 0, proc.stderr
        assert find_mount(mnt) is not None
        yield mnt
    finally:
        if find_mount(mnt) is not None:
            unmount(mnt)


def visible(view: Snapshot) -> Snapshot:
    """A snapshot without the names a listing shows but a lookup does not find, and without directory link
    counts.

    The kernel lists a whiteout that sits in a directory no lower layer merges into (it reads such a
    directory as it is) and then answers ENOENT for it; the name does not exist, and unionfs does not list
    it.  Such whiteouts are part of a layer (the same layer may sit on another base), so they stay.
    A directory's link count is 1 ("unknown") where it merges several layers and the real count where it
    does not; an image holding one layer twice is mounted with it once, which can change which.
    """
    return {path: replace(entry, nlink=None) if entry.type == "dir" else entry
            for path, entry in view.items() if entry.type != "error:ENOENT"}


def views_equal(expected: Path, actual: Path, names: tuple[str, str]) -> None:
    diff = diff_snapshots(visible(snapshot(expected)), visible(snapshot(actual)), names=names)
    assert not diff, "\n".join(diff)


def commit_and_compare(tmp: Path, base_spec: dict[str, object], upper_spec: dict[str, object]) -> None:
    base = build_layer(base_spec, tmp / "base")  # type: ignore[arg-type]
    upper_k = build_layer(upper_spec, tmp / "upper-kernel")  # type: ignore[arg-type]
    upper_o = build_layer(upper_spec, tmp / "upper-oci", whiteouts="oci")  # type: ignore[arg-type]
    with Store(str(tmp / "store"), writable=True) as store:
        import_dir(store, str(base), image="base")
        top = commit_upper(store, str(upper_o), image="top", base_image="base")
        layers = [Path(store.layer_path(d)) for d in store.image("top").mount_layers()]
    assert layers[0].name == top.digest
    for d in ("orig", "kernel", "program"):
        (tmp / d).mkdir()
    with kernel_overlay_mount([upper_k, base], None, None, tmp / "orig") as orig:
        with kernel_overlay_mount(layers, None, None, tmp / "kernel") as mnt:
            views_equal(orig, mnt, ("upper over base (kernel)", "committed image (kernel)"))
        with unionfs_mount(layers, None, None, tmp / "program") as mnt:
            views_equal(orig, mnt, ("upper over base (kernel)", "committed image (program)"))


RICH_BASE = {
    "etc": {"passwd": "root\n", "hosts": "h\n", "conf.d": {"a.conf": "a", "b.conf": "b"}},
    "usr/bin": {"sh": File(b"#!" + bytes(3000), mode=0o755), "ls": "ls"},
    "usr/bin/sh-link": Hardlink("usr/bin/sh"),
    "var/cache/apt": {"pkg1": File(b"1" * 10000), "pkg2": "2"},
    "home": Dir({"user": Dir({"notes": File(b"n", uid=1000, gid=1000)}, uid=1000, gid=1000)}),
}
RICH_UPPER = {
    "etc": Dir({"passwd": "root\nme\n", "hosts": WHITEOUT, "conf.d": Dir({"c.conf": "c"}, opaque=True)}),
    "usr/bin/tool": File(b"tool", mode=0o4755, xattrs={"user.origin": b"build"}),
    "usr/bin/tool-link": Hardlink("usr/bin/tool"),
    "var": Dir({"cache": WHITEOUT}),
    "home/user/.history": File(b"ls\n", uid=1000, gid=1000, mode=0o600),
    "run/fifo": Fifo(),
    "latest": Symlink("usr/bin/tool"),
}


def test_rich_commit_mounts_as_the_same_tree(tmp_path: Path) -> None:
    commit_and_compare(tmp_path, RICH_BASE, RICH_UPPER)  # type: ignore[arg-type]


@settings(max_examples=int(os.environ.get("COMMIT_MOUNT_EXAMPLES", "25")))
@given(layer_specs(), layer_specs(upper=True))
def test_any_commit_mounts_as_the_same_tree(base_spec: dict[str, object], upper_spec: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        commit_and_compare(Path(tmp), base_spec, upper_spec)


# -- through unionfs mount IMAGE -----------------------------------------------------------------------------

def change_things(root: Path) -> None:
    (root / "etc/passwd").write_text("root\nyou\n")
    os.unlink(root / "etc/hosts")
    subprocess.run(["rm", "-rf", str(root / "var/cache")], check=True)
    (root / "var/cache").mkdir()
    (root / "var/cache/fresh").write_text("fresh")
    os.chmod(root / "usr/bin/ls", 0o700)
    os.setxattr(root / "etc/conf.d/a.conf", "user.k", b"v")
    os.link(root / "etc/passwd", root / "etc/passwd-")
    os.mkfifo(root / "pipe")
    os.symlink("etc/passwd", root / "pw")
    os.rename(root / "etc/conf.d/b.conf", root / "etc/b.conf")


def test_changes_made_through_a_mount_are_committed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = build_layer(RICH_BASE, tmp_path / "base")  # type: ignore[arg-type]
    assert run("import-dir", base, "--image", "base", store=store).returncode == 0
    with image_mount(store, "base", tmp_path / "mnt") as mnt:
        change_things(mnt)
        before = snapshot(mnt)
        live = run("commit", mnt, "--image", "live", store=store)  # the daemon is paused meanwhile
        assert live.returncode == 0, live.stderr
        (mnt / "after-the-commit").write_text("the mount works again")  # the pause has ended
        assert (mnt / "after-the-commit").read_text() == "the mount works again"
        os.unlink(mnt / "after-the-commit")
    with image_mount(store, "live", tmp_path / "live", "--ro") as mnt:
        diff = diff_snapshots(before, snapshot(mnt), names=("live mount", "image committed live"))
        assert not diff, "\n".join(diff)
    with Store(str(store)) as s:
        (record,) = s.containers()
    listed = run("diff", record.upper, store=store)
    assert listed.returncode == 0
    assert "A /pipe" in listed.stdout.splitlines() and "D /etc/hosts" in listed.stdout.splitlines()
    done = run("commit", record.upper, "--image", "next", "-m", "changes", store=store)
    assert done.returncode == 0, done.stderr
    with image_mount(store, "next", tmp_path / "again", "--ro") as mnt:
        after = snapshot(mnt)
    diff = diff_snapshots(before, after, names=("live mount", "committed image"))
    assert not diff, "\n".join(diff)


def test_a_live_commit_while_a_writer_runs_has_no_torn_file(tmp_path: Path) -> None:
    """Committing a mounted upper pauses the daemon (like ``docker commit``): every file in the new layer is
    one the writer wrote whole, by the upper dir or by the mountpoint, and the writer goes on afterwards."""
    store = tmp_path / "store"
    assert run("import-dir", build_layer({"a": "1"}, tmp_path / "base"), "--image", "base",
               store=store).returncode == 0
    upper = tmp_path / "upper"
    stop = threading.Event()
    written: list[int] = []
    with image_mount(store, "base", tmp_path / "mnt", "--upper", str(upper)) as mnt:
        def writer() -> None:
            i = 0
            while not stop.is_set():
                (mnt / f"f{i % 50}").write_bytes(bytes([65 + i % 26]) * 4096 * (1 + i % 7))
                i += 1
            written.append(i)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for n, target in enumerate((upper, mnt)):
                proc = run("commit", target, "--image", f"live{n}", store=store)
                assert proc.returncode == 0, proc.stderr
        finally:
            stop.set()
            thread.join(60)
        assert written and written[0] > 0
    with Store(str(store)) as s:
        assert s.check(verify=True) == []
        for n in range(2):
            layer = Path(s.layer_path(s.image(f"live{n}").layers[-1]))
            for f in layer.glob("f*"):
                data = f.read_bytes()
                assert len(data) % 4096 == 0 and len(set(data)) <= 1, f"torn file {f.name} in live{n}"


def test_an_index_mount_with_names_left_below_a_renamed_dir_commits_as_it_showed(tmp_path: Path) -> None:
    """``unionfs mount IMAGE -o redirect_dir=on,index=on``: a directory holding a name of a lower hard link is
    renamed and the file is written through another name; a third name stays in a plain directory.  The
    commit of the upper (on the base its record names) mounts, on the kernel's overlayfs and on the program
    under test, as the tree the mount showed: the new data under every name, one inode, the link count."""
    store = tmp_path / "store"
    base = build_layer({"L/n": "old\n", "L/keep": "keep\n", "P/q": Hardlink("L/n"), "other": Hardlink("L/n")},
                       tmp_path / "base")
    assert run("import-dir", base, "--image", "base", store=store).returncode == 0
    upper = tmp_path / "upper"
    with image_mount(store, "base", tmp_path / "mnt", "--upper", str(upper),
                     "-o", "redirect_dir=on,index=on") as mnt:
        os.rename(mnt / "L", mnt / "R")
        (mnt / "other").write_bytes(b"NEW DATA\n")
        before = snapshot(mnt)
    assert before["R/n"].same_ino == ("P/q", "other") and before["R/n"].nlink == 3
    assert (before["R/n"].sha, before["P/q"].sha) == (before["other"].sha, before["other"].sha)
    done = run("commit", upper, "--image", "next", store=store)
    assert done.returncode == 0, done.stderr
    with Store(str(store)) as s:
        layers = [Path(s.layer_path(d)) for d in s.image("next").mount_layers()]
    for d in ("kernel", "program"):
        (tmp_path / d).mkdir()
    with kernel_overlay_mount(layers, None, None, tmp_path / "kernel") as mnt:
        diff = diff_snapshots(visible(before), visible(snapshot(mnt)), names=("index mount", "image (kernel)"))
        assert not diff, "\n".join(diff)
    with unionfs_mount(layers, None, None, tmp_path / "program") as mnt:
        diff = diff_snapshots(visible(before), visible(snapshot(mnt)), names=("index mount", "image (program)"))
        assert not diff, "\n".join(diff)


def test_mount_of_an_unknown_image_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    proc = run("mount", "nope", tmp_path / "mnt", "--upper", tmp_path / "u", store=tmp_path / "store")
    assert (proc.returncode, proc.stderr) == (1, "unionfs: error: unknown image 'nope'\n")
    assert find_mount(tmp_path / "mnt") is None
    assert not (tmp_path / "u").exists()


def test_a_failed_image_mount_leaves_nothing_behind(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert run("import-dir", build_layer({"a": "1"}, tmp_path / "base"), "--image", "base",
               store=store).returncode == 0
    for extra in ([], ["--upper", str(tmp_path / "u")]):
        proc = run("mount", "base", tmp_path / "no-such-mountpoint", *extra, store=store)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert os.listdir(store / "containers") == []
    assert not (tmp_path / "u").exists() and not (tmp_path / ".u.work").exists()

"""Upper dirs are interchangeable between the program under test and the kernel's overlayfs.

(a) An upper dir the program under test wrote, mounted by the kernel over the same lowers, shows exactly the
tree the program's own mount showed. (b) An upper dir the kernel wrote shows, through the program under test,
exactly the tree the kernel showed. Each direction runs a few rich operation sequences; each mount gets a
fresh workdir (a workdir belongs to one implementation).  The ``dir-renames`` sequence mounts both with
``redirect_dir=on``: the redirects one writes, the other reads.  The ``hard-links`` sequence mounts both with
``index=on`` and hands the reader the writer's work dir too: the index entries one writes (every name of a
lower hard link one file, with the same st_ino, st_nlink and data), the other reads.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import layers as L
from support.differential import Recorder, in_dir, recent_cutoff
from support.mounts import kernel_overlay_mount, unionfs_mount
from support.snapshot import diff_snapshots, snapshot

OLD_NS = 1_400_000_000_000_000_000

Mount = Callable[[list[Path], Path, Path, Path, tuple[str, ...]], contextlib.AbstractContextManager[Path]]


@dataclass(frozen=True)
class Sequence:
    """Operations (run in the mount root) over lower layers (top first)."""

    name: str
    lowers: tuple[L.Spec, ...]
    run: Callable[[Recorder], None]
    options: tuple[str, ...] = ()
    """Mount options of both sides (writer and reader)."""
    keep_work: bool = False
    """The reader mounts with the writer's work dir (its inode index), not a fresh one."""


def _deletions(r: Recorder) -> None:
    r.call("unlink lower file", os.unlink, "a")
    r.call("unlink bottom file", os.unlink, "d/from-bottom")
    r.rmtree("rm -rf merged dir", "tree")
    r.call("mkdir it again", os.mkdir, "tree")
    r.write("write into it", "tree/new", b"new\n")
    r.call("unlink then mkdir", lambda: (os.unlink("b"), os.mkdir("b")))
    r.write("create in b", "b/inside", b"inside\n")
    r.rmtree("rm -rf lower-only dir", "only-top")
    r.call("rmdir emptied dir", lambda: (os.unlink("d/sub/x"), os.rmdir("d/sub")))
    r.write("new top-level file", "fresh", b"fresh\n")


def _metadata(r: Recorder) -> None:
    r.call("chmod", os.chmod, "a", 0o600)
    r.call("chown", os.chown, "d", 1000, 1000)
    r.call("utime", os.utime, "b", ns=(OLD_NS, OLD_NS))
    r.call("setxattr", os.setxattr, "d/sub/x", "user.note", b"kept")
    r.call("removexattr", os.removexattr, "x-file", "user.old")
    r.call("truncate", os.truncate, "big", 1000)
    r.write("append", "d/from-bottom", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    r.write("pwrite sparse", "sparse", b"tail", flags=os.O_WRONLY | os.O_CREAT, offset=1 << 20)
    r.call("symlink", os.symlink, "../a", "d/link-to-a")
    r.call("lchown lower symlink", os.lchown, "sym", 7, 7)
    r.call("hardlink lower file", os.link, "x-file", "d/hard")
    r.call("mkfifo", os.mkfifo, "d/fifo", 0o640)
    r.call("mknod", os.mknod, "chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _renames(r: Recorder) -> None:
    r.call("rename lower file over lower file", os.rename, "a", "b")
    r.call("rename lower file into lower dir", os.rename, "x-file", "d/x-moved")
    r.call("mkdir upper dir", os.mkdir, "updir")
    r.write("fill it", "updir/f", b"f\n")
    r.call("rename upper dir", os.rename, "updir", "moved-dir")
    r.call("rename upper dir into merged dir", os.rename, "moved-dir", "tree/moved-dir")
    r.call("rename bottom file", os.rename, "d/from-bottom", "from-bottom")
    r.write("create, rename over whited-out name", "tmp", b"replacement\n")
    r.call("rename onto unlinked name", lambda: (os.unlink("big"), os.rename("tmp", "big")))


def _dir_renames(r: Recorder) -> None:
    r.call("rename merged dir in its parent", os.rename, "tree", "tree2")
    r.call("rename its subdir elsewhere", os.rename, "tree2/deep", "d/deep2")
    r.call("rename lower-only dir into another", os.rename, "only-top", "d/only")
    r.call("rename the new parent too", os.rename, "d", "d2")
    r.write("write below a renamed dir", "d2/deep2/t2", b"changed\n")
    r.call("unlink below a renamed dir", os.unlink, "tree2/t1")
    r.call("mkdir at an old name", os.mkdir, "tree")
    r.call("rename a bottom-only dir back and forth", lambda: (os.rename("bottom-only", "bo"),
                                                               os.rename("bo", "tree/bo")))


def _opaque_and_whiteouts(r: Recorder) -> None:
    r.write("write into a dir made opaque by a lower", "d/new", b"n\n")
    r.call("unlink the middle layer's file", os.unlink, "d/from-middle")
    r.call("unlink the top layer's dir", lambda: (os.unlink("d/sub/x"), os.rmdir("d/sub")))
    r.call("unlink new", os.unlink, "d/new")
    r.call("rmdir the opaque dir", os.rmdir, "d")
    r.call("mkdir it again", os.mkdir, "d")
    r.write("create a name whited out below", "d/gone", b"back\n")
    r.call("mkdir over a whited-out bottom dir", lambda: (os.rename("bottom-only/f", "f"),
                                                         os.rmdir("bottom-only"), os.mkdir("bottom-only")))


BASE = {
    "a": "a\n",
    "b": "b\n",
    "x-file": L.File("x\n", xattrs={"user.old": "1", "user.keep": "2"}),
    "big": L.File(b"z" * 70000),
    "sym": L.Symlink("a"),
    "tree/t1": "t1\n",
    "tree/deep/t2": "t2\n",
    "only-top/o/o": "o\n",
    "d/sub/x": "x\n",
    "d/gone": L.WHITEOUT,
}
MIDDLE = {
    "tree/mid": "mid\n",
    "d": L.Dir({"from-middle": "m\n"}, opaque=True),
    "b": "hidden b\n",
}
BOTTOM = {
    "tree/bottom": "bottom\n",
    "d/hidden-by-opaque": "h\n",
    "d/gone": "gone\n",
    "bottom-only/f": "f\n",
}

def _hard_links(r: Recorder) -> None:
    r.write("append through one name", "h1", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    r.call("chmod another name", os.chmod, "d/h2", 0o600)
    r.call("unlink a name never copied up", os.unlink, "hb2")
    r.call("link to a lower link's name", os.link, "hb1", "d/hb-new")
    r.call("rename a name into a merged dir", os.rename, "h3", "tree/h3")
    r.call("rename a dir holding a name", os.rename, "only-top", "ot")


LINKS = {
    "h1": "linked\n",
    "d/h2": L.Hardlink("h1"),
    "h3": L.Hardlink("h1"),
    "hb1": "b linked\n",
    "hb2": L.Hardlink("hb1"),
    "only-top/hb3": L.Hardlink("hb1"),
}

SEQUENCES = [
    Sequence("deletions", (BASE, {**MIDDLE, "d": L.Dir({"from-middle": "m\n", "from-bottom": "fb\n"})}, BOTTOM),
             _deletions),
    Sequence("metadata", (BASE, {"d/from-bottom": "fb\n"}, BOTTOM), _metadata),
    Sequence("renames", (BASE, {"d/from-bottom": "fb\n"}, BOTTOM), _renames),
    Sequence("opaque-and-whiteouts", (BASE, MIDDLE, BOTTOM), _opaque_and_whiteouts),
    Sequence("dir-renames", (BASE, {"d/from-bottom": "fb\n"}, BOTTOM), _dir_renames, ("redirect_dir=on",)),
    Sequence("hard-links", ({**BASE, **LINKS}, {"d/from-bottom": "fb\n"}, BOTTOM), _hard_links,
             ("redirect_dir=on", "index=on"), keep_work=True),
]


@contextlib.contextmanager
def _program(lowers: list[Path], upper: Path, work: Path, mnt: Path, options: tuple[str, ...]) -> Iterator[Path]:
    with unionfs_mount(lowers, upper, work, mnt, options) as root:
        yield root


@contextlib.contextmanager
def _kernel(lowers: list[Path], upper: Path, work: Path, mnt: Path, options: tuple[str, ...]) -> Iterator[Path]:
    with kernel_overlay_mount(lowers, upper, work, mnt, options) as root:
        yield root


def _written_then_read(seq: Sequence, tmp: Path, *, writer: Mount, reader: Mount) -> list[str]:
    """Run ``seq`` on ``writer``; mount its upper with ``reader``; return the differences of the views."""
    lowers = [L.build_layer(spec, tmp / f"l{i}") for i, spec in enumerate(seq.lowers)]
    ls = L.new_layer_set(tmp / "set", lowers)
    assert ls.upper is not None and ls.work is not None
    changed_after = recent_cutoff()
    r = Recorder()
    with writer(list(ls.lowers), ls.upper, ls.work, ls.mnt, seq.options) as root:
        with in_dir(root):
            seq.run(r)
        written = snapshot(root, changed_after=changed_after)
    assert r.results, "the sequence recorded nothing"
    work2, mnt2 = (ls.work if seq.keep_work else tmp / "set/work2"), tmp / "set/mnt2"
    work2.mkdir(exist_ok=seq.keep_work)
    mnt2.mkdir()
    with reader(list(ls.lowers), ls.upper, work2, mnt2, seq.options) as root:
        seen = snapshot(root, changed_after=changed_after)
    return diff_snapshots(written, seen, names=("writer", "reader"))


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: s.name)
def test_kernel_reads_the_upper_the_program_wrote(seq: Sequence, tmp_path: Path) -> None:
    """(a) The kernel's overlayfs over the program's upper dir shows the tree the program showed."""
    diff = _written_then_read(seq, tmp_path, writer=_program, reader=_kernel)
    if diff:
        pytest.fail("kernel's view of the program's upper differs:\n" + "\n".join(diff), pytrace=False)


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: s.name)
def test_program_reads_the_upper_the_kernel_wrote(seq: Sequence, tmp_path: Path) -> None:
    """(b) The program under test over the kernel's upper dir shows the tree the kernel showed."""
    diff = _written_then_read(seq, tmp_path, writer=_kernel, reader=_program)
    if diff:
        pytest.fail("program's view of the kernel's upper differs:\n" + "\n".join(diff), pytrace=False)

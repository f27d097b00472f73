"""Divergences from the kernel's overlayfs that the state machine (``test_state_machine_layers.py``) found,
each reduced to a named scenario: the smallest layers and operations that show it.

A scenario here that still fails is marked ``xfail(strict=True)`` with the divergence in its reason: when the
core is fixed the test passes, strict xfail turns that into a failure, and the mark (and the matching entry
of ``KNOWN_DIVERGENCES`` in the state machine) must go.

The second catalog, ``DELIBERATE``, holds the places where unionfs differs from the kernel on purpose
(``docs/semantics.md``): those tests pin both sides' behaviour, so a change on either side is noticed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel, run_differential
from support.layers import WHITEOUT, Dir, File, Hardlink, Symlink
from support.mounts import frontend
from support.scratch import private_tmpfs
from support.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, link_descriptor, renameat2

CASES = Catalog()
FILESYSTEMS = ("disk", "tmpfs")
"""Every scenario runs with its layers on the disk (the test's tmp dir, ext4 here) and on a private tmpfs,
where the state machine runs: the upper filesystem decides some details (see ``support.scratch``)."""
XFAIL: dict[tuple[str, str], str] = {}


def known_divergence(reason: str, *, on: tuple[str, ...] = FILESYSTEMS,
                     frontends: tuple[str, ...] | None = None) -> object:
    """Decorator for a scenario the core does not pass yet (on the filesystems ``on``, and only on the
    ``frontends`` named, if given): record why; the test is then strict-xfail there."""
    def mark(scenario: Scenario) -> Scenario:
        if frontends is not None and frontend() not in frontends:
            return scenario
        for fs in on:
            XFAIL[(scenario.name, fs)] = reason
        return scenario
    return mark


@CASES.scenario({"src/x": "x", "dst/y": "y"})
def rename_lower_dir_over_nonempty_dir_is_exdev(r: Recorder) -> None:
    """Renaming a lower dir over a non-empty dir answers EXDEV like the kernel (it refuses to move the lower
    dir before it looks at the target), not ENOTEMPTY."""
    r.call("rename src dst", os.rename, "src", "dst")
    r.call("rename src (merged? no: lower) over empty upper dir", lambda: (os.mkdir("e"), os.rename("src", "e")))
    r.listdir("ls .")


@CASES.scenario({"x": "shared data\n", "y": Hardlink("x"), "d/z": Hardlink("x")})
def copy_up_of_lower_hardlink_gets_its_own_inode_number(r: Recorder) -> None:
    """Writing to one name of a lower hard link copies that name up alone (index=off); the copy is a different
    file from then on, so it must not share the st_ino of the names still in the lower layer."""
    before = r.ino("x")
    r.write("append x", "x", b"more\n", flags=os.O_WRONLY | os.O_APPEND)
    r.read("read x", "x")
    r.read("read y", "y")
    r.stat("stat x", "x")
    r.stat("stat y", "y")
    r.record("x kept its st_ino", r.ino("x") == before)
    r.record("x and y share st_ino", r.ino("x") == r.ino("y"))
    r.record("y and d/z share st_ino", r.ino("y") == r.ino("d/z"))


@CASES.scenario({"a": "lower a", "b": "lower b", "d/x": "x", "e": {}})
def rename_exchange_swaps_two_names(r: Recorder) -> None:
    """renameat2(RENAME_EXCHANGE) swaps two lower files (both copied up), and a file with a dir."""
    r.call("exchange a b", renameat2, "a", "b", RENAME_EXCHANGE)
    r.read("read a", "a")
    r.read("read b", "b")
    r.call("exchange a e (file and empty lower dir)", renameat2, "a", "e", RENAME_EXCHANGE)
    r.call("exchange a missing", renameat2, "a", "missing", RENAME_EXCHANGE)
    r.listdir("ls .")


@CASES.scenario({"a": "lower a", "d/x": "x"})
def rename_noreplace(r: Recorder) -> None:
    """renameat2(RENAME_NOREPLACE) refuses an existing target (EEXIST) and otherwise renames."""
    r.call("noreplace a d (exists)", renameat2, "a", "d", RENAME_NOREPLACE)
    r.call("noreplace a b", renameat2, "a", "b", RENAME_NOREPLACE)
    r.listdir("ls .")


def _fstat(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size)


def _lstat(path: str) -> tuple[int, ...]:
    """An lstat alone (``Recorder.stat`` also reads the file, which opens it)."""
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size)


@known_divergence("fstat of an open file whose name is gone answers ESTALE; the kernel answers (nlink 0)",
                  frontends=("fusepy",))
@CASES.scenario({"d/f": "lower f\n", "g": "lower g\n"})
def fstat_of_an_open_file_whose_name_is_gone(r: Recorder) -> None:
    """fstat on open files after their names were removed — a new file, a copied-up lower file in a dir
    removed with rm -rf, a lower file opened read-only — answers like any fs (nlink 0), never ESTALE."""
    fds = {"new": os.open("new", os.O_RDWR | os.O_CREAT, 0o644), "d/f": os.open("d/f", os.O_RDWR),
           "g": os.open("g", os.O_RDONLY)}
    try:
        os.write(fds["new"], b"new data")
        r.call("unlink new", os.unlink, "new")
        r.call("rm -rf d", lambda: (os.unlink("d/f"), os.rmdir("d")))
        r.call("unlink g", os.unlink, "g")
        for name, fd in fds.items():
            r.value(f"fstat {name}", _fstat, fd)
            r.value(f"pread {name}", os.pread, fd, 100, 0)
    finally:
        for fd in fds.values():
            os.close(fd)
    r.listdir("ls .")


def _reopen(fd: int, flags: int) -> bytes:
    """Open the file of ``fd`` again through its /proc magic link (an open of a node whose name is gone: no
    lookup happens) and read it."""
    again = os.open(f"/proc/self/fd/{fd}", flags)
    try:
        return os.pread(again, 100, 0)
    finally:
        os.close(again)


NAMELESS = "the fusepy frontend reaches files by name (libfuse's path layer): a descriptor whose name is gone " \
           "answers ESTALE or ENOENT"


def _changes_through(r: Recorder, name: str, fd: int) -> None:
    """What a program does with a descriptor whose name is gone: each outcome recorded."""
    r.call(f"fchmod {name}", os.fchmod, fd, 0o640)
    r.call(f"fchown {name} -1 -1", os.fchown, fd, -1, -1)
    r.call(f"fchown {name} 0 0", os.fchown, fd, 0, 0)
    r.call(f"fsetxattr {name}", os.setxattr, fd, "user.gone", b"value")
    r.value(f"fgetxattr {name}", os.getxattr, fd, "user.gone")
    r.value(f"flistxattr {name}", lambda: sorted(os.listxattr(fd)))
    r.call(f"ftruncate {name}", os.ftruncate, fd, 3)
    r.value(f"pwrite {name}", os.pwrite, fd, b"XY", 1)
    r.call(f"fsync {name}", os.fsync, fd)
    r.value(f"pread {name}", os.pread, fd, 100, 0)
    r.value(f"fstat {name}", _fstat, fd)
    r.value(f"reopen {name} read-only", _reopen, fd, os.O_RDONLY)
    r.value(f"reopen {name} read-write", _reopen, fd, os.O_RDWR)


@known_divergence(NAMELESS, frontends=("fusepy",))
@CASES.scenario({"d/f": "lower f\n", "g": "lower g\n", "h": "lower h\n"})
def a_descriptor_whose_name_is_gone_changes_its_file(r: Recorder) -> None:
    """fchmod, fchown, fsetxattr, ftruncate, pwrite, fsync, pread, fstat and an open through /proc of
    descriptors whose names are gone: a new file (changed in place, nlink 0), a lower file opened for writing
    (copied up at open, then its dir removed), a lower file opened read-only (still in its layer: any change
    answers EEXIST, as the kernel's copy-up finds the whiteout), and a lower file replaced by a rename."""
    fds = {"new": os.open("new", os.O_RDWR | os.O_CREAT, 0o644), "d/f": os.open("d/f", os.O_RDWR),
           "g": os.open("g", os.O_RDONLY), "h": os.open("h", os.O_RDONLY)}
    try:
        os.write(fds["new"], b"new data")
        r.call("unlink new", os.unlink, "new")
        r.call("rm -rf d", lambda: (os.unlink("d/f"), os.rmdir("d")))
        r.call("unlink g", os.unlink, "g")
        r.write("create other", "other", b"other data\n")
        r.call("rename other over h", os.rename, "other", "h")
        for name, fd in fds.items():
            _changes_through(r, name, fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    r.listdir("ls .")
    r.read("read h", "h")


def _dir_fd_facts(fd: int) -> tuple[int, int, list[str]]:
    st = os.fstat(fd)
    return st.st_mode, st.st_nlink, sorted(os.listdir(fd))


@known_divergence(NAMELESS, frontends=("fusepy",))
@CASES.scenario({"lowdir/.keep": "", "merged/a": "a", "plain": {}})
def a_directory_descriptor_whose_dir_was_removed(r: Recorder) -> None:
    """fstat, getdents and fchmod of open directories after rmdir: a new upper dir (nlink 0), a lower dir
    emptied through the union (merged now: 1), one merged from the start (1), an empty lower dir (the
    layer's count; fchmod answers EEXIST, it cannot be copied up); each lists nothing."""
    r.call("mkdir new", os.mkdir, "new")
    r.call("empty the others", lambda: (os.unlink("lowdir/.keep"), os.unlink("merged/a"),
                                        os.mkdir("merged/b"), os.rmdir("merged/b")))
    fds = {name: os.open(name, os.O_RDONLY | os.O_DIRECTORY) for name in ("new", "lowdir", "merged", "plain")}
    try:
        for name in fds:
            r.call(f"rmdir {name}", os.rmdir, name)
        for name, fd in fds.items():
            r.value(f"{name}: mode, nlink, listing", _dir_fd_facts, fd)
            r.call(f"fchmod {name}", os.fchmod, fd, 0o700)
    finally:
        for fd in fds.values():
            os.close(fd)
    r.listdir("ls .")


@CASES.scenario({})
def a_write_through_one_name_shows_at_the_other_at_once(r: Recorder) -> None:
    """A write, a truncate and an fallocate through a descriptor of one name of a hard link show at the
    other name (an lstat alone) at once: the protocol frontend lets the kernel keep no attributes of a file
    of several links, the fusepy frontend (one attribute timeout for every reply) drops the other names'
    before it answers."""
    r.write("create a", "a", b"")
    r.call("link a b", os.link, "a", "b")
    fd = os.open("a", os.O_RDWR)
    try:
        r.value("lstat b", _lstat, "b")
        r.value("pwrite a", os.pwrite, fd, b"written\n", 0)
        r.value("lstat b after the write", _lstat, "b")
        r.call("ftruncate a", os.ftruncate, fd, 3)
        r.value("lstat b after the truncate", _lstat, "b")
        r.call("fallocate a", os.posix_fallocate, fd, 0, 4096)
        r.value("lstat b after the fallocate", _lstat, "b")
    finally:
        os.close(fd)


@known_divergence(NAMELESS, frontends=("fusepy",))
@CASES.scenario({})
def a_write_through_a_gone_name_shows_at_the_other_at_once(r: Recorder) -> None:
    """A name of a hard link goes while a descriptor holds it, and the other name (one link left) is looked
    at (an lstat alone): a write through the descriptor, which the protocol frontend passes to the backing
    file without the daemon seeing it, shows at the other name at once (the kernel keeps no attributes of a
    file a node whose name is gone still holds)."""
    r.write("create a", "a", b"")
    r.call("link a b", os.link, "a", "b")
    fd = os.open("a", os.O_RDWR)
    try:
        _write_through_a_gone_name(r, fd, "a", "b")
    finally:
        os.close(fd)
    r.stat("stat b after the close", "b")


def _write_through_a_gone_name(r: Recorder, fd: int, gone: str, other: str) -> None:
    """``gone`` (open as ``fd``) is unlinked and ``other``, a name of the same file, looked at with an lstat
    alone; then a write through ``fd``: each outcome recorded."""
    r.call(f"unlink {gone}", os.unlink, gone)
    r.value(f"fstat {gone}", _fstat, fd)
    r.value(f"lstat {other}", _lstat, other)
    r.value(f"pwrite {gone}", os.pwrite, fd, b"written\n", 0)
    r.value(f"lstat {other} after the write", _lstat, other)
    r.value(f"fstat {gone} after the write", _fstat, fd)


@known_divergence(NAMELESS, frontends=("fusepy",))
@CASES.scenario({"x": "lower linked\n", "y": Hardlink("x")})
def a_hard_link_keeps_its_other_name_when_one_goes(r: Recorder) -> None:
    """A name of a hard link goes while a descriptor holds it: the descriptor and the other name show one
    file (a change through the descriptor shows at the other name at once); lower links keep their
    layer's count."""
    r.write("create a", "a", b"linked\n")
    r.call("link a b", os.link, "a", "b")
    fd = os.open("a", os.O_RDWR)
    low = os.open("x", os.O_RDONLY)
    try:
        r.call("unlink a", os.unlink, "a")
        r.value("fstat a", _fstat, fd)
        r.stat("stat b", "b")
        r.call("fchmod a", os.fchmod, fd, 0o600)
        r.value("pwrite a", os.pwrite, fd, b"L", 0)
        r.stat("stat b after fchmod", "b")
        r.read("read b", "b")
        r.call("unlink b", os.unlink, "b")
        r.value("fstat a after unlink b", _fstat, fd)
        r.call("unlink x", os.unlink, "x")
        r.value("fstat x", _fstat, low)
        r.value("pread x", os.pread, low, 100, 0)
        r.stat("stat y", "y")
    finally:
        os.close(fd)
        os.close(low)
    r.listdir("ls .")


@known_divergence("chown(f, -1, -1) never reaches the daemon through libfuse's path layer: nothing is copied up",
                  frontends=("fusepy",))
@CASES.scenario({"f": "lower f\n", "g": "lower g\n", "d/x": "x", "l": Symlink("f")})
def chown_to_minus_one_copies_up(r: Recorder) -> None:
    """chown(f, -1, -1) changes nothing but is a setattr: the kernel's overlayfs copies the object up (and
    its parents), through a path, a descriptor, a directory and a symlink alike."""
    r.call("chown f -1 -1", os.chown, "f", -1, -1)
    fd = os.open("g", os.O_RDONLY)
    try:
        r.call("fchown g -1 -1", os.fchown, fd, -1, -1)
    finally:
        os.close(fd)
    r.call("chown d -1 -1", os.chown, "d", -1, -1)
    r.call("lchown l -1 -1", os.chown, "l", -1, -1, follow_symlinks=False)
    r.stat("stat f", "f")
    r.stat("stat d", "d")


def _links_and_ctime_moved(path: str, before: os.stat_result) -> tuple[int, bool]:
    st = os.lstat(path)
    return st.st_nlink, st.st_ctime_ns != before.st_ctime_ns


@CASES.scenario({"other": "other data\n"})
def rename_onto_one_name_of_a_hard_link_updates_the_other_name(r: Recorder) -> None:
    """After a rename replaces one name of a hard-linked file, the other name shows one link less and a new
    ctime at once (the kernel must not keep the attributes it cached for that name)."""
    r.write("create a", "a", b"linked\n")
    r.call("link a b", os.link, "a", "b")
    r.stat("stat b (2 links)", "b")
    before = os.lstat("b")
    time.sleep(0.02)
    r.call("rename other onto a", os.rename, "other", "a")
    r.value("b: links, ctime moved", _links_and_ctime_moved, "b", before)
    r.read("read a", "a")
    r.read("read b", "b")


@CASES.scenario({"low": "lower linked\n", "low2": Hardlink("low")})
def link_and_unlink_of_one_name_update_the_other_names(r: Recorder) -> None:
    """link(2) adding a name to a hard-linked file and unlink(2) of one of its names: the other names, whose
    attributes the kernel caches, show the new link count and ctime at once; the listings too."""
    r.write("create a", "a", b"linked\n")
    r.call("link a b", os.link, "a", "b")
    r.listdir("ls . (cached)")
    r.stat("stat b (2 links)", "b")
    before = os.lstat("b")
    time.sleep(0.02)
    r.call("link a c", os.link, "a", "c")
    r.value("b after link a c: links, ctime moved", _links_and_ctime_moved, "b", before)
    r.listdir("ls . after link")
    before = os.lstat("b")
    time.sleep(0.02)
    r.call("unlink c", os.unlink, "c")
    r.value("b after unlink c: links, ctime moved", _links_and_ctime_moved, "b", before)
    r.call("unlink a", os.unlink, "a")
    r.value("b after unlink a: links, ctime moved", _links_and_ctime_moved, "b", before)
    r.listdir("ls . after unlinks")
    r.stat("stat low2 (lower, 2 links)", "low2")
    r.call("link low low3 (copies low up)", os.link, "low", "low3")
    r.stat("stat low2 after the copy-up", "low2")
    r.stat("stat low3", "low3")
    r.listdir("ls . at the end")


def _readlink_fd(fd: int) -> str:
    return os.readlink("", dir_fd=fd)  # readlinkat(fd, ""): the symlink the O_PATH descriptor holds


@known_divergence(NAMELESS, frontends=("fusepy",))
@CASES.scenario({"lowlink": Symlink("lower target"), "low": "lower\n", "lowx": "lower linked\n",
                 "lowy": Hardlink("lowx")})
def link_readlink_and_access_of_nodes_whose_name_is_gone(r: Recorder) -> None:
    """readlink of a symlink held by an O_PATH descriptor after its name went (an upper and a lower one),
    linkat(fd, "", AT_EMPTY_PATH) of files whose name is gone (a new file, nlink 0; a lower file opened
    read-only; one name of an upper and of a lower hard link, which still have a link), access(2) through
    them, and of a removed directory."""
    r.call("symlink uplink", os.symlink, "upper target", "uplink")
    r.call("mkdir updir", os.mkdir, "updir")
    r.write("create a", "a", b"linked\n")
    r.call("link a b", os.link, "a", "b")
    fds = {"uplink": os.open("uplink", os.O_PATH | os.O_NOFOLLOW),
           "lowlink": os.open("lowlink", os.O_PATH | os.O_NOFOLLOW),
           "new": os.open("new", os.O_RDWR | os.O_CREAT, 0o644), "low": os.open("low", os.O_RDONLY),
           "a": os.open("a", os.O_RDWR), "lowx": os.open("lowx", os.O_RDONLY),
           "updir": os.open("updir", os.O_RDONLY | os.O_DIRECTORY)}
    try:
        for name in ("uplink", "lowlink", "new", "low", "a", "lowx"):
            r.call(f"unlink {name}", os.unlink, name)
        r.call("rmdir updir", os.rmdir, "updir")
        for name in ("uplink", "lowlink"):
            r.value(f"readlink {name}", _readlink_fd, fds[name])
        for name in ("new", "low", "a", "lowx"):
            r.call(f"linkat {name} AT_EMPTY_PATH", link_descriptor, fds[name], f"{name}.again")
        r.value("fstat a", _fstat, fds["a"])
        r.stat("stat b", "b")
        r.stat("stat a.again", "a.again")
        r.read("read a.again", "a.again")
        for name, fd in fds.items():
            r.value(f"access {name} R_OK", os.access, f"/proc/self/fd/{fd}", os.R_OK)
            r.value(f"access {name} W_OK", os.access, f"/proc/self/fd/{fd}", os.W_OK)
    finally:
        for fd in fds.values():
            os.close(fd)
    r.listdir("ls .")


@CASES.scenario({"empty": "", "full": "data", "longer": "abc"})
def truncate_to_the_same_size_is_the_upper_fs_rule(r: Recorder) -> None:
    """truncate(2) hands on only the size change (ftruncate(2) adds "update mtime"): whether mtime changes when
    the size does not is the upper filesystem's rule (tmpfs keeps an empty file's mtime, ext4 never does).
    Copy-up keeps the lower mtime either way."""
    r.call("truncate empty 0", os.truncate, "empty", 0)
    r.call("truncate full 4", os.truncate, "full", 4)
    r.call("truncate longer 1", os.truncate, "longer", 1)
    for name in ("empty", "full", "longer"):
        r.stat(f"stat {name}", name)


@CASES.scenario({"d": Dir({"old": "old", "olddir": Dir({})}, mode=0o2775, gid=100)})
def new_objects_over_whiteouts_take_a_set_gid_parents_group(r: Recorder) -> None:
    """In a set-gid directory a new object takes the directory's group (a new directory the set-gid bit
    too), also when it replaces a whiteout and so is built in the work dir first."""
    r.call("unlink d/old", os.unlink, "d/old")
    r.call("create d/old", lambda: os.close(os.open("d/old", os.O_CREAT | os.O_WRONLY, 0o644)))
    r.call("rmdir d/olddir", os.rmdir, "d/olddir")
    r.call("mkdir d/olddir", os.mkdir, "d/olddir", 0o755)
    r.call("symlink d/fresh", os.symlink, "old", "d/fresh")
    r.call("unlink d/old", os.unlink, "d/old")
    r.call("create d/old 4755", lambda: os.close(os.open("d/old", os.O_CREAT | os.O_WRONLY, 0o4755)))
    for name in ("d/old", "d/olddir", "d/fresh"):
        r.stat(f"stat {name}", name)


@CASES.scenario({"d": Dir({"old": "old"}, mode=0o2775, gid=100), "f": File("f", gid=1000)})
def hard_link_over_a_whiteout_in_a_set_gid_dir_keeps_its_group(r: Recorder) -> None:
    """A hard link made over a whiteout in a set-gid directory is a new name of an existing file: the file
    keeps its group (the set-gid rule is for new objects); both names show it."""
    r.call("unlink d/old", os.unlink, "d/old")
    r.call("link f d/old", os.link, "f", "d/old")
    for name in ("f", "d/old"):
        r.stat(f"stat {name}", name)


@CASES.scenario({"big": File(b"0123456789" * 5000, mtime_ns=1_600_000_000 * 10**9), "same": "same",
                 "grow": "grow"})
def truncate_of_a_lower_file_is_a_size_change_of_its_full_copy(r: Recorder) -> None:
    """truncate(2) of a lower file changes the size of a full copy of it, as the kernel's copy-up followed by
    a truncate of the upper file does: a new size gets a new mtime on every upper filesystem (tmpfs too),
    an unchanged size keeps the lower mtime where the upper filesystem keeps it (tmpfs)."""
    r.call("truncate big 0", os.truncate, "big", 0)
    r.call("truncate same 4", os.truncate, "same", 4)
    r.call("truncate grow 100", os.truncate, "grow", 100)
    for name in ("big", "same", "grow"):
        r.stat(f"stat {name}", name)
        r.read(f"read {name}", name)


@CASES.scenario({"x": "x", "d/y": "y", "g/z": "z", "w": WHITEOUT, "w2": WHITEOUT})
def new_dir_renamed_into_a_merged_dir_is_marked_opaque(r: Recorder) -> None:
    """A dir created through the mount and renamed into a merged dir is marked opaque in the upper dir,
    as the kernel marks it, whether or not a lower layer has that name: into a lower dir, within the merged
    root, over a lower whiteout, and over the name of a removed lower dir. Into a dir that is not merged
    (created through the mount) it is not marked, and a dir moved there keeps the mark it has."""
    r.call("mkdir n", os.mkdir, "n")
    r.call("rename n d/n (into a lower dir)", os.rename, "n", "d/n")
    r.call("mkdir e", os.mkdir, "e")
    r.call("rename e e2 (within the merged root)", os.rename, "e", "e2")
    r.call("mkdir v", os.mkdir, "v")
    r.call("rename v w (over a lower whiteout)", os.rename, "v", "w")
    r.call("mkdir a", os.mkdir, "a")
    r.write("a/f", "a/f", b"f")
    r.call("rm -rf g", lambda: (os.unlink("g/z"), os.rmdir("g")))
    r.call("rename a g (over the lower g's whiteout)", os.rename, "a", "g")
    r.call("mkdir p", os.mkdir, "p")
    r.call("mkdir p/q", os.mkdir, "p/q")
    r.call("rename p/q p/q2 (within a dir that is not merged)", os.rename, "p/q", "p/q2")
    r.call("mkdir d/m", os.mkdir, "d/m")
    r.call("rename d/m p/m (from a merged dir into one that is not)", os.rename, "d/m", "p/m")
    r.call("rename e2 p/e2 (an opaque dir keeps its mark)", os.rename, "e2", "p/e2")
    r.call("mkdir w2 (over a lower whiteout, no rename)", os.mkdir, "w2")
    r.listdir("ls .")
    r.listdir("ls d", "d")
    r.listdir("ls g", "g")
    r.listdir("ls p", "p")


@CASES.scenario({"b": WHITEOUT, "x": "x", "f": "lower f"})
def exchanged_new_dirs_in_a_merged_dir_are_marked_opaque(r: Recorder) -> None:
    """Dirs created through the mount and swapped with RENAME_EXCHANGE inside a merged dir are both marked
    opaque, as the kernel marks them (one was made over a lower whiteout); a dir swapped with a lower file
    too; of two dirs swapped between the merged root and a dir that is not merged, only the one that moves
    into the root."""
    r.call("mkdir b (over a lower whiteout)", os.mkdir, "b")
    r.call("mkdir a", os.mkdir, "a")
    r.call("exchange a b", renameat2, "a", "b", RENAME_EXCHANGE)
    r.call("mkdir c", os.mkdir, "c")
    r.call("exchange c f (a dir with a lower file)", renameat2, "c", "f", RENAME_EXCHANGE)
    r.call("mkdir p", os.mkdir, "p")
    r.call("mkdir p/i", os.mkdir, "p/i")
    r.call("mkdir o", os.mkdir, "o")
    r.call("exchange o p/i (the one moving into the merged root is marked)", renameat2, "o", "p/i",
           RENAME_EXCHANGE)
    r.listdir("ls .")
    r.listdir("ls p", "p")


@CASES.scenario({"x": "x", "d/y": "y"})
def failed_rename_onto_a_non_empty_upper_dir_leaves_the_kernels_opaque_mark(r: Recorder) -> None:
    """A new dir renamed onto a non-empty dir that exists in the upper layer only: ENOTEMPTY, and the
    kernel, which marks the moving dir opaque before the upper filesystem refuses, leaves that mark behind
    (when the target's parent is merged). A non-empty merged target is refused before any mark."""
    r.call("mkdir a", os.mkdir, "a")
    r.call("mkdir b", os.mkdir, "b")
    r.call("mkdir b/c", os.mkdir, "b/c")
    r.call("rename a b (non-empty pure-upper dir, in the merged root)", os.rename, "a", "b")
    r.call("mkdir b/e", os.mkdir, "b/e")
    r.call("mkdir b/f", os.mkdir, "b/f")
    r.call("mkdir b/f/g", os.mkdir, "b/f/g")
    r.call("rename b/e b/f (in a dir that is not merged)", os.rename, "b/e", "b/f")
    r.call("mkdir n", os.mkdir, "n")
    r.call("rename n d (non-empty merged dir)", os.rename, "n", "d")
    r.listdir("ls .")
    r.listdir("ls b", "b")


@CASES.scenario({"d/s1/f": "f", "d/s2/f": "f", "e/s1/f": "f", "e/s2/f": "f"})
def a_change_that_copies_a_dir_up_and_fails_shows_the_merged_dirs_link_count(r: Recorder) -> None:
    """setxattr with XATTR_REPLACE of a name a lower-only dir lacks copies the dir up before it fails
    (ENODATA): the dir is merged now, and its st_nlink is 1, not the lower dir's 4. The kernel keeps a dir's
    attributes for an hour (both frontends): the failure is answered only once they were dropped. A
    rename onto a non-empty dir in a lower-only dir fails (ENOTEMPTY) before anything is copied up."""
    r.stat("stat d", "d")
    r.call("setxattr d user.missing, XATTR_REPLACE", os.setxattr, "d", "user.missing", b"1", os.XATTR_REPLACE,
           follow_symlinks=False)
    r.stat("stat d", "d")
    r.stat("stat e", "e")
    r.call("mkdir x", os.mkdir, "x")
    r.call("rename x e/s1 (non-empty lower dir in a lower-only dir)", os.rename, "x", "e/s1")
    r.stat("stat e", "e")
    r.stat("stat e/s1", "e/s1")


INDEXED = Catalog(family="index")
"""Scenarios of hard links that survive copy-up (``redirect_dir=on,index=on`` on both sides)."""


@known_divergence(NAMELESS, frontends=("fusepy",))
@INDEXED.scenario({"a": "", "b": Hardlink("a")})
def indexed_links_through_a_descriptor_whose_name_is_gone(r: Recorder) -> None:
    """Two names of a lower hard link, both copied up through the index; one goes while a descriptor holds
    it: the descriptor counts the links the union shows (the index entry is not one), and a write through
    it shows at the other name at once."""
    fd = os.open("b", os.O_WRONLY | os.O_TRUNC)
    try:
        r.call("chmod a (copied up)", os.chmod, "a", 0o600)
        _write_through_a_gone_name(r, fd, "b", "a")
    finally:
        os.close(fd)


DELIBERATE = Catalog()


@DELIBERATE.scenario({"d/a": WHITEOUT, "d/b": "b", "o": Dir({"x": WHITEOUT, "y": "y"}, opaque=True)})
def whiteouts_in_an_unmerged_dir_are_not_listed(r: Recorder) -> None:
    """A whiteout in a dir that exists in one layer only: the kernel lists it (and then answers ENOENT for
    it), unionfs never lists whiteouts. Every other outcome agrees."""
    r.listdir("ls d", "d")
    r.stat("stat d/a", "d/a")
    r.listdir("ls o", "o")
    r.call("rmdir d (not empty)", os.rmdir, "d")
    r.call("unlink d/b", os.unlink, "d/b")
    r.call("rmdir d", os.rmdir, "d")


DELIBERATE_DIFFERENCES = {
    "whiteouts_in_an_unmerged_dir_are_not_listed": [
        "operation outcomes differ:\n"
        "  #0: kernel ('ls d', ['a', 'b'])\n       program ('ls d', ['b'])\n"
        "  #2: kernel ('ls o', ['x', 'y'])\n       program ('ls o', ['y'])",
        "visible tree differs:\n"
        "  o/x:\n    kernel: <error:ENOENT>\n    program: None",
        "visible tree differs after remount:\n"
        "  o/x:\n    kernel: <error:ENOENT>\n    program: None",
    ],
}


@pytest.fixture(scope="module")
def tmpfs_area(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_tmpfs(tmp_path_factory.mktemp("regressions-tmpfs"), size="256m") as area:
        yield area


@pytest.fixture(params=FILESYSTEMS)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(filesystem name, an empty directory on it) for one scenario run."""
    if request.param == "disk":
        yield "disk", tmp_path
        return
    area: Path = request.getfixturevalue("tmpfs_area")
    path = Path(tempfile.mkdtemp(dir=area))
    try:
        yield "tmpfs", path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", [*CASES.params(), *INDEXED.params()], ids=str)
def test_same_as_kernel(case: Scenario, where: tuple[str, Path], request: pytest.FixtureRequest) -> None:
    """The divergences found by the state machine, reduced: unionfs must answer as the kernel does."""
    fs, path = where
    if (case.name, fs) in XFAIL:
        request.applymarker(pytest.mark.xfail(strict=True, reason=XFAIL[(case.name, fs)]))
    assert_same_as_kernel(case, path)


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", DELIBERATE.params(), ids=str)
def test_deliberate_difference(case: Scenario, where: tuple[str, Path]) -> None:
    """Where unionfs differs on purpose (docs/semantics.md), it differs exactly as documented, and only there."""
    comparison = run_differential(case, where[1])
    assert comparison.mismatches == DELIBERATE_DIFFERENCES[case.name], comparison.explain()

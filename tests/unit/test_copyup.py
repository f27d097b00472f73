"""Copy-up: what is copied (data, mode, owner, times, user xattrs), what is not (private xattrs), stable inode
numbers, and atomicity (a failure leaves nothing half-made in the upper; the workdir is emptied at mount)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from support.layers import FIXED_MTIME_NS, Device, Dir, Fifo, File, Hardlink, Symlink
from unitkit import Env, assert_errno, create_file, read_all, staging_entries, visible_tree, write_file, xattr

from unionfs.fs import copyup
from unionfs.fs.fsio import HostDir
from unionfs.fs.union import UnionFS

PRIVATE = {
    "trusted.overlay.origin": b"\x00lower-origin",
    "trusted.overlay.metacopy": b"",
    "user.overlay.redirect": b"/elsewhere",
    "user.fuseoverlayfs.origin": b"x",
    "trusted.unionfs.origin": b"12345",
}
PUBLIC = {"user.mime": b"text/plain", "user.empty": b"", "trusted.other": b"kept"}
OWNER = (1000, 1001)


def lower_file(data: bytes = b"0123456789" * 1000, mode: int = 0o640) -> File:
    return File(data, mode=mode, uid=OWNER[0], gid=OWNER[1], xattrs={**PRIVATE, **PUBLIC})


def triggers() -> dict[str, Callable[[UnionFS, str], None]]:
    """Every operation that copies a lower file up, and how to apply it without changing data or mtime."""
    def open_write(fs: UnionFS, path: str) -> None:
        fs.release(fs.open(path, os.O_WRONLY))

    def open_rdwr(fs: UnionFS, path: str) -> None:
        fs.release(fs.open(path, os.O_RDWR))

    return {
        "open-wronly": open_write,
        "open-rdwr": open_rdwr,
        "chmod-same": lambda fs, p: fs.chmod(p, fs.getattr(p).st_mode),
        "chown-same": lambda fs, p: fs.chown(p, *OWNER),
        "utimens-omit": lambda fs, p: fs.utimens(p, (1 << 30) - 2, (1 << 30) - 2),
        "setxattr": lambda fs, p: fs.setxattr(p, "user.added", b"1", 0),
        "removexattr": lambda fs, p: fs.removexattr(p, "user.mime"),
        "link-source": lambda fs, p: fs.link(p, p + ".link"),
        "truncate-same": lambda fs, p: fs.truncate(p, fs.getattr(p).st_size),
    }


@pytest.mark.parametrize("trigger", triggers())
@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_copy_up_preserves_data_mode_owner_times_and_user_xattrs(mkenv: Callable[..., Env], trigger: str,
                                                                  fmt: str) -> None:
    """After any copy-up trigger the upper holds an exact copy: same bytes, mode, owner, mtime, atime and
    non-private xattrs; the overlay-private xattrs of the lower are not copied."""
    data = os.urandom(3 * (1 << 20) + 17)
    env = mkenv([{"dir/f": lower_file(data)}], fmt=fmt)
    fs = env.open(whiteout=fmt)
    triggers()[trigger](fs, "dir/f")
    up = env.upper / "dir" / "f"  # type: ignore[operator]
    st = os.lstat(up)
    assert stat.S_ISREG(st.st_mode)
    assert up.read_bytes() == data
    assert read_all(fs, "dir/f") == data
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == OWNER
    if not trigger.startswith(("utimens", "truncate")):  # these set times by design
        assert st.st_mtime_ns == FIXED_MTIME_NS
    expected = dict(PUBLIC)
    if trigger == "setxattr":
        expected["user.added"] = b"1"
    if trigger == "removexattr":
        del expected["user.mime"]
    host_names = set(os.listxattr(up, follow_symlinks=False))
    for name, value in expected.items():
        assert xattr(up, name) == value
    for name in PRIVATE:
        if name != fs.inodes.origin_xattr:
            assert name not in host_names, f"private xattr {name} was copied up"
    assert sorted(fs.listxattr("dir/f")) == sorted(expected)
    assert staging_entries(env) == []


def test_copy_up_drops_private_xattrs_but_records_origin(mkenv: Callable[..., Env]) -> None:
    """The lower's private values never reach the upper; the only private xattr there is our origin record,
    holding the lower's inode number, and it is hidden from listxattr/getxattr through the union."""
    env = mkenv([{"f": lower_file()}])
    fs = env.open()
    ino = fs.getattr("f").st_ino
    fs.chmod("f", 0o600)
    up = env.upper / "f"  # type: ignore[operator]
    assert xattr(up, fs.inodes.origin_xattr) == str(ino).encode()
    assert xattr(up, "trusted.unionfs.origin") in (None, str(ino).encode())
    for name in PRIVATE:
        assert_errno(errno.ENODATA, fs.getxattr, "f", name)
    assert fs.inodes.origin_xattr not in fs.listxattr("f")
    assert fs.getxattr("f", "user.mime") == b"text/plain"


@pytest.mark.parametrize("trigger", triggers())
def test_st_ino_is_stable_across_copy_up_and_remount(mkenv: Callable[..., Env], trigger: str) -> None:
    """The inode number a file shows before copy-up is the one it shows after, in getattr, readdir and on an
    open handle, and again after a new UnionFS is built over the same dirs (a remount)."""
    env = mkenv([{"d/f": lower_file(b"abc"), "d/g": "other"}, {"d/below": "b"}])
    fs = env.open()
    before = fs.getattr("d/f").st_ino
    assert before == os.lstat(env.lowers[0] / "d" / "f").st_ino
    dir_before = fs.getattr("d").st_ino
    triggers()[trigger](fs, "d/f")
    assert os.path.exists(env.upper / "d" / "f")  # type: ignore[operator]
    assert fs.getattr("d/f").st_ino == before
    assert dict((n, i) for n, _k, i in fs.readdir("d"))["f"] == before
    handle = fs.open("d/f", os.O_RDONLY)
    try:
        assert handle.ino == before
        assert fs.fgetattr(handle).st_ino == before
    finally:
        fs.release(handle)
    assert fs.getattr("d").st_ino == dir_before, "the copied-up parent keeps its inode number too"
    fs2 = env.remount(fs)
    assert fs2.getattr("d/f").st_ino == before
    assert fs2.getattr("d").st_ino == dir_before
    assert dict((n, i) for n, _k, i in fs2.readdir("d"))["f"] == before


def test_parents_are_copied_up_first_with_their_metadata(mkenv: Callable[..., Env]) -> None:
    """Copying up a deep file creates its parents in the upper with the mode, owner and xattrs of their top
    lower copies (each possibly from a different layer), and they stay merged (not opaque)."""
    env = mkenv([
        {"a": Dir({"b/f": lower_file(b"deep")}, mode=0o750, uid=7, gid=8, xattrs={"user.a": b"A"})},
        {"a/below": "below", "a/b": Dir({"g": "g"}, mode=0o700, uid=9, gid=9)},
    ])
    fs = env.open()
    write_file(fs, "a/b/f", b"DEEP")
    up = env.upper
    assert up is not None
    sa, sb = os.lstat(up / "a"), os.lstat(up / "a" / "b")
    assert (stat.S_IMODE(sa.st_mode), sa.st_uid, sa.st_gid) == (0o750, 7, 8)
    assert xattr(up / "a", "user.a") == b"A"
    assert (stat.S_IMODE(sb.st_mode), sb.st_uid, sb.st_gid) == (0o755, 0, 0), "a/b's top copy is layer 0's"
    assert xattr(up / "a", "trusted.overlay.opaque") is None
    assert sorted(os.listdir(up / "a")) == ["b"]
    assert sorted(n for n, _k, _i in fs.readdir("a")) == ["b", "below"]
    assert sorted(n for n, _k, _i in fs.readdir("a/b")) == ["f", "g"]
    assert read_all(fs, "a/b/f") == b"DEEP"


def test_copy_up_keeps_the_parent_directory_times(mkenv: Callable[..., Env]) -> None:
    """A file copied up inside a lower directory does not change that directory's visible mtime (the kernel
    restores the parent's timestamps after copy-up)."""
    env = mkenv([{"d": Dir({"f": "data"}, mtime_ns=FIXED_MTIME_NS)}])
    fs = env.open()
    fs.chmod("d/f", 0o600)
    assert fs.getattr("d").st_mtime_ns == FIXED_MTIME_NS


@pytest.mark.parametrize(("name", "node"), [
    ("link", Symlink("../target", uid=5, gid=6)),
    ("fifo", Fifo(mode=0o620, uid=5, gid=6)),
    ("dev", Device(1, 7, mode=0o600, uid=5, gid=6)),
    ("dir", Dir({"inside": "x"}, mode=0o701, uid=5, gid=6, xattrs={"user.d": b"D"})),
])
def test_copy_up_of_special_objects(mkenv: Callable[..., Env], name: str, node: object) -> None:
    """Symlinks (target), fifos and devices (type, rdev), directories (no children copied) keep owner and
    times; chown is the trigger (it only changes the owner)."""
    env = mkenv([{name: node}])
    fs = env.open()
    before = fs.getattr(name)
    fs.chown(name, 5, 6)
    up = env.upper / name  # type: ignore[operator]
    st = os.lstat(up)
    assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(before.st_mode)
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(before.st_mode)
    assert (st.st_uid, st.st_gid) == (5, 6)
    assert st.st_mtime_ns == FIXED_MTIME_NS
    assert st.st_rdev == before.st_rdev
    assert fs.getattr(name).st_ino == before.st_ino
    if isinstance(node, Symlink):
        assert os.readlink(up) == "../target" == fs.readlink(name)
    if isinstance(node, Dir):
        assert os.listdir(up) == []
        assert xattr(up, "user.d") == b"D"
        assert sorted(n for n, _k, _i in fs.readdir(name)) == ["inside"]
    assert staging_entries(env) == []


def test_setuid_bits_survive_copy_up(mkenv: Callable[..., Env]) -> None:
    """Owner is set before mode, so set-id bits (cleared by chown) are kept."""
    env = mkenv([{"suid": File("#!", mode=0o4755, uid=1000, gid=1000)}])
    fs = env.open()
    fs.setxattr("suid", "user.x", b"1", 0)
    st = os.lstat(env.upper / "suid")  # type: ignore[operator]
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 1000


def test_open_with_o_trunc_copies_no_data(mkenv: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """O_TRUNC copies metadata only: no data is read from the lower."""
    env = mkenv([{"big": lower_file(b"x" * 100_000)}])
    fs = env.open()
    copied: list[int] = []
    real = copyup.copy_data
    monkeypatch.setattr(copyup, "copy_data", lambda s, d, n: (copied.append(n), real(s, d, n)))
    fs.release(fs.open("big", os.O_WRONLY | os.O_TRUNC))
    assert copied in ([], [0])
    assert fs.getattr("big").st_size == 0
    assert (env.lowers[0] / "big").stat().st_size == 100_000


@pytest.mark.parametrize("length", [0, 3, 10, 25])
def test_truncate_copies_up_only_what_is_kept(mkenv: Callable[..., Env], monkeypatch: pytest.MonkeyPatch,
                                              length: int) -> None:
    """truncate(n) of a lower file: the first n bytes (no more are read), zero-filled beyond the old end."""
    env = mkenv([{"f": "0123456789"}])
    fs = env.open()
    copied: list[int] = []
    real = copyup.copy_data
    monkeypatch.setattr(copyup, "copy_data", lambda s, d, n: (copied.append(n), real(s, d, n)))
    fs.truncate("f", length)
    assert copied == [min(length, 10)]
    expected = b"0123456789"[:length] + b"\0" * max(0, length - 10)
    assert read_all(fs, "f") == expected
    assert (env.upper / "f").read_bytes() == expected  # type: ignore[operator]
    assert (env.lowers[0] / "f").read_bytes() == b"0123456789"


def test_a_failed_truncate_of_the_staged_copy_leaves_the_lower_file_visible(
        mkenv: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """truncate(2) of a lower file truncates the staged copy before it is published: when that fails, the
    upper has nothing at the path (never the full-size copy with a hole), the work dir is empty, and the
    lower file is still what the union shows."""
    from unionfs.fs.fsio import HostDir
    data = b"0123456789" * 1000
    env = mkenv([{"f": lower_file(data)}])
    fs = env.open()

    def broken(self: HostDir, rel: str, length: int) -> None:
        raise OSError(errno.EIO, "simulated failure", rel)
    monkeypatch.setattr(HostDir, "truncate", broken)
    with pytest.raises(OSError) as info:
        fs.truncate("f", 3)
    assert info.value.errno == errno.EIO
    assert not (env.upper / "f").exists()  # type: ignore[operator]
    assert staging_entries(env) == []
    assert read_all(fs, "f") == data
    monkeypatch.undo()
    fs.truncate("f", 3)
    assert read_all(fs, "f") == b"012"


def test_writes_go_to_the_upper_and_the_lower_is_untouched(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{"f": "lower data\n"}])
    fs = env.open()
    handle = fs.open("f", os.O_RDWR)
    try:
        assert fs.write(handle, b"UPPER", 0) == 5
        assert fs.read(handle, 100, 0) == b"UPPER data\n"
    finally:
        fs.release(handle)
    assert (env.lowers[0] / "f").read_text() == "lower data\n"
    assert read_all(env.remount(fs), "f") == b"UPPER data\n"


def test_reading_never_copies_up(mkenv: Callable[..., Env]) -> None:
    """Read-only access (open O_RDONLY, getattr, readdir, getxattr, listxattr, readlink) leaves the upper empty."""
    env = mkenv([{"d/f": lower_file(b"r"), "d/s": Symlink("f")}])
    fs = env.open()
    visible_tree(fs)
    fs.getxattr("d/f", "user.mime")
    fs.listxattr("d/f")
    fs.readlink("d/s")
    fs.access("d/f", os.R_OK)
    assert os.listdir(env.upper) == []  # type: ignore[arg-type]


def _fail_midway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make copy_data write half of the data and then fail with EIO (a disk error mid-copy)."""
    def broken(src_fd: int, dst_fd: int, length: int) -> None:
        half = os.pread(src_fd, length // 2, 0)
        os.pwrite(dst_fd, half, 0)
        raise OSError(errno.EIO, "simulated failure mid-copy")
    monkeypatch.setattr(copyup, "copy_data", broken)


@pytest.mark.parametrize("trigger", ["open-wronly", "chmod-same", "setxattr", "link-source"])
def test_failed_copy_up_leaves_no_partial_file(mkenv: Callable[..., Env], monkeypatch: pytest.MonkeyPatch,
                                               trigger: str) -> None:
    """A copy-up that fails mid-copy raises the error, leaves nothing in the upper at the path (the parent
    may exist), leaves nothing in workdir/work, and the union still shows the intact lower file."""
    data = b"A" * 200_000
    env = mkenv([{"d/f": lower_file(data)}])
    fs = env.open()
    _fail_midway(monkeypatch)
    with pytest.raises(OSError) as info:
        triggers()[trigger](fs, "d/f")
    assert info.value.errno == errno.EIO
    assert not (env.upper / "d" / "f").exists()  # type: ignore[operator]
    assert not (env.upper / "d" / "f.link").exists()  # type: ignore[operator]
    assert staging_entries(env) == []
    assert read_all(fs, "d/f") == data
    assert fs.getattr("d/f").st_size == len(data)
    monkeypatch.undo()
    write_file(fs, "d/f", b"B", flags=os.O_WRONLY)
    assert read_all(fs, "d/f") == b"B" + data[1:]


def test_a_crash_mid_copy_is_invisible_and_cleaned_at_the_next_mount(mkenv: Callable[..., Env],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-copy (simulated: the copy fails and the process does not get to clean up) leaves the
    half-copied file only in workdir/work: the upper never shows it, and the next UnionFS empties work/."""
    data = b"Z" * 100_000
    env = mkenv([{"f": lower_file(data)}])
    fs = env.open()
    _fail_midway(monkeypatch)
    monkeypatch.setattr(HostDir, "remove_tree", lambda self, rel: None)
    with pytest.raises(OSError):
        fs.open("f", os.O_WRONLY)
    monkeypatch.undo()
    leftovers = staging_entries(env)
    assert leftovers, "the simulated crash should leave its staging file behind"
    assert os.listdir(env.upper) == []  # type: ignore[arg-type]
    fs2 = env.remount(fs)
    assert staging_entries(env) == []
    assert read_all(fs2, "f") == data


def test_workdir_leftovers_of_every_kind_are_removed_at_mount(mkenv: Callable[..., Env]) -> None:
    """work/ is emptied at construction: files, nested dirs (even mode 000), whiteout devices, symlinks (not
    followed: their target survives)."""
    env = mkenv([{"f": "f"}])
    canary = env.base / "canary"
    canary.write_text("keep me")
    staging = env.staging
    staging.mkdir()
    (staging / "#copyup-1-1").write_bytes(b"half")
    (staging / "#rm-1-2" / "deep" / "er").mkdir(parents=True)
    (staging / "#rm-1-2" / "deep" / "er" / "f").write_text("x")
    os.chmod(staging / "#rm-1-2" / "deep", 0o000)
    os.mknod(staging / "#wh-1-3", stat.S_IFCHR, 0)
    os.symlink(canary, staging / "#link")
    os.symlink(env.base, staging / "#dirlink")
    env.open()
    assert staging_entries(env) == []
    assert canary.read_text() == "keep me"


def test_workdir_staging_dir_is_created_when_missing(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{"f": "f"}])
    assert not env.staging.exists()
    fs = env.open()
    assert env.staging.is_dir()
    fs.chmod("f", 0o600)
    assert staging_entries(env) == []


def test_copy_up_never_changes_a_lower_hard_link(mkenv: Callable[..., Env]) -> None:
    """Writing one name of a lower hard-linked pair changes nothing in the lower layer."""
    env = mkenv([{"a": "shared", "b": Hardlink("a")}])
    fs = env.open()
    write_file(fs, "a", b"CHANGED")
    assert read_all(fs, "a") == b"CHANGED"
    assert (env.lowers[0] / "a").read_bytes() == (env.lowers[0] / "b").read_bytes() == b"shared"
    assert os.lstat(env.lowers[0] / "a").st_nlink == 2


def test_names_sharing_an_inode_number_share_their_data(mkenv: Callable[..., Env]) -> None:
    """After one name of a lower hard-linked pair is written, either the link survived (both names show the
    new data) or the names report different inode numbers (the kernel without index=on stops using the
    lower's st_ino for a hard-linked lower). Never the same st_ino for different data, which makes tar,
    rsync -H, cp -a and du treat two files as one."""
    env = mkenv([{"a": "shared", "b": Hardlink("a")}])
    fs = env.open()
    assert fs.getattr("a").st_ino == fs.getattr("b").st_ino
    assert fs.getattr("a").st_nlink == 2
    write_file(fs, "a", b"CHANGED")
    same_data = read_all(fs, "a") == read_all(fs, "b")
    same_ino = fs.getattr("a").st_ino == fs.getattr("b").st_ino
    assert same_data or not same_ino
    fs2 = env.remount(fs)
    assert read_all(fs2, "a") == read_all(fs2, "b") or fs2.getattr("a").st_ino != fs2.getattr("b").st_ino


def test_a_read_handle_opened_before_copy_up_sees_later_writes(mkenv: Callable[..., Env]) -> None:
    """A file opened read-only on its lower copy follows the copy-up: data written through another handle
    afterwards is what it reads (as the kernel's overlayfs does since 4.19)."""
    env = mkenv([{"f": "lower data"}])
    fs = env.open()
    reader = fs.open("f", os.O_RDONLY)
    try:
        assert fs.read(reader, 100, 0) == b"lower data"
        write_file(fs, "f", b"UPPER", flags=os.O_WRONLY)
        assert fs.read(reader, 100, 0) == b"UPPER data"
        assert fs.fgetattr(reader).st_ino == fs.getattr("f").st_ino
    finally:
        fs.release(reader)
    assert read_all(fs, "f") == b"UPPER data"


def test_volatile_copy_up(mkenv: Callable[..., Env]) -> None:
    """volatile=True skips fsync but copies up the same way."""
    env = mkenv([{"f": lower_file(b"vol")}])
    fs = env.open(volatile=True)
    fs.chmod("f", 0o600)
    assert (env.upper / "f").read_bytes() == b"vol"  # type: ignore[operator]


def test_copy_up_of_an_upper_object_is_a_no_op(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{"f": "lower"}], upper={"f": "upper"})
    fs = env.open()
    with fs.lock:
        node = fs.copy_up("f")
    assert node.in_upper
    assert (env.upper / "f").read_bytes() == b"upper"  # type: ignore[operator]


def test_created_files_are_not_marked_with_an_origin(mkenv: Callable[..., Env]) -> None:
    """A file created through the union is not a copy: no origin record, its own inode number."""
    env = mkenv([{}])
    fs = env.open()
    create_file(fs, "new", b"n")
    up = env.upper / "new"  # type: ignore[operator]
    assert xattr(up, fs.inodes.origin_xattr) is None
    assert fs.getattr("new").st_ino == os.lstat(up).st_ino


def test_stage_copy_cleans_up_after_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copyup.stage_copy removes what it staged when any step fails (here: setting the origin record)."""
    from unionfs.fs.fsio import HostDir
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "f").write_bytes(b"data")
    work_dir = tmp_path / "w"
    (work_dir / "work").mkdir(parents=True)
    src, work = HostDir(str(src_dir)), HostDir(str(work_dir))
    try:
        def bad_mark(rel: str) -> None:
            raise OSError(errno.ENOSPC, "no space")
        with pytest.raises(OSError) as info:
            copyup.stage_copy(src, "f", src.lstat("f"), work, "work/tmp", data_limit=None, sync=False,
                              mark=bad_mark)
        assert info.value.errno == errno.ENOSPC
        assert os.listdir(work_dir / "work") == []
    finally:
        src.close()
        work.close()

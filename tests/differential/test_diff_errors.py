"""Error paths: name lengths, missing and non-directory path components, wrong object types, vs the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import WHITEOUT, Symlink

CASES = Catalog()

N255 = "n" * 255
N256 = "n" * 256

TOP = {
    "file": "a file\n",
    "d/in": "in\n",
    "empty": {},
    "todir": Symlink("d"),
    "tofile": Symlink("file"),
    "gone": WHITEOUT,
    "l" * 255: "a lower file with a 255-byte name\n",
}
BOTTOM = {"gone/child": "under a whiteout\n", "d/below": "below\n"}


@CASES.scenario(TOP, BOTTOM)
def name_of_255_bytes_ok_256_enametoolong(r: Recorder) -> None:
    """255-byte names work for create/mkdir/stat; 256 bytes is ENAMETOOLONG (never ENOENT) for every call."""
    r.write("create 255", N255, b"x", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r.call("mkdir 255", os.mkdir, "d/" + N255)
    r.stat("stat 255", N255)
    r.stat("stat lower 255", "l" * 255)
    r.write("create 256", N256, b"x")
    r.call("mkdir 256", os.mkdir, N256)
    r.stat("stat 256", N256)
    r.stat("stat 256 in a lower dir", "d/" + N256)
    r.call("unlink 256", os.unlink, N256)
    r.call("rmdir 256", os.rmdir, N256)
    r.call("rename to 256", os.rename, "file", N256)
    r.call("symlink named 256", os.symlink, "file", N256)
    r.call("link to 256", os.link, "file", N256)
    r.call("mkfifo 256", os.mkfifo, N256)
    r.call("rename 255 over lower 255", os.rename, N255, "l" * 255)
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def enoent_and_enotdir_paths(r: Recorder) -> None:
    """A file used as a directory is ENOTDIR (also via symlink); a missing or whited-out component is ENOENT."""
    r.stat("stat file/x", "file/x")
    r.stat("stat tofile/x", "tofile/x")
    r.stat("stat file/", "file/")
    r.call("open file/x O_CREAT", os.open, "file/x", os.O_WRONLY | os.O_CREAT)
    r.call("mkdir file/x", os.mkdir, "file/x")
    r.call("opendir file", os.listdir, "file")
    r.stat("stat missing/x", "missing/x")
    r.call("mkdir missing/x", os.mkdir, "missing/x")
    r.stat("stat gone/child (under a whiteout)", "gone/child")
    r.call("unlink gone (whited out)", os.unlink, "gone")
    r.call("rmdir gone", os.rmdir, "gone")
    r.call("chmod gone", os.chmod, "gone", 0o600)
    r.call("setxattr gone", os.setxattr, "gone", "user.x", b"1")
    r.call("readlink gone", os.readlink, "gone")
    r.stat("stat d/below/..", "d/below/..")
    r.stat("stat d/../file", "d/../file")
    r.call("utime missing", os.utime, "missing", ns=(1, 1))
    r.call("truncate missing", os.truncate, "missing", 0)


@CASES.scenario(TOP, BOTTOM)
def wrong_type_for_the_call(r: Recorder) -> None:
    """unlink of a dir is EISDIR, rmdir of a file or symlink ENOTDIR, rmdir of ``.`` EINVAL, open of a dir for
    write EISDIR, O_DIRECTORY on a file ENOTDIR."""
    r.call("unlink lower dir", os.unlink, "d")
    r.call("unlink empty lower dir", os.unlink, "empty")
    r.call("rmdir lower file", os.rmdir, "file")
    r.call("rmdir symlink to dir", os.rmdir, "todir")
    r.call("rmdir d/.", os.rmdir, "empty/.")
    r.call("rmdir d/..", os.rmdir, "empty/..")
    r.call("open dir O_WRONLY", os.open, "d", os.O_WRONLY)
    r.call("open dir O_RDWR", os.open, "d", os.O_RDWR)
    r.call("O_DIRECTORY on file", os.open, "file", os.O_RDONLY | os.O_DIRECTORY)
    r.call("O_DIRECTORY on symlink to file", os.open, "tofile", os.O_RDONLY | os.O_DIRECTORY)
    r.call("O_DIRECTORY|O_NOFOLLOW on symlink to dir", os.open, "todir", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    def read_dir_fd() -> bytes:
        fd = os.open("d", os.O_RDONLY)
        try:
            return os.read(fd, 1)
        finally:
            os.close(fd)
    r.call("read a dir fd", read_dir_fd)
    r.stat("stat d (unchanged)", "d")


@CASES.scenario(TOP, BOTTOM)
def creating_over_existing_names(r: Recorder) -> None:
    """mkdir/symlink/mkfifo/link over any existing name (lower file, lower dir, symlink) is EEXIST; over a
    whited-out name it works."""
    for name in ("file", "d", "todir", "empty"):
        r.call(f"mkdir over {name}", os.mkdir, name)
        r.call(f"symlink over {name}", os.symlink, "x", name)
        r.call(f"mkfifo over {name}", os.mkfifo, name)
    r.call("mkdir over whited-out name", os.mkdir, "gone")
    r.listdir("ls gone (empty: opaque over the lower dir)", "gone")
    r.call("mkdir through a dir symlink", os.mkdir, "todir/new")
    r.listdir("ls d", "d")


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel(case: Scenario, tmp_path: Path) -> None:
    """The program under test gives the same outcomes, trees and upper dir as the kernel's overlayfs."""
    assert_same_as_kernel(case, tmp_path)

"""The build context: ignore files, source resolution, symlinks that leave the context, the content digest;
and COPY/ADD into a root directory (a plain directory stands in for the mounted union)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from unionfs.fs.fsio import HostDir
from unionfs.image.build.context import Context, ContextError, Ignore
from unionfs.image.build.copy import Ownership, copy_sources
from unionfs.image.build.rootfs import RootfsError, resolve, user_ids


def make_context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "src" / "sub").mkdir(parents=True)
    (ctx / "src" / "a.c").write_text("int a;\n")
    (ctx / "src" / "b.o").write_text("object\n")
    (ctx / "src" / "sub" / "keep.o").write_text("kept by an exception\n")
    (ctx / "src" / "link").symlink_to("a.c")
    (ctx / "notes.txt").write_text("notes\n")
    (ctx / ".dockerignore").write_text("# objects\n**/*.o\n!src/sub/keep.o\nsecret\n")
    (ctx / "secret").write_text("never\n")
    return ctx


def test_ignore_patterns() -> None:
    ign = Ignore.parse("*.md\n**/build\n/tmp/*\n!tmp/keep\n")
    assert ign.ignored("README.md") and not ign.ignored("docs/README.md")
    assert ign.ignored("build/x") and ign.ignored("a/b/build") and ign.ignored("a/build/y")
    assert ign.ignored("tmp/x") and not ign.ignored("tmp/keep")


def test_resolve_glob_and_walk_honour_the_ignore_file(tmp_path: Path) -> None:
    with Context(str(make_context(tmp_path))) as ctx:
        assert [s.rel for s in ctx.resolve("src/*.c")] == ["src/a.c"]
        assert [s.rel for s in ctx.resolve("/src/../notes.txt")] == ["notes.txt"]
        with pytest.raises(ContextError, match=r"excluded by \.dockerignore"):
            ctx.resolve("secret")
        [src] = ctx.resolve("src")
        assert [rel for rel, _st in ctx.walk(src)] == ["", "a.c", "link", "sub", "sub/keep.o"]
        with pytest.raises(ContextError, match="outside the build context"):
            ctx.resolve("../x")


def test_symlinks_leaving_the_context_are_refused(tmp_path: Path) -> None:
    ctx_dir = make_context(tmp_path)
    (tmp_path / "outside").write_text("host file\n")
    (ctx_dir / "abs").symlink_to("/etc/passwd")
    (ctx_dir / "up").symlink_to("../outside")
    (ctx_dir / "dirlink").symlink_to("..")
    (ctx_dir / "inside").symlink_to("src/a.c")
    with Context(str(ctx_dir)) as ctx:
        for source in ("abs", "up", "dirlink/outside"):
            with pytest.raises(ContextError, match="is a symlink pointing outside the build context"):
                ctx.resolve(source)
            with pytest.raises(ContextError):
                ctx.digest([source])
        [inside] = ctx.resolve("inside")
        assert (inside.rel, inside.name) == ("src/a.c", "inside")


def test_digest_ignores_mtimes_and_sees_bytes_and_modes(tmp_path: Path) -> None:
    ctx_dir = make_context(tmp_path)
    with Context(str(ctx_dir)) as ctx:
        first = ctx.digest(["src", "notes.txt"])
    os.utime(ctx_dir / "src" / "a.c", (1, 1))
    with Context(str(ctx_dir)) as ctx:
        assert ctx.digest(["src", "notes.txt"]) == first
    (ctx_dir / "src" / "a.c").write_text("int b;\n")
    with Context(str(ctx_dir)) as ctx:
        changed = ctx.digest(["src", "notes.txt"])
    assert changed != first
    (ctx_dir / "src" / "a.c").chmod(0o600)
    with Context(str(ctx_dir)) as ctx:
        assert ctx.digest(["src", "notes.txt"]) != changed


def test_copy_rules(tmp_path: Path) -> None:
    ctx_dir = make_context(tmp_path)
    root_dir = tmp_path / "root"
    (root_dir / "usr" / "lib").mkdir(parents=True)
    (root_dir / "lib").symlink_to("/usr/lib")
    (root_dir / "etc").mkdir()
    (root_dir / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n")
    (root_dir / "etc" / "group").write_text("root:x:0:\nstaff:x:50:app\n")
    with tarfile.open(ctx_dir / "files.tgz", "w:gz") as tar:
        data = b"from the archive\n"
        info = tarfile.TarInfo("pkg/readme")
        info.size, info.mode, info.uid = len(data), 0o640, 7
        tar.addfile(info, io.BytesIO(data))
    ctx = Context(str(ctx_dir))
    root = HostDir(str(root_dir))
    try:
        assert user_ids(root, "app") == (1000, 1000) and user_ids(root, "app:staff") == (1000, 50)
        with pytest.raises(RootfsError, match="no user 'ghost'"):
            user_ids(root, "ghost")
        assert resolve(root, "/lib/x") == "usr/lib/x"
        copy_sources(ctx, root, keyword="COPY", sources=("src",), dest="/lib/app/", owner=Ownership(1000, 50))
        app = root_dir / "usr" / "lib" / "app"
        assert sorted(os.listdir(app)) == ["a.c", "link", "sub"]
        assert os.readlink(app / "link") == "a.c"
        st = os.lstat(app / "a.c")
        assert (st.st_uid, st.st_gid) == (1000, 50)
        copy_sources(ctx, root, keyword="COPY", sources=("notes.txt",), dest="/opt/n.txt", owner=Ownership(chmod=0o600))
        st = os.stat(root_dir / "opt" / "n.txt")
        assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, "0o600")
        with pytest.raises(RootfsError, match="several sources"):
            copy_sources(ctx, root, keyword="COPY", sources=("notes.txt", "src/a.c"), dest="/opt/one",
                         owner=Ownership())
        copy_sources(ctx, root, keyword="ADD", sources=("files.tgz",), dest="/srv/", owner=Ownership())
        readme = root_dir / "srv" / "pkg" / "readme"
        assert readme.read_bytes() == b"from the archive\n" and os.stat(readme).st_uid == 7
        copy_sources(ctx, root, keyword="COPY", sources=("files.tgz",), dest="/srv/", owner=Ownership())
        assert (root_dir / "srv" / "files.tgz").exists()  # COPY does not unpack
    finally:
        ctx.close()
        root.close()


def test_add_refuses_an_archive_leaving_the_destination(tmp_path: Path) -> None:
    ctx_dir = tmp_path / "ctx"
    ctx_dir.mkdir()
    with tarfile.open(ctx_dir / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "root").mkdir()
    ctx, root = Context(str(ctx_dir)), HostDir(str(tmp_path / "root"))
    try:
        with pytest.raises(RootfsError, match="leaves the destination"):
            copy_sources(ctx, root, keyword="ADD", sources=("evil.tar",), dest="/x/", owner=Ownership())
    finally:
        ctx.close()
        root.close()
    assert not (tmp_path / "escaped").exists()

"""``unionfs build``: real runc (and unshare), real podman as the reference.

The Debian Containerfile (gcc compiles a C file; files copied, removed and overwritten across steps) builds,
runs, shows its steps in ``history``, rebuilds from the cache, and gives the tree ``podman build`` gives.
The cache rules and the failure paths use a busybox base: each build takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from build_support import UNIONFS, BuildStore, cached_flags, make_busybox_tree, tree
from e2e_support import BASE_IMAGE, Storage, ensure_base_tarball, missing_requirements, run

pytestmark = pytest.mark.e2e

GREETING = "Hello from an image built by unionfs"
HELLO_C = """#include <stdio.h>
int main(void) { puts(GREETING); return 0; }
"""
E2E_CONTAINERFILE = """\
# syntax=docker/dockerfile:1
ARG BASE=e2e-base
FROM $BASE
ARG GREETING="Hello from an image built by unionfs"
WORKDIR /src
COPY hello.c ./
COPY data/ /data/
RUN gcc -O2 -DGREETING="\\"$GREETING\\"" -o /usr/local/bin/hello hello.c \\
    && echo first > /data/overwritten.txt
RUN rm -rf /src /data/remove-me /usr/share/common-licenses /etc/issue \\
    && echo second > /data/overwritten.txt
ENV APP=hello
LABEL purpose=test
CMD ["/usr/local/bin/hello"]
"""
E2E_STEPS = 10


@pytest.fixture(scope="session")
def build_store() -> Iterator[BuildStore]:
    """A store with the busybox base ``bb``; removed at the end (nothing may stay mounted under it)."""
    missing = missing_requirements() + ([] if os.path.exists("/bin/busybox") else ["busybox-static"])
    if missing:
        message = f"unionfs build tests need {', '.join(missing)} (Makefile APT_PACKAGES)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    top = Path(tempfile.mkdtemp(prefix="unionfs-build-"))
    store = BuildStore(top / "store")
    try:
        make_busybox_tree(top / "bb")
        store.unionfs("import-dir", str(top / "bb"), "--image", "bb")
        yield store
    finally:
        left = [p for p in store.leftovers() if not p.startswith("tmp/")]
        for mountpoint in left:  # only what this pytest run mounted under its own store; never rm through a mount
            run(["umount", "-l", mountpoint], check=False)
        run(["rm", "-rf", "--one-file-system", str(top)], check=False)
        assert not left, left


@pytest.fixture(scope="session")
def debian_store(build_store: BuildStore) -> BuildStore:
    """The same store with the cached Debian base imported as ``e2e-base``."""
    tarball = ensure_base_tarball()
    tree_dir = build_store.root.parent / "debian"
    tree_dir.mkdir()
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xf", str(tarball), "-C", str(tree_dir)])
    build_store.unionfs("import-dir", str(tree_dir), "--image", "e2e-base", "--cmd", "/bin/bash")
    run(["rm", "-rf", str(tree_dir)])
    return build_store


def e2e_context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "data").mkdir(parents=True)
    (ctx / "hello.c").write_text(HELLO_C)
    (ctx / "data" / "keep.txt").write_text("kept\n")
    (ctx / "data" / "remove-me").write_text("removed by a later step\n")
    (ctx / "data" / "overwritten.txt").write_text("from the context\n")
    (ctx / "Containerfile").write_text(E2E_CONTAINERFILE)
    (ctx / ".containerignore").write_text("*.o\nscratch/\n")
    (ctx / "scratch").mkdir()
    (ctx / "scratch" / "junk").write_text("never copied\n")
    return ctx


def test_e2e_containerfile_builds_runs_and_shows_history(debian_store: BuildStore, tmp_path: Path) -> None:
    ctx = e2e_context(tmp_path)
    out = debian_store.build(ctx, "-t", "hello:1", "--no-cache").stdout
    assert "Using cache" not in out
    assert f"STEP {E2E_STEPS}/{E2E_STEPS}: CMD" in out
    image_id = out.strip().splitlines()[-1]
    with debian_store.mounted("hello:1") as mnt:
        ran = run(["chroot", str(mnt), "/usr/local/bin/hello"])
        assert ran.stdout.strip() == GREETING
        assert (mnt / "data" / "keep.txt").read_text() == "kept\n"
        assert (mnt / "data" / "overwritten.txt").read_text() == "second\n"
        for gone in ("src", "data/remove-me", "usr/share/common-licenses", "etc/issue"):
            assert not (mnt / gone).exists(), gone
        assert (mnt / "etc" / "debian_version").exists()
    entries = json.loads(debian_store.unionfs("history", "hello:1", "--json").stdout)
    run_layers = [debian_store.root / "layers" / e["layer"] for e in entries if e["created_by"].startswith("RUN")]
    assert len(run_layers) == 2
    for layer in run_layers:  # the runtime's mountpoints and /etc/hosts never reach a layer
        assert [p for p in ("proc", "sys", "dev", "etc/hosts") if (layer / p).exists()] == []
    history = debian_store.unionfs("history", "hello:1").stdout.splitlines()[1:]
    steps = [line for line in history if "import-dir" not in line]
    assert len(steps) == E2E_STEPS - 1
    for instruction in ("CMD [\"/usr/local/bin/hello\"]", "LABEL purpose=test", "ENV APP=hello", "RUN rm -rf /src",
                        "RUN gcc -O2", "COPY data/ /data/", "COPY hello.c /src/", "WORKDIR /src", "ARG GREETING"):
        assert sum(instruction in line for line in steps) == 1, (instruction, steps)
    assert steps[0].split()[2:4] == ["CMD", '["/usr/local/bin/hello"]']  # newest first
    images = {i.split()[0]: i.split()[1] for i in debian_store.unionfs("images").stdout.splitlines()[1:]}
    assert image_id.startswith(images["hello:1"])


def test_e2e_rebuild_hits_the_cache_on_every_step(debian_store: BuildStore, tmp_path: Path) -> None:
    ctx = e2e_context(tmp_path)
    first = debian_store.build_events(ctx, "-t", "hello:2")
    second = debian_store.build_events(ctx, "-t", "hello:2")
    assert all(cached_flags(second)) and len(cached_flags(second)) == E2E_STEPS - 1
    assert first[-1]["id"] == second[-1]["id"]


def test_e2e_tree_equals_podman_build(debian_store: BuildStore, kernel_storage: Storage, tmp_path: Path) -> None:
    """The same Containerfile through ``podman build`` (kernel overlay driver): the same files, modes,
    owners, contents and link targets; mtimes and what podman itself adds are not compared."""
    ctx = e2e_context(tmp_path)
    debian_store.build(ctx, "-t", "hello:podman")
    name = "localhost/unionfs-build-compare"
    kernel_storage.podman("build", "--build-arg", f"BASE={BASE_IMAGE}", "-t", name, str(ctx))
    podman_root = Path(kernel_storage.podman("image", "mount", name).stdout.strip())
    try:
        ignore = frozenset({"run/.containerenv", "etc/hosts", "etc/hostname", "etc/resolv.conf"})
        theirs = tree(podman_root, ignore=ignore)
        with debian_store.mounted("hello:podman") as mnt:
            ours = tree(mnt, ignore=ignore)
    finally:
        kernel_storage.podman("image", "unmount", name, check=False)
        kernel_storage.podman("rmi", name, check=False)
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    differ = sorted(p for p in set(ours) & set(theirs) if ours[p] != theirs[p])
    assert (only_ours, only_theirs, differ[:20]) == ([], [], [])
    assert len(ours) > 5000  # the whole Debian tree was compared


# -- the cache rules, on busybox ----------------------------------------------------------------------------------

CACHE_CONTAINERFILE = """\
FROM bb
RUN echo base > /base.txt
COPY a.txt /a.txt
RUN cat /a.txt > /b.txt
ARG LATE=one
RUN echo "$LATE" > /late.txt
"""


def cache_context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("alpha\n")
    (ctx / "Containerfile").write_text(CACHE_CONTAINERFILE)
    return ctx


def test_touching_an_mtime_still_hits(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    build_store.build(ctx)
    future = time.time() + 3600
    os.utime(ctx / "a.txt", (future, future))
    assert cached_flags(build_store.build_events(ctx)) == [True] * 5


def test_one_changed_byte_rebuilds_from_that_copy(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    first = build_store.build_events(ctx)
    (ctx / "a.txt").write_text("alphA\n")
    second = build_store.build_events(ctx)
    assert cached_flags(second) == [True, False, False, False, False]
    assert first[1]["id"] == second[1]["id"]  # the RUN above the COPY: the same state
    build_store.build(ctx, "-t", "changed")
    with build_store.mounted("changed") as mnt:
        assert (mnt / "b.txt").read_text() == "alphA\n"


def test_a_build_arg_used_later_rebuilds_only_from_there(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    build_store.build(ctx)
    events = build_store.build_events(ctx, "--build-arg", "LATE=two", "-t", "late")
    assert cached_flags(events) == [True, True, True, True, False]
    with build_store.mounted("late") as mnt:
        assert (mnt / "late.txt").read_text() == "two\n"


def test_no_cache_runs_every_step_and_gives_the_same_image(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    first = build_store.build_events(ctx)
    again = build_store.build_events(ctx, "--no-cache")
    assert cached_flags(again) == [False] * 5
    assert again[-1]["layers"][:-4] == first[-1]["layers"][:-4]  # the base


def test_chroot_isolation_runs_the_steps(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    (ctx / "Containerfile").write_text("FROM bb\nUSER nobody\nWORKDIR /home/x\n"
                                       "RUN id -u > /tmp/uid && pwd > /tmp/pwd\n")
    build_store.build(ctx, "--isolation", "chroot", "-t", "chrooted")
    with build_store.mounted("chrooted") as mnt:
        assert (mnt / "tmp" / "uid").read_text() == "65534\n"
        assert (mnt / "tmp" / "pwd").read_text() == "/home/x\n"
        assert not (mnt / "proc").exists()


def test_workdir_creates_a_missing_directory_only(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    (ctx / "Containerfile").write_text("FROM bb\nWORKDIR /made/here\nWORKDIR /tmp\nCMD [\"sh\"]\n")
    events = build_store.build_events(ctx, "-t", "workdirs")
    steps = [e for e in events if e["event"] == "step"]
    assert [bool(e["layer"]) for e in steps[1:]] == [True, False, False]
    with build_store.mounted("workdirs") as mnt:
        assert (mnt / "made" / "here").is_dir()


def test_a_run_step_renames_a_lower_directory(build_store: BuildStore, tmp_path: Path) -> None:
    """``mv`` of a directory an earlier layer holds: the step's mount renames it (a redirect), and its layer
    carries the move as a whiteout and an opaque copy, never the redirect."""
    ctx = cache_context(tmp_path)
    (ctx / "data").mkdir()
    (ctx / "data" / "one.txt").write_text("1\n")
    (ctx / "data" / "sub").mkdir()
    (ctx / "data" / "sub" / "two.txt").write_text("2\n")
    (ctx / "Containerfile").write_text("FROM bb\nCOPY data/ /data/\nRUN mv /data /moved\n")
    build_store.build(ctx, "-t", "renamed")
    with build_store.mounted("renamed") as mnt:
        assert not (mnt / "data").exists()
        assert (mnt / "moved" / "one.txt").read_text() == "1\n"
        assert (mnt / "moved" / "sub" / "two.txt").read_text() == "2\n"
    for dirpath, dirnames, _ in os.walk(build_store.root / "layers"):
        for name in dirnames:
            attrs = os.listxattr(os.path.join(dirpath, name), follow_symlinks=False)
            assert not any(a.endswith("overlay.redirect") for a in attrs), os.path.join(dirpath, name)


# -- failures: a clear error, the store as it was -------------------------------------------------------------------

@pytest.mark.parametrize(("containerfile", "message"), [
    ("FROM bb\nRUN echo fine\nRUNN echo typo\n", "Containerfile:3: unknown instruction 'RUNN'"),
    ("FROM bb\nCOPY missing.txt /x\n", "Containerfile:2: COPY: missing.txt: no such file or directory"),
    ("FROM bb\nCOPY evil /x\n", "Containerfile:2: COPY: evil: evil is a symlink pointing outside the build context"),
    ("FROM bb\nCOPY inner/evil /x\n", "Containerfile:2: COPY: inner/evil: inner is a symlink pointing outside"),
    ("FROM nosuch\nRUN true\n", "Containerfile:1: FROM nosuch: unknown image 'nosuch'"),
    ("FROM bb\nENV A=${B\n", "Containerfile:2: ENV: missing '}'"),
])
def test_refused_before_any_step(build_store: BuildStore, tmp_path: Path, containerfile: str, message: str) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(containerfile)
    (ctx / "evil").symlink_to("/etc/passwd")
    (ctx / "inner").symlink_to("../..")
    before = build_store.state()
    result = build_store.build(ctx, "-t", "never", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"unionfs: error: {message}"), result.stderr
    assert "STEP 2/" not in result.stdout
    assert build_store.state() == before
    assert build_store.leftovers() == []


def test_failing_run_stops_the_build_and_commits_nothing(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    (ctx / "b.txt").write_text(f"{time.time()}\n")  # a layer no other test makes
    (ctx / "Containerfile").write_text("FROM bb\nCOPY b.txt /b.txt\nRUN echo partial > /p && exit 3\n")
    before = build_store.state()
    result = build_store.build(ctx, "-t", "never", check=False)
    assert result.returncode == 1
    assert "unionfs: error: Containerfile:3: RUN echo partial > /p && exit 3: the command failed (exit status 3)" \
        in result.stderr
    after = build_store.state()
    assert after["images"] == before["images"]
    assert build_store.leftovers() == []
    # the COPY layer was made by an abandoned build only: gc removes it, and the store is as it was
    gc = build_store.unionfs("gc", "--json").stdout
    assert '"removed_cache"' in gc
    assert build_store.state() == before


def test_ctrl_c_stops_the_step_and_leaves_the_store(build_store: BuildStore, tmp_path: Path) -> None:
    ctx = cache_context(tmp_path)
    (ctx / "Containerfile").write_text(f"FROM bb\nRUN echo {time.time()} > /t && sleep 60\n")
    before = build_store.state()
    env = {**os.environ, "UNIONFS_STORE": str(build_store.root)}
    with subprocess.Popen([UNIONFS, "build", "-t", "never", str(ctx)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("STEP 2/2"):
                break
        time.sleep(1.0)  # the container runs
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert time.monotonic() - started < 30
    assert "interrupted" in err
    assert build_store.leftovers() == []
    assert build_store.state()["images"] == before["images"]


def test_two_builds_at_once_and_gc(build_store: BuildStore, tmp_path: Path) -> None:
    contexts = []
    for i in range(2):
        ctx = tmp_path / f"ctx{i}"
        ctx.mkdir()
        (ctx / "f.txt").write_text(f"{i} {time.time()}\n")
        (ctx / "Containerfile").write_text("FROM bb\nCOPY f.txt /f.txt\nRUN cat /f.txt > /g.txt\n")
        contexts.append(ctx)
    env = {**os.environ, "UNIONFS_STORE": str(build_store.root)}
    procs = [subprocess.Popen([UNIONFS, "build", "-q", "-t", f"par{i}", str(ctx)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, ctx in enumerate(contexts)]
    gc = subprocess.Popen([UNIONFS, "gc", "--json"], env=env, stdout=subprocess.PIPE, text=True)
    results = [p.communicate(timeout=120) for p in procs]
    gc.communicate(timeout=120)
    assert [p.returncode for p in procs] == [0, 0], results
    assert build_store.unionfs("gc", "--verify").returncode == 0  # nothing broken
    for i in range(2):
        with build_store.mounted(f"par{i}") as mnt:
            assert (mnt / "g.txt").read_text() == (contexts[i] / "f.txt").read_text()
    # a finished build's cache survives gc
    assert cached_flags(build_store.build_events(contexts[0])) == [True, True]

"""Random operation sequences on unionfs and on the kernel's overlayfs, compared after every step.

A hypothesis ``RuleBasedStateMachine`` builds 1-4 random lower layers (``support.strategies``), gives each side
its own faithful copy, mounts unionfs on one and the kernel's overlayfs (``redirect_dir=off``, ``index=off``,
``metacopy=off``, ``xino=off``) on the other, and applies the same operations to both. After every step it
compares:

- the operation's outcome: its (normalised) return value, or the errno name;
- a normalised snapshot of the whole visible tree (``support.snapshot``: names, types, modes, owners, sizes,
  link counts, content hashes, symlink targets, ``user.*`` xattrs, mtimes of non-dirs as "layer time or
  new", which paths share an inode), ignoring atime, ctime, st_dev and directory sizes and mtimes;
- which paths kept their ``st_ino`` since the previous snapshot (copy-up and remount must not change it).

Rules also keep files open across steps, and **remount** both sides in the middle of a sequence. At the end
(teardown) it compares the two upper dirs (normalised: whiteout formats unified), checks that no lower layer
was modified, and makes the **cross-mount** check: unionfs is unmounted and its upper dir is mounted with the
kernel's overlayfs over the same lowers; that tree must equal the kernel's own result. Everything is always
unmounted, also when a step failed.

Family ``oci``: unionfs gets lower layers with OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) and writes that
format into its upper (``whiteout=oci``); the kernel gets the same layers converted to its format. For the
cross-mount a copy of unionfs's upper is converted too.  Family ``redirect``: kernel-format layers, both
sides (and the cross-mount) with ``redirect_dir=on``, so renames of directories with lower copies succeed
and nest freely, and the upper dirs compare their redirect xattrs.  Family ``index``: as ``redirect``, and
both sides with ``index=on``: the generated lowers' hard links stay one file across copy-up (the cross-mount
reads unionfs's index, in the same work dir).

Everything runs on a private tmpfs, so inode numbers are never reused within a run (ext4 reuses them at
once, which would make "kept its inode" ambiguous); ``UNIONFS_SM_TMPFS=0`` runs on the disk instead.

Deliberate differences (``docs/semantics.md``) are normalised away: the whiteouts the kernel lists in unmerged
directories (``without_ghosts``, kernel side only). The upper dirs are compared as they are, every opaque
mark included (also those that hide nothing: the rule of ``test_state_machine.py``, and of the kernel's
on-disk format). Divergences found and not fixed yet are reduced to strict-xfail scenarios in
``test_regressions.py`` and tolerated here by exact outcome (``KNOWN_DIVERGENCES``; ``UNIONFS_SM_STRICT=1``
tolerates nothing). ``UNIONFS_MOUNT_PROG=kernel`` puts the kernel on both sides: the
kernel family must then pass (the harness is deterministic), the OCI family must fail.

Budget: the ``ci`` profile runs ``CI_EXAMPLES`` derandomized examples per family; ``dev`` (``make fuzz``) runs
the profile's ``max_examples``. ``UNIONFS_SM_EXAMPLES`` / ``UNIONFS_SM_STEPS`` override both, and
``UNIONFS_SM_SNAPSHOT_EVERY=n`` compares trees every n steps only. The number of examples and steps run is
printed at the end of each test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import layers as L
from support import strategies as S
from support.differential import FAMILY_OPTIONS, recent_cutoff
from support.mounts import (
    KERNEL_AS_PROGRAM,
    frontend,
    kernel_overlay_mount,
    mount_program,
    unionfs_mount,
)
from support.scratch import scratch_area
from support.snapshot import Snapshot, diff_snapshots, errno_name, snapshot, stat_entry, upper_snapshot
from support.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from unionfs.mountinfo import find_mount

CI_EXAMPLES = {"kernel": 30, "oci": 15, "redirect": 15, "index": 15}
CI_STEPS = 30
DEV_STEPS = 50
MAX_OPEN_FILES = 4
MIN_STEPS_BETWEEN_REMOUNTS = 4
"""Hypothesis picks among the enabled rules evenly; unrestricted, the argument-less remount takes a third of
all steps (and most of the time)."""
FAMILIES = ("kernel", "oci", "redirect", "index")
# FAMILY_OPTIONS (support.differential): ``redirect`` renames directories with lower copies on both sides,
# ``index`` also keeps the names of a lower hard link one file across copy-up (the inode index).
HANG_TIMEOUT = float(os.environ.get("UNIONFS_TEST_HANG_TIMEOUT", "900"))
"""A mount lives for a whole sequence (until a remount): allow more than the harness's default."""

Outcome = tuple[str, object]


class Divergence(AssertionError):
    """unionfs and the kernel's overlayfs disagree."""


@dataclass(frozen=True)
class Known:
    """A divergence already reduced to a strict-xfail scenario of ``test_regressions.py`` (``scenario``) and
    not fixed yet: the machine tolerates it (and counts it) so that it can look further.
    ``UNIONFS_SM_STRICT=1`` turns every tolerance off."""

    scenario: str
    op: str
    kernel: Outcome | None  # None: whatever the kernel answers
    unionfs: Outcome


KNOWN_DIVERGENCES: tuple[Known, ...] = (
    # the fusepy frontend (libfuse's path-based API) has no node for a name that is gone
    (Known("fstat_of_an_open_file_whose_name_is_gone", "fstat", None, ("error", "ESTALE")),)
    if frontend() == "fusepy" else ()
)
STRICT = os.environ.get("UNIONFS_SM_STRICT", "0") == "1"


def known_divergence(op: str, kernel: Outcome, unionfs: Outcome) -> Known | None:
    """The entry of ``KNOWN_DIVERGENCES`` that explains these outcomes of ``op``, if any (never when strict)."""
    if STRICT:
        return None
    for known in KNOWN_DIVERGENCES:
        if known.op == op and known.unionfs == unionfs and known.kernel in (None, kernel):
            return known
    return None


# --- the two sides ---------------------------------------------------------------------------------------

@dataclass
class Side:
    """One overlay (kernel or unionfs) over its own copy of the layers; ``root`` is None while unmounted."""

    name: str
    layers: L.LayerSet
    mount: Callable[[], contextlib.AbstractContextManager[Path]]
    stack: contextlib.ExitStack | None = None
    root: Path | None = None
    inos: dict[str, int] = field(default_factory=dict)
    kernel: bool = False
    """The kernel's overlayfs (on the program's side too when the harness checks itself): it lists the
    whiteouts of unmerged directories, which the comparisons leave out (``without_ghosts``)."""

    def up(self) -> Path:
        stack = contextlib.ExitStack()
        self.root = stack.enter_context(self.mount())
        self.stack = stack
        return self.root

    def down(self) -> None:
        """Unmount (a no-op when not mounted); errors of the unmount (a dead daemon) propagate."""
        stack, self.stack, self.root = self.stack, None, None
        if stack is not None:
            stack.close()

    def at(self, path: str) -> str:
        assert self.root is not None, f"{self.name} is not mounted"
        return str(self.root / path)


def outcome(fn: Callable[[], object]) -> Outcome:
    """``("ok", value)`` or ``("error", ERRNO-NAME)``; anything but OSError propagates."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("error", errno_name(e.errno))


RENAME_FLAGS = {"noreplace": RENAME_NOREPLACE, "exchange": RENAME_EXCHANGE}


def content_id(data: bytes) -> object:
    """Short data verbatim, longer data as (length, hash)."""
    return data if len(data) <= 32 else (len(data), hashlib.sha256(data).hexdigest()[:16])


def fstat_entry(fd: int) -> tuple[object, ...]:
    st_ = os.fstat(fd)
    return (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid, st_.st_nlink,
            st_.st_size if not stat.S_ISDIR(st_.st_mode) else None)


def inode_map(root: Path) -> dict[str, int]:
    """``{relative path: st_ino}`` of everything visible under ``root`` (symlinks not followed)."""
    out: dict[str, int] = {}

    def visit(rel: str) -> None:
        path = root / rel
        try:
            st_ = os.lstat(path)
        except OSError:
            return
        out[rel] = st_.st_ino
        if stat.S_ISDIR(st_.st_mode):
            try:
                names = os.listdir(path)
            except OSError:
                return
            for name in names:
                visit(name if rel == "." else f"{rel}/{name}")

    visit(".")
    return out


def listing(path: str, *, drop_ghosts: bool) -> list[tuple[str, str, bool]]:
    """readdir as a sorted list of (name, type from the entry, d_ino == st_ino).

    ``drop_ghosts`` leaves out names that are listed but do not exist (ENOENT): the kernel lists the
    whiteouts of a directory that is not merged (see ``without_ghosts``).
    """
    out = []
    with os.scandir(path) as it:
        for e in it:
            try:
                ino = os.lstat(e.path).st_ino
            except FileNotFoundError:
                if drop_ghosts:
                    continue
                ino = -1
            kind = ("symlink" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                    else "file" if e.is_file(follow_symlinks=False) else "other")
            out.append((e.name, kind, e.inode() == ino))
    return sorted(out)


def without_ghosts(snap: Snapshot) -> Snapshot:
    """``snap`` without the names that were listed but do not exist.

    The kernel's overlayfs reads a directory that exists in one layer only (not merged, not copied up) straight
    from that layer, whiteouts included: they are listed, and ENOENT on lookup. unionfs never lists a whiteout
    (``docs/semantics.md``), so the kernel's snapshots are compared without those ghosts.
    """
    return {path: entry for path, entry in snap.items() if entry.type != "error:ENOENT"}


def rm_rf(path: str) -> None:
    """``rm -rf path``: remove the tree, ignoring names that vanish (or never existed) below ``path``.

    ENOENT for ``path`` itself is reported (it says more than ``rm -f``'s silence). A non-directory is
    unlinked, like ``rm`` does (and ``shutil.rmtree`` would open it first, which blocks on a fifo).
    """
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return

    def ignore_missing(fn: Callable[..., object], name: str, exc: Any) -> None:
        error = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(error, FileNotFoundError) or name == path:
            raise error

    shutil.rmtree(path, onerror=ignore_missing)


# --- the machine -----------------------------------------------------------------------------------------

class UnionMachine(RuleBasedStateMachine):
    """See the module docstring. Subclassed per run with ``family`` and ``area`` (a scratch directory)."""

    family: ClassVar[str] = "kernel"
    area: ClassVar[Path] = Path(tempfile.gettempdir())
    stats: ClassVar[Counter[str]] = Counter()
    snapshot_every: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="sm-", dir=self.area))
        self.sides: list[Side] = []
        self.fds: list[tuple[int, int, str]] = []
        self.kernel_sources: list[Path] = []
        self.lowers_before: list[Snapshot] = []
        self.changed_after = 0
        self.since_snapshot = 0
        self.since_remount = 0
        self.trace: list[str] = []
        """This example's steps so far (named in a divergence: a replay may not reach it again)."""
        self.stats["examples"] += 1

    # --- plumbing ------------------------------------------------------------------------------------

    @property
    def kernel(self) -> Side:
        return self.sides[0]

    @property
    def program(self) -> Side:
        return self.sides[1]

    def both(self, label: str, fn: Callable[[Side], object]) -> Outcome:
        """Run ``fn`` on each side; the outcomes must be equal."""
        self.stats["steps"] += 1
        self.trace.append(label)
        results = [outcome(lambda s=s: fn(s)) for s in self.sides]
        if results[0] != results[1]:
            known = known_divergence(label.split()[0], results[0], results[1])
            if known is not None:
                self.stats[f"tolerated {known.scenario}"] += 1
                return results[0]
            raise self._divergence(f"{label}:\n  kernel:  {results[0]!r}\n  unionfs: {results[1]!r}")
        return results[0]

    def _divergence(self, message: str) -> Divergence:
        """A divergence that names the steps of this example that led to it."""
        return Divergence(message + "\nsteps of this example:\n  " + "\n  ".join(self.trace[-60:]))

    def _snapshot(self, side: Side) -> Snapshot:
        assert side.root is not None
        snap = snapshot(side.root, changed_after=self.changed_after)
        return without_ghosts(snap) if side.kernel else snap

    def _close_fds(self) -> None:
        for kfd, pfd, _ in self.fds:
            for fd in (kfd, pfd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = []

    def _fd(self, index: int) -> tuple[int, int, str]:
        return self.fds[index % len(self.fds)]

    # --- setup ---------------------------------------------------------------------------------------

    @initialize(specs=S.layer_stacks())
    def build(self, specs: tuple[L.Spec, ...]) -> None:
        """Build the layers (kernel format, and OCI format for the ``oci`` family) and mount both sides."""
        src = self.base / "src"
        src.mkdir()
        self.trace.append(f"layers {specs!r}")
        self.kernel_sources = [L.build_layer(spec, src / f"k{i}") for i, spec in enumerate(specs)]
        options: tuple[str, ...] = ()
        program_sources = self.kernel_sources
        if self.family == "oci":
            program_sources = [L.build_layer(spec, src / f"o{i}", whiteouts="oci") for i, spec in enumerate(specs)]
            options = ("whiteout=oci",)
        else:
            options = ("whiteout=kernel",)
        both = FAMILY_OPTIONS[self.family]
        self_check = mount_program() == KERNEL_AS_PROGRAM  # the harness checking itself: kernel on both sides
        if self_check:
            options = ()
        options = (*options, *both)
        kls = L.new_layer_set(self.base / "kernel", self.kernel_sources)
        pls = L.new_layer_set(self.base / "unionfs", program_sources)
        self.lowers_before = [upper_snapshot(p) for p in pls.lowers]
        self.sides = [
            Side("kernel", kls, lambda: kernel_overlay_mount(kls.lowers, kls.upper, kls.work, kls.mnt, both),
                 kernel=True),
            Side("unionfs", pls, lambda: unionfs_mount(pls.lowers, pls.upper, pls.work, pls.mnt, options,
                                                       hang_timeout=HANG_TIMEOUT), kernel=self_check),
        ]
        self.changed_after = recent_cutoff()
        for side in self.sides:
            side.up()
        self.stats["mounts"] += 1

    # --- comparisons after every step ----------------------------------------------------------------

    @invariant()
    def same_visible_tree(self) -> None:
        """The trees are equal, and the same paths kept their inode numbers since the last comparison."""
        if len(self.sides) != 2 or any(s.root is None for s in self.sides):
            return
        self.since_remount += 1
        self.since_snapshot += 1
        if self.since_snapshot < self.snapshot_every:
            return
        self.since_snapshot = 0
        snaps = [self._snapshot(s) for s in self.sides]
        lines = diff_snapshots(snaps[0], snaps[1], names=("kernel", "unionfs"))
        if lines:
            raise self._divergence("visible tree differs:\n" + "\n".join(lines))
        changed = []
        for side in self.sides:
            assert side.root is not None
            now = inode_map(side.root)
            changed.append(sorted(p for p in side.inos.keys() & now.keys() if side.inos[p] != now[p]))
            side.inos = now
        if changed[0] != changed[1]:
            raise self._divergence(f"st_ino changed for different paths:\n  kernel:  {changed[0]}\n"
                             f"  unionfs: {changed[1]}")

    # --- creating and writing ------------------------------------------------------------------------

    @rule(path=S.paths(), mode=S.file_modes, data=S.write_data)
    def create(self, path: str, mode: int, data: bytes) -> None:
        def go(s: Side) -> int:
            fd = os.open(s.at(path), os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, mode)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(f"create {path} mode {mode:o}", go)

    @rule(path=S.paths(), mode=S.file_modes)
    def create_excl(self, path: str, mode: int) -> None:
        self.both(f"open {path} O_CREAT|O_EXCL", lambda s: os.close(
            os.open(s.at(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, mode)))

    @rule(path=S.paths(), offset=S.offsets, data=S.write_data)
    def write_at(self, path: str, offset: int, data: bytes) -> None:
        def go(s: Side) -> int:
            fd = os.open(s.at(path), os.O_WRONLY | os.O_NONBLOCK)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(f"pwrite {path} at {offset}", go)

    @rule(path=S.paths(), data=S.write_data)
    def append(self, path: str, data: bytes) -> None:
        def go(s: Side) -> int:
            fd = os.open(s.at(path), os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(f"append {path}", go)

    @rule(path=S.paths())
    def open_trunc(self, path: str) -> None:
        self.both(f"open {path} O_TRUNC", lambda s: os.close(
            os.open(s.at(path), os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK)))

    @rule(path=S.paths())
    def open_rdwr_no_write(self, path: str) -> None:
        self.both(f"open {path} O_RDWR, close", lambda s: os.close(os.open(s.at(path), os.O_RDWR | os.O_NONBLOCK)))

    @rule(path=S.paths(), length=S.lengths)
    def truncate(self, path: str, length: int) -> None:
        self.both(f"truncate {path} {length}", lambda s: os.truncate(s.at(path), length))

    @rule(path=S.paths(), length=S.lengths)
    def ftruncate(self, path: str, length: int) -> None:
        def go(s: Side) -> None:
            fd = os.open(s.at(path), os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.ftruncate(fd, length)
            finally:
                os.close(fd)
        self.both(f"ftruncate {path} {length}", go)

    @rule(path=S.paths())
    def read(self, path: str) -> None:
        def go(s: Side) -> object:
            fd = os.open(s.at(path), os.O_RDONLY | os.O_NONBLOCK)
            try:
                return content_id(os.pread(fd, 1 << 18, 0))
            finally:
                os.close(fd)
        self.both(f"read {path}", go)

    # --- namespace -----------------------------------------------------------------------------------

    @rule(path=S.paths())
    def unlink(self, path: str) -> None:
        self.both(f"unlink {path}", lambda s: os.unlink(s.at(path)))

    @rule(path=S.paths(), mode=S.dir_modes)
    def mkdir(self, path: str, mode: int) -> None:
        self.both(f"mkdir {path} {mode:o}", lambda s: os.mkdir(s.at(path), mode))

    @rule(path=S.paths())
    def rmdir(self, path: str) -> None:
        self.both(f"rmdir {path}", lambda s: os.rmdir(s.at(path)))

    @rule(path=S.paths())
    def rm_rf(self, path: str) -> None:
        self.both(f"rm -rf {path}", lambda s: rm_rf(s.at(path)))

    @rule(src=S.paths(), dst=S.paths())
    def rename(self, src: str, dst: str) -> None:
        self.both(f"rename {src} {dst}", lambda s: os.rename(s.at(src), s.at(dst)))

    @rule(src=S.paths(), dst=S.paths(), flags=st.sampled_from(sorted(RENAME_FLAGS)))
    def renameat2(self, src: str, dst: str, flags: str) -> None:
        self.both(f"renameat2 {src} {dst} {flags}", lambda s: renameat2(s.at(src), s.at(dst), RENAME_FLAGS[flags]))

    @rule(src=S.paths(), dst=S.paths(), follow=st.booleans())
    def link(self, src: str, dst: str, follow: bool) -> None:
        self.both(f"link {src} {dst} follow={follow}",
                  lambda s: os.link(s.at(src), s.at(dst), follow_symlinks=follow))

    @rule(link_to=S.symlink_targets, path=S.paths())
    def symlink(self, link_to: str, path: str) -> None:
        self.both(f"symlink {link_to} {path}", lambda s: os.symlink(link_to, s.at(path)))

    @rule(path=S.paths(), mode=st.sampled_from((0o644, 0o600)))
    def mkfifo(self, path: str, mode: int) -> None:
        self.both(f"mkfifo {path}", lambda s: os.mkfifo(s.at(path), mode))

    # --- metadata ------------------------------------------------------------------------------------

    @rule(path=S.paths(), mode=st.one_of(S.file_modes, S.dir_modes))
    def chmod(self, path: str, mode: int) -> None:
        self.both(f"chmod {mode:o} {path}", lambda s: os.chmod(s.at(path), mode))

    @rule(path=S.paths(), uid=S.owners, gid=S.owners, follow=st.booleans())
    def chown(self, path: str, uid: int, gid: int, follow: bool) -> None:
        self.both(f"chown {uid}:{gid} {path} follow={follow}",
                  lambda s: os.chown(s.at(path), uid, gid, follow_symlinks=follow))

    @rule(path=S.paths(), times=S.times, follow=st.booleans())
    def utime(self, path: str, times: tuple[int, int] | None, follow: bool) -> None:
        def go(s: Side) -> None:
            if times is None:
                os.utime(s.at(path), None, follow_symlinks=follow)
            else:
                os.utime(s.at(path), ns=times, follow_symlinks=follow)
        self.both(f"utime {path} {times} follow={follow}", go)

    @rule(path=S.paths(), name=S.xattr_names, value=S.xattr_values, flags=S.xattr_flags)
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        self.both(f"setxattr {path} {name}={value!r} flags={flags}",
                  lambda s: os.setxattr(s.at(path), name, value, flags, follow_symlinks=False))

    @rule(path=S.paths(), name=S.xattr_names)
    def removexattr(self, path: str, name: str) -> None:
        self.both(f"removexattr {path} {name}", lambda s: os.removexattr(s.at(path), name, follow_symlinks=False))

    @rule(path=S.paths(), name=S.xattr_names)
    def getxattr(self, path: str, name: str) -> None:
        self.both(f"getxattr {path} {name}", lambda s: os.getxattr(s.at(path), name, follow_symlinks=False))

    @rule(path=S.dir_paths())
    def listxattr(self, path: str) -> None:
        self.both(f"listxattr {path}", lambda s: sorted(os.listxattr(s.at(path), follow_symlinks=False)))

    # --- looking -------------------------------------------------------------------------------------

    @rule(path=S.dir_paths())
    def readdir(self, path: str) -> None:
        self.both(f"readdir {path}", lambda s: listing(s.at(path), drop_ghosts=s.kernel))

    @rule(path=S.dir_paths(), follow=st.booleans())
    def stat(self, path: str, follow: bool) -> None:
        self.both(f"{'stat' if follow else 'lstat'} {path}",
                  lambda s: stat_entry(s.at(path), follow=follow, changed_after=self.changed_after))

    @rule(path=S.paths())
    def readlink(self, path: str) -> None:
        self.both(f"readlink {path}", lambda s: os.readlink(s.at(path)))

    @rule()
    def statfs(self) -> None:
        def go(s: Side) -> object:
            v = os.statvfs(s.at("."))
            return (v.f_bsize, v.f_namemax)
        self.both("statfs", go)

    # --- files kept open across steps ----------------------------------------------------------------

    @precondition(lambda self: len(self.fds) < MAX_OPEN_FILES)
    @rule(path=S.paths(), flags=S.open_flags)
    def open_keep(self, path: str, flags: str) -> None:
        opened: list[int] = []

        def go(s: Side) -> None:
            opened.append(os.open(s.at(path), S.OPEN_FLAGS[flags] | os.O_NONBLOCK, 0o644))
        try:
            self.both(f"open {path} {flags} (kept open)", go)
        finally:
            if len(opened) == 2:
                self.fds.append((opened[0], opened[1], f"{path} {flags}"))
            else:
                for fd in opened:
                    os.close(fd)

    def _on_fds(self, index: int, label: str, fn: Callable[[int], object]) -> None:
        kfd, pfd, name = self._fd(index)
        fds = {"kernel": kfd, "unionfs": pfd}
        self.both(f"{label} on fd of {name}", lambda s: fn(fds[s.name]))

    @precondition(lambda self: self.fds)
    @rule(index=st.integers(0, MAX_OPEN_FILES - 1), offset=S.offsets, data=S.write_data)
    def fd_write(self, index: int, offset: int, data: bytes) -> None:
        self._on_fds(index, f"pwrite at {offset}", lambda fd: os.pwrite(fd, data, offset))

    @precondition(lambda self: self.fds)
    @rule(index=st.integers(0, MAX_OPEN_FILES - 1))
    def fd_read(self, index: int) -> None:
        self._on_fds(index, "pread", lambda fd: content_id(os.pread(fd, 1 << 18, 0)))

    @precondition(lambda self: self.fds)
    @rule(index=st.integers(0, MAX_OPEN_FILES - 1), length=S.lengths)
    def fd_truncate(self, index: int, length: int) -> None:
        self._on_fds(index, f"ftruncate {length}", lambda fd: os.ftruncate(fd, length))

    @precondition(lambda self: self.fds)
    @rule(index=st.integers(0, MAX_OPEN_FILES - 1))
    def fd_stat(self, index: int) -> None:
        self._on_fds(index, "fstat", fstat_entry)

    @precondition(lambda self: self.fds)
    @rule(index=st.integers(0, MAX_OPEN_FILES - 1))
    def fd_close(self, index: int) -> None:
        kfd, pfd, name = self.fds.pop(index % len(self.fds))
        fds = {"kernel": kfd, "unionfs": pfd}
        self.both(f"close fd of {name}", lambda s: os.close(fds[s.name]))

    # --- remount -------------------------------------------------------------------------------------

    @precondition(lambda self: self.since_remount >= MIN_STEPS_BETWEEN_REMOUNTS)
    @rule()
    def remount(self) -> None:
        """Close every open file, unmount both sides and mount them again: all state must be on disk."""
        self._close_fds()
        for side in self.sides:
            side.down()
        for side in self.sides:
            side.up()
        self.since_remount = 0
        self.stats["remounts"] += 1

    # --- the end -------------------------------------------------------------------------------------

    def _final_checks(self) -> list[str]:
        problems: list[str] = []

        def section(title: str, lines: list[str]) -> None:
            if lines:
                problems.append(f"{title}:\n" + "\n".join(lines))

        assert self.kernel.root is not None
        kernel_tree = self._snapshot(self.kernel)
        self.program.down()
        kup, pup = self.kernel.layers.upper, self.program.layers.upper
        assert kup is not None and pup is not None
        uppers = [upper_snapshot(u, changed_after=self.changed_after) for u in (kup, pup)]
        section("upper dirs differ", diff_snapshots(*uppers, names=("kernel", "unionfs")))
        for i, (lower, before) in enumerate(zip(self.program.layers.lowers, self.lowers_before, strict=True)):
            section(f"unionfs modified lower layer {i}",
                    diff_snapshots(before, upper_snapshot(lower), names=("before", "after")))
        section("cross-mount (kernel over unionfs's upper) differs from the kernel's own result",
                diff_snapshots(kernel_tree, self._cross_mount_tree(), names=("kernel", "cross-mount")))
        return problems

    def _cross_mount_tree(self) -> Snapshot:
        """Mount the kernel's overlayfs over unionfs's upper and the same lowers; snapshot it."""
        pls = self.program.layers
        assert pls.upper is not None and pls.work is not None
        if self.family == "oci":  # the kernel reads its own format only: convert a copy
            where = self.base / "cross"
            where.mkdir()
            upper = L.copy_tree(pls.upper, where / "upper")
            L.oci_to_kernel(upper)
            work, mnt = where / "work", where / "mnt"
            work.mkdir()
            mnt.mkdir()
            lowers: list[Path] = self.kernel_sources
        else:
            upper, work, mnt, lowers = pls.upper, pls.work, pls.mnt, list(pls.lowers)
        with kernel_overlay_mount(lowers, upper, work, mnt, FAMILY_OPTIONS[self.family]) as root:
            return without_ghosts(snapshot(root, changed_after=self.changed_after))

    def teardown(self) -> None:
        """Final comparisons; then always unmount everything and remove the example's directories."""
        errors: list[BaseException] = []
        problems: list[str] = []
        try:
            self._close_fds()
            if len(self.sides) == 2 and all(s.root is not None for s in self.sides):
                problems = self._final_checks()
                self.stats["teardowns checked"] += 1
        except BaseException as e:  # re-raised below, after unmounting
            errors.append(e)
        finally:
            for side in reversed(self.sides):
                try:
                    side.down()
                except BaseException as e:  # a dead daemon must fail the example
                    errors.append(e)
            mountpoints = [s.layers.mnt for s in self.sides] + [self.base / "cross" / "mnt"]
            if not any(find_mount(p) for p in mountpoints):
                shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise errors[0]
        if problems:
            raise self._divergence("at the end of the sequence:\n" + "\n".join(problems))


# --- running ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with scratch_area(tmp_path_factory.mktemp("state-machine")) as base:
        yield base


def machine_settings(family: str) -> settings:
    """The loaded profile, with this test's example and step budget (see the module docstring)."""
    profile = settings.get_current_profile_name()
    if profile == "ci":
        examples, steps = CI_EXAMPLES[family], CI_STEPS
    else:
        examples, steps = settings.default.max_examples, DEV_STEPS
    examples = int(os.environ.get("UNIONFS_SM_EXAMPLES", examples))
    steps = int(os.environ.get("UNIONFS_SM_STEPS", steps))
    return settings(settings.default, max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=list(HealthCheck))


def run_machine(family: str, area: Path, stats: Counter[str]) -> None:
    """Run the state machine of ``family`` with scratch space under ``area``, counting into ``stats``."""
    every = int(os.environ.get("UNIONFS_SM_SNAPSHOT_EVERY", "1"))
    machine: Any = type(f"UnionMachine_{family}", (UnionMachine,),
                        {"family": family, "area": area, "stats": stats, "snapshot_every": every})
    run_state_machine_as_test(machine, settings=machine_settings(family))


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("family", FAMILIES)
def test_state_machine(family: str, area: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Random operation sequences (with remounts) give the same outcomes and trees on unionfs and the kernel,
    and the kernel reads unionfs's upper dir as its own."""
    started = time.monotonic()
    stats: Counter[str] = Counter()
    try:
        run_machine(family, area, stats)
    finally:
        with capsys.disabled():
            print(f"\nstate machine [{family}, profile {settings.get_current_profile_name()}]: "
                  f"{stats['examples']} examples, {stats['steps']} steps, {stats['remounts']} remounts, "
                  f"{stats['teardowns checked']} cross-mount checks in {time.monotonic() - started:.0f}s")
            for key in sorted(k for k in stats if k.startswith(("tolerated", "avoided"))):
                print(f"  {key}: {stats[key]}")

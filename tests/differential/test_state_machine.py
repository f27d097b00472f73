"""Random operation sequences (hypothesis state machine) on the kernel's overlayfs and on the program under
test side by side: every step must give the same outcome (value or errno) and leave the same visible tree;
at the end both are remounted (state on disk only) and the trees and upper dirs must still agree.

``make fuzz`` runs this with the ``dev`` profile (more and longer random sequences).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from support import layers as L
from support.differential import recent_cutoff
from support.mounts import kernel_overlay_mount, unionfs_mount
from support.snapshot import diff_snapshots, errno_name, snapshot, stat_entry, upper_snapshot
from support.strategies import DANGLING_ROOT

LOWERS: tuple[L.Spec, ...] = (
    {"a": "top a\n", "d/x": "top x\n", "e": L.Dir({"z": "z\n"}, opaque=True), "gone": L.WHITEOUT,
     "s": L.Symlink("d")},
    {"a": "bottom a\n", "b": L.File("b\n", mode=0o600, uid=5, xattrs={"user.b": "1"}), "d/y": "bottom y\n",
     "e/hidden": "h\n", "gone": "gone\n", "f/deep/g": "g\n"},
)
NAMES = ("a", "b", "n", "d", "d/x", "d/y", "d/n", "e", "e/z", "f", "f/deep", "f/deep/g", "gone", "s", "s/x")
paths = st.sampled_from(NAMES)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 10, "dev": 100}  # every example mounts four times: keep the ci run short
datas = st.binary(max_size=40)
ABSOLUTE_TARGET = f"{DANGLING_ROOT}/target"
"""The absolute symlink target: dangling on the host, since chmod, truncate and open follow a symlink on
either side to wherever it points (a link to "/" let a chmod change the host's root)."""


def _no_diff(title: str, diff: list[str]) -> None:
    if diff:
        raise AssertionError(title + ":\n" + "\n".join(diff))


class OverlayPair(RuleBasedStateMachine):
    """The kernel's mount and the program's mount of identical copies of ``LOWERS``."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="unionfs-sm-"))
        self.cutoff = recent_cutoff()
        src = [L.build_layer(spec, self.tmp / f"src{i}") for i, spec in enumerate(LOWERS)]
        self.sets = [L.new_layer_set(self.tmp / side, src) for side in ("kernel", "program")]
        self.stack = contextlib.ExitStack()
        k, p = self.sets
        self.roots = (self.stack.enter_context(kernel_overlay_mount(k.lowers, k.upper, k.work, k.mnt)),
                      self.stack.enter_context(unionfs_mount(p.lowers, p.upper, p.work, p.mnt)))

    def both(self, fn: Callable[[Path], Any]) -> None:
        """Run ``fn(root)`` on each side; outcomes (result or errno name) must be equal."""
        outcomes = []
        for root in self.roots:
            try:
                outcomes.append(fn(root))
            except OSError as e:
                outcomes.append(errno_name(e.errno))
        if outcomes[0] != outcomes[1]:
            raise AssertionError(f"kernel {outcomes[0]!r} != program {outcomes[1]!r}")

    @rule(path=paths, data=datas, flags=st.sampled_from(["trunc", "append", "excl", "plain"]),
          offset=st.sampled_from([None, 0, 3, 4096]))
    def write(self, path: str, data: bytes, flags: str, offset: int | None) -> None:
        mode = {"trunc": os.O_TRUNC | os.O_CREAT, "append": os.O_APPEND, "excl": os.O_CREAT | os.O_EXCL,
                "plain": os.O_CREAT}[flags]

        def go(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | mode, 0o644)
            try:
                return os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(go)

    @rule(path=paths)
    def read(self, path: str) -> None:
        self.both(lambda root: (root / path).read_bytes())

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda root: os.unlink(root / path))

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(lambda root: os.mkdir(root / path, 0o750))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(lambda root: os.rmdir(root / path))

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda root: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(link_to=st.sampled_from(["a", "../a", "d", "nowhere", ABSOLUTE_TARGET]), path=paths)
    def symlink(self, link_to: str, path: str) -> None:
        self.both(lambda root: os.symlink(link_to, root / path))

    @rule(path=paths, mode=st.sampled_from([0o600, 0o755, 0o4711]))
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / path, mode))  # follows symlinks: Linux has no lchmod

    @rule(path=paths, uid=st.sampled_from([0, 1000]))
    def chown(self, path: str, uid: int) -> None:
        self.both(lambda root: os.chown(root / path, uid, uid, follow_symlinks=False))

    @rule(path=paths, size=st.sampled_from([0, 2, 100]))
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / path, size))

    @rule(path=paths, value=st.sampled_from([b"", b"v"]), remove=st.booleans())
    def xattr(self, path: str, value: bytes, remove: bool) -> None:
        if remove:
            self.both(lambda root: os.removexattr(root / path, "user.t", follow_symlinks=False))
        else:
            self.both(lambda root: os.setxattr(root / path, "user.t", value, follow_symlinks=False))

    @rule(path=paths)
    def stat(self, path: str) -> None:
        self.both(lambda root: stat_entry(root / path, changed_after=self.cutoff))

    @invariant()
    def same_tree(self) -> None:
        k, p = (snapshot(root, changed_after=self.cutoff) for root in self.roots)
        _no_diff("visible trees differ", diff_snapshots(k, p, names=("kernel", "program")))

    def teardown(self) -> None:
        try:
            self.stack.close()
            views = []
            for ls, mount in zip(self.sets, (kernel_overlay_mount, unionfs_mount), strict=True):
                with mount(ls.lowers, ls.upper, ls.work, ls.mnt) as root:
                    views.append(snapshot(root, changed_after=self.cutoff))
            _no_diff("visible trees differ after remount", diff_snapshots(*views, names=("kernel", "program")))
            uppers = [upper_snapshot(ls.upper, changed_after=self.cutoff) for ls in self.sets if ls.upper]
            _no_diff("upper dirs differ", diff_snapshots(*uppers, names=("kernel", "program")))
        finally:
            self.stack.close()
            shutil.rmtree(self.tmp)


@pytest.mark.mounted
@pytest.mark.differential
def test_state_machine_matches_kernel() -> None:
    """Random sequences of writes, unlinks, renames, links, mkdir/rmdir, chmod/chown, xattrs agree with the
    kernel step by step, and after remount."""
    run = OverlayPair.TestCase
    phases = settings.default.phases
    if HYPOTHESIS_PROFILE == "ci":  # shrinking remounts hundreds of times; ci reports the failing run as is
        phases = tuple(p for p in phases if p not in (Phase.shrink, Phase.explain))
    run.settings = settings(settings.default, max_examples=EXAMPLES[HYPOTHESIS_PROFILE], stateful_step_count=20,
                            phases=phases)
    run().runTest()

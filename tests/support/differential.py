"""Differential testing: the same scenario on the kernel's overlayfs and on the program under test.

A *scenario* is a function of a ``Recorder``. It runs with the mount root as the current directory, so it
uses plain relative paths (``r.call("unlink", os.unlink, "a/b")``), and every operation goes through the
recorder, which records ``(label, outcome)``: ``"ok"``, a value, or the errno NAME. ``run_differential``
builds the scenario's layers once, gives each side its own faithful copy, and for each side:

1. mounts, runs the scenario, snapshots the visible tree, unmounts;
2. mounts the same directories again (all state must be on disk), snapshots, runs the optional
   ``after_remount`` phase, unmounts;
3. snapshots the upper dir and checks the lower dirs were not modified.

Then it compares, side by side: the recorded outcomes of both phases, both visible snapshots, and the
normalised upper dirs. ``Comparison.mismatches`` lists every difference (empty = same as the kernel).

Family ``"oci"``: the program under test gets the layers with OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``)
while the kernel gets the same layers converted to its own format with ``layers.oci_to_kernel``.

Family ``"redirect"``: kernel-format layers, and both sides mounted with ``redirect_dir=on`` (directories with
lower copies rename, recording the move in a redirect xattr); the other families pin ``redirect_dir=off``.

Family ``"index"``: as ``"redirect"``, and both sides mounted with ``index=on`` (the names of a lower hard link
stay one file across copy-up, through the inode index in the work dir); the other families pin ``index=off``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from support import layers as L
from support.mounts import kernel_overlay_mount, mount_program, unionfs_mount
from support.snapshot import Entry, Snapshot, diff_snapshots, errno_name, snapshot, stat_entry, upper_snapshot

T = TypeVar("T")
Family = Literal["kernel", "oci", "redirect", "index"]
FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {"kernel": (), "oci": (), "redirect": ("redirect_dir=on",),
                                              "index": ("redirect_dir=on", "index=on")}
"""Mount options of both sides, by family (after the pinned ones of ``support.mounts``)."""
Outcome = tuple[str, object]


class Recorder:
    """Runs operations relative to the mount root (the cwd) and records each outcome.

    Only ``OSError`` is recorded (as its errno name); any other exception is a bug in the scenario and
    propagates. ``memo`` keeps values between the phases of one side (e.g. an ``st_ino`` to compare after
    remount); store numbers there, record only *relations* of them.
    """

    def __init__(self) -> None:
        self.results: list[Outcome] = []
        self.memo: dict[str, Any] = {}

    def record(self, label: str, value: object) -> None:
        """Record a fact computed by the scenario (must not depend on the mount or the run)."""
        self.results.append((label, value))

    def call(self, label: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Run ``fn``; record ``"ok"`` or the errno name; return its result (None on error)."""
        try:
            result = fn(*args, **kwargs)
        except OSError as e:
            self.record(label, errno_name(e.errno))
            return None
        self.record(label, "ok")
        return result

    def value(self, label: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Run ``fn``; record its (comparable) result or the errno name; return the result."""
        try:
            result = fn(*args, **kwargs)
        except OSError as e:
            self.record(label, errno_name(e.errno))
            return None
        self.record(label, result)
        return result

    # --- conveniences (each records exactly one outcome) ---------------------------------------------

    def stat(self, label: str, path: str, *, follow: bool = False) -> Entry:
        """Record the normalised (l)stat of ``path``: type, mode, owner, size, nlink, content, xattrs."""
        entry = stat_entry(path, follow=follow, changed_after=self.memo.get("_changed_after"))
        self.record(label, entry)
        return entry

    def read(self, label: str, path: str) -> bytes | None:
        """Record the whole content of ``path`` (verbatim up to 128 bytes, else its length and sha256)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            self.record(label, errno_name(e.errno))
            return None
        self.record(label, data if len(data) <= 128 else (len(data), hashlib.sha256(data).hexdigest()[:16]))
        return data

    def write(self, label: str, path: str, data: bytes, *, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
              mode: int = 0o644, offset: int | None = None) -> None:
        """Open with ``flags``, write ``data`` (at ``offset`` with pwrite if given), close; record."""
        def write() -> None:
            fd = os.open(path, flags, mode)
            try:
                if offset is None:
                    os.write(fd, data)
                else:
                    os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.call(label, write)

    def listdir(self, label: str, path: str = ".") -> list[str] | None:
        """Record the sorted listing of ``path``."""
        return self.value(label, lambda: sorted(os.listdir(path)))

    def rmtree(self, label: str, path: str) -> None:
        """``rm -rf path`` (``shutil.rmtree``, which walks with directory fds); record."""
        self.call(label, shutil.rmtree, path)

    def ino(self, path: str, *, follow: bool = False) -> int | None:
        """``st_ino`` of ``path`` (None on error), NOT recorded: compare relations of these only."""
        try:
            return (os.stat(path) if follow else os.lstat(path)).st_ino
        except OSError:
            return None

    def mmap_write(self, label: str, path: str, offset: int, data: bytes) -> None:
        """Map ``path`` shared, write ``data`` at ``offset`` through the mapping, msync, unmap; record."""
        def go() -> None:
            fd = os.open(path, os.O_RDWR)
            try:
                with mmap.mmap(fd, 0) as m:
                    m[offset:offset + len(data)] = data
                    m.flush()
            finally:
                os.close(fd)
        self.call(label, go)


ScenarioFn = Callable[[Recorder], None]


@dataclass
class Scenario:
    """A named operation sequence over fixed layers. ``lowers[0]`` is the top lower layer."""

    name: str
    run: ScenarioFn
    lowers: tuple[L.Spec, ...]
    upper: L.Spec | None = None
    readonly: bool = False
    after_remount: ScenarioFn | None = None
    family: Family = "kernel"

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip()

    def then_after_remount(self, fn: ScenarioFn) -> ScenarioFn:
        """Decorator: ``fn`` runs (and is compared) on the second mount of each side."""
        self.after_remount = fn
        return fn

    def __str__(self) -> str:
        return self.name


@dataclass
class Catalog:
    """An ordered set of scenarios, registered with the ``scenario`` decorator; iterable for parametrize."""

    family: Family = "kernel"
    items: list[Scenario] = field(default_factory=list)

    def scenario(self, *lowers: L.Spec, upper: L.Spec | None = None,
                 readonly: bool = False) -> Callable[[ScenarioFn], Scenario]:
        """Register the decorated function as a scenario over ``lowers`` (top first) and ``upper``."""
        if not lowers:
            raise ValueError("a scenario needs at least one lower layer")

        def register(fn: ScenarioFn) -> Scenario:
            if any(s.name == fn.__name__ for s in self.items):
                raise ValueError(f"duplicate scenario {fn.__name__}")
            if not fn.__doc__:
                raise ValueError(f"scenario {fn.__name__} must say what it proves (docstring)")
            s = Scenario(name=fn.__name__, run=fn, lowers=tuple(lowers), upper=upper, readonly=readonly,
                         family=self.family)
            self.items.append(s)
            return s
        return register

    def __iter__(self) -> Iterator[Scenario]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def params(self) -> list[Scenario]:
        """The scenarios, for ``pytest.mark.parametrize(..., ids=str)``."""
        return list(self.items)


# --- running ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def in_dir(path: Path) -> Iterator[None]:
    """Run the block with ``path`` as the current directory; always go back (before any unmount)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)  # before the unmount: a cwd inside the mount would make it busy


@dataclass
class SideResult:
    """Everything one side (kernel or program) produced."""

    results: list[Outcome]
    visible: Snapshot
    results_after_remount: list[Outcome]
    visible_after_remount: Snapshot
    upper: Snapshot | None
    lowers_changed: list[str]


@dataclass
class Comparison:
    """The two sides and their differences."""

    scenario: Scenario
    kernel: SideResult
    program: SideResult
    mismatches: list[str]

    def explain(self) -> str:
        head = f"scenario {self.scenario.name} ({self.scenario.family}): {self.scenario.doc}"
        return "\n".join([head, *self.mismatches])


def _diff_results(k: list[Outcome], p: list[Outcome]) -> list[str]:
    lines = []
    for i in range(max(len(k), len(p))):
        a = k[i] if i < len(k) else None
        b = p[i] if i < len(p) else None
        if a != b:
            lines.append(f"  #{i}: kernel {a!r}\n       program {b!r}")
    return lines


def _build_sources(scenario: Scenario, base: Path) -> tuple[list[Path], Path | None, list[Path], Path | None]:
    """Build the layers once per side format; return (kernel lowers, kernel upper, program ...)."""
    def build(fmt: L.WhiteoutFormat, where: Path, convert: bool) -> tuple[list[Path], Path | None]:
        where.mkdir(parents=True)
        lowers = [L.build_layer(spec, where / f"l{i}", whiteouts=fmt)
                  for i, spec in enumerate(scenario.lowers)]
        upper = None if scenario.upper is None else L.build_layer(scenario.upper, where / "u", whiteouts=fmt)
        if convert:
            for layer in [*lowers, *([upper] if upper else [])]:
                L.oci_to_kernel(layer)
        return lowers, upper

    if scenario.family in ("kernel", "redirect", "index"):
        kl, ku = build("kernel", base / "src", convert=False)
        return kl, ku, kl, ku
    pl, pu = build("oci", base / "src-oci", convert=False)
    kl, ku = build("oci", base / "src-kernel", convert=True)
    return kl, ku, pl, pu


def _run_side(scenario: Scenario, *, program: str | None, lowers: Sequence[Path], upper: Path | None,
              base: Path, changed_after: int) -> SideResult:
    """One side: ``program`` None is the kernel, else the mount program (see ``unionfs_mount``)."""
    ls = L.new_layer_set(base, lowers, upper=upper, readonly=scenario.readonly)
    mount: Callable[..., contextlib.AbstractContextManager[Path]] = (
        kernel_overlay_mount if program is None else functools.partial(unionfs_mount, program=program))
    options = FAMILY_OPTIONS[scenario.family]
    before = [upper_snapshot(p) for p in ls.lowers]
    r = Recorder()
    r.memo["_changed_after"] = changed_after
    with mount(ls.lowers, ls.upper, ls.work, ls.mnt, options) as root:
        with in_dir(root):
            scenario.run(r)
        visible = snapshot(root, changed_after=changed_after)
    results = r.results
    r.results = []
    with mount(ls.lowers, ls.upper, ls.work, ls.mnt, options) as root:
        visible_again = snapshot(root, changed_after=changed_after)
        if scenario.after_remount is not None:
            with in_dir(root):
                scenario.after_remount(r)
    up = None if ls.upper is None else upper_snapshot(ls.upper, changed_after=changed_after)
    changed = []
    for i, (path, old) in enumerate(zip(ls.lowers, before, strict=True)):
        lines = diff_snapshots(old, upper_snapshot(path), names=("before", "after"))
        if lines:
            changed.append(f"  lower{i} was modified:\n" + "\n".join(lines))
    return SideResult(results=results, visible=visible, results_after_remount=r.results,
                      visible_after_remount=visible_again, upper=up, lowers_changed=changed)


def recent_cutoff() -> int:
    """An mtime from which on a timestamp counts as "new" in snapshots: a little before now.

    The margin covers the kernel's coarse clock (file times may lag ``time.time_ns()`` by a tick); layer
    times (2020) and explicit ``utime`` values in scenarios are far older.
    """
    return time.time_ns() - 10 * 10**9


def run_differential(scenario: Scenario, tmp: Path, *, program: str | None = None) -> Comparison:
    """Run ``scenario`` on both sides under the empty directory ``tmp``; return the comparison.

    ``program`` is the mount program under test (default: ``mounts.mount_program()``).
    """
    kl, ku, pl, pu = _build_sources(scenario, tmp)
    changed_after = recent_cutoff()
    k = _run_side(scenario, program=None, lowers=kl, upper=ku, base=tmp / "kernel",
                  changed_after=changed_after)
    p = _run_side(scenario, program=program or mount_program(), lowers=pl, upper=pu, base=tmp / "program",
                  changed_after=changed_after)
    return Comparison(scenario=scenario, kernel=k, program=p, mismatches=compare(k, p))


def compare(k: SideResult, p: SideResult) -> list[str]:
    """Every difference between the kernel's side ``k`` and the program's side ``p``, as text sections."""
    names = ("kernel", "program")
    mismatches: list[str] = []

    def section(title: str, lines: list[str]) -> None:
        if lines:
            mismatches.append(f"{title}:\n" + "\n".join(lines))

    section("operation outcomes differ", _diff_results(k.results, p.results))
    section("visible tree differs", diff_snapshots(k.visible, p.visible, names=names))
    section("visible tree differs after remount",
            diff_snapshots(k.visible_after_remount, p.visible_after_remount, names=names))
    section("outcomes after remount differ", _diff_results(k.results_after_remount, p.results_after_remount))
    if k.upper is not None and p.upper is not None:
        section("upper dir differs", diff_snapshots(k.upper, p.upper, names=names))
    section("program modified a lower layer", p.lowers_changed)
    section("kernel modified a lower layer (harness bug)", k.lowers_changed)
    if not k.results and not k.results_after_remount:
        mismatches.append("scenario recorded no outcomes: it proves nothing")
    return mismatches


def assert_same_as_kernel(scenario: Scenario, tmp: Path) -> Comparison:
    """Run ``scenario`` differentially under ``tmp``; fail the test with every difference found."""
    import pytest

    comparison = run_differential(scenario, tmp)
    if comparison.mismatches:
        pytest.fail(comparison.explain(), pytrace=False)
    return comparison

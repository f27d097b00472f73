"""Many-file workloads: create + write 4 KiB + close, unlink of lower files (whiteouts), and unpacking a
rootfs-sized tar into the union followed by ``du -s`` of the result on a new mount."""

from __future__ import annotations

import os
import time

from benchmarks.fixtures import warm
from benchmarks.measure import Metric
from benchmarks.runner import Plan, Runner
from benchmarks.systems import Mount, Stack
from benchmarks.workloads.common import run_timed

FAMILY = "files"


def create(r: Runner) -> None:
    """Create, write 4 KiB to and close many new files in one directory."""
    n = r.sizes.small_files
    data = os.urandom(4096)
    metric = Metric("create_4k", "s", "lower", FAMILY, f"create + write 4 KiB + close of {n} new files", "fresh")

    def body(m: Mount) -> dict[str, float]:
        d = os.path.join(m.root, "new")
        os.mkdir(d)
        paths = [os.path.join(d, f"f{i:05d}") for i in range(n)]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        start = time.perf_counter()
        for p in paths:
            fd = os.open(p, flags, 0o644)
            os.write(fd, data)
            os.close(fd)
        return {"create_4k": time.perf_counter() - start}

    r.measure([metric], Plan(Stack((r.fixtures.empty(),)), writable=True), body, params={"files": n})


def unlink(r: Runner) -> None:
    """Unlink files that live in the lower layer (each leaves a whiteout in the upper)."""
    n = r.sizes.small_files
    layer = r.fixtures.small_files(n)
    metric = Metric("unlink_lower", "s", "lower", FAMILY, f"unlink of {n} lower files (whiteouts)", "fresh")

    def body(m: Mount) -> dict[str, float]:
        d = os.path.join(m.root, "small")
        paths = [os.path.join(d, f"f{i:05d}") for i in range(n)]
        start = time.perf_counter()
        for p in paths:
            os.unlink(p)
        secs = time.perf_counter() - start
        if os.listdir(d):
            raise AssertionError("files left after unlink")
        return {"unlink_lower": secs}

    r.measure([metric], Plan(Stack((layer,)), writable=True), body, params={"files": n})


def untar(r: Runner) -> None:
    """``tar -xf`` a rootfs-sized tree into an empty union; remount; ``du -s`` the result."""
    n = r.sizes.tar_files
    tarball = r.fixtures.tarball(n)
    metrics = [
        Metric("untar", "s", "lower", FAMILY, f"tar -x of {n} files (rootfs-like sizes) into the union",
               "fresh"),
        Metric("du_untarred", "s", "lower", FAMILY, f"du -s of those {n} files after a remount", "fresh"),
    ]

    def body(m: Mount) -> dict[str, float]:
        warm(tarball.parent, read_data=True)
        t_tar = run_timed(["tar", "-xf", str(tarball), "-C", str(m.root)])
        m.remount()
        return {"untar": t_tar, "du_untarred": run_timed(["du", "-s", str(m.root)])}

    r.measure(metrics, Plan(Stack((r.fixtures.empty(),)), writable=True), body, params={"files": n})

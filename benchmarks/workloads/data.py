"""Data workloads on one big file: sequential read (cold, warm), random 4 KiB reads, sequential write and
copy-up (the first write to a lower file)."""

from __future__ import annotations

import os
import random
import shutil
import time

from benchmarks.measure import Metric
from benchmarks.runner import Plan, Runner
from benchmarks.systems import Mount, Stack
from benchmarks.workloads.common import mb_per_s

FAMILY = "data"
BUF = 1 << 20
PAGE = 4096


def _read_all(path: str) -> tuple[int, float]:
    """Read a file front to back in 1 MiB requests; (bytes, seconds)."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total, time.perf_counter() - start


def read_seq(r: Runner) -> None:
    """Read the big lower file cold (fresh mount, caches dropped), then again in the same mount."""
    size = r.sizes.big_file_bytes
    layer = r.fixtures.big_file(size)
    metrics = [
        Metric("read_seq_cold", "MB/s", "higher", FAMILY, f"sequential read of a {_h(size)} lower file", "cold"),
        Metric("read_seq_warm", "MB/s", "higher", FAMILY, f"the same {_h(size)} read again", "warm"),
    ]

    def body(m: Mount) -> dict[str, float]:
        path = os.path.join(m.root, "big.bin")
        r.recycle_memory(2 * size)  # the lower file's cache, and a FUSE mount's own
        out = {}
        for name in ("read_seq_cold", "read_seq_warm"):
            got, secs = _read_all(path)
            if got != size:
                raise AssertionError(f"read {got} bytes, expected {size}")
            out[name] = mb_per_s(got, secs)
        return out

    r.measure(metrics, Plan(Stack((layer,)), cold=True), body, params={"bytes": size})


def read_random(r: Runner) -> None:
    """4 KiB preads at random page-aligned offsets of the big lower file, on a fresh mount."""
    size = r.sizes.big_file_bytes
    count = r.sizes.random_reads
    layer = r.fixtures.big_file(size)
    rng = random.Random(7)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(count)]
    metric = Metric("read_random_4k", "IOPS", "higher", FAMILY,
                    f"{count} random 4 KiB preads in a {_h(size)} lower file", "fresh")

    def body(m: Mount) -> dict[str, float]:
        fd = os.open(os.path.join(m.root, "big.bin"), os.O_RDONLY)
        try:
            pread = os.pread
            start = time.perf_counter()
            for off in offsets:
                pread(fd, PAGE, off)
            secs = time.perf_counter() - start
        finally:
            os.close(fd)
        return {"read_random_4k": count / secs}

    r.measure([metric], Plan(Stack((layer,)), warm_data=True), body, params={"bytes": size, "reads": count})


def write_seq(r: Runner) -> None:
    """Write a new file sequentially in 1 MiB requests, up to and including close (no fsync)."""
    size = r.sizes.write_bytes
    metric = Metric("write_seq", "MB/s", "higher", FAMILY,
                    f"sequential write of a new {_h(size)} file (1 MiB writes, until close)", "fresh")
    block = random.Random(3).randbytes(BUF)

    def body(m: Mount) -> dict[str, float]:
        r.recycle_memory(2 * size)
        os.sync()
        path = os.path.join(m.root, "out.bin")
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = size
            while left > 0:
                left -= os.write(fd, block[: min(left, BUF)])
        finally:
            os.close(fd)
        secs = time.perf_counter() - start
        if os.stat(path).st_size != size:
            raise AssertionError("short file")
        return {"write_seq": mb_per_s(size, secs)}

    r.measure([metric], Plan(Stack((r.fixtures.empty(),)), writable=True), body, params={"bytes": size})


def copy_up(r: Runner) -> None:
    """open(O_WRONLY) + a 1-byte pwrite + close of the big lower file: the copy-up a first write triggers.

    native has no copy-up; its figure is a plain copy of the file (shutil.copyfile, which uses
    copy_file_range/sendfile): the floor of what any copy-up has to do.
    """
    size = r.sizes.big_file_bytes
    layer = r.fixtures.big_file(size)
    metric = Metric("copy_up", "s", "lower", FAMILY,
                    f"first write to a {_h(size)} lower file (native: copying the file)", "fresh")

    def body(m: Mount) -> dict[str, float]:
        r.recycle_memory(2 * size)
        os.sync()
        path = os.path.join(m.root, "big.bin")
        start = time.perf_counter()
        if m.system.name == "native":
            shutil.copyfile(path, path + ".copy")
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x", 0)
            finally:
                os.close(fd)
        secs = time.perf_counter() - start
        if os.stat(path).st_size != size:
            raise AssertionError("file size changed by copy-up")
        return {"copy_up": secs}

    r.measure([metric], Plan(Stack((layer,)), writable=True, warm_data=True), body, params={"bytes": size})


def _h(nbytes: int) -> str:
    """1073741824 -> '1 GiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"

"""Daemon memory: the FUSE daemon's resident set after a stat of every entry of a very large tree, with the
walk's duration and the mount time of that large layer on the side."""

from __future__ import annotations

import os
import stat
import time

from benchmarks.measure import Metric
from benchmarks.runner import Plan, Runner
from benchmarks.systems import Mount, Stack

FAMILY = "memory"
MIB = 1 << 20


def _walk(root: str) -> int:
    """lstat every entry below ``root`` (scandir + stat of each); returns the number of entries."""
    count = 0
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return count


def rss(r: Runner) -> None:
    """One walk per system (RSS is not noisy; the walk is long): idle RSS, walk time, RSS after the walk."""
    n = r.sizes.walk_files
    layer = r.fixtures.walk_tree(n)
    metrics = [
        Metric("walk_large", "s", "lower", FAMILY, f"stat of every entry of a {n}-file tree", "fresh"),
        Metric("mount_time_large", "s", "lower", FAMILY, f"mount of one layer of {n} files", "fresh"),
        Metric("daemon_rss_idle", "MiB", "lower", FAMILY, "daemon RSS right after mounting", "fresh"),
        Metric("daemon_rss_walked", "MiB", "lower", FAMILY, f"daemon RSS after the {n}-file walk", "fresh"),
        Metric("daemon_hwm_walked", "MiB", "lower", FAMILY, "daemon peak RSS (VmHWM) after the walk", "fresh"),
    ]

    def body(m: Mount) -> dict[str, float]:
        out: dict[str, float] = {}
        idle = m.daemon_rss_bytes()
        start = time.perf_counter()
        seen = _walk(str(m.root))
        out["walk_large"] = time.perf_counter() - start
        if seen < n:
            raise AssertionError(f"walk saw {seen} entries, expected at least {n}")
        if m.system.name != "native":
            out["mount_time_large"] = m.mount_seconds
        walked = m.daemon_rss_bytes()
        if idle is not None and walked is not None:
            out["daemon_rss_idle"] = idle[0] / MIB
            out["daemon_rss_walked"] = walked[0] / MIB
            out["daemon_hwm_walked"] = walked[1] / MIB
        return out

    r.measure(metrics, Plan(Stack((layer,)), runs=1), body, params={"files": n})

"""Layer depth: cold stat of paths that live in the bottom layer of stacks of 1, 10, 100 and 500 layers
(each layer adding files of its own to the same directories), and the mount time of each stack."""

from __future__ import annotations

import os

from benchmarks.measure import Metric
from benchmarks.runner import Plan, Runner
from benchmarks.systems import Mount, Stack
from benchmarks.workloads.common import stat_all

FAMILY = "depth"


def depth(r: Runner) -> None:
    """For each stack size: mount (timed, caches cold), drop caches, stat every bottom-layer path."""
    sizes = r.sizes
    layers, targets = r.fixtures.depth_layers(max(sizes.depth_layers), sizes.depth_dirs, sizes.depth_paths,
                                              sizes.depth_files_per_dir)
    for count in sizes.depth_layers:
        stack = Stack(tuple(reversed(layers[:count])))
        stat_name, mount_name = f"depth_stat_cold@{count}", f"mount_time@{count}"
        metrics = [
            Metric(stat_name, "s", "lower", FAMILY,
                   f"cold os.stat of {len(targets)} bottom-layer paths, {count} layers", "cold",
                   series="depth_stat_cold", x=count),
            Metric(mount_name, "s", "lower", FAMILY,
                   f"mount of {count} layers (until the mountpoint is mounted)", "cold",
                   series="mount_time", x=count),
        ]

        def body(m: Mount, stat_name: str = stat_name, mount_name: str = mount_name) -> dict[str, float]:
            paths = [os.path.join(m.root, p) for p in targets]
            out = {stat_name: stat_all(paths)}
            if m.system.name != "native":
                out[mount_name] = m.mount_seconds
            return out

        r.log(f" {count} layers")
        r.measure(metrics, Plan(stack, cold=True), body,
                  params={"layers": count, "paths": len(targets), "dirs": sizes.depth_dirs,
                          "files_per_dir_per_layer": sizes.depth_files_per_dir})

"""The workload registry: name (as given to ``--only``) → function that measures it on every system.

Families: :mod:`.metadata` (stat, find, ls -lR, readdir, ls -l), :mod:`.data` (sequential and random reads,
sequential write, copy-up), :mod:`.files` (create, unlink, tar -x + du), :mod:`.depth` (layer depth and mount
time), :mod:`.memory` (daemon RSS).
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.runner import Runner
from benchmarks.workloads import data, depth, files, memory, metadata

Workload = Callable[[Runner], None]

WORKLOADS: dict[str, Workload] = {
    "stat": metadata.stat,
    "find": metadata.find,
    "ls_lR": metadata.ls_lr,
    "readdir": metadata.readdir,
    "ls_l": metadata.ls_l,
    "read_seq": data.read_seq,
    "read_random": data.read_random,
    "write_seq": data.write_seq,
    "copy_up": data.copy_up,
    "create": files.create,
    "unlink": files.unlink,
    "untar": files.untar,
    "depth": depth.depth,
    "rss": memory.rss,
}

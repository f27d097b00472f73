"""Workload sizes for the two modes (``--quick`` and ``--full``), frozen and recorded in every result file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["quick", "full"]

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """Every size a workload uses. ``full`` is what issue 4 asks for; ``quick`` scales it down."""

    runs: int  # runs per figure; the median is reported
    tree_files: int  # stat / find / ls -lR tree
    bigdir_entries: int  # readdir / ls -l of one directory
    big_file_bytes: int  # sequential read, random reads, copy-up
    random_reads: int  # number of 4 KiB preads
    write_bytes: int  # sequential write
    small_files: int  # create + write 4 KiB + close; unlink
    tar_files: int  # unpacked tree (tar -x), then du -s
    depth_layers: tuple[int, ...]  # stacks measured for layer depth
    depth_dirs: int  # directories shared by every layer (a/b/d00 …); the paths are spread over them
    depth_paths: int  # bottom-layer paths stat'ed per stack
    depth_files_per_dir: int  # files each non-bottom layer adds to every shared directory
    walk_files: int  # tree walked before reading the daemon's RSS
    budget_s: float  # a system that has spent this long on one figure gets no further runs of it

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = Sizes(
    runs=3,
    tree_files=20_000,
    bigdir_entries=10_000,
    big_file_bytes=1 * GiB,
    random_reads=20_000,
    write_bytes=1 * GiB,
    small_files=5_000,
    tar_files=100_000,
    depth_layers=(1, 10, 100, 500),
    depth_dirs=20,
    depth_paths=10_000,
    depth_files_per_dir=5,
    walk_files=1_000_000,
    budget_s=90.0,
)

QUICK = Sizes(
    runs=3,
    tree_files=3_000,
    bigdir_entries=3_000,
    big_file_bytes=128 * MiB,
    random_reads=3_000,
    write_bytes=128 * MiB,
    small_files=1_000,
    tar_files=1_000,
    depth_layers=(1, 10, 100, 500),
    depth_dirs=2,
    depth_paths=400,
    depth_files_per_dir=2,
    walk_files=50_000,
    budget_s=8.0,
)


def sizes_for(mode: Mode) -> Sizes:
    return FULL if mode == "full" else QUICK

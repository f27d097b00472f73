"""Bytes per cached entry: where the daemon's memory goes after a walk of a large tree, without a mount.

Builds a union of one lower layer of ``--files`` empty files (1000 per directory, the fixture of the
``rss`` workload) and an empty upper dir, then does in-process what the protocol frontend does for a
``scandir`` + ``stat`` walk answered with READDIRPLUS: for every directory, its listing, the attributes of
its children (``getattr_children``, each packed into a ``fuse_attr``) and one node id per child
(``NodeTable.remember``).  ``tracemalloc`` measures the bytes the lookup cache and the node table hold
afterwards, and the result is printed per entry (one entry = one file or directory of the tree)::

    .venv/bin/python -m benchmarks.cachebytes --files 100000 [--scratch DIR] [--json]

The fixture is built under ``--scratch`` (default ``/tmp/unionfs-cachebytes``) once and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.fixtures import Fixtures
from mountd.lowlevel.abi import ROOT_ID, pack_attr
from mountd.lowlevel.nodes import NodeTable
from unionfs.fs.layers import LayerStack
from unionfs.fs.union import UnionFS


def _walk(fs: UnionFS, nodes: NodeTable) -> int:
    """READDIRPLUS of every directory, top-down; returns the number of entries seen."""
    count = 0
    stack: list[tuple[str, int]] = [("", ROOT_ID)]
    while stack:
        path, nodeid = stack.pop()
        fs.getattr(path)
        names = [name for name, _, _ in fs.readdir(path)]
        for name, attr in zip(names, fs.getattr_children(path, names), strict=True):
            if attr is None:
                continue
            pack_attr(attr)
            child = nodes.remember(nodeid, name)
            count += 1
            if attr.st_mode & 0o170000 == 0o040000:
                stack.append((f"{path}/{name}" if path else name, child))
    return count


def measure(layer: Path, scratch: Path) -> dict[str, float]:
    """Walk a union of ``layer`` and return the bytes held by the node table and the cache's tables."""
    upper = Path(tempfile.mkdtemp(prefix="upper-", dir=scratch))
    work = Path(tempfile.mkdtemp(prefix="work-", dir=scratch))
    try:
        stack = LayerStack.open(lowers=[str(layer)], upper=str(upper), work=str(work))
        fs = UnionFS(stack)
        try:
            gc.collect()
            tracemalloc.start()
            base = _traced()
            nodes = NodeTable()
            start = time.process_time()
            entries = _walk(fs, nodes)
            cpu = time.process_time() - start
            total = _traced() - base
            snap = fs.cache.snapshot()
            # what each part holds: the bytes freed by dropping it (the names stay: the cache keeps them)
            parts: dict[str, int] = {}
            del nodes
            parts["node_table"] = total - (_traced() - base)
            held = _traced()
            fs.cache.attrs.clear()
            parts["cache_attrs"] = held - _traced()
            held = _traced()
            fs.cache.clear()
            parts["cache_dirs_and_rest"] = held - _traced()
            tracemalloc.stop()
        finally:
            fs.close()
    finally:
        shutil.rmtree(upper)
        shutil.rmtree(work)
    out: dict[str, float] = {"entries": entries, "walk_cpu_s": round(cpu, 3), "bytes_total": total,
                             "bytes_per_entry": round(total / entries, 1)}
    for name, value in parts.items():
        out[f"{name}_bytes_per_entry"] = round(value / entries, 1)
    out["cache_entries"] = snap["entries"]
    return out


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cachebytes", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000, help="files in the tree (1000 per directory)")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/unionfs-cachebytes"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.files <= 0:
        print("cachebytes: --files must be positive", file=sys.stderr)
        return 2
    args.scratch.mkdir(parents=True, exist_ok=True)
    fixtures = Fixtures(args.scratch / "fixtures", log=lambda msg: print(msg, file=sys.stderr))
    layer = fixtures.walk_tree(args.files)
    result = measure(layer, args.scratch)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())

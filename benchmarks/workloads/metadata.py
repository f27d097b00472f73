"""Metadata workloads on a tree of small files: stat (cold, warm), find, ls -lR, readdir and ls -l of one big
directory."""

from __future__ import annotations

import os
import time

from benchmarks.fixtures import walk_files
from benchmarks.measure import Metric
from benchmarks.runner import Plan, Runner
from benchmarks.systems import Mount, Stack
from benchmarks.workloads.common import run_timed, stat_all

FAMILY = "metadata"


def stat(r: Runner) -> None:
    """os.stat of every file of the tree: cold (fresh mount, caches dropped), then again warm."""
    tree = r.fixtures.tree(r.sizes.tree_files)
    rel = walk_files(tree)
    n = len(rel)
    metrics = [
        Metric("stat_cold", "s", "lower", FAMILY, f"os.stat of each of {n} files, in walk order", "cold"),
        Metric("stat_warm", "s", "lower", FAMILY, f"the same {n} os.stat calls again, same mount", "warm"),
    ]

    def body(m: Mount) -> dict[str, float]:
        paths = [os.path.join(m.root, p) for p in rel]
        cold = stat_all(paths)
        return {"stat_cold": cold, "stat_warm": stat_all(paths)}

    r.measure(metrics, Plan(Stack((tree,)), cold=True), body, params={"files": n})


def find(r: Runner) -> None:
    """``find ROOT -type f`` over the tree on a fresh mount."""
    tree = r.fixtures.tree(r.sizes.tree_files)
    n = r.sizes.tree_files
    metric = Metric("find", "s", "lower", FAMILY, f"find -type f over the {n}-file tree", "fresh")
    r.measure([metric], Plan(Stack((tree,))),
              lambda m: {"find": run_timed(["find", str(m.root), "-type", "f"])}, params={"files": n})


def ls_lr(r: Runner) -> None:
    """``ls -lR ROOT`` over the tree on a fresh mount (readdir + stat + xattr probes of every entry)."""
    tree = r.fixtures.tree(r.sizes.tree_files)
    n = r.sizes.tree_files
    metric = Metric("ls_lR", "s", "lower", FAMILY, f"ls -lR of the {n}-file tree", "fresh")
    r.measure([metric], Plan(Stack((tree,))),
              lambda m: {"ls_lR": run_timed(["ls", "-lR", str(m.root)])}, params={"files": n})


def readdir(r: Runner) -> None:
    """os.listdir of one directory of many entries (names only) on a fresh mount, then again on the same
    mount (a listing the kernel may keep: ``dir_cache``)."""
    layer = r.fixtures.bigdir(r.sizes.bigdir_entries)
    n = r.sizes.bigdir_entries
    metrics = [Metric("readdir", "s", "lower", FAMILY, f"os.listdir of a {n}-entry directory", "fresh"),
               Metric("readdir_warm", "s", "lower", FAMILY, "the same os.listdir again, same mount", "warm")]

    def listing(big: str) -> float:
        start = time.perf_counter()
        got = len(os.listdir(big))
        elapsed = time.perf_counter() - start
        if got != n:
            raise AssertionError(f"listed {got} entries, expected {n}")
        return elapsed

    def body(m: Mount) -> dict[str, float]:
        big = os.path.join(m.root, "big")
        return {"readdir": listing(big), "readdir_warm": listing(big)}

    r.measure(metrics, Plan(Stack((layer,))), body, params={"entries": n})


def ls_l(r: Runner) -> None:
    """``ls -l`` of the same big directory on a fresh mount: readdir plus a stat per entry (readdirplus),
    then again on the same mount."""
    layer = r.fixtures.bigdir(r.sizes.bigdir_entries)
    n = r.sizes.bigdir_entries
    metrics = [Metric("ls_l_bigdir", "s", "lower", FAMILY,
                      f"ls -l of a {n}-entry directory (readdir + a stat per entry)", "fresh"),
               Metric("ls_l_bigdir_warm", "s", "lower", FAMILY, "the same ls -l again, same mount", "warm")]

    def body(m: Mount) -> dict[str, float]:
        big = os.path.join(m.root, "big")
        return {"ls_l_bigdir": run_timed(["ls", "-l", big]), "ls_l_bigdir_warm": run_timed(["ls", "-l", big])}

    r.measure(metrics, Plan(Stack((layer,))), body, params={"entries": n})

"""Rename of a lower directory with N entries: ``mv`` on unionfs (one rename with ``redirect_dir=on``)
against ``mv`` on fuse-overlayfs (EXDEV, so ``mv`` copies the tree and removes the old one), same run.

    .venv/bin/python -m benchmarks.rename_dir_bench [--entries 10000] [--reps 3] [--json OUT]

Each repetition builds a fresh lower layer (``big/f00000`` … small files), mounts it with an empty upper,
times ``mv big moved`` through the mount, checks the moved tree shows every entry, and unmounts.  Prints
one JSON record (date, host, commit, median seconds per system and their ratio).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs-mount")
SYSTEMS = {
    "unionfs": [UNIONFS],
    "fuse-overlayfs": ["/usr/bin/fuse-overlayfs"],
}


def build_lower(root: Path, entries: int) -> None:
    big = root / "big"
    big.mkdir(parents=True)
    for i in range(entries):
        (big / f"f{i:05d}").write_bytes(b"x" * 64)


def one_run(system: str, base: Path, entries: int) -> float:
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    build_lower(lower, entries)
    for d in (upper, work, mnt):
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if system == "unionfs":
        opts += ",redirect_dir=on"
    subprocess.run([*SYSTEMS[system], "-o", opts, str(mnt)], check=True)
    try:
        start = time.perf_counter()
        subprocess.run(["mv", str(mnt / "big"), str(mnt / "moved")], check=True)
        elapsed = time.perf_counter() - start
        shown = len(list((mnt / "moved").iterdir()))
        if shown != entries:
            raise RuntimeError(f"{system}: moved dir shows {shown} entries, expected {entries}")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return elapsed


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for _ in range(args.reps):
        for name in SYSTEMS:
            base = Path(tempfile.mkdtemp(prefix=f"rename-bench-{name}-"))
            try:
                times[name].append(one_run(name, base, args.entries))
            finally:
                shutil.rmtree(base, ignore_errors=True)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    record: dict[str, Any] = {
        "benchmark": "rename_dir", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "commit": git_commit(), "entries": args.entries, "reps": args.reps,
        "seconds": times, "median_seconds": medians,
        "fuse_overlayfs_over_unionfs": medians["fuse-overlayfs"] / medians["unionfs"],
    }
    text = json.dumps(record, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

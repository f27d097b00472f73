"""Commit throughput: ``unionfs commit`` of an upper dir against ``cp -a`` of the same dir.

``python -m benchmarks.commit_bench [--quick] [--reps N] [--cold] [--dir DIR] [--update benchmarks/RESULTS.md]``

Workloads (upper dirs built once, on the filesystem of ``--dir``): many small files, a few large files, and
a mixed tree with whiteouts, opaque dirs, hard links and symlinks.  For each, interleaved over ``--reps``
rounds (median and spread reported):

* ``commit``      — :func:`unionfs.image.commit.commit_upper` into a fresh store (both passes: read + stage,
  then ``syncfs`` and publish), in-process;
* ``commit-dedup``— the same content committed again into that store (the read pass only, no data written);
* ``cp -a``       — ``cp -a UPPER DEST`` on the same filesystem;
* ``cp -a + sync``— the same followed by ``sync -f`` (a commit makes its layer durable; ``cp`` does not).

The order of the systems rotates from round to round and all dirty data is flushed (untimed) before each
measurement.

Figures: seconds, files/s (every entry counts) and MiB/s (file data).  With ``--cold`` the page cache is
dropped before each measurement (root only), else the source is warm for every system.  Results go to
``benchmarks/out/commit-DATE.json`` (date, host, commit, kernel, every sample) and, with ``--update``, into
the "Commit" section of RESULTS.md (between its markers; the rest of the file is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionfs.image.commit import commit_upper
from unionfs.image.store import Store

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- commit:begin -->", "<!-- commit:end -->"
SYSTEMS = ("commit", "commit-dedup", "cp -a", "cp -a + sync")


@dataclass(frozen=True)
class Workload:
    name: str
    describe: str
    build: Callable[[Path], None]


def _write(path: Path, size: int, seed: int) -> None:
    block = (seed.to_bytes(4, "little") * 1024)[:4096]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block) * 256)
            f.write((block * 256)[:n])
            left -= n


def small_files(count: int) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        for i in range(count):
            d = root / f"d{i % 100:03d}" / f"s{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            _write(d / f"f{i}", 512 + (i * 997) % 7680, i)
    return build


def large_files(count: int, size: int) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        for i in range(count):
            _write(root / f"big{i}", size, i)
    return build


def mixed(count: int) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        small_files(count)(root)
        for i in range(0, count, 10):
            d = root / f"d{i % 100:03d}"
            os.link(d / f"s{i % 7}" / f"f{i}", d / f"link{i}")
            os.symlink(f"s{i % 7}/f{i}", d / f"sym{i}")
            os.mknod(d / f"gone{i}", 0o20000, 0)  # a whiteout
        for i in range(0, 100, 5):
            os.setxattr(root / f"d{i:03d}", "trusted.overlay.opaque", b"y")
        _write(root / "blob", 64 << 20, 7)
    return build


def workloads(quick: bool) -> list[Workload]:
    n = 2_000 if quick else 20_000
    big = (4, 64 << 20) if quick else (4, 256 << 20)
    return [
        Workload("small files", f"{n} files of 0.5-8 KiB in 700 dirs", small_files(n)),
        Workload("large files", f"{big[0]} files of {big[1] >> 20} MiB", large_files(*big)),
        Workload("mixed", f"{n} small files, hard links, symlinks, whiteouts, opaque dirs, one 64 MiB file",
                 mixed(n)),
    ]


def tree_size(root: Path) -> tuple[int, int]:
    """(entries, file bytes) of a tree, each hard-linked file once."""
    entries, nbytes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                nbytes += st.st_size
    return entries + 1, nbytes


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(upper: Path, scratch: Path, reps: int, cold: bool) -> dict[str, list[float]]:
    """Seconds per system, ``reps`` samples each.  Within a round the systems run one after another (the
    dedup commit right after the commit whose store it uses); the order rotates from round to round, and
    everything written before is flushed (untimed) before each measurement, so that no system pays for the
    writeback of another's files or of the last round's clean-up."""
    samples: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    blocks = [("commit", "commit-dedup"), ("cp -a",), ("cp -a + sync",)]
    for rnd in range(reps):
        order = [system for block in blocks[rnd % 3:] + blocks[:rnd % 3] for system in block]
        for system in order:
            store_dir = scratch / "store"
            dest = scratch / f"cp-{system.replace(' ', '')}"
            os.sync()
            if cold:
                drop_caches()
            if system in ("commit", "commit-dedup"):
                def run_commit(store_dir: Path = store_dir, name: str = system) -> None:
                    with Store(str(store_dir), writable=True) as store:
                        result = commit_upper(store, str(upper), image=name.replace(" ", "-"))
                    assert result.new_layer == (name == "commit")
                samples[system].append(timed(run_commit))
            else:
                def run_cp(dest: Path = dest, sync: bool = system == "cp -a + sync") -> None:
                    subprocess.run(["cp", "-a", str(upper), str(dest)], check=True)
                    if sync:
                        subprocess.run(["sync", "-f", str(dest)], check=True)
                samples[system].append(timed(run_cp))
        for path in scratch.iterdir():
            shutil.rmtree(path)
    return samples


def summarise(samples: list[float], entries: int, nbytes: int) -> dict[str, Any]:
    med = statistics.median(samples)
    return {"samples": samples, "median_s": med, "min_s": min(samples), "max_s": max(samples),
            "files_per_s": entries / med, "mib_per_s": nbytes / med / (1 << 20)}


def git_commit() -> str:
    proc = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    return proc.stdout.strip() or "unknown"


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"`python -m benchmarks.commit_bench{' --quick' if data['quick'] else ''} --reps {data['reps']}"
        f"{' --cold' if data['cold'] else ''} --dir {data.get('dir', '/var/tmp')}` — {data['date']}, "
        f"{data['host']} ({data['cpus']} CPUs, "
        f"kernel {data['kernel']}, {data['fs']}), commit {data['commit']}; "
        f"{'cold' if data['cold'] else 'warm'} page cache; medians of {data['reps']} interleaved rounds.",
        "",
        "| workload | entries | data | system | seconds (min–max) | files/s | MiB/s | commit / cp -a + sync |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for w in data["workloads"]:
        base = w["results"]["cp -a + sync"]["median_s"]
        for system in SYSTEMS:
            r = w["results"][system]
            ratio = f"{r['median_s'] / base:.2f}x" if system.startswith("commit") else ""
            lines.append(f"| {w['name']} | {w['entries']:,} | {w['bytes'] / (1 << 20):,.0f} MiB | {system} | "
                         f"{r['median_s']:.2f} ({r['min_s']:.2f}–{r['max_s']:.2f}) | {r['files_per_s']:,.0f} | "
                         f"{r['mib_per_s']:,.0f} | {ratio} |")
    return "\n".join(lines)


def update_results(path: Path, text: str) -> None:
    """Replace the Commit section's body between its markers, or append the section."""
    current = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in current and END in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        path.write_text(head + block + tail)
        return
    intro = ("\n## Commit\n\n`unionfs commit` of an upper dir (read + digest, stage, sync, publish) against "
             "`cp -a` of the same dir on the same filesystem (`benchmarks/commit_bench.py`).\n\n")
    path.write_text(current.rstrip("\n") + "\n" + intro + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.commit_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller trees")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement")
    parser.add_argument("--dir", default="/var/tmp", help="where the trees are built (its filesystem is used)")
    parser.add_argument("--update", metavar="RESULTS.md", help="write the table into this file's Commit section")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="commit-bench-", dir=args.dir))
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(base)], capture_output=True, text=True,
                           check=False).stdout.split()
    fs = found[0] if found else "unknown"
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
                            "cpus": os.cpu_count(), "kernel": platform.release(), "python": sys.version.split()[0],
                            "commit": git_commit(), "fs": fs, "quick": args.quick, "reps": args.reps,
                            "cold": args.cold, "dir": args.dir, "workloads": []}
    try:
        for w in workloads(args.quick):
            upper = base / "upper"
            upper.mkdir()
            w.build(upper)
            entries, nbytes = tree_size(upper)
            scratch = base / "scratch"
            scratch.mkdir()
            print(f"{w.name}: {entries} entries, {nbytes >> 20} MiB", file=sys.stderr)
            samples = measure(upper, scratch, args.reps, args.cold)
            data["workloads"].append({"name": w.name, "describe": w.describe, "entries": entries, "bytes": nbytes,
                                      "results": {s: summarise(v, entries, nbytes) for s, v in samples.items()}})
            shutil.rmtree(upper)
            shutil.rmtree(scratch)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    target = out / f"commit-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    print(text)
    print(f"raw results: {target}", file=sys.stderr)
    if args.update:
        update_results(Path(args.update), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

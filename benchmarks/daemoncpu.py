"""Daemon CPU of one mount, in ns from the scheduler: ``python -m benchmarks.daemoncpu walk|mount …``.

Wall times on a shared, loaded machine spread widely; the CPU a daemon spends is distorted much less.  Each
variant is a mount command with fuse-overlayfs' command line (``LABEL=COMMAND``, e.g. a wrapper that runs
another checkout, or ``unionfs-mount -o spin=off``); the variants interleave, round after round.

- ``walk``: a fresh mount of ``--layer`` (the diffwalk's tree by default) with the kernel's dentry and inode
  caches dropped, walked once by one process (``lstat`` per entry; with ``--xattrs`` also the diffwalk's
  ``lgetxattr`` + ``llistxattr``).  Reports wall, the daemon's CPU (every thread, from
  ``/proc/PID/task/*/schedstat``) per entry and per request (``unionfs stats``), and its CPU while idle
  afterwards (a polling reader must not burn any).  ``--again`` times a second walk of the same mount
  instead: what the daemon answers from its cache (with ``-o attr_timeout=0`` in the command, one GETATTR
  per entry: the per-request floor of a cached answer).
- ``cached``: one file of a fresh mount, ``--calls`` fstat(2) and then as many fgetxattr(2) of an absent
  name through one descriptor: with ``-o attr_timeout=0`` in the command each reaches the daemon (a GETATTR;
  a GETATTR and a GETXATTR), which answers from its cache.  Reports wall per call, the daemon's CPU per
  request and the requests per call.
- ``mount``: mount-to-ready of a stack of ``--layers`` one-file layers: wall, and the CPU of the mount
  command plus the daemon until the command returned.

Medians over ``--rounds``; the table is Markdown for ``benchmarks/RESULTS.md``.  A label holds no ``=``; the
frontend is the command's (``-o frontend=…``) or ``$UNIONFS_FRONTEND``, e.g.
``UNIONFS_FRONTEND=lowlevel python -m benchmarks.daemoncpu walk a=unionfs-mount 'b=unionfs-mount -o spin=off'``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.diffwalk import WALKER, _layer
from benchmarks.systems import find_daemon_pids, unmount

STAT_WALKER = WALKER.replace('os.getxattr(p, "security.capability", follow_symlinks=False)', "pass").replace(
    "os.listxattr(p, follow_symlinks=False)", "pass")


def _cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with open(path) as f:
                total += int(f.read().split()[0])
    return total


def _mount(command: list[str], lowers: list[Path], run: Path) -> tuple[float, float, Path, list[int]]:
    """Mount; returns (wall s, CPU s of the command and the daemon so far, mountpoint, daemon pids)."""
    shutil.rmtree(run, ignore_errors=True)
    upper, work, mnt = run / "upper", run / "work", run / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    start = time.perf_counter()
    proc = subprocess.Popen([*command, "-o", opts, str(mnt)], stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0 or not os.path.ismount(mnt):
        raise SystemExit(f"{shlex.join(command)}: the mount failed (status {status})")
    pids = find_daemon_pids(mnt)
    return wall, usage.ru_utime + usage.ru_stime + _cpu_ns(pids) / 1e9, mnt, pids


def _requests(mnt: Path) -> int:
    return sum(_calls(mnt).values())


def _calls(mnt: Path) -> dict[str, int]:
    """Requests so far per operation (``unionfs stats``; empty for a daemon without it)."""
    proc = subprocess.run([sys.executable, "-m", "mountd.cli.main", "stats", "--json", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {}
    return {name: int(op["calls"]) for name, op in json.loads(proc.stdout)["operations"].items()}


CACHED_CALLS = """
import os, sys
fd, n, kind = os.open(sys.argv[1], os.O_RDONLY), int(sys.argv[2]), sys.argv[3]
for _ in range(n):
    if kind == "fstat":
        os.fstat(fd)
    else:
        try:
            os.getxattr(fd, "user.absent")
        except OSError:
            pass
"""


def _cached_once(command: list[str], run: Path, calls: int) -> tuple[float, ...]:
    """One file, ``calls`` fstat(2) then ``calls`` fgetxattr(2) of an absent name on a mount whose command
    should say ``-o attr_timeout=0``: every call reaches the daemon, which answers from its cache."""
    lower = run.parent / "cached-layer"
    lower.mkdir(parents=True, exist_ok=True)
    (lower / "f").write_text("x")
    _, _, mnt, pids = _mount(command, [lower], run)
    out: list[float] = []
    try:
        for kind in ("fstat", "getxattr"):
            before, cpu0, start = _calls(mnt), _cpu_ns(pids), time.perf_counter()
            subprocess.run([sys.executable, "-c", CACHED_CALLS, str(mnt / "f"), str(calls), kind], check=True)
            wall, cpu1, after = time.perf_counter() - start, _cpu_ns(pids), _calls(mnt)
            requests = sum(after.values()) - sum(before.values())
            out += [wall / calls * 1e6, (cpu1 - cpu0) / 1e3 / max(requests, 1), requests / calls]
    finally:
        unmount(mnt, pids)
    return tuple(out)


def _walk_once(command: list[str], layer: Path, run: Path, walker: str, *, again: bool = False) -> tuple[float, ...]:
    _, _, mnt, pids = _mount(command, [layer], run)
    try:
        time.sleep(0.3)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes: the walk is cold
        requests0 = 0
        if again:  # the timed walk is the second: the daemon has everything cached
            subprocess.run([sys.executable, "-c", walker, str(mnt)], capture_output=True, check=True)
            requests0 = _requests(mnt)
        cpu0, start = _cpu_ns(pids), time.perf_counter()
        out = subprocess.run([sys.executable, "-c", walker, str(mnt)], capture_output=True, text=True, check=True)
        wall, cpu1 = time.perf_counter() - start, _cpu_ns(pids)
        requests = _requests(mnt) - requests0
        time.sleep(0.5)
        idle0 = _cpu_ns(pids)
        time.sleep(1.0)
        idle = (_cpu_ns(pids) - idle0) / 1e6
    finally:
        unmount(mnt, pids)
    entries = int(out.stdout)
    cpu_us = (cpu1 - cpu0) / 1e3
    return wall, cpu_us / entries, cpu_us / max(requests, 1), requests / entries, idle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("walk", "mount", "cached"))
    parser.add_argument("variants", nargs="+", metavar="LABEL=COMMAND")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer", type=Path, help="the tree to walk (default: the diffwalk's)")
    parser.add_argument("--layers", type=int, default=1, help="mount: layers in the stack")
    parser.add_argument("--xattrs", action="store_true", help="walk: the diffwalk's xattr calls too")
    parser.add_argument("--again", action="store_true",
                        help="walk: time a second walk of the same mount (what the daemon answers from its cache; "
                        "with -o attr_timeout=0 in the command every lstat is a GETATTR)")
    parser.add_argument("--calls", type=int, default=50_000, help="cached: calls of each kind")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/unionfs-bench"))
    args = parser.parse_args(argv)
    variants = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variants]
    rows: dict[str, list[tuple[float, ...]]] = {label: [] for label, _ in variants}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    base = args.scratch / "daemoncpu"
    if args.what == "walk":
        layer = _layer(args.scratch, args.layer)
        walker = WALKER if args.xattrs else STAT_WALKER
    else:
        lowers = [base / "layers" / str(args.layers) / f"l{i}" for i in range(args.layers)]
        for i, lower in enumerate(lowers):
            lower.mkdir(parents=True, exist_ok=True)
            (lower / f"f{i}").write_text("x")
    for _ in range(args.rounds):
        for label, command in variants:
            if args.what == "walk":
                rows[label].append(_walk_once(command, layer, base / "run", walker, again=args.again))
            elif args.what == "cached":
                rows[label].append(_cached_once(command, base / "run", args.calls))
            else:
                wall, cpu, mnt, pids = _mount(command, lowers, base / "run")
                unmount(mnt, pids)
                rows[label].append((wall, cpu))
            print(f"{label}: {', '.join(f'{x:.4g}' for x in rows[label][-1])}", file=sys.stderr, flush=True)

    def med(label: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[label])

    print(f"`python -m benchmarks.daemoncpu {args.what}`, {started}, medians of {args.rounds} rounds:\n")
    if args.what == "walk":
        print("| variant | wall (s) | daemon CPU per entry (µs) | per request (µs) | requests per entry "
              "| idle CPU (ms/s) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, _ in variants:
            print(f"| {label} | {med(label, 0):.3f} | {med(label, 1):.1f} | {med(label, 2):.1f} "
                  f"| {med(label, 3):.2f} | {med(label, 4):.2f} |")
    elif args.what == "cached":
        print("| variant | fstat wall (µs) | daemon CPU per request (µs) | requests per fstat "
              "| fgetxattr wall (µs) | daemon CPU per request (µs) | requests per fgetxattr |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, _ in variants:
            print(f"| {label} | " + " | ".join(f"{med(label, i):.{2 if i % 3 == 2 else 1}f}" for i in range(6))
                  + " |")
    else:
        print(f"| variant | mount-to-ready @{args.layers} wall (ms) | CPU of command + daemon (ms) |")
        print("| --- | ---: | ---: |")
        for label, _ in variants:
            print(f"| {label} | {med(label, 0) * 1000:.0f} | {med(label, 1) * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

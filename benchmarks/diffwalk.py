"""The walk of a container build's commit: ``python -m benchmarks.diffwalk [--rounds 3] [--layer DIR]``.

With a mount program, containers/storage diffs a new layer naively: it mounts the layer and its parent and
walks both trees at once (``archive.ChangesDirs``), with an ``lstat``, a ``lgetxattr("security.capability")``
and a ``llistxattr`` per entry.  This benchmark does the same on each system: two mounts of one layer, two
walker processes started together; it reports the wall time until both are done and the CPU each FUSE daemon
spent (user + system), medians over the rounds (the systems interleave).

The layer is ``--layer DIR`` or, by default, the e2e tests' Debian minbase + gcc tree (the cached tarball
of ``tests/e2e``), unpacked once under the scratch dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.systems import Mount, Stack, System, make_systems

BASE_TARBALL = Path("/var/cache/unionfs-e2e/bookworm-minbase-gcc-v1.tar")
WALKER = """
import os, sys
n = 0
stack = [sys.argv[1]]
while stack:
    d = stack.pop()
    for name in sorted(os.listdir(d)):
        p = d + "/" + name
        st = os.lstat(p)
        try:
            os.getxattr(p, "security.capability", follow_symlinks=False)
        except OSError:
            pass
        os.listxattr(p, follow_symlinks=False)
        n += 1
        if (st.st_mode & 0o170000) == 0o040000:
            stack.append(p)
print(n)
"""


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _layer(scratch: Path, given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    layer = scratch / "diffwalk-base"
    if not (scratch / "diffwalk-base.done").exists():
        if not BASE_TARBALL.exists():
            raise SystemExit(f"no --layer and no {BASE_TARBALL} (run the e2e tests once to build it)")
        shutil.rmtree(layer, ignore_errors=True)
        layer.mkdir(parents=True)
        with tarfile.open(BASE_TARBALL) as tar:
            tar.extractall(layer, filter="tar")
        (scratch / "diffwalk-base.done").touch()
    return layer


def _round(system: System, layer: Path, scratch: Path) -> tuple[float, float, int]:
    run = scratch / "diffwalk-runs" / system.name
    shutil.rmtree(run, ignore_errors=True)
    stack = Stack((layer,))
    with system.mount(stack, run / "a", writable=False) as a, system.mount(stack, run / "b", writable=False) as b:
        mounts: list[Mount] = [a, b]
        pids = [pid for m in mounts for pid in m.daemon_pids]
        cpu0 = _cpu_seconds(pids)
        start = time.perf_counter()
        walkers = [subprocess.Popen([sys.executable, "-c", WALKER, str(m.root)], stdout=subprocess.PIPE, text=True)
                   for m in mounts]
        counts = [int(w.communicate()[0]) for w in walkers]
        wall = time.perf_counter() - start
        cpu = _cpu_seconds(pids) - cpu0
    if any(w.returncode for w in walkers) or counts[0] != counts[1]:
        raise RuntimeError(f"{system.name}: walkers failed or disagree ({counts})")
    return wall, cpu / len(mounts), counts[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer", type=Path)
    parser.add_argument("--systems", default="kernel,fuse-overlayfs,unionfs")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/unionfs-bench"))
    args = parser.parse_args(argv)
    layer = _layer(args.scratch, args.layer)
    systems = make_systems([s for s in args.systems.split(",") if s])
    walls: dict[str, list[float]] = {s.name: [] for s in systems}
    cpus: dict[str, list[float]] = {s.name: [] for s in systems}
    entries = 0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for rnd in range(args.rounds):
        order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
        for system in order:
            wall, cpu, entries = _round(system, layer, args.scratch)
            walls[system.name].append(wall)
            cpus[system.name].append(cpu)
            print(f"round {rnd + 1} {system.name}: {wall:.2f} s, daemon CPU {cpu:.2f} s per mount",
                  file=sys.stderr, flush=True)
    print(f"`python -m benchmarks.diffwalk --rounds {args.rounds}`, {started}: two mounts of a {entries:,}-entry "
          "layer walked at once (lstat + lgetxattr + llistxattr per entry); medians (runs).\n")
    print("| system | wall (s) | daemon CPU per mount (s) | daemon CPU per entry (µs) |")
    print("| --- | ---: | ---: | ---: |")
    for s in systems:
        cpu = statistics.median(cpus[s.name])
        per_entry = f"{cpu / entries * 1e6:.0f}" if cpu else "—"
        print(f"| {s.name} | {statistics.median(walls[s.name]):.2f} ({', '.join(f'{w:.2f}' for w in walls[s.name])}) "
              f"| {cpu:.2f} | {per_entry} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

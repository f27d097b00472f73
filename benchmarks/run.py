"""Run the benchmarks: ``python -m benchmarks.run --quick|--full [--only W,…] [--systems S,…] [--out DIR]``.

Writes ``OUT/YYYYmmdd-HHMMSS-MODE.json`` (see :mod:`benchmarks.measure` for its layout), saved after every
figure, and prints the table of :mod:`benchmarks.report` at the end. Needs root for the kernel's overlayfs and
for dropping caches.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import report
from benchmarks.config import Mode, sizes_for
from benchmarks.fixtures import Fixtures
from benchmarks.measure import SCHEMA, TEMPERATURES, Recorder, git_info, host_info, now_iso
from benchmarks.runner import Runner
from benchmarks.systems import UNIONFS_ENV, can_drop_caches, make_systems, unmount_stale
from benchmarks.workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
ALL_SYSTEMS = ("native", "kernel", "fuse-overlayfs", "unionfs")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes, ~2 min")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="issue 4 sizes, ~15 min")
    mode.add_argument("--list", dest="mode", action="store_const", const="list", help="list workloads")
    p.add_argument("--only", default="", help=f"comma-separated workloads ({', '.join(WORKLOADS)})")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help="comma-separated, in this order; unionfs:OPT[+OPT…] adds a unionfs with those -o options")
    p.add_argument("--out", type=Path, default=HERE / "out", help="directory for the JSON result")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/unionfs-bench"),
                   help="fixtures and per-run upper dirs (reused between runs)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the fixtures even if cached")
    p.add_argument("--runs", type=int, default=0, help="runs per figure (default: 3)")
    p.add_argument("--unionfs-opts", default="", help="extra -o options for unionfs only (option on/off)")
    p.add_argument("--recycle-memory", action="store_true",
                   help="before each timed write/cold read, write and delete as much scratch data (see README)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-run progress on stderr")
    return p.parse_args(argv)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every mount's finally: nothing stays mounted


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.mode == "list":
        for name, fn in WORKLOADS.items():
            print(f"{name:12} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    mode: Mode = args.mode
    only = [w for w in args.only.split(",") if w] or list(WORKLOADS)
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    sizes = sizes_for(mode)
    if args.runs:
        sizes = replace(sizes, runs=args.runs)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    scratch: Path = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    for mp in unmount_stale(scratch):
        log(f"unmounted stale {mp}")
    signal.signal(signal.SIGTERM, _on_sigterm)

    systems = make_systems([s for s in args.systems.split(",") if s], unionfs_opts=args.unionfs_opts)
    infos = {}
    for s in systems:
        info = s.probe(scratch)
        infos[s.name] = info
        log(f"{s.name}: " + (f"available ({info.version})" if info.available else f"UNAVAILABLE: {info.reason}"))
    available = [s for s in systems if infos[s.name].available]
    can_drop = can_drop_caches()
    if not can_drop:
        log("cannot drop caches (not root): 'cold' figures will not be cold")

    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "date": now_iso(),
        "host": host_info(scratch),
        "commit": git_info(HERE.parent),
        "options": {
            "mode": mode, "argv": sys.argv[1:] if argv is None else argv, "workloads": only,
            "sizes": sizes.as_dict(), "scratch": str(scratch), "unionfs_opts": args.unionfs_opts,
            "unionfs_override": os.environ.get(UNIONFS_ENV, ""), "drop_caches": can_drop,
            "recycle_memory": args.recycle_memory,
            "temperatures": TEMPERATURES,
        },
        "systems": {name: vars(info) for name, info in infos.items()},
        "results": {},
    }
    recorder = Recorder(args.out.resolve() / f"{stamp}-{mode}.json", doc)
    recorder.save()
    fixtures = Fixtures(scratch / "fixtures", rebuild=args.rebuild, log=log)
    runner = Runner(systems=available, sizes=sizes, fixtures=fixtures, scratch=scratch, recorder=recorder,
                    can_drop=can_drop, recycle=args.recycle_memory, verbose=not args.quiet)
    status = 0
    try:
        for name in only:
            log(f"== {name}")
            t0 = time.monotonic()
            try:
                WORKLOADS[name](runner)
            except Exception as e:  # a fixture that cannot be built: record it, go on with the rest
                doc.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                log(f"  {name} FAILED: {e}")
                status = 1
            log(f"   ({time.monotonic() - t0:.1f} s)")
    except KeyboardInterrupt:
        doc["interrupted"] = True
        status = 130
        log("interrupted")
    finally:
        doc["finished"] = now_iso()
        doc["duration_s"] = round(time.monotonic() - started, 1)
        doc["host"]["loadavg_end"] = os.getloadavg()
        recorder.save()
    print(report.render(doc))
    print(f"\nresults: {recorder.path}")
    return status


if __name__ == "__main__":
    sys.exit(main())

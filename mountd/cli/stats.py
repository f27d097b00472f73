"""``unionfs stats MOUNTPOINT``: the cache counters and per-operation counts/latency of a running daemon,
read over its control channel."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mountd.cli.exits import EXIT_FAILURE, error
from unionfs.control import ControlClient


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        with ControlClient(args.mountpoint, timeout=10.0) as client:
            answer = client.request("stats")
    except OSError as exc:
        error("unionfs", f"{args.mountpoint}: no unionfs daemon answers there ({exc.strerror or exc})")
        return EXIT_FAILURE
    if not answer.get("ok"):
        error("unionfs", answer.get("error", "the daemon refused"))
        return EXIT_FAILURE
    answer.pop("ok")
    if args.json:
        json.dump(answer, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(render(answer))
    return 0


def render(stats: dict[str, Any]) -> str:
    """Human-readable form of a ``stats`` answer."""
    cache = stats.get("cache", {})
    lookups = cache.get("hits", 0) + cache.get("misses", 0)
    rate = f"{100 * cache.get('hits', 0) / lookups:.1f}%" if lookups else "-"
    lines = [
        f"cache: {cache.get('entries', 0)} / {cache.get('max_entries', 0)} entries "
        f"({cache.get('dirs', 0)} dirs, {cache.get('attrs', 0)} attrs), hit rate {rate}, "
        f"hits {cache.get('hits', 0)}, misses {cache.get('misses', 0)}, "
        f"invalidations {cache.get('invalidations', 0)}, evictions {cache.get('evictions', 0)}",
        f"open files: {stats.get('open_files', 0)}{'  (paused)' if stats.get('paused') else ''}",
        f"{'operation':<14}{'calls':>10}{'errors':>9}{'avg µs':>10}{'total ms':>12}",
    ]
    for name, op in sorted(stats.get("operations", {}).items(), key=lambda kv: -kv[1]["calls"]):
        lines.append(f"{name:<14}{op['calls']:>10}{op['errors']:>9}{op['avg_us']:>10.1f}{op['total_ms']:>12.1f}")
    return "\n".join(lines)


def add_command(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "stats", help="cache counters and per-operation latency of a running mount",
        description="Ask the daemon of MOUNTPOINT for its lookup-cache counters and per-operation counts "
                    "and latency.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

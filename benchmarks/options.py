"""Measure unionfs's kernel-side options on and off: ``python -m benchmarks.options [--rounds 3] [--full]``.

Each variant is unionfs with one option turned the other way from its default (see :data:`VARIANTS`).  A
round runs every variant once (``benchmarks.run --systems unionfs --runs 1``) on the workloads the options
touch; the rounds interleave the variants, in an order that rotates from round to round, so that a noisy
neighbour or a first-of-round effect hurts all of them alike.  Prints a
Markdown table of the medians over the rounds and, per variant, the ratio to the defaults (for a time below 1
is better, for a throughput above 1 is).  ``--json FILE`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, str] = {
    "defaults": "",
    "timeouts 0": "entry_timeout=0,attr_timeout=0,negative_timeout=0",
    "no kernel_cache": "kernel_cache=0",
    "readdirplus auto": "readdirplus=auto",
    "no readdirplus": "readdirplus=0",
    "writeback_cache": "writeback_cache",
}
"""Variant name -> the extra ``-o`` options of unionfs (the defaults: 3600 s timeouts, ``kernel_cache``,
readdirplus with every reply, no writeback cache; libfuse 3 sizes requests itself, libfuse 2's ``big_writes``
is measured in RESULTS.md's "Binding choice")."""

WORKLOADS = ("stat", "find", "ls_l", "read_seq", "read_random", "write_seq", "create")


def _run_variant(opts: str, workloads: str, mode: str, out: Path) -> dict[str, Any]:
    before = set(out.glob("*.json"))
    argv = [sys.executable, "-m", "benchmarks.run", f"--{mode}", "--systems", "unionfs", "--runs", "1", "-q",
            "--only", workloads, "--out", str(out)]
    if opts:
        argv += ["--unionfs-opts", opts]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    (result,) = set(out.glob("*.json")) - before
    doc: dict[str, Any] = json.loads(result.read_text())
    result.unlink()
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_const", const="full", dest="mode", default="quick")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="workloads (benchmarks.run --list)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variant names (always with 'defaults'): " + ", ".join(VARIANTS))
    args = parser.parse_args(argv)
    names = ["defaults"] + [n for n in args.variants.split(",") if n and n != "defaults"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    figures: dict[str, dict[str, list[float]]] = {}
    meta: dict[str, tuple[str, str]] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="unionfs-options-") as tmp:
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # each variant leads a round
                opts = VARIANTS[name]
                print(f"round {rnd + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                doc = _run_variant(opts, args.only, args.mode, Path(tmp))
                for fig, res in doc["results"].items():
                    run = res["systems"].get("unionfs", {})
                    if run.get("median") is None:
                        continue
                    figures.setdefault(fig, {}).setdefault(name, []).append(float(run["median"]))
                    meta[fig] = (res["unit"], res["better"])
    if args.json:
        chosen = {n: VARIANTS[n] for n in names}
        args.json.write_text(json.dumps({"date": started, "mode": args.mode, "variants": chosen,
                                         "figures": figures}, indent=1) + "\n")
    print(f"`python -m benchmarks.options --rounds {args.rounds}{' --full' if args.mode == 'full' else ''}`, "
          f"{started}; medians of {args.rounds} rounds; in brackets: variant / defaults.\n")
    print("| figure | unit | " + " | ".join(f"{n} (`{VARIANTS[n]}`)" if VARIANTS[n] else n for n in names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for fig, per in figures.items():
        unit, better = meta[fig]
        base = statistics.median(per["defaults"]) if per.get("defaults") else None
        cells = []
        for n in names:
            if not per.get(n):
                cells.append("—")
                continue
            med = statistics.median(per[n])
            ratio = f" ({med / base:.2f})" if base and n != "defaults" else ""
            cells.append(f"{med:.3g}{ratio}")
        arrow = "↓" if better == "lower" else "↑"
        print(f"| `{fig}` | {unit} {arrow} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

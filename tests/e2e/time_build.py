"""Wall time of ``podman build --no-cache`` of the e2e Containerfile per overlay driver.

    .venv/bin/python tests/e2e/time_build.py [--runs 3] [--json OUT.json] [--systems kernel,fuse-overlayfs,unionfs]

Each system gets a private storage root with the base image imported (not timed); the runs are interleaved
(kernel, fuse-overlayfs, unionfs, kernel, …) so a noisy neighbour hurts all of them alike.  Prints a Markdown
table; ``--json`` also writes the raw figures with date, host and commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from e2e_support import Storage, ensure_base_tarball, program_path, run  # noqa: E402
from test_container_build import CONTAINERFILE, GREETING, HELLO_C  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--systems", default="kernel,fuse-overlayfs,unionfs")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    tarball = ensure_base_tarball()
    top = Path(tempfile.mkdtemp(prefix="unionfs-e2e-timing-"))
    ctx = top / "ctx"
    ctx.mkdir()
    (ctx / "hello.c").write_text(HELLO_C)
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    storages = {name: Storage(name=name, program=program_path(name), home=top / name) for name in systems}
    times: dict[str, list[float]] = {name: [] for name in systems}
    try:
        for storage in storages.values():
            storage.import_base(tarball)
        for i in range(args.runs):
            for name, storage in storages.items():
                start = time.monotonic()
                storage.podman("build", "--no-cache", "-q", "-t", f"localhost/timing-{i}", str(ctx))
                times[name].append(time.monotonic() - start)
                out = storage.podman("run", "--rm", f"localhost/timing-{i}").stdout.strip()
                assert out == GREETING, out
                print(f"run {i + 1} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        for storage in storages.values():
            storage.destroy()
        run(["rm", "-rf", str(top)])
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
              "kernel": platform.release(), "commit": commit, "programs": {n: program_path(n) for n in systems},
              "seconds": times}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("| system | median (s) | runs (s) |")
    print("| --- | ---: | --- |")
    for name in systems:
        print(f"| {name} | {statistics.median(times[name]):.1f} | "
              f"{', '.join(f'{t:.1f}' for t in times[name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

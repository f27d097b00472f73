"""``unionfs build`` against ``podman build`` (kernel overlay driver) on the e2e Containerfile, in one run.

    .venv/bin/python -m benchmarks.build_bench [--runs 3] [--json OUT.json]

The Containerfile is the one of ``tests/e2e/test_unionfs_build.py`` (Debian 12 minbase + gcc base, WORKDIR,
two COPY, a RUN that compiles C, a RUN that removes and overwrites files of lower layers, ENV, LABEL, CMD).
Both builders get the base image beforehand (not timed): podman in a private storage root with the kernel's
overlay driver, unionfs in a private store.  Measured, interleaved (podman, unionfs, podman, …):

* ``--no-cache`` builds, wall time of the whole command;
* fully cached rebuilds, wall time of the whole command (process start included; the target is ≤ 0.5 s).

Every unionfs image is checked (mounted, its program prints the greeting).  Prints a Markdown table; ``--json``
writes the raw figures with date, host and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from e2e_support import BASE_IMAGE, Storage, ensure_base_tarball, run  # noqa: E402
from test_unionfs_build import E2E_CONTAINERFILE, GREETING, HELLO_C  # noqa: E402

UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")


def _context(top: Path) -> Path:
    ctx = top / "ctx"
    (ctx / "data").mkdir(parents=True)
    (ctx / "hello.c").write_text(HELLO_C)
    (ctx / "data" / "keep.txt").write_text("kept\n")
    (ctx / "data" / "remove-me").write_text("removed by a later step\n")
    (ctx / "data" / "overwritten.txt").write_text("from the context\n")
    (ctx / "Containerfile").write_text(E2E_CONTAINERFILE)
    return ctx


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.monotonic()
    out = run(argv, env=env).stdout
    return time.monotonic() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cached-runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tarball = ensure_base_tarball()
    top = Path(tempfile.mkdtemp(prefix="unionfs-build-bench-"))
    ctx = _context(top)
    storage = Storage(name="kernel", program=None, home=top / "podman")
    env = {**os.environ, "UNIONFS_STORE": str(top / "store")}
    figures: dict[str, list[float]] = {"podman_no_cache": [], "unionfs_no_cache": [], "podman_cached": [],
                                       "unionfs_cached": []}
    try:
        storage.import_base(tarball)
        (top / "debian").mkdir()
        run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xf", str(tarball), "-C",
             str(top / "debian")])
        run([UNIONFS, "import-dir", str(top / "debian"), "--image", "e2e-base"], env=env)
        for i in range(args.runs):
            seconds, _ = _timed(["podman", "build", "--no-cache", "-q", "--build-arg", f"BASE={BASE_IMAGE}",
                                 "-t", "localhost/bench", str(ctx)], storage.env)
            figures["podman_no_cache"].append(seconds)
            seconds, _out = _timed([UNIONFS, "build", "--no-cache", "-q", "-t", "bench", str(ctx)], env)
            figures["unionfs_no_cache"].append(seconds)
            mnt = top / "mnt"
            mnt.mkdir(exist_ok=True)
            run([UNIONFS, "mount", "bench", str(mnt), "--ro"], env=env)
            try:
                greeting = run(["chroot", str(mnt), "/usr/local/bin/hello"]).stdout.strip()
            finally:
                run([UNIONFS, "umount", str(mnt)], env=env)
            assert greeting == GREETING, greeting
            print(f"run {i + 1}: podman {figures['podman_no_cache'][-1]:.2f} s, unionfs "
                  f"{figures['unionfs_no_cache'][-1]:.2f} s", file=sys.stderr, flush=True)
        for _ in range(args.cached_runs):
            seconds, _ = _timed(["podman", "build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "-t",
                                 "localhost/bench", str(ctx)], storage.env)
            figures["podman_cached"].append(seconds)
            seconds, _ = _timed([UNIONFS, "build", "-q", "-t", "bench", str(ctx)], env)
            figures["unionfs_cached"].append(seconds)
    finally:
        storage.destroy()
        run(["rm", "-rf", str(top)], check=False)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    med = {k: statistics.median(v) for k, v in figures.items()}
    load = os.getloadavg()[0]
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print("| date (UTC), commit | load | podman --no-cache (kernel overlay) | unionfs build --no-cache | ratio | "
          "podman cached | unionfs cached |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {date}, `{commit}` | {load:.1f} | {med['podman_no_cache']:.2f} s | {med['unionfs_no_cache']:.2f} s | "
          f"{med['unionfs_no_cache'] / med['podman_no_cache']:.2f}× | {med['podman_cached']:.2f} s | "
          f"{med['unionfs_cached']:.2f} s |")
    if args.json:
        args.json.write_text(json.dumps({"date": date, "commit": commit, "host": platform.node(), "load": load,
                                         "runs": figures, "median": med}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Image transfer: ``unionfs pull``/``push`` against skopeo, umoci and podman on the same image, and the
memory of a pull of a 1 GiB layer.

``python -m benchmarks.image_bench [--reps N] [--rootfs-tar FILE] [--dir DIR] [--update benchmarks/RESULTS.md]``

The image: a Debian rootfs tarball (default: the end-to-end base, ``/var/cache/unionfs-e2e/*.tar``, built by
``tests/e2e``), imported into a private podman storage and copied by ``skopeo`` into an OCI layout (gzip
layers, as registries serve them).  Then, interleaved over ``--reps`` rounds (median and spread):

* pull: ``unionfs pull oci:LAYOUT`` into an empty store — ``skopeo copy oci:LAYOUT containers-storage:…``
  into an empty private storage — ``umoci unpack`` of the layout into an empty bundle;
* push: ``unionfs push`` of the pulled image to a new OCI layout (the kept gzip blobs are copied), and of
  the same tree committed with ``import-dir`` into a store of its own (no kept blobs: the layer is exported
  as a canonical tar) with ``--compression gzip`` and ``none`` — ``podman save`` (docker-archive,
  uncompressed) and ``podman save --format oci-dir`` (gzip) of the same image;
* memory: peak RSS of ``unionfs pull`` of a layout holding one 1 GiB file in one layer.

Every command runs as a child process and is timed by wall clock; data is flushed (untimed) before each
measurement.  Results: ``benchmarks/out/images-DATE.json`` and, with ``--update``, the "Images" section of
RESULTS.md (between its markers).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
UNIONFS = str(Path(sys.executable).with_name("unionfs"))
BEGIN, END = "<!-- images:begin -->", "<!-- images:end -->"


def sh(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    sh(argv, env)
    return time.monotonic() - start


def peak_rss(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of ``argv`` run in a fresh child of a fresh interpreter."""
    probe = ("import resource, subprocess, sys, time, json; t=time.monotonic(); "
             "r=subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps([r, time.monotonic()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    out = sh([sys.executable, "-c", probe, *argv], env)
    code, seconds, kib = json.loads(out.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return float(seconds), int(kib)


class Podman:
    def __init__(self, home: Path) -> None:
        self.home = home
        for sub in ("root", "runroot", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{home}/root"\nrunroot = "{home}/runroot"\n')
        (home / "containers.conf").write_text(
            f'[containers]\nnetns = "none"\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
            f'events_logger = "file"\nevents_logfile_path = "{home}/events.log"\ntmp_dir = "{home}/tmp"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(home / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(home / "storage.conf")}

    def reset(self) -> None:
        subprocess.run(["podman", "system", "reset", "--force"], env=self.env, capture_output=True, check=False)
        shutil.rmtree(self.home, ignore_errors=True)


def _spread(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    top = Path(tempfile.mkdtemp(prefix="unionfs-image-bench-", dir=args.dir))
    results: dict[str, list[float]] = {}
    facts: dict[str, Any] = {}
    source = Podman(top / "source")
    try:
        tarball = args.rootfs_tar or sorted(glob.glob("/var/cache/unionfs-e2e/*.tar"))[-1]
        facts["rootfs_tar"] = tarball
        facts["rootfs_bytes"] = os.path.getsize(tarball)
        sh(["podman", "import", "--quiet", tarball, "localhost/bench:1"], source.env)
        layout = top / "layout"
        sh(["skopeo", "copy", "containers-storage:localhost/bench:1", f"oci:{layout}:bench"], source.env)
        facts["layout_bytes"] = sum(p.stat().st_size for p in layout.rglob("*") if p.is_file())
        for rep in range(args.reps):
            store = top / f"store-{rep}"
            order = ["unionfs pull", "skopeo copy", "umoci unpack"]
            order = order[rep % 3:] + order[:rep % 3]
            for system in order:
                if system == "unionfs pull":
                    env = {**os.environ, "UNIONFS_STORE": str(store)}
                    seconds = timed([UNIONFS, "pull", f"oci:{layout}:bench", "--image", "bench"], env)
                elif system == "skopeo copy":
                    dest = Podman(top / f"dest-{rep}")
                    seconds = timed(["skopeo", "copy", "--quiet", f"oci:{layout}:bench",
                                     "containers-storage:localhost/bench:1"], dest.env)
                    dest.reset()
                else:
                    seconds = timed(["umoci", "unpack", "--image", f"{layout}:bench", str(top / f"bundle-{rep}")])
                    shutil.rmtree(top / f"bundle-{rep}")
                results.setdefault(f"pull: {system}", []).append(seconds)
            env = {**os.environ, "UNIONFS_STORE": str(store)}
            if rep == 0:  # a committed copy in a store of its own: no kept blobs, every layer exported
                mnt_src = top / "flat"
                mnt_src.mkdir()
                sh(["tar", "-C", str(mnt_src), "-xf", tarball, "--numeric-owner"])
                sh([UNIONFS, "import-dir", str(mnt_src), "--image", "committed"],
                   {**os.environ, "UNIONFS_STORE": str(top / "commit-store")})
                shutil.rmtree(mnt_src)
                first_store = store
            env = {**os.environ, "UNIONFS_STORE": str(first_store)}
            cenv = {**os.environ, "UNIONFS_STORE": str(top / "commit-store")}
            pushes = [("unionfs push (as pulled)", [UNIONFS, "push", "bench", f"oci:{top}/out-a:{rep}"], env),
                      ("unionfs push (committed, gzip)", [UNIONFS, "push", "committed", f"oci:{top}/out-b:{rep}",
                                                          "--compression", "gzip"], cenv),
                      ("unionfs push (committed, none)", [UNIONFS, "push", "committed", f"oci:{top}/out-c:{rep}",
                                                          "--compression", "none"], cenv),
                      ("podman save (docker-archive)", ["podman", "save", "-o", f"{top}/save-{rep}.tar",
                                                        "localhost/bench:1"], source.env),
                      ("podman save --format oci-dir", ["podman", "save", "--format", "oci-dir", "-o",
                                                        f"{top}/save-{rep}.d", "localhost/bench:1"], source.env)]
            for name, argv, penv in pushes[rep % 5:] + pushes[:rep % 5]:
                results.setdefault(f"push: {name}", []).append(timed(argv, penv))
            for leftover in (f"out-a:{rep}", f"out-b:{rep}", f"out-c:{rep}", f"save-{rep}.tar", f"save-{rep}.d"):
                path = top / leftover.split(":")[0]
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            if store != first_store:
                shutil.rmtree(store)
        # memory: one 1 GiB layer
        big = top / "big"
        (big / "data").mkdir(parents=True)
        block = os.urandom(1 << 20)
        with open(big / "data" / "blob", "wb") as f:
            for i in range(1024):
                f.write(block[i % 7:] + block[:i % 7])
        env = {**os.environ, "UNIONFS_STORE": str(top / "big-store")}
        sh([UNIONFS, "import-dir", str(big), "--image", "big"], env)
        shutil.rmtree(big)
        sh([UNIONFS, "push", "big", f"oci:{top}/big-layout:big", "--compression", "none"], env)
        env = {**os.environ, "UNIONFS_STORE": str(top / "big-store-2")}
        seconds, kib = peak_rss([UNIONFS, "pull", f"oci:{top}/big-layout:big", "--image", "big"], env)
        facts["big_pull"] = {"layer_bytes": 1 << 30, "seconds": seconds, "peak_rss_kib": kib}
    finally:
        source.reset()
        shutil.rmtree(top, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
            "kernel": platform.release(), "commit": commit, "reps": args.reps, "facts": facts,
            "results": {k: _spread(v) for k, v in results.items()}, "samples": results,
            "load": os.getloadavg()}


def table(data: dict[str, Any]) -> str:
    res = data["results"]
    facts = data["facts"]
    pull = res["pull: unionfs pull"]["median"]
    push = res["push: unionfs push (as pulled)"]["median"]
    lines = [f"Run {data['date']}, commit {data['commit']}, {data['reps']} rounds (median, min–max), load "
             f"{data['load'][0]:.1f} at the end; image: `{facts['rootfs_tar']}` "
             f"({facts['rootfs_bytes'] / 2**20:.0f} MiB tar, {facts['layout_bytes'] / 2**20:.0f} MiB as a gzip OCI "
             f"layout). Command: `python -m benchmarks.image_bench --reps {data['reps']} --update "
             "benchmarks/RESULTS.md`.", "",
             "| operation | seconds | min–max | ratio to unionfs |", "| --- | ---: | ---: | ---: |"]
    for key, value in res.items():
        ref = pull if key.startswith("pull") else push
        lines.append(f"| {key} | {value['median']:.2f} | {value['min']:.2f}–{value['max']:.2f} | "
                     f"{value['median'] / ref:.2f} |")
    big = facts["big_pull"]
    rss = big["peak_rss_kib"] / 1024
    lines += ["", f"Peak RSS of `unionfs pull` of one 1 GiB layer (plain tar): **{rss:.0f} MiB** "
              f"(target ≤ 100 MiB), {big['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rootfs-tar", default=None)
    parser.add_argument("--dir", default=None, help="where to work (default: $TMPDIR)")
    parser.add_argument("--update", default=None, metavar="RESULTS.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("image_bench: run as root (podman storage, owners)")
    data = run(args)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / f"images-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(data, indent=1) + "\n")
    text = table(data)
    print(text)
    if args.update:
        path = Path(args.update)
        doc = path.read_text()
        block = f"{BEGIN}\n{text}{END}"
        if BEGIN in doc:
            doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc += f"\n## Images (pull and push)\n\n{block}\n"
        path.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())


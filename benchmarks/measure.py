"""Metrics, the result document (JSON) and what it records about the machine and the code.

Result file layout (``schema`` 1)::

    {"schema": 1, "date": ISO-8601, "host": {...}, "commit": {...}, "options": {...},
     "systems": {NAME: {"available": bool, "version": str, "command": str, "reason": str}},
     "results": {METRIC: {"unit": "s", "better": "lower", "family": ..., "description": ...,
                          "temperature": "cold" | "fresh" | "warm", "params": {...},
                          "series": str | null, "x": number | null,
                          "systems": {NAME: {"runs": [...], "median": number} | {"error": str}}}}}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCHEMA = 1
Better = Literal["lower", "higher"]
Temperature = Literal["cold", "fresh", "warm"]

TEMPERATURES: dict[str, str] = {
    "cold": "caches dropped (sync; echo 3 > /proc/sys/vm/drop_caches) right after a fresh mount",
    "fresh": "fresh mount, layers warm in the host page cache: what the union itself costs",
    "warm": "same mount, repeated after one untimed pass",
}


@dataclass(frozen=True)
class Metric:
    """One reported figure. ``series``/``x`` place it on a curve (layer depth: series per figure, x = layers)."""

    name: str
    unit: str
    better: Better
    family: str
    description: str
    temperature: Temperature
    series: str | None = None
    x: float | None = None


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds that ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Recorder:
    """The result document, saved to ``path`` after every change so an interrupted run keeps its figures."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self.doc.setdefault("results", {})

    @property
    def results(self) -> dict[str, Any]:
        r: dict[str, Any] = self.doc["results"]
        return r

    def _entry(self, metric: Metric, params: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = self.results.setdefault(metric.name, {
            "unit": metric.unit, "better": metric.better, "family": metric.family,
            "description": metric.description, "temperature": metric.temperature,
            "params": params, "series": metric.series, "x": metric.x, "systems": {},
        })
        return entry

    def add(self, metric: Metric, params: dict[str, Any], system: str, value: float) -> None:
        sysres = self._entry(metric, params)["systems"].setdefault(system, {"runs": []})
        sysres.pop("error", None)
        sysres.setdefault("runs", []).append(value)
        sysres["median"] = median(sysres["runs"])

    def error(self, metric: Metric, params: dict[str, Any], system: str, message: str) -> None:
        sysres = self._entry(metric, params)["systems"].setdefault(system, {})
        sysres["error"] = message

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        tmp.replace(self.path)


def host_info(scratch: Path) -> dict[str, Any]:
    """Hostname, kernel, CPU, memory, OS, Python and the scratch filesystem: what makes figures comparable."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    os_name = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    st = os.statvfs(scratch)
    return {
        "free_page_reporting": free_page_reporting(),
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "os": os_name,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "scratch": str(scratch),
        "scratch_free_gib": round(st.f_bavail * st.f_frsize / (1 << 30), 1),
        "loadavg_start": os.getloadavg(),
    }


def free_page_reporting() -> bool:
    """Whether a virtio balloon hands freed guest memory back to the host (VIRTIO_BALLOON_F_REPORTING).

    Then memory freed for a few seconds must be faulted in again by the host on its next use (about 4 s per
    GiB measured here): fresh page cache is slow, which weighs on writes and cold reads.
    """
    base = Path("/sys/bus/virtio/drivers/virtio_balloon")
    try:
        devices = [p for p in base.iterdir() if p.name.startswith("virtio")]
    except OSError:
        return False
    for dev in devices:
        try:
            bits = (dev / "features").read_text().strip()
        except OSError:
            continue
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False


def git_info(repo: Path) -> dict[str, Any]:
    """Commit hash, branch and whether the tree had local changes."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    return {
        "hash": git("rev-parse", "HEAD") or "?",
        "branch": git("rev-parse", "--abbrev-ref", "HEAD") or "?",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")

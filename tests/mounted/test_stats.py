"""``unionfs stats`` reads a running daemon's counters over its control channel; a pause through that
channel holds writers back until it ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.mounts import unionfs_mount

from unionfs.control import ControlClient

pytestmark = pytest.mark.mounted
UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")


@pytest.fixture
def mounted(tmp_path: Path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for i in range(20):
        (lower / f"f{i}").write_text(f"file {i}\n")
    with unionfs_mount([lower], upper, work, mnt):
        yield mnt


def test_stats_counts_the_operations_that_reached_the_daemon(mounted: Path) -> None:
    names = sorted(p.name for p in mounted.iterdir())
    assert len(names) == 20
    for name in names:
        (mounted / name).read_text()
    out = subprocess.run([UNIONFS, "stats", "--json", str(mounted)], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)
    listings = stats["operations"].get("listing") or stats["operations"]["readdir"]  # libfuse 3 | 2
    assert listings["calls"] >= 1
    assert stats["operations"]["open"]["calls"] >= 20
    assert stats["cache"]["dirs"] >= 1
    assert stats["cache"]["hits"] + stats["cache"]["misses"] > 0
    human = subprocess.run([UNIONFS, "stats", str(mounted)], capture_output=True, text=True, check=True).stdout
    assert "hit rate" in human and "open" in human


def test_stats_of_a_directory_that_is_not_mounted_is_an_error(tmp_path: Path) -> None:
    out = subprocess.run([UNIONFS, "stats", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("unionfs: error:") and "no unionfs daemon" in out.stderr
    assert out.stderr.count("\n") == 1


def test_pause_holds_a_writer_until_resume(mounted: Path) -> None:
    finished: list[float] = []

    def writer() -> None:
        (mounted / "new").write_text("written while paused\n")
        finished.append(time.monotonic())

    with ControlClient(str(mounted)) as client:
        assert client.request("pause") == {"ok": True}
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.5)
        assert finished == [], "a write went through a paused mount"
        assert client.request("stats")["paused"] is True
        resumed = time.monotonic()
        assert client.request("resume") == {"ok": True}
        thread.join(10)
    assert finished and finished[0] >= resumed
    assert (mounted / "new").read_text() == "written while paused\n"


@pytest.mark.parametrize(("option", "plus"), [((), True), (("readdirplus=0",), False)])
def test_readdirplus_sends_attributes_with_the_listing_unless_switched_off(
        tmp_path: Path, option: tuple[str, ...], plus: bool) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for i in range(40):
        (lower / f"f{i}").write_text("x")
    with unionfs_mount([lower], upper, work, mnt, option):
        names = os.listdir(mnt)  # names only: no stat of any entry
        assert len(names) == 40
        listed = _getattr_calls(mnt)
        for name in names:
            os.lstat(mnt / name)
        stated = _getattr_calls(mnt)
    if plus:  # the attributes went out with the listing: the lstats needed no lookup
        assert stated == listed
    else:  # nothing but the names went out: each lstat is a lookup
        assert stated - listed >= 40


def _getattr_calls(mnt: Path) -> int:
    """getattr requests so far (a LOOKUP is answered with a getattr)."""
    out = subprocess.run([UNIONFS, "stats", "--json", str(mnt)], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout)["operations"].get("getattr", {}).get("calls", 0))


def test_cache_entries_bounds_the_lookup_cache(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for i in range(3000):
        (lower / f"f{i}").write_text("x")
    with unionfs_mount([lower], upper, work, mnt, ("cache_entries=1000",)):
        for name in os.listdir(mnt):
            os.lstat(mnt / name)
        out = subprocess.run([UNIONFS, "stats", "--json", str(mnt)], capture_output=True, text=True, check=True)
    cache = json.loads(out.stdout)["cache"]
    assert cache["entries"] <= 1000
    assert cache["evictions"] >= 2000

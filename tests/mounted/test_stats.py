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
    ops = stats["operations"]
    # libfuse 3 | the protocol frontend (attributes with the listing) | libfuse 2
    listings = ops.get("listing") or ops.get("readdirplus") or ops["readdir"]
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


@pytest.mark.parametrize("mode", ["default", "1", "auto", "0"])
def test_readdirplus_modes_decide_which_entries_need_a_lookup(tmp_path: Path, mode: str) -> None:
    """A listing of 300 entries takes several replies.  With readdirplus=1 (the default) every reply carries
    the attributes, so lstat of every entry needs no LOOKUP; with ``auto`` the kernel asks for them with the
    first reply only, so entries of later replies need lookups; with ``0`` every entry does."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    count = 300
    for i in range(count):
        (lower / f"file-with-a-longer-name-{i:04d}").write_text("x")
    options = () if mode == "default" else (f"readdirplus={mode}",)
    with unionfs_mount([lower], upper, work, mnt, options):
        names = os.listdir(mnt)  # names only: no stat of any entry
        assert len(names) == count
        listed = _getattr_calls(mnt)
        for name in names:
            os.lstat(mnt / name)
        lookups = _getattr_calls(mnt) - listed
    if mode in ("default", "1"):
        assert lookups == 0
    elif mode == "auto":
        assert 0 < lookups < count
    else:
        assert lookups >= count


def _getattr_calls(mnt: Path) -> int:
    """getattr and lookup requests so far (libfuse answers a LOOKUP with a getattr; the protocol frontend
    counts it as a lookup)."""
    out = subprocess.run([UNIONFS, "stats", "--json", str(mnt)], capture_output=True, text=True, check=True)
    ops = json.loads(out.stdout)["operations"]
    return sum(int(ops.get(name, {}).get("calls", 0)) for name in ("getattr", "lookup"))


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


def test_a_paused_change_waits_aside_and_reads_go_on(tmp_path: Path) -> None:
    """While a pause holds a change back, the daemon goes on answering lookups, opens and reads elsewhere
    (the change waits on a worker, never on the thread that reads the device)."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "sub").mkdir()
    for i in range(20):
        (lower / "sub" / f"f{i}").write_text(f"file {i}\n")
    with unionfs_mount([lower], upper, work, mnt):
        os.stat(mnt / "sub")  # the kernel knows the directory: reading in it needs nothing of the root's lock
        finished: list[bool] = []
        seen: list[str] = []
        with ControlClient(str(mnt)) as client:
            assert client.request("pause") == {"ok": True}
            writer = threading.Thread(target=lambda: finished.append(bool((mnt / "new").write_text("x"))))
            writer.start()
            time.sleep(0.3)
            reader = threading.Thread(target=lambda: seen.extend((mnt / "sub" / f"f{i}").read_text()
                                                                 for i in range(20)))
            reader.start()
            reader.join(10)
            stalled = reader.is_alive()
            assert client.request("resume") == {"ok": True}
            writer.join(10)
            reader.join(10)
        assert not stalled, "reads stalled behind a paused change"
        assert seen == [f"file {i}\n" for i in range(20)] and finished == [True]

"""Runs one workload body on every system, several times, and records the figures.

Runs are interleaved (run 1 on every system, then run 2 …) so that drift in a noisy machine spreads over all
systems instead of favouring one. Every run gets a fresh upper/work directory and a fresh mount; an error on
one system is recorded for that system and the others carry on.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.config import Sizes
from benchmarks.fixtures import Fixtures, warm
from benchmarks.measure import Metric, Recorder
from benchmarks.systems import Mount, Stack, System, drop_caches

Body = Callable[[Mount], dict[str, float]]


@dataclass(frozen=True)
class Plan:
    """How to run a body: which stack, whether it writes, whether to start cold, what to pre-read."""

    stack: Stack
    writable: bool = False
    cold: bool = False
    warm_data: bool = False  # read the layers' file data into the host cache before a fresh run
    runs: int | None = None  # None: the mode's default
    skip: tuple[str, ...] = ()  # systems this body does not apply to


class Runner:
    """What every workload gets: the systems, sizes, fixtures, scratch space and the recorder."""

    def __init__(self, *, systems: Sequence[System], sizes: Sizes, fixtures: Fixtures, scratch: Path,
                 recorder: Recorder, can_drop: bool, recycle: bool = False, verbose: bool = True) -> None:
        self.systems = list(systems)
        self.sizes = sizes
        self.fixtures = fixtures
        self.scratch = scratch
        self.recorder = recorder
        self.can_drop = can_drop
        self.recycle = recycle
        self.verbose = verbose
        self._drops = 0
        self._drop_seconds = 0.0  # sync + drop time, left out of the budget (other tenants' dirty data)
        self._warmed: dict[tuple[Path, bool], int] = {}

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    def drop_caches(self) -> None:
        if self.can_drop:
            start = time.monotonic()
            drop_caches()
            self._drops += 1
            self._drop_seconds += time.monotonic() - start

    def recycle_memory(self, nbytes: int) -> None:
        """With ``--recycle-memory``: write and delete ``nbytes`` of scratch data, untimed.

        On a VM whose balloon reports free pages to the host, fresh page cache costs a host fault per page;
        pages freed a moment ago do not. Calling this right before a timed section that needs ``nbytes`` of
        new page cache makes every system start from the same state instead of from whatever the previous
        run freed. Costs about as much time as writing ``nbytes`` once.
        """
        if not self.recycle or nbytes <= 0:
            return
        path = self.scratch / "recycle.bin"
        block = b"\0" * (1 << 20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = nbytes
            while left > 0:
                left -= os.write(fd, block[: min(left, len(block))])
        finally:
            os.close(fd)
            os.unlink(path)

    def _warm_host(self, plan: Plan) -> None:
        """Make the layers warm in the host cache again if caches were dropped since they last were."""
        for lower in plan.stack.lowers:
            key = (lower, plan.warm_data)
            if self._warmed.get(key) != self._drops:
                warm(lower, read_data=plan.warm_data)
                self._warmed[key] = self._drops

    def measure(self, metrics: Sequence[Metric], plan: Plan, body: Body, *, params: dict[str, Any]) -> None:
        """Run ``body`` ``runs`` times on every system and record each metric it returns.

        ``body`` gets the mount and returns {metric name: value}; it times its own work. It must return every
        metric in ``metrics`` (a metric a system cannot have, like the RSS of native, is simply left out).
        A system that fails is recorded with the error and not run again; one that has used up the time
        budget gets no further runs.
        """
        runs = plan.runs or self.sizes.runs
        by_name = {m.name: m for m in metrics}
        done: set[str] = set()  # failed or out of budget
        spent: dict[str, float] = {}
        systems = [s for s in self.systems if s.name not in plan.skip]
        for run in range(runs):
            # Rotate the order each run: no system always follows the same one (or always goes first).
            shift = run % len(systems) if systems else 0
            for system in systems[shift:] + systems[:shift]:
                if system.name in done:
                    continue
                try:
                    values, used = self._run_once(system, plan, body)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    done.add(system.name)
                    message = f"{type(e).__name__}: {e}"
                    self.log(f"  {system.name}: FAILED {message}")
                    if self.verbose:
                        traceback.print_exc(file=sys.stderr)
                    for metric in metrics:
                        self.recorder.error(metric, params, system.name, message)
                    self.recorder.save()
                    continue
                for name, value in values.items():
                    self.recorder.add(by_name[name], params, system.name, value)
                shown = ", ".join(f"{k}={_fmt(v)}{by_name[k].unit}" for k, v in values.items())
                self.log(f"  run {run + 1}/{runs} {system.name}: {shown}")
                self.recorder.save()
                spent[system.name] = spent.get(system.name, 0.0) + used
                if spent[system.name] >= self.sizes.budget_s and run + 1 < runs:
                    done.add(system.name)
                    self.log(f"  {system.name}: {spent[system.name]:.0f} s spent, no more runs (budget)")
        for metric in metrics:
            entry = self.recorder.results.get(metric.name)
            if entry is not None:
                entry["runs_planned"] = runs
        self.recorder.save()

    def _run_once(self, system: System, plan: Plan, body: Body) -> tuple[dict[str, float], float]:
        """One run: prepare caches, mount fresh, run the body, unmount, clean up.

        Returns the body's values and the seconds that count against the budget (mount + workload +
        unmount, without cache drops, whose sync waits for other processes' dirty data).
        """
        run_dir = self.scratch / "runs" / system.slug
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            if plan.cold:
                self.drop_caches()  # before the mount too, so that a cold mount time is cold
            else:
                self._warm_host(plan)
            t0, drops0 = time.monotonic(), self._drop_seconds
            with system.mount(plan.stack, run_dir, writable=plan.writable) as m:
                if plan.cold:
                    self.drop_caches()
                values = body(m)
            used = time.monotonic() - t0 - (self._drop_seconds - drops0)
        finally:
            _remove_run_dir(run_dir)
        return values, used


def _remove_run_dir(run_dir: Path) -> None:
    """Delete a finished run's upper/work/copies, but never through a mount that failed to go away."""
    mnt = run_dir / "mnt"
    if mnt.exists() and os.path.ismount(mnt):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _fmt(v: float) -> str:
    return f"{v:.4g}"

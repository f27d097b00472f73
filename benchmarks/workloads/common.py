"""Small helpers shared by the workload families."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

_ENV = {**os.environ, "LC_ALL": "C"}


def run_timed(argv: Sequence[str]) -> float:
    """Run a command with its output discarded; seconds it took. A non-zero exit raises."""
    start = time.perf_counter()
    subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env=_ENV, check=True)
    return time.perf_counter() - start


def stat_all(paths: Sequence[str]) -> float:
    """``os.stat`` every path; seconds it took."""
    st = os.stat
    start = time.perf_counter()
    for p in paths:
        st(p)
    return time.perf_counter() - start


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds

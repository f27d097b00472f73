"""Shared pytest setup: import path for ``support``, hypothesis profiles, and a mount safety net."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, settings

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.mounts import unmount_leftovers  # noqa: E402  (needs the path above)

# dev: random, more examples (make fuzz); ci: derandomized and bounded (make test, and the default).
settings.register_profile("dev", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=100, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (``timeout``, ``kill``) interrupts like Ctrl-C, so every mount context still unmounts."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


@pytest.fixture(autouse=True, scope="session")
def _no_mounts_left_behind() -> Iterator[None]:
    """Whatever a test leaves mounted (a bug in the test) is unmounted at the end of the session."""
    yield
    left = unmount_leftovers()
    if left:
        warnings.warn(f"tests left mounts behind, unmounted now: {left}", stacklevel=1)

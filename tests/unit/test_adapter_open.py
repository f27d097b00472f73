"""The FUSE adapter without a mount: an open waits for the kernel invalidations earlier requests queued."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from unitkit import Env

from mountd import service
from mountd.highlevel.operations import UnionOperations


def test_an_open_waits_for_queued_invalidations(mkenv: Callable[..., Env]) -> None:
    """A write through one name of a hard link queues an invalidation of the other names; an open that comes
    after it must not be answered before the kernel got it (else it reads the size and data it cached)."""
    env = mkenv([{"f": "data\n"}])
    ops = UnionOperations(env.open())
    sent: list[tuple[str, float]] = []
    release = threading.Event()

    def slow_invalidate(path: str) -> None:
        release.wait(5)
        sent.append((path, time.monotonic()))

    ops._start_invalidator(slow_invalidate)
    try:
        ops.fs.invalidate("f")
        threading.Timer(0.2, release.set).start()
        fh = ops.open("/f", os.O_RDONLY)
        opened = time.monotonic()
        ops.release("/f", fh)
        assert sent and sent[0][0] == "/f" and sent[0][1] <= opened
    finally:
        ops.destroy("/")


def test_the_wait_is_bounded(mkenv: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalidation that cannot be sent (the kernel waits on something) delays an open, never blocks it."""
    env = mkenv([{"f": "data\n"}])
    ops = UnionOperations(env.open())
    stuck = threading.Event()
    ops._start_invalidator(lambda path: stuck.wait(10))
    monkeypatch.setattr(service, "INVALIDATION_WAIT", 0.3)
    try:
        ops.fs.invalidate("f")
        start = time.monotonic()
        ops.release("/f", ops.open("/f", os.O_RDONLY))
        assert 0.25 <= time.monotonic() - start < 5
    finally:
        stuck.set()
        ops.destroy("/")

"""The protocol frontend's dispatcher answers a change only after the kernel cache invalidations it queued
were sent, a failing change too: a change may copy a directory up before it fails, and the caller's next
stat may be answered from the kernel's attribute cache alone (a merged directory's st_nlink is 1)."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.layers import Dir, File
from unitkit import Env

from mountd.lowlevel import abi
from mountd.lowlevel.dispatch import Dispatcher, Settings
from mountd.lowlevel.session import Request
from mountd.service import MountService
from unionfs.fs.union import UnionFS

SLOW_SEND = 0.2
"""How long the fake kernel takes to take one invalidation: an answer sent without waiting for it
arrives first."""


class Recorder:
    """A stand-in for the session: records answers and sent invalidations, in order; runs deferred work
    at once on a thread of its own (as a worker would)."""

    def __init__(self) -> None:
        self.fd = -1
        self.events: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.deferred: list[threading.Thread] = []

    def note(self, kind: str, value: Any) -> None:
        with self.lock:
            self.events.append((kind, value))

    def reply_error(self, unique: int, code: int) -> None:
        self.note("error", errno.errorcode[code])

    def reply_one(self, unique: int, body: bytes | memoryview) -> None:
        self.note("reply", len(body))

    def reply(self, unique: int, *parts: bytes) -> None:
        self.note("reply", sum(len(p) for p in parts))

    def defer(self, work: Callable[[], None]) -> None:
        thread = threading.Thread(target=work)
        self.deferred.append(thread)
        thread.start()

    def invalidate(self, path: str) -> None:
        time.sleep(SLOW_SEND)
        self.note("invalidated", path)

    def finish(self) -> list[tuple[str, Any]]:
        for thread in self.deferred:
            thread.join(10)
        return list(self.events)


@pytest.fixture
def wired(mkenv: Callable[..., Env]) -> Iterator[tuple[UnionFS, Dispatcher, Recorder, int]]:
    """A union whose dir ``a`` is merged from two lowers and holds file ``x``; the dispatcher knows the
    node of ``a/x``; the invalidations go to the recorder (its thread stopped after the test)."""
    env = mkenv([{"a": Dir({"x": File(b"x\n")})}, {"a": Dir({"y": File(b"y\n")})}])
    fs = env.open()
    service = MountService(fs, frontend="lowlevel")
    session = Recorder()
    service.start_invalidator(session.invalidate)
    dispatcher = Dispatcher(fs, service, session, Settings())  # type: ignore[arg-type]
    a = dispatcher.nodes.remember(abi.ROOT_ID, "a")
    x = dispatcher.nodes.remember(a, "x")
    try:
        yield fs, dispatcher, session, x
    finally:
        service.close()


def _setxattr(nodeid: int, name: bytes, value: bytes, flags: int) -> Request:
    body = abi.SETXATTR_IN.pack(len(value), flags) + name + b"\0" + value
    return Request(abi.SETXATTR, 7, nodeid, 0, 0, 0, body)


@pytest.mark.parametrize("on_reader", [False, True], ids=["worker", "reader"])
def test_a_failing_change_is_answered_after_its_invalidations(
        wired: tuple[UnionFS, Dispatcher, Recorder, int], on_reader: bool) -> None:
    fs, dispatcher, session, x = wired
    assert fs.getattr("a").st_nlink == 1  # merged from two lowers
    request = _setxattr(x, b"user.missing", b"1", os.XATTR_REPLACE)
    if on_reader:
        assert dispatcher.try_now(request)  # a quick change: answered by the reader, its answer deferred
    else:
        dispatcher.handle(request)
    events = session.finish()
    assert fs.resolver.require("a/x").in_upper  # copied up before the host said ENODATA, as the kernel does
    assert ("error", "ENODATA") in events
    answer = events.index(("error", "ENODATA"))
    assert ("invalidated", "a/x") in events[:answer]


def test_a_successful_change_is_answered_after_its_invalidations(
        wired: tuple[UnionFS, Dispatcher, Recorder, int]) -> None:
    fs, dispatcher, session, x = wired
    dispatcher.handle(_setxattr(x, b"user.new", b"1", 0))
    events = session.finish()
    assert events[-1] == ("reply", 0)
    assert ("invalidated", "a/x") in events[:-1]
    assert fs.getxattr("a/x", "user.new") == b"1"


def test_a_node_given_up_for_a_fresh_one_answers_estale(
        wired: tuple[UnionFS, Dispatcher, Recorder, int]) -> None:
    """The GETATTR of a node given up for a fresh one (a passthrough copy-up) is ESTALE, which makes the
    kernel look the name up again: an open(2) whose permission check asked for the old node's attributes
    then opens the fresh node instead of failing with ENOENT; the name's fresh node answers as usual."""
    _, dispatcher, session, x = wired
    dispatcher.nodes.give_up(x)
    dispatcher.handle(Request(abi.GETATTR, 9, x, 0, 0, 0, b""))
    a = dispatcher.nodes.find_path("a")
    assert a is not None
    fresh = dispatcher.nodes.remember(a, "x")
    dispatcher.handle(Request(abi.GETATTR, 10, fresh, 0, 0, 0, b""))
    dispatcher.nodes.detach(a, "x")  # the name goes: its node has no object (none was pinned)
    dispatcher.handle(Request(abi.GETATTR, 11, fresh, 0, 0, 0, b""))
    events = session.finish()
    assert events[0] == ("error", "ESTALE")
    assert events[1][0] == "reply"
    assert events[2] == ("error", "ENOENT")

"""The session on a ``/dev/fuse`` descriptor: the reader loop, the worker pool, replies and notifications.

One reader thread reads every request.  Quick requests (lookups, attributes, xattrs, listings, forgets)
are answered by the reader itself, and so are reads of data the host's page cache holds; requests that may
block on the disk or on a copy-up (opens, other reads, writes, every change) go to a small pool of
workers.  So a slow request never sits in a queue in front of a quick one: quick ones are never queued.

After each request the reader keeps reading the (non-blocking) device for a short while before it sleeps
in ``poll``: on a 2-vCPU machine most of a request's wall time is otherwise the daemon's wake-up.  The
window adapts (it grows while the spin finds the next request, shrinks while it does not) and is only ever
spent right after a request, so an idle mount burns no CPU.  ``spin="auto"`` spins only while a CPU is
free for it: with as many tasks running as there are CPUs (two mounts walked at once on two CPUs, a
loaded machine) a spin would only take the CPU from the client it waits for.  The run queue is read from
``/proc/loadavg`` at most every :data:`LOAD_CHECK_NS`.

Replies go back on the descriptor that delivered the request (there is only one).  INTERRUPT answers a
request still waiting for a worker with EINTR; a running one completes.  Notifications (``notify_*``) are
written from the caller's thread, which must not be the reader (an entry invalidation takes the parent's
inode lock, which a request in flight may hold).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mountd import logs
from mountd.lowlevel import abi

log = logs.log

SPIN_MIN_NS = 20_000
SPIN_MAX_NS = 400_000
SPIN_START_NS = 200_000
LOAD_CHECK_NS = 20_000_000
WORKERS = 4


_OUT_SIZE = abi.OUT_HEADER.size
_pack_out = abi.OUT_HEADER.pack
_unpack_in = abi.IN_HEADER.unpack_from
_IN_SIZE = abi.IN_HEADER.size


def _write_failed(exc: OSError) -> None:
    # ENOENT: the request was interrupted and is gone; ENODEV: the connection is over.
    if exc.errno not in (errno.ENOENT, errno.ENODEV):
        log.warning("writing a reply failed: %s", exc)


class Request:
    """One request: the header fields and the body (a copy, valid as long as the request object)."""

    __slots__ = ("body", "gid", "interrupted", "nodeid", "opcode", "pid", "uid", "unique")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int,
                 body: bytes) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.body = body
        self.interrupted = False


class Dispatcher(Protocol):
    """What the session calls: ``handle(request)`` answers (through ``session.reply``) or raises OSError;
    ``is_quick(request)`` says whether the reader may answer it itself; ``try_now(request)`` answers one
    that is not quick by nature on the reader where that cannot block (True), or leaves it (False)."""

    def handle(self, request: Request) -> None: ...

    def is_quick(self, request: Request) -> bool: ...

    def try_now(self, request: Request) -> bool: ...


class Session:
    """Serve ``fd`` (mounted, INIT maybe already answered) until the kernel ends the connection."""

    def __init__(self, fd: int, *, buffer_size: int, workers: int = WORKERS, spin: str = "auto") -> None:
        self.fd = fd
        self.buffer = bytearray(max(buffer_size, abi.MIN_READ_BUFFER))
        self.workers = workers
        self.spin = spin
        """"on", "off" or "auto" (see the module's docstring)."""
        self.cpus = len(os.sched_getaffinity(0))
        self._loadavg: int | None = None
        if spin == "auto" and self.cpus > 1:
            with contextlib.suppress(OSError):
                self._loadavg = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        self._spin_ok = spin == "on" or self._loadavg is not None
        self._load_checked = 0
        self.dispatcher: Dispatcher | None = None
        self._queue: queue.SimpleQueue[Request | Callable[[], None] | None] = queue.SimpleQueue()
        self._waiting: dict[int, Request] = {}
        """Requests queued for a worker and not started yet, by unique (INTERRUPT can still cancel them)."""
        self._waiting_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poller.register(self._wake_r, select.POLLIN)
        self.stopping = False
        self.spin_window_ns = SPIN_START_NS
        self.counters = {"requests": 0, "spin_hits": 0, "spin_misses": 0, "spin_skipped": 0, "sleeps": 0,
                         "to_workers": 0, "answered_now": 0, "interrupted": 0}

    # -- replies ------------------------------------------------------------------------------------------
    def reply(self, unique: int, *parts: bytes) -> None:
        """Answer request ``unique`` with ``parts`` as its body."""
        if len(parts) == 1:
            self.reply_one(unique, parts[0])
            return
        size = _OUT_SIZE + sum(len(p) for p in parts)
        self._write([_pack_out(size, 0, unique), *parts])

    def reply_one(self, unique: int, body: bytes | memoryview) -> None:
        """Answer request ``unique`` with ``body`` (one buffer: a small reply is copied once behind its
        header, a large one written from where it is)."""
        if len(body) <= 4096:
            self._write1(_pack_out(_OUT_SIZE + len(body), 0, unique) + body)
        else:
            self._write([_pack_out(_OUT_SIZE + len(body), 0, unique), body])

    def reply_error(self, unique: int, code: int) -> None:
        self._write1(_pack_out(_OUT_SIZE, -code, unique))

    def defer(self, work: Callable[[], None]) -> None:
        """Have a worker run ``work`` (from the reader: what it must not wait for itself)."""
        self._queue.put(work)

    def notify(self, code: int, *parts: bytes) -> None:
        """Send notification ``code`` (never from the reader thread).  Raises OSError (ENOENT: the kernel
        has nothing of that to drop)."""
        size = abi.OUT_HEADER.size + sum(len(p) for p in parts)
        os.writev(self.fd, [abi.OUT_HEADER.pack(size, code, 0), *parts])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            _write_failed(exc)

    def _write1(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError as exc:
            _write_failed(exc)

    # -- the loop -----------------------------------------------------------------------------------------
    def read_one(self, *, block: bool) -> Request | None:
        """The next request; None when none is there (``block`` False) .  Raises OSError(ENODEV) at the
        end of the connection."""
        view = memoryview(self.buffer)
        while True:
            try:
                size = os.readv(self.fd, [view])
            except BlockingIOError:
                if not block or self.stopping:
                    return None
                self._poller.poll()
                if self.stopping:
                    return None
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                raise
            if size < _IN_SIZE:
                raise OSError(errno.EIO, f"short request ({size} bytes)")
            _, opcode, unique, nodeid, uid, gid, pid, _, _ = _unpack_in(view, 0)
            return Request(opcode, unique, nodeid, uid, gid, pid, bytes(view[_IN_SIZE:size]))

    @property
    def wake_fd(self) -> int:
        """The write end of the pipe that wakes the reader from ``poll`` (non-blocking)."""
        return self._wake_w

    def stop(self) -> None:
        """End :meth:`run` soon (safe from a signal handler): the loop leaves at its next wake-up."""
        self.stopping = True
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._loadavg is not None:
            os.close(self._loadavg)
            self._loadavg = None

    def _cpu_free(self, now: int) -> bool:
        """``spin="auto"``: is a CPU free for a spin?  True while fewer tasks run than there are CPUs plus
        one (the client this reader answers runs too); read at most every :data:`LOAD_CHECK_NS`."""
        if now - self._load_checked < LOAD_CHECK_NS or self._loadavg is None:
            return self._spin_ok
        self._load_checked = now
        try:
            # "0.52 0.58 0.59 2/345 12345": the fourth field counts the tasks running now, this one included
            running = int(os.pread(self._loadavg, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            running = self.cpus + 1
        self._spin_ok = running <= self.cpus
        return self._spin_ok

    def run(self) -> None:
        """Read and answer requests until the connection ends (unmount, abort) or :meth:`stop`."""
        assert self.dispatcher is not None
        os.set_blocking(self.fd, False)
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"unionfs-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self._loop()
        finally:
            for _ in self._threads:
                self._queue.put(None)
            for thread in self._threads:
                thread.join(timeout=30)

    def _loop(self) -> None:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        counters = self.counters
        clock = time.perf_counter_ns
        spin = self.spin != "off"
        auto = self.spin == "auto"
        while True:
            request = None
            if spin and auto and not self._cpu_free(clock()):
                counters["spin_skipped"] += 1
            elif spin:
                deadline = clock() + self.spin_window_ns
                while True:
                    try:
                        request = self.read_one(block=False)
                    except OSError as exc:
                        if exc.errno == errno.ENODEV:
                            return
                        raise
                    if request is not None or clock() > deadline:
                        break
                if request is not None:
                    counters["spin_hits"] += 1
                    self.spin_window_ns = min(SPIN_MAX_NS, self.spin_window_ns * 2)
                else:
                    counters["spin_misses"] += 1
                    self.spin_window_ns = max(SPIN_MIN_NS, self.spin_window_ns // 2)
            if request is None:
                if self.stopping:
                    return
                counters["sleeps"] += 1
                self._poller.poll()  # sleep first: a read now would most often fail (EAGAIN) and cost more
                if self.stopping:
                    return
                try:
                    request = self.read_one(block=True)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:
                        return
                    raise
                if request is None:
                    return  # stopped
            assert request is not None
            counters["requests"] += 1
            if request.opcode == abi.INTERRUPT:
                self._interrupt(request)
            elif dispatcher.is_quick(request):
                dispatcher.handle(request)
            elif dispatcher.try_now(request):
                counters["answered_now"] += 1
            else:
                counters["to_workers"] += 1
                with self._waiting_lock:
                    self._waiting[request.unique] = request
                self._queue.put(request)

    def _interrupt(self, request: Request) -> None:
        (target,) = abi.INTERRUPT_IN.unpack_from(request.body, 0)
        with self._waiting_lock:
            waiting = self._waiting.get(target)
            if waiting is not None:
                waiting.interrupted = True

    def _work(self) -> None:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        while (request := self._queue.get()) is not None:
            if not isinstance(request, Request):
                request()  # work the reader left (see defer)
                continue
            with self._waiting_lock:
                self._waiting.pop(request.unique, None)
            if request.interrupted:
                self.counters["interrupted"] += 1
                self.reply_error(request.unique, errno.EINTR)
                continue
            dispatcher.handle(request)

    def serve_init(self, handle_init: Callable[[Request], None]) -> None:
        """Read requests (blocking) until INIT arrives and answer it (SYNC_INIT: during ``mount(2)``)."""
        while True:
            request = self.read_one(block=True)
            assert request is not None
            if request.opcode == abi.INIT:
                handle_init(request)
                return
            self.reply_error(request.unique, errno.EIO)

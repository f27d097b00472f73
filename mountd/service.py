"""What every frontend of a mount shares: the table of open file handles, the per-operation counters, the
queue of kernel cache invalidations and the control socket's handlers.

A frontend (``mountd.lowlevel`` on ``/dev/fuse``, ``mountd.highlevel`` on libfuse) translates requests and
replies; the state that outlives one request lives here, so that ``unionfs stats`` and ``unionfs commit``
see the same thing whichever frontend serves the mount.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from unionfs.control import ControlServer
from unionfs.fs.union import Handle, UnionFS

PAUSE_TIMEOUT = 30.0
"""How long a pause waits for the writes in flight before it gives up (the mount is never left paused)."""
INVALIDATION_WAIT = 1.0
"""How long an open waits for the kernel invalidations earlier requests queued (see :meth:`wait_invalidations`)."""


class MountService:
    """The shared state of one mount of ``fs``.  ``mountpoint`` None: no control socket (unit tests)."""

    def __init__(self, fs: UnionFS, *, mountpoint: str | None = None, frontend: str = "fusepy") -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self.frontend = frontend
        self.handles: dict[int, Handle] = {}
        self.op_stats: dict[str, list[int]] = {}
        """Per operation: [calls, total ns, errors]; read by ``unionfs stats``."""
        self.extra_stats: dict[str, Callable[[], Any]] = {}
        """More sections of ``unionfs stats`` a frontend adds (name -> a function giving the value)."""
        self.control: ControlServer | None = None
        if mountpoint is not None:
            self.control = ControlServer(mountpoint, {"stats": self._stats, "info": self._info},
                                         pause=lambda: fs.pause(PAUSE_TIMEOUT), resume=fs.resume)
        self._invalidations: queue.SimpleQueue[Any] | None = None
        self._stop_invalidator: object = None
        self._unsent = 0
        """Invalidations queued and not yet sent to the kernel (under :attr:`_sent`)."""
        self._sent = threading.Condition()

    # -- counters ---------------------------------------------------------------------------------------
    def count(self, name: str, ns: int, failed: int) -> None:
        """Add one call of operation ``name`` that took ``ns`` nanoseconds (``failed``: 1 if it failed)."""
        counts = self.op_stats.get(name)
        if counts is None:
            counts = self.op_stats[name] = [0, 0, 0]
        counts[0] += 1
        counts[1] += ns
        counts[2] += failed

    # -- handles ----------------------------------------------------------------------------------------
    def handle(self, fh: int) -> Handle:
        """The open file ``fh``; EBADF if there is none."""
        handle = self.handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return handle

    def track(self, handle: Handle) -> int:
        """Register an open file; returns its handle number (its descriptor)."""
        self.handles[handle.fd] = handle
        return handle.fd

    def release(self, fh: int) -> Handle | None:
        """Close the open file ``fh`` (nothing if unknown); returns the handle it was."""
        handle = self.handles.pop(fh, None)
        if handle is not None:
            self.fs.release(handle)
        return handle

    # -- invalidations ----------------------------------------------------------------------------------
    def start_invalidator(self, invalidate: Callable[[Any], None],
                          resolve: Callable[[str], Any] | None = None) -> None:
        """Send the core's kernel cache invalidations (other names of a hard-linked file, a copied-up object,
        a directory whose listing changed) through ``invalidate(key)`` from a thread of their own, after the
        request that caused them: sent from inside it, one could wait on a lock held by a request that waits
        for the daemon.

        ``key`` is the union path, or what ``resolve(union path)`` made of it when the core told it (None:
        nothing to invalidate): a frontend whose names move (a rename's node moves after the core renamed)
        resolves the name the kernel knows at that moment, not whatever holds it once the thread runs."""
        pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stop = object()
        self._stop_invalidator = stop

        def run() -> None:
            while (rel := pending.get()) is not stop:
                try:
                    invalidate(rel)
                except Exception:  # a failed invalidation leaves a cache to expire: never the thread's end
                    pass
                finally:
                    with self._sent:
                        self._unsent -= 1
                        self._sent.notify_all()

        def post(rel: str) -> None:
            key = rel if resolve is None else resolve(rel)
            if key is None:
                return
            with self._sent:
                self._unsent += 1
            pending.put(key)

        threading.Thread(target=run, name="unionfs-invalidate", daemon=True).start()
        self._invalidations = pending
        self.fs.invalidate = post

    @property
    def invalidations_pending(self) -> bool:
        """Are invalidations queued and not yet sent?"""
        return self._unsent > 0

    def wait_invalidations(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``, default :data:`INVALIDATION_WAIT`) until every queued invalidation was
        sent: an open after a write through another name of a hard link then reads the new data."""
        if self._unsent:
            with self._sent:
                self._sent.wait_for(lambda: self._unsent == 0,
                                    timeout=INVALIDATION_WAIT if timeout is None else timeout)

    # -- life -------------------------------------------------------------------------------------------
    def start_control(self) -> None:
        """Listen on the control socket (a failure is logged by the caller: the mount works without it)."""
        if self.control is not None:
            try:
                self.control.start()
            except OSError:
                self.control = None
                raise

    def close(self) -> None:
        """Stop the helpers and close every open file (the mount is over)."""
        if self.control is not None:
            self.control.stop()
        if self._invalidations is not None:
            self._invalidations.put(self._stop_invalidator)
            self._invalidations = None
        for handle in list(self.handles.values()):
            self.fs.release(handle)
        self.handles.clear()

    # -- control handlers -------------------------------------------------------------------------------
    def _stats(self, request: dict[str, Any]) -> dict[str, Any]:
        ops = {name: {"calls": c, "errors": e, "total_ms": round(ns / 1e6, 3),
                      "avg_us": round(ns / c / 1e3, 2) if c else 0.0}
               for name, (c, ns, e) in sorted(self.op_stats.items())}
        out = {"cache": self.fs.cache.snapshot(), "operations": ops, "open_files": len(self.handles),
               "paused": self.fs.gate.paused, "frontend": self.frontend}
        for name, get in self.extra_stats.items():
            out[name] = get()
        return out

    def _info(self, request: dict[str, Any]) -> dict[str, Any]:
        stack = self.fs.stack
        return {"pid": os.getpid(), "mountpoint": self.mountpoint,
                "lowers": [layer.path for layer in stack.lowers],
                "upper": stack.upper.path if stack.upper else None,
                "work": stack.work.path if stack.work else None,
                "whiteout": self.fs.upper.writer.format.value if self.fs.upper else None,
                "volatile": self.fs.volatile, "frontend": self.frontend}

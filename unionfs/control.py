"""The control channel of a running mount: a unix socket per mountpoint, JSON lines both ways.

Requests are ``{"cmd": NAME, ...}``; answers ``{"ok": true, ...}`` or ``{"ok": false, "error": MSG}``.
Commands: ``stats`` (cache counters, per-operation counts and latency), ``info`` (layers, options),
``pause`` (hold every change to the upper back; it lasts until ``resume`` on the same connection or until
that connection closes, so a crashed client never leaves a mount frozen).

The socket lives in a root-only runtime dir (``/run/unionfs`` as root, ``$XDG_RUNTIME_DIR/unionfs`` or
``/tmp/unionfs-UID`` otherwise), named after a hash of the mountpoint's real path; mode 0600.  It is the one
socket of a daemon: :func:`daemon_pid` answers "which process serves this mountpoint" from it too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import xxhash

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/unionfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "unionfs") if base else f"/tmp/unionfs-{os.geteuid()}"


def socket_path(mountpoint: str) -> str:
    """Where the daemon of ``mountpoint`` listens."""
    real = os.path.realpath(mountpoint)
    return os.path.join(runtime_dir(), xxhash.xxh3_64_hexdigest(real.encode()) + ".sock")


class ControlServer:
    """Serves the control socket of one mount from a daemon thread per connection.

    ``handlers`` answer the simple commands; ``pause``/``resume`` are called for the pause protocol.
    """

    def __init__(self, mountpoint: str, handlers: dict[str, Handler], *,
                 pause: Callable[[], bool], resume: Callable[[], None]) -> None:
        """Create before the mount exists: resolving the mountpoint from inside the daemon once it is mounted
        would wait on the daemon itself."""
        self.path = socket_path(mountpoint)
        self.handlers = handlers
        self._pause = pause
        self._resume = resume
        self._sock: socket.socket | None = None

    def start(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(8)
        self._sock = sock
        threading.Thread(target=self._accept, name="unionfs-control", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        import json  # on the first request, not on a mount's way to ready

        paused = False
        try:
            with conn, conn.makefile("rwb") as stream:
                for line in stream:
                    try:
                        request = json.loads(line)
                        cmd = request.get("cmd")
                        if cmd == "pause":
                            paused = paused or self._pause()
                            answer: dict[str, Any] = {"ok": paused}
                            if not paused:
                                answer["error"] = "writers did not finish in time"
                        elif cmd == "resume":
                            if paused:
                                self._resume()
                                paused = False
                            answer = {"ok": True}
                        elif cmd in self.handlers:
                            answer = {"ok": True, **self.handlers[cmd](request)}
                        else:
                            answer = {"ok": False, "error": f"unknown command {cmd!r}"}
                    except Exception as exc:  # a bad request must never take the daemon down
                        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    stream.write(json.dumps(answer).encode() + b"\n")
                    stream.flush()
        except OSError:
            pass
        finally:
            if paused:
                self._resume()


def daemon_pid(mountpoint: str, *, timeout: float = 5.0) -> int | None:
    """The pid of the daemon whose control socket serves ``mountpoint`` (the ``SO_PEERCRED`` of a connection
    to it: the process that listens), or None when no daemon of ours listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path(mountpoint))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid, _, _ = struct.unpack("3i", creds)
    return pid if pid > 0 else None


class ControlClient:
    """Talks to the daemon of a mountpoint.  Raises ``OSError`` (ENOENT/ECONNREFUSED) if none listens."""

    def __init__(self, mountpoint: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path(mountpoint))
        self.stream = self.sock.makefile("rwb")

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        import json

        self.stream.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.stream.flush()
        line = self.stream.readline()
        if not line:
            raise ConnectionError("the daemon closed the control connection")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        self.stream.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The control channel and the write gate: stats answer, a pause holds writers back until resume or until
the pausing client goes away."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from unionfs import control
from unionfs.control import ControlClient, ControlServer
from unionfs.fs.gate import WriteGate


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(control, "runtime_dir", lambda: str(tmp_path / "run"))
    gate = WriteGate()
    srv = ControlServer(str(tmp_path / "mnt"), {"stats": lambda req: {"answer": 42, "echo": req.get("x")}},
                        pause=lambda: gate.pause(2.0), resume=gate.resume)
    srv.start()
    yield srv, gate, str(tmp_path / "mnt")
    srv.stop()


def test_stats_request_is_answered(server) -> None:
    _, _, mnt = server
    with ControlClient(mnt) as client:
        assert client.request("stats", x=7) == {"ok": True, "answer": 42, "echo": 7}
        assert client.request("nope") == {"ok": False, "error": "unknown command 'nope'"}


def test_socket_is_private(server) -> None:
    srv, _, _ = server
    assert (Path(srv.path).stat().st_mode & 0o777) == 0o600


def _writer(gate: WriteGate, done: list[float]) -> None:
    with gate.writing():
        done.append(time.monotonic())


def test_pause_holds_writers_until_resume(server) -> None:
    _, gate, mnt = server
    done: list[float] = []
    with ControlClient(mnt) as client:
        assert client.request("pause") == {"ok": True}
        t = threading.Thread(target=_writer, args=(gate, done))
        t.start()
        time.sleep(0.2)
        assert done == [], "a writer passed a paused gate"
        resumed = time.monotonic()
        assert client.request("resume") == {"ok": True}
        t.join(5)
    assert done and done[0] >= resumed


def test_pause_ends_when_the_client_disconnects(server) -> None:
    _, gate, mnt = server
    client = ControlClient(mnt)
    assert client.request("pause")["ok"]
    assert gate.paused
    client.close()
    deadline = time.monotonic() + 5
    while gate.paused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not gate.paused


def test_pause_waits_for_writers_in_flight() -> None:
    gate = WriteGate()
    entered = threading.Event()
    release = threading.Event()

    def slow_writer() -> None:
        with gate.writing():
            entered.set()
            release.wait(5)

    t = threading.Thread(target=slow_writer)
    t.start()
    entered.wait(5)
    assert gate.pause(timeout=0.1) is False, "pause must not succeed while a writer is inside"
    assert not gate.paused
    release.set()
    t.join(5)
    assert gate.pause(timeout=1.0) is True
    gate.resume()


def test_no_daemon_is_a_clear_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "runtime_dir", lambda: str(tmp_path / "run"))
    with pytest.raises(OSError):
        ControlClient(str(tmp_path / "nothing-mounted"))


def test_daemon_pid_is_the_process_listening_on_the_control_socket(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``daemon_pid`` reads the listener's pid from the control socket (SO_PEERCRED); None where none listens."""
    monkeypatch.setattr(control, "runtime_dir", lambda: str(tmp_path / "run"))
    mnt = str(tmp_path / "mnt")
    assert control.daemon_pid(mnt) is None
    server = control.ControlServer(mnt, {}, pause=lambda: True, resume=lambda: None)
    server.start()
    try:
        assert control.daemon_pid(mnt) == os.getpid()
    finally:
        server.stop()
    assert control.daemon_pid(mnt) is None


def test_entering_the_gate_never_waits_and_a_holder_passes_a_pending_pause() -> None:
    gate = WriteGate()
    with gate.entered() as inside:
        assert inside
        paused: list[bool] = []
        pauser = threading.Thread(target=lambda: paused.append(gate.pause(5.0)))
        pauser.start()
        deadline = time.monotonic() + 5
        while not gate.paused and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.paused and not paused  # the pause waits for this holder
        with gate.writing():  # the holder passes again at once instead of waiting for the pause
            pass
    pauser.join(5)
    assert paused == [True]
    with gate.entered() as inside:
        assert not inside  # paused: refused at once
    gate.resume()
    with gate.entered() as inside:
        assert inside

"""The binding's callback wrapper: results and errnos are answered directly, anything else is handled by the
binding's own rules (logged, EINVAL), and every callback keeps its thread's Python state."""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

import pytest

from mountd import binding
from mountd.binding import UnionFUSE


def _fuse() -> Any:
    return object.__new__(UnionFUSE)  # the wrapper needs no mount


def test_a_result_is_returned_and_none_is_zero() -> None:
    fuse = _fuse()
    assert fuse._wrapper(lambda a, b: a + b, 2, 3) == 5
    assert fuse._wrapper(lambda: None) == 0


def test_an_oserror_becomes_its_negative_errno() -> None:
    def fails(path: str) -> int:
        raise OSError(errno.ENODATA, "no data", path)

    assert _fuse()._wrapper(fails, "/x") == -errno.ENODATA


@pytest.mark.skipif(binding.BINDING_NAME != "mfusepy", reason="mfusepy's rule for unexpected exceptions")
def test_other_failures_go_to_the_binding_which_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int:
        raise ValueError("a bug")

    def bad_errno() -> int:
        raise OSError(-5, "negative")

    with caplog.at_level(logging.ERROR):
        assert _fuse()._wrapper(broken) == -errno.EINVAL
        assert _fuse()._wrapper(bad_errno) == -errno.EINVAL
    assert "broken" in caplog.text and "a bug" in caplog.text
    assert "bad_errno" in caplog.text


def test_a_callback_thread_keeps_its_thread_state() -> None:
    seen: list[bool] = []

    def run() -> None:
        seen.append(getattr(binding._adopted, "done", False))
        _fuse()._wrapper(lambda: 0)
        seen.append(getattr(binding._adopted, "done", False))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [False, True]

"""Fixtures for the core's unit tests (no FUSE): layer trees in tmp dirs and unions over them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from unitkit import Env, make_env


@pytest.fixture
def mkenv(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    """``mkenv(lowers, upper=None, fmt="kernel", readonly=False)`` builds the dirs of one union; every union
    opened through the returned :class:`Env` is closed after the test."""
    made: list[Env] = []
    counter = iter(range(1_000_000))

    def factory(lowers: Any, upper: Any = None, **kwargs: Any) -> Env:
        env = make_env(tmp_path / f"u{next(counter)}", lowers, upper, **kwargs)
        made.append(env)
        return env

    yield factory
    for env in made:
        env.close_all()

"""Reliability suite: ``stress`` tests run only when asked for (``pytest -m stress``, ``make test-stress``).

``make test`` runs ``pytest tests``: without this hook the long variants would run in CI too.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "stress" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long variant: run with -m stress (make test-stress)")
    for item in items:
        if item.get_closest_marker("stress") is not None:
            item.add_marker(skip)

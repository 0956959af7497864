"""The nemesis's tests come first in collection (tests/nemesis/ sorts before tests/test_*),
so xdist's worksteal starts the long short form at once instead of last."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nemesis: the fault suite's short form (about 60 s of faults on 5 hosts)"
    )

"""eda-sub --everywhere's bus finder (core/bus/finder.py, moved out of cli/): looks in
the background, hands over what it found once, backs off while nothing answers."""

from __future__ import annotations

import pytest

from eda.core.bus import finder
from eda.core.bus.finder import BusFinder
from eda.core.bus.link import NoBus
from tests.helpers import wait_until

BUS = "tcp://127.0.0.1:7799"


def test_what_is_found_is_handed_over_once_and_the_wait_doubles_meanwhile() -> None:
    looks: list[int] = []

    def find() -> str:
        looks.append(1)
        if len(looks) == 1:
            raise NoBus("no bus found")
        return BUS

    bus = BusFinder(find)

    def idle() -> bool:
        return bus._thread is not None and not bus._thread.is_alive()

    with pytest.raises(NoBus):  # never found yet: a subscriber has nowhere to go
        bus.relocate()
    wait_until(idle, 5, "the first look")
    assert bus._wait == 2 * finder.LOOK_FIRST  # nothing answered: the next look waits longer
    assert bus.found() is None  # (not due yet: no look started)
    assert len(looks) == 1
    bus._due = 0.0  # the next look is due now
    seen: list[str | None] = []
    wait_until(lambda: seen.append(bus.found()) or BUS in seen, 5, "the bus")
    wait_until(idle, 5, "the second look")
    assert seen.count(BUS) == 1 and bus.found() is None  # handed over once
    assert bus.relocate() == BUS  # where it was found last
    bus.stop()

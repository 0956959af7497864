"""Issue 15's JetStream defect: a failover must not outlast the publisher's patience.

How long confirmations stop is a benchmark row (bench/bench_bus_failover.py);
what a test can hold is that the defaults leave room for the longest election.
"""

from __future__ import annotations

import inspect

from eda.cli.pub import command
from eda.core.bus.nats.engine import LEADERLESS_AT_MOST, SERVE_DEADLINE
from eda.core.bus.publisher import BusPublisher


def test_the_default_confirmation_timeout_outlasts_a_jetstream_election() -> None:
    option = next(p for p in command.params if p.name == "confirm_timeout")
    default = inspect.signature(BusPublisher).parameters["timeout"].default
    assert option.default == default  # eda-pub says what the library does
    # (the default was 10 s: a failover that lost nothing ended eda-pub with exit 4)
    assert default >= 2 * (LEADERLESS_AT_MOST + SERVE_DEADLINE) > 20

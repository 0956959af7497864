"""A front of a shared NATS stream takes in the other fronts' writes (``refresh``).

The defect behind the multihost failover failure: a refresh cut off by its
deadline after reading the new heads but before reading the bucket (a
JetStream cluster electing a leader answers slowly) left the engine believing
it was up to date while its ``durable_seq`` still had the old value, so the
front never delivered the other front's later events.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eda.core.bus import StoreError
from tests import bus_engines
from tests.bus_engines import Opener
from tests.test_bus_store import batch, events

server, nats_opener = bus_engines.server, bus_engines.nats_opener  # fixtures


def test_a_refresh_cut_off_by_its_deadline_is_finished_by_the_next_one(
    nats_opener: Opener,
) -> None:
    with nats_opener() as writer, nats_opener() as other:
        assert other.refresh() == 0
        writer.append([batch(1, 4)])
        assert writer.commit() == 4

        real = other._kv_get
        stalled = []

        async def stall_once(key: str) -> Any:
            if not stalled:  # the bucket's leader is being elected: no answer this time
                stalled.append(key)
                await asyncio.Event().wait()  # until the refresh's deadline cancels it
            return await real(key)

        other._kv_get = stall_once
        with pytest.raises(StoreError, match="no answer in time"):
            other.refresh()
        assert stalled
        assert other.refresh() == 4  # the next refresh finishes what the cut one began
        assert [q for q, _ in events(other)] == [1, 2, 3, 4]
        writer.append([batch(5, 2)])
        writer.commit()
        assert other.refresh() == 6

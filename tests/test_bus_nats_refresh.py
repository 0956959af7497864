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


def stall_bucket_once(engine: Any) -> list[str]:
    """The next read of *engine*'s bucket gets no answer (its leader is being elected)
    until the caller's deadline cancels it; the keys that stalled."""
    real = engine._kv_get
    stalled: list[str] = []

    async def stall_once(key: str) -> Any:
        if not stalled:
            stalled.append(key)
            await asyncio.Event().wait()  # until the deadline cancels it
        return await real(key)

    engine._kv_get = stall_once
    return stalled


def test_a_refresh_cut_off_by_its_deadline_is_finished_by_the_next_one(
    nats_opener: Opener,
) -> None:
    with nats_opener() as writer, nats_opener() as other:
        assert other.refresh() == 0
        writer.append([batch(1, 4)])
        assert writer.commit() == 4

        stalled = stall_bucket_once(other)
        with pytest.raises(StoreError, match="no answer in time"):
            other.refresh()
        assert stalled
        assert other.refresh() == 4  # the next refresh finishes what the cut one began
        assert [q for q, _ in events(other)] == [1, 2, 3, 4]
        writer.append([batch(5, 2)])
        writer.commit()
        assert other.refresh() == 6


def test_a_resync_cut_off_by_its_deadline_still_lets_a_refresh_take_in_the_stream(
    nats_opener: Opener,
) -> None:
    """A front whose commit failed (another front wrote first) reads the stream back; cut
    off after reading the heads, it must still deliver them once the cluster answers."""
    with nats_opener() as writer, nats_opener() as other:
        writer.append([batch(1, 4)])
        assert writer.commit() == 4
        other.append([batch(1, 2, pubid="p2")])  # other does not know of 1..4 yet
        stalled = stall_bucket_once(other)
        with pytest.raises(StoreError, match="another writer appended"):
            other.commit()
        assert stalled
        assert other.refresh() == 4
        assert [q for q, _ in events(other)] == [1, 2, 3, 4]
        (r,) = other.append([batch(1, 2, pubid="p2")])  # resent by its publisher
        assert r.stored == ((1, 5, 2),) and other.commit() == 6

"""A group member's acknowledgement settles exactly what it wrote out, nothing else.

Events released by a member that left (or was dropped as silent) are handed to
another member after newer ones it already holds, so a member receives bus
sequences out of order.  An acknowledgement "everything up to *seq*" then also
settled events the member had been handed but had not written yet; if it was
then killed, frozen until dropped, or its connection dropped mid-delivery,
nobody ever wrote them, yet the group counted them done (the nemesis short
form, seed 21: bus seq 166-186 "reached no member of the group").

Deterministic: the bus runs in-process on a fake socket (``tests.test_bus_confirm``),
and eda-sub's bus source (:class:`eda.cli.subloop.Bus`) on the real client, wired to
it frame by frame, renders and acknowledges exactly as ``eda-sub --bus --group`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eda.cli.common import Context
from eda.cli.subloop import Bus as BusSource
from eda.core.bus import SQLiteEngine, protocol
from eda.core.bus.client import BusSubscriber, Delivery
from tests import bus_engines
from tests.bus_engines import Opener
from tests.test_bus_confirm import HUGE, Bus, answers, confirmed
from tests.test_bus_store import batch

PUB = b"\x00pub"
# the engines as fixtures: a test that takes ``opener`` runs on both
server, nats_opener, opener = bus_engines.server, bus_engines.nats_opener, bus_engines.opener


class Wire:
    """A client's DEALER, wired to the in-process bus: what the client sends lands in the
    bus's inbox as coming from *ident*; :meth:`take` moves what the bus sent it to the
    client's receive queue."""

    def __init__(self, bus: Bus, ident: bytes) -> None:
        self.bus, self.ident = bus, ident
        self.queue: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.bus.sock.inbox.append([self.ident, *frames])

    def poll(self, timeout: int = 0, flags: int = 0) -> int:
        return int(bool(self.queue))

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        return self.queue.pop(0)

    def setsockopt(self, option: int, value: Any) -> None:
        pass

    def close(self, linger: int | None = None) -> None:
        pass

    def take(self, sent: list[list[bytes]]) -> None:
        self.queue += [m[1:] for m in sent if m[0] == self.ident]


class Member:
    """``eda-sub --bus --group g`` on the in-process bus: its source, what it wrote out."""

    def __init__(self, bus: Bus, ident: bytes, pending: int, member: str | None = None) -> None:
        self.wire = Wire(bus, b"\x00" + ident)
        self.written: list[int] = []
        self.name = ""

        def connect(endpoint: str) -> BusSubscriber:
            sub = BusSubscriber(endpoint, ["t.>"], group="g", max_pending=pending, start="start")
            sub.sock.close(linger=0)
            sub.sock = self.wire  # type: ignore[assignment]
            sub.member = self.name = member or sub.member
            return sub

        def render(items: list[Delivery]) -> None:
            self.written += [d.busseq + i for d in items for i in range(d.batch.size)]

        self.source = BusSource(connect, "tcp://127.0.0.1:9", render, Context("t", False))

    def serve(self, sent: list[list[bytes]]) -> None:
        """What the bus sent arrives; everything received is written out, then acknowledged
        (eda-sub's loop: receive, render, written)."""
        self.wire.take(sent)
        items, _ = self.source.receive()
        if items:
            self.source.render(items)
            self.source.written(items)

    def leave(self) -> None:
        """It goes away without reading what is queued for it (killed; as the bus would
        drop it after GONE_AFTER s of silence, at once here)."""
        self.source.close()


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    served = Bus(SQLiteEngine(tmp_path / "bus.db"))
    try:
        yield served
    finally:
        served.close()


def publish(bus: Bus, first: int, n: int) -> None:
    for seq in range(first, first + n):
        bus.publish(PUB, seq, "p1", seq, 1)  # one event per batch: bus seq == seq


def held(bus: Bus) -> dict[str, list[tuple[int, int]]]:
    return bus.engine.held("g")


def test_a_ranged_group_ack_settles_exactly_those_events(opener: Opener) -> None:
    with opener() as s:
        s.append([batch(i, 1, "jobs.a") for i in range(1, 7)])
        s.commit()
        got = s.claim("w", "a", ["jobs.>"], 6, start=1)
        assert [r.seq + i for r in got for i in range(r.size)] == [1, 2, 3, 4, 5, 6]
        assert s.group_ack("w", "a", 5, 4) == 2
        assert s.held("w") == {"a": [(1, 3), (6, 6)]}
        assert s.group_ack("w", "a", 9, 7) == 0  # nothing it holds
        assert s.group_ack("w", "a", 3, 1) == 3
        assert s.held("w") == {"a": [(6, 6)]}
        assert s.release("w", "a") == 1
        assert [r.seq for r in s.claim("w", "b", ["jobs.>"], 6)] == [6]


def test_a_ranged_group_ack_leaves_no_lease_without_an_event_of_the_group(
    tmp_path: Path,
) -> None:
    """Embedded engine: a lease spans other topics' events; what is left of it once the
    group's events in it are acknowledged, range by range, is nothing."""
    with SQLiteEngine(tmp_path / "bus.db") as s:
        s.append([batch(1, 2, "jobs.a"), batch(1, 2, "other"), batch(3, 2, "jobs.a")])
        s.commit()  # jobs.a 1-2, other 3-4, jobs.a 5-6
        assert [r.seq for r in s.claim("w", "a", ["jobs.>"], 10, start=1)] == [1, 5]
        assert s.group_ack("w", "a", 2, 1) == 2
        assert s.held("w") == {"a": [(3, 6)]}
        assert s.group_ack("w", "a", 6, 5) == 2
        assert s.held("w") == {}


def test_a_members_ack_does_not_settle_released_events_it_was_handed_but_did_not_write(
    bus: Bus,
) -> None:
    publish(bus, 1, 3)
    bus.round()
    a = Member(bus, b"a", pending=3)
    a.wire.take(bus.round())  # a subscribes from the start: 1-3, held (its max_pending)
    b = Member(bus, b"b", pending=100)
    bus.round()
    publish(bus, 4, 3)
    b.wire.take(bus.round())  # a holds its max: b is handed 4-6
    a.leave()  # a goes away holding 1-3: released, handed to b, after 4-6
    bus.round()  # (1-3 on their way to b)
    b.serve([])  # b writes 4-6 and acknowledges them
    bus.round()
    assert b.written == [4, 5, 6]
    b.leave()  # killed before it read 1-3
    bus.round()
    # nobody wrote 1-3: not settled, handed to the next member
    assert held(bus) == {"": [(1, 3)]}
    c = Member(bus, b"c", pending=100)
    c.serve(bus.round())
    assert c.written == [1, 2, 3]
    bus.round()
    assert held(bus) == {}  # once written, settled


def test_a_member_writing_released_events_after_newer_ones_settles_both(bus: Bus) -> None:
    """Out of order the other way: the released events written after the newer ones (one
    receive), the acknowledgement settles both, so the member's room (max_pending) is
    given back and nothing is handed out again."""
    publish(bus, 1, 3)
    bus.round()
    a = Member(bus, b"a", pending=3)
    a.wire.take(bus.round())
    b = Member(bus, b"b", pending=6)
    bus.round()
    publish(bus, 4, 3)
    b.wire.take(bus.round())  # 4-6 to b
    a.leave()
    b.serve(bus.round())  # 1-3 arrive too: b writes 4-6 and 1-3 in one go
    bus.round()
    assert b.written == [4, 5, 6, 1, 2, 3]
    assert held(bus) == {}
    publish(bus, 7, 6)  # its room is back: it is given up to its max_pending again
    b.serve(bus.round())
    assert b.written[6:] == [7, 8, 9, 10, 11, 12]


def test_a_member_subscribing_again_on_a_new_connection_replaces_its_old_subscription(
    bus: Bus,
) -> None:
    """The same member (by name) subscribing from a new connection (its old one dropped by
    ZeroMQ heartbeats, or the bus found elsewhere) while the bus still keeps the old
    subscription: the old one ends at once and its events go out again.  Else the old
    one, dropped as silent seconds later, released what the new one held, which the new
    one then acknowledged in vain: its max_pending stayed full and it stalled."""
    publish(bus, 1, 4)
    bus.round()
    old = Member(bus, b"old", pending=2)
    old.wire.take(bus.round())  # 1-2
    new = Member(bus, b"new", pending=2, member=old.name)
    new.wire.take(bus.round())  # handed events while it has not acknowledged any yet
    if b"\x00old" in bus.server.subs:  # the old one is dropped as silent (GONE_AFTER)
        bus.server.subs[b"\x00old"].seen -= 2 * protocol.GONE_AFTER
        bus.server._check_gone()
    publish(bus, 5, 4)
    for _ in range(6):
        new.serve(bus.round())
    assert sorted(new.written) == list(range(1, 9))
    bus.round()
    assert held(bus) == {}


@pytest.mark.parametrize("ranges", [
    [],
    [[3, 1]],
    [[1]],
    [[1, HUGE]],
    [["1", 2]],
    [[True, 2]],
    "1-2",
    [[1, 1]] * (protocol.MAX_ACK_RANGES + 1),
])  # fmt: skip
def test_a_malformed_acknowledgement_is_refused_and_settles_nothing(
    bus: Bus, ranges: Any
) -> None:
    publish(bus, 1, 3)
    bus.round()
    bad = b"\x00bad"
    bus.request(bad, {"op": "sub", "patterns": ["t.>"], "group": "g", "member": "m",
                      "from": "start", "credit": 100})  # fmt: skip
    bus.round()
    bus.request(bad, {"op": "ack", "seq": 3, "ranges": ranges})
    publish(bus, 4, 1)
    malformed = bus.server.malformed
    sent = bus.round()
    assert confirmed(sent, PUB) == {4}  # the round goes on
    (reply,) = answers(sent, bad)
    assert not reply["ok"] and "range" in reply["error"]
    assert bus.server.failures == 0 and bus.server.malformed == malformed + 1
    assert held(bus) == {"m": [(1, 3), (4, 4)]}  # nothing settled


def test_what_a_members_old_connection_was_handed_is_not_settled_by_its_new_ones_acks(
    bus: Bus,
) -> None:
    """The nemesis's case (both members cut off, one frozen, ZeroMQ heartbeats dropping
    their connections): a member's old subscription is handed events that never reach it
    (its connection is gone); the member subscribes again from a new connection, writes
    newer events and acknowledges them.  "Everything up to the last one written" settled
    the ones its old connection was handed too, under the same member name: about
    max_pending events acknowledged that nobody wrote (4 runs in 8 before the fix)."""
    publish(bus, 1, 3)
    bus.round()
    old = Member(bus, b"old", pending=3)
    bus.round()  # 1-3 handed to its old connection (its max_pending), which never reads them
    new = Member(bus, b"new", pending=3, member=old.name)
    new.serve(bus.round())
    publish(bus, 4, 3)
    new.serve(bus.round())  # it writes what it is handed, and acknowledges
    bus.round()
    if b"\x00old" in bus.server.subs:  # the old one is dropped as silent (GONE_AFTER)
        bus.server.subs[b"\x00old"].seen -= 2 * protocol.GONE_AFTER
        bus.server._check_gone()
    for _ in range(3):
        new.serve(bus.round())
    assert sorted(set(new.written)) == [1, 2, 3, 4, 5, 6]
    bus.round()
    assert held(bus) == {}

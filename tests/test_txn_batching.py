"""eda-txn group commit, counted: fsyncs per batch of transactions and messages per batch.

Each test drives the daemons' loop turns by hand (a handler, then the turn's
timers) on a clock the test moves, so what it counts does not depend on the
machine's speed: a property of the batching, never a time bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from eda.core import daemon as daemon_module
from eda.core.txn.actions import Result
from eda.core.txn.coordinator import Coordinator
from eda.core.txn.directory import Directory
from eda.core.txn.participant import Participant
from eda.core.txn.protocol import ACK_LINGER, PHASE_TWO_RETRY
from tests.helpers import wait_until

PREPARE = {"op": "prepare", "data": {}, "coordinator": "c1", "reply_to": "tcp://127.0.0.1:9"}


class Recorded:
    """Actions that succeed and are counted."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def run(self, call: Any) -> Result:
        self.calls.append((call.phase, call.txn))
        return Result(True)

    def run_many(self, calls: list[Any]) -> list[Result]:
        return [self.run(c) for c in calls]

    def close(self) -> None:
        pass


class Clock:
    """The daemons' monotonic clock, moved by the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(daemon_module, "time", SimpleNamespace(monotonic=lambda: self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Asker:
    """A coordinator's DEALER talking to a participant; one loop turn per :meth:`turn`."""

    def __init__(self, part: Participant) -> None:
        self.part = part
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(part.endpoint)

    def turn(self, *msgs: dict[str, Any]) -> list[dict[str, Any]]:
        """Send *msgs* as one message, let the participant drain it and run its due
        timers; the replies it sent."""
        self.sock.send_multipart([json.dumps(m).encode() for m in msgs])
        wait_until(lambda: self.part.service.sock.poll(0), 5)
        self.part.service.drain()
        self.part._run_timers()
        return self.replies()

    def timers(self) -> list[dict[str, Any]]:
        """A turn of the participant's loop with nothing to read: its timers only."""
        self.part._run_timers()
        return self.replies()

    def replies(self) -> list[dict[str, Any]]:
        out = []
        while self.sock.poll(100):
            out += [json.loads(f) for f in self.sock.recv_multipart()]
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def asker(tmp_path: Path) -> Iterator[Asker]:
    part = Participant("stock", Recorded(), tmp_path, bind="tcp://127.0.0.1:*")
    asker = Asker(part)
    try:
        yield asker
    finally:
        asker.close()
        part.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def test_acks_wait_for_the_next_fsync_whatever_makes_it_up_to_half_the_first_retry(
    clock: Clock, asker: Asker
) -> None:
    """Decides that come a few milliseconds apart (the coordinator's group commits)
    are acknowledged with the next fsync the participant makes anyway (here the next
    prepare's), not with one fsync each: 5 decides, 5 ms apart, then a prepare: two
    fsyncs (its "preparing" mark and its vote), not seven.  An ack still waits no
    longer than ACK_LINGER, below the coordinator's first phase-two retry."""
    part = asker.part
    txns = [f"c1.00a{i}" for i in range(6)]
    votes = asker.turn(*[{**PREPARE, "txn": t, "rid": i} for i, t in enumerate(txns)])
    assert [r["vote"] for r in votes] == ["yes"] * 6
    fsyncs = part.journal.fsyncs
    for i, txn in enumerate(txns[:5]):
        assert asker.turn({"op": "decide", "txn": txn, "outcome": "commit", "rid": 10 + i}) == []
        clock.advance(ACK_LINGER / 10)
        assert asker.timers() == []  # still waiting for a fsync to share
    assert part.journal.fsyncs == fsyncs  # no ack made the disk spin on its own
    got = asker.turn({**PREPARE, "txn": "c1.00b0", "rid": 20})
    assert sorted(r["rid"] for r in got) == [10, 11, 12, 13, 14, 20]
    assert all(r["done"] is True for r in got if r["rid"] < 20)
    assert part.journal.fsyncs == fsyncs + 2  # the prepare's mark (with the acks), its vote
    # nothing else comes: the last ack goes alone, durable first, before the coordinator
    # would send its decision again
    assert ACK_LINGER < PHASE_TWO_RETRY
    assert asker.turn({"op": "decide", "txn": txns[5], "outcome": "commit", "rid": 30}) == []
    clock.advance(ACK_LINGER)
    assert [r["rid"] for r in asker.timers()] == [30]
    assert part.journal.fsyncs == fsyncs + 3
    assert [r.get("state") for r in part.finished.values()][-6:] == ["committed"] * 6


def test_batches_of_decides_alone_make_no_fsync_the_next_prepare_covers_their_acks(
    clock: Clock, asker: Asker
) -> None:
    """The coordinator sends each group commit's decides together: a batch of decides
    runs its commit actions without syncing first (nothing needs to be durable before
    a commit action), so three such batches then a prepare cost two fsyncs (its mark,
    with every ack, and its vote), not one more per batch of decides."""
    part = asker.part
    txns = [f"c1.00b{i}" for i in range(6)]
    asker.turn(*[{**PREPARE, "txn": t, "rid": i} for i, t in enumerate(txns)])
    fsyncs = part.journal.fsyncs
    for k in range(3):
        decides = [{"op": "decide", "txn": t, "outcome": "commit", "rid": 10 + 2 * k + i}
                   for i, t in enumerate(txns[2 * k : 2 * k + 2])]  # fmt: skip
        assert asker.turn(*decides) == []  # the acks wait
    assert part.journal.fsyncs == fsyncs
    got = asker.turn({**PREPARE, "txn": "c1.00c0", "rid": 20})
    assert sorted(r["rid"] for r in got) == [10, 11, 12, 13, 14, 15, 20]
    assert part.journal.fsyncs == fsyncs + 2
    assert isinstance(part.actions, Recorded)
    assert [("commit", t) for t in txns] == [c for c in part.actions.calls if c[0] == "commit"]


def test_votes_carried_to_the_next_batch_go_with_it_even_when_it_holds_only_acks(
    clock: Clock, tmp_path: Path
) -> None:
    """Votes wait for the next batch only when it is already there, and go out with it
    at the latest: a next batch holding only a decide (a lazy ack) sends them at its
    end, with no time passing, instead of leaving them for a timer."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    decide = {"op": "decide", "txn": "c1.00e0", "outcome": "commit", "rid": 9}

    class Arriving(Recorded):
        def run_many(self, calls: list[Any]) -> list[Result]:
            if calls[0].txn == "c1.00f0":  # the first batch runs: the decide arrives
                sock.send(json.dumps(decide).encode())
                wait_until(lambda: part.service.sock.poll(0), 5)
            return super().run_many(calls)

    part = Participant("stock", Arriving(), tmp_path, bind="tcp://127.0.0.1:*")
    asker = Asker(part)
    asker.sock.close()
    asker.sock = sock
    sock.connect(part.endpoint)
    try:
        assert asker.turn({**PREPARE, "txn": "c1.00e0", "rid": 1})[0]["vote"] == "yes"
        fsyncs = part.journal.fsyncs
        sock.send_multipart([json.dumps({**PREPARE, "txn": f"c1.00f{i}", "rid": 10 + i}).encode()
                             for i in range(2)])  # fmt: skip
        wait_until(lambda: part.service.sock.poll(0), 5)
        part.service.drain()  # the prepares: their votes wait for the decide's batch
        assert asker.replies() == []
        part.service.drain()  # the decide: the votes go now, its ack with them
        got = asker.replies()
        assert sorted(r["rid"] for r in got) == [9, 10, 11]
        assert part.journal.fsyncs == fsyncs + 2  # the prepares' marks; votes and ack
    finally:
        asker.close()
        part.close()


def test_prepares_of_a_turn_go_out_before_its_decisions_fsync(
    clock: Clock, tmp_path: Path
) -> None:
    """The coordinator's decision fsync blocks its loop: the prepares queued in the
    same turn (new commits) are sent before it, so the participants work on them
    while the coordinator's disk syncs.  Counted: the requests still queued for the
    participants when the fsync starts -- none."""
    ctx = zmq.Context.instance()
    routers = {n: ctx.socket(zmq.ROUTER) for n in ("a", "b")}
    endpoints = {}
    for name, sock in routers.items():
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    coord = Coordinator("c1", tmp_path, directory=Directory(endpoints))
    queued_at_fsync: list[int] = []
    sync = coord.journal.sync

    def counted_sync() -> None:
        queued_at_fsync.append(sum(len(p.outbox) for p in coord.peers.by_endpoint.values()))
        sync()

    results: list[dict[str, Any]] = []
    try:
        first = coord.begin(["a", "b"], "{}", 60, results.append)
        coord._run_timers()  # the end of the turn: the prepares go
        for sock in routers.values():  # each participant votes yes
            wait_until(lambda sock=sock: sock.poll(0), 5)
            route, frame = sock.recv_multipart()
            msg = json.loads(frame)
            assert msg["txn"] == first.id
            sock.send_multipart([route, json.dumps({"rid": msg["rid"], "ok": True,
                                                    "vote": "yes"}).encode()])  # fmt: skip
        for peer in coord.peers.by_endpoint.values():  # one turn: the votes are read...
            wait_until(lambda peer=peer: peer.sock.poll(0), 5)
            peer._drain()
        second = coord.begin(["a", "b"], "{}", 60, results.append)  # ...and a new commit
        coord.journal.sync = counted_sync  # type: ignore[method-assign]
        coord._run_timers()  # the end of that turn
        assert [r["outcome"] for r in results] == ["committed"]
        assert queued_at_fsync == [0]  # the second transaction's prepares went first
        for sock in routers.values():
            wait_until(lambda sock=sock: sock.poll(0), 5)
            got = [json.loads(f) for f in sock.recv_multipart()[1:]]
            assert [m["op"] for m in got] == ["prepare"] and got[0]["txn"] == second.id
    finally:
        coord.close()
        for sock in routers.values():
            sock.close()

"""A confirmation never lies: eda-bus confirms a batch only after the commit that
covers it, whatever else shares the serving round (subscriptions, acks, hostile
requests, failing commits), and a big batch costs a consumer group linear work.

The server runs in-process on a fake socket: each test decides exactly which
messages make up a round, then runs the round (``BusServer.drain``)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eda.core import codec
from eda.core.bus import SQLiteEngine, protocol
from eda.core.bus.engine import Record
from eda.core.bus.server import BusServer, Settings
from tests.helpers import Procs, command, run
from tests.test_bus import replay, stored_stats


class FakeSocket:
    """Stands for the ROUTER socket: the test fills ``inbox``, the server's sends land in
    ``outbox``.  Anything else goes to the real socket (closed with the server)."""

    def __init__(self, real: zmq.Socket[bytes]) -> None:
        self.real = real
        self.inbox: list[list[bytes]] = []
        self.outbox: list[list[bytes]] = []

        self._rest: list[bytes] = []  # frames of the message being read frame by frame

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)

    def recv(self, flags: int = 0, copy: bool = True) -> Any:
        """Frame by frame, as the server reads (a frame without copy: no properties)."""
        if not self._rest:
            self._rest = list(self.recv_multipart(flags))
        frame = self._rest.pop(0)
        return frame if copy else zmq.Frame(frame)

    def getsockopt(self, option: int) -> Any:
        if option == zmq.RCVMORE:
            return int(bool(self._rest))
        return self.real.getsockopt(option)

    def send_multipart(self, frames: list[bytes], flags: int = 0, **kw: Any) -> None:
        self.outbox.append(list(frames))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Failing(SQLiteEngine):
    """An engine whose writes fail on demand as a full disk does: the open transaction is
    rolled back (for real) and StoreFullError raised.  ``fail_in = n``: the n-th write
    call from now (append, commit, or a consumer/group write) fails."""

    fail_in = 0
    commits_failed = 0

    def _countdown(self) -> None:
        if self.fail_in > 0:
            self.fail_in -= 1
            if self.fail_in == 0:
                self.commits_failed += 1
                raise self._failed(sqlite3.OperationalError("database or disk is full"))

    def append(self, batches: Any) -> Any:
        self._countdown()
        return super().append(batches)

    def commit(self) -> int:
        if self._conn.in_transaction:
            self._countdown()
        return super().commit()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        self._countdown()
        super()._write(sql, args)


class Bus:
    """A BusServer on a :class:`FakeSocket`, served one round at a time."""

    def __init__(self, engine: SQLiteEngine) -> None:
        self.engine = engine
        self.server = BusServer(engine, Settings(bind="tcp://127.0.0.1:0", mdns=False))
        self.sock = FakeSocket(self.server.sock)
        self.server.sock = self.sock  # type: ignore[assignment]

    def publish(self, ident: bytes, tag: int, pubid: str, seq: int, size: int) -> None:
        body = b"\n".join(b"%s-%d" % (pubid.encode(), seq + i) for i in range(size))
        header = codec.encode_header(
            codec.TEXT, size, seq, 1000.0, codec.encode_origin(_long(pubid), "eda://t")
        )
        self.sock.inbox.append(
            [ident, protocol.PUBLISH, protocol.TAG.pack(tag), b"t.a", header, body]
        )

    def request(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.sock.inbox.append([ident, protocol.REQUEST, json.dumps(msg).encode()])

    def round(self) -> list[list[bytes]]:
        """Serve what is in the inbox as one round (as the daemon's loop does); what it sent."""
        self.sock.outbox.clear()
        self.server.guarded("clients", self.server.drain)
        return list(self.sock.outbox)

    def close(self) -> None:
        self.server.sock = self.sock.real
        self.server.close()


def confirmed(sent: list[list[bytes]], ident: bytes) -> set[int]:
    return {
        t for m in sent if m[0] == ident and m[1] == protocol.CONFIRM
        for t in protocol.unpack_tags(m[2])
    }  # fmt: skip


def refused(sent: list[list[bytes]], ident: bytes) -> dict[int, dict[str, Any]]:
    return {
        protocol.TAG.unpack(m[2])[0]: json.loads(m[3])
        for m in sent
        if m[0] == ident and m[1] == protocol.REFUSED
    }


def answers(sent: list[list[bytes]], ident: bytes) -> list[dict[str, Any]]:
    return [json.loads(m[2]) for m in sent if m[0] == ident and m[1] == protocol.ANSWER]


def _long(pubid: str) -> str:
    """A short test name as a publisher id of 128 bits, as the bus requires."""
    return pubid.rjust(32, "0")


def stored(engine: SQLiteEngine) -> list[bytes]:
    return [p for r in engine.read(1) for p in r.payloads()]


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    b = Bus(Failing(tmp_path / "bus.db"))
    yield b
    b.close()


PUB, SUB = b"\x00pub", b"\x00sub"


# -- 1. every commit in a round may roll back the batches appended before it ----------


@pytest.mark.parametrize("request_", [
    {"op": "sub", "patterns": ["t.>"]},
    {"op": "sub", "patterns": ["t.>"], "durable": "d1"},
    {"op": "sub", "patterns": ["t.>"], "group": "g1"},
    {"op": "retain", "max_age": 1e9},
])  # fmt: skip
def test_a_failed_commit_of_a_request_refuses_the_batches_it_rolled_back(
    bus: Bus, request_: dict[str, Any]
) -> None:
    bus.publish(PUB, 1, "p1", 1, 10)
    bus.publish(PUB, 2, "p1", 11, 10)
    bus.request(SUB, request_)
    # two appends, then the request's commit (a durable consumer writes its row first)
    bus.engine.fail_in = 4 if "durable" in request_ else 3  # type: ignore[attr-defined]
    sent = bus.round()
    assert bus.engine.commits_failed == 1  # type: ignore[attr-defined]
    assert confirmed(sent, PUB) == set()
    assert {t: r["retry"] for t, r in refused(sent, PUB).items()} == {1: True, 2: True}
    assert answers(sent, SUB)[0]["ok"] is False
    assert stored(bus.engine) == []
    # the publisher sends them again: stored once, confirmed
    bus.publish(PUB, 3, "p1", 1, 20)
    assert confirmed(bus.round(), PUB) == {3}
    assert stored(bus.engine) == [b"p1-%d" % i for i in range(1, 21)]


def test_sequences_reused_after_a_rollback_confirm_only_the_batch_stored(bus: Bus) -> None:
    """Batch A is rolled back by a subscription's failed commit; batch B, appended later in
    the same round, gets A's bus sequences.  The round's commit covers B, never A."""
    other = b"\x00pub2"
    bus.publish(PUB, 1, "p1", 1, 5)
    bus.request(SUB, {"op": "sub", "patterns": [">"]})
    bus.publish(other, 7, "p2", 1, 5)
    bus.engine.fail_in = 2  # type: ignore[attr-defined]  # the append passes, the sub's commit fails
    sent = bus.round()
    assert confirmed(sent, other) == {7}
    assert confirmed(sent, PUB) == set() and refused(sent, PUB)[1]["retry"] is True
    assert stored(bus.engine) == [b"p2-%d" % i for i in range(1, 6)]


def test_batches_a_request_committed_stay_confirmed_when_the_round_commit_fails(
    bus: Bus,
) -> None:
    bus.publish(PUB, 1, "p1", 1, 5)
    bus.request(SUB, {"op": "sub", "patterns": [">"]})  # its commit covers batch 1
    bus.publish(PUB, 2, "p1", 6, 5)
    bus.engine.fail_in = 4  # type: ignore[attr-defined]  # append, commit, append, the round's commit
    sent = bus.round()
    assert confirmed(sent, PUB) == {1}
    assert refused(sent, PUB)[2]["retry"] is True
    assert stored(bus.engine) == [b"p1-%d" % i for i in range(1, 6)]


# -- 2. hostile requests: every field checked at the edge; no request abandons a round --

HUGE = 18446744073709551615


@pytest.mark.parametrize("hostile", [
    {"op": "ack", "seq": HUGE},
    {"op": "ack", "seq": 1 << 63},
    {"op": "credit", "n": HUGE},
    {"op": "sub", "patterns": [">"], "group": "g", "credit": HUGE},
    {"op": "sub", "patterns": [">"], "group": "g", "pending": 0},
    {"op": "sub", "patterns": [">"], "group": "g", "pending": HUGE},
    {"op": "sub", "patterns": [">"], "group": "g", "pending": True},
    {"op": "sub", "patterns": [">"], "from": {"seq": HUGE}},
    {"op": "sub", "patterns": [">"], "from": {"last": HUGE}},
    {"op": "sub", "patterns": [">"], "from": {"time": 1e308}},
    {"op": "retain", "max_bytes": HUGE},
])  # fmt: skip
def test_a_hostile_request_is_refused_and_the_round_confirms_the_others(
    bus: Bus, hostile: dict[str, Any]
) -> None:
    bad = b"\x00bad"
    bus.request(bad, {"op": "sub", "patterns": ["t.>"], "group": "workers", "credit": 100})
    bus.round()
    bus.publish(PUB, 1, "p1", 1, 3)
    for _ in range(3):
        bus.request(bad, hostile)
    bus.publish(PUB, 2, "p1", 4, 3)
    malformed = bus.server.malformed
    sent = bus.round()
    assert confirmed(sent, PUB) == {1, 2}
    replies = answers(sent, bad)
    assert len(replies) == 3 and not any(r["ok"] for r in replies)
    assert bus.server.failures == 0 and bus.server.malformed == malformed + 3
    assert stored(bus.engine) == [b"p1-%d" % i for i in range(1, 7)]


def test_any_exception_in_one_request_leaves_the_others_work_alone(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(bus.engine, "stats", broken)
    bus.publish(PUB, 1, "p1", 1, 3)
    bus.request(SUB, {"op": "stats"})
    bus.publish(PUB, 2, "p1", 4, 3)
    sent = bus.round()
    assert confirmed(sent, PUB) == {1, 2}
    assert answers(sent, SUB)[0]["ok"] is False and bus.server.failures == 1


def test_a_member_with_other_patterns_than_its_group_is_refused_and_others_served(
    bus: Bus,
) -> None:
    """Its claims would fail every round: it is refused when it subscribes, and the
    subscriptions after it are still pumped."""
    good, bad, plain = b"\x00good", b"\x00bad", b"\x00plain"
    bus.request(good, {"op": "sub", "patterns": ["t.>"], "group": "g", "credit": 100})
    bus.request(bad, {"op": "sub", "patterns": ["x.>"], "group": "g", "credit": 100})
    bus.request(plain, {"op": "sub", "patterns": ["t.>"], "credit": 100})
    sent = bus.round()
    assert answers(sent, good)[0]["ok"] and answers(sent, plain)[0]["ok"]
    (refusal,) = answers(sent, bad)
    assert refusal["ok"] is False and "patterns" in refusal["error"]
    bus.publish(PUB, 1, "p1", 1, 3)
    sent = bus.round()
    assert confirmed(sent, PUB) == {1}
    for ident in (good, plain):
        assert [m[2] for m in sent if m[0] == ident and m[1] == protocol.DELIVER] == [
            protocol.TAG.pack(1)
        ]
    assert bus.server.failures == 0


def test_a_group_member_is_given_at_most_pending_events_until_it_acknowledges(
    bus: Bus,
) -> None:
    """max_pending lives in the bus: a member holding *pending* events unacknowledged is
    given none until it acknowledges; the other member gets the rest meanwhile."""
    a, b = b"\x00a", b"\x00b"
    for i in range(1, 7):
        bus.publish(PUB, i, "p1", i, 1)  # six batches of one event each
    bus.round()

    def given(sent: list[list[bytes]], ident: bytes) -> list[int]:
        return [protocol.TAG.unpack(m[2])[0] for m in sent
                if m[0] == ident and m[1] == protocol.DELIVER]  # fmt: skip

    sub = {"op": "sub", "patterns": ["t.>"], "group": "g", "from": "start", "credit": 100}
    bus.request(a, {**sub, "member": "a", "pending": 2})
    bus.request(b, {**sub, "member": "b", "pending": 1})
    sent = bus.round()
    assert given(sent, a) == [1, 2] and given(sent, b) == [3]
    bus.request(b, {"op": "credit", "n": 1})  # credit alone makes no room
    assert given(bus.round(), b) == []
    bus.request(b, {"op": "ack", "seq": 3})
    sent = bus.round()
    assert given(sent, b) == [4] and given(sent, a) == []
    bus.request(a, {"op": "ack", "seq": 1})
    assert given(bus.round(), a) == [5]
    held = {c.name: c.held for c in bus.engine.stats().consumers}
    assert held == {"g": 3}  # a: 2 and 5, b: 4


def test_a_group_member_acknowledges_what_it_is_given_again_below_its_last_ack() -> None:
    """Released events (a member gone, a bus restart) may come after higher ones: each is
    acknowledged, else the bus counts them held (against max_pending) for ever."""
    from eda.core.bus.client import BusSubscriber

    class Sent:
        def __init__(self) -> None:
            self.frames: list[list[bytes]] = []

        def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
            self.frames.append(frames)

    sub = BusSubscriber("tcp://127.0.0.1:9", ["t.>"], group="g")
    sub.sock.close(linger=0)
    sock = Sent()
    sub.sock = sock  # type: ignore[assignment]
    sub.ack(5)
    sub.ack(3)
    acks = [json.loads(f[1])["seq"] for f in sock.frames if json.loads(f[1])["op"] == "ack"]
    assert acks == [5, 3]


# -- 5. property: confirmed == stored, exactly once, under any interleaving ------------

_action = st.one_of(
    st.tuples(st.just("pub"), st.integers(0, 2), st.integers(1, 5)),
    st.tuples(st.just("sub"), st.integers(0, 2), st.sampled_from(["plain", "durable", "group"])),
    st.tuples(st.just("ack"), st.integers(0, 2), st.integers(0, 60)),
    st.tuples(st.just("fail"), st.integers(1, 6), st.just(0)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(rounds=st.lists(st.lists(_action, max_size=8), min_size=1, max_size=8))
# a resubscription's release commits the round's batch, then its next write fails: the
# batch is stored, so it must stay confirmed (it was refused once)
@example(rounds=[[("fail", 5, 0), ("sub", 0, "group"), ("pub", 0, 1), ("sub", 0, "durable")]])
def test_confirmed_events_are_exactly_the_stored_ones_under_any_interleaving(
    tmp_path_factory: pytest.TempPathFactory, rounds: list[list[tuple[str, int, Any]]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "bus.db"
    bus = Bus(Failing(path))
    pubs = [b"\x00p%d" % i for i in range(3)]
    subs = [b"\x00s%d" % i for i in range(3)]
    nxt = [1, 1, 1]  # next publisher sequence per publisher
    tags: dict[tuple[bytes, int], tuple[int, int]] = {}  # (client, tag) -> (seq, size)
    resend: list[tuple[bytes, int]] = []
    done: set[str] = set()  # event ids confirmed
    counter = 0

    def send(ident: bytes, seq: int, size: int) -> None:
        nonlocal counter
        counter += 1
        tags[(ident, counter)] = (seq, size)
        bus.publish(ident, counter, ident[1:].decode(), seq, size)

    def serve() -> None:
        sent = bus.round()
        for ident in pubs:
            for tag in confirmed(sent, ident):
                seq, size = tags.pop((ident, tag))
                done.update(f"{ident[1:].decode()}-{seq + i}" for i in range(size))
            for tag, why in refused(sent, ident).items():
                assert why["retry"] is True
                resend.append((ident, tag))
        # a confirmation never lies, and nothing unconfirmed is taken for stored
        got = [p.decode() for p in stored(bus.engine)]
        assert len(got) == len(set(got)), "an event stored twice"
        assert set(got) == done

    try:
        for actions in rounds:
            for ident, tag in resend:  # refused (retry): the publisher sends it again
                send(ident, *tags.pop((ident, tag)))
            resend.clear()
            for kind, who, arg in actions:
                if kind == "pub":
                    send(pubs[who], nxt[who], arg)
                    nxt[who] += arg
                elif kind == "sub":
                    extra = {"durable": {"durable": "d"}, "group": {"group": "g"}}.get(arg, {})
                    bus.request(subs[who], {"op": "sub", "patterns": [">"], "credit": 50, **extra})
                elif kind == "ack":
                    bus.request(subs[who], {"op": "ack", "seq": arg})
                else:
                    bus.engine.fail_in = who  # type: ignore[attr-defined]
            serve()
        bus.engine.fail_in = 0  # type: ignore[attr-defined]
        for _ in range(3):
            for ident, tag in resend:
                send(ident, *tags.pop((ident, tag)))
            resend.clear()
            serve()
        assert not tags, "a batch neither confirmed nor refused"
    finally:
        bus.close()
    with SQLiteEngine(path) as again:  # what was confirmed is durable
        assert {p.decode() for p in stored(again)} == done


# -- 4. a big batch costs a consumer group (and a subscriber) linear work ---------------


def test_claiming_a_big_batch_a_slice_at_a_time_fetches_and_splits_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch of 200,000 tiny events, claimed 1,000 at a time by two group members and
    read 1,000 at a time by a subscriber: the store fetches the batch's blob and splits
    it once, not once per slice (which made 700,000 events cost quadratic CPU)."""
    n = 200_000
    with SQLiteEngine(tmp_path / "bus.db") as s:
        header = codec.encode_header(codec.TEXT, n, 1, 1000.0, codec.encode_origin("p1", "src"))
        body = b"\n".join(b"%d" % i for i in range(1, n + 1))
        s.append([codec.decode([b"t.big", header, body])])
        s.commit()
        splits = fetches = 0
        payloads = Record.payloads

        def counted(self: Record) -> list[bytes]:
            nonlocal splits
            splits += self.size == n
            return payloads(self)

        def traced(sql: str) -> None:
            nonlocal fetches
            fetches += "body FROM batches" in sql

        monkeypatch.setattr(Record, "payloads", counted)
        s._conn.set_trace_callback(traced)
        got: list[bytes] = []
        while records := s.claim("g", "ab"[len(got) // 1000 % 2], ["t.>"], 1000, start=1):
            got += [e for r in records for e in r.payloads()]
        assert got == body.split(b"\n")
        read: list[bytes] = []
        while records := list(s.read(len(read) + 1, limit=1000)):
            read += [e for r in records for e in r.payloads()]
        assert read == got
        s._conn.set_trace_callback(None)
        assert splits == 1, f"the batch was split {splits} times"
        assert fetches == 1, f"the batch's blob was fetched {fetches} times"


# -- 1, end to end: the reviewer's full disk with subscribers (re)joining ---------------

FULL = """
set -e
mount -t tmpfs -o size=3m tmpfs "$1"
shift
exec "$@"
"""


def test_a_full_disk_with_subscribers_joining_never_confirms_what_was_not_stored(
    procs: Procs, tmp_path: Path
) -> None:
    """eda-pub --confirm streams 5 MB into a bus on a 3 MB tmpfs while another client keeps
    sending ``sub`` requests (each one commits): eda-pub must not exit 0, and what the
    bus stored is what it confirmed, each event once."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("needs unshare and root to mount a tmpfs")
    data = tmp_path / "tiny"
    data.mkdir()
    argv = command("eda-bus", "serve", "--data", str(data), "--bind", "tcp://127.0.0.1:0",
                   "--no-mdns")  # fmt: skip
    bus = procs.start(["unshare", "-m", "sh", "-c", FULL, "sh", str(data), *argv])
    ep = bus.wait_stderr(r"serving \S+ on (tcp://\S+)", 15)[1]
    stop = threading.Event()
    answered = 0

    def subscribe_again_and_again() -> None:
        nonlocal answered
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)
        sub = json.dumps({"op": "sub", "patterns": ["other.>"]}).encode()
        try:
            while not stop.is_set():
                sock.send_multipart([protocol.REQUEST, sub])
                if sock.poll(1000):
                    sock.recv_multipart()
                    answered += 1
        finally:
            sock.close()

    flood = threading.Thread(target=subscribe_again_and_again, daemon=True)
    flood.start()
    try:
        lines = "".join(f"{i:08d}{'y' * 92}\n" for i in range(1, 50_001))  # 5 MB > 3 MB
        done = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "3", "fill.up",
                   input=lines, timeout=120)  # fmt: skip
    finally:
        stop.set()
        flood.join(10)
    assert answered > 10  # the subscriptions shared the bus's rounds with the batches
    assert done.returncode == 4, done.stderr
    assert "disk is full" in done.stderr
    stored = int(stored_stats(ep)["events"])  # type: ignore[call-overload]
    assert 1000 < stored < 50_000
    numbers = [int(x[:8]) for x in replay(ep, "fill.up", stored, "--raw")]
    assert len(numbers) == len(set(numbers)) == stored
    assert bus.popen.poll() is None  # still serving


# -- 2, end to end: a group member flooding out-of-range acks --------------------------


def test_a_flood_of_out_of_range_acks_does_not_stop_confirmations(
    procs: Procs, tmp_path: Path
) -> None:
    """A group member repeats ``ack`` 2**64-1 while eda-pub --confirm publishes: each ack is
    answered as refused, and eda-pub has every event confirmed and stored."""
    bus = procs.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--bind",
                    "tcp://127.0.0.1:0", "--no-mdns")  # fmt: skip
    ep = bus.wait_stderr(r"serving \S+ on (tcp://\S+)", 15)[1]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    sub = {"op": "sub", "patterns": ["jobs.>"], "group": "workers", "credit": 10}
    sock.send_multipart([protocol.REQUEST, json.dumps(sub).encode()])
    assert sock.poll(10_000) and json.loads(sock.recv_multipart()[1])["ok"] is True
    stop = threading.Event()
    sent = 0
    refusals: list[bool] = []  # the bus answers each one: ok false

    def flood() -> None:
        nonlocal sent
        ack = json.dumps({"op": "ack", "seq": HUGE}).encode()
        while not stop.is_set():
            try:
                sock.send_multipart([protocol.REQUEST, ack], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
            while sock.poll(0):
                kind, *rest = sock.recv_multipart()
                if kind == protocol.ANSWER:
                    refusals.append(json.loads(rest[0])["ok"])

    attacker = threading.Thread(target=flood, daemon=True)
    attacker.start()
    try:
        lines = "".join(f'{{"n":{i}}}\n' for i in range(2000))
        done = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "20", "jobs.a",
                   input=lines, timeout=60)  # fmt: skip
    finally:
        stop.set()
        attacker.join(10)
        sock.close()
    assert sent > 100 and len(refusals) > 100 and not any(refusals)
    assert done.returncode == 0, done.stderr
    assert int(stored_stats(ep)["events"]) == 2000  # type: ignore[call-overload]
    assert bus.popen.poll() is None

"""Per-peer state of publishers and subscribers is bounded (CONVENTIONS.md §7, issue 15 point 12).

A peer can invent any number of publisher ids, topics and subscriber ids;
what a node keeps per id stays within :data:`eda.core.pubsub.MAX_PEERS` and
:data:`~eda.core.pubsub.MAX_STREAMS` keys, the forgotten ones are counted,
and a real stream going on during the flood is still accounted exactly.
"""

from __future__ import annotations

import re
import sys

import zmq

from eda.core import codec, pubsub
from eda.core.limits import BoundedMap, BoundedSet
from tests.helpers import Procs, wait_until

INVENTED = 100_000


class _QueuedSocket:
    """Stands in for a SUB socket whose queue holds what a hostile peer sent."""

    def __init__(self, messages: list[list[bytes]]) -> None:
        self.messages = messages
        self.at = 0

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if self.at == len(self.messages):
            raise zmq.Again()
        self.at += 1
        return self.messages[self.at - 1]


def _batch(pubid: str, topic: str, seq: int, count: int = 1) -> list[bytes]:
    origin = codec.encode_origin(pubid, f"eda://test/{pubid}")
    body = b"\n".join([b"e"] * count)
    return [topic.encode(), codec.encode_header(codec.TEXT, count, seq, 0.0, origin), body]


def _drain(sub: pubsub.Subscriber) -> int:
    events = 0
    while batches := sub.receive(max_messages=4096):
        events += sum(b.size for b in batches)
    return events


def _flood(start: int, count: int, real: str, real_seq: int) -> list[list[bytes]]:
    """*count* batches of invented publishers and topics, with a welcome from each, and
    every 1,000 messages the next batch of a real stream."""
    out: list[list[bytes]] = []
    for i in range(start, start + count):
        out.append([codec.WELCOME_PREFIX + f"w{i}".encode()])
        out.append(_batch(f"{i:032x}", f"t.{i}", 1))
        if i % 1000 == 0:
            out.append(_batch(real, "real", real_seq, 10))
            real_seq += 10
    return out


def test_invented_publisher_ids_and_topics_leave_a_subscriber_bounded() -> None:
    sub = pubsub.Subscriber([">"])
    real_sock = sub.sock
    lost: list[tuple[str, str, int]] = []
    sub.on_loss = lambda source, topic, n: lost.append((source, topic, n))
    real = "f" * 32
    try:
        half = INVENTED // 2
        feeds = [_flood(0, half, real, 1), _flood(half, half, real, 1 + 10 * (half // 1000))]
        sub.sock = _QueuedSocket(feeds[0])  # type: ignore[assignment]
        first = _drain(sub)
        middle = sys.getallocatedblocks()
        sub.sock = _QueuedSocket(feeds[1])  # type: ignore[assignment]
        second = _drain(sub)
        end = sys.getallocatedblocks()
        assert first + second == INVENTED + 10 * (INVENTED // 1000)  # every event delivered
        # the second 50,000 invented ids cost no more memory than a full map holds
        # (kept, they would take a handful of blocks each: over 200,000 more)
        assert end - middle < 5 * 16_384, end - middle
        assert len(sub._streams) <= pubsub.MAX_STREAMS
        assert len(sub.publishers) <= pubsub.MAX_PEERS
        assert sub._streams.evicted >= INVENTED - pubsub.MAX_STREAMS
        assert sub.publishers.evicted >= INVENTED - pubsub.MAX_PEERS
        assert sub.evicted >= sub._streams.evicted + sub.publishers.evicted
        # the real stream, used all along, was never forgotten: no gap, nothing lost
        assert not lost
        stream = sub._streams.get((real, "real"))
        assert stream is not None and stream[1] == 1
    finally:
        sub.sock = real_sock
        sub.close(0)


def test_a_forgotten_stream_is_neither_loss_nor_delivery_at_its_end() -> None:
    sub = pubsub.Subscriber([">"])
    real_sock = sub.sock
    lost: list[int] = []
    sub.on_loss = lambda _source, _topic, n: lost.append(n)
    real = "e" * 32
    try:
        feed = [_batch(real, "quiet", 1, 5)]  # then silent while others flood
        feed += [_batch(f"{i:032x}", "x", 1) for i in range(pubsub.MAX_STREAMS + 10)]
        sub.sock = _QueuedSocket(feed)  # type: ignore[assignment]
        _drain(sub)
        assert (real, "quiet") not in sub._streams and sub._streams.evicted
        ends = sub._gaps(real, "eda://test/real", {"quiet": (1, 6)})
        assert ends == 0 and not lost  # not claimed lost (it arrived)...
        assert sub.unaccounted == 5  # ...nor delivered: unknown, and counted
    finally:
        sub.sock = real_sock
        sub.close(0)


def test_invented_subscriber_ids_leave_a_publisher_bounded() -> None:
    pub = pubsub.Publisher()
    rogue = zmq.Context.instance().socket(zmq.XSUB)
    rogue.setsockopt(zmq.SNDHWM, 0)  # nothing the test sends is dropped on its side
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        rogue.connect(pub.bind("tcp://127.0.0.1:*"))
        rogue.send(b"\x01" + codec.BEACON_PREFIX + b"honest")
        wait_until(lambda: (pub.service(), "honest" in pub.subscribers)[1], 15, "the beacon")
        pub.send("t", b"x", 1)
        marks = []
        for part in range(2):
            for i in range(part * INVENTED // 2, (part + 1) * INVENTED // 2):
                subid = f"s{i}".encode()
                rogue.send(b"\x01" + codec.BEACON_PREFIX + subid)  # joins
                rogue.send(b"\x01" + codec.ACK_PREFIX + pub.pubid.encode() + b" " + subid + b" 1")
                rogue.send(b"\x01" + codec.BYE_PREFIX + f"b{i}".encode())  # a goodbye
                rogue.send(b"\x00" + codec.BEACON_PREFIX + f"d{i}".encode())  # never joined
                if i % 2000 == 0:
                    pub.service()
            wait_until(
                lambda end=(part + 1) * INVENTED // 2: (pub.service(), pub.ever_joined > end)[1],
                60,
                "the invented subscribers",
            )
            marks.append(sys.getallocatedblocks())
        assert pub.ever_joined == INVENTED + 1
        # flat: the second 50,000 ids cost no more than what a full set of maps holds
        assert marks[1] - marks[0] < 10 * 4096, marks
        for kept in (pub.subscribers, pub._left, pub._acks):
            assert len(kept) <= pubsub.MAX_PEERS
        assert len(pub._joined) <= pubsub.MAX_PEERS and len(pub._dropped) <= pubsub.MAX_PEERS
        assert pub.subscribers.evicted >= INVENTED + 1 - pubsub.MAX_PEERS
        assert pub._left.evicted >= INVENTED - pubsub.MAX_PEERS
        assert pub.evicted >= pub.subscribers.evicted + pub._left.evicted
    finally:
        rogue.close(0)
        pub.close(0)


def test_bounded_map_forgets_the_least_recently_used_and_counts() -> None:
    forgotten: list[str] = []
    m: BoundedMap[str, int] = BoundedMap(4, on_evict=lambda gone: forgotten.extend(gone))
    for key in "abcd":
        m[key] = ord(key)
    assert m.get("a") == ord("a")  # used: it outlives b, c and d, added after it
    m["e"] = 0
    m["f"] = 0
    assert sorted(forgotten) == ["b", "c", "d"] and m.evicted == 3
    assert m.keys() == {"a", "e", "f"} and len(m) == 3
    assert m.pop("a") == ord("a") and "a" not in m and m.pop("a", -1) == -1
    s: BoundedSet[int] = BoundedSet(10, range(100))
    assert len(s) <= 10 and s.evicted >= 90 and 99 in s and s == set(s)


def test_eda_sub_verbose_says_how_many_streams_it_forgot(procs: Procs) -> None:
    count = pubsub.MAX_STREAMS + 4000  # enough for the oldest half to be forgotten
    sub = procs.eda(
        "eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", ">", "-C", str(count), "--raw"
    )  # fmt: skip
    endpoint = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    rogue = zmq.Context.instance().socket(zmq.XPUB)
    rogue.setsockopt(zmq.SNDHWM, 0)  # nothing dropped on the sending side
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        rogue.connect(endpoint)
        assert rogue.poll(20_000), "the subscription never came"
        for i in range(count):
            rogue.send_multipart(_batch(f"{i:032x}", f"t.{i}", 1))
        assert sub.wait(120) == 0, sub.stderr
    finally:
        rogue.close(0)
    assert len(sub.lines()) == count
    forgot = re.search(r"forgot (\d+) publisher id\(s\) or stream\(s\)", sub.stderr)
    assert forgot is not None and int(forgot.group(1)) >= count - pubsub.MAX_STREAMS, sub.stderr

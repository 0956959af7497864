"""What a publisher may name on eda-bus: its id and its events' attributes.

Publisher ids are unique enough that deduplication never drops a new event,
and stable enough that a resent batch is still recognised as a duplicate.
The attributes eda adds (``edaseq``, ``edabusseq``) are eda's alone: no
publisher sets them, and no output line holds a key twice.

Run against both engines (the ``engine`` fixture of tests/test_bus.py).
"""

from __future__ import annotations

import json
import re
import secrets
import signal

import pytest
import zmq

from eda.core import attributes, codec
from eda.core.bus import protocol
from eda.core.bus.client import BusPublisher
from tests.helpers import Procs, run
from tests.test_bus import Bus, engine, replay, stored_stats

__all__ = ["engine"]  # the fixture, used by name

HEX128 = re.compile(r"[0-9a-f]{32}")


def _events(endpoint: str) -> int:
    return int(stored_stats(endpoint)["events"])  # type: ignore[call-overload]


def test_confirmed_runs_of_eda_pub_use_128_bit_ids_and_are_all_stored(
    procs: Procs, engine: Bus
) -> None:
    _, ep = engine.start()
    for word in ("a", "b", "c"):
        done = run("eda-pub", "--bus", ep, "--confirm", "t.runs", word)
        assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in replay(ep, "t.runs", 3)]
    assert [e["data"] for e in events] == ["a", "b", "c"]
    pubids = [e["id"].rsplit("-", 1)[0] for e in events]
    assert all(HEX128.fullmatch(p) for p in pubids), pubids
    assert len(set(pubids)) == 3


def test_a_publisher_id_shorter_than_128_bits_is_refused_not_deduplicated(
    procs: Procs, engine: Bus
) -> None:
    """An old or hand-made 32-bit id could collide with an earlier run's: the bus says
    so (eda-pub exits 1 with the reason) instead of confirming and storing nothing."""
    _, ep = engine.start()
    for payload in (b"first run", b"second run, same id"):
        pub = BusPublisher(ep, timeout=10)
        pub.pubid = "deadbeef"
        pub._origin = codec.encode_origin(pub.pubid, "eda://test/old")
        try:
            pub.send("t.old", payload, 1)
            pub.finish()
        finally:
            pub.close()
        assert pub.confirmed == 0
        ((what, why),) = pub.refused
        assert what.topic == "t.old" and what.pubid == "deadbeef"
        assert "128" in why and "\n" not in why
    assert _events(ep) == 0
    # a 128-bit publisher right after is served as usual
    done = run("eda-pub", "--bus", ep, "--confirm", "t.old", "new")
    assert done.returncode == 0, done.stderr
    assert _events(ep) == 1


def _dealer(endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _publish(endpoint: str, frames: list[bytes]) -> bytes:
    """Send one PUBLISH on a new connection; the bus's answer kind (CONFIRM, REFUSED)."""
    sock = _dealer(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(20_000), "no answer from the bus"
        return sock.recv_multipart()[0]
    finally:
        sock.close()


def test_a_resent_batch_is_a_duplicate_after_a_reconnect_and_a_bus_restart(
    procs: Procs, engine: Bus
) -> None:
    bus, ep = engine.start()
    origin = codec.encode_origin(secrets.token_hex(16), "eda://test/resend")
    header = codec.encode_header(codec.TEXT, 3, 1, 0.0, origin)
    frames = [protocol.PUBLISH, protocol.TAG.pack(1), b"t.dup", header, b"x\ny\nz"]
    assert _publish(ep, frames) == protocol.CONFIRM
    assert _events(ep) == 3
    # the publisher lost its connection and sends the batch again on a new one
    assert _publish(ep, frames) == protocol.CONFIRM
    assert _events(ep) == 3
    # the bus restarted before the confirmation reached the publisher
    bus.signal(signal.SIGTERM)
    assert bus.wait(15) == 0, bus.stderr
    _, ep = engine.start()
    assert _publish(ep, frames) == protocol.CONFIRM
    assert _events(ep) == 3
    assert [json.loads(line)["data"] for line in replay(ep, "t.dup", 3)] == ["x", "y", "z"]


def strict_json(line: str) -> dict[str, object]:
    """A JSON object; an object holding a key twice fails the test."""

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"a key twice in {line}"
        return dict(pairs)

    value = json.loads(line, object_pairs_hook=unique)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("name", sorted(attributes.EDA_ATTRIBUTES))
def test_eda_pub_refuses_a_header_eda_adds(procs: Procs, engine: Bus, name: str) -> None:
    _, ep = engine.start()
    done = run("eda-pub", "-H", f"{name}=99", "--bus", ep, "--confirm", "t.attr", "x")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"'{name}' is added by eda" in done.stderr
    assert _events(ep) == 0


def test_a_peers_event_carrying_an_attribute_eda_adds_is_refused_at_the_edge(
    procs: Procs, engine: Bus
) -> None:
    """An older or hostile publisher's edabusseq once came out of eda-sub --bus next to
    the bus's own: a line holding the key twice, the forged value first."""
    _, ep = engine.start()
    origin = codec.encode_origin(secrets.token_hex(16), "eda://test/forger")
    text = codec.encode_header(codec.TEXT, 1, 1, 0.0, origin)
    forged = [protocol.PUBLISH, protocol.TAG.pack(1), b"t.attr", text, b"x",
              b'{"edabusseq":999}']  # fmt: skip
    assert _publish(ep, forged) == protocol.REFUSED
    envelope = json.dumps({"specversion": "1.0", "id": "e1", "source": "s", "type": "t.attr",
                           "edabusseq": 999, "data": "y"}).encode()  # fmt: skip
    env = codec.encode_header(codec.ENVELOPE, 1, 2, 0.0, origin)
    assert _publish(ep, [protocol.PUBLISH, protocol.TAG.pack(2), b"t.attr", env, envelope]) == (
        protocol.REFUSED
    )
    assert _events(ep) == 0
    # what the bus stores and prints: each line's keys once, the bus's sequence
    done = run("eda-pub", "-H", "tenant=acme", "--bus", ep, "--confirm", "t.attr", "a", "b")
    assert done.returncode == 0, done.stderr
    events = [strict_json(line) for line in replay(ep, "t.attr", 2)]
    assert [(e["edabusseq"], e["edaseq"], e["tenant"]) for e in events] == [
        (1, 1, "acme"),
        (2, 2, "acme"),
    ]


def test_printed_events_go_back_through_eda_pub_envelope_with_eda_attributes_restamped(
    procs: Procs, engine: Bus
) -> None:
    _, ep = engine.start()
    done = run("eda-pub", "--bus", ep, "--confirm", "t.orig", "a")
    assert done.returncode == 0, done.stderr
    (printed,) = replay(ep, "t.orig", 1)
    assert strict_json(printed)["edabusseq"] == 1
    again = run("eda-pub", "--bus", ep, "--confirm", "--envelope", "t.copy", input=printed + "\n")
    assert again.returncode == 0, again.stderr
    (copy,) = [strict_json(line) for line in replay(ep, "t.copy", 1)]
    assert (copy["id"], copy["data"], copy["edabusseq"], copy["edaseq"]) == (
        strict_json(printed)["id"], "a", 2, 1,
    )  # fmt: skip


def test_the_wire_decoder_refuses_every_attribute_eda_adds() -> None:
    origin = codec.encode_origin("p1", "eda://test")
    header = codec.encode_header(codec.TEXT, 1, 1, 0.0, origin)
    for name in attributes.EDA_ATTRIBUTES:
        ext = json.dumps({name: 1}).encode()
        with pytest.raises(codec.WireError, match=name):
            codec.decode([b"t", header, b"x", ext])
        event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", name: 1}
        with pytest.raises(ValueError, match=name):
            attributes.check_event(event)


def test_brokerless_publishers_and_saga_publish_steps_use_128_bit_ids_too() -> None:
    """A subscriber that outlives publisher runs keeps each (pubid, topic)'s next sequence
    and drops what it already had as copies: a run whose 32-bit id collided with an
    earlier one lost its events there, end of stream confirmed all the same."""
    from eda.core.pubsub import Publisher

    pubs = [Publisher(), Publisher()]  # what eda-pub and a saga's publish step create
    try:
        assert all(HEX128.fullmatch(p.pubid) for p in pubs)
        assert pubs[0].pubid != pubs[1].pubid
        assert all(p.pubid in p.source and p.next_envelope_id().startswith(p.pubid) for p in pubs)
    finally:
        for p in pubs:
            p.close(0)

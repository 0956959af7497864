"""Publisher ids on eda-bus: unique enough that deduplication never drops a new event,
stable enough that a resent batch is still recognised as a duplicate.

Run against both engines (the ``engine`` fixture of tests/test_bus.py).
"""

from __future__ import annotations

import json
import re
import secrets
import signal

import zmq

from eda.core import codec
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

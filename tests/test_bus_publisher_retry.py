"""A confirmed publisher and the bus's "refused for now" (retry): the batch goes again as
soon as the bus confirms again (a JetStream stream that elected its new leader), not
only when its resend timer runs out.

The bus is a bare ROUTER socket in the test, so which message goes when is the test's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import zmq

from eda.core.bus import protocol as p
from eda.core.bus.publisher import BusPublisher
from tests.helpers import wait_until


@pytest.fixture
def router() -> Iterator[zmq.Socket[bytes]]:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.linger = 0
    try:
        yield sock
    finally:
        sock.close()


def received(router: zmq.Socket[bytes], pub: BusPublisher) -> list[bytes]:
    """The next message the publisher sent (its frames after the routing id)."""
    got: list[list[bytes]] = []

    def arrived() -> bool:
        pub.service()
        if router.poll(10):
            got.append(router.recv_multipart())
        return bool(got)

    wait_until(arrived, 10, "a message from the publisher")
    return got[0]


def test_a_batch_refused_for_now_goes_again_once_the_bus_confirms_again(
    router: zmq.Socket[bytes],
) -> None:
    port = router.bind_to_random_port("tcp://127.0.0.1")
    # a resend timer that never runs out: only the bus's own confirmation can send it again
    pub = BusPublisher(f"tcp://127.0.0.1:{port}", resend_after=3600.0)
    try:
        pub.send("t.a", b"one", 1)
        pub.send("t.a", b"two", 1)
        ident, *one = received(router, pub)
        _, *two = received(router, pub)
        assert one[0] == two[0] == p.PUBLISH and one[1] != two[1]

        retry = json.dumps({"error": "no stream leader", "code": 1, "retry": True}).encode()
        router.send_multipart([ident, p.REFUSED, one[1], retry])
        router.send_multipart([ident, p.CONFIRM, p.pack_tags([p.TAG.unpack(two[1])[0]])])
        _, *again = received(router, pub)
        assert again == one  # the same batch, tag and sequences: stored at most once

        router.send_multipart([ident, p.CONFIRM, p.pack_tags([p.TAG.unpack(one[1])[0]])])
        pub.finish(10)
        assert (pub.confirmed, pub.resent, pub.refused) == (2, 1, [])
        assert pub.warnings == ["no stream leader"]
    finally:
        pub.close()

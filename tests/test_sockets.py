"""The socket factory (core/sockets.py): every eda socket gets the process's policies."""

from __future__ import annotations

import zmq

from eda.core import sockets
from eda.core.daemon import Daemon
from eda.core.endpoint import Endpoint


def test_a_policy_reaches_sockets_of_daemons_and_clients() -> None:
    seen: list[int] = []

    def policy(sock: zmq.Socket[bytes], kind: int) -> None:
        seen.append(kind)
        sock.setsockopt(zmq.SNDHWM, 77)

    sockets.add_policy(policy)
    try:
        daemon = Daemon(lambda _m: None)
        router = daemon.socket(zmq.ROUTER, max_message=1000)
        dealer = sockets.new_socket(zmq.DEALER)
        assert seen == [zmq.ROUTER, zmq.DEALER]
        assert router.getsockopt(zmq.SNDHWM) == 77 and dealer.getsockopt(zmq.SNDHWM) == 77
        assert router.getsockopt(zmq.MAXMSGSIZE) == 1000
        assert router.getsockopt(zmq.LINGER) == 0
        dealer.close()
        daemon.close()
    finally:
        sockets.remove_policy(policy)
    sockets.new_socket(zmq.DEALER).close()
    assert len(seen) == 2  # removed: no longer applied


def test_bind_and_connect_take_typed_endpoints_ipv6_included() -> None:
    server = sockets.new_socket(zmq.REP)
    client = sockets.new_socket(zmq.REQ)
    try:
        bound = sockets.bind(server, Endpoint("::1", 0))
        assert bound.host == "::1" and bound.port > 0
        sockets.connect(client, bound)
        client.send(b"ping")
        assert server.poll(10_000) and server.recv() == b"ping"
    finally:
        client.close()
        server.close()

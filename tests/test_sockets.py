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


def test_monitor_events_are_parsed_as_pyzmq_parses_them() -> None:
    from zmq.utils.monitor import parse_monitor_message

    from tests.helpers import wait_until

    server = sockets.new_socket(zmq.ROUTER)
    client = sockets.new_socket(zmq.DEALER)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        mon = server.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_LISTENING)
        sockets.connect(client, Endpoint("127.0.0.1", port))
        seen: list[list[bytes]] = []

        def accepted() -> bool:
            while mon.poll(0):
                seen.append(mon.recv_multipart())
            return any(parse_monitor_message(f)["event"] == zmq.EVENT_ACCEPTED for f in seen)

        wait_until(accepted, timeout=30, what="the ACCEPTED event")
        for frames in seen:
            theirs = parse_monitor_message(frames)
            ours = sockets.parse_monitor(frames)
            assert ours is not None
            assert (ours.event, ours.value, ours.endpoint) == (
                theirs["event"],
                theirs["value"],
                theirs["endpoint"].decode(),
            )
        assert sockets.parse_monitor([b"short"]) is None
        assert sockets.parse_monitor([b"\x00" * 5, b"x"]) is None
        server.disable_monitor()
        mon.close(0)
    finally:
        client.close(0)
        server.close(0)


def test_client_paths_do_not_import_asyncio() -> None:
    """zmq.utils.monitor imports zmq.asyncio: a one-shot client must not pay for it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from eda.core import reqrep\n"
        "from eda.core.pubsub import node, publisher, subscriber\n"
        "from eda.core.bus import link, connections\n"
        "reqrep.handshake_refusal(None)\n"
        "print('asyncio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

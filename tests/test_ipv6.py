"""IPv6 endpoints ([::1]) work wherever an endpoint is taken: one typed Endpoint (issue 15, point 2).

Every bind and connect goes through :mod:`eda.core.endpoint` and
:mod:`eda.core.sockets`, which set ZeroMQ's IPV6 option when the endpoint
needs it; before, ``tcp://[::1]:*`` was refused or silently never connected.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import zmq

from eda.core import discovery, mdns
from eda.core.daemon import Daemon, port_of
from eda.core.endpoint import Endpoint
from eda.core.registry.server import Server, Settings
from tests.helpers import Procs, run, wait_until


def test_eda_pub_and_eda_sub_bind_and_connect_over_ipv6(procs: Procs) -> None:
    sub = procs.eda("eda-sub", "-v", "--no-mdns", "--bind", "tcp://[::1]:*", "t", "-C", "1")
    bound = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    assert bound.startswith("tcp://[::1]:")
    sent = run("eda-pub", "--no-mdns", "--connect", bound, "t", "over six")
    assert sent.returncode == 0, sent.stderr
    assert sub.wait() == 0
    assert json.loads(sub.stdout.splitlines()[0])["data"] == "over six"
    # and the other way round: the publisher binds, the subscriber connects
    pub = procs.eda("eda-pub", "-v", "--no-mdns", "--bind", "tcp://[::1]:*", "--wait-subscribers",
                    "1", "--wait", "20", "t", "back")  # fmt: skip
    endpoint = pub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    got = run("eda-sub", "--no-mdns", "--connect", endpoint, "t", "-C", "1", "-W", "20")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout.splitlines()[0])["data"] == "back" and pub.wait() == 0


def test_a_daemon_binds_a_typed_endpoint_ipv6_included() -> None:
    daemon = Daemon()
    try:
        sock = daemon.socket(zmq.PULL)
        bound = daemon.bind(sock, Endpoint("::1", 0))
        assert isinstance(bound, Endpoint) and bound.host == "::1" and bound.port > 0
        text = daemon.bind(daemon.socket(zmq.PULL), "tcp://[::1]:*")
        assert text.startswith("tcp://[::1]:") and port_of(text) > 0
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.IPV6, 1)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(bound.zmq)
        push.send(b"six")
        assert sock.poll(10_000) and sock.recv() == b"six"
        push.close()
    finally:
        daemon.close()


@pytest.fixture
def registries() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.close()


def test_registries_serve_replicate_and_answer_dns_over_ipv6(registries: list[Server]) -> None:
    first = Server(Settings(bind="tcp://[::1]:0", mdns=False, tick=0.1))
    registries.append(first)
    second = Server(
        Settings(bind="tcp://[::1]:0", mdns=False, tick=0.1, peers=(first.endpoint,), dns="[::1]:0")
    )
    registries.append(second)
    assert first.endpoint.startswith("tcp://[::1]:") and first.pub_endpoint.startswith(
        "tcp://[::1]:"
    )
    assert second.dns_address.startswith("[::1]:")
    first.start()
    second.start()
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.IPV6, 1)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(first.endpoint)
    instance = {
        "service": "orders",
        "host": "127.0.0.1",
        "port": 8080,
        "ttl": 30.0,
        "interval": 10.0,
    }
    client.send(json.dumps({"op": "register", "rid": 1, "instance": instance}).encode())

    wait_until(
        lambda: _step(first, second) or bool(second.store.lookup("orders")), 20, "replication"
    )
    assert client.poll(5000) and json.loads(client.recv())["ok"] is True
    # the DNS interface answers on its IPv6 address
    host, _, port = second.dns_address.rpartition(":")
    query = mdns.build_query("orders.service.eda", mdns.TYPE_A, 7)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        udp.sendto(query, (host.strip("[]"), int(port)))
        wait_until(lambda: _step(first, second) or _readable(udp), 10, "a DNS answer")
        answer = udp.recv(4096)
    assert answer[:2] == b"\x00\x07" and answer[6:8] == b"\x00\x01"  # one A record: the instance
    client.close()


def _step(*servers: Server) -> bool:
    """Run one round of each server's loop (they share this thread)."""
    for server in servers:
        rounds = iter([False, True])
        server.serve(until=lambda rounds=rounds: next(rounds, True))
    return False


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0.05)[0])


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("10.0.0.7", "tcp://10.0.0.7:5555"),
        ("fe80::1", "tcp://[fe80::1]:5555"),
        ("not an address", None),
        ("10.0.0.7:99", None),
    ],
)
def test_a_discovered_peer_endpoint_is_validated_and_ipv6_bracketed(
    address: str, endpoint: str | None
) -> None:
    inst = mdns.Instance("x._eda-sub._tcp.local.", 5555, "", [address], {"id": "abc"})
    peer = discovery._peer_from_instance(inst)
    assert (peer.endpoint if peer else None) == endpoint
    inst.port = 0
    assert discovery._peer_from_instance(inst) is None

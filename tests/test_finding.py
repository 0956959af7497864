"""Finding a server: one client base (eda.core.reqrep.Client) for the registry,
the bus and the coordinator -- given, else cached with a TCP probe, else mDNS,
and what answered remembered; a server that stops answering is looked for again.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from eda.core import cache, discovery, reqrep
from eda.core.endpoint import Endpoint
from eda.core.errors import NotFoundError, UsageError
from tests.test_reqrep import Echo, running


class Found:
    """What a monkeypatched mDNS query answers (peers with an endpoint; no key: plain mode)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.key = ""


class EchoClient(reqrep.Client):
    """A client that says only where to look, as the registry, bus and coordinator do."""

    what = "echo server"
    cache_key = "echo-endpoints"
    service_type = "_eda-echo._tcp.local."


@pytest.fixture
def announced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The endpoints mDNS answers with (the test fills it)."""
    heard: list[str] = []

    def find_once(service_type: str, **_kw: Any) -> list[Found]:
        assert service_type == EchoClient.service_type
        return [Found(e) for e in heard]

    monkeypatch.setattr(discovery, "find_once", find_once)
    return heard


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own discovery cache: what another test of this worker remembered
    (a coordinator whose port something else took since) must not answer here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def dead_endpoint() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:  # just free: nothing listens there
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_found_by_mdns_then_remembered_then_found_in_the_cache(announced: list[str]) -> None:
    with running(Echo()) as echo:
        assert isinstance(echo, Echo)
        announced.append(echo.endpoint)
        client = EchoClient(timeout=5)
        assert client.request({"op": "echo", "say": "a"})["said"] == "a"
        client.close()
        assert cache.cached("echo-endpoints") == [echo.endpoint]
        announced.clear()  # mDNS knows nothing now: the cache is enough
        again = EchoClient(timeout=5)
        assert again.request({"op": "echo", "say": "b"})["said"] == "b"
        assert again.current == Endpoint.parse(echo.endpoint)
        again.close()


def test_a_server_that_stops_answering_is_looked_for_again(announced: list[str]) -> None:
    """The one in use goes away; the next request finds the new one (cache, then mDNS)."""
    first = Echo()
    with running(first):
        announced.append(first.endpoint)
        client = EchoClient(timeout=0.5)
        assert client.request({"op": "echo", "say": "a"})["said"] == "a"
    with running(Echo()) as second:
        assert isinstance(second, Echo)
        announced[:] = [second.endpoint]  # it came back somewhere else
        assert client.request({"op": "echo", "say": "b"})["said"] == "b"
        assert client.current == Endpoint.parse(second.endpoint)
        assert cache.cached("echo-endpoints") == [second.endpoint]
        client.close()


def test_a_dead_cached_server_costs_a_connect_and_is_reported(announced: list[str]) -> None:
    dead = dead_endpoint()
    cache.remember("echo-endpoints", [dead])
    client = EchoClient(timeout=5)
    with pytest.raises(reqrep.NoServer):
        client.request({"op": "echo"})
    assert client.unreachable == [Endpoint.parse(dead)]
    with running(Echo()) as echo:
        assert isinstance(echo, Echo)
        announced.append(echo.endpoint)  # passed over the dead one, found by mDNS
        assert client.request({"op": "echo", "say": "x"})["said"] == "x"
        client.close()


def test_given_endpoints_are_the_only_ones_tried(announced: list[str]) -> None:
    with running(Echo()) as echo:
        assert isinstance(echo, Echo)
        announced.append(echo.endpoint)
        cache.remember("echo-endpoints", [echo.endpoint])
        client = EchoClient([dead_endpoint()], timeout=0.3)
        with pytest.raises(reqrep.Unavailable, match="no echo server answered"):
            client.request({"op": "echo"})
        client.close()


@pytest.mark.parametrize("text", ["localhost:1", "tcp://*:7700", "tcp://h:0", "udp://h:1",
                                  "tcp://::1:5555", "tcp://[::1]", "tcp://h:99999"])  # fmt: skip
def test_a_client_endpoint_is_tcp_host_port(text: str) -> None:
    with pytest.raises(UsageError, match=r"bad echo server endpoint .*use tcp://HOST:PORT"):
        EchoClient([text])


# -- IPv6 ------------------------------------------------------------------------------------
@pytest.fixture
def echo6() -> Iterator[Echo]:
    """The echo daemon, listening on the IPv6 loopback too (its endpoint now)."""
    daemon = Echo()
    daemon.service.sock.setsockopt(zmq.IPV6, 1)
    daemon.endpoint = daemon.bind(daemon.service.sock, "tcp://[::1]:*")
    with running(daemon):
        yield daemon


def test_an_ipv6_literal_endpoint_is_asked_probed_and_cached(
    echo6: Echo, announced: list[str]
) -> None:
    endpoint = Endpoint.parse(echo6.endpoint)
    assert endpoint.host == "::1" and echo6.endpoint.startswith("tcp://[::1]:")
    given = EchoClient([echo6.endpoint], timeout=5)  # given
    assert given.request({"op": "echo", "say": "v6"})["said"] == "v6"
    given.close()
    assert reqrep.tcp_reachable(endpoint) and reqrep.tcp_reachable(echo6.endpoint)
    assert discovery.probe([echo6.endpoint]) == {echo6.endpoint: True}  # a ZMTP greeting
    announced.append(echo6.endpoint)  # announced, then remembered
    found = EchoClient(timeout=5)
    assert found.request({"op": "echo", "say": "again"})["said"] == "again"
    assert found.current == endpoint and cache.cached("echo-endpoints") == [echo6.endpoint]
    found.close()


def test_the_probe_refuses_a_dead_ipv6_endpoint_and_names_to_resolve() -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as s:
        dead = f"tcp://[::1]:{s.getsockname()[1]}"
    result = discovery.probe([dead, "tcp://localhost:1", "tcp://::1:5"])
    assert result == {dead: False, "tcp://localhost:1": False, "tcp://::1:5": False}


# -- the coordinator -------------------------------------------------------------------------
def test_the_coordinator_is_found_by_discovery_past_a_dead_cached_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eda.core.txn import client as txn_client
    from eda.core.txn import directory

    cache.remember(txn_client.CACHE_KEY, [dead_endpoint()])
    with running(Echo()) as echo:
        assert isinstance(echo, Echo)
        monkeypatch.setattr(directory, "find_coordinators", lambda access, *_: [echo.endpoint])
        client = txn_client.CoordinatorClient(None, access=object(), timeout=5)
        assert client.request({"op": "echo", "say": "c"})["said"] == "c"
        client.close()
        assert cache.cached(txn_client.CACHE_KEY) == [echo.endpoint]


def test_no_coordinator_anywhere_is_not_found_or_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eda.core.txn import client as txn_client
    from eda.core.txn import directory

    monkeypatch.setattr(directory, "find_coordinators", lambda access, *_: [])
    with pytest.raises(NotFoundError, match="no coordinator found"):
        txn_client.CoordinatorClient(None, access=object(), timeout=1).request({"op": "x"})
    with pytest.raises(UsageError, match="allow mDNS"):
        txn_client.CoordinatorClient(None, access=None, timeout=1).request({"op": "x"})


def test_a_commit_is_never_sent_to_a_second_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a timeout the outcome is unknown: sending it elsewhere could commit twice."""
    from eda.core.txn import client as txn_client
    from eda.core.txn import directory

    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:*")
    quiet = str(silent.getsockopt_string(zmq.LAST_ENDPOINT))
    with running(Echo()) as echo:
        assert isinstance(echo, Echo)
        monkeypatch.setattr(
            directory, "find_coordinators", lambda access, *_: [quiet, echo.endpoint]
        )
        client = txn_client.CoordinatorClient(None, access=object(), timeout=0.3)
        with pytest.raises(reqrep.Unavailable):
            client.request({"op": "echo"})
        client.close()
        assert echo.service.requests == 0
    assert silent.poll(1000)
    assert json.loads(silent.recv_multipart()[-1])["op"] == "echo"  # the one it was sent to
    silent.close()


# -- the bus ---------------------------------------------------------------------------------
def test_a_bus_publisher_follows_the_bus_to_where_the_cache_says_it_is_now(
    procs: Any, tmp_path: Any
) -> None:
    """The bus in use is gone; another answers where the cache now points: the
    unconfirmed batches go there (looked for again, not resent forever)."""
    from eda.core.bus import client as bus_client
    from eda.core.bus import protocol as p
    from tests.test_bus import start_bus

    first, ep1 = start_bus(procs, tmp_path / "one")
    cache.remember(p.CACHE_KEY, [ep1])
    find = lambda: bus_client.find_bus(use_mdns=False)  # noqa: E731 (as eda-pub --bus does)
    assert find() == Endpoint.parse(ep1)
    pub = bus_client.BusPublisher(find(), relocate=find, timeout=60)
    pub.send("t", b"a", 1)
    pub.finish()
    first.kill()
    pub.send("t", b"b", 1)  # unconfirmed: the bus is gone
    _, ep2 = start_bus(procs, tmp_path / "two")
    assert ep2 != ep1
    cache.remember(p.CACHE_KEY, [ep2])  # e.g. another client found it by mDNS
    pub.finish()
    assert pub.endpoint == Endpoint.parse(ep2) and pub.confirmed == 2
    pub.close()
    stats = bus_client.request(ep2, {"op": "stats"})
    assert stats["stats"]["events"] == 1  # the one sent after the move

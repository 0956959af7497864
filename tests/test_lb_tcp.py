"""eda-lb tcp: the built-in TCP proxy (in-process core tests) and the CLI end to end."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core.endpoint import Endpoint
from eda.core.errors import UsageError
from eda.core.lb.selfloop import reaches
from eda.core.lb.tcp import Backend, DataPlane, Settings, TcpProxy, instances_of, parse_listen
from eda.core.registry.model import HOST_RE
from tests.helpers import (
    Proc,
    Procs,
    children_of,
    closed_port,
    command,
    readable,
    require_tools,
    wait_until,
)

TIMEOUT = 5.0


class Server:
    """A backend: answers every chunk it receives with ``NAME:chunk`` (mode echo),
    or resets the connection when it receives something (mode reset)."""

    def __init__(self, name: str, port: int = 0, mode: str = "echo") -> None:
        self.name = name.encode()
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while chunk := conn.recv(65536):
                if self.mode == "reset":  # a reset in the middle of a conversation
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    break
                conn.sendall(self.name + b":" + chunk)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop accepting (new connects are refused); open connections go on."""
        self.running = False
        self.thread.join(2)
        self.sock.close()

    def backend(self, weight: int = 1) -> Backend:
        return Backend(self.name.decode(), "127.0.0.1", self.port, weight)


def ask(address: tuple[str, int], text: bytes = b"ping") -> bytes:
    """One connection through the proxy: send *text*, the backend's whole answer."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(text)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def who(answer: bytes) -> str:
    return answer.split(b":", 1)[0].decode()


def who_answers(address: tuple[str, int]) -> str | None:
    """Which backend answers one connection, or None if the proxy (still starting, or
    between candidate sets) reset it: for waiting on a condition, not for asserting."""
    try:
        return who(ask(address))
    except OSError:
        return None


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        if server.running:
            server.stop()


class Running:
    """A TcpProxy (one data plane in a thread) running in a thread of the test."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1") -> None:
        self.proxy = TcpProxy(Endpoint(host, 0), settings)
        self.proxy.start()
        self.address = ("127.0.0.1", self.proxy.address[1]) if host == "::" else self.proxy.address
        self.thread = threading.Thread(target=self.proxy.run, daemon=True)
        self.thread.start()

    def use(self, backends: list[Backend]) -> None:
        """Candidates; waits until the proxy sends traffic to exactly these."""
        self.proxy.set_candidates(backends)
        want = {b.id for b in backends}
        balancer = self.proxy.planes[0].balancer
        wait_until(lambda: {b.key for b in balancer} == want, TIMEOUT, f"traffic to {want}")

    def stop(self) -> None:
        self.proxy.drain(0)
        self.thread.join(10)
        self.proxy.close()


@pytest.fixture
def proxy() -> Iterator[Any]:
    made: list[Running] = []

    def make(host: str = "127.0.0.1", **kw: Any) -> Running:
        settings = Settings(**{"check_interval": 0.05, "check_timeout": 0.5, **kw})
        running = Running(settings, host)
        made.append(running)
        return running

    yield make
    for running in made:
        running.stop()


# -- core, in process ------------------------------------------------------------------
def test_proxies_bytes_both_ways_and_passes_half_close(proxy: Any, servers: list[Server]) -> None:
    servers.append(Server("a"))
    running = proxy()
    running.use([servers[0].backend()])
    assert ask(running.address, b"hello") == b"a:hello"
    big = random.Random(1).randbytes(300_000).replace(b":", b";")  # ':' marks chunks
    with socket.create_connection(running.address, timeout=TIMEOUT) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(big), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        answer = read_all(sock)
        sender.join()
    assert answer.replace(b"a:", b"") == big  # every byte, in order, through partial writes


def test_round_robin_spreads_connections_evenly(proxy: Any, servers: list[Server]) -> None:
    servers.extend([Server("a"), Server("b"), Server("c")])
    running = proxy()
    running.use([s.backend() for s in servers])
    seen = Counter(who(ask(running.address)) for _ in range(30))
    assert seen == {"a": 10, "b": 10, "c": 10}


def test_weighted_shares_follow_the_registry_weight(proxy: Any, servers: list[Server]) -> None:
    servers.extend([Server("a"), Server("b")])
    running = proxy(strategy="weighted")
    running.use([servers[0].backend(1), servers[1].backend(3)])
    seen = Counter(who(ask(running.address)) for _ in range(40))
    assert seen == {"a": 10, "b": 30}
    running.proxy.set_candidates([servers[0].backend(2), servers[1].backend(1)])  # reweighted
    slot = running.proxy.planes[0].balancer.get("a")
    wait_until(lambda: slot is not None and slot.weight == 2, TIMEOUT, "the new weight")
    seen = Counter(who(ask(running.address)) for _ in range(30))
    assert seen == {"a": 20, "b": 10}


def test_least_conn_and_p2c_send_new_connections_to_the_least_loaded(
    proxy: Any, servers: list[Server]
) -> None:
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    for strategy in ("least-conn", "p2c"):
        running = proxy(strategy=strategy)
        running.use([a.backend(), b.backend()])
        held: dict[str, list[socket.socket]] = {"a": [], "b": []}
        for _ in range(4):
            sock = socket.create_connection(running.address, timeout=TIMEOUT)
            sock.sendall(b"?")
            held[who(sock.recv(100))].append(sock)
        assert len(held["a"]) == len(held["b"]) == 2, strategy  # each time the less loaded
        for sock in held["a"]:
            sock.close()
        slot = running.proxy.planes[0].balancer.get("a")
        assert slot is not None
        wait_until(lambda s=slot: s.inflight == 0, TIMEOUT, "a's closes seen")
        more = []
        for _ in range(2):  # b holds 2, a none: both go to a
            sock = socket.create_connection(running.address, timeout=TIMEOUT)
            sock.sendall(b"?")
            assert who(sock.recv(100)) == "a", strategy
            more.append(sock)
        for sock in [*held["b"], *more]:
            sock.close()


def test_random_uses_every_instance(proxy: Any, servers: list[Server]) -> None:
    servers.extend([Server("a"), Server("b"), Server("c")])
    running = proxy(strategy="random")
    running.use([s.backend() for s in servers])
    seen = Counter(who(ask(running.address)) for _ in range(60))
    assert set(seen) == {"a", "b", "c"} and max(seen.values()) < 40, seen


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(UsageError):
        TcpProxy(Endpoint("127.0.0.1", 0), Settings(strategy="fastest"))


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_listen_text_parses_or_is_one_usage_error(text: str) -> None:
    try:
        host, port = parse_listen(text).sockaddr
    except UsageError as exc:
        assert "bad listen address" in str(exc)
        return
    assert HOST_RE.fullmatch(host) and 0 <= port <= 65535


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8080") == Endpoint("127.0.0.1", 8080)
    assert parse_listen(":80") == Endpoint("0.0.0.0", 80)
    assert parse_listen("[::1]:8080") == Endpoint("::1", 8080)
    assert parse_listen("localhost:80") == Endpoint("localhost", 80)
    for bad in ("8080", "host:", "host:99999", "host:x", "a b:80", "\x00:80", "h:\u0661"):
        with pytest.raises(UsageError):
            parse_listen(bad)


def test_health_drops_a_dead_instance_after_fall_and_brings_it_back_after_rise(
    proxy: Any, servers: list[Server]
) -> None:
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    running = proxy(check_interval=0.1, rise=3, fall=2)
    running.use([a.backend(), b.backend()])
    health = running.proxy.health
    port = b.port
    b.stop()
    wait_until(lambda: [x.id for x in health.up()] == ["a"], TIMEOUT, "b down")
    assert health.checks["b"].failed >= 2
    assert {who(ask(running.address)) for _ in range(6)} == {"a"}
    back = Server("b", port)
    servers.append(back)
    wait_until(lambda: health.checks["b"].ok >= 1, TIMEOUT, "a passed check of b")
    assert not health.checks["b"].up  # one pass is not enough with rise 3
    wait_until(lambda: [x.id for x in health.up()] == ["a", "b"], TIMEOUT, "b up again")
    assert health.checks["b"].ok >= 3
    wait_until(lambda: {who_answers(running.address) for _ in range(4)} == {"a", "b"}, TIMEOUT, "b")


def test_a_new_instance_that_refuses_is_dropped_at_its_first_check(
    proxy: Any, servers: list[Server]
) -> None:
    servers.append(Server("a"))
    running = proxy(check_interval=0.1, fall=1000)  # by fall alone: 100 s
    running.proxy.set_candidates(
        [servers[0].backend(), Backend("dead", "127.0.0.1", closed_port())]
    )
    wait_until(lambda: [x.id for x in running.proxy.health.up()] == ["a"], TIMEOUT, "dead dropped")
    assert running.proxy.health.checks["dead"].failed < 1000  # not by fall: by its first check


def test_an_instance_that_failed_its_first_check_is_in_at_its_first_pass(
    proxy: Any, servers: list[Server]
) -> None:
    """The one rise/fall rule (core/measure.py, as the registry's checks): until an
    instance first passes, one result decides; rise and fall apply after that."""
    servers.append(Server("a"))
    with socket.socket() as probe:  # a port nothing listens on, for now
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    running = proxy(check_interval=0.05, rise=1000, fall=2)  # by rise alone: 50 s
    health = running.proxy.health
    running.proxy.set_candidates([servers[0].backend(), Backend("late", "127.0.0.1", port)])
    wait_until(lambda: [x.id for x in health.up()] == ["a"], TIMEOUT, "late out at first")
    late = Server("late", port)  # it starts listening a moment later
    servers.append(late)
    wait_until(lambda: [x.id for x in health.up()] == ["a", "late"], TIMEOUT, "late in")
    assert health.checks["late"].ok < 1000  # not by rise: by its first pass
    late.stop()
    wait_until(lambda: [x.id for x in health.up()] == ["a"], TIMEOUT, "late down after fall")
    servers.append(Server("late", port))
    wait_until(lambda: health.checks["late"].ok >= 5, TIMEOUT, "late passing again")
    assert [x.id for x in health.up()] == ["a"]  # now rise applies


def test_a_failed_connect_is_retried_on_another_instance(proxy: Any, servers: list[Server]) -> None:
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    running = proxy(check_interval=30, retries=1)  # no check comes to help
    running.use([a.backend(), b.backend()])
    wait_until(lambda: all(c.confirmed for c in running.proxy.health.checks.values()), TIMEOUT)
    b.stop()
    answers = [ask(running.address, b"x") for _ in range(10)]
    assert answers == [b"a:x"] * 10
    assert running.proxy.health.checks["b"].up  # health did not see it yet: retries did it
    slot = running.proxy.planes[0].balancer.get("b")
    assert slot is not None and slot.ejections >= 1  # and its failed connects ejected it
    figures = wait_until(lambda: _settled(running.proxy, 10), TIMEOUT, "10 sessions counted")
    rows = {row["id"]: row for row in figures["backends"]}  # and counted as connect errors
    assert rows["b"]["connect_errors"] >= 1 and rows["b"]["sessions_total"] == 0
    assert rows["a"]["sessions_total"] == 10 and rows["a"]["connect_errors"] == 0


def test_a_connect_that_hangs_is_retried_after_the_connect_timeout(
    proxy: Any, servers: list[Server]
) -> None:
    servers.append(Server("a"))
    stuck = socket.create_server(("127.0.0.1", 0), backlog=0)  # never accepts
    fillers = []
    for _ in range(3):  # fill its accept queue: further SYNs are dropped, connects hang
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(stuck.getsockname())
        fillers.append(filler)
    running = proxy(connect_timeout=0.3, check_interval=30, check_timeout=20)
    hung = Backend("stuck", "127.0.0.1", stuck.getsockname()[1])
    running.use([servers[0].backend(), hung])
    started = time.monotonic()
    assert [ask(running.address, b"x") for _ in range(4)] == [b"a:x"] * 4
    assert time.monotonic() - started >= 0.3  # at least one waited for its connect timeout
    for sock in [stuck, *fillers]:
        sock.close()


def test_connects_failing_at_once_are_retried_at_once(servers: list[Server]) -> None:
    """Two instances nobody can route to (the connect fails in the call), one good one."""
    servers.append(Server("a"))
    listener = socket.create_server(("127.0.0.1", 0))
    control, feed = os.pipe()
    plane = DataPlane(listener, control, Settings(retries=2))
    thread = threading.Thread(target=plane.run, daemon=True)
    thread.start()
    nowhere = [["u1", "10.99.99.1", 9, 1], ["u2", "10.99.99.2", 9, 1]]
    good = [servers[0].name.decode(), "127.0.0.1", servers[0].port, 1]
    os.write(feed, json.dumps({"backends": [*nowhere, good]}).encode() + b"\n")
    wait_until(lambda: len(plane.balancer) == 3, TIMEOUT, "the instances")
    address = listener.getsockname()
    assert [ask(address, b"x") for _ in range(6)] == [b"a:x"] * 6
    assert plane.counts["connect_failed"] >= 2
    os.write(feed, b'{"drain": 0}\n')
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    os.close(feed)
    os.close(control)


def test_an_instance_at_the_proxys_own_address_is_ignored(
    proxy: Any, servers: list[Server]
) -> None:
    # a hostile (or mistaken) record pointing the proxy at itself must not make it
    # connect to itself in a loop until --max-conn and the backlog are full
    servers.append(Server("a"))
    running = proxy(max_conns=8)
    host, port = running.address
    warnings: list[str] = []
    running.proxy.warn = warnings.append
    running.use([servers[0].backend()])  # traffic to a, then the hostile record joins
    running.proxy.set_candidates([servers[0].backend(), Backend("me", host, port)])
    running.proxy.set_candidates([servers[0].backend(), Backend("me", host, port)])
    assert sum("own listen address" in w for w in warnings) == 1  # once, not per change
    assert all(who(ask(running.address)) == "a" for _ in range(20))  # never the loop
    everywhere = TcpProxy(Endpoint("0.0.0.0", 0), Settings())
    everywhere.start()
    try:
        any_port = everywhere.address[1]
        assert everywhere._is_self(Backend("lo", "127.0.0.1", any_port))
        assert not everywhere._is_self(Backend("other", "127.0.0.1", any_port + 1))
        assert not everywhere._is_self(Backend("far", "192.0.2.1", any_port))
    finally:
        everywhere.close()


# every spelling of "this host" an attacker may register, for a listener on port 8080
SELF_SPELLINGS = ["0.0.0.0", "::", "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]",
                  "::ffff:127.0.0.1", "[::ffff:127.0.0.2]", "::ffff:0.0.0.0"]  # fmt: skip


@pytest.fixture
def interface() -> Iterator[tuple[str, str]]:
    """An interface with an IPv4 and an IPv6 address (this test's namespace only)."""
    ip = ["ip", "link", "add", "edalbself0", "type", "veth", "peer", "name", "edalbself1"]
    subprocess.run(ip, check=True, capture_output=True)
    try:
        for args in (["addr", "add", "198.51.100.7/24", "dev", "edalbself0"],
                     ["-6", "addr", "add", "2001:db8::7/64", "dev", "edalbself0", "nodad"],
                     ["link", "set", "edalbself0", "up"], ["link", "set", "edalbself1", "up"]):  # fmt: skip
            subprocess.run(["ip", *args], check=True, capture_output=True)
        yield "198.51.100.7", "2001:db8::7"
    finally:
        subprocess.run(["ip", "link", "del", "edalbself0"], check=False, capture_output=True)


def test_every_spelling_of_this_host_is_recognised(interface: tuple[str, str]) -> None:
    v4, v6 = interface
    every4, every6 = ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")
    lo = ipaddress.ip_address("127.0.0.1")
    for host in [*SELF_SPELLINGS, v4, v6, f"::ffff:{v4}"]:
        assert reaches(every6, 8080, host, 8080), host  # dual stack: every local address
        assert not reaches(every6, 8080, host, 8081), host
    for host in ["0.0.0.0", "127.0.0.2", "::ffff:127.0.0.1", v4, f"::ffff:{v4}"]:
        assert reaches(every4, 8080, host, 8080), host
        assert reaches(None, 8080, host, 8080), host  # haproxy's "*:8080"
    assert not reaches(every4, 8080, "::1", 8080)  # an IPv4 listener never sees IPv6
    for host in ["0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]"]:
        assert reaches(lo, 8080, host, 8080), host  # 0.0.0.0 connects to 127.0.0.1
    assert reaches(ipaddress.ip_address("::1"), 8080, "::", 8080)
    assert reaches(ipaddress.ip_address(v4), 8080, f"::ffff:{v4}", 8080)
    # not this listener: another address, a far one, a name never resolved here
    for host in ["127.0.0.2", "::1", v4, "192.0.2.1", "2001:db8::8", "localhost", "x"]:
        assert not reaches(lo, 8080, host, 8080), host
    for host in ["192.0.2.1", "198.51.100.8", "2001:db8::8", "::ffff:192.0.2.1"]:
        assert not reaches(every6, 8080, host, 8080), host


@pytest.mark.parametrize(
    ("listen", "loops"),
    [("127.0.0.1", ["0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1", "::ffff:0.0.0.0"]),
     ("::", ["0.0.0.0", "::", "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1",
             "::ffff:127.0.0.1", "::ffff:0.0.0.0", "localhost"])],
)  # fmt: skip
def test_no_spelling_of_the_proxys_own_address_makes_a_loop(
    proxy: Any, servers: list[Server], listen: str, loops: list[str]
) -> None:
    # 0.0.0.0:<listen port> at weight 100 once made 10 requests leave ~1,000 TIME-WAIT
    # sockets (each connection proxied to the proxy again)
    servers.append(Server("a"))
    running = proxy(listen, strategy="weighted")
    port = running.address[1]
    warnings: list[str] = []
    running.proxy.warn = warnings.append
    records = [
        {"id": f"me{n}", "host": h, "port": port, "weight": 100, "status": "passing"}
        for n, h in enumerate(loops)
    ]
    hostile = instances_of(records)  # resolved, as the registry feed does
    assert len(hostile) == len(loops)
    running.use([servers[0].backend()])
    running.proxy.set_candidates([servers[0].backend(), *hostile])
    assert sum("own listen address" in w for w in warnings) == len(loops)
    assert [who(ask(running.address)) for _ in range(10)] == ["a"] * 10
    plane = running.proxy.planes[0]
    assert {b.key for b in plane.balancer} == {"a"}
    assert plane.counts["accepted"] == 10  # none of them from the proxy itself


def test_no_instance_closes_the_client_at_once(proxy: Any) -> None:
    running = proxy()
    running.use([])
    with (  # reset, not left to time out (a timeout raises socket.timeout)
        pytest.raises(ConnectionResetError),
        socket.create_connection(running.address, timeout=TIMEOUT) as sock,
    ):
        sock.sendall(b"x")
        read_all(sock)


def test_drain_lets_an_open_connection_finish_and_refuses_new_ones(
    servers: list[Server],
) -> None:
    servers.append(Server("a"))
    running = Running(Settings(check_interval=0.05))
    running.use([servers[0].backend()])
    sock = socket.create_connection(running.address, timeout=TIMEOUT)
    sock.sendall(b"one")
    assert sock.recv(100) == b"a:one"
    running.proxy.drain(10)
    wait_until(lambda: _refused(running.address), TIMEOUT, "the listener to close")
    assert running.thread.is_alive()
    sock.sendall(b"two")
    assert sock.recv(100) == b"a:two"  # the open connection still works
    sock.close()
    running.thread.join(TIMEOUT)
    assert not running.thread.is_alive()  # run() returned once it was done
    running.proxy.close()


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # queued as the listener closed: ask again
        return False
    return False


def test_idle_connections_are_closed_and_busy_ones_kept(proxy: Any, servers: list[Server]) -> None:
    servers.append(Server("a"))
    running = proxy(idle_timeout=0.4)
    running.use([servers[0].backend()])
    quiet = socket.create_connection(running.address, timeout=TIMEOUT)
    busy = socket.create_connection(running.address, timeout=TIMEOUT)
    started = time.monotonic()
    while not readable([quiet], 0.1):  # busy talks while quiet says nothing
        busy.sendall(b"x")
        assert busy.recv(100) == b"a:x"
        assert time.monotonic() - started < 30, "the quiet connection was never closed"
    assert quiet.recv(100) == b""
    assert time.monotonic() - started >= 0.35
    busy.sendall(b"still")
    assert busy.recv(100) == b"a:still"
    quiet.close()
    busy.close()


def test_connections_over_max_conn_wait_in_the_backlog(proxy: Any, servers: list[Server]) -> None:
    servers.append(Server("a"))
    running = proxy(max_conns=2)
    running.use([servers[0].backend()])
    held = [socket.create_connection(running.address, timeout=TIMEOUT) for _ in range(2)]
    for sock in held:
        sock.sendall(b"x")
        assert sock.recv(100) == b"a:x"
    waiting = socket.create_connection(running.address, timeout=TIMEOUT)  # the kernel queues it
    waiting.sendall(b"third")
    assert not readable([waiting], 0.3)  # not served while two are open
    held[0].close()
    waiting.settimeout(TIMEOUT)
    assert waiting.recv(100) == b"a:third"
    for sock in [*held[1:], waiting]:
        sock.close()


def test_hostile_clients_and_resetting_backends_do_not_disturb_others(
    proxy: Any, servers: list[Server]
) -> None:
    good, rude = Server("good"), Server("rude", mode="reset")
    servers.extend([good, rude])
    running = proxy(check_interval=30, max_conns=200)
    running.use([good.backend()])
    garbage = random.Random(5)
    hostile = []
    for n in range(30):
        sock = socket.create_connection(running.address, timeout=TIMEOUT)
        if n % 3 == 0:  # garbage, then a reset
            sock.sendall(garbage.randbytes(2000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()
        elif n % 3 == 1:  # sends a lot and never reads
            sock.setblocking(False)
            try:
                while True:
                    sock.send(b"\xff" * 65536)
            except BlockingIOError:
                pass
            hostile.append(sock)
        else:  # connects and says nothing
            hostile.append(sock)
    assert ask(running.address, b"still there?") == b"good:still there?"
    running.use([rude.backend()])
    for _ in range(5):  # a backend that resets: the client sees an end, never a hang
        try:
            answer = ask(running.address, b"x")
        except TimeoutError:
            raise
        except OSError:  # reset, broken pipe, not connected: an end all the same
            answer = b""
        assert answer == b""
    assert rude.accepted >= 5
    running.use([good.backend()])
    assert ask(running.address, b"ok") == b"good:ok"
    for sock in hostile:
        sock.close()


# -- figures (eda-lb stats) ------------------------------------------------------------------
def _settled(proxy: TcpProxy, sessions_total: int) -> Any:
    """The figures once every connection counted has ended (None before)."""
    figures = proxy.figures()
    counted = sum(b["sessions_total"] for b in figures["backends"])
    open_now = sum(b["sessions"] for b in figures["backends"])
    return figures if counted == sessions_total and open_now == 0 else None


def test_figures_count_the_sessions_and_bytes_of_proxied_connections(
    proxy: Any, servers: list[Server]
) -> None:
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    running = proxy()
    running.use([a.backend(), b.backend(weight=2)])
    sent = received = 0
    for i in range(10):
        text = b"x" * (100 + i)
        answer = ask(running.address, text)
        assert answer.endswith(text)
        sent, received = sent + len(text), received + len(answer)
    figures = wait_until(lambda: _settled(running.proxy, 10), TIMEOUT, "10 sessions counted")
    assert figures["role"] == "proxy" and figures["engine"] == "builtin"
    rows = {row["id"]: row for row in figures["backends"]}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["sessions_total"] == rows["b"]["sessions_total"] == 5  # round robin
    assert sum(r["bytes_in"] for r in rows.values()) == sent
    assert sum(r["bytes_out"] for r in rows.values()) == received
    assert rows["a"]["state"] == rows["b"]["state"] == "up"
    assert (rows["a"]["weight"], rows["b"]["weight"]) == (1, 2)
    assert rows["a"]["address"] == f"127.0.0.1:{a.port}"
    assert rows["a"]["connect_errors"] == rows["b"]["connect_errors"] == 0


def test_figures_count_open_sessions_and_their_bytes(proxy: Any, servers: list[Server]) -> None:
    servers.append(Server("a"))
    running = proxy()
    running.use([servers[0].backend()])
    held = socket.create_connection(running.address, timeout=TIMEOUT)
    held.sendall(b"12345")
    assert held.recv(100) == b"a:12345"

    def counted() -> Any:
        [row] = running.proxy.figures()["backends"]
        return row if row["sessions"] == 1 and row["bytes_in"] == 5 else None

    row = wait_until(counted, TIMEOUT, "the open session")
    assert row["sessions_total"] == 1 and row["bytes_out"] == 7
    held.close()


def test_figures_show_an_instance_whose_checks_fail_down_and_its_connect_errors(
    proxy: Any, servers: list[Server]
) -> None:
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    running = proxy(check_interval=0.1, fall=2)
    running.use([a.backend(), b.backend()])
    b.stop()

    def states() -> dict[str, str]:
        return {row["id"]: row["state"] for row in running.proxy.figures()["backends"]}

    wait_until(lambda: states() == {"a": "up", "b": "down"}, TIMEOUT, "b down")
    assert {who(ask(running.address)) for _ in range(4)} == {"a"}


def test_data_plane_processes_report_their_figures_and_the_proxy_sums_them(
    servers: list[Server],
) -> None:
    servers.append(Server("a"))
    proxy = TcpProxy(Endpoint("127.0.0.1", 0), Settings(workers=2, check_interval=0.05))
    proxy.start()
    proxy.set_candidates([servers[0].backend()])
    thread = threading.Thread(target=proxy.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(proxy.dataplanes.pids) == 2, TIMEOUT, "two data planes")
        wait_until(lambda: ask(proxy.address) == b"a:ping", TIMEOUT, "traffic to a")
        for _ in range(19):
            assert ask(proxy.address, b"ping") == b"a:ping"
        figures = wait_until(lambda: _settled(proxy, 20), TIMEOUT, "20 sessions counted")
        [row] = figures["backends"]
        assert (row["bytes_in"], row["bytes_out"]) == (20 * 4, 20 * 6)
        assert figures["data_planes"] == figures["answered"] == 2
    finally:
        proxy.drain(0)
        thread.join(10)
        proxy.close()


# -- the CLI, end to end -------------------------------------------------------------------
FAST = ("--interval", "0.2", "--ttl", "0.8")


def lb(procs: Procs, *args: str) -> tuple[Proc, tuple[str, int]]:
    proc = procs.start([*command("eda-lb"), "tcp", "-v", *args])
    where = proc.wait_stderr(r"proxying (\S+):(\d+) to")  # (a deadline for a loaded machine)
    return proc, (where.group(1), int(where.group(2)))


def registry(procs: Procs) -> str:
    reg = procs.eda("eda-registry", "serve", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                    "--tick", "0.1")  # fmt: skip
    return reg.wait_stderr(r"listening on (tcp://\S+)").group(1)


def register(procs: Procs, endpoint: str, server: Server) -> Proc:
    proc = procs.eda("eda-registry", "register", "-v", "web", "--port", str(server.port),
                     "--host", "127.0.0.1", "--id", server.name.decode(), "--registry",
                     endpoint, "--no-mdns", *FAST)  # fmt: skip
    proc.wait_stderr(r"registered \S+ at", 30)  # a deadline for a loaded machine
    return proc


def test_cli_follows_registry_changes_while_clients_stay_connected(
    procs: Procs, servers: list[Server]
) -> None:
    a, b, c = Server("a"), Server("b"), Server("c")
    servers.extend([a, b, c])
    endpoint = registry(procs)
    reg_a = register(procs, endpoint, a)
    reg_b = register(procs, endpoint, b)
    proc, address = lb(procs, "--listen", "127.0.0.1:0", "web", "--registry", endpoint,
                       "--no-mdns", "--workers", "1", "--check-interval", "0.1")  # fmt: skip
    proc.wait_stderr(r"2 instance\(s\) up: a, b")
    assert {who(ask(address)) for _ in range(4)} == {"a", "b"}
    held = socket.create_connection(address, timeout=TIMEOUT)
    held.sendall(b"1")
    first = held.recv(100)
    reg_c = register(procs, endpoint, c)
    proc.wait_stderr(r"3 instance\(s\) up: a, b, c")
    assert {who(ask(address)) for _ in range(6)} == {"a", "b", "c"}
    gone = reg_a if who(first) == "b" else reg_b  # deregister the one the held client is not on
    gone.signal(signal.SIGTERM)
    assert gone.wait() == 0
    left = {"a", "b", "c"} - {"a" if gone is reg_a else "b"}
    proc.wait_stderr(r"2 instance\(s\) up: " + ", ".join(sorted(left)))
    assert {who(ask(address)) for _ in range(6)} == left
    held.sendall(b"2")
    assert held.recv(100) == first[:2] + b"2"  # the held client kept its connection
    held.close()
    reg_c.signal(signal.SIGTERM)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_cli_restarts_a_dead_data_plane_and_drains_on_sigterm(
    procs: Procs, servers: list[Server]
) -> None:
    servers.append(Server("a"))
    endpoint = registry(procs)
    register(procs, endpoint, servers[0])
    proc, address = lb(procs, "--listen", "127.0.0.1:0", "web", "--registry", endpoint,
                       "--no-mdns", "--workers", "2", "--drain-timeout", "20")  # fmt: skip
    proc.wait_stderr(r"1 instance\(s\) up: a")
    planes = wait_until(
        lambda: len(children_of(proc.popen.pid)) == 2 and children_of(proc.popen.pid)
    )
    os.kill(int(planes[0].split(":")[0]), signal.SIGKILL)  # a data plane dies: another replaces it
    proc.wait_stderr("starting another")
    wait_until(lambda: len(set(children_of(proc.popen.pid)) - set(planes)) == 1, TIMEOUT)
    assert [who(ask(address)) for _ in range(20)] == ["a"] * 20
    held = socket.create_connection(address, timeout=TIMEOUT)
    held.sendall(b"before")
    assert held.recv(100) == b"a:before"
    proc.signal(signal.SIGTERM)
    wait_until(lambda: _refused(address), TIMEOUT, "no new connection accepted")
    held.sendall(b"during")
    assert held.recv(100) == b"a:during"
    assert proc.popen.poll() is None
    held.close()
    assert proc.wait(10) == 0
    assert "drained" in proc.stderr


def test_data_planes_are_fresh_interpreters_never_forks_of_the_threaded_proxy(
    procs: Procs, servers: list[Server]
) -> None:
    """A fork of a process running threads (the registry feed, zeroconf's) inherits
    any lock one of them holds: data planes are started as new interpreters, at the
    start and when one is replaced while the registry feed runs."""
    servers.append(Server("a"))
    endpoint = registry(procs)
    register(procs, endpoint, servers[0])
    proc, address = lb(procs, "--listen", "127.0.0.1:0", "web", "--registry", endpoint,
                       "--no-mdns", "--workers", "2")  # fmt: skip
    proc.wait_stderr(r"1 instance\(s\) up: a")
    pid = proc.popen.pid
    assert len(os.listdir(f"/proc/{pid}/task")) > 1  # the proxy runs threads now
    planes = wait_until(lambda: len(children_of(pid)) == 2 and children_of(pid))
    os.kill(int(planes[0].split(":")[0]), signal.SIGKILL)
    proc.wait_stderr("starting another")
    wait_until(lambda: len(set(children_of(pid)) - set(planes)) == 1, TIMEOUT)
    now = children_of(pid)
    assert len(now) == 2 and set(now) != set(planes)
    for plane in now:
        argv = Path(f"/proc/{plane.split(':')[0]}/cmdline").read_bytes().split(b"\0")
        assert argv[0] == sys.executable.encode() and b"eda.core.lb.dataplane" in argv, argv
    assert [who(ask(address)) for _ in range(10)] == ["a"] * 10
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_a_data_plane_process_warns_through_the_proxy() -> None:
    """A data-plane process's warnings come back to the proxy and are said by its warn."""
    warned: list[str] = []
    proxy = TcpProxy(Endpoint("127.0.0.1", 0), Settings(workers=1), warn=warned.append)
    proxy.start()
    proxy.set_candidates([])
    thread = threading.Thread(target=proxy.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(proxy.dataplanes.pids) == 1, TIMEOUT, "a data plane")
        with (  # nothing behind: reset at once
            pytest.raises(ConnectionResetError),
            socket.create_connection(proxy.address, timeout=TIMEOUT) as client,
        ):
            client.sendall(b"x")
            read_all(client)
        wait_until(lambda: "no instance is up: connection refused" in warned, TIMEOUT)
    finally:
        proxy.drain(0)
        thread.join(10)
        proxy.close()


def test_cli_refuses_bad_options(procs: Procs, tmp_path: Path) -> None:
    def lb_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command("eda-lb"), "tcp", *args],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    bad = lb_run("--listen", "nowhere", "web", "--no-mdns", "--registry", "tcp://127.0.0.1:1")
    assert bad.returncode == 2 and "bad listen address" in bad.stderr
    bad = lb_run("--listen", ":1", "Bad_Name!", "--no-mdns")
    assert bad.returncode == 2 and "error:" in bad.stderr
    held = socket.create_server(("127.0.0.1", 0))
    taken = lb_run("--listen", f"127.0.0.1:{held.getsockname()[1]}", "web", "--no-mdns",
                   "--registry", "tcp://127.0.0.1:1")  # fmt: skip
    held.close()
    assert taken.returncode == 1 and "cannot listen" in taken.stderr, taken.stderr
    alone = lb_run("--listen", "127.0.0.1:0", "web", "--no-mdns")  # no registry, no mDNS
    assert alone.returncode != 0 and alone.stderr.strip().splitlines()[-1].startswith(
        "eda-lb: error: "
    ), alone.stderr
    assert "Traceback" not in alone.stderr


def test_cli_started_before_its_registry_waits_for_it(procs: Procs, servers: list[Server]) -> None:
    servers.append(Server("a"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    proc, address = lb(procs, "--listen", "127.0.0.1:0", "web", "--registry", endpoint,
                       "--no-mdns", "--workers", "1")  # fmt: skip
    proc.wait_stderr("still trying")
    reg = procs.eda("eda-registry", "serve", "-v", "--no-mdns", "--bind", endpoint, "--tick", "0.1")
    reg.wait_stderr("listening on")
    register(procs, endpoint, servers[0])
    proc.wait_stderr(r"1 instance\(s\) up: a")
    assert ask(address) == b"a:ping"
    planes = [int(p.split(":")[0]) for p in children_of(proc.popen.pid)]
    assert len(planes) == 1
    os.kill(proc.popen.pid, signal.SIGKILL)  # the data planes see their control pipe close
    wait_until(lambda: not any(_alive(pid) for pid in planes), TIMEOUT, "data planes to exit")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_cli_serverless_finds_instances_by_mdns(procs: Procs, servers: list[Server]) -> None:
    servers.append(Server("a"))
    procs.eda("eda-registry", "register", "web", "--port", str(servers[0].port), "--host",
              "127.0.0.1", "--id", "a", "--serverless", "--interval", "0.5")  # fmt: skip
    proc, address = lb(procs, "--listen", "127.0.0.1:0", "web", "--serverless", "--workers", "1")
    proc.wait_stderr(r"1 instance\(s\) up: a", 20)
    assert ask(address) == b"a:ping"


def test_cli_haproxy_engine_follows_the_registry(procs: Procs, servers: list[Server]) -> None:
    require_tools("haproxy", install="haproxy")
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    endpoint = registry(procs)
    reg_a = register(procs, endpoint, a)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, address = lb(procs, "--listen", f"127.0.0.1:{port}", "web", "--engine", "haproxy",
                       "--registry", endpoint, "--no-mdns", "--check-interval", "0.2",
                       "--drain-timeout", "10")  # fmt: skip
    assert address == ("127.0.0.1", port)
    assert ask(address) == b"a:ping"
    held = socket.create_connection(address, timeout=TIMEOUT)
    held.sendall(b"1")
    assert held.recv(100) == b"a:1"
    register(procs, endpoint, b)
    wait_until(lambda: {who_answers(address) for _ in range(4)} == {"a", "b"}, TIMEOUT, "b in")
    reg_a.signal(signal.SIGTERM)  # a deregisters: new connections go to b only
    wait_until(lambda: {who_answers(address) for _ in range(4)} == {"b"}, TIMEOUT, "a out")
    held.sendall(b"2")
    assert held.recv(100) == b"a:2"  # no restart: the open connection to a goes on
    held.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stats_rows(endpoint: str) -> dict[str, dict[str, Any]]:
    """eda-lb stats web, piped: its JSON Lines by instance ({} while it fails)."""
    done = subprocess.run([*command("eda-lb"), "stats", "web", "--registry",
                           endpoint, "--no-mdns"], capture_output=True, text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        return {}
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["instance"]: row for row in rows}


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
def test_cli_stats_show_a_proxys_sessions_bytes_and_health(
    procs: Procs, servers: list[Server], engine: str
) -> None:
    if engine == "haproxy":
        require_tools("haproxy", install="haproxy")
    a, b = Server("a"), Server("b")
    servers.extend([a, b])
    endpoint = registry(procs)
    register(procs, endpoint, a)
    register(procs, endpoint, b)
    proc, address = lb(procs, "--listen", f"127.0.0.1:{_free_port()}", "web", "--registry", endpoint, "--no-mdns",
                       "--workers", "2", "--engine", engine, "--check-interval", "0.1",
                       "--fall", "2")  # fmt: skip
    wait_until(lambda: {who_answers(address) for _ in range(4)} == {"a", "b"}, TIMEOUT, "a and b")
    before = _stats_rows(endpoint)  # what the checks above sent
    n, sent, received = 10, 0, 0
    for i in range(n):
        text = b"y" * (50 + i)
        answer = ask(address, text)
        sent, received = sent + len(text), received + len(answer)
    total = sum(row["sessions_total"] for row in before.values()) + n

    def settled() -> dict[str, dict[str, Any]]:
        rows = _stats_rows(endpoint)
        done = sum(row["sessions_total"] for row in rows.values()) == total
        return rows if done and not any(row["sessions"] for row in rows.values()) else {}

    rows = wait_until(settled, 15, f"{total} sessions counted")
    assert set(rows) == {"a", "b"}

    def moved(key: str) -> int:
        return sum(r[key] for r in rows.values()) - sum(r[key] for r in before.values())

    assert (moved("bytes_in"), moved("bytes_out")) == (sent, received)
    assert {row["state"] for row in rows.values()} == {"up"}
    assert all(row["weight"] == 1 for row in rows.values())
    assert all(row["source"].startswith("proxy ") for row in rows.values())
    b.stop()  # its checks fail: down
    wait_until(lambda: _stats_rows(endpoint).get("b", {}).get("state") == "down", 15, "b down")
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_cli_haproxy_engine_names_its_runtime_socket_without_verbose(
    procs: Procs, servers: list[Server]
) -> None:
    require_tools("haproxy", install="haproxy")
    servers.append(Server("a"))
    endpoint = registry(procs)
    register(procs, endpoint, servers[0])
    proc = procs.start([*command("eda-lb"), "tcp", "--listen",
                        f"127.0.0.1:{_free_port()}", "web", "--engine", "haproxy",
                        "--registry", endpoint, "--no-mdns"])  # fmt: skip
    found = proc.wait_stderr(r"runtime API: (\S+)", 15)
    assert Path(found.group(1)).is_socket()
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_a_proxys_figures_as_a_table_keep_every_number_whole_at_80_columns() -> None:
    from rich.console import Console

    from eda.cli.lbstats import _proxy_rows, _proxy_table

    answer = {
        "backends": [
            {"id": "web-127-0-0-1-8001", "address": "127.0.0.1:8001", "state": "up",
             "weight": 3, "sessions": 1, "sessions_total": 612, "bytes_in": 48960,
             "bytes_out": 9345612, "connect_errors": 0},
            {"id": "\x1b[31mevil", "state": "down", "bytes_in": "many"},  # a hostile peer
        ]
    }  # fmt: skip
    rows = _proxy_rows("web", "web-192-168-1-20-41123", answer)
    assert rows[1]["bytes_in"] is None  # not a number: shown as —, never as the peer sent it
    for width in (130, 80):
        console = Console(width=width, color_system=None, record=True)
        console.print(_proxy_table.draw(rows, width))
        text = console.export_text()
        assert "\x1b" not in text and "proxy web-192-168-1-20-41123" in text
        assert all(len(line.rstrip()) <= width for line in text.splitlines())
        first = next(line for line in text.splitlines() if "8001" in line or "-8001" in line)
        assert {"612", "48960", "up"} <= set(first.split())

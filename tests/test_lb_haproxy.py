"""eda-lb's HAProxy data plane (core/lb/haproxy.py) against a real haproxy.

The backends are small line servers in this process (each answers every line
with its own name), so a test sees which instance HAProxy picked.  haproxy
comes from the Debian package (scripts/install-deps): without it these tests
fail, naming the package.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import socketserver
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core.errors import EdaError, UsageError
from eda.core.lb.haproxy import STRATEGIES, HaproxyEngine, Server, ServerState, server_name
from tests.helpers import Procs, require_tools, wait_until

pytestmark = pytest.mark.usefixtures("procs")  # no process may be left behind


@pytest.fixture(autouse=True)
def _haproxy_installed() -> None:
    require_tools("haproxy", install="haproxy")


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        name: bytes = self.server.name  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            for _line in self.rfile:
                self.wfile.write(name + b"\n")
                self.wfile.flush()


class Backend(socketserver.ThreadingTCPServer):
    """A TCP service on 127.0.0.1 that answers each line with its name."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.name = name.encode()
        self.port = int(self.server_address[1])
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    made: dict[str, Backend] = {}
    yield made
    for b in made.values():
        with contextlib.suppress(OSError):
            b.close()


@pytest.fixture
def engines() -> Iterator[list[HaproxyEngine]]:
    made: list[HaproxyEngine] = []
    yield made
    for e in made:
        e.stop(drain=False)
        assert not e.alive()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    """A client connection through the proxy; ask() sends a line, returns the answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def ask(self) -> str:
        self.sock.sendall(b"hi\n")
        return self.file.readline().decode().strip()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def ask(port: int) -> str:
    conn = Conn(port)
    try:
        return conn.ask()
    finally:
        conn.close()


def engine_for(
    engines: list[HaproxyEngine], strategy: str = "weighted", **kw: Any
) -> HaproxyEngine:
    kw.setdefault("check_interval", 0.1)
    kw.setdefault("rise", 2)
    kw.setdefault("fall", 2)
    eng = HaproxyEngine("127.0.0.1", free_port(), strategy, **kw)
    engines.append(eng)
    return eng


def port_of(eng: HaproxyEngine) -> int:
    return int(eng._bind.rsplit(":", 1)[1])


def by_id(eng: HaproxyEngine) -> dict[str, ServerState]:
    return {s.id: s for s in eng.servers()}


def test_update_adds_removes_reweights_without_restart(
    engines: list[HaproxyEngine], backends: dict[str, Backend]
) -> None:
    for name in "ABC":
        backends[name] = Backend(name)
    a, b, c = (backends[n] for n in "ABC")
    logs: list[str] = []
    eng = engine_for(engines, log=logs.append)
    eng.start([Server("a", "127.0.0.1", a.port), Server("b", "127.0.0.1", b.port)])
    port, pid = port_of(eng), eng.pid
    config = eng.config_path.read_text()
    assert "balance roundrobin" in config and "level admin" in config
    assert config.count("check inter 100ms rise 2 fall 2") == 2
    assert set(Counter(ask(port) for _ in range(10))) == {"A", "B"}

    # a keep-alive connection that landed on B
    kept: Conn | None = None
    for _ in range(10):
        conn = Conn(port)
        if conn.ask() == "B":
            kept = conn
            break
        conn.close()
    assert kept is not None

    eng.update([Server("a", "127.0.0.1", a.port, weight=3), Server("c", "127.0.0.1", c.port)])
    # applied when update() returns: no B for new connections, C in, A weighted 3:1
    hits = Counter(ask(port) for _ in range(40))
    assert hits["B"] == 0 and hits["C"] >= 5 and hits["A"] >= 2 * hits["C"], hits
    state = by_id(eng)
    assert state["a"].weight == 3 and state["c"].weight == 1
    config = eng.config_path.read_text()  # kept in step for whoever reads it
    assert f"127.0.0.1:{c.port} weight 1" in config and f":{b.port} " not in config
    assert state["b"].status == "MAINT" and state["b"].sessions == 1
    assert kept.ask() == "B"  # the open connection to the removed instance still works
    assert eng.pid == pid and eng.alive()

    # B comes back while its old connection still drains: the same server is used again
    eng.update(
        [
            Server("a", "127.0.0.1", a.port, weight=3),
            Server("b", "127.0.0.1", b.port),
            Server("c", "127.0.0.1", c.port),
        ]
    )
    assert by_id(eng)["b"].status.startswith("UP")
    assert "B" in {ask(port) for _ in range(12)}

    eng.update([Server("a", "127.0.0.1", a.port), Server("c", "127.0.0.1", c.port)])
    assert kept.ask() == "B"
    kept.close()
    # once its last connection ended, the removed server is deleted from HAProxy
    wait_until(lambda: "b" not in by_id(eng), 5, "the drained server to be deleted")
    assert set(by_id(eng)) == {"a", "c"}
    assert eng.pid == pid
    assert any("removed 'b'" in line for line in logs), logs


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_serves_and_takes_new_servers(
    strategy: str, engines: list[HaproxyEngine], backends: dict[str, Backend]
) -> None:
    a, b = backends["A"], backends["B"] = Backend("A"), Backend("B")
    eng = engine_for(engines, strategy)
    eng.start([Server("a", "127.0.0.1", a.port)])
    assert f"balance {STRATEGIES[strategy]}\n" in eng.config_path.read_text()
    port = port_of(eng)
    assert ask(port) == "A"
    eng.update([Server("a", "127.0.0.1", a.port), Server("b", "127.0.0.1", b.port)])
    seen = {ask(port) for _ in range(40)}
    assert seen == {"A", "B"}


def test_health_checks_drop_a_dead_backend_and_take_it_back(
    engines: list[HaproxyEngine], backends: dict[str, Backend]
) -> None:
    a, b = backends["A"], backends["B"] = Backend("A"), Backend("B")
    eng = engine_for(engines, "round-robin")
    eng.start([Server("a", "127.0.0.1", a.port), Server("b", "127.0.0.1", b.port)])
    port = port_of(eng)
    assert {ask(port) for _ in range(6)} == {"A", "B"}
    b.close()
    # before the checks notice, a refused connect is retried on the other instance
    assert [ask(port) for _ in range(6)] == ["A"] * 6
    wait_until(lambda: by_id(eng)["b"].status.startswith("DOWN"), 5, "B to be marked DOWN")
    assert {ask(port) for _ in range(10)} == {"A"}
    backends["B2"] = Backend("B", port=b.port)
    wait_until(lambda: by_id(eng)["b"].status == "UP", 5, "B to be UP again")
    assert "B" in {ask(port) for _ in range(6)}


HOSTILE_IDS = [
    "web\nshow info",
    "x; disable frontend eda_in",
    "a b c weight 0",
    "../../etc/passwd",
    "#1",
    "eda/other",
    "é漢字\x00\x1b[31m",
    "",
    "y" * 5000,
    "dup",
]


def test_hostile_ids_and_records_cannot_inject(
    engines: list[HaproxyEngine], backends: dict[str, Backend]
) -> None:
    a = backends["A"] = Backend("A")
    logs: list[str] = []
    eng = engine_for(engines, log=logs.append)
    first, rest = HOSTILE_IDS[:5], HOSTILE_IDS[5:]
    eng.start([Server(i, "127.0.0.1", a.port) for i in first])  # through the config file
    port = port_of(eng)
    update = (
        [Server(i, "127.0.0.1", a.port) for i in first + rest]  # through the Runtime API
        + [
            Server("dup", "127.0.0.1", a.port),  # same id twice: the first one counts
            Server("bad-host", "127.0.0.1 check\nshow info", a.port),
            Server("bad-host2", "1.2.3.4; del server eda/x", a.port),
            Server("bad-port", "127.0.0.1", 70000),
            Server("bad-port2", "127.0.0.1", 0),
            Server("neg", "127.0.0.1", a.port, weight=-5),
            Server("huge", "127.0.0.1", a.port, weight=10**9),
        ]
    )
    eng.update(update)
    eng.update(update)  # the same refused records again: logged once, not at every update
    state = by_id(eng)
    assert set(state) == {*HOSTILE_IDS, "neg", "huge"}
    for s in state.values():
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", s.name), s.name
        assert s.status.startswith("UP") and s.address == f"127.0.0.1:{a.port}"
    assert state["neg"].weight == 0 and state["huge"].weight == 256
    for bad in ("dup", "bad-host", "bad-host2", "bad-port", "bad-port2"):
        assert sum(repr(bad) in line and "left out" in line for line in logs) == 1, (bad, logs)
    assert "\nshow info" not in eng.config_path.read_text()
    # nothing was injected: the frontend still serves, no other server exists
    assert ask(port) == "A"
    assert len(eng.servers()) == len(HOSTILE_IDS) + 2
    # names are distinct even when ids clean to the same text, and stable
    assert server_name("a b", "h", 1) != server_name("a_b", "h", 1)
    assert state["neg"].name == server_name("neg", "127.0.0.1", a.port)  # what haproxy serves
    assert server_name("a", "h", 1) != server_name("a", "h", 2)
    eng.update([Server("plain", "127.0.0.1", a.port)])
    wait_until(lambda: set(by_id(eng)) == {"plain"}, 5, "hostile servers to be deleted")
    assert ask(port) == "A"


def test_errors_are_one_line(engines: list[HaproxyEngine]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        eng = HaproxyEngine("127.0.0.1", busy, "round-robin")
        engines.append(eng)
        with pytest.raises(EdaError) as info:
            eng.start([])
        message = str(info.value)
        assert "\n" not in message and "cannot bind" in message, message
        assert not eng.alive()
    missing = HaproxyEngine("127.0.0.1", free_port(), "p2c", binary="/nonexistent/haproxy")
    with pytest.raises(EdaError, match="install HAProxy") as info:
        missing.start([])
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="unknown strategy"):
        HaproxyEngine("127.0.0.1", 8080, "fastest")
    with pytest.raises(UsageError, match="idle timeout"):
        HaproxyEngine("127.0.0.1", 8080, "random", idle_timeout=float("nan"))
    with pytest.raises(UsageError, match="listen address"):
        HaproxyEngine("no such host!", 8080, "random")
    odd = HaproxyEngine("127.0.0.1", 8080, "random", workdir='/tmp/x y\n"stats socket')
    with pytest.raises(UsageError, match="work directory"):
        odd.start([])
    with pytest.raises(EdaError, match="not started"):
        HaproxyEngine("127.0.0.1", 8080, "random").update([])


def test_drain_on_stop_and_dead_haproxy_is_reported(
    engines: list[HaproxyEngine], backends: dict[str, Backend], tmp_path: Path
) -> None:
    a = backends["A"] = Backend("A")
    eng = engine_for(engines, idle_timeout=86400.0 * 365)  # capped at HAProxy's ~24 days
    eng.start([Server("a", "127.0.0.1", a.port)])
    assert "timeout client 2147483647ms" in eng.config_path.read_text()
    port = port_of(eng)
    conn = Conn(port)
    assert conn.ask() == "A"
    stopper = threading.Thread(target=eng.stop, kwargs={"drain": True})
    stopper.start()

    def refused() -> bool:
        try:
            ask(port)
        except OSError:
            return True
        return False

    wait_until(refused, 5, "haproxy to close its listener")
    assert conn.ask() == "A"  # the open connection is served until it ends
    assert stopper.is_alive() and eng.alive()
    conn.close()
    stopper.join(10)
    assert not stopper.is_alive() and not eng.alive()

    crashed = engine_for(engines, workdir=str(tmp_path / "hap"))  # a directory of one's own
    crashed.start([Server("a", "127.0.0.1", a.port)])
    assert crashed.socket_path == tmp_path / "hap" / "admin.sock" and crashed.socket_path.exists()
    assert crashed.pid is not None
    crashed._proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    crashed._proc.wait(5)  # type: ignore[union-attr]
    with pytest.raises(EdaError, match="haproxy exited"):
        crashed.update([])
    crashed.stop()
    assert (tmp_path / "hap" / "haproxy.cfg").exists()  # kept: it is not the engine's to remove


def test_connections_to_a_removed_server_end_after_the_drain_timeout(
    engines: list[HaproxyEngine], backends: dict[str, Backend]
) -> None:
    a, b = backends["A"], backends["B"] = Backend("A"), Backend("B")
    eng = engine_for(engines, "round-robin", drain_timeout=0.5)
    eng.start([Server("a", "127.0.0.1", a.port)])
    conn = Conn(port_of(eng))
    assert conn.ask() == "A"
    eng.update([Server("b", "127.0.0.1", b.port)])
    assert conn.ask() == "A"  # still served while it drains
    wait_until(lambda: "a" not in by_id(eng), 5, "the drained server to be deleted")
    try:  # its session was shut when the drain time was up
        answer = conn.ask()
    except OSError:
        answer = ""
    assert answer == ""
    conn.close()
    assert ask(port_of(eng)) == "B"


def test_haproxy_does_not_outlive_a_killed_owner(procs: Procs, tmp_path: Path) -> None:
    owner = procs.start(
        [sys.executable, "-c",
         "import sys, time\n"
         "from eda.core.lb.haproxy import HaproxyEngine\n"
         f"e = HaproxyEngine('127.0.0.1', {free_port()}, 'random', workdir={str(tmp_path)!r})\n"
         "e.start([])\n"
         "print(e.pid, flush=True)\n"
         "time.sleep(60)\n"]
    )  # fmt: skip
    pid = int(owner.wait_lines(1, 15)[0])
    assert _running(pid)
    owner.signal(signal.SIGKILL)
    wait_until(lambda: not _running(pid), 5, "haproxy to end with its owner")


def test_haproxy_is_started_without_python_code_between_fork_and_exec(
    engines: list[HaproxyEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """eda-lb runs threads (the registry feed) when it starts HAProxy: a preexec_fn would
    run Python in a fork of a threaded process, where a lock another thread held is never
    released; the parent-death signal is set by setpriv instead (the test above)."""
    import subprocess

    started: list[dict[str, Any]] = []
    popen = subprocess.Popen

    def spy(*args: Any, **kw: Any) -> Any:
        started.append(kw)
        return popen(*args, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    eng = HaproxyEngine("127.0.0.1", free_port(), "random")
    engines.append(eng)
    eng.start([])
    assert eng.alive() and started
    assert all(kw.get("preexec_fn") is None for kw in started), started


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=100),
            st.one_of(st.ip_addresses().map(str), st.text(alphabet=" ;\n#/[]:.0123456789")),
            st.integers(-(2**70), 2**70),
            st.integers(-(2**70), 2**70),
        ),
        max_size=8,
    )
)
def test_property_any_record_gives_safe_names_and_addresses(
    records: list[tuple[str, str, int, int]],
) -> None:
    """Whatever a registration carries, a target is either left out (logged) or has a
    name and an address that HAProxy reads as one token each; nothing raises."""
    logs: list[str] = []
    eng = HaproxyEngine("127.0.0.1", 8080, "weighted", log=logs.append)
    targets = eng._targets([Server(i, h, p, w) for i, h, p, w in records])
    for t in targets:
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", t.name)
        assert re.fullmatch(r"(ipv6@[0-9a-f:.]+|[0-9.]+):\d{1,5}", t.endpoint), t.endpoint
        assert 0 <= t.weight <= 256
    assert len({t.name for t in targets}) == len(targets)
    assert len(targets) + len(logs) >= len({r[0] for r in records})
    assert all("\n" not in line for line in logs)


def test_cli_engine_haproxy_keeps_one_haproxy_and_drains_on_sigterm(
    procs: Procs, backends: dict[str, Backend]
) -> None:
    """eda-lb tcp --engine haproxy end to end: registry changes reach HAProxy without a
    restart, an open connection survives its instance's removal and the SIGTERM drain."""
    from eda.core.registry.client import Client

    a, b = backends["A"], backends["B"] = Backend("A"), Backend("B")
    registry = procs.eda(
        "eda-registry", "serve", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "--tick", "0.1"
    )
    endpoint = registry.wait_stderr(r"listening on (tcp://\S+)").group(1)
    client = Client([endpoint], use_mdns=False, timeout=5.0)

    def register(inst_id: str, port: int, weight: int = 1) -> None:
        record = {"service": "web", "id": inst_id, "host": "127.0.0.1", "port": port,
                  "weight": weight, "ttl": 600.0, "interval": 200.0}  # fmt: skip
        client.request({"op": "register", "instance": record})

    def answer(port: int) -> str:
        try:
            return ask(port)
        except OSError:
            return ""

    try:
        register("web-a", a.port)
        port = free_port()
        lb = procs.start(
            [sys.executable, "-m", "eda.cli.lb", "tcp", "--listen", f"127.0.0.1:{port}", "web",
             "--engine", "haproxy", "--strategy", "weighted", "--check-interval", "0.1",
             "--registry", endpoint, "--no-mdns", "-v"]
        )  # fmt: skip
        wait_until(lambda: answer(port) == "A", 15, "eda-lb to proxy to A")
        pid = int(lb.wait_stderr(r"haproxy \S+ started \(pid (\d+)").group(1))
        kept = Conn(port)
        assert kept.ask() == "A"

        register("web-b", b.port, weight=3)
        wait_until(lambda: answer(port) == "B", 5, "the new instance to get connections")
        client.request({"op": "deregister", "id": "web-a"})
        wait_until(lambda: {answer(port) for _ in range(6)} == {"B"}, 5, "A to be taken out")
        assert kept.ask() == "A"  # its open connection goes on
        assert os.path.exists(f"/proc/{pid}") and lb.stderr.count(" started (pid ") == 1

        lb.signal(signal.SIGTERM)
        wait_until(lambda: answer(port) == "", 5, "the listener to close on SIGTERM")
        assert kept.ask() == "A"  # drained, not cut
        kept.close()
        assert lb.wait(15) == 0
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        client.close()


def test_an_instance_at_haproxys_own_listen_address_is_left_out() -> None:
    """A record pointing haproxy at its own frontend would make it connect to itself
    in a loop until maxconn is full: it is left out, with one line."""
    logs: list[str] = []
    eng = HaproxyEngine("127.0.0.1", 8080, "round-robin", log=logs.append)
    records = [Server("me", "127.0.0.1", 8080), Server("ok", "127.0.0.1", 8081)]
    assert [t.server.id for t in eng._targets(records)] == ["ok"]
    assert any("own listen address" in line for line in logs)
    everywhere = HaproxyEngine("0.0.0.0", 8080, "round-robin", log=logs.append)
    local, far = Server("lo", "127.0.0.1", 8080), Server("far", "192.0.2.1", 8080)
    assert [t.server.id for t in everywhere._targets([local, far])] == ["far"]


def test_no_spelling_of_haproxys_own_address_is_served() -> None:
    """0.0.0.0:<listen port> at weight 100 once made 10 requests leave 935 TIME-WAIT
    sockets: every spelling of this host at the listen port is left out."""
    logs: list[str] = []
    spellings = ["0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]"]
    eng = HaproxyEngine("127.0.0.1", 8080, "weighted", log=logs.append)
    records = [Server(f"me{n}", h, 8080, 100) for n, h in enumerate(spellings)]
    ok = [Server("ok", "127.0.0.1", 8081), Server("lo2", "127.0.0.2", 8080)]
    assert [t.server.id for t in eng._targets([*records, *ok])] == ["ok", "lo2"]
    assert sum("own listen address" in line for line in logs) == len(records)
    everywhere = HaproxyEngine("::", 8080, "weighted", log=logs.append)
    local = [*spellings, "::", "::1", "[::1]", "127.0.0.2", "127.9.9.9", "localhost"]
    records = [Server(f"me{n}", h, 8080, 100) for n, h in enumerate(local)]
    far = Server("far", "192.0.2.1", 8080)
    assert [t.server.id for t in everywhere._targets([*records, far])] == ["far"]
    v4 = HaproxyEngine("*", 8080, "weighted", log=logs.append)
    assert [t.server.id for t in v4._targets([*records[:4], far])] == ["far"]

"""A one-shot client never hangs: whatever its server does, it exits non-zero with one
line at about its timeout (CONVENTIONS: a client looks again, then gives up).

Each one-shot client is run against three servers that will not serve it:

- *untrusting*: the real daemon in secure mode, which does not trust the client's key
  (mallory's): the client is refused at once, with the one-line refusal;
- *black hole*: a TCP listener that accepts connections and never says a byte;
- *stopped*: the real daemon, SIGSTOPped (the kernel still completes TCP connections).

The subprocess timeout is the client's own timeout plus :data:`HANG`: a hang check,
not a speed bound.  ``eda-txn status`` is not here: it reads journals, never the
network.  The daemons are started once per module (lazily), as each case needs them.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from eda.core.endpoint import Endpoint
from eda.core.reqrep import Client, given
from eda.core.sockets import connect
from eda.core.txn.journal import open_journal
from tests.helpers import PROGRAMS, Identity, Proc, Procs, run, trusting, wait_until
from tests.test_reqrep import refusing  # noqa: F401 (a fixture)

PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

HANG = 30.0  # s past a client's own timeout: it hangs
TXN = "c1.00aa"  # the transaction in doubt that resolve is asked to settle
# the daemon each case's client asks: its command line ({data}: a directory of its own;
# the options come before " -- ", an eda-lb worker's command), the pattern of its endpoint
DAEMONS = {
    "registry": (
        "eda-registry serve -v --no-mdns --bind tcp://127.0.0.1:* --data {data}",
        r"listening on (tcp://\S+) \(changes",
    ),
    "bus": (
        "eda-bus serve -v --no-mdns --bind tcp://127.0.0.1:0 --data {data}",
        r"serving .+ on (tcp://\S+) \(seq",
    ),
    "coordinator": (
        "eda-txn coordinator --name c1 --no-mdns --bind tcp://127.0.0.1:* --log {data}",
        r"coordinator c1 listening on (tcp://[^\s,]+)",
    ),
    "participant": (
        "eda-txn participant a1 --no-mdns --bind tcp://127.0.0.1:* --log {data}"
        " --prepare true --commit true --abort true",
        r"participant a1 listening on (tcp://[^\s,]+)",
    ),
    "worker": (
        "eda-lb worker pay --no-mdns --bind tcp://127.0.0.1:0 -- cat",
        r"serving \S+ on (tcp://\S+) \(",
    ),
}
# the trusted name each daemon is known by in secure mode (its identity)
NAMES = {"registry": "reg", "bus": "bus", "coordinator": "c1", "participant": "a1",
         "worker": "w", "lbreg": "lbreg"}  # fmt: skip


class BlackHole:
    """Accepts TCP connections and holds them, never reading or writing a byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


class Servers:
    """The servers of this module's cases, each started the first time a case needs it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.procs = Procs(home)
        # the daemons trust one another; mallory (the client) trusts them, nobody trusts
        # mallory -- but lbreg, the registry through which eda-lb stats finds the worker
        self.ids = trusting(home / "ids", tuple(NAMES.values()))
        self.ids["lbreg"].trust("mallory", self.ids["mallory"])
        self.hole = BlackHole()
        self.started: dict[tuple[str, str], tuple[Proc, str]] = {}

    @property
    def mallory(self) -> Identity:
        return self.ids["mallory"]

    def daemon(self, kind: str, who: str | None, *extra: str) -> str:
        """The endpoint of daemon *kind*, secure as identity *who* (plain when None)."""
        key = (kind, who or "")
        if key not in self.started:
            line, pattern = DAEMONS["registry" if kind == "lbreg" else kind]
            data = str(self.home / f"{kind}-{who or 'plain'}")
            options, _, command = line.format(data=data).partition(" -- ")
            program, *args = options.split()
            tail = ("--", *command.split()) if command else ()
            secure = ("--secure",) if who else ()
            env = self.ids[who].env if who else None
            proc = self.procs.eda(program, *args, *secure, *extra, *tail, env=env)
            self.started[key] = (proc, proc.wait_stderr(pattern, 30)[1])
        return self.started[key][1]

    def stopped(self, kind: str) -> str:
        """The endpoint of a plain daemon *kind*, SIGSTOPped."""
        endpoint = self.daemon(kind, None)
        self.started[(kind, "")][0].signal(signal.SIGSTOP)
        return endpoint

    def untrusting(self, kind: str) -> str:
        """``NAME@ENDPOINT`` of daemon *kind* in secure mode (mallory is not trusted); the
        worker registers with lbreg (where eda-lb stats finds it)."""
        extra = ("--registry", self.untrusting("lbreg")) if kind == "worker" else ()
        return f"{NAMES[kind]}@{self.daemon(kind, NAMES[kind], *extra)}"

    def close(self) -> None:
        self.procs.kill_all()
        self.hole.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    group = Servers(tmp_path_factory.mktemp("no-hang"))
    yield group
    group.close()


# -- the clients ------------------------------------------------------------------------------
@dataclass
class Asked:
    """One client run: its argv, stdin, the timeout it was given (or has), and the
    identity it runs as (None: plain)."""

    argv: tuple[str, ...]
    timeout: float
    who: Identity | None = None
    input: str | None = None


Where = Callable[[Servers, str], Asked]  # (servers, how they fail) -> the client to run


def target(servers: Servers, how: str, kind: str) -> tuple[str, tuple[str, ...], Identity | None]:
    """Where the client asks (the endpoint, as given), its --secure flag, who it runs as."""
    if how == "untrusting":
        return servers.untrusting(kind), ("--secure",), servers.mallory
    if how == "black hole":
        return servers.hole.endpoint, (), None
    return servers.stopped(kind), (), None


def registry(command: str, *args: str) -> Where:
    def asked(servers: Servers, how: str) -> Asked:
        where, secure, who = target(servers, how, "registry")
        argv = ("eda-registry", command, *args, *secure, "--no-mdns", "--registry", where)
        return Asked(argv, 1.0, who)  # (the registry client's own timeout: 1 s a registry)

    return asked


def bus(command: str, *args: str) -> Where:
    def asked(servers: Servers, how: str) -> Asked:
        where, secure, who = target(servers, how, "bus")
        argv = ("eda-bus", command, *args, *secure, "--no-mdns", "--bus", where, "--timeout", "1")
        return Asked(argv, 1.0, who)

    return asked


def publish(servers: Servers, how: str) -> Asked:
    where, secure, who = target(servers, how, "bus")
    argv = ("eda-pub", *secure, "--no-mdns", "--bus", where, "--confirm", "--timeout", "1",
            "orders")  # fmt: skip
    return Asked(argv, 1.0, who, input="one\ntwo\n")


def call(servers: Servers, how: str) -> Asked:
    where, secure, who = target(servers, how, "worker")
    argv = ("eda-lb", "call", "pay", *secure, "--no-mdns", "--connect", where, "--timeout", "1",
            "x")  # fmt: skip
    return Asked(argv, 1.0, who)


def lb_stats(servers: Servers, how: str) -> Asked:
    """eda-lb stats finds the instance through a registry: a secure one that knows the
    untrusting worker (which registered itself), else a plain one holding a record of
    the black hole or the stopped worker."""
    if how == "untrusting":
        reg = servers.untrusting("lbreg")
        servers.untrusting("worker")
        servers.started[("worker", "w")][0].wait_stderr(r"\(registered\)", 30)
        argv = ("eda-lb", "stats", "pay", "--secure", "--no-mdns", "--registry", reg)
        return Asked((*argv, "--timeout", "1"), 1.0, servers.mallory)
    reg = servers.daemon("lbreg", None)
    where, _, _ = target(servers, how, "worker")
    service = "hole" if how == "black hole" else "stopped"
    host, port = where.removeprefix("tcp://").rsplit(":", 1)
    record = {"service": service, "id": f"{service}-1", "host": host, "port": int(port),
              "ttl": 3600, "interval": 60, "meta": {"role": "worker"}}  # fmt: skip
    client = Client([reg], timeout=10)
    try:
        client.request({"op": "register", "instance": record})
    finally:
        client.close()
    argv = ("eda-lb", "stats", service, "--no-mdns", "--registry", reg, "--timeout", "1")
    return Asked(argv, 1.0)


def commit(servers: Servers, how: str) -> Asked:
    where, secure, who = target(servers, how, "coordinator")
    argv = ("eda-txn", "commit", "-p", "a1", *secure, "--no-mdns", "--coordinator", where,
            "--wait", "1", "--data", "{}")  # fmt: skip
    return Asked(argv, 1.0, who)


def resolve(servers: Servers, how: str) -> Asked:
    """eda-txn resolve of a transaction in doubt at a1, as its journal here says (a1's
    endpoint and, in secure mode, its key), given --timeout 1 as the others are."""
    where, secure, who = target(servers, how, "participant")
    log = servers.home / f"resolve-{how.replace(' ', '-')}"
    log.mkdir()
    journal = open_journal(log / "participant-a1.jsonl")
    name, _, endpoint = where.rpartition("@")
    start = {"endpoint": endpoint, **({"key": servers.ids[name].public} if name else {})}
    journal.write(start)
    journal.write({"txn": TXN, "state": "prepared"})
    argv = ("eda-txn", "resolve", TXN, "--commit", *secure, "--no-mdns", "--log", str(log),
            "--timeout", "1")  # fmt: skip
    return Asked(argv, 1.0, who)


CLIENTS: dict[str, Where] = {
    "eda-registry lookup": registry("lookup", "orders"),
    "eda-registry list": registry("list"),
    "eda-registry watch": registry("watch", "orders"),
    "eda-bus stats": bus("stats"),
    "eda-bus delete-consumer": bus("delete-consumer", "billing"),
    "eda-pub --bus --confirm": publish,
    "eda-lb call": call,
    "eda-lb stats": lb_stats,
    "eda-txn commit": commit,
    "eda-txn resolve": resolve,
}
@pytest.mark.parametrize("how", ["untrusting", "black hole", "stopped"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_one_shot_client_ends_with_one_line(servers: Servers, client: str, how: str) -> None:
    asked = CLIENTS[client](servers, how)
    program = asked.argv[0]
    done = run(*asked.argv, input=asked.input, timeout=asked.timeout + HANG,
               env=asked.who.env if asked.who else None)  # fmt: skip
    lines = done.stderr.splitlines()
    assert done.returncode > 0 and len(lines) == 1, (done.returncode, done.stderr)
    assert lines[0].startswith(f"{program}: "), done.stderr
    if how == "untrusting":
        refused = f"does not trust this key (eda-keys show: {servers.mallory.public})"
        assert done.returncode == 1 and lines[0].endswith(refused), done.stderr


# -- the racy order, forced: a handshake refused before the request is sent -------------------
def test_lb_stats_told_of_a_refusal_before_it_asked(
    refusing: tuple[str, Identity],  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """eda-lb stats asks every instance at once; one whose handshake failed before it was
    asked has no connection to queue the question on (before: zmq.Again, a traceback)."""
    from eda.core.lb import stats

    named, _ = refusing
    where = named.partition("@")[2]
    given(named)  # (pins srv's key, as a registry record would)

    def connect_then_refused(sock: zmq.Socket[bytes], endpoint: Endpoint, key: bytes) -> str:
        text = connect(sock, endpoint, key)
        wait_until(lambda: not sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT, 10, "the refusal")
        return text

    monkeypatch.setattr(stats, "connect", connect_then_refused)
    told: list[tuple[str, str]] = []
    answers = stats.ask_stats([where], 60.0, on_refused=lambda *report: told.append(report))
    assert answers == {where: "does not trust this key"}
    assert told == [(where, "does not trust this key")]


def test_bus_publisher_told_of_a_refusal_later_than_its_first_wait(
    refusing: tuple[str, Identity],  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """eda-pub --bus --confirm waits a moment for the bus to take its key; a refusal
    that comes later (a loaded machine) is still the one-line refusal, not "did not
    confirm N event(s)" at the confirm timeout."""
    from eda.core.bus import link
    from eda.core.bus.publisher import BusPublisher
    from eda.core.reqrep import Refused

    named, mallory = refusing
    endpoint = given(named, "bus")
    monkeypatch.setattr(link, "REFUSAL_WAIT", 0.0)  # the refusal comes after the first wait
    pub = BusPublisher(endpoint, timeout=5.0)
    try:
        pub.send("orders", b"one", 1)
        with pytest.raises(Refused) as refused:
            pub.finish()
    finally:
        pub.close()
    assert str(refused.value) == (
        f"the bus at {endpoint.zmq} does not trust this key (eda-keys show: {mallory.public})"
    )
    assert pub.confirmed == 0

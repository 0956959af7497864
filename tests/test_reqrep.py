"""The request/reply layer: a toy echo daemon and its clients.

The daemon runs its loop in a thread of the test (one thread owns its
sockets); clients ask from the test's thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core import keys, reqrep, security
from eda.core.daemon import Daemon
from eda.core.endpoint import Endpoint
from eda.core.errors import NotFoundError, UsageError
from eda.core.reqrep import Client, NoServer, ProtocolError, RemoteError, Service, Unavailable
from tests.helpers import Identity, trusting, wait_until

MAX = 4096  # the toy's request size limit


class Echo(Daemon):
    """Answers ``echo`` with what it got; ``boom`` is a handler bug, ``missing`` a refusal."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        super().__init__(warn=self.warnings.append)
        handlers = {"echo": self.echo, "boom": self.boom, "missing": self.missing}
        self.service = Service(self, handlers, max_message=MAX)
        self.endpoint = self.bind(self.service.sock, "tcp://127.0.0.1:*")

    def echo(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"said": msg.get("say")}

    def boom(self, msg: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a bug in a handler")

    def missing(self, msg: dict[str, Any]) -> dict[str, Any]:
        raise NotFoundError("no such thing")


@contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    done = threading.Event()
    thread = threading.Thread(target=daemon.serve, args=(done.is_set,), daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        done.set()
        thread.join(10)
        assert not thread.is_alive()
        daemon.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    with running(Echo()) as daemon:
        assert isinstance(daemon, Echo)
        yield daemon


@pytest.fixture
def silent() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    sock.close()


class Raw:
    """A DEALER that sends any bytes and reads raw replies (with a timeout)."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frames: list[bytes], timeout: float = 5.0) -> dict[str, Any] | None:
        self.sock.send_multipart(frames)
        if not self.sock.poll(int(timeout * 1000)):
            return None
        reply = json.loads(self.sock.recv())
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self.sock.close()


def test_a_request_gets_its_reply_with_its_rid(echo: Echo) -> None:
    client = Client([echo.endpoint])
    reply = client.request({"op": "echo", "say": "hi"})
    assert reply["said"] == "hi" and reply["ok"] is True and isinstance(reply["rid"], int)
    again = client.request({"op": "echo", "say": "again"})
    assert again["said"] == "again" and again["rid"] != reply["rid"]
    client.close()


def test_a_handler_that_raises_gets_an_error_reply_and_the_daemon_keeps_serving(
    echo: Echo,
) -> None:
    client = Client([echo.endpoint])
    for _ in range(3):
        with pytest.raises(RemoteError, match="request failed: RuntimeError") as failed:
            client.request({"op": "boom"})
        assert failed.value.exit_code == 1
    assert client.request({"op": "echo", "say": "still here"})["said"] == "still here"
    assert echo.failures == 3
    assert len([w for w in echo.warnings if "a bug in a handler" in w]) == 1  # rate-limited
    with pytest.raises(NotFoundError, match="no such thing"):  # a refusal keeps its code
        client.request({"op": "missing"})
    client.close()


def test_garbage_requests_get_error_replies_and_the_daemon_continues(echo: Echo) -> None:
    raw = Raw(echo.endpoint)
    garbage: list[list[bytes]] = [
        [b"\xff\xfe not json"],
        [b"[1, 2]"],
        [b"[" * (MAX - 1)],
        [b'{"op": "nope", "rid": 7}'],
        [b'{"say": "no op"}'],
        [b'{"op": "echo", "rid": {"not": "a rid"}}'],
        [b'{"op": "echo"}', b"a second frame"],
    ]
    for frames in garbage:
        reply = raw.ask(frames)
        assert reply is not None and reply["ok"] is False, frames
        # garbage from a peer is a runtime error (1), never a usage error (2)
        assert reply["code"] == 1 and reply["error"].startswith(("malformed", "unknown")), reply
    assert raw.ask([b'{"op": "nope", "rid": 7}']) == {
        "rid": None,  # refused before its rid was looked at
        "ok": False,
        "error": "unknown operation 'nope'",
        "code": 1,
    }
    assert echo.malformed == len(garbage) + 1
    good = Client([echo.endpoint])
    assert good.request({"op": "echo", "say": "ok"})["said"] == "ok"
    raw.close()
    good.close()


def test_an_oversized_request_drops_its_connection_and_others_are_served(echo: Echo) -> None:
    big = Raw(echo.endpoint)
    assert big.ask([b'{"op": "echo", "say": "' + b"x" * MAX + b'"}'], timeout=0.5) is None
    good = Client([echo.endpoint])
    assert good.request({"op": "echo", "say": "small"})["said"] == "small"
    assert echo.service.requests == 1  # the big one never reached a handler
    big.close()
    good.close()


def test_a_silent_server_times_out(silent: str) -> None:
    client = Client([silent], timeout=0.3)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no server answered"):
        client.request({"op": "echo"})
    assert time.monotonic() - started >= 0.3
    client.close()


def test_failover_moves_on_to_the_next_endpoint_and_stays_there(echo: Echo, silent: str) -> None:
    client = Client([silent, echo.endpoint], timeout=0.3)
    started = time.monotonic()
    assert client.request({"op": "echo", "say": "a"})["said"] == "a"
    assert time.monotonic() - started >= 0.3  # it waited on the silent one first
    assert client.current == Endpoint.parse(echo.endpoint)  # a typed endpoint now
    assert client.request({"op": "echo", "say": "b"})["said"] == "b"
    assert client.current == Endpoint.parse(echo.endpoint)  # a typed endpoint now
    client.close()


def test_no_endpoint_at_all_is_no_server_and_a_bad_one_a_usage_error() -> None:
    with pytest.raises(NoServer):
        Client([]).request({"op": "echo"})
    with pytest.raises(UsageError, match="bad server endpoint"):
        Client(["udp://somewhere"])


def test_stale_and_garbled_replies_are_skipped() -> None:
    """A late reply to an earlier request, or noise, never passes for the answer."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    endpoint = str(router.getsockopt_string(zmq.LAST_ENDPOINT))

    def answer_badly() -> None:
        if not router.poll(10_000):
            return
        ident, body = router.recv_multipart()
        rid = json.loads(body)["rid"]
        for reply in (b"noise", b"[]", json.dumps({"rid": rid - 1, "ok": True, "n": 1}).encode()):
            router.send_multipart([ident, reply])
        router.send_multipart([ident, json.dumps({"rid": rid, "ok": True, "n": 2}).encode()])

    thread = threading.Thread(target=answer_badly)
    thread.start()
    client = Client([endpoint], timeout=10.0)
    assert client.request({"op": "x"})["n"] == 2
    thread.join(10)
    client.close()
    router.close()


def test_the_daemon_survives_a_client_that_never_reads(echo: Echo) -> None:
    flooders = [Raw(echo.endpoint) for _ in range(5)]
    for flooder in flooders:
        for _ in range(200):
            flooder.sock.send(b'{"op": "echo", "say": "unread"}', zmq.NOBLOCK)
    wait_until(lambda: echo.service.requests >= 1000, 10, "the flood to be answered")
    good = Client([echo.endpoint])
    assert good.request({"op": "echo", "say": "served"})["said"] == "served"
    for flooder in flooders:
        flooder.close()
    good.close()


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300)
    | st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["op", "rid", "say"]),
            st.none() | st.booleans() | st.integers() | st.text(max_size=80) | st.just("echo"),
        ),
    )
)
def test_parse_request_accepts_only_valid_requests(frame: bytes) -> None:
    try:
        msg = reqrep.parse_request([frame], ("echo",))
    except ProtocolError:
        return
    assert msg["op"] == "echo"
    rid = reqrep.request_id(msg)
    assert msg.get("rid") is None or rid == msg["rid"]
    json.loads(reqrep.encode({"rid": rid}))  # always safe to echo


# -- never hanging -------------------------------------------------------------------------
@pytest.fixture
def refusing(tmp_path: Path) -> Iterator[tuple[str, Identity]]:
    """A CURVE server (as srv) whose ZAP handler trusts no key, and secure mode in this
    process as mallory, who trusts srv: (``srv@ENDPOINT``, mallory)."""
    from zmq.auth.thread import ThreadAuthenticator

    ids = trusting(tmp_path, ("srv",))
    server = keys.load_identity(ids["srv"].home / "eda" / "keys" / "id.key")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    (tmp_path / "nobody").mkdir()
    auth.configure_curve(domain="*", location=str(tmp_path / "nobody"))  # trusts no key
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_publickey, router.curve_secretkey = server.public, server.secret
    router.curve_server = True
    router.bind("tcp://127.0.0.1:*")
    home = ids["mallory"].home / "eda" / "keys"
    security.enable(home / "id.key", home / "trusted")
    try:
        yield f"srv@{router.getsockopt_string(zmq.LAST_ENDPOINT)}", ids["mallory"]
    finally:
        security.disable()
        router.close()
        auth.stop()
        ctx.term()


class RefusedBeforeSending(Client):
    """A client whose handshake fails before it sends its request, as happens under load
    (the I/O thread finishes the handshake before this thread gets to send): its socket
    then has no connection left to queue the request on."""

    def connect(self, endpoint: Endpoint) -> None:
        super().connect(endpoint)
        mon, sock = self._mon, self._sock
        assert mon is not None and sock is not None
        wait_until(lambda: mon.poll(0), 10, "the handshake to fail")
        wait_until(lambda: not sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT, 10, "no room to send")


def test_a_handshake_refused_before_the_request_is_sent_is_told_not_waited_on(
    refusing: tuple[str, Identity],
) -> None:
    """The test behind a CI hang of ``eda-registry list --secure`` with an untrusted key:
    the request blocked in send() for ever (before the fix: this thread never ended)."""
    endpoint, mallory = refusing
    client = RefusedBeforeSending([endpoint], timeout=60.0, context=zmq.Context())
    outcome: list[BaseException | dict[str, Any]] = []

    def ask() -> None:
        try:
            outcome.append(client.request({"op": "echo"}))
        except BaseException as exc:  # (the test looks at what it was)
            outcome.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(30)  # a hang check (the client's own timeout is 60 s): it is refused at once
    assert not thread.is_alive(), "the request hangs"
    [refused] = outcome
    where = endpoint.partition("@")[2]
    assert isinstance(refused, reqrep.Refused) and str(refused) == (
        f"the server at {where} does not trust this key (eda-keys show: {mallory.public})"
    )
    client.close()


def test_a_request_ends_by_its_overall_deadline_however_many_servers_are_silent() -> None:
    """Looking again never starts the clock again: a request given *total* seconds ends by
    then although each of its servers would be given *timeout* (before: 5 x 2 s)."""
    holes = []
    for _ in range(5):
        sock = zmq.Context.instance().socket(zmq.ROUTER)  # accepts, never answers
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        holes.append(sock)
    endpoints = [str(s.getsockopt_string(zmq.LAST_ENDPOINT)) for s in holes]
    client = Client(endpoints, timeout=2.0, total=0.5)
    waited: list[float] = []
    real = client.roundtrip
    client.roundtrip = lambda msg, t: waited.append(t) or real(msg, t)  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="no server answered"):
        client.request({"op": "echo"})
    client.close()
    for sock in holes:
        sock.close()
    # every attempt waited only what was left of the request's 0.5 s: the silent servers
    # were not each given their 2 s, and the attempts' waits add up to the deadline at most
    assert waited and all(t <= 0.5 for t in waited) and sum(waited) <= 0.5 + 0.01 * len(waited)


def test_finding_a_server_ends_by_the_overall_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probing the endpoints the cache remembers never outlasts the deadline a request
    would have (3 attempt timeouts), however many there are and however slowly each
    probe fails (before: 40 probes of 0.2 s, 8 s).  The clock is the test's."""
    clock = [1000.0]
    probes: list[float] = []

    def slow_probe(endpoint: Endpoint, timeout: float = reqrep.PROBE_TIMEOUT) -> bool:
        probes.append(timeout)
        clock[0] += timeout  # a silent endpoint: the probe waits its whole timeout
        return False

    class Remembering(Client):
        def remembered(self) -> list[Endpoint]:
            return [Endpoint.parse(f"tcp://127.0.0.1:{20000 + i}") for i in range(40)]

    monkeypatch.setattr(reqrep, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(reqrep, "tcp_reachable", slow_probe)
    with pytest.raises(NoServer):
        Remembering(timeout=1.0, use_mdns=False).find()
    assert 0 < len(probes) < 40 and sum(probes) <= 3.0 + 1e-9

"""core/http.py: the HTTP/1.1 server on a daemon's poll loop, with real clients (curl,
http.client, raw sockets) and hostile ones (slowloris, oversized heads and bodies,
garbage, a thousand idle connections)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eda.core.daemon import BindError, Daemon
from eda.core.errors import NotFoundError, UsageError
from eda.core.http import (
    HttpError,
    Limits,
    Request,
    Server,
    Stream,
    json_response,
    problem,
    sse,
)
from eda.core.limits import raise_fd_limit
from tests.helpers import wait_until


class Running:
    """A daemon serving HTTP in a thread of the test process."""

    def __init__(self, limits: Limits | None = None, address: str = "127.0.0.1:0") -> None:
        self.daemon = Daemon()
        self.server = Server(self.daemon, address, limits=limits)
        self.pending: list[Request] = []
        self.streams: list = []
        self.closed_streams = 0
        self.crash = False
        s = self.server
        s.route("GET", "/metrics", lambda r: (200, {"content-type": "text/plain"}, b"up 1\n"))
        s.route("POST", "/echo", lambda r: json_response(200, {"got": r.json(), "q": r.query}))
        s.route("GET", "/items/{name}", self._item)
        s.route("POST", "/later", self._later)
        s.route("GET", "/stream", self._stream)
        s.route("GET", "/boom", self._boom)
        self.daemon.every(0.01, "answer later", self._answer_pending)
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()

    def _item(self, req: Request) -> tuple[int, list[tuple[str, str]], bytes] | None:
        name = req.params["name"]
        if name == "missing":
            raise NotFoundError("no item 'missing'")
        if name == "bad":
            raise UsageError("a bad name")
        if name == "teapot":
            raise HttpError(409, "conflict here", extra_member=1)
        return json_response(200, {"name": name})

    def _later(self, req: Request) -> None:
        self.pending.append(req)

    def _answer_pending(self) -> None:
        while self.pending:
            req = self.pending.pop(0)
            req.respond(201, [("content-type", "text/plain")], req.body)

    def _stream(self, req: Request) -> None:
        stream = req.stream()
        stream.send(sse("hello", id=1))
        stream.on_close = self._stream_closed
        self.streams.append(stream)
        if req.arg("end") is not None:
            stream.send(sse("bye\nnow", id=2, event="end"))
            stream.close()

    def _stream_closed(self) -> None:
        self.closed_streams += 1

    def _boom(self, req: Request) -> None:
        raise RuntimeError("a bug")

    @property
    def port(self) -> int:
        return self.server.port

    def close(self) -> None:
        self.daemon.stop()
        self.thread.join(5)
        self.server.close()
        self.daemon.close()


@pytest.fixture
def web() -> Iterator[Running]:
    running = Running()
    yield running
    running.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=20)  # fmt: skip


def get(port: int, path: str, method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send *data*, read until the server closes (or *timeout*)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_curl_routes_json_and_problems(web: Running) -> None:
    out = curl("-i", f"http://127.0.0.1:{web.port}/metrics")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200 OK")
    assert "content-length: 5" in out.stdout.lower() and out.stdout.endswith("up 1\n")
    out = curl("-d", '{"a": [1, 2]}', f"http://127.0.0.1:{web.port}/echo?x=1&y")
    assert json.loads(out.stdout) == {"got": {"a": [1, 2]}, "q": {"x": ["1"], "y": [""]}}
    status, headers, body = get(web.port, "/items/one")
    assert (status, json.loads(body)) == (200, {"name": "one"})
    for path, want in (("/items/missing", 404), ("/items/bad", 400), ("/items/teapot", 409),
                       ("/nowhere", 404), ("/boom", 500)):  # fmt: skip
        status, headers, body = get(web.port, path)
        assert status == want, path
        assert headers["content-type"] == "application/problem+json"
        doc = json.loads(body)
        assert doc["status"] == want and doc["type"] == "about:blank" and doc["title"]
    assert json.loads(get(web.port, "/items/teapot")[2])["extra_member"] == 1
    status, headers, _ = get(web.port, "/metrics", method="DELETE")
    assert status == 405 and headers["allow"] == "GET"
    status, headers, body = get(web.port, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == "5"
    assert web.server.failures == 1  # the bug was counted, and the server goes on
    assert get(web.port, "/metrics")[0] == 200


def test_malformed_json_is_a_problem(web: Running) -> None:
    for body in (b"{", b"[" * 100000, b'{"a": NaN}', b"\xff\xfe"):
        status, _headers, doc = get(web.port, "/echo", "POST", body)
        assert status == 400 and "not valid JSON" in json.loads(doc)["detail"]


def test_keep_alive_and_pipelining_answer_in_order(web: Running) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    socks = set()
    for i in range(20):
        conn.request("POST", "/later", body=f"n{i}".encode())
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (201, f"n{i}".encode())
        socks.add(id(conn.sock))
    assert len(socks) == 1 and len(web.server.conns) == 1  # one connection for all of them
    conn.close()
    # pipelined: deferred answers still come back in the order asked
    burst = b"".join(
        f"POST /later HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nn{i}".encode()
        for i in range(10)
    ) + b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw(web.port, burst)
    bodies = [part.split(b"\r\n\r\n", 1)[1][:2] for part in out.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [f"n{i}".encode() for i in range(10)] + [b"up"]


def test_chunked_request_body(web: Running) -> None:
    body = b'{"chunked": true}'
    req = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n" + b"%x\r\n" % 5 + body[:5] + b"\r\n"
           + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n")  # fmt: skip
    out = raw(web.port, req)
    assert out.startswith(b"HTTP/1.1 200") and b'"got":{"chunked":true}' in out


def test_server_sent_events(web: Running) -> None:
    out = curl("-N", f"http://127.0.0.1:{web.port}/stream?end")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "id: 1\ndata: hello\n\nid: 2\nevent: end\ndata: bye\ndata: now\n\n"
    # a client that leaves: the producer is told
    with socket.create_connection(("127.0.0.1", web.port)) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"text/event-stream" in s.recv(4096)
    wait_until(lambda: web.closed_streams == 2, what="stream closed")


def test_limits_on_heads_bodies_and_headers(web: Running) -> None:
    big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    out = raw(web.port, big)
    assert out.startswith(b"HTTP/1.1 431") and b"problem+json" in out
    many = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    assert raw(web.port, many).startswith(b"HTTP/1.1 431")
    huge = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{"
    assert raw(web.port, huge).startswith(b"HTTP/1.1 413")
    chunks = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks += b"".join(b"10000\r\n" + b"a" * 0x10000 + b"\r\n" for _ in range(20))
    assert raw(web.port, chunks).startswith(b"HTTP/1.1 413")
    for garbage in (b"\x00\x01\x02 garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                    b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):  # fmt: skip
        assert raw(web.port, garbage).startswith(b"HTTP/1.1 400"), garbage
    assert web.server.refused >= 8
    assert get(web.port, "/metrics")[0] == 200  # the daemon goes on


def test_slowloris_gets_408_while_others_are_served() -> None:
    web = Running(Limits(request_time=1.0, idle_time=2.0))
    try:
        slow = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-a: ")
        idle = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        assert get(web.port, "/metrics")[0] == 200
        answer = slow.recv(4096)  # cut at the deadline, with a reason
        assert answer.startswith(b"HTTP/1.1 408") and b"not sent within 1 s" in answer
        assert slow.recv(4096) == b""
        assert idle.recv(4096) == b""  # an idle keep-alive connection is closed in silence
        wait_until(lambda: not web.server.conns, what="connections closed")
    finally:
        web.close()


def test_a_thousand_idle_connections_do_not_stop_service() -> None:
    assert raise_fd_limit() > 2200
    web = Running(Limits(connections=600))
    idle: list[socket.socket] = []
    try:
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", web.port), timeout=10)
            if i % 2:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request each
            idle.append(s)
        for _ in range(20):  # served while they hang on, beyond the cap
            assert get(web.port, "/metrics")[0] == 200
        out = curl(f"http://127.0.0.1:{web.port}/items/x")
        assert json.loads(out.stdout) == {"name": "x"}
        assert len(web.server.conns) <= 600 and web.server.evicted >= 400
    finally:
        for s in idle:
            s.close()
        web.close()


def test_a_client_that_never_reads_its_stream_is_cut() -> None:
    web = Running(Limits(output_bytes=1 << 16, stalled_time=0.5))
    flood = {"sent": 0, "stopped": 0}

    def produce(stream: Stream) -> None:  # what a producer does: send while there is room
        while stream.room() and flood["sent"] < 64 << 20:
            stream.send(b"data: " + b"x" * 8192 + b"\n\n")
            flood["sent"] += 8192
        if not stream.closed:
            flood["stopped"] += 1

    def start(req: Request) -> None:
        stream = req.stream()
        stream.on_close = web._stream_closed
        web.streams.append(stream)
        web.daemon.every(0.05, "flood", lambda: None if stream.closed else produce(stream))

    web.server.route("GET", "/flood", start)
    try:
        s = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: web.closed_streams == 1, what="stalled client cut")
        assert flood["stopped"] >= 1 and flood["sent"] < 64 << 20  # bounded by its queue
        s.close()
        assert get(web.port, "/metrics")[0] == 200
    finally:
        web.close()


def test_bind_errors_and_ipv6() -> None:
    web = Running(address="[::1]:0")
    try:
        assert web.server.url.startswith("http://[::1]:")
        out = curl("-g", f"{web.server.url}/metrics")
        assert out.stdout == "up 1\n"
        with pytest.raises(BindError):
            Server(Daemon(), f"[::1]:{web.port}")
    finally:
        web.close()
    with pytest.raises(UsageError):
        Server(Daemon(), "not an endpoint:x")


def test_problem_shape() -> None:
    _status, headers, body = problem(422, "why", title="Bad thing", field="x")
    assert dict(headers) == {"content-type": "application/problem+json"}
    assert json.loads(body) == {"type": "about:blank", "title": "Bad thing", "status": 422,
                                "detail": "why", "field": "x"}  # fmt: skip


def test_open_streams_are_pinged() -> None:
    web = Running(Limits(ping_time=0.2))
    try:
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as s:
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while got.count(b": ping\n\n") < 2:
                chunk = s.recv(4096)
                assert chunk
                got += chunk
        assert b"data: hello\n" in got
    finally:
        web.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prefix=st.sampled_from([b"", b"GET /metrics HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\n"]),
       noise=st.binary(max_size=2048))  # fmt: skip
def test_any_bytes_get_an_http_answer_or_a_hang_up(web: Running, prefix: bytes, noise: bytes) -> None:
    out = raw(web.port, prefix + noise + b"\r\n\r\n", timeout=1)
    assert out == b"" or out.startswith(b"HTTP/1.1 ")
    assert get(web.port, "/metrics")[0] == 200  # and the server goes on


def test_pipelining_is_limited_hard_whatever_one_read_holds(web: Running) -> None:
    """A hundred requests in one packet, each answered later: the server parses the
    limit's worth (one answered, sixteen queued), answers them in order, answers the
    next one 429 and closes; it never holds the other 83 (the limit was per read)."""
    handled: list[bytes] = []

    def later(req: Request) -> None:
        handled.append(req.body)
        web.pending.append(req)

    web.server.route("POST", "/count", later)
    requests = [f"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nn{i:02}".encode()
                for i in range(100)]  # fmt: skip
    refused = web.server.refused
    out = raw(web.port, b"".join(requests))
    answers = out.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"201"] * 17 + [b"429"], out[-400:]
    assert [a.split(b"\r\n\r\n", 1)[1][:3] for a in answers[:17]] == [
        f"n{i:02}".encode() for i in range(17)]  # fmt: skip
    assert b"connection: close" in answers[-1] and b"more than 16 requests" in answers[-1]
    assert len(handled) == 17 and web.server.refused == refused + 1
    # one answered and sixteen queued at once are all served, on a connection kept open
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as s:
        for burst, answers in ((b"".join(requests[:17]), 17), (requests[17], 1)):
            s.sendall(burst)
            got = b""
            while got.count(b"HTTP/1.1 201") < answers:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
    assert len(handled) == 17 + 18 and web.server.refused == refused + 1
    assert get(web.port, "/metrics")[0] == 200


def test_the_output_budget_cuts_the_slowest_readers_and_serves_the_others() -> None:
    """Many clients open streams and read nothing: each may queue up to its own limit,
    but all of them together no more than the server's budget; past it those whose
    queue has waited longest are cut (counted), and a client that reads gets its whole
    stream meanwhile."""
    per_client, budget, chunk = 1 << 20, 4 << 20, b"data: " + b"x" * 8186 + b"\n\n"
    web = Running(Limits(output_bytes=per_client, output_budget=budget, stalled_time=60))
    peak = {"queued": 0}
    total = 16 << 20

    def stream(req: Request) -> None:
        out = req.stream()
        left = {"bytes": total if req.arg("finite") is not None else 1 << 40}
        out.on_close = web._stream_closed

        def produce() -> None:
            while out.room() and left["bytes"] > 0:
                out.send(chunk)
                left["bytes"] -= len(chunk)
                peak["queued"] = max(peak["queued"], web.server.queued)
            if left["bytes"] <= 0:
                out.close()

        out.on_room = produce
        produce()

    web.server.route("GET", "/flood", stream)
    hogs: list[socket.socket] = []
    try:
        for _ in range(12):  # each would hold 1 MiB: 12 MiB in all without the budget
            s = socket.create_connection(("127.0.0.1", web.port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            hogs.append(s)
            wait_until(lambda: web.server.answered >= len(hogs), what="stream started")
        wait_until(lambda: web.server.cut >= 12 - budget // per_client, what="hogs cut")
        assert web.server.queued <= budget
        got = curl("-N", "-o", "/dev/null", "-w", "%{size_download}",
                   f"http://127.0.0.1:{web.port}/flood?finite")  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert int(got.stdout) >= total  # the reading client got its whole stream
        # every stream closed was a hog cut, but the one that ended; never over the budget
        wait_until(lambda: web.closed_streams == web.server.cut + 1, what="streams closed")
        assert web.server.cut <= 12 and peak["queued"] <= budget
        assert get(web.port, "/metrics")[0] == 200
    finally:
        for s in hogs:
            s.close()
        web.close()

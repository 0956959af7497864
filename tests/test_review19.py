"""Review of issue 19's HTTP surfaces as an attacker: each test is a defect found by
attacking core/http.py and the bus/registry/metrics endpoints, failing before its fix."""

from __future__ import annotations

import socket
from pathlib import Path

from eda.core.http import Limits
from tests.helpers import Procs, trusting, wait_until
from tests.test_http import Running, get
from tests.test_http_bus import post, start


def test_pipelined_requests_never_read_do_not_grow_the_output_queue() -> None:
    """A client pipelines thousands of requests for a large answer and reads nothing:
    the server stops answering (and reading) while its queue is full, so the memory it
    holds for that client is bounded by the output limit, not by what it asked."""
    limit = 1 << 16
    web = Running(Limits(output_bytes=limit, stalled_time=60))
    big = b"x" * 32768
    web.server.route("GET", "/big", lambda r: (200, {"content-type": "text/plain"}, big))
    peak = {"out": 0, "queued": 0}

    def measure() -> None:
        for conn in web.server.conns.values():
            peak["out"] = max(peak["out"], len(conn.out))
            peak["queued"] = max(peak["queued"], len(conn.queue))

    web.daemon.every(0.01, "measure", measure)
    try:
        s = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        request = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
        pending = request * 4000
        sent = 0
        # as much as the server takes: with the fix it stops reading once answers pile up
        try:
            while sent < len(pending):
                sent += s.send(pending[sent : sent + 65536])
        except BlockingIOError:
            pass
        wait_until(lambda: web.server.answered >= 4 and peak["out"] > 0, what="answers queued")
        # the server has read what it was sent and answered what it will
        wait_until(lambda: peak["out"] >= limit or web.server.answered >= 4000, timeout=20,
                   what="output queue filled")  # fmt: skip
        measure()
        assert peak["out"] < limit + len(big) + 4096, peak
        s.close()
        assert get(web.port, "/metrics")[0] == 200
    finally:
        web.close()


def test_a_ce_header_with_bad_percent_encoding_is_a_400(procs: Procs, tmp_path: Path) -> None:
    """Binary mode percent-decodes ce-* headers: "%ff" is not UTF-8, the client's fault
    (400 naming the header), not a failure of the bus (500 and a warning)."""
    bus, _ep, url = start(procs, tmp_path / "bus")
    for header in ("ce-type: a%ff", "ce-id: %c3%28"):
        code, body = post(url, {"ce-specversion": "1.0", "ce-type": "a.b", "ce-source": "/s",
                                header.split(":")[0]: header.split(": ")[1]}, b"1")  # fmt: skip
        assert code == 400, body
        assert body is not None and header.split(":")[0] in body["detail"], body
    assert post(url, {"ce-specversion": "1.0", "ce-type": "a.b"}, b"1")[0] == 201
    assert "handler failed" not in bus.stderr


def test_http_cannot_take_over_an_instance_a_key_registered(procs: Procs, tmp_path: Path) -> None:
    """Secure mode: alice registers orders-1 with her key and goes on heartbeating; HTTP
    (which proves no key) can neither re-register, heartbeat nor deregister it, even
    right after the registry answered one of alice's requests, and the record keeps
    alice's key.  (A property check: no defect was found here.)"""
    from tests.test_http_registry import post_json
    from tests.test_secure_registry import ask, found, register

    ids = trusting(tmp_path, ("reg", "alice"))
    proc = procs.eda("eda-registry", "serve", "--secure", "--no-mdns", "--bind",
                     "tcp://127.0.0.1:*", "--http", "127.0.0.1:0", env=ids["reg"].env)  # fmt: skip
    m = proc.wait_stderr(r"listening on (tcp://\S+) .*HTTP on (http://[^\s)]+)", 30)
    endpoint, url = m.group(1), m.group(2)
    register(procs, ids["alice"], f"reg@{endpoint}", "orders", 9001, "--id", "orders-1")
    record = {"service": "orders", "id": "orders-1", "host": "127.0.0.1", "port": 9666}
    for _ in range(5):  # interleaved with alice's heartbeats
        assert post_json(f"{url}/v1/instances", record)[0] == 403
        assert post_json(f"{url}/v1/instances/orders-1/heartbeat", {"port": 9666},
                         method="PUT")[0] == 403  # fmt: skip
        assert post_json(f"{url}/v1/instances/orders-1", {}, method="DELETE")[0] == 403
    assert found(ask(ids["alice"], "lookup", f"reg@{endpoint}", "orders", "--json")) == {
        9001: ids["alice"].public
    }


def test_a_stream_whose_client_reset_the_connection_is_closed_not_a_failure() -> None:
    """Clients that send GET /events and reset the connection at once (SO_LINGER 0):
    writing the stream's head fails, and the handler was given None (AttributeError,
    a "handler failed" warning) instead of a closed stream whose on_close still runs."""
    import struct

    web = Running()
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", web.port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            s.close()
        wait_until(lambda: not web.server.conns, what="every connection gone")
        assert web.server.failures == 0
        # a connection reset before the server read its request makes no stream (more of
        # them under load): every stream made is closed, and some were made
        assert web.closed_streams == len(web.streams) > 0
        assert get(web.port, "/metrics")[0] == 200
    finally:
        web.close()


def test_head_of_an_event_stream_is_its_head_only() -> None:
    """HEAD on a streaming route answered with the stream's body (and kept it open,
    events flowing): a HEAD answer has no body; the stream is closed at once."""
    web = Running()
    try:
        out = raw_exchange(web.port, b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, out
        assert body == b"", out
        wait_until(lambda: web.closed_streams == 1, what="the stream closed")
    finally:
        web.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send *data*, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out

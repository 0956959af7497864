"""Review of issue 19's HTTP surfaces as an attacker: each test is a defect found by
attacking core/http.py and the bus/registry/metrics endpoints, failing before its fix."""

from __future__ import annotations

import socket
from pathlib import Path

from eda.core.http import Limits
from tests.helpers import Procs, wait_until
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

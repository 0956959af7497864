"""What eda's HTTP server refuses and cuts shows in ``/metrics``: each limit of
:mod:`eda.core.http` is provoked, then ``/metrics`` is scraped over HTTP as
Prometheus scrapes it (``eda_<program>_http_...{server="http"|"metrics"}``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eda.core import metrics
from eda.core.daemon import Daemon
from eda.core.http import Limits, Request, Server
from tests.helpers import Procs, wait_until
from tests.test_http import get, raw
from tests.test_metrics import check_names, value

CHUNK = b"data: " + b"x" * 8186 + b"\n\n"


class Probe(Daemon):
    """A daemon with an HTTP API (limits as given) and ``--metrics``, serving in a thread."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.api = Server(self, "127.0.0.1:0", limits=limits)
        self.exporter = metrics.serve(self, "127.0.0.1:0")
        self.pending: list[Request] = []
        self.api.route("POST", "/later", self.pending.append)  # answered by the timer
        self.api.route("GET", "/flood", self._flood)
        self.every(0.01, "answer later", self._answer)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def metrics(self) -> Iterator[Any]:
        return metrics.daemon_families("probe", self)

    def _answer(self) -> None:
        while self.pending:
            self.pending.pop(0).respond(201, [("content-type", "text/plain")], b"ok")

    def _flood(self, req: Request) -> None:
        """A stream without end: as much as the limits let it queue."""
        out = req.stream()

        def produce() -> None:
            while out.room():
                out.send(CHUNK)

        out.on_room = produce
        produce()

    def scrape(self) -> dict[str, Any]:
        status, _, body = get(self.exporter.port, metrics.PATH)
        assert status == 200
        found = {f.name: f for f in text_string_to_metric_families(body.decode())}
        check_names(found, "eda_probe_")
        return found

    def close(self) -> None:
        self.stop()
        self.thread.join(5)
        self.api.close()
        self.exporter.close()
        super().close()


@pytest.fixture
def probe(request: pytest.FixtureRequest) -> Iterator[Probe]:
    daemon = Probe(getattr(request, "param", Limits()))
    try:
        yield daemon
    finally:
        daemon.close()


def http(found: dict[str, Any], name: str, server: str = "http") -> float:
    return value(found[f"eda_probe_http_{name}"], "_total" if name != "connections" else "",
                 server=server)  # fmt: skip


def test_a_request_past_the_pipelining_limit_is_counted_refused(probe: Probe) -> None:
    before = probe.scrape()
    assert http(before, "refused_requests") == 0
    burst = b"".join(b"POST /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nn"
                     for _ in range(40))  # fmt: skip
    answers = raw(probe.api.port, burst).split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"201"] * 17 + [b"429"]
    found = probe.scrape()
    assert http(found, "refused_requests") == 1
    assert http(found, "responses") == 18
    assert http(found, "refused_requests", "metrics") == 0  # the scrapes' own server
    assert http(found, "responses", "metrics") == 1  # the scrape before


def test_a_refused_protocol_upgrade_is_counted_refused(probe: Probe) -> None:
    upgrade = b"GET /later HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    assert b"HTTP/1.1 400" in raw(probe.api.port, upgrade)
    assert http(probe.scrape(), "refused_requests") == 1


@pytest.mark.parametrize(
    "probe", [Limits(output_bytes=256 << 10, output_budget=512 << 10, stalled_time=60)],
    indirect=True,
)
def test_connections_cut_by_the_output_budget_are_counted(probe: Probe) -> None:
    hogs = []
    try:
        for _ in range(6):  # each may queue 256 KiB, all together 512 KiB
            hog = socket.create_connection(("127.0.0.1", probe.api.port), timeout=10)
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
            hogs.append(hog)
        wait_until(lambda: probe.api.cut >= 1, what="a reader cut")
        found = probe.scrape()
        assert http(found, "cut_connections") == probe.api.cut >= 1
        assert value(found["eda_probe_http_queued_bytes"], server="http") <= 512 << 10
        assert http(found, "cut_connections", "metrics") == 0
    finally:
        for hog in hogs:
            hog.close()


@pytest.mark.parametrize("probe", [Limits(connections=2)], indirect=True)
def test_a_connection_past_the_connection_limit_is_counted_refused(probe: Probe) -> None:
    streams = []
    try:
        for _ in range(2):  # two busy connections (streams: none idle to close)
            s = socket.create_connection(("127.0.0.1", probe.api.port), timeout=10)
            s.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.1 200"
            streams.append(s)
        assert raw(probe.api.port, b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        found = probe.scrape()
        assert http(found, "refused_connections") == 1
        assert http(found, "connections") == 2
        assert http(found, "evicted_connections") == 0
    finally:
        for s in streams:
            s.close()


def test_a_real_registry_reports_what_its_http_api_refused(procs: Procs) -> None:
    """eda-registry serve --http --metrics: a request over the body limit and a malformed
    one are refused on the API, and the registry's own scrape says so (every daemon's
    families carry these; the limits are provoked one by one above)."""
    reg = procs.eda("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                    "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0")  # fmt: skip
    port = int(reg.wait_stderr(r"metrics on http://127\.0\.0\.1:(\d+)", 15).group(1))
    api = int(reg.wait_stderr(r"HTTP on http://127\.0\.0\.1:(\d+)", 15).group(1))
    big = raw(api, b"POST /v1/instances HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
                   b"content-type: application/json\r\n\r\n")  # fmt: skip
    assert big.startswith(b"HTTP/1.1 413")
    assert raw(api, b"GET /v1/instances HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n"
               ).startswith(b"HTTP/1.1 400")  # fmt: skip
    assert get(api, "/v1/instances")[0] == 200
    status, _, body = get(port, metrics.PATH)
    assert status == 200
    found = {f.name: f for f in text_string_to_metric_families(body.decode())}
    check_names(found, "eda_registry_")
    refused = found["eda_registry_http_refused_requests"]
    assert value(refused, "_total", server="http") == 2
    assert value(refused, "_total", server="metrics") == 0
    assert value(found["eda_registry_http_responses"], "_total", server="http") == 3

"""eda-registry serve --http: register, heartbeat, deregister, lookup, list and the change
stream as Server-Sent Events, with curl as the client; the ZeroMQ API sees the same state."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import Proc, Procs, run, trusting, wait_until


def serve(procs: Procs, *args: str) -> tuple[Proc, str, str]:
    proc = procs.eda("eda-registry", "serve", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                     "--tick", "0.1", "--http", "127.0.0.1:0", *args)  # fmt: skip
    found = proc.wait_stderr(r"listening on (tcp://\S+) .*HTTP on (http://[^\s)]+)", 15)
    return proc, found.group(1), found.group(2)


def curl(*args: str) -> tuple[int, Any]:
    """(HTTP status, JSON body) of one curl call."""
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=20)  # fmt: skip
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


def post_json(url: str, value: Any, method: str = "POST") -> tuple[int, Any]:
    return curl("-X", method, "-H", "content-type: application/json", "-d", json.dumps(value), url)


def test_register_heartbeat_lookup_deregister_with_curl(procs: Procs) -> None:
    _proc, endpoint, url = serve(procs)
    record = {"service": "orders", "host": "127.0.0.1", "port": 8081, "ttl": 30,
              "interval": 10, "meta": {"zone": "a"}}  # fmt: skip
    status, body = post_json(f"{url}/v1/instances", record)
    assert status == 201, body
    inst = body["instance"]
    assert inst["service"] == "orders" and inst["port"] == 8081 and inst["meta"] == {"zone": "a"}
    inst_id = inst["id"]
    # the ZeroMQ API and the CLI see it, as the same record
    found = run("eda-registry", "lookup", "orders", "--registry", endpoint)
    assert found.returncode == 0 and json.loads(found.stdout)["id"] == inst_id
    status, body = curl(f"{url}/v1/services/orders")
    assert status == 200 and [i["id"] for i in body["instances"]] == [inst_id]
    assert body["instances"][0] == json.loads(found.stdout) | {k: body["instances"][0][k]
                                                               for k in ("heartbeat",)}  # fmt: skip
    # heartbeat with a change of health: lookup returns passing instances only
    status, body = post_json(f"{url}/v1/instances/{inst_id}/heartbeat", {"status": "critical"},
                             "PUT")  # fmt: skip
    assert status == 200 and body["rev"] >= 2
    assert curl(f"{url}/v1/services/orders")[1] == {"instances": []}
    assert len(curl(f"{url}/v1/services/orders?all")[1]["instances"]) == 1
    status, body = curl("-X", "PUT", f"{url}/v1/instances/{inst_id}/heartbeat")  # no body
    assert status == 200
    assert curl(f"{url}/v1/instances/{inst_id}")[1]["instance"]["status"] == "critical"
    status, body = curl(f"{url}/v1/instances?service=orders")
    assert status == 200 and len(body["instances"]) == 1
    status, body = curl("-X", "DELETE", f"{url}/v1/instances/{inst_id}")
    assert (status, body) == (200, {})
    assert run("eda-registry", "lookup", "orders", "--registry", endpoint).returncode == 3
    status, body = curl("-X", "DELETE", f"{url}/v1/instances/{inst_id}")
    assert status == 404 and body["status"] == 404 and "no instance" in body["detail"]
    status, body = curl("-X", "PUT", f"{url}/v1/instances/{inst_id}/heartbeat")
    assert status == 404 and "register it again" in body["detail"]


def test_ttl_expires_an_instance_registered_over_http(procs: Procs) -> None:
    _proc, _endpoint, url = serve(procs)
    record = {"service": "short", "host": "127.0.0.1", "port": 9000, "ttl": 0.5, "interval": 0.2}
    assert post_json(f"{url}/v1/instances", record)[0] == 201
    wait_until(lambda: curl(f"{url}/v1/services/short")[1] == {"instances": []},
               what="expiry")  # fmt: skip


def test_change_stream_as_server_sent_events(procs: Procs) -> None:
    _proc, endpoint, url = serve(procs)
    stream = procs.start(["curl", "-sSN", f"{url}/v1/events?service=web"])
    wait_until(lambda: "change stream of registry" in stream.stdout, what="stream open")
    web = {"service": "web", "host": "127.0.0.1", "port": 80, "id": "web-1"}
    assert post_json(f"{url}/v1/instances", web)[0] == 201
    assert post_json(f"{url}/v1/instances", {**web, "service": "other", "id": "o-1"})[0] == 201
    reg = procs.eda("eda-registry", "register", "-v", "web", "--port", "81", "--id", "web-2",
                    "--registry", endpoint, "--interval", "0.2", "--ttl", "0.8")  # fmt: skip
    reg.wait_stderr("registered", 30)
    assert curl("-X", "DELETE", f"{url}/v1/instances/web-1")[0] == 200

    def changes() -> list[tuple[str, dict[str, Any]]]:
        out = []
        for block in stream.stdout.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line
                         and not line.startswith(":"))  # fmt: skip
            if "data" in lines:
                out.append((lines["event"], json.loads(lines["data"])))
                assert lines["id"] == str(out[-1][1]["seq"])
        return out

    wait_until(lambda: len(changes()) >= 3, what="three changes")
    got = changes()
    assert [(kind, ev["instance"]["id"]) for kind, ev in got] == [
        ("registered", "web-1"), ("registered", "web-2"), ("deregistered", "web-1")]
    assert all(ev["service"] == "web" for _, ev in got)  # "other" filtered out


def test_bad_input_is_refused_as_problem_json(procs: Procs) -> None:
    proc, _endpoint, url = serve(procs)
    for body, want in ((b"{", 400), (b"[1]", 400), (b'{"service": "x"}', 422),
                       (b'{"service": "BAD NAME", "host": "h", "port": 1}', 422),
                       (b'{"service": "a", "host": "h", "port": 70000}', 422)):  # fmt: skip
        status, doc = curl("-H", "content-type: application/json", "--data-binary", body,
                           f"{url}/v1/instances")  # fmt: skip
        assert status == want, (body, doc)
        assert doc["status"] == want and doc["detail"]
    assert curl(f"{url}/v1/services/NOT_A_NAME")[0] == 422
    assert curl(f"{url}/v1/events?service=bad_name")[0] == 400
    # a hostile client sends garbage, the registry goes on serving both APIs
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert curl(f"{url}/v1/instances")[0] == 200
    assert proc.popen.poll() is None


def test_secure_mode_serves_http_on_loopback_only(procs: Procs, tmp_path: Path) -> None:
    reg = trusting(tmp_path, ["reg"])["reg"]
    out = run("eda-registry", "serve", "--secure", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
              "--http", "0.0.0.0:0", env=reg.env)  # fmt: skip
    assert out.returncode == 2
    assert "loopback address only" in out.stderr and len(out.stderr.splitlines()) == 1
    proc = procs.eda("eda-registry", "serve", "--secure", "--no-mdns", "--bind",
                     "tcp://127.0.0.1:*", "--http", "127.0.0.1:0", env=reg.env)  # fmt: skip
    url = proc.wait_stderr(r"HTTP on (http://[^\s)]+)", 15).group(1)
    record = {"service": "web", "host": "127.0.0.1", "port": 80}
    assert post_json(f"{url}/v1/instances", record)[0] == 201


def test_an_http_lookup_waits_behind_one_turn_of_queued_requests_at_most() -> None:
    """A flood of ZeroMQ heartbeats is queued when an HTTP lookup arrives: the lookup is
    answered after at most one turn's batch of them (the loop's turns are fair), not
    after a batch of a thousand (the registry benchmark's 1,000-instance load made HTTP
    lookups wait seconds on a loaded machine); every queued heartbeat is answered too."""
    import select
    import time

    import zmq

    from eda.core.registry.http import RegistryHttp
    from eda.core.registry.server import REQUESTS_PER_TURN, Server, Settings

    flood_size = 3000
    registry = Server(Settings(bind="tcp://127.0.0.1:0", mdns=False))
    web = RegistryHttp(registry, "127.0.0.1:0")
    registry.service.sock.bind("inproc://http-fairness")  # a send lands in its queue at once
    flood = zmq.Context.instance().socket(zmq.DEALER)
    flood.setsockopt(zmq.SNDHWM, 0)  # the whole flood queued, none refused
    flood.setsockopt(zmq.RCVHWM, 0)  # and every reply kept until read
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect("inproc://http-fairness")
    handled_before: list[int] = []
    lookup = registry.service.handlers["lookup"]

    def timed_lookup(req: Any) -> Any:  # only HTTP asks for lookups here
        handled_before.append(registry.service.requests)
        return lookup(req)

    registry.service.handlers["lookup"] = timed_lookup
    client = socket.create_connection(("127.0.0.1", web.server.port), timeout=10)
    deadline = time.monotonic() + 20
    try:
        registry.serve(until=lambda: bool(web.server.conns) or time.monotonic() > deadline)
        assert web.server.conns, "the HTTP connection was not accepted"
        for i in range(flood_size):
            record = {"service": f"svc{i % 50}", "id": f"inst{i}", "host": "127.0.0.1",
                      "port": 10000 + i, "ttl": 30.0}  # fmt: skip
            flood.send(json.dumps({"op": "heartbeat", "instance": record}).encode(), zmq.NOBLOCK)
        client.sendall(b"GET /v1/services/svc7?all HTTP/1.1\r\nHost: x\r\n\r\n")
        conn = next(iter(web.server.conns.values()))
        assert select.select([conn.sock], [], [], 10)[0], "the lookup did not arrive"
        registry.serve(until=lambda: bool(handled_before) or time.monotonic() > deadline)
        assert handled_before, "the HTTP lookup was not handled"
        assert handled_before[0] <= REQUESTS_PER_TURN < flood_size, handled_before
        answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        registry.serve(until=lambda: registry.service.requests >= flood_size
                       or time.monotonic() > deadline)  # fmt: skip
        assert registry.service.requests == flood_size
        replies = 0
        while flood.poll(0 if replies else 5000):
            assert json.loads(flood.recv())["ok"] is True
            replies += 1
        assert replies == flood_size  # fair turns lose nothing
    finally:
        client.close()
        flood.close()
        web.close()
        registry.close()

"""eda's HTTP APIs (core/http.py): the bus's CloudEvents publishing, the registry's lookups.

* bus HTTP publish: ``wrk`` (2 threads, 64 keep-alive connections, a Lua script
  posting one binary-mode CloudEvent of 100 bytes per request) against
  ``eda-bus serve --http`` (embedded store, fsync batch: each request answered
  201 once its group commit is done), against two anchors in the same run:
  - nginx-light answering every request ``204`` (one worker): the HTTP floor
    of this machine, the same wrk and the same requests;
  - ``eda-pub --bus --confirm`` over ZeroMQ, a file of the same 100-byte
    events into a fresh bus (the bus benchmark's measure).
  Both ratios are eda HTTP / anchor (> 1: HTTP publishing is faster).
* registry HTTP lookup p99 under bench_registry's load (1,000 instances
  heartbeating once a second over ZeroMQ): ``GET /v1/services/svc7`` (20
  instances) on one keep-alive connection, ~300 a second (target < 5 ms),
  against the same lookups over the registry's ZeroMQ API, the two alternating.
  Both clients are as light as each other: a raw pyzmq DEALER, and a raw
  socket sending one prepared request and reading the answer by its
  ``content-length`` (http.client costs more than the server's answer, and on
  a loaded machine more CPU a lookup means a longer tail).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import zmq
from bench_registry import INSTANCES, LOAD, LOAD_BOUND, PER_SERVICE, SERVICES
from bench_registry import p99 as percentile99
from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    free_port,
    row,
    scratch,
    tail,
    wait_exit,
    wait_for_text,
    wait_until,
)

CONNECTIONS = 64
THREADS = 2
PAYLOAD = "x" * 100
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = "{PAYLOAD}"
wrk.headers["ce-specversion"] = "1.0"
wrk.headers["ce-type"] = "bench.http"
wrk.headers["ce-id"] = "bench-1"
wrk.headers["ce-source"] = "/bench"
wrk.headers["Content-Type"] = "text/plain"
"""


def run_wrk(procs: Procs, work: Path, url: str, seconds: int, name: str) -> tuple[float, str]:
    """(requests/s, note) of one wrk run posting the script's event; BenchError on > 1 % errors."""
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    out, err = work / f"wrk-{name}.out", work / f"wrk-{name}.err"
    proc = procs.start(["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout",
                        "5s", "-s", str(script), url], stdout=out, stderr=err)  # fmt: skip
    code = wait_exit(proc, seconds + 30, "wrk")
    text = out.read_text(errors="replace")
    if code != 0:
        raise BenchError(f"wrk exited {code}: {tail(err)}")
    rate = re.search(r"Requests/sec:\s*([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if not (rate and total):
        raise BenchError(f"cannot read wrk's output: {text[-200:]!r}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    bad = errors + (int(non2xx.group(1)) if non2xx else 0)
    if int(total.group(1)) == 0 or bad > int(total.group(1)) * 0.01:
        raise BenchError(f"{bad} errors in {total.group(1)} requests")
    return float(rate.group(1)), f"{bad} errors" if bad else ""


def start_bus(procs: Procs, work: Path, env: dict[str, str], http: bool) -> tuple[str, str, int]:
    """A fresh bus; (ZeroMQ endpoint, HTTP URL or "", pid)."""
    data, err = work / "bus", work / "bus.err"
    args = [eda_cmd("eda-bus"), "serve", "--data", str(data), "--bind", "tcp://127.0.0.1:0",
            "--no-mdns", "--fsync", "batch"]  # fmt: skip
    if http:
        args += ["--http", f"127.0.0.1:{free_port()}"]
    proc = procs.start(args, stderr=err)
    wait_for_text(err, "serving", 15, proc)
    text = err.read_text()
    endpoint = re.search(r"on (tcp://\S+) \(seq", text)
    url = re.search(r"HTTP on (http://\S+)", text)
    if endpoint is None or (http and url is None):
        raise BenchError(f"bus did not say where it serves: {tail(err)}")
    return endpoint.group(1), url.group(1) if url else "", proc.pid


def stored_events(endpoint: str, env: dict[str, str], work: Path) -> int:
    import subprocess

    out = subprocess.run([eda_cmd("eda-bus"), "stats", "--bus", endpoint, "--json"],
                         capture_output=True, env=env, cwd=work, timeout=30)  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    return int(next(r for r in rows if r["kind"] == "bus")["events"])


def bus_http(work: Path, seconds: int) -> tuple[float, str]:
    env = eda_env(work)
    with Procs(work, env) as procs:
        endpoint, url, _pid = start_bus(procs, work, env, True)
        rate, note = run_wrk(procs, work, f"{url}/events", seconds, "eda")
        stored = stored_events(endpoint, env, work)
    return rate, f"{stored} events stored" + (f"; {note}" if note else "")


def nginx_204(work: Path, seconds: int) -> float:
    prefix = work / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process on;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\nevents {{ worker_connections 4096; }}\n"
        "http {\n  access_log off;\n  keepalive_requests 1000000;\n"
        + "".join(f"  {k}_temp_path {prefix}/{k};\n"
                  for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 204; }}\n  }}\n}}\n"
    )  # fmt: skip
    with Procs(work) as procs:
        log = prefix / "stderr.log"
        proc = procs.start(["nginx", "-p", str(prefix), "-c", str(conf)], stderr=log)

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"nginx exited {proc.returncode}: {tail(log)}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("POST", "/events", body=PAYLOAD)
                return conn.getresponse().status == 204
            except OSError:
                return False

        wait_until(up, 10, "nginx")
        rate, _note = run_wrk(procs, work, f"http://127.0.0.1:{port}/events", seconds, "nginx")
    return rate


def eda_pub_zmq(work: Path, events: int) -> float:
    env = eda_env(work)
    data = work / "events.txt"
    data.write_text((PAYLOAD + "\n") * events)
    with Procs(work, env) as procs:
        endpoint, _url, _pid = start_bus(procs, work, env, False)
        err = work / "pub.err"
        start = time.perf_counter()
        pub = procs.start([eda_cmd("eda-pub"), "--bus", endpoint, "--confirm", "bench.http"],
                          stdin=data, stderr=err)  # fmt: skip
        if wait_exit(pub, 300, "eda-pub --bus --confirm") != 0:
            raise BenchError(f"eda-pub failed: {tail(err)}")
        return events / (time.perf_counter() - start)


def registry_http_lookups(work: Path, count: int) -> tuple[list[float], list[float]]:
    """Lookup latencies (s) over HTTP and over ZeroMQ, the heartbeat load running."""
    env = eda_env(work)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Procs(work, env) as procs:
        err = work / "serve.err"
        server = procs.start([eda_cmd("eda-registry"), "serve", "--no-mdns", "--bind", endpoint,
                              "--http", f"127.0.0.1:{free_port()}"], stderr=err)  # fmt: skip
        wait_for_text(err, "listening on", 15, server)
        found = re.search(r"HTTP on http://([\d.]+):(\d+)", err.read_text())
        if found is None:
            raise BenchError(f"registry did not say where HTTP is: {tail(err)}")
        load = procs.start([sys.executable, "-c", LOAD, endpoint, str(INSTANCES), str(SERVICES),
                            str(LOAD_BOUND)], stdout=work / "load.out",
                           stderr=work / "load.err")  # fmt: skip
        wait_for_text(work / "load.out", "ready", 60, load)
        time.sleep(1.0)  # the steady heartbeat rate, as bench_registry
        conn = socket.create_connection((found.group(1), int(found.group(2))), timeout=5)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        times: list[float] = []
        zmq_times: list[float] = []
        try:  # alternating, so both see the same moments of a shared machine
            for i in range(count):
                times.append(http_lookup(conn))
                zmq_times.append(zmq_lookup(sock, i))
                time.sleep(0.002)  # ~300 a second each, as bench_registry's lookups
        finally:
            conn.close()
            sock.close()
            ctx.term()
        if load.poll() is not None:
            raise BenchError(f"the heartbeat load stopped: {tail(work / 'load.err')}")
    return times, zmq_times


LOOKUP = b"GET /v1/services/svc7 HTTP/1.1\r\nHost: registry\r\n\r\n"


def http_lookup(conn: socket.socket) -> float:
    start = time.perf_counter()
    try:
        conn.sendall(LOOKUP)
        data = b""
        while b"\r\n\r\n" not in data:
            data += _received(conn)
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if length is None:
            raise BenchError(f"HTTP lookup answered without a length: {head[:200]!r}")
        while len(body) < int(length.group(1)):
            body += _received(conn)
    except OSError as exc:
        raise BenchError(f"HTTP lookup failed: {exc!r}") from None
    found = json.loads(body)
    took = time.perf_counter() - start
    if not head.startswith(b"HTTP/1.1 200") or len(found["instances"]) != PER_SERVICE:
        raise BenchError(f"HTTP lookup answered {head[:40]!r}: {body[:200]!r}")
    return took


def _received(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise BenchError("the registry closed the HTTP connection")
    return chunk


def zmq_lookup(sock: zmq.Socket[bytes], rid: int) -> float:
    start = time.perf_counter()
    sock.send(json.dumps({"op": "lookup", "service": "svc7", "rid": rid}).encode())
    if not sock.poll(5000):
        raise BenchError("ZeroMQ lookup got no answer within 5 s")
    reply = json.loads(sock.recv())
    took = time.perf_counter() - start
    if len(reply["instances"]) != PER_SERVICE:
        raise BenchError(f"ZeroMQ lookup returned {len(reply['instances'])} instances")
    return took


def run(quick: bool) -> list[Row]:
    seconds = 5 if quick else 15
    lookups = 500 if quick else 2000
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    rows: list[Row] = []
    with scratch("eda-bench-http-") as work:
        for name in ("eda", "nginx", "zmq", "registry"):
            (work / name).mkdir()
        if missing:
            note = f"{', '.join(missing)} not installed (bench/setup.sh)"
            rows.append(row("bus HTTP publish, 64 keep-alive clients", None, "nginx-light 204",
                            None, "events/s", higher_is_better=True, ok=False,
                            note=note))  # fmt: skip
        else:
            rate, note = bus_http(work / "eda", seconds)
            floor = nginx_204(work / "nginx", seconds)
            zmq_rate = eda_pub_zmq(work / "zmq", max(20_000, int(rate * seconds)))
            rows.append(row("bus HTTP publish (201 once stored), 64 keep-alive clients", rate,
                            "nginx-light 204 (same wrk)", floor, "events/s",
                            higher_is_better=True,
                            note=f"wrk -t{THREADS} -c{CONNECTIONS} -d{seconds}s, one binary-mode "
                            f"CloudEvent of {len(PAYLOAD)} B a request; {note}"))  # fmt: skip
            rows.append(row("bus HTTP publish, vs eda-pub over ZeroMQ", rate,
                            "eda-pub --bus --confirm", zmq_rate, "events/s",
                            higher_is_better=True,
                            note="eda-pub batches a file's lines; HTTP: one event a request"))
        try:
            http_times, zmq_times = registry_http_lookups(work / "registry", lookups)
        except BenchError as exc:
            rows.append(row("registry HTTP lookup p99 under 1,000-instance heartbeat load", None,
                            "the same lookup over ZeroMQ", None, "ms", higher_is_better=False,
                            target="< 5", ok=False, note=str(exc)))  # fmt: skip
            return rows
        http_p99 = percentile99(http_times) * 1000
        rows.append(row("registry HTTP lookup p99 under 1,000-instance heartbeat load", http_p99,
                        "the same lookup over ZeroMQ", percentile99(zmq_times) * 1000, "ms",
                        higher_is_better=False, target="< 5", ok=http_p99 < 5,
                        note=f"{lookups} GET /v1/services/svc7 (20 instances), one keep-alive "
                        "connection, ~300/s, alternating with the ZeroMQ ones"))  # fmt: skip
    return rows


if __name__ == "__main__":
    for item in run(quick="--quick" in sys.argv):
        print(json.dumps(item))

"""The etcd anchor of bench_registry: a private etcd and what a Python user writes for it.

etcd is Debian's ``etcd-server`` (3.4; ``etcdctl`` is ``etcd-client``), which
bench/setup.sh installs.  :class:`Etcd` runs one member, its data directory in
the benchmark's scratch directory, client and peer URLs on 127.0.0.1 (the
benchmark runs in a private network namespace).  Python talks to it over
etcd's gRPC gateway (HTTP/1.1 + JSON on the client port) with the standard
library: no gRPC dependency.  The registry's data maps onto etcd as a service
registry on etcd is usually written: one lease per instance, the instance
record stored under ``SERVICE/ID`` with that lease, and a lookup is a range
read of the prefix ``SERVICE/``.  The leases' TTL is 10 s, not the instances'
3 s: a renewal costs etcd the same whatever the TTL, and with 3 s the leases
expired whenever etcd fell behind the keep-alives on a loaded machine, which
ended the anchor's measurement.

:data:`LOAD` is the load generator (run as ``python -c LOAD PORT N SERVICES
SECONDS TTL``): it grants N leases and stores N records in SERVICES services,
prints ``ready`` once all are stored, and keeps every lease alive once a
second from its grant on (N keep-alive requests per second in steady state),
for at most SECONDS in all; it prints ``answered COUNT`` (keep-alives
answered so far) every 0.25 s.  Like the eda load, it builds every request in
advance and sends them asynchronously, so that it stays cheap on a loaded
machine: over 50 connections, one per service (HTTP/1.1 pipelining; etcd
answers one request of a connection at a time, so 10 connections, the eda
load's number of sockets, fell behind on a loaded machine and let leases
expire).  At most 4 keep-alives are in flight on a connection: when etcd
answers fewer than N a second (a loaded machine), the others wait instead of
piling up, and the ``answered`` count shows the rate it sustained.  A
keep-alive that finds its lease gone, or any failed request, ends it with
status 1.
One request per keep-alive: the gateway of etcd 3.4 (Go 1.19's HTTP/1.1
server) cannot stream a request body while answering it, so the gRPC
keep-alive stream that Go clients use is not available to it.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import time
from pathlib import Path
from typing import Any

from harness import BenchError, Procs, free_port, tail, wait_until

TTL = 10  # s: the keep-alives come once a second; see below

LOAD = r"""
import base64, heapq, json, selectors, socket, sys, time
port, n, services, seconds, ttl = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                   float(sys.argv[4]), int(sys.argv[5]))
CONNS = 50  # one per service: each connection answers one request at a time
def b64(text): return base64.b64encode(text.encode()).decode()
def request(path, body):
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data
def record(i):
    return {"service": f"svc{i % services}", "id": f"inst{i}", "host": "127.0.0.1",
            "port": 10000 + i, "ttl": 3.0, "interval": 1.0, "meta": {"version": "2"}}
# Lease IDs are chosen here (LeaseGrant takes one), so every request is built in advance.
grants = [request("/v3/lease/grant", {"ID": i + 1, "TTL": ttl}) for i in range(n)]
puts = [request("/v3/kv/put", {"key": b64(f"svc{i % services}/inst{i}"),
                               "value": b64(json.dumps(record(i))), "lease": i + 1})
        for i in range(n)]
keepalives = [request("/v3/lease/keepalive", {"ID": i + 1}) for i in range(n)]
sel = selectors.DefaultSelector()
socks, inbox, outbox, expect = [], [], [], []
for c in range(CONNS):
    s = socket.create_connection(("127.0.0.1", port)); s.setblocking(False)
    socks.append(s); inbox.append(bytearray()); outbox.append(bytearray()); expect.append([])
    sel.register(s, selectors.EVENT_READ, c)
def fail(text):
    print(text, file=sys.stderr, flush=True); sys.exit(1)
def send(c, data, kind):
    outbox[c] += data; expect[c].append(kind)
def responses(buf):
    # complete HTTP/1.1 responses at the start of buf (Content-Length or chunked), consumed
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0: return
        head = bytes(buf[:head_end]).lower()
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head:
            end = buf.find(b"\r\n0\r\n\r\n", head_end)
            if end < 0: return
            end += 7
        else:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            end = head_end + 4 + length
            if len(buf) < end: return
        body = bytes(buf[head_end + 4:end])
        del buf[:end]
        yield status, body
DEPTH = 4  # keep-alives in flight per connection at most: beyond, they wait (no backlog)
due = [[] for _ in range(CONNS)]  # by connection: heap of (next keep-alive time, lease)
inflight = [0] * CONNS
setup_left, answered = 2 * n, 0
todo = [list(range(c, n, CONNS)) for c in range(CONNS)]  # leases to set up, by connection
def set_up_next(c):
    # one grant + put in flight per connection, so keep-alives never queue behind many
    if todo[c]:
        i = todo[c].pop(0)
        send(c, grants[i], ("grant", i)); send(c, puts[i], ("put", i))
for c in range(CONNS):
    set_up_next(c)
ready_at = None
last_report = time.monotonic()
deadline = last_report + seconds  # bounded, whatever happens
while time.monotonic() < deadline:
    now = time.monotonic()
    upcoming = now + 0.05
    for c in range(CONNS):
        while due[c] and due[c][0][0] <= now and inflight[c] < DEPTH:
            at, i = heapq.heappop(due[c])
            send(c, keepalives[i], ("keepalive", i))
            inflight[c] += 1
            heapq.heappush(due[c], (at + 1.0, i))  # once a second; a late one catches up
        if due[c] and inflight[c] < DEPTH:
            upcoming = min(upcoming, due[c][0][0])
    for c, s in enumerate(socks):
        if outbox[c]:
            try: sent = s.send(outbox[c])
            except BlockingIOError: sent = 0
            del outbox[c][:sent]
    timeout = max(0.0, upcoming - time.monotonic())
    if any(outbox): timeout = 0.001
    for key, _ in sel.select(timeout):
        c = key.data
        data = socks[c].recv(1 << 20)
        if not data: fail("etcd closed a connection")
        inbox[c] += data
        for status, body in responses(inbox[c]):
            kind, i = expect[c].pop(0)
            if status != 200: fail(f"{kind}: HTTP {status}: {body[:200]!r}")
            if kind == "keepalive":
                if b'"TTL":"' not in body or b'"TTL":"-' in body:
                    fail(f"lease {i + 1} expired (keep-alive answered {body[:200]!r})")
                answered += 1
                inflight[c] -= 1
            else:
                if kind == "grant":  # kept alive once a second from now on
                    heapq.heappush(due[c], (time.monotonic() + 1.0, i))
                else:
                    set_up_next(c)
                setup_left -= 1
                if setup_left == 0:
                    ready_at = time.monotonic()
                    print("ready", flush=True)
    if time.monotonic() - last_report >= 0.25:
        last_report = time.monotonic()
        print(f"answered {answered}", flush=True)
if ready_at is None:
    fail(f"only {2 * n - setup_left} of {2 * n} set-up requests answered")
print(f"answered {answered} keep-alives", flush=True)
"""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def prefix_range(prefix: str) -> dict[str, str]:
    """The range request body of every key starting with *prefix* (etcdctl get --prefix)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return {"key": b64(prefix), "range_end": b64(end)}


class Etcd:
    """A private single-member etcd on 127.0.0.1, data in *workdir*/etcd."""

    def __init__(self, procs: Procs, workdir: Path) -> None:
        exe = shutil.which("etcd")
        if exe is None:
            raise BenchError("etcd is not installed (bench/setup.sh installs etcd-server)")
        self.port = free_port()
        peer = f"http://127.0.0.1:{free_port()}"
        client = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "etcd.log"
        self.proc = procs.start(
            [exe, "--name", "bench", "--data-dir", str(workdir / "etcd"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new",
             "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"],
            stderr=self.log,
        )
        wait_until(self._healthy, 30.0, "etcd to be healthy", step=0.05)

    @property
    def endpoint(self) -> str:
        """HOST:PORT of the client URL, as etcdctl --endpoints takes it."""
        return f"127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(f"etcd exited {self.proc.returncode}: {tail(self.log)}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()


def post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One gateway request on a persistent connection; the JSON reply."""
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise BenchError(f"etcd {path}: HTTP {resp.status}: {data[:200]!r}")
    reply: dict[str, Any] = json.loads(data)
    return reply


def range_latencies(port: int, prefix: str, expect: int, count: int) -> list[float]:
    """Time *count* range reads of *prefix* (each must return *expect* keys), ~300/s."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    body = prefix_range(prefix)
    out = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            reply = post(conn, "/v3/kv/range", body)
            out.append(time.perf_counter() - start)
            if int(reply.get("count", 0)) != expect:
                raise BenchError(f"etcd range read returned {reply.get('count', 0)} keys")
            time.sleep(0.002)  # the same pace as the registry's lookups
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise BenchError(f"etcd range read failed: {exc}") from None
    finally:
        conn.close()
    return out

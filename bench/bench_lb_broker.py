"""eda-lb through the broker (``call --via`` -> ``serve`` -> three ``--persistent`` workers).

The same request/reply measurement as bench_lb.py's brokerless rows, with one
more hop: the broker.  Everything runs on 127.0.0.1, fresh processes, no
registry (serverless mode: mDNS inside the private namespace).

* requests/s: ``eda-lb call bench --via bench --window W < N lines > out``,
  timed from the start of the caller until it exits; ``out`` must equal the
  input, in order (a lost or doubled reply fails the row);
* latency p50 / p99: a client speaking the eda-lb wire to the broker with the
  same window, timing each request from send to reply.

Anchor, in the same run: a minimal raw pyzmq ROUTER/DEALER echo with the same
window whose server passes each request through a ``cat`` subprocess pipe (as
a persistent worker does), driven by the same client (requests/s and
latencies).  The broker adds a hop and a process, so the ratio is expected
below the brokerless one; it has no target of its own in the issue.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    row,
    scratch,
    tail,
    wait_exit,
    wait_for_text,
)

WORKERS = 3
WINDOW = 100
PIPELINE = 64
ANCHOR = "raw pyzmq ROUTER/DEALER + cat pipe"

# The anchor's server: a ROUTER, each request written to `cat` and answered with its line.
ECHO = r"""
import collections, os, subprocess, sys, zmq
sock = zmq.Context.instance().socket(zmq.ROUTER)
sock.setsockopt(zmq.SNDHWM, 0); sock.setsockopt(zmq.RCVHWM, 0)
sock.bind("tcp://127.0.0.1:*")
print(sock.getsockopt_string(zmq.LAST_ENDPOINT), file=sys.stderr, flush=True)
cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
out = cat.stdout.fileno()
waiting = collections.deque()
poller = zmq.Poller()
poller.register(sock, zmq.POLLIN); poller.register(out, zmq.POLLIN)
buf = b""
while True:
    for what, _ in poller.poll():
        if what is sock:
            chunk = []
            while True:
                try:
                    ident, rid, body = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                waiting.append((ident, rid)); chunk.append(body + b"\n")
            cat.stdin.write(b"".join(chunk))
        else:
            buf += os.read(out, 1 << 16)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ident, rid = waiting.popleft()
                sock.send_multipart([ident, rid, line])
"""

# The client: N requests with W in flight; prints {"rate", "p50_ms", "p99_ms"} as JSON.
CLIENT = r"""
import json, sys, time, zmq
endpoint, n, window, wire = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
lb = wire == "lb"
body = b"x" * 32
sent_at = {}
lat = []
def send(i):
    rid = b"%d" % i
    sent_at[rid] = time.perf_counter()
    sock.send_multipart([b"EDALB1", b"Q", rid, b"10000", body] if lb else [rid, body])
sent = 0
start = time.perf_counter()
while sent < min(n, window):
    send(sent); sent += 1
while len(lat) < n:
    if not sock.poll(10000):
        sys.exit(f"no reply within 10 s after {len(lat)} replies")
    msg = sock.recv_multipart()
    rid, status = (msg[2], msg[3]) if lb else (msg[0], b"ok")
    if status != b"ok" or rid not in sent_at:
        sys.exit(f"bad reply {msg!r}")
    lat.append(time.perf_counter() - sent_at.pop(rid))
    if sent < n:
        send(sent); sent += 1
rate = n / (time.perf_counter() - start)
lat.sort()
print(json.dumps({"rate": rate, "p50_ms": lat[len(lat) // 2] * 1000,
                  "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000}))
"""


def _client(procs: Procs, work: Path, endpoint: str, n: int, wire: str) -> dict[str, float]:
    out, err = work / f"client-{wire}.out", work / f"client-{wire}.err"
    proc = procs.start(
        [sys.executable, "-c", CLIENT, endpoint, str(n), str(WINDOW), wire], stdout=out, stderr=err
    )
    if wait_exit(proc, 120, f"{wire} client") != 0:
        raise BenchError(f"{wire} client failed: {tail(err)}")
    result: dict[str, float] = json.loads(out.read_text())
    return result


def _anchor(work: Path, n: int) -> dict[str, float]:
    with Procs(work) as procs:
        err = work / "echo.err"
        server = procs.start([sys.executable, "-c", ECHO], stderr=err)
        wait_for_text(err, "tcp://", 15, server)
        endpoint = err.read_text().split()[0]
        return _client(procs, work, endpoint, n, "raw")


def _eda(work: Path, n: int) -> tuple[float, dict[str, float]]:
    env = eda_env(work)
    lines = work / "requests.txt"
    lines.write_bytes(b"".join(b"request %08d\n" % i for i in range(n)))
    with Procs(work, env) as procs:
        serve_err = work / "serve.err"
        broker = procs.start(
            [eda_cmd("eda-lb"), "serve", "bench", "-v", "--serverless", "--pipeline",
             str(PIPELINE), "--bind", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*"],
            stderr=serve_err,
        )  # fmt: skip
        wait_for_text(serve_err, "by mDNS", 20, broker)
        endpoint = serve_err.read_text().split(" listening on ")[1].split()[0]
        for i in range(WORKERS):
            err = work / f"worker{i}.err"
            worker = procs.start(
                [eda_cmd("eda-lb"), "worker", "bench", "-v", "--serverless", "--persistent",
                 "--", "cat"],
                stderr=err,
            )  # fmt: skip
            wait_for_text(err, "serving bench on", 20, worker)
        _wait_workers(procs, work, env)
        out, err = work / "call.out", work / "call.err"
        start = time.perf_counter()
        caller = procs.start(
            [eda_cmd("eda-lb"), "call", "bench", "--via", "bench", "--serverless", "--window",
             str(WINDOW)],
            stdin=lines, stdout=out, stderr=err,
        )  # fmt: skip
        code = wait_exit(caller, 300, "eda-lb call --via")
        elapsed = time.perf_counter() - start
        if code != 0:
            raise BenchError(f"eda-lb call --via exited {code}: {tail(err)}")
        if out.read_bytes() != lines.read_bytes():
            raise BenchError("eda-lb call --via: output differs from the input (lost, doubled?)")
        latency = _client(procs, work, endpoint, n, "lb")
        if broker.poll() is not None:
            raise BenchError(f"the broker exited: {tail(serve_err)}")
    return n / elapsed, latency


def _wait_workers(procs: Procs, work: Path, env: dict[str, str]) -> None:
    """Until the broker lists every worker (they find it by mDNS within a few seconds)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = work / "stats.out"
        proc = procs.start(
            [eda_cmd("eda-lb"), "stats", "bench", "--serverless", "--json"], stdout=out, env=env
        )
        wait_exit(proc, 30, "eda-lb stats")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        if sum(1 for r in rows if r.get("state") == "healthy" and r["source"] != "direct") >= 3:
            return
        time.sleep(0.2)
    raise BenchError("the workers did not connect to the broker within 30 s")


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    rounds = 1 if quick else 3
    eda_rates: list[float] = []
    eda_lat: list[dict[str, float]] = []
    raw: list[dict[str, float]] = []
    with scratch("eda-bench-lb-broker-") as work:
        for _ in range(rounds):  # in turn, so that load from elsewhere hits both alike
            rate, latency = _eda(work, n)
            eda_rates.append(rate)
            eda_lat.append(latency)
            raw.append(_anchor(work, n))
    med = statistics.median
    raw_rate = med([r["rate"] for r in raw])
    note = f"{WORKERS} persistent cat workers, window {WINDOW}, broker --pipeline {PIPELINE}"
    return [
        row(
            "lb via broker: requests/s (eda-lb call --via)", med(eda_rates), ANCHOR, raw_rate,
            "req/s", higher_is_better=True, note=note,
        ),
        row(
            "lb via broker: latency p50 (window 100)", med([x["p50_ms"] for x in eda_lat]),
            ANCHOR, med([r["p50_ms"] for r in raw]), "ms", higher_is_better=False,
        ),
        row(
            "lb via broker: latency p99 (window 100)", med([x["p99_ms"] for x in eda_lat]),
            ANCHOR, med([r["p99_ms"] for r in raw]), "ms", higher_is_better=False,
        ),
    ]  # fmt: skip

"""eda-lb request/reply: throughput, latency and failover, against raw pyzmq.

Rows (every process fresh, everything on 127.0.0.1, no discovery: ``--connect``):

* ``call`` throughput: ``eda-lb call echo --window W < N lines`` to three
  ``eda-lb worker echo --persistent -- cat`` workers, brokerless; requests/s
  over the whole command (start-up included) and its p50/p99 latency (from
  ``-v``).  Targets: >= 25,000 requests/s and >= 60 % of the anchor.
  Anchor: a minimal raw pyzmq ROUTER/DEALER echo with the same window and
  three servers, each passing every request through a ``cat`` subprocess
  pipe as the workers do (``ANCHOR`` below: send_multipart/recv_multipart,
  a poller, the obvious code).  The same anchor without the pipe is shown
  for reference.
* failover: three workers under steady load (a feeder writing lines at a
  fixed rate into ``eda-lb call``), ``kill -9`` of one: every request must
  be answered (none lost or failed at the client), and the caller must drop
  the dead worker within 3 s of its death (the ``dropped`` line on its
  stderr); nothing is sent to a dropped instance.
* (``--via``: the broker row is added here by the broker's owner, measured
  the same way as the ``call`` row with ``eda-lb serve`` in between.)
* (``--secure``: bench_lb_secure.py measures the ``call`` row with and without
  secure mode, with the helpers below.)
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    BenchError,
    Procs,
    Row,
    count_lines,
    cpu_seconds,
    eda_cmd,
    eda_env,
    free_port,
    median,
    row,
    scratch,
    tail,
    wait_exit,
    wait_for_text,
    wait_until,
)

WINDOW = 1000
ANCHOR_NAME = "raw pyzmq ROUTER/DEALER + cat pipe"

# The anchor: what a user would write with pyzmq.  "server PORT pipe|echo" answers on a
# ROUTER (through a cat subprocess when "pipe"); "client N WINDOW PORT..." sends stdin lines
# round-robin over DEALERs, keeps WINDOW in flight, writes replies, prints p50/p99 (ms).
ANCHOR = r"""
import collections, os, subprocess, sys, time, zmq
ctx = zmq.Context()
if sys.argv[1] == "server":
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)  # as the workers: never drop a reply under load
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(f"tcp://127.0.0.1:{sys.argv[2]}")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    pipe = sys.argv[3] == "pipe"
    if pipe:
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        out = cat.stdout.fileno()
        os.set_blocking(out, False)
        poller.register(out, zmq.POLLIN)
        waiting, partial = collections.deque(), b""
    sys.stderr.write("ready\n")
    sys.stderr.flush()
    while True:
        for what, _ in poller.poll():
            if what is sock:
                batch = []
                while True:
                    try:
                        ident, rid, body = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if pipe:
                        waiting.append((ident, rid))
                        batch.append(body + b"\n")
                    else:
                        sock.send_multipart([ident, rid, body])
                if batch:
                    cat.stdin.write(b"".join(batch))
            else:
                lines = (partial + os.read(out, 1 << 18)).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    ident, rid = waiting.popleft()
                    sock.send_multipart([ident, rid, line])
else:
    n, window, ports = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    socks = []
    poller = zmq.Poller()
    for port in ports:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        socks.append(s)
        poller.register(s, zmq.POLLIN)
    lines = sys.stdin.buffer.read().split(b"\n")[:n]
    sent = done = 0
    started, latencies, out = {}, [], []
    while done < n:
        while sent < n and sent - done < window:
            started[sent] = time.monotonic()
            socks[sent % len(socks)].send_multipart([b"%d" % sent, lines[sent]])
            sent += 1
        ready = poller.poll(10000)
        if not ready:
            sys.exit(f"stalled: {done}/{n} answered, {sent} sent")
        for s, _ in ready:
            while True:
                try:
                    rid, body = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                latencies.append(time.monotonic() - started.pop(int(rid)))
                out.append(body + b"\n")
                done += 1
        if len(out) > 1000:
            sys.stdout.buffer.write(b"".join(out))
            out = []
    sys.stdout.buffer.write(b"".join(out))
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    sys.stderr.write(f"p50 {p50 * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms\n")
"""


def _lines(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(b"request %07d %s\n" % (i, b"x" * 40) for i in range(n)))


def _latency(stderr: Path) -> tuple[float, float]:
    m = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", stderr.read_text(errors="replace"))
    if not m:
        raise BenchError(f"no latency figures in {stderr.name}: {tail(stderr)}")
    return float(m[1]), float(m[2])


SECURE_NAME = "self"  # secure mode: one identity, trusting itself under this name


def secure_identity(env: dict[str, str]) -> None:
    """A key pair in *env*'s configuration home, trusted as :data:`SECURE_NAME`."""
    keys = eda_cmd("eda-keys")
    key = subprocess.run([keys, "init"], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    subprocess.run([keys, "trust", SECURE_NAME, key], env=env, check=True, capture_output=True)


def _workers(
    procs: Procs, work: Path, count: int = 3, secure: bool = False,
    metrics: list[int] | None = None,
) -> tuple[list[str], list[object]]:
    """*count* persistent echo workers (with --secure: as the identity of
    :func:`secure_identity`; with *metrics*, a list, each with --metrics on a port added
    to it); their endpoints (``NAME@`` with *secure*) and processes."""
    endpoints, started = [], []
    for i in range(count):
        port = free_port()
        err = work / f"worker{i}.err"
        served = [] if metrics is None else ["--metrics", f"127.0.0.1:{free_port()}"]
        proc = procs.start(
            [eda_cmd("eda-lb"), "worker", "echo", "--no-mdns", "--persistent", *served,
             *(["--secure"] if secure else []), "--bind", f"tcp://127.0.0.1:{port}", "--", "cat"],
            stderr=err,
        )  # fmt: skip
        if metrics is not None:
            metrics.append(int(served[1].rpartition(":")[2]))
        wait_for_text(err, "serving echo", 20, proc)
        endpoints.append((f"{SECURE_NAME}@" if secure else "") + f"tcp://127.0.0.1:{port}")
        started.append(proc)
    return endpoints, started


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_note(cpu: dict[str, list[float]]) -> str:
    """'CPU per request: caller 31 us, workers 40 us' from each run's figures (medians)."""
    parts = [f"{who} {median(v) * 1e6:.0f} us" for who, v in cpu.items() if v]
    return f"CPU per request (median): {', '.join(parts)}" if parts else ""


def _eda_run(
    work: Path,
    env: dict[str, str],
    n: int,
    src: Path,
    cpu: dict[str, list[float]] | None = None,
    secure: bool = False,
    metrics: list[int] | None = None,
) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of eda-lb call over three persistent workers (all with
    --secure when *secure*: *env* holds a :func:`secure_identity`; with --metrics, their
    ports added to the list *metrics*); the CPU seconds per request of the caller and of
    the workers together go to *cpu*."""
    with Procs(work, env) as procs:
        endpoints, workers = _workers(procs, work, secure=secure, metrics=metrics)
        out, err = work / "eda.out", work / "eda.err"
        args = [eda_cmd("eda-lb"), "call", "echo", "-v", "--window", str(WINDOW)]
        if secure:
            args.append("--secure")
        for endpoint in endpoints:
            args += ["--connect", endpoint]
        served = sum(cpu_seconds(w.pid) for w in workers)  # type: ignore[attr-defined]
        reaped = children_cpu()
        start = time.perf_counter()
        proc = procs.start(args, stdin=src, stdout=out, stderr=err)
        code = wait_exit(proc, 300, "eda-lb call")
        elapsed = time.perf_counter() - start
        caller = children_cpu() - reaped  # (the caller is the only child reaped meanwhile)
        served = sum(cpu_seconds(w.pid) for w in workers) - served  # type: ignore[attr-defined]
        if code != 0 or count_lines(out) != n or out.read_bytes() != src.read_bytes():
            raise BenchError(f"eda-lb call exited {code}, {count_lines(out)}/{n}: {tail(err)}")
        p50, p99 = _latency(err)
        if cpu is not None:
            cpu.setdefault("caller", []).append(caller / n)
            cpu.setdefault("workers", []).append(served / n)
        return n / elapsed, p50, p99


def _anchor_run(
    work: Path, env: dict[str, str], n: int, src: Path, mode: str
) -> tuple[float, float, float]:
    script = work / "anchor.py"
    script.write_text(ANCHOR)
    with Procs(work, env) as procs:
        ports = []
        for i in range(3):
            port = free_port()
            err = work / f"anchor{i}.err"
            proc = procs.start([sys.executable, str(script), "server", str(port), mode], stderr=err)
            wait_for_text(err, "ready", 20, proc)
            ports.append(str(port))
        out, err = work / "anchor.out", work / "anchor.err"
        start = time.perf_counter()
        proc = procs.start(
            [sys.executable, str(script), "client", str(n), str(WINDOW), *ports],
            stdin=src, stdout=out, stderr=err,
        )  # fmt: skip
        code = wait_exit(proc, 300, "anchor client")
        elapsed = time.perf_counter() - start
        if code != 0 or count_lines(out) != n:
            raise BenchError(f"anchor client exited {code}, {count_lines(out)}/{n}: {tail(err)}")
        p50, p99 = _latency(err)
        return n / elapsed, p50, p99


FEEDER = r"""
import sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
start, i, total = time.monotonic(), 0, int(rate * seconds)
while i < total:
    due = min(total, int((time.monotonic() - start) * rate))
    if i < due:
        sys.stdout.write("".join(f"req {j}\n" for j in range(i, due)))
        sys.stdout.flush()
        i = due
    time.sleep(0.005)
"""


def _failover(work: Path, env: dict[str, str], quick: bool) -> list[Row]:
    rate, seconds, kill_at = 5000, 4.0 if quick else 8.0, 1.5
    feeder = work / "feeder.py"
    feeder.write_text(FEEDER)
    with Procs(work, env) as procs:
        endpoints, workers = _workers(procs, work)
        out, err = work / "failover.out", work / "failover.err"
        connect = " ".join(f"--connect {e}" for e in endpoints)
        cmd = (
            f"{sys.executable} {feeder} {rate} {seconds} | "
            f"{eda_cmd('eda-lb')} call echo -v --timeout 2 --heartbeat 0.5 {connect}"
        )
        proc = procs.start(["sh", "-c", cmd], stdout=out, stderr=err)
        wait_until(lambda: count_lines(out) >= rate * kill_at, 30, "the load to run")
        victim = workers[0]
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        dropped_after = None
        while proc.poll() is None and time.monotonic() - killed < seconds + 30:
            if dropped_after is None and b"dropped" in err.read_bytes():
                dropped_after = time.monotonic() - killed
            time.sleep(0.005)
        code = wait_exit(proc, 30, "eda-lb call under failover")
        if dropped_after is None and b"dropped" in err.read_bytes():
            dropped_after = time.monotonic() - killed
    text = err.read_text(errors="replace")
    sent = int(rate * seconds)
    got = out.read_bytes().splitlines()
    answered = len(got)
    expected = [b"req %d" % i for i in range(sent)]
    failed = text.count("failed:")
    lost_or_failed = len(set(expected) - set(got)) + failed
    if got != expected and lost_or_failed == 0:
        lost_or_failed = 1  # duplicated or out of order: as bad as a loss here
    ok = code == 0 and lost_or_failed == 0
    rows = [
        row(
            "lb failover kill -9: requests lost or failed", float(lost_or_failed), "", None,
            f"of ~{sent}", higher_is_better=False, target="0", ok=ok,
            note=f"exit {code}, {answered} answered",
        ),
        row(
            "lb failover: dead worker dropped after", dropped_after, "", None, "s",
            higher_is_better=False, target="<= 3 s",
            ok=dropped_after is not None and dropped_after <= 3.0,
            note="no request is sent to a dropped instance",
        ),
    ]  # fmt: skip
    return rows


def run(quick: bool) -> list[Row]:
    n = 50_000 if quick else 200_000
    rounds = 1 if quick else 3
    rows: list[Row] = []
    with scratch("bench-lb-") as work:
        env = eda_env(work)
        src = work / "in.txt"
        _lines(src, n)
        eda, anchor, echo = [], [], []
        cpu: dict[str, list[float]] = {}
        for _ in range(rounds):  # alternate, so load from elsewhere hits both alike
            eda.append(_eda_run(work, env, n, src, cpu))
            anchor.append(_anchor_run(work, env, n, src, "pipe"))
            echo.append(_anchor_run(work, env, n, src, "echo"))
        rate = median([r[0] for r in eda])
        anchor_rate = median([r[0] for r in anchor])
        best = max(eda)
        ratio = rate / anchor_rate
        rows.append(
            row(
                f"lb call, 3 persistent workers, window {WINDOW}", rate, ANCHOR_NAME, anchor_rate,
                "req/s", higher_is_better=True, target=">= 25000 req/s and >= 0.6x",
                ok=rate >= 25_000 and ratio >= 0.6,
                note=f"{n} requests, median of {rounds}; {cpu_note(cpu)}",
            )
        )  # fmt: skip
        rows.append(
            row(
                "lb call latency p50", best[1], ANCHOR_NAME, median([a[1] for a in anchor]), "ms",
                higher_is_better=False,
            )
        )  # fmt: skip
        rows.append(
            row(
                "lb call latency p99", best[2], ANCHOR_NAME, median([a[2] for a in anchor]), "ms",
                higher_is_better=False,
            )
        )  # fmt: skip
        rows.append(
            row(
                "lb call vs raw pyzmq echo (no pipe)", rate, "raw pyzmq ROUTER/DEALER echo",
                median([e[0] for e in echo]), "req/s", higher_is_better=True,
                note="reference: the anchor without the subprocess pipe",
            )
        )  # fmt: skip
        # -- the --via (broker) row goes here: the same measure as the call row, through
        #    `eda-lb serve echo` (owner: the broker's helper)
        rows += _failover(work, env, quick)
    return rows

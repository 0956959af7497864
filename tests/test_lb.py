"""eda-lb request/reply: workers, callers, failover, hostile input (in-process where possible)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from eda.core.errors import UsageError
from eda.core.lb import protocol as p
from eda.core.lb.broker import Broker, Settings
from eda.core.lb.caller import Caller, Summary
from eda.core.lb.callpool import MAX_CONNS
from eda.core.lb.worker import DEPTH, MAX_BROKERS, Worker
from tests.helpers import Proc, Procs, command, wait_until

LB = command("eda-lb")  # as installed (bin/eda-lb)
# a persistent worker command that says who answered: "NAME LINE"
TAGGED = 'while read -r l; do echo "{name} $l"; done'


class Served:
    """A Worker serving in a thread of the test process."""

    def __init__(self, argv: list[str], bind: str = "tcp://127.0.0.1:*", **kw: Any) -> None:
        self.worker = Worker("svc", argv, **kw)
        self.endpoint = self.worker.start(bind)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.serve(until=self._stop.is_set)
        finally:
            self.worker.shutdown()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(argv: list[str], **kw: Any) -> Served:
        served = Served(argv, **kw)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def call(
    endpoints: list[str] | list[tuple[str, int]],
    bodies: list[bytes],
    all_live: bool = False,
    setup: Any = None,
    **kw: Any,
) -> tuple[bytes, list[tuple[int, bytes, str]], Summary, Caller]:
    out: list[bytes] = []
    failed: list[tuple[int, bytes, str]] = []
    kw.setdefault("timeout", 5.0)
    kw.setdefault("heartbeat", 0.3)
    caller = Caller(out=out.append, failed=lambda *f: failed.append(f), **kw)
    if setup is not None:
        setup(caller)
    try:
        caller.use(e if isinstance(e, tuple) else (e, 1) for e in endpoints)
        if all_live:  # every instance answered its first ping: shares start even
            deadline = time.monotonic() + 10
            caller.serve(
                lambda: len(caller.balancer) == len(endpoints) or time.monotonic() > deadline
            )
        caller.feed(bodies)
        summary = caller.run()
    finally:
        caller.close()
    return b"".join(out), failed, summary, caller


@contextlib.contextmanager
def fake_instance(
    answer: Callable[[p.Message], list[list[bytes]]], host: str = "127.0.0.1", delay: float = 0.0
) -> Iterator[str]:
    """A raw ROUTER on *host* that answers pings, and each request with the messages
    *answer* makes of it (*delay* seconds later), in a thread; its endpoint."""
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.IPV6, 1)
    endpoint = f"tcp://{host}:{router.bind_to_random_port(f'tcp://{host}')}"
    stop = threading.Event()

    def serve() -> None:
        due: list[tuple[float, list[bytes]]] = []
        while not stop.is_set():
            for item in [d for d in due if d[0] <= time.monotonic()]:
                due.remove(item)
                router.send_multipart(item[1])
            if not router.poll(10):
                continue
            ident, *frames = router.recv_multipart()
            msg = p.parse(frames)
            if msg.kind == p.PING:
                router.send_multipart([ident, *p.pong(msg.seq, 0, 1, 0)])
            elif msg.kind == p.REQUEST:
                for reply in answer(msg):
                    due.append((time.monotonic() + delay, [ident, *reply]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(5)
        router.close()


def idle(*served: Served) -> None:
    """Every request answered: no slot left taken, nothing queued, no command running."""
    for one in served:
        w = one.worker
        wait_until(lambda w=w: (w.inflight, len(w.queue), len(w.runs)) == (0, 0, 0), 5, "idle")
        assert all(not proc.jobs for proc in w.procs)


def persistent(name: str) -> list[str]:
    return ["sh", "-c", TAGGED.format(name=name)]


def lb(procs: Procs, *args: str, **kw: Any) -> Proc:
    return procs.start([*LB, *args], **kw)


def worker_proc(procs: Procs, port: int, *args: str) -> Proc:
    proc = lb(procs, "worker", "svc", "--no-mdns", "--bind", f"tcp://127.0.0.1:{port}", *args)
    proc.wait_stderr("serving svc", 15)
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- balancing and order ---------------------------------------------------------------------
def test_round_robin_over_three_workers_keeps_input_order(serve: Any) -> None:
    workers = [serve(persistent(n), persistent=True) for n in "abc"]
    bodies = [b"%d" % i for i in range(300)]
    out, failed, summary, _ = call(
        [w.endpoint for w in workers], bodies, window=20, all_live=True, slow_start=0
    )
    lines = out.decode().splitlines()
    assert [line.split()[1] for line in lines] == [b.decode() for b in bodies]
    shares = Counter(line.split()[0] for line in lines)
    assert set(shares) == set("abc") and max(shares.values()) - min(shares.values()) <= 2, shares
    assert not failed and summary.ok == 300 and summary.retried == 0
    idle(*workers)


def test_weighted_share_follows_weights(serve: Any) -> None:
    light, heavy = (
        serve(persistent("light"), persistent=True),
        serve(persistent("heavy"), persistent=True),
    )
    bodies = [b"x"] * 2000
    out, failed, _, _ = call(
        [(light.endpoint, 1), (heavy.endpoint, 3)], bodies, strategy="weighted", window=50,
        all_live=True, slow_start=0,
    )  # fmt: skip
    shares = Counter(line.split()[0] for line in out.decode().splitlines())
    assert not failed
    assert abs(shares["heavy"] - 1500) <= 75 and abs(shares["light"] - 500) <= 25, shares


@pytest.mark.parametrize("strategy", ["least-conn", "random", "p2c"])
def test_every_strategy_uses_every_worker(serve: Any, strategy: str) -> None:
    workers = [serve(persistent(n), persistent=True) for n in "ab"]
    picks: list[tuple[int, int]] = []  # at each pick: the picked one's in flight, the least

    def watch(caller: Caller) -> None:
        balancer = caller.balancer
        started = balancer.started

        def record(backend: Any) -> None:
            picks.append((backend.inflight, min(b.inflight for b in balancer)))
            started(backend)

        balancer.started = record  # type: ignore[method-assign]

    # heartbeats far apart: a loaded machine must not get a worker dropped as silent
    # (its requests would be sent again, each a pick more: picks count attempts)
    out, failed, _, _ = call(
        [w.endpoint for w in workers], [b"y"] * 400, strategy=strategy, all_live=True,
        slow_start=0, setup=watch, heartbeat=2.0, timeout=30.0,
    )  # fmt: skip
    shares = Counter(line.split()[0] for line in out.decode().splitlines())
    assert not failed and sum(shares.values()) == 400 and len(picks) >= 400
    assert min(shares["a"], shares["b"]) > 0, shares
    if strategy == "random":  # blind to load: even shares (binomial: 100 is 10 sigma off)
        assert min(shares.values()) > 100, shares
    else:  # least-conn, and p2c (of two, it compares both), follow the load however uneven
        # the machine makes it: each request goes to an instance with the fewest in flight
        assert all(mine == least for mine, least in picks), picks


def test_concurrent_commands_answer_in_input_order_with_their_request_ids(serve: Any) -> None:
    # each command sleeps a different time: replies finish out of order
    script = 'read -r l; sleep "0.0$(( l % 7 ))"; echo "$l $EDA_REQUEST_ID"'
    worker = serve(["sh", "-c", script], concurrency=8)
    bodies = [b"%d" % i for i in range(40)]
    out, failed, _, caller = call([worker.endpoint], bodies, window=16)
    assert not failed
    lines = out.decode().splitlines()
    assert [line.split()[0] for line in lines] == [b.decode() for b in bodies]
    rids = [line.split()[1] for line in lines]
    assert len(set(rids)) == 40 and all(r.startswith(caller.prefix.decode()) for r in rids)
    # unordered: the first request takes much longer than the seven after it
    slow_first = serve(["sh", "-c", 'read -r l; [ "$l" = 0 ] && sleep 1; echo "$l"'], concurrency=8)
    unordered, failed, _, _ = call(
        [slow_first.endpoint], [b"%d" % i for i in range(8)], window=8, unordered=True
    )
    got = unordered.decode().split()
    assert not failed and sorted(got) == [str(i) for i in range(8)]
    assert got[-1] == "0"  # printed as they came: the slow one last


def test_an_instance_left_out_of_two_lookups_in_a_row_is_drained(serve: Any) -> None:
    a, b = serve(persistent("a"), persistent=True), serve(persistent("b"), persistent=True)
    out: list[bytes] = []
    caller = Caller(out=out.append, failed=lambda *f: None, heartbeat=0.3)
    try:
        caller.use([(a.endpoint, 1), (b.endpoint, 1)])
        deadline = time.monotonic() + 10
        caller.serve(until=lambda: len(caller.balancer) == 2 or time.monotonic() > deadline)
        assert len(caller.balancer) == 2
        caller.use([(a.endpoint, 1)])
        assert b.endpoint in caller.balancer  # one lookup may miss it (a lost mDNS answer)
        caller.use([(a.endpoint, 1)])
        assert b.endpoint not in caller.balancer and b.endpoint not in caller.conns
        caller.feed([b"1", b"2", b"3"])
        caller.run()
    finally:
        caller.close()
    assert b"".join(out) == b"a 1\na 2\na 3\n"


# -- what commands do wrong ----------------------------------------------------------------------
def test_error_exit_empty_output_crash_and_oversize_each_fail_alone(serve: Any) -> None:
    script = (
        'read -r l; case "$l" in bad) echo "first" >&2; echo "it broke" >&2; exit 3;; '
        'crash) kill -9 $$;; quiet) ;; *) echo "ok $l";; esac'
    )
    worker = serve(["sh", "-c", script], concurrency=4, max_request=100)
    bodies = [b"a", b"bad", b"quiet", b"crash", b"x" * 150, b"b"]
    out, failed, summary, _ = call([worker.endpoint], bodies, retries=0)
    assert out == b"ok a\n\nok b\n"  # 'quiet' printed nothing: an empty reply
    reasons = {seq: (line, reason) for seq, line, reason in failed}
    assert reasons[1] == (b"bad", "exit status 3: it broke")
    assert reasons[3] == (b"crash", "killed by signal 9")
    assert reasons[4][1].startswith("request too large (150 bytes")  # the worker's limit
    assert summary.failed == 3 and summary.ok == 3
    idle(worker)
    # the caller's own limit: refused before sending
    out, failed, _, _ = call([worker.endpoint], [b"y" * 300, b"c"], max_request=200)
    assert out == b"ok c\n" and failed[0][2].startswith("request too large (300 bytes")


def test_a_failure_says_why_from_stdout_when_stderr_is_silent_and_a_timeout_asks_first(
    serve: Any, tmp_path: Path
) -> None:
    """core/runner.py's rule in eda-lb: the reason is stderr's last line, else stdout's
    (it used to be stderr's only); a command whose time is up gets SIGTERM before
    SIGKILL, so it may clean up (it used to be killed outright)."""
    flag = tmp_path / "cleaned"
    script = (
        'read -r l; case "$l" in said) echo "no such account"; exit 4;; '
        f'slow) trap "touch {flag}; exit 1" TERM; sleep 30 & wait;; esac'
    )
    worker = serve(["sh", "-c", script], concurrency=2, timeout=0.3)
    _, failed, _, _ = call([worker.endpoint], [b"said", b"slow"], retries=0)
    reasons = {line: reason for _, line, reason in failed}
    assert reasons == {b"said": "exit status 4: no such account", b"slow": "timed out after 0.3s"}
    wait_until(flag.exists, 10, "the timed-out command's SIGTERM trap to run")
    idle(worker)


def test_an_endless_input_line_is_one_error_and_the_lines_after_it_are_served(
    serve: Any,
) -> None:
    """20 MB without a newline: one 'too large' failure, in bounded memory and time."""
    worker = serve(persistent("w"), persistent=True)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(b"before\n")
            chunk = b"x" * (1 << 20)
            for _ in range(20):
                pipe.write(chunk)
            pipe.write(b"\nafter\n")

    writer = threading.Thread(target=feed, daemon=True)
    out: list[bytes] = []
    failed: list[tuple[int, bytes, str]] = []
    caller = Caller(out=out.append, failed=lambda *f: failed.append(f), heartbeat=0.3,
                    max_request=1000)  # fmt: skip
    try:
        caller.use([(worker.endpoint, 1)])
        caller.feed_fd(read_fd)
        writer.start()
        caller.run()
    finally:
        caller.close()
        writer.join(10)
        os.close(read_fd)
    assert b"".join(out) == b"w before\nw after\n"
    [(seq, line, reason)] = failed
    assert seq == 1 and line == b"x" * 1001
    assert reason == f"request too large ({20 << 20} bytes; the limit is 1000)"


def test_a_hanging_command_is_killed_and_the_request_fails_after_its_retries(
    serve: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    script = f'read -r l; echo "$EDA_REQUEST_ID" >> {marker}; exec sleep 30'
    worker = serve(["sh", "-c", script], concurrency=2)
    other = serve(["sh", "-c", script], concurrency=2)
    out, failed, summary, _ = call(
        [worker.endpoint, other.endpoint], [b"slow"], timeout=1.0, retries=1, all_live=True
    )
    assert out == b"" and len(failed) == 1  # (not after the command's 30 s: killed, see below)
    assert failed[0][2] == "timed out (2 attempts)" and summary.timed_out == 1
    wait_until(lambda: len(marker.read_text().split()) == 2, 5, "both attempts to start")
    runs = marker.read_text().split()
    assert len(runs) == 2 and runs[0] == runs[1]  # the retry kept the request id
    wait_until(lambda: worker.worker.timeouts + other.worker.timeouts >= 2, 5, "both killed")
    idle(worker, other)


def test_a_stuck_persistent_command_is_asked_to_stop_before_it_is_killed(
    serve: Any, tmp_path: Path
) -> None:
    """A persistent process stuck past a request's time gets SIGTERM (it may clean up),
    SIGKILL only after a grace; it used to be killed outright."""
    flag = tmp_path / "cleaned"
    script = f'trap "touch {flag}; exit 0" TERM; while read -r l; do sleep 30; done'
    worker = serve(["sh", "-c", script], persistent=True, timeout=0.3)
    _, failed, _, _ = call([worker.endpoint], [b"one"], timeout=5, retries=0)
    assert [f[2][:28] for f in failed] == ["timed out: no reply line (a "]
    wait_until(flag.exists, 10, "the stuck process's SIGTERM trap to run")
    wait_until(lambda: not worker.worker.app.retired, 10, "the old process reaped")
    idle(worker)


def test_a_persistent_command_that_prints_nothing_times_out_and_is_restarted(
    serve: Any,
) -> None:
    worker = serve(["sh", "-c", "cat > /dev/null"], persistent=True)
    out, failed, _, _ = call([worker.endpoint], [b"one", b"two"], timeout=0.3, retries=0)
    assert out == b"" and [f[2] for f in failed] == ["timed out (1 attempt)"] * 2
    wait_until(lambda: worker.worker.timeouts >= 1, 5, "the worker to time the request out")
    idle(worker)
    # with its own --timeout shorter than the caller's, the worker says why: the request
    # stuck at the head fails, the one behind it is sent back (busy) and tried again
    capped = serve(["sh", "-c", "cat > /dev/null"], persistent=True, timeout=0.3)
    out, failed, summary, _ = call([capped.endpoint], [b"one", b"two"], timeout=5, retries=0)
    assert out == b"" and len(failed) == 2 and summary.busy >= 1
    assert all(f[2].startswith("timed out: no reply line") and "stdbuf -oL" in f[2] for f in failed)
    idle(capped)
    answering = serve(persistent("ok"), persistent=True)
    out, failed, _, _ = call([answering.endpoint], [b"three"])
    assert out == b"ok three\n" and not failed


WITH_ID_REVERSED = """
import sys
pending = []
for line in sys.stdin:
    pending.append(line.rstrip("\\n").split("\\t", 1))
    if len(pending) == 2:  # answer two at a time, the second first
        for rid, body in reversed(pending):
            print(f"{rid}\\t{body} {rid}", flush=True)
        pending.clear()
"""


def test_with_id_a_persistent_command_sees_each_request_id_and_may_answer_out_of_order(
    serve: Any,
) -> None:
    worker = serve([sys.executable, "-c", WITH_ID_REVERSED], persistent=True, with_id=True)
    bodies = [b"%d" % i for i in range(8)]
    out, failed, _, caller = call([worker.endpoint], bodies, window=8)
    assert not failed
    replies = out.decode().splitlines()
    # each reply went to its own request: its body, and the id the command saw for it
    assert replies == [f"{i} {caller.prefix.decode()}{i}" for i in range(8)]
    # a shell loop: the id in, the reply (without it) out, in order
    shell = 'while IFS="$(printf "\\t")" read -r id body; do echo "$body from $id"; done'
    plain = serve(["sh", "-c", shell], persistent=True, with_id=True)
    out, failed, _, caller = call([plain.endpoint], [b"a\tb", b"c"])
    assert not failed and out.decode().splitlines() == [
        f"a\tb from {caller.prefix.decode()}0",
        f"c from {caller.prefix.decode()}1",
    ]
    with pytest.raises(UsageError, match="--with-id goes with --persistent"):
        Worker("svc", ["cat"], with_id=True)


def test_a_body_with_nul_bytes_or_a_newline_stays_one_request_to_a_persistent_command(
    serve: Any,
) -> None:
    for with_id in (False, True):
        worker = serve(["cat"], persistent=True, with_id=with_id)
        bodies = [b"a\x00b", b"c\nd", b"e\rf\x00", b"g\n", b"h"]
        out, failed, _, _ = call([worker.endpoint], bodies, retries=0)
        # with --with-id, cat echoes "ID<TAB>body": the id addresses the reply, body remains
        assert out == b"a\x00b\ne\rf\x00\nh\n"
        one_line = "a persistent worker takes one line per request"
        assert [(f[0], f[2]) for f in failed] == [(1, one_line), (3, one_line)]
        idle(worker)


def test_retry_goes_to_another_worker_with_the_same_request_id(serve: Any, tmp_path: Path) -> None:
    stuck_log, good_log = tmp_path / "stuck", tmp_path / "good"
    stuck = serve(
        ["sh", "-c", f'cat >/dev/null; echo "$EDA_REQUEST_ID" >> {stuck_log}; exec sleep 30'],
        concurrency=8,
    )
    good = serve(
        [
            "sh",
            "-c",
            f'cat >/dev/null; echo "$EDA_REQUEST_ID" >> {good_log}; echo "$EDA_REQUEST_ID"',
        ],
        concurrency=8,
    )
    out, failed, summary, _ = call(
        [stuck.endpoint, good.endpoint], [b"r%d" % i for i in range(6)], timeout=1.0, retries=2
    )
    assert not failed
    answered = out.decode().split()
    assert len(answered) == len(set(answered)) == 6  # each answered once
    wait_until(lambda: len(stuck_log.read_text().split()) == summary.retried, 5, "the log")
    retried = stuck_log.read_text().split()
    assert retried
    assert set(retried) <= set(good_log.read_text().split()) == set(answered)


def test_busy_workers_are_retried_elsewhere_without_failing(serve: Any) -> None:
    slow = ["sh", "-c", 'read -r l; sleep 0.1; echo "$l"']
    worker = serve(slow, concurrency=1, queue=0)
    out, failed, summary, _ = call([worker.endpoint], [b"%d" % i for i in range(5)], window=5)
    assert out == b"0\n1\n2\n3\n4\n" and not failed
    assert summary.busy > 0  # it was at capacity, answered busy, and the caller came back
    idle(worker)


# -- failover -----------------------------------------------------------------------------------
def test_kill_9_of_a_worker_under_load_loses_nothing(procs: Procs) -> None:
    ports = [free_port() for _ in range(3)]
    workers = [worker_proc(procs, port, "--persistent", "--", "cat") for port in ports]
    caller = lb(
        procs, "call", "svc", "-v", "--heartbeat", "0.3", "--timeout", "2",
        *[a for port in ports for a in ("--connect", f"tcp://127.0.0.1:{port}")],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    stdin = caller.popen.stdin
    assert stdin is not None
    sent = 0

    def feed(count: int) -> None:
        nonlocal sent
        stdin.write(b"".join(b"line %d\n" % i for i in range(sent, sent + count)))
        stdin.flush()
        sent += count

    for _ in range(5):
        feed(200)
    caller.wait_lines(500)
    workers[0].signal(signal.SIGKILL)  # kill -9, mid-stream
    for _ in range(5):
        feed(200)
        time.sleep(0.02)  # a steady stream, not one burst
    caller.wait_stderr("dropped", 5)
    feed(500)
    stdin.close()
    assert caller.wait(20) == 0, caller.stderr
    assert caller.lines() == [f"line {i}" for i in range(sent)]
    assert "failed:" not in caller.stderr and " 0 failed" in caller.stderr


def test_a_frozen_worker_is_dropped_by_heartbeats_and_its_requests_retried(
    procs: Procs,
) -> None:
    ports = [free_port() for _ in range(2)]
    frozen, _ = (
        worker_proc(procs, port, "--persistent", "--", "sh", "-c", TAGGED.format(name=name))
        for port, name in zip(ports, ("frozen", "alive"), strict=True)
    )
    caller = lb(
        procs, "call", "svc", "--heartbeat", "0.2", "--timeout", "10",
        *[a for port in ports for a in ("--connect", f"tcp://127.0.0.1:{port}")],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    stdin = caller.popen.stdin
    assert stdin is not None
    stdin.write(b"".join(b"%d\n" % i for i in range(10)))
    stdin.flush()
    assert {line.split()[0] for line in caller.wait_lines(10)} == {"frozen", "alive"}
    frozen.signal(signal.SIGSTOP)  # its connection stays open: only heartbeats can tell
    try:
        stdin.write(b"".join(b"%d\n" % i for i in range(10, 30)))
        stdin.close()
        assert caller.wait(30) == 0, caller.stderr
    finally:
        frozen.signal(signal.SIGCONT)
    assert "dropped: it stopped answering" in caller.stderr
    lines = caller.lines()
    assert [line.split()[1] for line in lines] == [str(i) for i in range(30)]
    assert all(line.startswith("alive") for line in lines[10:])
    # retried because the heartbeats dropped the frozen worker, not after a request timeout
    assert "timed out" not in caller.stderr and "failed" not in caller.stderr


# -- the wire: stats, ping, hostile peers -------------------------------------------------------
def dealer(endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def answer(sock: zmq.Socket[bytes], timeout: float = 5.0) -> p.Message:
    assert sock.poll(int(timeout * 1000)), "no answer"
    return p.parse(sock.recv_multipart())


def test_ping_and_stats_are_answered(serve: Any) -> None:
    worker = serve(persistent("s"), persistent=True, concurrency=2)
    call([worker.endpoint], [b"1", b"2", b"3"])
    sock = dealer(worker.endpoint)
    try:
        sock.send_multipart(p.ping(7))
        pong = answer(sock)
        assert pong.kind == p.PONG and pong.seq == 7
        assert pong.data == {"inflight": 0, "concurrency": 2, "queued": 0}
        sock.send_multipart(p.stats_query())
        stats = answer(sock)
        assert stats.kind == p.STATS and stats.data is not None
        assert stats.data["requests"] == 3 and stats.data["errors"] == 0
        assert stats.data["latency_ms"]["p50"] > 0 and stats.data["role"] == "worker"
    finally:
        sock.close()


HOSTILE: list[list[bytes]] = [
    [b"garbage"],
    [b"EDALB1"],
    [b"EDALB1", b"Q"],
    [b"EDALB1", b"Q", b"r", b"0"],
    [b"EDALB1", b"Q", b"\x00bad", b"0", b"x"],
    [b"EDALB1", b"Q", b"r", b"-5", b"x"],
    [b"EDALB1", b"Q", b"r" * 100, b"0", b"x"],
    [b"EDALB1", b"R", b"r", b"ok", b"x"],
    [b"EDALB1", b"W", b"{}"],
    [b"EDALB1", b"H"],
    [b"EDALB1", b"P", b"nan"],
    [b"EDALB2", b"P", b"1"],
    [b"", b"EDALB1", b"P", b"1"],
    [b"\xff" * 10] * 20,
]


def test_hostile_frames_are_dropped_and_the_worker_keeps_serving(serve: Any) -> None:
    worker = serve(persistent("w"), persistent=True, max_request=1000)
    attacker = dealer(worker.endpoint)
    flood = dealer(worker.endpoint)
    try:
        for frames in HOSTILE:
            attacker.send_multipart(frames)
        flood.send_multipart([b"x" * 100_000])  # far over the message limit: its connection goes
        out, failed, _, _ = call([worker.endpoint], [b"%d" % i for i in range(20)])
        assert out.decode().split("\n")[:-1] == [f"w {i}" for i in range(20)] and not failed
        wait_until(lambda: worker.worker.malformed >= len(HOSTILE) - 1, 5, "malformed counted")
        assert worker.worker.failures == 0
        assert not attacker.poll(200)  # nothing is answered to garbage
    finally:
        attacker.close()
        flood.close()


def test_a_peer_flooding_pings_does_not_starve_callers(serve: Any) -> None:
    worker = serve(persistent("w"), persistent=True)
    flood = dealer(worker.endpoint)
    flood.setsockopt(zmq.SNDHWM, 0)
    stop = threading.Event()

    def pings() -> None:  # never reads its pongs
        seq = 0
        while not stop.is_set() and seq < 300_000:
            flood.send_multipart(p.ping(seq))
            seq += 1

    thread = threading.Thread(target=pings, daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.worker.sock is not None, 5, "the worker")
        out, failed, _, _ = call([worker.endpoint], [b"%d" % i for i in range(50)], timeout=10)
    finally:
        stop.set()
        thread.join(10)
        flood.close()
    assert out.decode().split("\n")[:-1] == [f"w {i}" for i in range(50)] and not failed
    assert worker.worker.failures == 0  # every request answered within its timeout (above)
    # stats queries cost more (a sort of the latencies): 50 a second are answered at most
    asker = dealer(worker.endpoint)
    try:
        started = time.monotonic()
        for _ in range(1000):
            asker.send_multipart(p.stats_query())
        answers = 0
        while asker.poll(300):
            asker.recv_multipart()
            answers += 1
        took = time.monotonic() - started
    finally:
        asker.close()
    assert 1 <= answers <= 50 * (took + 1) + 1, (answers, took)
    wait_until(lambda: worker.worker.stats_dropped >= 700, 5, "the flood dropped")


def test_an_oversize_or_garbage_reply_costs_the_caller_nothing(serve: Any) -> None:
    """An instance answering far over the size limit loses its connection (ZeroMQ's
    MAXMSGSIZE); one answering garbage is dropped; the requests go elsewhere."""
    good = serve(persistent("good"), persistent=True)
    huge = b"x" * (3 << 20)

    def hostile(msg: p.Message) -> list[list[bytes]]:
        return [p.reply(msg.rid, p.OK, huge), [p.TAG, p.REPLY, msg.rid, b"ok"]]

    with fake_instance(hostile) as endpoint:
        out, failed, summary, _ = call(
            [endpoint, good.endpoint], [b"%d" % i for i in range(10)],
            all_live=True, slow_start=0, timeout=2, max_request=1 << 20,
        )  # fmt: skip
    assert out.decode().split("\n")[:-1] == [f"good {i}" for i in range(10)] and not failed
    assert summary.retried + summary.dropped_instances > 0


def test_a_hostile_instance_cannot_answer_twice_or_break_the_caller() -> None:
    """Garbage, replies to requests never made and duplicates: counted, ignored."""

    def hostile(msg: p.Message) -> list[list[bytes]]:
        return [
            [b"junk"], [p.TAG, p.REPLY, b"\x00", p.OK, b"x"], [p.TAG, b"Z"],
            p.reply(b"never-asked.1", p.OK, b"forged"),
            p.reply(msg.rid, p.OK, b"got " + msg.body),
            p.reply(msg.rid, p.OK, b"again " + msg.body),
        ]  # fmt: skip

    with fake_instance(hostile) as endpoint:
        out, failed, summary, caller = call([endpoint], [b"a", b"b", b"c"])
    assert out == b"got a\ngot b\ngot c\n" and not failed
    # forged and duplicate replies; the caller may end before the duplicate of the last
    # request arrives, so 3 forged and 2 duplicates are sure to be read: 5
    assert caller.malformed >= 9 and summary.late >= 5


def test_an_instance_cannot_answer_a_request_sent_to_another() -> None:
    """A hostile instance that answers with rids it guessed (the caller's prefix and
    counter): only the instance a request went to (or timed out at) may answer it."""

    def honest(msg: p.Message) -> list[list[bytes]]:  # answered after 0.3 s
        return [p.reply(msg.rid, p.OK, b"honest " + msg.body)]

    def hostile(msg: p.Message) -> list[list[bytes]]:  # its own request, and every rid guessed
        prefix = msg.rid.rsplit(b".", 1)[0]
        return [p.reply(b"%s.%d" % (prefix, n), p.OK, b"X") for n in range(6)]

    with fake_instance(hostile) as forger, fake_instance(honest, delay=0.3) as slow:
        out, failed, _, caller = call(
            [forger, slow], [b"%d" % i for i in range(6)], all_live=True, slow_start=0, window=6
        )
    lines = out.decode().splitlines()
    assert not failed and len(lines) == 6
    honest = [line for line in lines if line.startswith("honest")]
    assert len(honest) == 3 and caller.malformed >= 3  # the forged ones: dropped, counted


def test_an_instance_whose_command_keeps_failing_is_ejected(serve: Any) -> None:
    """Error replies count as failures (as Envoy counts consecutive 5xx): the instance
    is ejected, each error reply stays final (not retried)."""
    good = serve(persistent("good"), persistent=True)
    bad = serve(["sh", "-c", "echo broken >&2; exit 1"])
    out: list[bytes] = []
    failed: list[tuple[int, bytes, str]] = []
    caller = Caller(out=out.append, failed=lambda *f: failed.append(f), heartbeat=0.3,
                    window=1, slow_start=0)  # fmt: skip
    caller.balancer.eject_after, caller.balancer.eject_base = 3, 30.0
    try:
        caller.use([(good.endpoint, 1), (bad.endpoint, 1)])
        deadline = time.monotonic() + 10
        caller.serve(lambda: len(caller.balancer) == 2 or time.monotonic() > deadline)
        caller.feed([b"%d" % i for i in range(20)])
        summary = caller.run()
    finally:
        caller.close()
    assert [f[2] for f in failed] == ["exit status 1: broken"] * 3 and summary.retried == 0
    assert b"".join(out).decode().split("\n")[:-1] == [
        f"good {i}" for i in range(20) if i not in {f[0] for f in failed}
    ]
    assert bad.worker.requests == 3


def test_a_flood_of_announced_fake_instances_costs_bounded_sockets_and_no_hang(
    serve: Any,
) -> None:
    """Anyone can announce instances by mDNS: 1500 fakes (ports that refuse, and some
    that accept but never answer) listed before the real one. The caller connects to a
    bounded number at a time, passes over those that do not answer, and finds it."""
    real = serve(persistent("real"), persistent=True)
    silent = []
    for _ in range(3):  # accept the connection, never answer a ping
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        silent.append((sock, sock.bind_to_random_port("tcp://127.0.0.1")))
    fakes = [f"tcp://127.0.0.{2 + i // 500}:{30000 + i % 500}" for i in range(1500)]
    found = [f"tcp://127.0.0.1:{port}" for _, port in silent] + fakes + [real.endpoint]
    most = 0

    def watch(caller: Caller) -> None:
        opened = caller.pool._open

        def counting(conn: Any) -> None:
            nonlocal most
            opened(conn)
            most = max(most, len(caller.conns))

        caller.pool._open = counting  # type: ignore[method-assign]

    try:
        out, failed, _, caller = call(found, [b"a", b"b"], timeout=15, setup=watch)
    finally:
        for sock, _ in silent:
            sock.close()
    assert out == b"real a\nreal b\n" and not failed
    assert most <= MAX_CONNS  # (the caller's own timeout of 15 s bounded the search)
    assert not caller.conns  # all closed at the end


# -- brokers, seen from the worker ---------------------------------------------------------------
def test_worker_serves_a_broker_and_reconnects_when_it_falls_silent(serve: Any) -> None:
    backend: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    backend.setsockopt(zmq.LINGER, 0)
    port = backend.bind_to_random_port("tcp://127.0.0.1")
    try:
        worker = serve(
            persistent("b"), persistent=True, heartbeat=0.3, concurrency=3, weight=2,
            find_brokers=lambda: [f"tcp://127.0.0.1:{port}"],
        )  # fmt: skip

        def message(timeout: float = 5.0) -> tuple[bytes, p.Message]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if backend.poll(100):
                    ident, *frames = backend.recv_multipart()
                    msg = p.parse(frames)
                    if msg.kind != p.HEARTBEAT:
                        return ident, msg
            raise AssertionError("no message from the worker")

        ident, ready = message()
        assert ready.kind == p.READY and ready.data is not None
        assert ready.data["service"] == "svc" and ready.data["concurrency"] == 3
        assert ready.data["weight"] == 2
        assert ready.data["capacity"] == 3 * DEPTH  # requests pipelined into its processes
        backend.send_multipart([ident, *p.heartbeat()])
        backend.send_multipart([ident, *p.request(b"via.1", 1000, b"hello")])
        _, reply = message()
        assert (reply.kind, reply.rid, reply.status, reply.body) == (
            p.REPLY,
            b"via.1",
            p.OK,
            b"b hello",
        )
        # no heartbeat from the broker for 3 intervals: the worker reconnects and says W again
        started = time.monotonic()
        ident2, again = message(5)
        assert again.kind == p.READY and time.monotonic() - started >= 0.6
        backend.send_multipart([ident2, *p.disconnect()])  # a broker's goodbye: back later
        ident3, third = message(5)
        assert third.kind == p.READY
        link = worker.worker.brokers[f"tcp://127.0.0.1:{port}"]
        linked = link.sock
        backend.send_multipart([ident3, *p.heartbeat()])
        # the broker restarts on the same port: ZeroMQ reconnects, the worker says W at once
        backend.close()
        backend = zmq.Context.instance().socket(zmq.ROUTER)
        backend.setsockopt(zmq.LINGER, 0)

        def rebound() -> bool:
            try:
                backend.bind(f"tcp://127.0.0.1:{port}")
            except zmq.ZMQError:  # the old listener is released by ZeroMQ's I/O thread
                return False
            return True

        wait_until(rebound, 5, "the port to be free again")
        _, fourth = message(5)
        assert fourth.kind == p.READY
        assert link.sock is linked  # the same connection, not a reconnect after silence
    finally:
        backend.close()


def test_forged_broker_announcements_cannot_keep_a_worker_from_its_broker(serve: Any) -> None:
    """Brokers announced with forged backend ports -- the worker's own port, a port that
    speaks garbage, another service's broker, and many that are not there -- cost the
    worker a bounded number of links; it reaches the real broker in turn and serves."""
    import socket as sockets

    brokers = []
    for service in ("svc", "other"):
        broker = Broker(Settings(service=service, bind="tcp://127.0.0.1:*",
                                 backend="tcp://127.0.0.1:*", heartbeat=0.1))  # fmt: skip
        broker.start()
        brokers.append(broker)
    stop = threading.Event()
    real, other = brokers
    garbage = sockets.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen(8)
    garbage.settimeout(0.05)

    def speak_garbage() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = garbage.accept()
                with conn:
                    conn.sendall(b"\xff" * 64 + b"HTTP/1.0 200 OK\r\n\r\n")

    threads = [threading.Thread(target=b.serve, args=(stop.is_set,)) for b in brokers]
    threads.append(threading.Thread(target=speak_garbage, daemon=True))
    for thread in threads:
        thread.start()
    found: list[list[str]] = [[]]
    worker = serve(persistent("w"), persistent=True, heartbeat=0.1, find_brokers=lambda: found[0])
    fakes = [f"tcp://127.0.0.3:{31000 + i}" for i in range(40)]
    found[0] = [
        worker.endpoint, f"tcp://127.0.0.1:{garbage.getsockname()[1]}",
        other.backend_endpoint, *fakes, real.backend_endpoint,
    ]  # fmt: skip
    most = 0

    def linked() -> bool:
        nonlocal most
        most = max(most, len(worker.worker.brokers))
        return len(real.workers) == 1

    try:
        wait_until(linked, 15, "the worker at the real broker")
        out, failed, _, _ = call([real.endpoint], [b"via", b"broker"])
        assert out == b"w via\nw broker\n" and not failed
    finally:
        stop.set()
        for thread in threads[:2]:
            thread.join(5)
        for broker in brokers:
            broker.close()
        garbage.close()
    assert most <= MAX_BROKERS and not other.workers
    assert worker.worker.failures == 0 and worker.worker.malformed > 0  # its own W, H: dropped
    heard = [e for e, link in worker.worker.brokers.items() if link.heard]
    assert heard == [real.backend_endpoint]


# -- the command line: registration, discovery, exit statuses -----------------------------------
def test_cli_worker_found_by_mdns_and_gone_after_sigterm(procs: Procs) -> None:
    worker = lb(procs, "worker", "upper", "-v", "--serverless", "--", "tr", "a-z", "A-Z")
    worker.wait_stderr("serving upper", 20)
    result = subprocess.run(
        [*LB, "call", "upper", "--serverless", "hello", "world"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HELLO\nWORLD\n"
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    gone = subprocess.run(
        [*LB, "call", "upper", "--serverless", "hello"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert gone.returncode == 3 and b"no passing worker" in gone.stderr


def test_a_worker_announced_by_mdns_moves_to_a_registry_that_appears(procs: Procs) -> None:
    worker = lb(procs, "worker", "svc", "-v", "--", "cat")
    worker.wait_stderr(r"serving svc on \S+ \(announced by mDNS\)", 20)
    registry = procs.start(
        [*command("eda-registry"), "serve", "-v", "--bind", "tcp://127.0.0.1:*",
         "--tick", "0.1"],
    )  # fmt: skip
    endpoint = registry.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    worker.wait_stderr("moved to registry", 20)
    reg = ["--no-mdns", "--registry", endpoint]
    found = subprocess.run([*LB, "call", "svc", *reg, "hi"], capture_output=True, timeout=30)
    assert (found.returncode, found.stdout) == (0, b"hi\n"), found.stderr
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    gone = subprocess.run([*LB, "call", "svc", *reg, "hi"], capture_output=True, timeout=30)
    assert gone.returncode == 3  # deregistered from the registry it moved to


def test_sigterm_lets_a_running_request_finish_before_the_worker_exits(
    procs: Procs, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    port = free_port()
    script = f'cat >/dev/null; touch {started}; sleep 0.5; echo "done $EDA_REQUEST_ID"'
    worker = worker_proc(procs, port, "--", "sh", "-c", script)
    caller = lb(procs, "call", "svc", "--connect", f"tcp://127.0.0.1:{port}", "slow")
    wait_until(started.exists, 10, "the command to start")
    worker.signal(signal.SIGTERM)
    assert caller.wait(10) == 0, caller.stderr
    assert caller.stdout.startswith("done ")
    assert worker.wait(10) == 0


def test_a_closed_output_pipe_ends_call_quietly(procs: Procs) -> None:
    port = free_port()
    worker_proc(procs, port, "--persistent", "--", "cat")
    call_cmd = " ".join([*LB, "call", "svc", "--connect", f"tcp://127.0.0.1:{port}"])
    script = f'seq 1 1000000 | {call_cmd} | head -n 2; echo "status ${{PIPESTATUS[1]}}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, timeout=30, check=False)
    assert result.stdout == b"1\n2\nstatus 0\n", result.stderr
    assert result.stderr == b""


def test_cli_call_reports_each_failure_with_its_input_and_exits_1(procs: Procs) -> None:
    port = free_port()
    script = 'read -r l; [ "$l" = no ] && { echo "refused $l" >&2; exit 2; }; echo "yes $l"'
    worker_proc(procs, port, "--concurrency", "2", "--", "sh", "-c", script)
    endpoint = f"tcp://127.0.0.1:{port}"
    result = subprocess.run(
        [*LB, "call", "svc", "--connect", endpoint], input=b"a\nno\nb\n",
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == b"yes a\nyes b\n"
    err = result.stderr.decode()
    assert "request 2 failed: exit status 2: refused no; input: no" in err
    assert "1 request(s) failed" in err
    timeout = subprocess.run(
        [*LB, "call", "svc", "--connect", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3"],
        input=b"lost\n", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert timeout.returncode == 3 and b"no live instance of tcp://" in timeout.stderr
    assert b"(input from line 1 on not sent)" in timeout.stderr
    # --with-id: the persistent command reads "ID<TAB>request"
    with_id = free_port()
    loop = 'while IFS= read -r l; do echo "got $l"; done'
    worker_proc(procs, with_id, "--persistent", "--with-id", "--", "sh", "-c", loop)
    result = subprocess.run(
        [*LB, "call", "svc", "--connect", f"tcp://127.0.0.1:{with_id}", "x"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rb"got [0-9a-f]+-[0-9a-f]{4}\.0\tx\n", result.stdout), result.stdout


def test_new_instances_are_used_and_via_goes_to_brokers_only(procs: Procs, serve: Any) -> None:
    registry = procs.start(
        [*command("eda-registry"), "serve", "--no-mdns", "--bind",
         "tcp://127.0.0.1:*"],
    )  # fmt: skip
    endpoint = registry.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    reg = ["--no-mdns", "--registry", endpoint]
    first = lb(
        procs, "worker", "svc", *reg, "--persistent", "--", "sh", "-c", TAGGED.format(name="one")
    )
    first.wait_stderr("serving svc", 15)
    caller = lb(procs, "call", "svc", *reg, "--heartbeat", "0.3", stdin=subprocess.PIPE)
    stdin = caller.popen.stdin
    assert stdin is not None
    stdin.write(b"a\n")
    stdin.flush()
    assert caller.wait_lines(1) == ["one a"]
    second = lb(
        procs, "worker", "svc", *reg, "--persistent", "--", "sh", "-c", TAGGED.format(name="two")
    )
    second.wait_stderr("serving svc", 15)
    sent = 1

    def two_answered() -> bool:
        nonlocal sent
        stdin.write(b"x\n")
        stdin.flush()
        sent += 1
        time.sleep(0.05)
        return any(line.startswith("two") for line in caller.lines())

    wait_until(two_answered, 10, "the new worker to get requests")
    stdin.close()
    assert caller.wait(15) == 0
    assert len(caller.lines()) == sent
    lookup = subprocess.run(
        [*command("eda-registry"), "lookup", "svc", *reg],
        capture_output=True, timeout=15, check=False,
    )  # fmt: skip
    metas = [json.loads(line)["meta"] for line in lookup.stdout.splitlines()]
    assert metas and all(m["role"] == "worker" and m["concurrency"] == "1" for m in metas)
    # --via: the instances registered with role=broker (a broker's frontend speaks as a
    # worker does: an in-process worker stands in for it here)
    front = serve(persistent("broker"), persistent=True)
    registered = procs.start(
        [*command("eda-registry"), "register", "-v", "svc", *reg, "--host",
         "127.0.0.1", "--port", front.endpoint.rsplit(":", 1)[1], "--meta", "role=broker"],
    )  # fmt: skip
    registered.wait_stderr("registered svc/", 15)
    via = subprocess.run(
        [*LB, "call", "svc", "--via", "svc", *reg, "hi"], capture_output=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert (via.returncode, via.stdout) == (0, b"broker hi\n"), via.stderr
    direct = subprocess.run(
        [*LB, "call", "svc", *reg, "a", "b", "c", "d"], capture_output=True, timeout=30,
        check=False,
    )  # fmt: skip
    # without --via, only workers answer (never the broker); that both workers are used is
    # shown above: which of them answers four requests of a fresh caller is a race (the first
    # to answer its ping takes them all when the other's ping answer comes later, under load)
    tags = [line.split()[0] for line in direct.stdout.splitlines()]
    assert direct.returncode == 0 and len(tags) == 4, direct.stderr
    assert set(tags) <= {b"one", b"two"}


# -- memory bounded per caller ---------------------------------------------------------------
def vm_kib(pid: int, field: str) -> int:
    """A /proc/PID/status figure (VmRSS, VmHWM: the peak RSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def stats_of(endpoint: str) -> dict[str, Any]:
    sock = dealer(endpoint)
    try:
        sock.send_multipart(p.stats_query())
        data = answer(sock).data
        assert data is not None
        return data
    finally:
        sock.close()


def never_reads(endpoint: str) -> zmq.Socket[bytes]:
    """A DEALER that sends requests and takes in (almost) none of its replies."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.connect(endpoint)
    return sock


def flood(sock: zmq.Socket[bytes], count: int, size: int) -> int:
    """Send *count* requests of *size* bytes (one line each); how many went."""
    body = b"x" * (size - 1)
    sent = 0
    with contextlib.suppress(zmq.Again):
        for i in range(count):
            sock.send_multipart(p.request(b"a%d" % i, 0, body))
            sent += 1
    return sent


MIB = 1024


def test_a_caller_that_never_reads_costs_the_worker_bounded_memory(procs: Procs) -> None:
    # 2,400 requests of 256 KiB, replies never read: the worker used to keep them all
    # (its ROUTER queues 100,000 messages per peer), 500-650 MB, most of it after the
    # caller left; now bytes per caller are bounded, and a good caller is served meanwhile
    port = free_port()
    proc = worker_proc(procs, port, "--persistent", "--", "cat")
    endpoint = f"tcp://127.0.0.1:{port}"
    out, failed, _, _ = call([endpoint], [b"warm %d" % i for i in range(50)])
    assert not failed
    before = vm_kib(proc.popen.pid, "VmRSS")
    attacker = never_reads(endpoint)
    try:
        assert flood(attacker, 2400, 256 << 10) == 2400
        wait_until(lambda: stats_of(endpoint)["busy"] > 0, 30, "the caller's requests refused")
        out, failed, _, _ = call([endpoint], [b"good %d" % i for i in range(200)], timeout=10)
        assert out.decode().split("\n")[:-1] == [f"good {i}" for i in range(200)] and not failed
        peak = vm_kib(proc.popen.pid, "VmHWM")
        assert peak - before < 100 * MIB, (before, peak)  # 600 MB of replies were asked for
        figures = stats_of(endpoint)
        assert figures["unsent"] > 0 and figures["unread_bytes"] <= 8 << 20
    finally:
        attacker.close()
    wait_until(lambda: stats_of(endpoint)["unread_bytes"] == 0, 10, "the replies let go")
    out, failed, _, _ = call([endpoint], [b"after"])
    assert out == b"after\n" and not failed
    assert vm_kib(proc.popen.pid, "VmRSS") - before < 96 * MIB


# -- no live instance, overall deadline ----------------------------------------------------------
class Hanging:
    """An instance that answers pings and never a request; it keeps each timeout_ms it got."""

    def __init__(self) -> None:
        self.router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.timeouts_ms: list[int] = []
        self.rids: list[bytes] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            ident, *frames = self.router.recv_multipart()
            msg = p.parse(frames)
            if msg.kind == p.PING:
                self.router.send_multipart([ident, *p.pong(msg.seq, 0, 1, 0)])
            elif msg.kind == p.REQUEST:
                self.timeouts_ms.append(msg.timeout_ms)
                self.rids.append(msg.rid)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.router.close()


def test_timeout_is_the_request_s_overall_deadline_shared_by_its_attempts() -> None:
    """--timeout 1 --retries 2 over three instances that never answer: three attempts
    whose timeouts (as the instances are told them) add up to no more than 1 s, then exit
    4 with the attempts counted.  With one instance, one attempt gets the whole time (a
    retry there would only wait behind the same queue)."""
    hanging = [Hanging() for _ in range(3)]
    solo = Hanging()
    connects = [arg for h in hanging for arg in ("--connect", h.endpoint)]
    try:
        result = subprocess.run(
            [*LB, "call", "svc", *connects, "--timeout", "1", "--retries", "2", "x"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        alone = subprocess.run(
            [*LB, "call", "svc", "--connect", solo.endpoint, "--timeout", "1", "y"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        for h in [*hanging, solo]:
            h.close()
    err = result.stderr.decode()
    assert result.returncode == 4, err
    assert "request 1 failed: timed out (3 attempts); input: x" in err
    timeouts = [t for h in hanging for t in h.timeouts_ms]
    assert [len(h.timeouts_ms) for h in hanging] == [1, 1, 1]  # each instance tried once
    assert len({rid for h in hanging for rid in h.rids}) == 1  # the same request id
    assert sum(timeouts) <= 1000, timeouts
    assert 333 in timeouts  # an equal share: the first attempt gets a third
    assert alone.returncode == 4 and solo.timeouts_ms == [1000], alone.stderr
    assert b"request 1 failed: timed out (1 attempt); input: y" in alone.stderr


def test_with_no_live_instance_call_fails_once_with_exit_3() -> None:
    """An endless input and an instance that is not there: one error line, not one per
    request, and the input is not read to its end."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    call_cmd = " ".join([*LB, "call", "svc", "--connect", endpoint])
    script = f'yes line | head -c 5000000 | {call_cmd}; echo "status ${{PIPESTATUS[2]}}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, timeout=60, check=False)
    assert result.stdout == b"status 3\n", result.stderr[-500:]
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    expected = rf"eda-lb: error: no live instance of {endpoint} for [\d.]+ s "
    assert re.fullmatch(expected + r"\(input from line 1 on not sent\)", lines[0]), lines


def test_when_every_instance_dies_mid_stream_the_caller_stops_once(serve: Any) -> None:
    """The requests sent are each reported (at most a window of them), the rest not sent;
    the caller waits a request's time for an instance to come back, then stops."""
    worker = serve(["sh", "-c", "read -r l; echo $l"], concurrency=4)
    count = 0

    def bodies() -> Iterator[bytes]:
        nonlocal count
        while True:
            count += 1
            if count == 20:
                worker.stop()
            yield b"%d" % count

    out: list[bytes] = []
    failed: list[tuple[int, bytes, str]] = []
    caller = Caller(out=out.append, failed=lambda *f: failed.append(f), timeout=1.0,
                    heartbeat=0.3, window=4)  # fmt: skip
    try:
        caller.use([(worker.endpoint, 1)])
        caller.feed(bodies())
        summary = caller.run()
    finally:
        caller.close()
    assert summary.no_instance and summary.unsent is not None
    # every line before the first one not sent: answered, or reported once
    assert summary.ok >= 10 and summary.ok + summary.failed == summary.unsent
    *sent, first_unsent = failed
    assert first_unsent == (summary.unsent, b"%d" % (summary.unsent + 1), "no live instance (not sent)")
    assert len(sent) == summary.failed and len({seq for seq, _, _ in sent}) == len(sent)
    assert all(seq < summary.unsent for seq, _, _ in sent)
    assert summary.no_instance_for >= 1.0  # a whole request's time for one to come back
    assert count < 100  # the endless input was not read on


def test_an_instance_that_comes_up_just_after_the_caller_is_used(serve: Any) -> None:
    """`eda-lb worker ... & eda-lb call ...`: giving up fast does not mean giving up before
    an instance starting at the same time had its chance."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"

    def late(caller: Caller) -> None:  # the worker starts 0.6 s after the caller
        start = lambda: serve(persistent("late"), bind=endpoint, persistent=True)  # noqa: E731
        caller.after(0.6, "late worker", start)

    out, failed, summary, _ = call([endpoint], [b"a", b"b"], heartbeat=0.3, setup=late)
    assert out == b"late a\nlate b\n" and not failed and not summary.no_instance


def test_caller_worker_and_broker_report_the_same_percentiles_for_the_same_samples() -> None:
    """One percentile definition (nearest rank, core/measure.py) in every figure of
    ``eda-lb stats`` and of a caller's summary: the same samples, the same p50/p99."""
    import random

    from eda.core.lb.balancer import Backend
    from eda.core.lb.brokerworkers import Worker as Entry

    samples = [n / 1000 for n in range(1, 101)]  # 1 ms .. 100 ms
    random.Random(7).shuffle(samples)
    caller = Caller(out=lambda _b: None, failed=lambda *f: None)
    worker = Worker("svc", ["cat"])
    broker = Broker(Settings(service="svc"))
    try:
        caller.latencies.extend(samples)
        worker.latencies.extend(samples)
        entry = Entry(b"w", "w-1", 1, 1, Backend("w-1", 1), 0.0, 1.0)
        entry.latencies.extend(samples)
        broker.workers[b"w"] = entry
        from_caller = {"p50": caller.percentile(0.5), "p99": caller.percentile(0.99)}
        from_worker = worker.figures()["latency_ms"]
        [from_broker] = [i["latency_ms"] for i in broker.stats()["instances"]]
        for figures in (from_caller, from_worker, from_broker):
            assert (figures["p50"], figures["p99"]) == (50.0, 99.0), figures
        assert from_worker == from_broker  # p90 and max too
    finally:
        caller.close()
        worker.close()
        broker.close()


def test_a_caller_reaches_an_instance_on_ipv6() -> None:
    """An IPv6 endpoint connected without ZeroMQ's IPV6 option accepts the connect and
    never delivers: the caller's sockets connect through core/sockets.connect."""

    def upper(msg: p.Message) -> list[list[bytes]]:
        return [p.reply(msg.rid, p.OK, msg.body.upper())]

    with fake_instance(upper, host="[::1]") as endpoint:
        out, failed, summary, _ = call([endpoint], [b"hi", b"there"], timeout=5.0)
    assert (out, failed, summary.ok) == (b"HI\nTHERE\n", [], 2)

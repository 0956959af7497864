"""eda-lb serve: the broker between callers and workers.

In-process tests drive a :class:`Broker` with scripted workers and callers
(plain DEALER sockets speaking the wire frames), so each behaviour is checked
exactly and fast; the end-to-end tests run the real commands.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eda.core.lb.broker import TAG, Broker, Settings
from tests.helpers import PROGRAMS, Proc, Procs, run, wait_until

HB = 0.1  # heartbeat interval of in-process brokers


class BrokerThread:
    """A broker serving in a thread of this process."""

    def __init__(self, **settings: object) -> None:
        local = {"bind": "tcp://127.0.0.1:*", "backend": "tcp://127.0.0.1:*"}
        self.warnings: list[str] = []
        self.broker = Broker(
            Settings(**{"service": "upper", "heartbeat": HB, **local, **settings}),  # type: ignore[arg-type]
            warn=self.warnings.append,
        )
        self.broker.start()
        self._stop = False
        self.thread = threading.Thread(target=self.broker.serve, args=(lambda: self._stop,))
        self.thread.start()

    @property
    def front(self) -> str:
        return self.broker.endpoint

    @property
    def back(self) -> str:
        return self.broker.backend_endpoint

    def close_serving(self) -> None:
        """Stop the serving thread (the broker is then this thread's to drive)."""
        self._stop = True
        self.thread.join(5)

    def resume(self) -> None:
        """Serve again in a new thread (after :meth:`close_serving`)."""
        self._stop = False
        self.thread = threading.Thread(target=self.broker.serve, args=(lambda: self._stop,))
        self.thread.start()

    def close(self) -> None:
        self.close_serving()
        self.broker.close()


class FakeWorker:
    """A worker on a DEALER: W, then answers each Q with *answer(body)* (None: never)."""

    def __init__(
        self,
        endpoint: str,
        wid: str,
        *,
        concurrency: int = 1,
        weight: int = 1,
        answer: Callable[[bytes], bytes | None] = bytes.upper,
        delay: float = 0.0,
        beat: bool = True,
        status: bytes = b"ok",
        beat_every: float = HB,
        capacity: int = 0,
    ) -> None:
        self.capacity = capacity
        self.beat_every = beat_every
        self.endpoint, self.wid, self.answer, self.delay = endpoint, wid, answer, delay
        self.status = status
        self.concurrency, self.weight, self.beat = concurrency, weight, beat
        self.seen: list[bytes] = []  # rids received
        self.max_inflight = 0
        self.alive = True
        self.byes = 0
        self.beats = 0  # H sent
        self.echoes = 0  # H received
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        ready = {
            "service": "upper",
            "id": self.wid,
            "concurrency": self.concurrency,
            "weight": self.weight,
        }
        if self.capacity:
            ready["capacity"] = self.capacity
        sock.send_multipart([TAG, b"W", json.dumps(ready).encode()])
        due: list[tuple[float, bytes, bytes]] = []  # (time, rid, reply)
        next_beat = time.monotonic()
        while not self._stop:
            now = time.monotonic()
            if self.alive and self.beat and now >= next_beat:
                sock.send_multipart([TAG, b"H"])
                self.beats += 1
                next_beat = now + self.beat_every
            for item in [d for d in due if d[0] <= now]:
                due.remove(item)
                if self.alive:
                    sock.send_multipart([TAG, b"R", item[1], self.status, item[2]])
            if not sock.poll(5):
                continue
            msg = sock.recv_multipart()
            if not self.alive:
                continue
            if msg[1] == b"D":
                self.byes += 1
            if msg[1] == b"H":
                self.echoes += 1
            if msg[1] != b"Q":
                continue
            self.seen.append(msg[2])
            reply = self.answer(msg[4])
            inflight = sum(1 for _ in due) + 1
            self.max_inflight = max(self.max_inflight, inflight)
            if reply is not None:
                due.append((time.monotonic() + self.delay, msg[2], reply))
        sock.close()

    def die(self) -> None:
        """As kill -9: silent from now on, nothing in flight ever answered."""
        self.alive = False

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)


class Caller:
    """A DEALER speaking to the broker's frontend."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, rid: str, body: bytes, timeout_ms: int = 5000) -> None:
        self.sock.send_multipart([TAG, b"Q", rid.encode(), str(timeout_ms).encode(), body])

    def replies(self, n: int, timeout: float = 10.0) -> list[list[bytes]]:
        got: list[list[bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            if self.sock.poll(50):
                got.append(self.sock.recv_multipart())
        return got

    def ask(self, *frames: bytes, timeout: float = 5.0) -> list[bytes]:
        self.sock.send_multipart([TAG, *frames])
        [reply] = self.replies(1, timeout)
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def make() -> Iterator[Callable[..., object]]:
    """Make brokers, workers and callers; close them all afterwards."""
    made: list[BrokerThread | FakeWorker | Caller] = []

    def factory(kind: type, *args: object, **kw: object) -> object:
        thing = kind(*args, **kw)
        made.append(thing)
        return thing

    yield factory
    for thing in reversed(made):
        thing.close()


def stats(broker: BrokerThread) -> dict[str, object]:
    caller = Caller(broker.front)
    try:
        reply = caller.ask(b"S")
        assert reply[:2] == [TAG, b"T"]
        return json.loads(reply[2])  # type: ignore[no-any-return]
    finally:
        caller.close()


def ready_workers(broker: BrokerThread, n: int) -> None:
    wait_until(lambda: len(stats(broker)["instances"]) == n, 10, f"{n} workers ready")  # type: ignore[arg-type]


# -- in-process ------------------------------------------------------------------------------
def test_requests_are_balanced_over_ready_workers_and_each_answered_once(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    # slots to spare: no worker is ever full, so round-robin is strictly each in turn
    # however the threads are scheduled (with full workers skipped, a slow one gets less)
    workers = [make(FakeWorker, broker.back, f"w{i}", concurrency=100) for i in range(3)]
    ready_workers(broker, 3)
    caller = make(Caller, broker.front)
    for i in range(300):
        caller.send(f"r.{i}", f"hello {i}".encode())
    replies = caller.replies(300)
    assert len(replies) == 300
    assert sorted(r[2] for r in replies) == sorted(f"r.{i}".encode() for i in range(300))
    assert all(r[:2] == [TAG, b"R"] and r[3] == b"ok" for r in replies)
    assert {r[2]: r[4] for r in replies}[b"r.7"] == b"HELLO 7"
    per_worker = [len(w.seen) for w in workers]
    assert per_worker == [100, 100, 100], per_worker
    assert not caller.replies(1, 0.3)  # nothing answered twice


def test_a_workers_concurrency_is_respected_and_the_rest_waits_in_the_queue(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    worker = make(FakeWorker, broker.back, "slow", concurrency=2, delay=0.05)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    for i in range(12):
        caller.send(f"c.{i}", b"x")
    assert len(caller.replies(12)) == 12
    assert worker.max_inflight == 2


def test_pipeline_sends_ahead_to_each_slot_and_no_further(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, pipeline=4)
    worker = make(FakeWorker, broker.back, "piped", concurrency=1, delay=0.05)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    for i in range(12):
        caller.send(f"p.{i}", b"x")
    assert len(caller.replies(12)) == 12
    assert worker.max_inflight == 4


def test_a_worker_gets_as_many_requests_at_once_as_its_ready_says_it_takes(make):  # type: ignore[no-untyped-def]
    """A persistent worker pipelines requests into its process: its W says how many it
    takes (capacity), and the broker, without --pipeline, sends that many and no more."""
    broker = make(BrokerThread)
    worker = make(FakeWorker, broker.back, "piped", concurrency=1, capacity=5, delay=0.05)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    for i in range(15):
        caller.send(f"p.{i}", b"x")
    assert len(caller.replies(15)) == 15
    assert worker.max_inflight == 5
    [w] = stats(broker)["instances"]  # type: ignore[misc]
    assert w["concurrency"] == 1


def test_drain_lets_running_requests_finish_and_answers_the_rest_busy(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    worker = make(FakeWorker, broker.back, "slow", delay=0.3)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    for i in range(3):  # one runs, two wait
        caller.send(f"d.{i}", b"x")
    wait_until(lambda: worker.seen == [b"d.0"], 5, "the first request under way")
    broker.close_serving()
    late = make(Caller, broker.front)
    late.send("late", b"x")
    broker.broker.drain(5)
    replies = {r[2]: r[3:] for r in caller.replies(3, 5)}
    assert replies == {b"d.0": [b"ok", b"X"], b"d.1": [b"busy", b"broker shutting down"],
                       b"d.2": [b"busy", b"broker shutting down"]}  # fmt: skip
    assert late.replies(1, 5)[0][2:] == [b"late", b"busy", b"broker shutting down"]


def test_two_callers_with_the_same_rid_each_get_their_own_reply(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    worker = make(FakeWorker, broker.back, "one", concurrency=2, delay=0.1)
    ready_workers(broker, 1)
    a, b = make(Caller, broker.front), make(Caller, broker.front)
    a.send("1a2b.1", b"from a")  # two hosts, the same pid: the same rid
    b.send("1a2b.1", b"from b")
    assert a.replies(1)[0][2:] == [b"1a2b.1", b"ok", b"FROM A"]
    assert b.replies(1)[0][2:] == [b"1a2b.1", b"ok", b"FROM B"]
    assert worker.max_inflight == 1  # never both at once: its replies would be ambiguous


def test_a_full_queue_answers_busy_and_one_caller_gets_half_of_it_at_most(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, queue=5)  # 2 places for each caller
    make(FakeWorker, broker.back, "hang", answer=lambda _b: None)
    ready_workers(broker, 1)
    a, b, c = (make(Caller, broker.front) for _ in range(3))
    for i in range(4):  # one runs, two wait, the fourth is over a's half
        a.send(f"a.{i}", b"x")
    assert [r[2:4] for r in a.replies(1, 3)] == [[b"a.3", b"busy"]]
    for i in range(2):
        b.send(f"b.{i}", b"x")
    wait_until(lambda: stats(broker)["queued"] == 4, 5, "b's two waiting")
    for i in range(2):  # the queue is full after c's first
        c.send(f"c.{i}", b"x")
    assert [r[2:4] for r in c.replies(1, 3)] == [[b"c.1", b"busy"]]
    assert b.replies(1, 0.2) == [] and stats(broker)["queued"] == 5


def test_a_silent_workers_requests_go_to_another_with_the_same_rid(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    doomed = make(FakeWorker, broker.back, "doomed", concurrency=50, answer=lambda _b: None)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    for i in range(20):
        caller.send(f"k.{i}", f"k{i}".encode())
    # the broker learns a worker's heartbeat period from two of its H (until then it
    # allows eda-lb workers' default, 1 s)
    wait_until(lambda: len(doomed.seen) == 20 and doomed.beats >= 3, 5, "the doomed worker's load")
    survivor = make(FakeWorker, broker.back, "survivor", concurrency=50)
    ready_workers(broker, 2)
    doomed.die()
    replies = caller.replies(20, 10)
    assert len(replies) == 20, "a request was lost"
    # dropped for its silence (three heartbeats), not for the requests' deadlines
    assert broker.warnings == ["warning: worker doomed went silent: re-sending its 20 request(s)"]
    assert {r[2] for r in replies} == {f"k.{i}".encode() for i in range(20)}
    assert all(r[3] == b"ok" for r in replies)
    assert sorted(survivor.seen) == sorted(doomed.seen)  # the same rids, re-sent
    figures = stats(broker)
    states = {i["id"]: i["state"] for i in figures["instances"]}  # type: ignore[index, union-attr]
    assert states == {"doomed": "dead", "survivor": "healthy"}
    assert not caller.replies(1, 0.3)


def test_a_worker_with_a_slower_heartbeat_is_kept_and_each_of_its_beats_answered(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)  # heartbeat HB; the worker's is 4 x HB
    worker = make(FakeWorker, broker.back, "slow-beat", beat_every=4 * HB)
    ready_workers(broker, 1)
    # four of its beats: 12 x HB, far over the 3 x HB after which it would be dropped if
    # its period were taken to be ours
    # (the broker answers each H at once, besides its own beat every HB)
    wait_until(lambda: worker.beats >= 4 and worker.echoes >= 4, 10, "four beats answered")
    [w] = stats(broker)["instances"]  # type: ignore[misc]
    assert w["state"] == "healthy" and w["id"] == "slow-beat"
    assert worker.byes == 0  # never dropped: it would have been told D on its next beat
    worker.die()
    wait_until(lambda: stats(broker)["instances"][0]["state"] == "dead", 5, "dropped")  # type: ignore[index]


def test_stats_and_ping_answer_per_worker_figures(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    make(FakeWorker, broker.back, "w1", concurrency=3, weight=2)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    for i in range(10):
        caller.send(f"s.{i}", b"x")
    assert len(caller.replies(10)) == 10
    pong = caller.ask(b"P", b"7")
    assert pong[:3] == [TAG, b"O", b"7"]
    assert json.loads(pong[3]) == {"inflight": 0, "concurrency": 3, "queued": 0}
    figures = stats(broker)
    assert (figures["role"], figures["service"], figures["requests"]) == ("broker", "upper", 10)
    [w1] = figures["instances"]  # type: ignore[misc]
    assert (w1["id"], w1["requests"], w1["errors"], w1["concurrency"], w1["weight"]) == (
        "w1", 10, 0, 3, 2,
    )  # fmt: skip
    latency = w1["latency_ms"]
    assert w1["state"] == "healthy" and 0 < latency["p50"] <= latency["p90"] <= latency["p99"]


HOSTILE_FRONT: list[list[bytes]] = [
    [b"junk"],
    [b""],
    [TAG],
    [TAG, b"Z"],
    [TAG, b"Q"],
    [TAG, b"Q", b"rid", b"100"],
    [TAG, b"Q", b"", b"100", b"x"],  # empty rid
    [TAG, b"Q", b"bad rid", b"100", b"x"],  # a space in the rid
    [TAG, b"Q", b"r" * 65, b"100", b"x"],
    [TAG, b"Q", b"rid", b"-1", b"x"],
    [TAG, b"Q", b"rid", b"1e9", b"x"],
    [TAG, b"Q", b"rid", b"9" * 40, b"x"],
    [TAG, b"Q", b"\xff\xfe", b"100", b"x"],
    [TAG, b"P"],
    [TAG, b"P", b"x" * 100],
    [TAG, b"S", b"extra"],
    [TAG, b"W", b"{}"],  # a worker's frame on the callers' side
    [b"EDALB2", b"Q", b"rid", b"100", b"x"],
]
HOSTILE_BACK: list[list[bytes]] = [
    [b"junk"],
    [TAG, b"W"],
    [TAG, b"W", b"not json"],
    [TAG, b"W", b"[]"],
    [TAG, b"W", b"{" * 5000],
    [TAG, b"W", json.dumps({"service": "upper", "id": "x", "concurrency": 0}).encode()],
    [TAG, b"W", json.dumps({"service": "upper", "id": "x", "concurrency": True}).encode()],
    [TAG, b"W", json.dumps({"service": "upper", "id": "a b"}).encode()],
    [TAG, b"W", json.dumps({"service": "upper", "id": "x", "weight": 1e400}).encode()],
    [TAG, b"W", json.dumps({"service": "other", "id": "x"}).encode()],
    [TAG, b"R", b"nope", b"ok", b"from a stranger"],
    [TAG, b"H", b"extra"],
    [TAG, b"Q", b"rid", b"100", b"x"],
    [TAG, b"D", b"x"],
]


def test_garbage_on_both_sockets_changes_nothing_and_good_callers_are_served(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, max_request=1000)
    make(FakeWorker, broker.back, "good", concurrency=4)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    front, back = make(Caller, broker.front), make(Caller, broker.back)
    # a worker that says W and then answers rids it was never given, and bad statuses
    liar = make(Caller, broker.back)
    liar.sock.send_multipart(
        [
            TAG,
            b"W",
            json.dumps({"service": "upper", "id": "liar", "concurrency": 1, "weight": 1}).encode(),
        ]
    )
    for _ in range(2):  # two beats, then silence: dropped after three of them
        liar.sock.send_multipart([TAG, b"H"])
    ready_workers(broker, 2)
    for round_ in range(3):
        for frames in HOSTILE_FRONT:
            front.sock.send_multipart(frames)
        for frames in HOSTILE_BACK:
            back.sock.send_multipart(frames)
        liar.sock.send_multipart([TAG, b"R", b"g.0", b"ok", b"forged"])
        for end in (broker.front, broker.back):  # far over the limit: costs its sender the link
            make(Caller, end).sock.send_multipart([TAG, b"Q", b"huge", b"100", b"x" * 200_000])
        for i in range(10):
            caller.send(f"g.{round_}.{i}", b"good")
        caller.send(f"big.{round_}", b"x" * 1001)
        replies = {r[2]: r for r in caller.replies(11)}
        assert replies[f"big.{round_}".encode()][3:] == [
            b"err",
            b"request too large (1001 bytes; the limit is 1000)",
        ]
        for i in range(10):
            reply = replies[f"g.{round_}.{i}".encode()]
            assert reply[3:] == [b"ok", b"GOOD"]
        # requests sent to the liar (which never answers them) were re-sent once it was
        # dropped for silence; none got the forged body
    figures = stats(broker)
    assert figures["malformed"] >= 3 * (len(HOSTILE_FRONT) + len(HOSTILE_BACK) - 4)
    assert broker.broker.failures == 0
    ids = sorted(i["id"] for i in figures["instances"])  # type: ignore[union-attr]
    assert ids == ["good", "liar"]  # no worker from the garbage
    hello = make(Caller, broker.front)
    hello.send("after", b"still here")
    [after] = hello.replies(1, 10)
    assert after[3:] == [b"ok", b"STILL HERE"]


def test_a_peer_flooding_pings_does_not_starve_callers(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    make(FakeWorker, broker.back, "w", concurrency=8)
    ready_workers(broker, 1)
    flood, caller = make(Caller, broker.front), make(Caller, broker.front)
    flood.sock.setsockopt(zmq.SNDHWM, 0)
    for seq in range(100_000):  # never read
        flood.sock.send_multipart([TAG, b"P", b"%d" % seq])
    for i in range(50):
        caller.send(f"f.{i}", b"x")
    replies = caller.replies(50, 10)
    assert sorted(r[2] for r in replies) == sorted(f"f.{i}".encode() for i in range(50))
    assert broker.broker.failures == 0
    # stats cost a sort of every worker's latencies: a flood of them is answered 50 times
    # a second at most, the rest dropped
    asker = make(Caller, broker.front)
    started = time.monotonic()
    for _ in range(2000):
        asker.sock.send_multipart([TAG, b"S"])
    answers = asker.replies(2000, 1.0)
    took = time.monotonic() - started
    assert 1 <= len(answers) <= 50 * (took + 1) + 1, (len(answers), took)
    wait_until(lambda: broker.broker.stats_dropped >= 1500, 5, "the flood dropped")


def test_a_worker_cannot_answer_a_request_sent_to_another(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    honest = make(FakeWorker, broker.back, "honest", concurrency=4, delay=0.5)
    liar = make(Caller, broker.back)  # a DEALER on the backend: ready, then forged replies
    ready = {"service": "upper", "id": "liar", "concurrency": 1, "weight": 0}  # never picked
    liar.sock.send_multipart([TAG, b"W", json.dumps(ready).encode()])
    ready_workers(broker, 2)
    caller = make(Caller, broker.front)
    for i in range(4):
        caller.send(f"x.{i}", b"x")
    wait_until(lambda: len(honest.seen) == 4, 5, "every request at the honest one")
    for i in range(4):  # the rids it guessed: none of these requests went to it
        liar.sock.send_multipart([TAG, b"R", f"x.{i}".encode(), b"ok", b"forged"])
    replies = caller.replies(4, 5)
    assert sorted(r[2:] for r in replies) == [[f"x.{i}".encode(), b"ok", b"X"] for i in range(4)]


def test_an_unknown_worker_is_told_to_say_ready_again(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    stranger = make(Caller, broker.back)
    assert stranger.ask(b"H") == [TAG, b"D"]


def test_spread_by_worker_is_even_for_round_robin(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    workers = [make(FakeWorker, broker.back, f"w{i}", concurrency=100) for i in range(3)]
    ready_workers(broker, 3)
    caller = make(Caller, broker.front)
    for i in range(30):
        caller.send(f"e.{i}", b"x")
        assert len(caller.replies(1)) == 1  # one at a time: each pick sees every worker free
    assert Counter(len(w.seen) for w in workers) == Counter({10: 3})


def windowed(
    caller: Caller, n: int, window: int, prefix: str, timeout_ms: int = 5000
) -> list[list[bytes]]:
    """Send *n* requests keeping *window* in flight (a new one per reply); the replies."""
    sent = got = 0
    replies: list[list[bytes]] = []
    while sent < min(window, n):
        caller.send(f"{prefix}.{sent}", b"x", timeout_ms)
        sent += 1
    while got < n:
        [r] = caller.replies(1, 10)
        replies.append(r)
        got += 1
        if sent < n:
            caller.send(f"{prefix}.{sent}", b"x", timeout_ms)
            sent += 1
    return replies


def test_weighted_shares_follow_the_weights(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, strategy="weighted")
    workers = [
        make(FakeWorker, broker.back, f"w{w}", concurrency=1000, weight=w) for w in (1, 2, 3)
    ]
    ready_workers(broker, 3)
    caller = make(Caller, broker.front)
    for i in range(600):
        caller.send(f"w.{i}", b"x")
    assert len(caller.replies(600)) == 600
    shares = [len(w.seen) for w in workers]
    for share, weight in zip(shares, (1, 2, 3), strict=True):
        assert abs(share - 100 * weight) <= 30, shares  # within 5% of 600


@pytest.mark.parametrize(
    ("strategy", "most"), [("least-conn", 0.6), ("p2c", 0.45), ("round-robin", 0.5)]
)
def test_load_aware_strategies_send_less_to_a_slow_worker(make, strategy, most):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, strategy=strategy)
    slow = make(FakeWorker, broker.back, "slow", concurrency=100, delay=0.03)
    fast = [make(FakeWorker, broker.back, f"fast{i}", concurrency=100) for i in range(2)]
    ready_workers(broker, 3)
    caller = make(Caller, broker.front)
    replies = windowed(caller, 240, 6, strategy)
    assert all(r[3] == b"ok" for r in replies)
    share = len(slow.seen) / 240
    if strategy == "round-robin":  # the control: blind to load, a third each
        assert abs(share - 1 / 3) < 0.05, share
        assert all(abs(len(f.seen) / 240 - 1 / 3) < 0.05 for f in fast)
    else:
        assert share < 1 / 3 - 0.1, share  # well under its round-robin third
        assert max(len(f.seen) for f in fast) / 240 < most + 0.2


def test_random_uses_every_worker(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, strategy="random")
    workers = [make(FakeWorker, broker.back, f"r{i}", concurrency=1000) for i in range(3)]
    ready_workers(broker, 3)
    caller = make(Caller, broker.front)
    for i in range(300):
        caller.send(f"rnd.{i}", b"x")
    assert len(caller.replies(300)) == 300
    assert all(50 <= len(w.seen) <= 150 for w in workers), [len(w.seen) for w in workers]


def test_a_worker_that_keeps_timing_out_is_ejected(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, eject_after=2, eject_base=30)
    bad = make(FakeWorker, broker.back, "bad", concurrency=10, answer=lambda _b: None)
    make(FakeWorker, broker.back, "good", concurrency=10)
    ready_workers(broker, 2)
    caller = make(Caller, broker.front)
    unanswered = 0
    for i in range(12):
        caller.send(f"e.{i}", b"x", timeout_ms=100)
        # no answer from a request whose time ran out at a silent worker: the caller's own
        # timeout (the same moment) retries or reports it
        got = caller.replies(1, 0.6)
        assert got == [] or got[0][3:] == [b"ok", b"X"]
        unanswered += not got
    assert unanswered == len(bad.seen) == 2  # nothing more once ejected
    figures = stats(broker)
    states = {i["id"]: i["state"] for i in figures["instances"]}  # type: ignore[union-attr]
    assert states == {"bad": "ejected", "good": "healthy"}
    assert figures["expired"] == 2


def test_a_worker_whose_command_keeps_failing_is_ejected(make):  # type: ignore[no-untyped-def]
    """Error replies count as failures (as Envoy counts consecutive 5xx); each is final."""
    broker = make(BrokerThread, eject_after=3, eject_base=30)
    bad = make(FakeWorker, broker.back, "bad", status=b"err", answer=lambda _b: b"exit 1: no")
    make(FakeWorker, broker.back, "good")
    ready_workers(broker, 2)
    caller = make(Caller, broker.front)
    answers = []
    for i in range(12):  # one at a time: round-robin alternates until "bad" is out
        caller.send(f"f.{i}", b"x")
        [got] = caller.replies(1, 5)
        answers.append(got[3])
    assert answers.count(b"err") == len(bad.seen) == 3  # nothing more once ejected
    states = {i["id"]: i["state"] for i in stats(broker)["instances"]}  # type: ignore[union-attr]
    assert states == {"bad": "ejected", "good": "healthy"}


def test_a_busy_worker_s_requests_go_to_another_worker_without_using_retries(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, retries=0)
    full = make(FakeWorker, broker.back, "full", concurrency=10, status=b"busy")
    make(FakeWorker, broker.back, "free", concurrency=10)
    ready_workers(broker, 2)
    caller = make(Caller, broker.front)
    for i in range(20):
        caller.send(f"b.{i}", b"x")
    replies = caller.replies(20)
    assert sorted(r[3] for r in replies) == [b"ok"] * 20
    assert len(full.seen) >= 5  # it was asked, said busy, and the request went on


def test_a_request_a_worker_refused_busy_waits_for_a_worker_that_is_only_full(make):  # type: ignore[no-untyped-def]
    """The race behind a flaky busy != ok: a request refused by a busy worker while the
    other worker was at its concurrency went back and forth to the busy one until it
    gave up; it waits for the full one instead (busy only when every worker said so)."""
    broker = make(BrokerThread, retries=0)
    full = make(FakeWorker, broker.back, "full", concurrency=10, status=b"busy")
    slow = make(FakeWorker, broker.back, "slow", concurrency=1, delay=0.2)
    ready_workers(broker, 2)
    caller = make(Caller, broker.front)
    for i in range(4):
        caller.send(f"s.{i}", b"x")
    replies = caller.replies(4)
    assert sorted(r[3] for r in replies) == [b"ok"] * 4
    assert sorted(slow.seen) == [b"s.0", b"s.1", b"s.2", b"s.3"]
    assert len(full.seen) <= 4  # each request asked the busy worker once at most


def test_every_worker_busy_is_answered_busy(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, retries=0)
    for name in ("b1", "b2"):
        make(FakeWorker, broker.back, name, concurrency=10, status=b"busy")
    ready_workers(broker, 2)
    caller = make(Caller, broker.front)
    caller.send("n", b"x")
    [reply] = caller.replies(1, 5)
    assert reply[2:5] == [b"n", b"busy", b"every worker is busy"]


def test_the_queue_is_bounded_in_bytes_too(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, queue_bytes=1000)
    make(FakeWorker, broker.back, "hang", answer=lambda _b: None)
    ready_workers(broker, 1)
    caller, other, third = make(Caller, broker.front), make(Caller, broker.front), make(
        Caller, broker.front
    )
    caller.send("runs", b"x" * 600)  # at the worker: not in the queue
    caller.send("waits", b"x" * 400)
    caller.send("mine", b"x" * 200)  # 600 bytes of one caller: over its half of 1000
    [busy] = caller.replies(1, 3)
    assert busy[2:4] == [b"mine", b"busy"]
    other.send("waits", b"x" * 400)
    wait_until(lambda: stats(broker)["queued"] == 2, 5, "the other caller's request queued")
    third.send("over", b"x" * 400)  # 1200 bytes waiting would be over 1000
    [busy] = third.replies(1, 3)
    assert busy[2:4] == [b"over", b"busy"]
    assert stats(broker)["queued"] == 2 and stats(broker)["queued_bytes"] == 800


def test_a_request_waiting_past_its_time_is_answered_busy(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    make(FakeWorker, broker.back, "slow", delay=0.5)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    caller.send("runs", b"x", timeout_ms=5000)
    caller.send("waits", b"x", timeout_ms=100)  # queued behind it, past its time before
    replies = {r[2]: r[3:] for r in caller.replies(2, 5)}
    assert replies == {b"waits": [b"busy", b"no free worker in time"], b"runs": [b"ok", b"X"]}


@pytest.mark.parametrize(("panic", "spread"), [(50.0, True), (0.0, False)])
def test_panic_spreads_over_all_workers_when_most_are_ejected(make, panic, spread):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, panic=panic)
    workers = [make(FakeWorker, broker.back, f"w{i}", concurrency=10) for i in range(3)]
    ready_workers(broker, 3)
    broker.close_serving()  # eject two of three (as failures would) while it does not serve
    for w in broker.broker.workers.values():
        if w.id != "w0":
            broker.broker.balancer.eject(w.backend, 30)
    broker.resume()
    caller = make(Caller, broker.front)
    windowed(caller, 30, 1, "panic")
    used = [len(w.seen) for w in workers]
    if spread:  # 1 healthy of 3 is under 50 %: all three share the load rather than one
        assert all(n >= 5 for n in used), used
    else:
        assert used == [30, 0, 0], used


def test_a_new_worker_starts_slowly(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread, slow_start=5.0)
    old = make(FakeWorker, broker.back, "old", concurrency=100)
    ready_workers(broker, 1)
    # the first worker takes all at once (nothing to spare it); a worker joining ramps up
    new = make(FakeWorker, broker.back, "new", concurrency=100)
    ready_workers(broker, 2)
    states = {i["id"]: i["state"] for i in stats(broker)["instances"]}  # type: ignore[union-attr]
    assert states["new"] == "slow-start"
    caller = make(Caller, broker.front)
    windowed(caller, 100, 1, "ss")
    assert len(new.seen) < 30 < len(old.seen), (len(new.seen), len(old.seen))


def test_a_callers_retry_of_a_running_request_runs_elsewhere_and_is_answered_once(make):  # type: ignore[no-untyped-def]
    broker = make(BrokerThread)
    stuck = make(FakeWorker, broker.back, "stuck", answer=lambda _b: None)
    ready_workers(broker, 1)
    caller = make(Caller, broker.front)
    caller.send("same.1", b"once")
    wait_until(lambda: stuck.seen == [b"same.1"], 5, "the request at the stuck worker")
    helper = make(FakeWorker, broker.back, "helper")
    ready_workers(broker, 2)
    caller.send("same.1", b"once")  # the caller's retry: the same rid
    [r] = caller.replies(1, 5)
    assert r[2:] == [b"same.1", b"ok", b"ONCE"]
    assert helper.seen == [b"same.1"]
    assert not caller.replies(1, 0.3)


_frame = st.one_of(
    st.sampled_from([TAG, b"Q", b"R", b"W", b"H", b"D", b"S", b"P", b"ok", b"busy", b"100", b"0"]),
    st.binary(max_size=80),
    st.sampled_from([b'{"service":"upper","id":"x","concurrency":1,"weight":1}', b"{}", b"[]"]),
)
_message = st.lists(_frame, min_size=1, max_size=6)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[BrokerThread, FakeWorker]]:
    # a heartbeat of 1 s, not HB: the one worker lives through all the examples, and a
    # loaded machine that holds its thread for a few tenths of a second must not make
    # the broker drop it as silent (every later probe would then wait for no worker)
    broker = BrokerThread(heartbeat=1.0)
    worker = FakeWorker(broker.back, "steady", concurrency=8, beat_every=1.0)
    ready_workers(broker, 1)
    yield broker, worker
    worker.close()
    broker.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(front=st.lists(_message, max_size=8), back=st.lists(_message, max_size=8))
def test_any_frames_on_either_socket_leave_the_broker_serving(shared, front, back):  # type: ignore[no-untyped-def]
    broker, _worker = shared
    noisy_front, noisy_back, caller = (
        Caller(broker.front),
        Caller(broker.back),
        Caller(broker.front),
    )
    try:
        for frames in front:
            noisy_front.sock.send_multipart(frames)
        for frames in back:
            noisy_back.sock.send_multipart(frames)
        caller.send("probe", b"still")
        [r] = caller.replies(1, 10)
        assert r[2:] == [b"probe", b"ok", b"STILL"]
        assert broker.broker.failures == 0
    finally:
        for c in (noisy_front, noisy_back, caller):
            c.close()


# -- end to end: the real commands ------------------------------------------------------------
PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
E2E_HB = "0.2"


def serve_cli(procs: Procs, *args: str) -> Proc:
    """eda-lb serve upper (serverless, fast heartbeats); not waited for."""
    return procs.eda("eda-lb", "serve", "upper", "-v", "--heartbeat", E2E_HB, *args)


def announced(proc: Proc) -> None:
    proc.wait_stderr(r"listening on .*\((registered|announced by mDNS)\)", 15)


def worker_cli(procs: Procs, *args: str) -> Proc:
    """eda-lb worker upper (serverless, fast heartbeats); not waited for."""
    return procs.eda("eda-lb", "worker", "upper", "-v", "--heartbeat", E2E_HB, *args)


def broker_rows(n: int, timeout: float = 15.0, reg: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The stats rows of the broker once it lists *n* live workers."""

    def rows() -> list[dict[str, Any]] | None:
        done = run("eda-lb", "stats", "upper", "--timeout", "1", *reg)
        found = [json.loads(line) for line in done.stdout.splitlines()]
        live = [r for r in found if r["state"] != "dead" and r["source"] != "direct"]
        return found if len(live) == n else None

    found: list[dict[str, Any]] = wait_until(rows, timeout, f"{n} workers at the broker")
    return found


@pytest.mark.long
def test_through_the_broker_calls_stats_hostile_peers_and_kill_9_of_a_worker(
    procs: Procs, tmp_path: Path
) -> None:
    ports = ("--bind", "tcp://127.0.0.1:7893", "--backend", "tcp://127.0.0.1:7894")
    broker = serve_cli(procs, "--strategy", "weighted", *ports)
    # slots to spare (4 each, a window of 4): shares follow the weights, not who is free
    upper = ("--persistent", "--concurrency", "4", "--", "stdbuf", "-oL", "tr", "a-z", "A-Z")
    workers = [
        worker_cli(procs, "--weight", w, "--id", name, *upper)
        for w, name in (("1", "light"), ("3", "heavy"))
    ]
    announced(broker)
    broker_rows(2)
    done = run("eda-lb", "call", "upper", "--via", "upper", "hello", "world")
    assert (done.returncode, done.stdout, done.stderr) == (0, "HELLO\nWORLD\n", "")
    lines = "".join(f"line {i}\n" for i in range(200))
    done = run("eda-lb", "call", "upper", "--via", "upper", "--window", "4", input=lines)
    assert done.returncode == 0, done.stderr
    assert done.stdout == lines.upper()  # in input order

    # stats: one row per worker, as the broker sees it
    rows = {r["instance"]: r for r in broker_rows(2)}
    assert set(rows) == {"light", "heavy"}
    assert rows["light"]["requests"] + rows["heavy"]["requests"] == 202
    assert 2.4 <= rows["heavy"]["requests"] / rows["light"]["requests"] <= 3.6  # weight 3:1
    broker_id = broker.wait_stderr(r"broker (\S+) for upper listening").group(1)
    for r in rows.values():
        assert (r["service"], r["source"], r["state"], r["errors"]) == (
            "upper", broker_id, "healthy", 0,
        )  # fmt: skip
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    formatted = run("eda-lb", "stats", "upper", "--format", "{instance}:{requests}")
    assert sorted(formatted.stdout.split()) == sorted(
        f"{i}:{r['requests']}" for i, r in rows.items()
    )

    # hostile peers on both sockets: dropped, counted, said once (rate-limited)
    front, back = Caller("tcp://127.0.0.1:7893"), Caller("tcp://127.0.0.1:7894")
    try:
        for _ in range(20):
            for frames in HOSTILE_FRONT:
                front.sock.send_multipart(frames)
            for frames in HOSTILE_BACK:
                back.sock.send_multipart(frames)
        done = run("eda-lb", "call", "upper", "--via", "upper", "still", "serving")
        assert (done.returncode, done.stdout) == (0, "STILL\nSERVING\n"), done.stderr
    finally:
        front.close()
        back.close()
    assert "dropped malformed" in broker.stderr and broker.stderr.count("dropped malformed") < 10

    # kill -9 of a worker under load: nothing lost, nothing doubled, order kept
    source = tmp_path / "requests.txt"
    source.write_text("".join(f"r{i}\n" for i in range(1000)))
    with source.open("rb") as stdin:
        caller = procs.eda(
            "eda-lb", "call", "upper", "--via", "upper", "--window", "16", "--timeout", "5",
            "--heartbeat", E2E_HB, stdin=stdin,
        )  # fmt: skip
        wait_until(lambda: len(caller.lines()) >= 200, 30, "the load under way")
        workers[1].kill()  # kill -9 the heavy one, its commands with it
        assert caller.wait(60) == 0, caller.stderr
    assert caller.lines() == [f"R{i}" for i in range(1000)]
    rows = {r["instance"]: r for r in broker_rows(1)}
    assert (rows["heavy"]["state"], rows["light"]["state"]) == ("dead", "healthy")
    assert broker.popen.poll() is None


@pytest.mark.long
def test_broker_kill_and_restart_workers_come_back_and_callers_retry(procs: Procs) -> None:
    """The real commands, with a registry: the broker is killed (-9) with requests in
    flight and comes back on other ports; the workers notice its silence, find the new
    one in the registry and reconnect (backoff, jitter); the caller's requests that were
    at the dead broker are retried (same ids) at the new one: every one answered once."""
    registry = procs.eda(
        "eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:7895", "--tick", "0.1"
    )
    registry.wait_stderr("listening on", 15)
    reg = ("--no-mdns", "--registry", "tcp://127.0.0.1:7895")
    broker = serve_cli(procs, "--bind", "tcp://127.0.0.1:7891", "--backend",
                       "tcp://127.0.0.1:7892", *reg)  # fmt: skip
    slow_upper = 'read -r l; sleep 0.2; echo "$l" | tr a-z A-Z'
    workers = [
        worker_cli(procs, "--id", f"w{i}", "--concurrency", "2", *reg, "--", "sh", "-c", slow_upper)
        for i in range(2)
    ]
    announced(broker)
    assert "with registry" in broker.stderr
    broker_rows(2, reg=reg)
    caller = procs.eda(
        "eda-lb", "call", "upper", "--via", "upper", *reg, "-v", "--timeout", "10",
        "--heartbeat", E2E_HB, "--window", "4", stdin=subprocess.PIPE,
    )  # fmt: skip
    stdin = caller.popen.stdin
    assert stdin is not None
    stdin.write(b"".join(b"r%d\n" % i for i in range(12)))
    stdin.flush()
    caller.wait_lines(2, 15)
    broker.kill()  # with requests in flight at it
    caller.wait_stderr("dropped", 10)
    moved = serve_cli(procs, "--bind", "tcp://127.0.0.1:7896", "--backend",
                      "tcp://127.0.0.1:7897", *reg)  # fmt: skip
    announced(moved)
    for worker in workers:  # silent for 3 heartbeats, or gone from the registry (its
        # registration expired): left; then the new one is found there
        worker.wait_stderr("broker tcp://127.0.0.1:7892 (silent|no longer listed)", 10)
        worker.wait_stderr("connecting to broker tcp://127.0.0.1:7897", 20)
    stdin.write(b"".join(b"r%d\n" % i for i in range(12, 20)))
    stdin.close()
    assert caller.wait(30) == 0, caller.stderr
    assert caller.lines() == [f"R{i}" for i in range(20)]
    retried = caller.wait_stderr(r"20 answered, 0 failed, (\d+) retried").group(1)
    assert int(retried) >= 1  # the requests in flight at the killed broker
    rows = broker_rows(2, reg=reg)
    assert {r["source"] for r in rows} == {moved.wait_stderr(r"broker (\S+) for").group(1)}


def test_stats_of_a_flood_of_announced_instances_uses_bounded_sockets() -> None:
    """1100 instances that are not there and one that answers: asked 256 at a time
    (each costs a socket): one answer, the others 'no answer', no crash."""
    from eda.core.lb.stats import ask_stats

    worker = BrokerThread()
    try:
        fakes = [f"tcp://127.0.0.4:{32000 + i}" for i in range(1100)]
        answers = ask_stats([*fakes, worker.front], timeout=0.2)
    finally:
        worker.close()
    assert len(answers) == 1101 and {answers[f] for f in fakes} == {"no answer"}
    assert isinstance(answers[worker.front], dict) and answers[worker.front]["role"] == "broker"


def test_the_stats_table_shows_peer_strings_escaped() -> None:
    from eda.cli import lbstats as lb
    from eda.cli.common import Context
    from eda.cli.output import Environment, Output

    rows = lb._stats_rows(
        "upper", "b1", {"instances": [{"id": "\x1b]0;pwned\x07w", "state": "\x1b[2Jhealthy"}]},
        broker=True,
    )  # fmt: skip
    screen = bytearray()
    env = Environment(write=screen.extend, stdout_isatty=True, width=200, colour=False)
    Output(Context("eda-lb", False), env=env).table(rows, lb._stats_table)
    text = screen.decode()
    assert "\x1b" not in text and "\\x1b]0;pwned" in text


def test_stats_answers_from_hostile_instances_become_errors_or_blank_figures() -> None:
    from eda.cli import lbstats as lb
    from eda.core.lb.stats import ask_stats

    answers = {
        "garbage": [TAG, b"T", b"not json"],
        "list": [TAG, b"T", b"[1, 2]"],
        "nan": [TAG, b"T", b'{"requests": NaN}'],
        "frames": [TAG, b"T", b"{}", b"extra"],
        "good": [TAG, b"T", json.dumps({"id": "w", "requests": 3}).encode()],
    }
    ctx = zmq.Context.instance()
    servers = {}
    for name in answers:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        servers[name] = (sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent_ep = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"

    def answer() -> None:
        for name, (sock, _ep) in servers.items():
            if sock.poll(5000):
                ident = sock.recv_multipart()[0]
                sock.send_multipart([ident, b"junk"])  # first something else, then the answer
                sock.send_multipart([ident, *answers[name]])

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        got = ask_stats([*(ep for _s, ep in servers.values()), silent_ep], timeout=1)
    finally:
        thread.join(10)
        for sock, _ep in servers.values():
            sock.close()
        silent.close()
    by_name = {name: got[ep] for name, (_s, ep) in servers.items()}
    assert by_name["garbage"] == by_name["nan"] == "malformed stats answer (not JSON)"
    assert by_name["list"] == "malformed stats answer (not an object)"
    assert by_name["frames"] == "malformed stats answer (frames)"
    assert by_name["good"] == {"id": "w", "requests": 3}
    assert got[silent_ep] == "no answer"
    # figures of the wrong type print blank, never as the peer's text
    rows = lb._stats_rows(
        "upper", "b1", {"instances": [1, {"id": "x", "requests": "9", "p50_ms": 1e999,
                                          "latency_ms": {"p50": True, "p99": 2.5}}]},
        broker=True,
    )  # fmt: skip
    assert rows == [{
        "service": "upper", "source": "b1", "instance": "x", "state": "healthy",
        "requests": None, "errors": None, "inflight": None, "concurrency": None, "weight": None,
        "p50_ms": None, "p90_ms": None, "p99_ms": 2.5,
    }]  # fmt: skip
    assert lb._stats_rows("upper", "b1", {"instances": "x"}, broker=True) == []


def test_serve_refuses_bad_arguments_with_one_line_and_the_right_status() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, code, error in (
            (("--bind", "tcp://127.0.0.1:99999"), 2, "port out of range"),
            (("--backend", f"tcp://127.0.0.1:{port}"), 1, "Address already in use"),
            (("--strategy", "fastest"), 2, "Invalid value for '--strategy'"),
        ):
            done = run("eda-lb", "serve", "upper", "--no-mdns", *args, timeout=30)
            assert done.returncode == code, done.stderr
            assert done.stderr.count("\n") == 1 and error in done.stderr
            assert done.stderr.startswith("eda-lb: error: ") and done.stdout == ""


def test_a_caller_that_never_reads_costs_the_broker_bounded_memory(procs: Procs) -> None:
    # 2,400 requests of 256 KiB through the broker, replies never read: the broker used
    # to grow by 245-347 MB (its ROUTER queues 100,000 messages per caller); now what
    # waits for one caller is bounded in bytes, and a good caller is served meanwhile
    from tests.test_lb import MIB, flood, free_port, never_reads, stats_of, vm_kib

    front, back = free_port(), free_port()
    # glibc's mmap threshold fixed at 128 KiB: every 256 KiB message is mapped and given
    # back when freed, so the broker's RSS follows what it holds (by default the threshold
    # rises after the first such free, and freed messages stay in a fragmented heap)
    broker = procs.eda("eda-lb", "serve", "upper", "-v", "--heartbeat", E2E_HB, "--no-mdns",
                       "--bind", f"tcp://127.0.0.1:{front}", "--backend",
                       f"tcp://127.0.0.1:{back}", env={"MALLOC_MMAP_THRESHOLD_": "131072"})  # fmt: skip
    worker_cli(procs, "--no-mdns", "--broker", f"tcp://127.0.0.1:{back}", "--persistent",
               "--", "cat")  # fmt: skip
    endpoint = f"tcp://127.0.0.1:{front}"
    good = Caller(endpoint)
    try:
        wait_until(lambda: stats_of(endpoint)["workers"] == 1, 15, "the worker at the broker")
        for i in range(20):
            good.send(f"warm{i}", b"w%d" % i)
        assert len(good.replies(20)) == 20
        before = vm_kib(broker.popen.pid, "VmRSS")
        attacker = never_reads(endpoint)
        try:
            assert flood(attacker, 2400, 256 << 10) == 2400
            # the bound is reached: its requests refused at the door, or (when the worker
            # kept up and every request got in) its replies over the bound not sent
            wait_until(
                lambda: (f := stats_of(endpoint))["refused"] + f["unsent"] > 0, 30,
                "its requests refused or its replies held back",
            )  # fmt: skip
            for i in range(50):
                good.send(f"good{i}", b"g%d" % i)
            replies = good.replies(50)
            assert sorted(r[2:4] for r in replies) == sorted(
                [f"good{i}".encode(), b"ok"] for i in range(50)
            )
            # 600 MB of replies asked for: what stays for a caller that never reads is
            # bounded (the peak is not: requests in flight wait in the receive pipe, up to
            # its high-water mark, for as long as a loaded machine is slower than the flood)
            pid = broker.popen.pid
            wait_until(  # (the flood's requests still in the receive pipe are read first)
                lambda: vm_kib(pid, "VmRSS") - before < 128 * MIB, 90,
                "the broker's memory back under 128 MiB while the attacker stays connected",
            )  # fmt: skip
            figures = stats_of(endpoint)
            assert figures["unsent"] > 0 and figures["unread_bytes"] <= 8 << 20
        finally:
            attacker.close()
        wait_until(lambda: stats_of(endpoint)["unread_bytes"] == 0, 10, "the replies let go")
    finally:
        good.close()

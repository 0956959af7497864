"""eda-lb's pure parts: the wire frames and the balancer (no sockets, no processes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core.lb import protocol as p
from eda.core.lb.balancer import STRATEGIES, Backend, Balancer


# -- protocol ------------------------------------------------------------------------------
def test_every_message_round_trips() -> None:
    assert p.parse(p.request(b"1a.7", 250, b"hello")) == p.Message(
        p.REQUEST, rid=b"1a.7", timeout_ms=250, body=b"hello"
    )
    assert p.parse(p.reply(b"x", p.BUSY, b"")) == p.Message(p.REPLY, rid=b"x", status=p.BUSY)
    assert p.parse(p.ping(42)).seq == 42
    got = p.parse(p.pong(3, 1, 4, 0))
    assert (got.seq, got.data) == (3, {"inflight": 1, "concurrency": 4, "queued": 0})
    assert p.parse(p.stats({"requests": 3, "latency_ms": {"p50": 0.5}})).data == {
        "requests": 3,
        "latency_ms": {"p50": 0.5},
    }
    assert p.parse(p.ready("upper", "w-1", 4, 2)).data == {
        "service": "upper",
        "id": "w-1",
        "concurrency": 4,
        "weight": 2,
        "capacity": 4,  # not said: its concurrency
    }
    assert p.parse(p.ready("upper", "w-1", 4, 2, 1024)).data["capacity"] == 1024  # type: ignore[index]
    for frames, kind in (
        (p.stats_query(), p.STATS_QUERY),
        (p.heartbeat(), p.HEARTBEAT),
        (p.disconnect(), p.DISCONNECT),
    ):
        assert p.parse(frames) == p.Message(kind)
    # after a ROUTER's identity frame
    assert p.parse([b"\x00ident", *p.request(b"r", 0, b"")], start=1).rid == b"r"
    assert p.parse_request([b"id", *p.request(b"r", 9, b"b")], 1) == (b"r", 9, b"b")
    assert p.parse_reply(p.reply(b"r", p.ERR, b"exit 1: boom")) == (b"r", p.ERR, b"exit 1: boom")


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"EDALB1"],
        [b"EDALB2", b"Q", b"r", b"0", b""],  # wrong tag
        [b"EDALB1", b"Z"],  # unknown type
        [b"EDALB1", b"Q", b"r", b"0"],  # missing a field
        [b"EDALB1", b"Q", b"r", b"0", b"", b"extra"],
        [b"EDALB1", b"Q", b"", b"0", b""],  # empty rid
        [b"EDALB1", b"Q", b"x" * 65, b"0", b""],  # rid too long
        [b"EDALB1", b"Q", b"a\nb", b"0", b""],  # unprintable rid
        [b"EDALB1", b"Q", b"\xff", b"0", b""],
        [b"EDALB1", b"Q", b"r", b"-1", b""],  # bad timeouts
        [b"EDALB1", b"Q", b"r", b"1e3", b""],
        [b"EDALB1", b"Q", b"r", b"99999999999", b""],
        [b"EDALB1", b"Q", b"r", b"", b""],
        [b"EDALB1", b"R", b"r", b"maybe", b""],  # bad status
        [b"EDALB1", b"P", b"x"],
        [b"EDALB1", b"O", b"1", b"[]"],
        [b"EDALB1", b"O", b"1", b'{"inflight":-1,"concurrency":1,"queued":0}'],
        [b"EDALB1", b"O", b"1", b'{"inflight":true,"concurrency":1,"queued":0}'],
        [b"EDALB1", b"O", b"1", b"{"],
        [b"EDALB1", b"T", b'{"x": NaN}'],
        [b"EDALB1", b"T", b"[" * 5000 + b"]" * 5000],
        [b"EDALB1", b"T", b'{"a":' * 20 + b"1" + b"}" * 20],  # too deep
        [b"EDALB1", b"T", b"\xff\xfe"],
        [b"EDALB1", b"W", b'{"service":"UP PER","id":"a","concurrency":1,"weight":1}'],
        [b"EDALB1", b"W", b'{"service":"up","id":"a b","concurrency":1,"weight":1}'],
        [b"EDALB1", b"W", b'{"service":"up","id":"a","concurrency":0,"weight":1}'],
        [b"EDALB1", b"W", b'{"service":"up","id":"a","concurrency":2,"weight":1,"capacity":1}'],
        [b"EDALB1", b"W", b'{"service":"up","id":"a","concurrency":1,"weight":1,"capacity":1e9}'],
        [
            b"EDALB1",
            b"W",
            b'{"service":"up","id":"a","concurrency":1,"weight":1,"capacity":2000000}',
        ],
        [b"EDALB1", b"H", b"extra"],
    ],
)
def test_hostile_frames_are_protocol_errors(frames: list[bytes]) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse(frames)


def test_an_oversize_request_keeps_its_rid_for_the_error_reply() -> None:
    with pytest.raises(p.TooLarge) as caught:
        p.parse(p.request(b"big.1", 0, b"x" * 11), max_body=10)
    assert caught.value.rid == b"big.1"
    assert "too large" in str(caught.value)
    assert p.parse(p.request(b"ok.1", 0, b"x" * 10), max_body=10).body == b"x" * 10


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=7), st.integers(0, 2))
def test_parse_raises_nothing_but_protocol_error(frames: list[bytes], start: int) -> None:
    for candidate in (frames, [p.TAG, *frames], [p.TAG, p.REQUEST, *frames]):
        try:
            msg = p.parse(candidate, start)
        except p.ProtocolError:
            continue
        assert msg.kind in p.ARITY


# -- balancer ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def one(bal: Balancer, key: str) -> Backend:
    backend = bal.get(key)
    assert backend is not None
    return backend


def picked(bal: Balancer, exclude: set[str] | None = None) -> str:
    backend = bal.pick(exclude or set())
    assert backend is not None
    return backend.key


def shares(bal: Balancer, picks: int) -> Counter[str]:
    count: Counter[str] = Counter()
    for _ in range(picks):
        backend = bal.pick()
        assert backend is not None
        count[backend.key] += 1
    return count


@pytest.mark.parametrize("strategy", ["round-robin", "random", "p2c", "least-conn"])
def test_unweighted_strategies_spread_evenly(strategy: str) -> None:
    bal = Balancer(strategy, rng=random.Random(7))
    for key in "abcd":
        bal.add(key, weight=9 if key == "a" else 1)  # weight is for 'weighted' only
    count = shares(bal, 10_000)
    assert set(count) == set("abcd")
    for key in "abcd":
        assert abs(count[key] - 2500) < 250, count
    if strategy == "round-robin":
        assert max(count.values()) - min(count.values()) <= 1


def test_weighted_shares_are_within_five_percent_of_weights() -> None:
    bal = Balancer("weighted")
    weights = {"a": 1, "b": 2, "c": 5, "d": 0}
    for key, weight in weights.items():
        bal.add(key, weight)
    count = shares(bal, 10_000)
    assert "d" not in count  # weight 0: draining, never picked
    for key in "abc":
        expected = 10_000 * weights[key] / 8
        assert abs(count[key] - expected) <= 0.05 * expected, count


def test_least_conn_prefers_the_least_loaded_and_p2c_avoids_the_busiest() -> None:
    bal = Balancer("least-conn")
    for key in "abc":
        bal.add(key)
    for _ in range(5):
        bal.started(one(bal, "a"))
    bal.started(one(bal, "b"))
    assert {picked(bal) for _ in range(20)} == {"c"}
    p2c = Balancer("p2c", rng=random.Random(1))
    for key in "abc":
        p2c.add(key)
    for _ in range(10):
        p2c.started(one(p2c, "a"))
    assert "a" not in shares(p2c, 2000)  # whichever pair, 'a' loses


def test_pick_avoids_excluded_instances_while_others_remain() -> None:
    bal = Balancer("round-robin")
    for key in "ab":
        bal.add(key)
    assert {picked(bal, {"a"}) for _ in range(10)} == {"b"}
    assert bal.pick(exclude={"a", "b"}) is not None  # nothing else: any
    assert Balancer().pick() is None
    bal.remove("a")
    bal.remove("b")
    assert bal.pick() is None and len(bal) == 0


def test_outlier_ejection_grows_and_a_success_resets_it() -> None:
    clock = Clock()
    bal = Balancer("round-robin", eject_after=3, eject_base=1.0, eject_max=3.0, clock=clock)
    for key in "abc":
        bal.add(key)
    a = bal.get("a")
    assert a is not None
    for expected_time in (1.0, 2.0, 3.0, 3.0):  # base * 2^k, capped
        for i in range(3):
            bal.started(a)
            assert bal.finished(a, ok=False) == (i == 2)
        assert "a" not in shares(bal, 50)
        clock.now += expected_time - 0.01
        assert "a" not in shares(bal, 50)
        clock.now += 0.02
        assert "a" in shares(bal, 50)
    bal.started(a)
    bal.finished(a, ok=True)
    assert (a.consecutive, a.ejections) == (0, 0)
    bal.failed(a)
    bal.failed(a)
    assert "a" in shares(bal, 10)  # two failures after a success: not yet


def test_panic_spreads_over_all_when_most_are_ejected() -> None:
    clock = Clock()
    bal = Balancer("round-robin", eject_after=1, eject_base=60, panic=50, clock=clock)
    for key in "abcd":
        bal.add(key)
    bal.failed(one(bal, "a"))
    assert set(shares(bal, 30)) == set("bcd")  # 75% healthy: no panic
    bal.failed(one(bal, "b"))
    assert set(shares(bal, 30)) == set("cd")  # 50%: still not below the threshold
    bal.failed(one(bal, "c"))
    assert set(shares(bal, 40)) == set("abcd")  # 25% healthy: panic, all of them
    no_panic = Balancer("round-robin", eject_after=1, eject_base=60, panic=0, clock=clock)
    for key in "ab":
        no_panic.add(key)
    no_panic.failed(one(no_panic, "a"))
    no_panic.failed(one(no_panic, "b"))
    assert no_panic.pick() is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_slow_start_ramps_a_new_instance(strategy: str) -> None:
    clock = Clock()
    bal = Balancer(strategy, slow_start=10.0, clock=clock, rng=random.Random(3))
    bal.add("old", warm=False)
    bal.add("new")
    early = shares(bal, 4000)["new"]
    assert early < 4000 * 0.2, early  # starts at about 10% of its weight
    clock.now += 5
    if strategy in ("least-conn", "p2c"):
        # load-based strategies see the ramp as load: with one request in flight on 'old'
        # the half-warm 'new' ((0+1)/0.5 = 2) still loses to it ((1+1)/1 = 2 -> tie) or wins
        bal.started(one(bal, "old"))
        bal.started(one(bal, "old"))
        assert shares(bal, 200)["new"] > 0
    else:
        mid = shares(bal, 4000)["new"]
        assert 4000 * 0.25 < mid < 4000 * 0.42, mid  # weight 0.5 vs 1: a third
    clock.now += 6
    if strategy not in ("least-conn", "p2c"):
        late = shares(bal, 4000)["new"]
        assert abs(late - 2000) < 200, late


def test_an_ejected_instance_slow_starts_when_it_comes_back() -> None:
    clock = Clock()
    bal = Balancer("weighted", eject_after=1, eject_base=2, slow_start=10, clock=clock)
    bal.add("a", warm=False)
    bal.add("b", warm=False)
    bal.failed(one(bal, "b"))
    clock.now += 2.5  # back for 0.5 s of its 10 s ramp
    assert shares(bal, 1000)["b"] < 150
    clock.now += 20
    assert abs(shares(bal, 1000)["b"] - 500) <= 1


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        Balancer("fastest")


def test_a_worker_reconnects_to_a_broker_with_growing_backoff_and_jitter() -> None:
    from eda.core.lb.links import BrokerLink, BrokerLinks
    from eda.core.lb.worker import Worker

    worker = Worker("svc", ["cat"])
    try:
        links = BrokerLinks(worker, lambda: None)
        link = BrokerLink("tcp://127.0.0.1:1")
        waits: list[float] = []
        for _ in range(8):
            base = link.backoff
            links.schedule(link, 100.0)
            waits.append(link.retry_at - 100.0)
            assert 0.5 * base <= waits[-1] <= 1.5 * base  # jitter: +-50%
        assert link.backoff == 10.0  # doubled from 0.5 up to the cap
        assert waits[5] > waits[0] and len(set(waits)) == len(waits)  # growing, not in step
    finally:
        worker.close()

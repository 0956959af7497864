"""The bus's storage engines (core/bus): idempotent appends, reads, consumers, groups,
retention, and what happens on kill -9, a torn WAL, a full disk and bad input.

The engine contract tests take the ``opener`` fixture and run on both engines
(SQLite, and NATS JetStream on a real ``nats-server -js``); the embedded
engine's own concerns (its files, fsync, WAL repair, a full disk) follow.
NATS-only behaviour is in tests/test_bus_nats.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.cli import bus as cli_bus
from eda.core import codec
from eda.core.bus import (
    EventTooLargeError,
    SQLiteEngine,
    StoreError,
    StoreFullError,
)
from eda.core.bus import wal as walscan
from eda.core.bus.base import DEFAULT_MAX_RANGES
from eda.core.bus.retention import parse_age, parse_size
from eda.core.errors import NotFoundError, UsageError
from eda.core.topics import Matcher
from tests import bus_engines
from tests.bus_engines import Opener
from tests.helpers import readable, run

ROOT = Path(__file__).resolve().parent.parent
# the engines as fixtures: a test that takes ``opener`` runs on both
server, nats_opener, opener = bus_engines.server, bus_engines.nats_opener, bus_engines.opener
batch_opener = bus_engines.batch_opener


def batch(
    seq: int, size: int, topic: str = "t.a", pubid: str = "p1", width: int = 0
) -> codec.Batch:
    body = b"\n".join(f"{pubid}:{topic}:{seq + i}".encode() + b"x" * width for i in range(size))
    return codec.Batch(topic, codec.TEXT, size, seq, 1000.0, pubid, "eda://t", body)


def events(store: SQLiteEngine, start: int = 1, **kw: object) -> list[tuple[int, bytes]]:
    """(bus seq, payload) of every durable event from *start*."""
    out = []
    for r in store.read(start, **kw):  # type: ignore[arg-type]
        out += [(r.seq + i, p) for i, p in enumerate(r.payloads())]
    return out


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> SQLiteEngine:
    s = SQLiteEngine(tmp_path / "bus.db")
    yield s
    s.close()


# -- the engine contract, on both engines ------------------------------------------


def test_append_assigns_bus_sequences_and_keeps_ids(opener: Opener) -> None:
    with opener() as store:
        receipts = store.append([batch(1, 3), batch(1, 2, topic="t.b", pubid="p2")])
        assert [r.stored for r in receipts] == [((1, 1, 3),), ((1, 4, 2),)]
        assert store.durable_seq == 0 and events(store) == []  # not committed: not readable
        assert store.commit() == 5
        records = list(store.read(1))
        assert [(r.seq, r.size, r.topic) for r in records] == [(1, 3, "t.a"), (4, 2, "t.b")]
        assert records[1].ids() == ["p2-1", "p2-2"]
        assert [p for _, p in events(store)][3] == b"p2:t.b:1"


def test_duplicates_are_stored_once_also_part_of_a_batch(opener: Opener) -> None:
    with opener() as store:
        store.append([batch(1, 5)])
        store.commit()
        r = store.append([batch(4, 4)])[0]  # 4, 5 were stored; 6, 7 are new
        assert r.duplicates == ((4, 2),) and r.stored == ((6, 6, 2),) and r.confirm_at == 7
        r = store.append([batch(1, 3)])[0]  # a resend of committed events
        assert r.stored == () and r.duplicates == ((1, 3),) and r.confirm_at == 0
        r = store.append([batch(6, 1)])[0]  # a resend of an uncommitted event
        assert r.stored == () and r.confirm_at == 7
        assert store.commit() == 7
        assert [p for _, p in events(store)] == [f"p1:t.a:{i}".encode() for i in range(1, 8)]


def test_idempotence_and_sequences_survive_reopen(opener: Opener) -> None:
    with opener() as s:
        s.append([batch(1, 10), batch(20, 5)])  # a gap: 11..19 arrive later
    with opener() as s:
        assert s.durable_seq == 15
        r = s.append([batch(8, 15)])[0]
        assert r.duplicates == ((8, 3), (20, 3)) and r.stored == ((11, 16, 9),)
        s.commit()
        pubseqs = [r.pubseq + i for r in s.read(1) for i in range(r.size)]
        assert sorted(pubseqs) == list(range(1, 25))
        assert [q for q, _ in events(s)] == list(range(1, 25))


def test_read_by_range_limit_pattern_time_and_last(opener: Opener) -> None:
    clock = Clock()
    with opener(clock=clock) as s:
        s.append([batch(1, 4, "orders.created")])  # seqs 1-4 at t0
        s.commit()
        clock.now += 10
        s.append([batch(1, 3, "users.new"), batch(5, 4, "orders.paid")])  # 5-7, 8-11 at t0+10
        s.commit()
        assert [q for q, _ in events(s, 3, end=6)] == [3, 4, 5, 6]
        assert [q for q, _ in events(s, 2, limit=3)] == [2, 3, 4]
        orders = Matcher(["orders.*"])
        assert [q for q, _ in events(s, 3, matcher=orders)] == [3, 4, 8, 9, 10, 11]
        assert [q for q, _ in events(s, 1, matcher=Matcher(["users.>"]))] == [5, 6, 7]
        assert s.seq_at(clock.now - 5) == 5 and s.seq_at(0) == 1 and s.seq_at(clock.now + 1) == 12
        assert s.seq_for_last(2) == 10 and s.seq_for_last(6, orders) == 3
        assert s.seq_for_last(100) == 1
        first = next(s.read(3))
        assert first.seq == 3 and first.pubseq == 3 and first.payloads() == [
            b"p1:orders.created:3", b"p1:orders.created:4"]  # fmt: skip


def test_durable_consumer_position_survives_reopen(opener: Opener) -> None:
    with opener() as s:
        s.append([batch(1, 10)])
        assert s.consumer("billing", ["t.>"], 1) == 1
        assert s.ack("billing", 4) == 5
        assert s.ack("billing", 2) == 5  # acks never move back
        with pytest.raises(UsageError):
            s.ack("billing", 11)
        with pytest.raises(NotFoundError):
            s.position("nobody")
    with opener() as s:
        assert s.consumer("billing", ["t.>"], 1) == 5 and s.position("billing") == 5
        (c,) = s.stats().consumers
        assert (c.name, c.kind, c.next, c.lag) == ("billing", "durable", 5, 6)
        assert s.consumer("billing", ["x.*"], 1) == 5  # resumed with other patterns
        assert s.stats().consumers[0][2:5] == (("x.*",), 5, 0)
        s.drop_consumer("billing")
        with pytest.raises(NotFoundError):
            s.position("billing")


def test_group_members_share_events_and_a_released_members_go_to_others(opener: Opener) -> None:
    with opener() as s:
        s.append([batch(1, 6, "jobs.a"), batch(1, 2, "other"), batch(7, 6, "jobs.a")])
        s.commit()
        a = s.claim("workers", "a", ["jobs.>"], 6, start=1)
        b = s.claim("workers", "b", ["jobs.>"], 100)
        got_a = [r.seq + i for r in a for i in range(r.size)]
        got_b = [r.seq + i for r in b for i in range(r.size)]
        assert got_a == [1, 2, 3, 4, 5, 6] and got_b == [9, 10, 11, 12, 13, 14]
        assert s.group_ack("workers", "a", 2) == 2
        assert s.held("workers") == {"a": [(3, 6)], "b": [(9, 14)]}
        assert s.release("workers", "a") == 4  # a died holding 3 to 6
        c = s.claim("workers", "c", ["jobs.>"], 10)
        assert {r.seq + i for r in c for i in range(r.size)} >= {3, 4, 5, 6}
        assert s.group_ack("workers", "b", 14) == 6
        assert s.claim("workers", "d", ["jobs.>"], 10) == []  # nothing left, and no waiting
        with pytest.raises(UsageError):
            s.claim("workers", "d", ["other"], 1)  # a group has one set of patterns
        with pytest.raises(NotFoundError):
            s.held("nobody")


def test_stats_count_topics_bytes_and_lag(batch_opener: Opener) -> None:
    with batch_opener() as store:
        store.append([batch(1, 3, "a.x"), batch(1, 2, "b.y")])
        store.commit()
        store.consumer("c", ["a.*"], 1)
        st_ = store.stats()
        assert (st_.first_seq, st_.last_seq, st_.durable_seq, st_.events) == (1, 5, 5, 5)
        assert st_.topics["a.x"].events == 3
        assert st_.bytes == len(b"\n".join(f"p1:a.x:{i}".encode() for i in (1, 2, 3))) + len(
            b"p1:b.y:1\np1:b.y:2"
        )
        assert st_.consumers[0].lag == 3 and st_.file_bytes > 0


def test_retention_by_age_and_by_bytes_keeps_sequences_going(batch_opener: Opener) -> None:
    clock = Clock()
    with batch_opener(clock=clock) as s:
        for i in range(10):
            s.append([batch(1 + 10 * i, 10, width=90)])  # ~1 KB per batch
            s.commit()
            clock.now += 60
        gone = s.retain(max_age=300)  # batches stored more than 300 s ago
        assert (gone.events, gone.first_seq) == (50, 51)
        gone = s.retain(max_bytes=2 * 1000 + 500)
        assert gone.first_seq == 81 and s.stats().events == 20
        assert events(s)[0][0] == 81
    with batch_opener(clock=clock) as s:  # what retention removed stays removed
        assert s.first_seq == 81 and events(s)[0][0] == 81
        s.retain(max_bytes=0)
        assert s.stats().events == 0 and s.first_seq == 101
    with batch_opener(clock=clock) as s:
        assert s.first_seq == 101 and s.last_seq == 100
        (r,) = s.append([batch(101, 1)])
        assert r.stored == ((101, 101, 1),)  # sequences are never reused


def test_oversized_event_refused_and_nothing_of_the_call_stored(opener: Opener) -> None:
    with opener(max_event_bytes=100) as s:
        big = codec.Batch("t.a", codec.TEXT, 2, 1, 0.0, "p1", "eda://t", b"ok\n" + b"x" * 101)
        with pytest.raises(EventTooLargeError, match=r"p1-2 on t\.a is 101 bytes"):
            s.append([batch(1, 1, pubid="p0"), big])
        with pytest.raises(UsageError, match="announces 3 events"):
            s.append([big._replace(size=3)])
        s.append([batch(1, 2)])  # the same publisher sequences, valid: still new
        assert s.commit() == 2


def test_topics_beyond_ascii_round_trip(opener: Opener) -> None:
    with opener() as s:
        s.append([batch(1, 2, topic="café.ünï"), batch(1, 1, topic="t.a")])
        s.commit()
        got = list(s.read(1, matcher=Matcher(["café.*"])))
        assert [(r.topic, r.payloads()) for r in got] == [
            (
                "café.ünï",
                [b"p1:caf\xc3\xa9.\xc3\xbcn\xc3\xaf:1", b"p1:caf\xc3\xa9.\xc3\xbcn\xc3\xaf:2"],
            )
        ]


# -- NATS only ------------------------------------------------------------------------


# -- appending, idempotence, reading ---------------------------------------------


def test_refresh_takes_in_what_other_writers_stored(opener: Opener) -> None:
    """``refresh`` is part of every engine: a shared store (NATS) takes in another
    front's writes; a store one process owns has nothing to take in."""
    with opener() as a:
        a.append([batch(1, 3)])
        assert a.refresh() == 0 and a.commit() == 3 and a.refresh() == 3
        if not a.shared:
            return
        with opener() as b:  # a second front on the same stream
            b.append([batch(1, 2, pubid="p2")])
            assert b.commit() == 5
            assert a.refresh() == 5 and a.last_seq == 5
            assert [r.pubid for r in a.read(4)] == ["p2"]


def test_streams_are_per_publisher_and_topic(opener: Opener) -> None:
    with opener() as store:
        rs = store.append([batch(1, 2), batch(1, 2, topic="t.b"), batch(1, 2, pubid="p2")])
        assert all(r.duplicates == () for r in rs)
        assert store.commit() == 6


# 100 examples, each first sequence in 1..20: an example's cost is opening a fresh
# store, whatever it holds, and with up to 25 appends of up to 12 events over 4 streams
# starting in 1..20 nearly every example overlaps, contains or abuts earlier appends
# of the same stream, committed or not (1..40 and 200 examples: more of them disjoint)
@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["p1", "p2"]), st.sampled_from(["t.a", "t.b"]),
                  st.integers(1, 20), st.integers(1, 12), st.booleans()),
        min_size=1, max_size=25,
    )
)  # fmt: skip
def test_any_interleaving_stores_each_event_exactly_once(
    tmp_path_factory: pytest.TempPathFactory, appends: list[tuple[str, str, int, int, bool]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "bus.db"
    expected: set[tuple[str, str, int]] = set()
    with SQLiteEngine(path) as s:
        for pubid, topic, seq, size, commit in appends:
            (r,) = s.append([batch(seq, size, topic, pubid)])
            assert sum(n for _, _, n in r.stored) + sum(n for _, n in r.duplicates) == size
            expected |= {(pubid, topic, seq + i) for i in range(size)}
            if commit:
                s.commit()
        s.commit()
        seen: list[tuple[str, str, int]] = []
        bus = []
        for rec in s.read(1):
            for i, payload in enumerate(rec.payloads()):
                key = (rec.pubid, rec.topic, rec.pubseq + i)
                assert payload == f"{rec.pubid}:{rec.topic}:{rec.pubseq + i}".encode()
                seen.append(key)
                bus.append(rec.seq + i)
    assert len(seen) == len(set(seen)) and set(seen) == expected
    assert bus == list(range(1, len(bus) + 1))  # read back in bus order, no gap


def test_pattern_reads_over_many_batches_in_order(opener: Opener) -> None:
    with opener() as store:
        store.append([batch(i // 2 + 1, 1, "a.x" if i % 2 else "b.y") for i in range(3000)])
        store.commit()
        got = events(store, 1, matcher=Matcher(["a.*"]))
        assert [q for q, _ in got] == list(range(2, 3001, 2))
        assert [q for q, _ in events(store, 101, matcher=Matcher(["b.>"]), limit=700)] == list(
            range(101, 1500, 2)
        )
        assert events(store, 1, matcher=Matcher(["c"])) == []


# -- consumers and groups ---------------------------------------------------------


def test_group_leases_are_exact_and_durable_on_the_embedded_engine(tmp_path: Path) -> None:
    with SQLiteEngine(tmp_path / "bus.db") as s:
        s.append([batch(1, 6, "jobs.a"), batch(1, 2, "other"), batch(7, 6, "jobs.a")])
        s.commit()
        claims = [s.claim("workers", "a", ["jobs.>"], 4, start=1)]  # part of a batch
        claims.append(s.claim("workers", "b", ["jobs.>"], 100))
        a, b = ([r.seq + i for r in got for i in range(r.size)] for got in claims)
        assert a == [1, 2, 3, 4] and b == [5, 6, 9, 10, 11, 12, 13, 14]
        assert s.group_ack("workers", "a", 2) == 2
        assert s.held("workers") == {"a": [(3, 4)], "b": [(5, 14)]}
    with SQLiteEngine(tmp_path / "bus.db") as s:  # bookkeeping is durable
        assert s.release("workers", "a") == 2  # a died holding 3 and 4
        c = s.claim("workers", "c", ["jobs.>"], 10)
        assert [r.seq + i for r in c for i in range(r.size)] == [3, 4]
        assert s.group_ack("workers", "b", 14) == 8
        (g,) = s.stats().consumers
        assert (g.kind, g.held, g.lag) == ("group", 2, 2)
        with pytest.raises(UsageError):
            s.claim("workers", "d", ["other"], 1)  # a group has one set of patterns


def _stats_work(store: SQLiteEngine) -> tuple[int, list[str]]:
    """SQLite VM instructions run by ``store.stats()``, and the query plans of its statements."""
    steps = [0]
    sql: list[str] = []

    def step() -> int:
        steps[0] += 1
        return 0

    store._conn.set_progress_handler(step, 1)
    store._conn.set_trace_callback(sql.append)
    try:
        store.stats()
    finally:
        store._conn.set_progress_handler(None, 1)
        store._conn.set_trace_callback(None)
    plans = [
        str(row[3])
        for text in sql
        if text.lstrip().upper().startswith("SELECT")
        for row in store._conn.execute("EXPLAIN QUERY PLAN " + text)
    ]
    return steps[0], plans


def test_stats_work_does_not_grow_with_the_store(tmp_path: Path) -> None:
    """Stats are O(topics + consumers): no scan of the batches, the same work on 11x the events.

    (A store of 2,000,201 events in one-event batches made ``eda-bus stats`` time out.)
    """
    with SQLiteEngine(tmp_path / "bus.db", fsync="never") as s:
        seq = {"a.x": 1, "a.y": 1, "b.z": 1}

        def fill(n: int) -> None:
            for i in range(n):
                topic = ("a.x", "a.y", "b.z")[i % 3]
                s.append([batch(seq[topic], 1, topic)])
                seq[topic] += 1
            s.commit()

        fill(300)
        for i, patterns in enumerate((["a.>"], ["b.*"], ["*.x", "b.z"], [">"])):
            s.consumer(f"c{i}", patterns, 1 + 50 * i)  # behind by most of the store
        s.claim("g1", "m1", ["a.>"], 10, start=1)
        s.claim("g2", "m1", [">"], 10, start=1)
        s.commit()
        small, _ = _stats_work(s)
        fill(3000)
        big, plans = _stats_work(s)
        assert plans and not [p for p in plans if p.startswith("SCAN batches")], plans
        assert big <= small * 1.1, (small, big)  # old: one row visited per stored batch
        assert s.stats().consumers[0].lag == 2200  # a.x and a.y from sequence 1


def _brute(store: SQLiteEngine) -> tuple[dict[str, tuple[int, int]], list[int]]:
    """What stats must say, counted the slow way (every row)."""
    topics = {
        t: (int(n), int(b))
        for t, n, b in store._conn.execute(
            "SELECT topic, sum(count), sum(length(body)) FROM batches GROUP BY topic"
        )
    }
    lags = []
    for _, spec, nxt in store._conn.execute("SELECT name, patterns, next FROM consumers"):
        lags.append(store._count(nxt, store.last_seq, Matcher(json.loads(spec))))
    return topics, lags


def _said(store: SQLiteEngine) -> tuple[dict[str, tuple[int, int]], list[int]]:
    st_ = store.stats()
    assert st_.events == sum(t.events for t in st_.topics.values())
    topics = {t: (v.events, v.bytes) for t, v in st_.topics.items()}
    return topics, [c.lag for c in st_.consumers if c.kind == "durable"]


def test_stats_counts_stay_right_across_retention_rollback_restart_and_upgrade(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.db"
    clock = Clock()
    with SQLiteEngine(path, page_size=4096, clock=clock) as s:
        for i in range(30):  # batches of 1..7 events over three topics, two publishers
            topic = ("a.x", "a.y", "b.z")[i % 3]
            s.append([batch(1 + 10 * i, 1 + i % 7, topic, width=20 * (i % 4)),
                      batch(1 + 10 * i, 2, topic, pubid="p2")])  # fmt: skip
            clock.now += 60
        s.append([batch(1, 3, "a.x")])  # a duplicate: nothing stored, nothing counted
        s.commit()
        for name, patterns, start in (("c1", ["a.>"], 1), ("c2", ["b.z"], 17), ("c3", [">"], 40)):
            s.consumer(name, patterns, start)  # 17 and 40: in the middle of batches
        s.commit()
        assert _said(s) == _brute(s) and _said(s)[0]["a.x"][0] > 0
        s.retain(max_age=20 * 60)  # by age: the first ten wire batches go
        assert _said(s) == _brute(s) and s.first_seq > 1
        s.retain(max_bytes=_said(s)[0]["b.z"][1])  # by bytes: most of the rest
        assert _said(s) == _brute(s)
        before = _said(s)
        pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
        s._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        with pytest.raises(StoreFullError):
            for i in range(50):
                s.append([batch(1000 + 100 * i, 50, "a.new", width=200)])
                s.commit()
        assert _said(s) == before == _brute(s)  # the failed commit counted nothing
        s._conn.execute("PRAGMA max_page_count = 1000000")
        s.append([batch(1, 4, "a.new")])
        s.commit()
        after = _said(s)
        assert after == _brute(s) and after[0]["a.new"][0] >= 4
        s.retain(max_bytes=0)  # everything goes: no topic is left
        assert _said(s) == ({}, [0, 0, 0]) == _brute(s)
        s.append([batch(100, 2, "a.x"), batch(7, 3, "c.w")])
        s.commit()
        expected = _said(s)
        assert expected == _brute(s) and expected[0]["a.x"][0] == 2
    with SQLiteEngine(path) as s:  # a restart: counts as they were
        assert _said(s) == expected == _brute(s)
    with sqlite3.connect(path) as old:  # the same store as schema 1 wrote it
        old.executescript(
            "DROP INDEX batches_topic; ALTER TABLE batches DROP COLUMN cum;"
            "ALTER TABLE batches DROP COLUMN cumb;"
            "UPDATE meta SET value = 1 WHERE key = 'schema';"
        )
    with SQLiteEngine(path) as s:  # upgraded on opening
        assert _said(s) == expected == _brute(s)
        assert s._conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (2,)
        s.append([batch(200, 5, "a.x")])
        s.commit()
        assert _said(s)[0]["a.x"][0] == 7 and _said(s) == _brute(s)


# -- retention ---------------------------------------------------------------------


def test_the_size_and_age_parsers_eda_bus_calls(tmp_path: Path) -> None:
    """One parser of each (core/bus/retention.py), the one eda-bus's options call."""
    assert cli_bus.parse_bytes is parse_size
    sizes = {"10GB": 10**10, "1MiB": 2**20, "64k": 64_000, "2ki": 2048, "4096": 4096,
             "1.5 kb": 1500, "512MiB": 512 << 20}  # fmt: skip
    assert {text: parse_size(text) for text in sizes} == sizes
    assert [parse_age(t) for t in ("90s", "15m", "12h", "7d", "2w", "30")] == [
        90, 900, 43200, 604800, 1209600, 30]  # fmt: skip
    for bad in ("0", "0GB", "-1MB", "10 parsecs", "", "0.0001b"):
        with pytest.raises(UsageError, match="invalid size"):
            parse_size(bad)
    for bad in ("0", "0s", "0d", "-5m", "7 days", ""):
        with pytest.raises(UsageError, match="invalid age"):
            parse_age(bad)
    # through the CLI: a limit of nothing is a one-line usage error (exit 2), never
    # accepted (which would remove every event at the first retention pass)
    for option, value in [("--max-age", "0"), ("--max-bytes", "0"), ("--max-age", "0d"),
                          ("--max-bytes", "0GB"), ("--max-queued", "0")]:  # fmt: skip
        done = run("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--no-mdns",
                   "--bind", "tcp://127.0.0.1:0", option, value)  # fmt: skip
        assert done.returncode == 2, (option, value, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "invalid" in done.stderr
    assert not (tmp_path / "bus").exists()  # refused before anything was created
    done = run("eda-bus", "retain", "--max-age", "0", "--bus", "tcp://127.0.0.1:9")
    assert done.returncode == 2 and "invalid age '0'" in done.stderr


# -- bad input, fsync modes, ownership -----------------------------------------------


def test_a_stream_with_too_many_gaps_is_refused_until_filled(opener: Opener) -> None:
    with opener(max_ranges=3) as s:
        s.append([batch(1, 1)])
        s.append([batch(3, 1)])
        s.append([batch(5, 1)])  # three ranges: 1, 3, 5
        with pytest.raises(UsageError, match="2 gaps in its sequence: batch from 7 refused"):
            s.append([batch(7, 1)])
        s.append([batch(6, 1), batch(5, 1)])  # continuing, and a duplicate: fine
        s.append([batch(2, 1)])  # filling a gap: fine
        s.append([batch(9, 1)])
        assert s.commit() == 6
        assert sorted(r.pubseq for r in s.read(1)) == [1, 2, 3, 5, 6, 9]


def test_a_publisher_that_skips_numbers_keeps_bounded_state(opener: Opener) -> None:
    """Every other sequence number (1, 3, 5, ...): each event opens a range of its own.

    Both engines keep at most DEFAULT_MAX_RANGES ranges for the stream and
    refuse, with one line, the events that would open more (the NATS engine's
    used to grow without limit); continuing the last range and filling a gap
    stay possible, also after a reopen.
    """
    limit = DEFAULT_MAX_RANGES
    refused: list[str] = []
    with opener() as s:
        for i in range(limit + 40):
            try:
                s.append([batch(1 + 2 * i, 1)])
            except UsageError as exc:
                refused.append(str(exc))
            if i % 256 == 255:
                s.commit()
        s.commit()
        assert len(refused) == 40 and s.last_seq == limit
        assert len(s._ledger.ranges["p1", "t.a"]) == limit
        assert f"has {limit - 1} gaps in its sequence" in refused[0]
        assert "\n" not in refused[0]
        s.append([batch(2 * limit, 1)])  # continues the last range: stored
        s.append([batch(2, 1)])  # fills the first gap: stored, one range fewer
        assert s.commit() == limit + 2
    with opener() as s:  # the bound holds for the state read back
        assert len(s._ledger.ranges["p1", "t.a"]) == limit - 1
        s.append([batch(3 * limit, 1)])  # a new range: the limit again
        with pytest.raises(UsageError, match="gaps in its sequence"):
            s.append([batch(3 * limit + 2, 1)])
        assert s.commit() == limit + 3


@pytest.mark.parametrize(("mode", "level"), [("always", 2), ("batch", 2), ("never", 0)])
def test_fsync_modes_map_to_sqlite_synchronous(tmp_path: Path, mode: str, level: int) -> None:
    with SQLiteEngine(tmp_path / "bus.db", fsync=mode) as s:  # type: ignore[arg-type]
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == level
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.append([batch(1, 2)])
        assert s.durable_seq == (2 if mode == "always" else 0)  # always: durable on return
    with pytest.raises(UsageError):
        SQLiteEngine(tmp_path / "x.db", fsync="sometimes")  # type: ignore[arg-type]


def test_a_store_has_one_owner_and_a_closed_store_says_so(store: SQLiteEngine) -> None:
    with pytest.raises(StoreError, match="in use by another process"):
        SQLiteEngine(store.path)
    store.close()
    with SQLiteEngine(store.path) as again:  # the lock went with the close
        assert again.durable_seq == 0
    for call in (lambda: store.append([batch(1, 1)]), store.commit, lambda: list(store.read(1))):
        with pytest.raises(StoreError, match="is closed"):
            call()


# -- crashes, torn writes, full disk -------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from eda.core import codec
    from eda.core.bus import SQLiteEngine
    store = SQLiteEngine(sys.argv[1], fsync="batch")
    seq = 1
    while True:  # until killed: append 3 batches of 50, commit, confirm
        for _ in range(3):
            body = b"\\n".join(b"e%d" % (seq + i) for i in range(50))
            store.append([codec.Batch("t.a", codec.TEXT, 50, seq, 0.0, "w", "eda://w", body)])
            seq += 50
        print(store.commit(), flush=True)
""")


def test_sigkill_mid_stream_loses_nothing_committed_and_stores_nothing_twice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        fd, buf, confirmed = proc.stdout.fileno(), b"", 0
        deadline = time.monotonic() + 60
        while confirmed < 30_000:  # read confirmations until well into the stream
            ready = readable([fd], deadline - time.monotonic())
            assert ready, "no confirmation from the writer within 60 s"
            chunk = os.read(fd, 65536)
            assert chunk, "writer died"
            *lines, buf = (buf + chunk).split(b"\n")
            if lines:
                confirmed = int(lines[-1])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    with SQLiteEngine(path) as s:
        payloads = [p for r in s.read(1) for p in r.payloads()]
        assert len(payloads) >= confirmed
        assert payloads == [b"e%d" % i for i in range(1, len(payloads) + 1)]
        # the publisher resends everything it has no confirmation for: stored once
        body = b"\n".join(b"e%d" % i for i in range(confirmed + 1, confirmed + 301))
        (r,) = s.append(
            [codec.Batch("t.a", codec.TEXT, 300, confirmed + 1, 0.0, "w", "eda://w", body)]
        )
        s.commit()
        assert sum(n for _, n in r.duplicates) == len(payloads) - confirmed
        again = [p for r in s.read(1) for p in r.payloads()]
        assert again == [b"e%d" % i for i in range(1, confirmed + 301)]


def crash_image(store: SQLiteEngine, dest: Path) -> Path:
    """Copy the store's files as a crash would leave them (WAL not checkpointed)."""
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{store.path}{suffix}", f"{dest}{suffix}")
    return dest


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_torn_last_write_is_detected_and_repaired_to_the_last_commit(
    tmp_path: Path, damage: str
) -> None:
    with SQLiteEngine(tmp_path / "bus.db", page_size=4096) as s:
        for i in range(5):
            s.append([batch(1 + 20 * i, 20, width=200)])  # ~4 KB: a few pages per commit
            s.commit()
        image = crash_image(s, tmp_path / "crash.db")
    wal_path = Path(f"{image}-wal")
    clean = walscan.scan(wal_path)
    assert clean is not None and clean.torn_bytes == 0 and clean.committed == clean.frames
    data = bytearray(wal_path.read_bytes())
    if damage == "truncate":
        del data[-1000:]
    else:
        data[-50] ^= 0xFF
    wal_path.write_bytes(bytes(data))
    with SQLiteEngine(image) as s:
        assert len(s.repairs) == 1 and "torn" in s.repairs[0]
        assert s.durable_seq == 80 and f"sequence {s.durable_seq}" in s.repairs[0]
        assert [p for _, p in events(s)] == [
            f"p1:t.a:{i}".encode() + b"x" * 200 for i in range(1, 81)
        ]
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (r,) = s.append([batch(1, 100, width=200)])  # the lost batch can be resent
        assert r.stored == ((81, 81, 20),)
    with SQLiteEngine(image) as s:
        assert s.repairs == [] and s.durable_seq == 100


def test_a_reused_wal_with_old_frames_after_a_crash_is_not_taken_for_damage(
    tmp_path: Path,
) -> None:
    with SQLiteEngine(tmp_path / "bus.db", page_size=4096) as s:
        for i in range(5):
            s.append([batch(1 + 20 * i, 20, width=300)])
            s.commit()
        s._conn.execute(
            "PRAGMA wal_checkpoint(PASSIVE)"
        )  # all copied: the next write restarts the WAL
        s.append([batch(101, 1)])
        s.commit()
        image = crash_image(s, tmp_path / "crash.db")
    scan = walscan.scan(Path(f"{image}-wal"))
    assert scan is not None and scan.torn_bytes == 0 and scan.uncommitted == 0
    assert Path(f"{image}-wal").stat().st_size > 32 + scan.frames * (24 + 4096)  # old frames follow
    with SQLiteEngine(image) as s:
        assert s.repairs == [] and s.durable_seq == 101


@pytest.fixture(scope="module")
def crash_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A crash image of 8 commits, and the WAL's size after opening and after each commit."""
    d = tmp_path_factory.mktemp("crash")
    with SQLiteEngine(d / "bus.db", page_size=4096) as s:
        wal_size = Path(f"{s.path}-wal").stat
        sizes = [wal_size().st_size]
        for i in range(8):
            s.append([batch(1 + 20 * i, 20, width=100 + 50 * i)])
            s.commit()
            sizes.append(wal_size().st_size)
        image = crash_image(s, d / "image.db")
    return image, sizes


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_torn_tail_of_the_wal_leaves_exactly_the_intact_commits(
    tmp_path_factory: pytest.TempPathFactory,
    crash_base: tuple[Path, list[int]],
    data: st.DataObject,
) -> None:
    image, sizes = crash_base
    wal_bytes = Path(f"{image}-wal").read_bytes()
    assert sizes[-1] == len(wal_bytes)
    if data.draw(st.booleans(), "truncate"):
        cut = data.draw(st.integers(sizes[0], len(wal_bytes) - 1), "length")
        damaged, intact = wal_bytes[:cut], sum(1 for n in sizes[1:] if n <= cut)
    else:  # a torn last write: some byte of the last commit's frames is wrong
        off = data.draw(st.integers(sizes[-2], len(wal_bytes) - 1), "offset")
        bit = data.draw(st.integers(0, 7), "bit")
        damaged = wal_bytes[:off] + bytes([wal_bytes[off] ^ (1 << bit)]) + wal_bytes[off + 1 :]
        cut, intact = -1, 7
    copy = tmp_path_factory.mktemp("torn") / "bus.db"
    shutil.copyfile(image, copy)
    Path(f"{copy}-wal").write_bytes(damaged)
    every = [batch(1 + 20 * i, 20, width=100 + 50 * i) for i in range(8)]
    with SQLiteEngine(copy) as s:
        got = [p for r in s.read(1) for p in r.payloads()]
        assert got == [p for b in every[:intact] for p in codec.split_body(b)]
        if cut >= 0:  # only a cut exactly at a commit boundary cannot be told from a clean end
            assert bool(s.repairs) == (cut not in sizes)
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        s.append(every)  # the publisher resends: each event is then stored once
        s.commit()
        again = [(r.pubseq, r.size) for r in s.read(1)]
        assert sum(n for _, n in again) == 160
        assert sorted(q + i for q, n in again for i in range(n)) == list(range(1, 161))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_damage_before_the_last_write_stops_the_store_and_keeps_every_file(
    tmp_path_factory: pytest.TempPathFactory,
    crash_base: tuple[Path, list[int]],
    data: st.DataObject,
) -> None:
    """A flipped bit anywhere before the last commit's frames (the log header included) is
    damage with intact frames after it: opening fails with a clear error and truncates
    nothing; SQLite would have dropped every later frame."""
    image, sizes = crash_base
    wal_bytes = Path(f"{image}-wal").read_bytes()
    off = data.draw(st.integers(0, sizes[-2] - 1), "offset")
    bit = data.draw(st.integers(0, 7), "bit")
    damaged = wal_bytes[:off] + bytes([wal_bytes[off] ^ (1 << bit)]) + wal_bytes[off + 1 :]
    copy = tmp_path_factory.mktemp("damaged") / "bus.db"
    shutil.copyfile(image, copy)
    Path(f"{copy}-wal").write_bytes(damaged)
    main = copy.read_bytes()
    with pytest.raises(StoreError, match=r"damaged.*not a torn last write"):
        SQLiteEngine(copy)
    assert Path(f"{copy}-wal").read_bytes() == damaged and copy.read_bytes() == main
    found = walscan.scan(Path(f"{copy}-wal"))
    assert found is not None and found.intact_after > 0 and found.torn_bytes == 0


def test_one_byte_flipped_mid_wal_stops_eda_bus_and_loses_nothing(tmp_path: Path) -> None:
    """The reviewer's case: 64 KiB pages, many commits, one byte flipped in the middle of
    the WAL.  eda-bus exits 1 with a one-line error instead of serving part of the
    events; once the byte is right again, every event is there."""
    data = tmp_path / "bus"
    with SQLiteEngine(data / "bus.db") as s:
        for i in range(12):
            s.append([batch(1 + 1000 * i, 1000, width=40)])
            s.commit()
        image = crash_image(s, tmp_path / "image.db")
    wal_bytes = Path(f"{image}-wal").read_bytes()
    clean = walscan.scan(Path(f"{image}-wal"))
    assert clean is not None and clean.intact_after == 0 and clean.torn_bytes == 0
    frames, frame = clean.frames, 24 + 65536  # of the log's current generation
    assert frames > 20
    off = 32 + (frames // 2) * frame + 24 + 1000  # page data of a frame half way in
    damaged = bytearray(wal_bytes)
    damaged[off] ^= 0x10
    shutil.copyfile(image, data / "bus.db")
    Path(f"{data}/bus.db-wal").write_bytes(bytes(damaged))
    done = subprocess.run(
        [sys.executable, "-m", "eda.cli.bus", "serve", "--data", str(data),
         "--bind", "tcp://127.0.0.1:0", "--no-mdns"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("eda-bus: error: ") and "not a torn last write" in line
    assert Path(f"{data}/bus.db-wal").read_bytes() == bytes(damaged)
    found = walscan.scan(Path(f"{data}/bus.db-wal"))
    assert found is not None and found.damaged_at == off - 24 - 1000
    assert found.intact_after == frames - frames // 2 - 1
    Path(f"{data}/bus.db-wal").write_bytes(wal_bytes)  # repaired from elsewhere: all there
    with SQLiteEngine(data / "bus.db") as s:
        assert s.repairs == [] and s.durable_seq == 12_000 and len(events(s)) == 12_000


def test_full_disk_simulated_by_a_page_limit(tmp_path: Path) -> None:
    with SQLiteEngine(tmp_path / "bus.db", page_size=4096) as s:
        s.append([batch(1, 10)])
        s.commit()
        s._conn.execute("PRAGMA max_page_count = 40")
        with pytest.raises(StoreFullError, match="disk is full") as full:
            for i in range(100):
                s.append([batch(11 + 50 * i, 50, width=100)])
                s.commit()
        assert s.last_seq == s.durable_seq  # rolled back to the last commit
        durable = s.durable_seq
        assert f"nothing after sequence {durable} was stored" in str(full.value)
        s._conn.execute("PRAGMA max_page_count = 1000000")  # space is back
        (r,) = s.append([batch(11, 50 * 100, width=100)])
        assert sum(n for _, n in r.duplicates) == durable - 10
        assert s.commit() == 10 + 5000
    with SQLiteEngine(tmp_path / "bus.db") as s:
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [p.split(b"x")[0] for _, p in events(s)] == [
            f"p1:t.a:{i}".encode() for i in range(1, 5011)
        ]


FULL = textwrap.dedent("""
    import json, subprocess, sys
    from eda.core import codec
    from eda.core.bus import SQLiteEngine, StoreFullError
    d = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", d], check=True)
    store = SQLiteEngine(d + "/bus.db", page_size=4096)
    seq, error = 1, ""
    try:
        for _ in range(10_000):
            body = b"\\n".join(b"%08d" % (seq + i) + b"y" * 92 for i in range(100))
            store.append([codec.Batch("t.a", codec.TEXT, 100, seq, 0.0, "w", "eda://w", body)])
            seq += 100
            store.commit()
    except StoreFullError as exc:
        error = str(exc)
    durable = store.durable_seq
    store.close()
    try:  # still full: opening says so
        SQLiteEngine(d + "/bus.db").close()
        reopen = "opened"
    except StoreFullError as exc:
        reopen = str(exc)
    subprocess.run(["mount", "-o", "remount,size=8m", d], check=True)  # space is back
    with SQLiteEngine(d + "/bus.db") as again:
        got = [p[:8] for r in again.read(1) for p in r.payloads()]
        check = again._conn.execute("PRAGMA integrity_check").fetchone()[0]
    print(json.dumps({"error": error, "durable": durable, "got": len(got),
                      "ordered": got == [b"%08d" % i for i in range(1, len(got) + 1)],
                      "check": check, "reopen": reopen}))
""")


def test_full_disk_on_a_tiny_tmpfs_stops_commits_and_keeps_the_store(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to mount a tmpfs (the page-limit test covers it)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", FULL, str(mnt)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "disk is full" in out["error"]
    assert out["durable"] > 1000 and out["got"] == out["durable"]
    assert out["ordered"] and out["check"] == "ok"
    assert out["reopen"] == "opened" or "disk is full" in out["reopen"]


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        SQLiteEngine(path)
    assert sqlite3.sqlite_version  # the standard library's SQLite, nothing else


# -- purging one topic ---------------------------------------------------------------


def test_purge_removes_one_topic_anywhere_and_keeps_every_invariant(tmp_path: Path) -> None:
    """Embedded engine: a purge removes exactly the matching topics' events; sequences,
    consumers' positions, idempotence, counts and retention hold, also after a reopen."""
    path = tmp_path / "bus.db"
    with SQLiteEngine(path) as s:
        s.append([batch(1, 3, "a.x"), batch(1, 2, "b.y"), batch(1, 3, "c.z"),
                  batch(4, 2, "b.y"), batch(4, 1, "a.x")])  # fmt: skip
        s.commit()  # a.x 1-3, b.y 4-5, c.z 6-8, b.y 9-10, a.x 11
        s.consumer("d", [">"], 1)
        s.ack("d", 4)  # next 5: inside the purged topic
        s.consumer("later", ["b.*"], 9)
        s.claim("g", "m1", [">"], 5, start=1)  # holds 1-5 (b.y 4-5 among them)
        s.claim("g", "m2", [">"], 2)  # holds 6-7
        assert s.group_ack("g", "m1", 3) == 3  # m1 still holds 4-5: b.y only
        done = s.purge("b.*")
        assert (done.events, done.topics) == (4, ("b.y",))
        assert done.bytes == len(b"p1:b.y:1\np1:b.y:2") + len(b"p1:b.y:4\np1:b.y:5")
        assert [q for q, _ in events(s)] == [1, 2, 3, 6, 7, 8, 11]  # the others untouched
        assert s.purge("b.y") == (0, 0, ())  # idempotent
        st_ = s.stats()
        assert set(st_.topics) == {"a.x", "c.z"} and st_.events == 7
        assert (st_.first_seq, st_.last_seq) == (1, 11) and s.kept_from == 1
        lags = {c.name: (c.next, c.lag, c.held) for c in st_.consumers}
        assert lags == {"d": (5, 4, 0), "later": (9, 0, 0), "g": (8, 4, 2)}
        assert s.held("g") == {"m2": [(6, 7)]}  # the lease on purged events only is settled
        # a publisher re-sending what was purged is not stored again; new events go on
        (again,) = s.append([batch(1, 2, "b.y")])
        assert again.stored == () and again.duplicates == ((1, 2),)
        (new,) = s.append([batch(6, 1, "b.y")])
        assert new.stored == ((6, 12, 1),)  # sequences are never reused
        s.commit()
        assert [q for q, _ in events(s, 5)] == [6, 7, 8, 11, 12]  # d's next read skips the hole
    with SQLiteEngine(path) as s:  # the same after a restart
        st_ = s.stats()
        assert {t: v.events for t, v in st_.topics.items()} == {"a.x": 4, "c.z": 3, "b.y": 1}
        assert s.kept_from == 1 and s.last_seq == 12 and s.position("d") == 5
        assert s.append([batch(1, 1, "b.y")])[0].stored == ()
        done = s.purge(">")  # a pattern over every topic
        assert done.events == 8 and done.topics == ("a.x", "b.y", "c.z")
        assert s.stats().events == 0 and s.first_seq == 13 and s.kept_from == 1
        (r,) = s.append([batch(1, 2, "n.t")])
        assert r.stored == ((1, 13, 2),)
        s.commit()
        assert s.retain(max_bytes=0).events == 2  # retention still works after a purge
        assert s.first_seq == s.kept_from == 15


def test_retention_after_a_purge_cuts_where_it_removes(tmp_path: Path) -> None:
    """kept_from follows retention, not purges: a reader before it lost events, after it not."""
    clock = Clock()
    with SQLiteEngine(tmp_path / "bus.db", clock=clock) as s:
        for i in range(4):
            s.append([batch(1 + 2 * i, 2, "old"), batch(1 + 2 * i, 2, "keep")])
            s.commit()
            clock.now += 60
        s.purge("old")
        assert s.first_seq == 3 and s.kept_from == 1  # seqs 1-2 were purged: no loss
        gone = s.retain(max_age=150)  # the batches stored at 0 and 60 s (keep 3-4, 7-8)
        assert gone.events == 4 and s.first_seq == 11 and s.kept_from == 11
        assert [q for q, _ in events(s)] == [11, 12, 15, 16]


def test_the_nats_engine_refuses_to_purge_one_topic(nats_opener: Opener) -> None:
    with nats_opener() as s:
        s.append([batch(1, 2, "a.x"), batch(1, 2, "b.y")])
        s.commit()
        with pytest.raises(UsageError, match="NATS engine"):
            s.purge("a.x")
        assert s.stats().events == 4 and s.kept_from == 1

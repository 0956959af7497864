"""Issue 15 point 12: state keyed by what a peer sends is bounded, evictions counted.

The audit of every such map in core/ (ARCHITECTURE.md, "Per-peer state is
bounded") found these left unbounded; each test failed before its fix.
"""

from __future__ import annotations

import time
from pathlib import Path

from eda.core import codec
from eda.core.bus.base import FORGET_AFTER, Ledger
from eda.core.bus.sqlite import SQLiteEngine
from eda.core.txn.directory import MAX_NAMES, Lookups


def test_a_flood_of_made_up_participant_names_leaves_the_lookup_cache_bounded() -> None:
    """A commit names any participant it likes: each name looked up was kept for ever."""
    lookups = Lookups(lambda name: [], ttl=60.0, miss_ttl=60.0)
    flood = 3 * MAX_NAMES
    for i in range(flood):
        assert lookups.lookup_now(f"ghost-{i}") == []
    assert len(lookups.cache) <= MAX_NAMES
    assert lookups.cache.evicted == flood - len(lookups.cache)
    # a name in use stays answered from the cache while the flood goes on
    asked: list[str] = []

    def find(name: str) -> list[str]:
        asked.append(name)
        return ["tcp://127.0.0.1:7731"] if name == "stock" else []

    known = Lookups(find, ttl=60.0, miss_ttl=60.0)
    for i in range(flood):
        assert known.lookup_now("stock") == ["tcp://127.0.0.1:7731"]
        known.lookup_now(f"ghost-{i}")
    assert asked.count("stock") == 1  # looked up once, never forgotten


def _run(pubid: str) -> codec.Batch:
    """The one event of a publisher run (each run of eda-pub --bus takes a new id)."""
    return codec.Batch("t.a", codec.TEXT, 1, 1, 1000.0, pubid, "eda://t", b"x" * 100)


def test_publisher_runs_whose_events_retention_removed_are_forgotten(tmp_path: Path) -> None:
    """With --max-bytes alone, every publisher stream ever stored was kept for ever (and
    loaded at every start): a shell loop of eda-pub --bus grew the bus without end."""
    now = [1_000_000.0]
    store = SQLiteEngine(tmp_path / "bus", clock=lambda: now[0])
    runs = 2000
    for i in range(runs):
        store.append([_run(f"run{i}")])
        now[0] += 0.01
    store.commit()
    store.retain(max_bytes=1000, now=now[0])  # keeps the last few events
    kept = {r.pubid for r in store.read(store.first_seq)}
    assert 0 < len(kept) < 20
    # a late resend of a removed event is still a duplicate (FORGET_AFTER seconds)
    assert len(store._ledger.ranges) == runs
    [receipt] = store.append([_run("run0")])
    assert receipt.duplicates == ((1, 1),) and not receipt.stored
    now[0] += FORGET_AFTER + 1
    store.append([_run("later")])
    store.commit()
    store.retain(max_bytes=1000, now=now[0])
    kept = {r.pubid for r in store.read(store.first_seq)}
    assert {pubid for pubid, _ in store._ledger.ranges} == kept  # only streams with events
    store.close()
    again = SQLiteEngine(tmp_path / "bus", clock=lambda: now[0])
    assert {pubid for pubid, _ in again._ledger.ranges} == kept  # also after a restart
    again.close()


def test_the_nats_engine_forgets_a_removed_stream_with_its_retained_sequences() -> None:
    """The NATS engine kept removed streams' sequences FORGET_AFTER seconds (in the
    bucket), then dropped them there but not from its ledger: the same growth."""
    from eda.core.bus.nats.engine import NatsEngine
    from eda.core.bus.nats.wire import _Head

    engine = NatsEngine.__new__(NatsEngine)  # the index alone: no server needed
    engine._ledger = Ledger()
    engine._gone, engine._gone_for = {}, FORGET_AFTER
    old = time.time() - FORGET_AFTER - 1
    for i in range(1000):  # removed long ago
        engine._gone[f"run{i}", "t.a"] = ([[1, 2]], old)
        engine._ledger.add((f"run{i}", "t.a"), 1, 2)
    heads = [_Head(sseq=n, seq=n, size=1, stored=0.0, topic="t.a", pubid=pubid, pubseq=5,
                   nbytes=100) for n, pubid in enumerate(["leaving", "run1", "staying"], 1)]  # fmt: skip
    engine._heads = list(heads)
    for h in heads:
        engine._ledger.add((h.pubid, h.topic), h.pubseq, h.pubseq + h.size)
    engine._forget(heads[:1])  # retention removes the oldest message
    assert set(engine._ledger.ranges) == {("leaving", "t.a"), ("run1", "t.a"), ("staying", "t.a")}
    assert set(engine._gone) == {("leaving", "t.a")}  # kept FORGET_AFTER from now

"""The bus's storage engine alone: append and replay of 1,000,000 ~100-byte events.

    python bench/bench_bus_store.py [--quick]

No sockets and no daemon: batches of 500 events, built as the wire delivers
them (``codec.Batch``), are appended to a fresh SQLiteEngine with
``fsync=batch`` and a commit (the fsync a confirmation waits for) after every
4 batches (2,000 events); a second row commits after every batch.  Replay
reads every event back in order with ``read`` and splits the payloads; a
second replay reads one of the two topics the batches alternate between.  The
anchors are the end-to-end targets of the bus issue (confirmed publishing
>= ~330k events/s, replay >= 700k events/s): the store must be comfortably
faster than the whole path, so the target here is 2x those figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness import BenchError, Row, row, scratch

from eda.core import codec
from eda.core.bus import SQLiteEngine
from eda.core.topics import Matcher

EVENTS = 1_000_000
PER_BATCH = 500
PUBLISH_TARGET = 330_000.0
REPLAY_TARGET = 700_000.0


def batches(n: int) -> list[codec.Batch]:
    """*n* events of ~100 bytes in wire batches of PER_BATCH, on two topics in turn.

    One publisher; as on the wire, each topic has its own publisher sequence.
    """
    out = []
    now = time.time()
    next_seq = {"bench.orders": 1, "bench.users": 1}
    for k, first in enumerate(range(1, n + 1, PER_BATCH)):
        size = min(PER_BATCH, n - first + 1)
        body = b"\n".join(b"%08d " % (first + i) + b"x" * 91 for i in range(size))
        topic = ("bench.orders", "bench.users")[k % 2]
        seq = next_seq[topic]
        next_seq[topic] += size
        out.append(codec.Batch(topic, codec.TEXT, size, seq, now, "bench", "eda://b", body))
    return out


def append(path: Path, data: list[codec.Batch], every: int) -> float:
    """Events/s appending *data*, committing after every *every* batches."""
    with SQLiteEngine(path, fsync="batch") as store:
        start = time.perf_counter()
        for i in range(0, len(data), every):
            store.append(data[i : i + every])
            store.commit()
        elapsed = time.perf_counter() - start
        if store.durable_seq != sum(b.size for b in data):
            raise BenchError(f"stored {store.durable_seq} events, not {len(data) * PER_BATCH}")
    return sum(b.size for b in data) / elapsed


def replay(path: Path, n: int, pattern: str | None = None) -> float:
    """Events/s reading everything (or what *pattern* matches) back and splitting the payloads."""
    matcher = Matcher([pattern]) if pattern else None
    with SQLiteEngine(path) as store:
        start = time.perf_counter()
        got = sum(len(r.payloads()) for r in store.read(1, matcher=matcher))
        elapsed = time.perf_counter() - start
    if got != n:
        raise BenchError(f"replayed {got} events, not {n}")
    return n / elapsed


def run(quick: bool) -> list[Row]:
    n = EVENTS // 10 if quick else EVENTS
    data = batches(n)
    rows = []
    with scratch("eda-bench-store-") as tmp:
        rate = append(tmp / "a.db", data, 4)
        rows.append(row(
            "bus store: append, fsync=batch, commit per 2,000 events", rate,
            "bus target (end to end)", PUBLISH_TARGET, "events/s", higher_is_better=True,
            target=">= 2x", ok=rate >= 2 * PUBLISH_TARGET,
        ))  # fmt: skip
        rate1 = append(tmp / "b.db", data, 1)
        rows.append(row(
            "bus store: append, fsync=batch, commit per batch (500)", rate1,
            "bus target (end to end)", PUBLISH_TARGET, "events/s", higher_is_better=True,
        ))  # fmt: skip
        rate = replay(tmp / "a.db", n)
        rows.append(row(
            "bus store: replay all", rate, "bus target (end to end)", REPLAY_TARGET, "events/s",
            higher_is_better=True, target=">= 2x", ok=rate >= 2 * REPLAY_TARGET,
        ))  # fmt: skip
        half = sum(b.size for b in data if b.topic == "bench.orders")
        rate = replay(tmp / "a.db", half, "bench.orders")
        rows.append(row(
            "bus store: replay one of two topics (pattern)", rate, "bus target (end to end)",
            REPLAY_TARGET, "events/s", higher_is_better=True, target=">= 2x",
            ok=rate >= 2 * REPLAY_TARGET,
        ))  # fmt: skip
    return rows


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(f"{r['name']:<58} {r['eda']:>12,.0f} {r['unit']}  ({r['ratio']:.2f}x target)")

"""The embedded engine: one SQLite database in WAL mode.

One row per stored batch (a wire batch, or the part of one that was new):
``seq`` is the bus sequence of its first event and the table's rowid, so a
lookup by sequence is one b-tree descent and a replay is a range scan over
large blobs; an index on the stored time makes ``seq_at`` as cheap.  Rows are
never updated, only appended and deleted: by retention from the front, by a
purge all of one topic's (the meta ``kept_from`` says where retention cut).

Idempotence: for each stream (pubid, topic) the engine keeps the publisher
sequences it has stored as a list of half-open ranges ``[lo, hi)`` (normally
one), in memory and in the ``streams`` table, written in the same transaction
as the batches.  A resent batch is cut against them, so only its new part is
stored, whatever the order of arrival.  A stream split into more than
``max_ranges`` ranges refuses batches that would split it further (bounded
state, as Kafka refuses out-of-order sequences) until the gaps are filled.
Stream state is forgotten by age retention (a publisher silent for longer).

Durability: appends and consumer bookkeeping go into an open transaction;
``commit()`` ends it (group commit).  fsync ``batch`` and ``always`` run with
``synchronous=FULL`` (the WAL is fsynced at each commit), ``always`` commits
inside every ``append``; ``never`` runs ``synchronous=OFF`` (a killed process
loses nothing committed, a power cut may).  When SQLite reports a full disk
or an I/O error, the open transaction is rolled back, the in-memory state is
reloaded from the last commit and StoreFullError/StoreError is raised: the
store stays valid and usable once space is back.

Opening (ownership, the WAL check and repair, schema upgrades) is
:mod:`.sqlitefile`; what both engines do the same way is :mod:`.base`.

Statistics cost O(topics + consumers), whatever the store holds: each row
carries ``cum`` and ``cumb``, its topic's running count of events and of
bytes up to and including it, and an index on (topic, seq, count, cum, cumb)
gives, in one descent per topic, the events of a topic from any sequence on
(a consumer's lag), and its first and last stored batches, hence what it
holds.  Those counts are kept in memory from there (read again at opening,
after retention and after a rollback: O(topics) descents, never a scan of the
batches, and nothing more written per commit than the index entry).  Stores
of schema 1 are upgraded when opened (one pass, once).

Reading cost stays linear in what is read: a big batch read a slice at a time
(a group member claiming a 4 MB batch a thousand events at a time) is fetched
and split once, then kept, with the offsets of its events, in a small cache.
"""

from __future__ import annotations

import os
import sqlite3
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, Final

from ..codec import Batch
from ..errors import UsageError
from ..topics import Matcher
from . import retention
from .base import DEFAULT_MAX_RANGES, FORGET_AFTER, Span
from .engine import (
    FSYNC_MODES,
    ConsumerStats,
    Engine,
    Fsync,
    Purged,
    Receipt,
    Record,
    Stats,
    StoreError,
    StoreFullError,
    TopicStats,
)
from .sqliteconsumers import SQLiteConsumers
from .sqlitefile import SQLITE_FULL, lock, open_store
from .streams import DEFAULT_MAX_EVENT

_CHUNK: Final = 64  # rows fetched per query while reading
_CUT_MIN: Final = 256  # events: a batch this big read in slices is kept split (see _slice)
_CUTS: Final = 4  # batches kept split at a time (each one wire batch: 4 MiB by default)
_COLUMNS = "seq, count, stored, topic, kind, time, pubid, pubseq, source, ext, body"
_INSERT = f"INSERT INTO batches ({_COLUMNS}, cum, cumb) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
# the last stored batch of a topic before a sequence (covered by the index batches_topic)
_BEFORE = (
    "SELECT seq, count, cum FROM batches WHERE topic = ? AND seq < ? ORDER BY seq DESC LIMIT 1"
)
_SELECT = f"SELECT {_COLUMNS} FROM batches"
_HEADS = "SELECT seq, topic FROM batches WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?"


class SQLiteEngine(SQLiteConsumers):
    """The embedded store of eda-bus (see the module docstring).

    Not thread-safe: use it from one thread at a time (it may be created on another).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: Fsync = "batch",
        max_event_bytes: int = DEFAULT_MAX_EVENT,
        max_ranges: int = DEFAULT_MAX_RANGES,
        page_size: int = 65536,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise UsageError(f"invalid fsync mode {fsync!r}: use always, batch or never")
        super().__init__(max_event_bytes=max_event_bytes, max_ranges=max_ranges, clock=clock)
        self.path = Path(path)
        self.fsync = fsync
        self.repairs: list[str] = []  # what opening found and repaired, one line each
        self._lock_fd = lock(self.path)
        try:
            self._conn = open_store(self.path, fsync, page_size, self.repairs)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._seen: dict[tuple[str, str], float] = {}
        # topic -> [events, bytes] stored, [events, bytes] ever (cum, cumb of its last batch)
        self._topics: dict[str, list[int]] = {}
        self._cuts: OrderedDict[int, tuple[tuple[Any, ...], array[int]]] = OrderedDict()
        self._load()
        self._closed = False

    def _load(self) -> None:
        """The in-memory state from the last commit."""
        conn = self._conn
        floor = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        row = conn.execute("SELECT seq + count, stored FROM batches ORDER BY seq DESC LIMIT 1")
        top = row.fetchone()
        self._next: int = int(max(floor, top[0] if top else 1))
        self._durable: int = self._next - 1
        self._last_stored: float = float(top[1]) if top else 0.0
        self._ledger.clear()
        self._seen.clear()
        self._topics.clear()
        topic = conn.execute("SELECT min(topic) FROM batches").fetchone()[0]
        while topic is not None:  # one descent per topic, by the index batches_topic
            seq, count, cum, cumb = conn.execute(
                "SELECT seq, count, cum, cumb FROM batches WHERE topic = ? ORDER BY seq LIMIT 1",
                (topic,),
            ).fetchone()
            size = conn.execute("SELECT length(body) FROM batches WHERE seq = ?", (seq,))
            first_bytes = size.fetchone()[0]
            total, total_bytes = conn.execute(
                "SELECT cum, cumb FROM batches WHERE topic = ? ORDER BY seq DESC LIMIT 1",
                (topic,),
            ).fetchone()
            events, stored = total - cum + count, total_bytes - cumb + first_bytes
            self._topics[topic] = [events, stored, total, total_bytes]
            topic = conn.execute(
                "SELECT topic FROM batches WHERE topic > ? ORDER BY topic LIMIT 1", (topic,)
            ).fetchone()
            topic = topic and topic[0]
        for pubid, topic, lo, hi, seen in conn.execute(
            "SELECT pubid, topic, lo, hi, seen FROM streams ORDER BY pubid, topic, lo"
        ):
            self._ledger.add((pubid, topic), lo, hi)
            self._seen[(pubid, topic)] = seen

    # -- state ----------------------------------------------------------------
    @property
    def first_seq(self) -> int:
        row = self._conn.execute("SELECT min(seq) FROM batches").fetchone()
        return int(row[0]) if row[0] is not None else self._next

    @property
    def kept_from(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'kept_from'").fetchone()
        return int(row[0]) if row is not None else self.first_seq  # (no purge yet: no holes)

    def _begin(self) -> None:
        self._usable()
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")

    def _failed(self, exc: Exception) -> StoreError:
        """Roll back to the last commit and describe *exc* to the caller.

        Every write path ends here on any exception, not only SQLite's: the
        in-memory state never runs ahead of what the store holds."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._load()
        except sqlite3.Error:
            pass  # the next call fails the same way; the file is as the last commit left it
        after = f"nothing after sequence {self._durable} was stored"
        if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(exc):
            return StoreFullError(
                f"store {self.path}: the disk is full; {after}: free space or retain less"
            )
        return StoreError(f"store {self.path}: {exc}; {after}")

    # -- writing --------------------------------------------------------------
    def _usable(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    def append(self, batches: Sequence[Batch]) -> list[Receipt]:
        self._usable()
        for batch in batches:
            self._check(batch)
        try:  # whatever fails from here on (I/O, a bug) rolls back and reloads: no half-append
            now = max(self._clock(), self._last_stored)
            pieces, receipts = self._ledger.plan(batches, self._next)
            rows: list[tuple[Any, ...]] = []
            for p in pieces:
                b = p.batch
                counts = self._topics.setdefault(b.topic, [0, 0, 0, 0])
                counts[0] += p.size
                counts[1] += len(p.body)
                counts[2] += p.size
                counts[3] += len(p.body)
                rows.append((p.seq, p.size, now, b.topic, b.kind, b.time, b.pubid, p.pubseq,
                             b.source, p.ext.encode(), p.body, counts[2], counts[3]))  # fmt: skip
                self._seen[b.pubid, b.topic] = now
                self._next = p.seq + p.size
            self._last_stored = now
            self._begin()
            self._conn.executemany(_INSERT, rows)
        except Exception as exc:
            raise self._failed(exc) from None
        if self.fsync == "always":
            self.commit()
        return receipts

    def commit(self) -> int:
        self._usable()
        if not self._conn.in_transaction:
            return self._durable
        conn = self._conn
        try:
            for key, fresh in self._ledger.fresh.items():
                if not fresh:
                    continue
                conn.execute("DELETE FROM streams WHERE pubid = ? AND topic = ?", key)
                seen = self._seen[key]
                conn.executemany(
                    "INSERT INTO streams VALUES (?,?,?,?,?)",
                    [(*key, lo, hi, seen) for lo, hi in self._ledger.ranges[key]],
                )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (self._next,))
            conn.execute("COMMIT")
        except Exception as exc:
            raise self._failed(exc) from None
        self._ledger.fresh.clear()
        self._durable = self._next - 1
        return self._durable

    def _from(self, topic: str, seq: int) -> int:
        """Stored events of *topic* with bus sequences from *seq* on: one index descent."""
        counts = self._topics.get(topic)
        if counts is None:
            return 0
        row = self._conn.execute(_BEFORE, (topic, seq)).fetchone()
        if row is None:  # every stored event of the topic is at seq or later
            return counts[0]
        first, count, cum = row
        return int(counts[2] - (cum - max(0, first + count - seq)))

    def _lag(self, matcher: Matcher, seq: int) -> int:
        """Stored events from *seq* on whose topic *matcher* accepts, in O(topics)."""
        return sum(self._from(topic, seq) for topic in self._topics if matcher(topic))

    # -- reading --------------------------------------------------------------
    def _records(
        self, start: int, end: int, matcher: Matcher | None, left: int
    ) -> Iterator[Record]:
        head = self._conn.execute(
            "SELECT max(seq) FROM batches WHERE seq <= ?", (start,)
        ).fetchone()[0]
        for row in self._rows(start if head is None else head, end, matcher):
            yield Record(*row)

    def _rows(self, pos: int, end: int, matcher: Matcher | None) -> Iterator[tuple[Any, ...]]:
        """Rows of batches from *pos* to *end* whose topic matches, a chunk at a time.

        Topics are looked at first and only matching rows are fetched whole:
        SQLite never reads the blobs of the others, nor of batches kept split.
        """
        conn = self._conn
        while pos <= end:
            heads = conn.execute(_HEADS, (pos, end, _CHUNK * 16)).fetchall()
            if not heads:
                return
            pos = heads[-1][0] + 1
            wanted = [seq for seq, topic in heads if matcher is None or matcher(topic)]
            for i in range(0, len(wanted), _CHUNK):
                part = wanted[i : i + _CHUNK]
                kept = {seq: self._cuts[seq][0] for seq in part if seq in self._cuts}
                fetch = [seq for seq in part if seq not in kept]
                rows = []
                if fetch:
                    marks = ",".join("?" * len(fetch))
                    sql = f"{_SELECT} WHERE seq IN ({marks}) ORDER BY seq"
                    rows = conn.execute(sql, fetch).fetchall()  # no cursor open across yields
                if kept:
                    rows = sorted([*rows, *kept.values()], key=lambda r: int(r[0]))
                yield from rows

    def _slice(self, record: Record, lo: int, hi: int) -> Record:
        """*record*'s events [lo, hi], in time linear in the slice, not in the batch.

        A big batch is read a slice at a time (a group member claims a 4 MiB batch
        of tiny events 1,000 at a time): it is split once and kept, with where each
        event starts, for the next slices (never updated, a stored row can stay).
        """
        if record.size < _CUT_MIN:
            return record.slice(lo, hi)
        cut = self._cuts.get(record.seq)
        if cut is None:
            starts = array("q", accumulate((len(e) + 1 for e in record.payloads()), initial=0))
            cut = self._cuts[record.seq] = (tuple(record), starts)
            while len(self._cuts) > _CUTS:
                self._cuts.popitem(last=False)
        else:
            self._cuts.move_to_end(record.seq)
        starts = cut[1]
        i, j = lo - record.seq, hi - record.seq + 1
        body = record.body[starts[i] : starts[j] - 1]
        return record._replace(seq=lo, size=j - i, pubseq=record.pubseq + i, body=body)

    def seq_at(self, when: float) -> int:
        row = self._conn.execute(
            "SELECT seq FROM batches WHERE stored >= ? ORDER BY stored, seq LIMIT 1", (when,)
        ).fetchone()
        return int(row[0]) if row else self._next

    def _backwards(self, pos: int) -> Iterator[Span]:
        while True:
            rows = self._conn.execute(
                "SELECT seq, count, topic FROM batches WHERE seq <= ? ORDER BY seq DESC LIMIT 256",
                (pos,),
            ).fetchall()  # no cursor open across yields
            yield from rows
            if len(rows) < 256:
                return
            pos = rows[-1][0] - 1

    def _spans(self, first: int, last: int) -> Iterator[Span]:
        yield from self._conn.execute(
            "SELECT seq, count, topic FROM batches WHERE seq <= ? AND seq >= "
            "coalesce((SELECT max(seq) FROM batches WHERE seq <= ?), 0) ORDER BY seq",
            (last, first),
        ).fetchall()

    # -- housekeeping ---------------------------------------------------------
    def stats(self) -> Stats:
        self._usable()
        conn = self._conn
        topics = {t: TopicStats(c[0], c[1]) for t, c in sorted(self._topics.items()) if c[0] > 0}
        consumers = []
        for name, spec, nxt in conn.execute("SELECT name, patterns, next FROM consumers"):
            m = self._spec(spec)
            lag = self._lag(m, nxt)
            consumers.append(ConsumerStats(name, "durable", tuple(m.patterns), nxt, lag, 0))
        for name, spec, nxt in conn.execute("SELECT name, patterns, next FROM groups"):
            m = self._spec(spec)
            held = sum(
                self._count(first, end, m)
                for first, end in conn.execute(
                    "SELECT first, last FROM leases WHERE grp = ?", (name,)
                )
            )
            lag = self._lag(m, nxt) + held
            consumers.append(ConsumerStats(name, "group", tuple(m.patterns), nxt, lag, held))
        file_bytes = sum(
            p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists()
        )
        return self._stats(topics, consumers, file_bytes)

    def _sizes(self) -> Generator[tuple[int, int, float, int], None, None]:
        rows = self._conn.execute(
            "SELECT seq, count, stored, length(body) FROM batches ORDER BY seq"
        )
        try:
            yield from rows
        finally:
            rows.close()

    def _stored_bytes(self) -> int:
        return sum(c[1] for c in self._topics.values())

    def _remove(self, plan: retention.Cut | None, max_age: float | None, now: float) -> None:
        conn = self._conn
        try:
            self._begin()
            if plan is not None:
                keep = plan.keep_from
                self._cuts.clear()
                conn.execute("DELETE FROM batches WHERE seq < ?", (keep,))
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('kept_from', ?)",
                    (max(keep, self.kept_from),),
                )
                conn.execute("DELETE FROM leases WHERE last < ?", (keep,))
                conn.execute("UPDATE leases SET first = ? WHERE first < ?", (keep, keep))
                # a stream with no event left, silent for FORGET_AFTER: forgotten (a
                # stream's events were stored at or before its last 'seen')
                conn.execute(
                    "DELETE FROM streams WHERE seen < MIN(COALESCE((SELECT stored FROM batches"
                    " ORDER BY seq LIMIT 1), ?), ?)",
                    (now, now - FORGET_AFTER),
                )
            if max_age is not None:  # a publisher silent for longer is forgotten
                conn.execute("DELETE FROM streams WHERE seen < ?", (now - max_age,))
        except Exception as exc:
            raise self._failed(exc) from None
        self.commit()
        self._load()
        self._shrink()

    def _shrink(self) -> None:
        """Give the space of removed batches back to the file system."""
        try:
            self._conn.execute("PRAGMA incremental_vacuum")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception as exc:
            raise self._failed(exc) from None

    def purge(self, pattern: str) -> Purged:
        matcher = Matcher([pattern])
        self.commit()
        topics = tuple(sorted(t for t, c in self._topics.items() if c[0] and matcher(t)))
        if not topics:
            return Purged(0, 0, ())
        events = sum(self._topics[t][0] for t in topics)
        size = sum(self._topics[t][1] for t in topics)
        conn = self._conn
        try:
            self._begin()  # where retention cut, before the holes: what readers lost
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('kept_from', ?)", (self.kept_from,))
            conn.executemany("DELETE FROM batches WHERE topic = ?", [(t,) for t in topics])
            self._cuts.clear()
            leases = conn.execute(
                "SELECT grp, first, last, patterns FROM leases JOIN groups ON name = grp"
            ).fetchall()
            for group, first, last, spec in leases:  # a lease on purged events only: settled
                if not self._count(first, last, self._spec(spec)):
                    conn.execute("DELETE FROM leases WHERE grp = ? AND first = ?", (group, first))
        except Exception as exc:
            raise self._failed(exc) from None
        self.commit()  # (next_seq with it: sequences are never reused)
        self._load()
        self._shrink()
        return Purged(events, size, topics)

    def _release(self) -> None:
        self._conn.close()
        os.close(self._lock_fd)


def _implements(engine: SQLiteEngine) -> Engine:
    return engine  # mypy checks here that SQLiteEngine has every method of Engine

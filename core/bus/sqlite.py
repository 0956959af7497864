"""The embedded engine: one SQLite database in WAL mode.

One row per stored batch (a wire batch, or the part of one that was new):
``seq`` is the bus sequence of its first event and the table's rowid, so a
lookup by sequence is one b-tree descent and a replay is a range scan over
large blobs; an index on the stored time makes ``seq_at`` as cheap.  Rows are
never updated, only appended and, by retention, deleted from the front.

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

One process owns a store at a time (an flock on ``PATH.lock``).  On open, a
WAL left by a crash is checked (:mod:`.wal`) and a torn last write is
reported in :attr:`SQLiteEngine.repairs`; SQLite then drops it, and the store
is back to its last complete commit.  A WAL damaged in the middle (intact
frames after a bad one) is never truncated: opening raises StoreError before
SQLite sees it, and the files stay as they are.

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

import fcntl
import json
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
from ..errors import NotFoundError, UsageError
from ..topics import Matcher
from . import retention, wal
from .base import DEFAULT_MAX_RANGES, EngineBase, Span
from .engine import (
    FSYNC_MODES,
    ConsumerStats,
    Engine,
    Fsync,
    Receipt,
    Record,
    Stats,
    StoreError,
    StoreFullError,
    TopicStats,
)
from .streams import DEFAULT_MAX_EVENT, MAX_SEQ, check_name

SCHEMA_VERSION: Final = 2  # 2: batches.cum, the topics table and index
_SQLITE_FULL: Final = 13
_CHUNK: Final = 64  # rows fetched per query while reading
_CUT_MIN: Final = 256  # events: a batch this big read in slices is kept split (see _slice)
_CUTS: Final = 4  # batches kept split at a time (each one wire batch: 4 MiB by default)
_CHECKPOINT_BYTES: Final = 16 << 20  # WAL size that triggers an automatic checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, stored REAL NOT NULL,
    topic TEXT NOT NULL, kind INTEGER NOT NULL, time REAL NOT NULL,
    pubid TEXT NOT NULL, pubseq INTEGER NOT NULL, source TEXT NOT NULL,
    ext BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS batches_stored ON batches (stored);
CREATE TABLE IF NOT EXISTS streams (
    pubid TEXT NOT NULL, topic TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
    seen REAL NOT NULL, PRIMARY KEY (pubid, topic, lo)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY, patterns TEXT NOT NULL, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY, patterns TEXT NOT NULL, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    grp TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (grp, first)) WITHOUT ROWID;
"""
_COLUMNS = "seq, count, stored, topic, kind, time, pubid, pubseq, source, ext, body"
_INSERT = f"INSERT INTO batches ({_COLUMNS}, cum, cumb) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
_UPGRADE_2 = """
ALTER TABLE batches ADD COLUMN cum INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN cumb INTEGER NOT NULL DEFAULT 0;
UPDATE batches SET cum = w.cum, cumb = w.cumb FROM (
    SELECT seq, sum(count) OVER (PARTITION BY topic ORDER BY seq) AS cum,
        sum(length(body)) OVER (PARTITION BY topic ORDER BY seq) AS cumb FROM batches) AS w
    WHERE batches.seq = w.seq;
CREATE INDEX IF NOT EXISTS batches_topic ON batches (topic, seq, count, cum, cumb);
UPDATE meta SET value = 2 WHERE key = 'schema';
"""
# the last stored batch of a topic before a sequence (covered by the index batches_topic)
_BEFORE = (
    "SELECT seq, count, cum FROM batches WHERE topic = ? AND seq < ? ORDER BY seq DESC LIMIT 1"
)
_SELECT = f"SELECT {_COLUMNS} FROM batches"
_HEADS = "SELECT seq, topic FROM batches WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?"


class SQLiteEngine(EngineBase):
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
        self._lock_fd = self._lock()
        try:
            self._conn = self._open(page_size)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._seen: dict[tuple[str, str], float] = {}
        # topic -> [events, bytes] stored, [events, bytes] ever (cum, cumb of its last batch)
        self._topics: dict[str, list[int]] = {}
        self._cuts: OrderedDict[int, tuple[tuple[Any, ...], array[int]]] = OrderedDict()
        self._load()
        self._closed = False

    # -- opening --------------------------------------------------------------
    def _lock(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"store {self.path} is in use by another process") from None
        return fd

    def _open(self, page_size: int) -> sqlite3.Connection:
        scan = wal.scan(Path(f"{self.path}-wal"))
        if scan and scan.intact_after:  # before SQLite opens it: it would drop the intact frames
            raise StoreError(
                f"store {self.path} is damaged: its write-ahead log has a bad frame at byte "
                f"{scan.damaged_at} followed by {scan.intact_after} intact frames, so this is not "
                f"a torn last write; not opening it (SQLite would discard those frames): keep "
                f"{self.path}-wal, restore the store from a copy, or move the log aside to open "
                f"the store as of its last checkpoint, losing what the log holds"
            )
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        try:
            fresh = conn.execute("PRAGMA page_count").fetchone()[0] == 0
            if fresh:
                conn.execute(f"PRAGMA page_size = {int(page_size)}")
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            sync = "OFF" if self.fsync == "never" else "FULL"
            conn.execute(f"PRAGMA synchronous = {sync}")
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA wal_autocheckpoint = {max(64, _CHECKPOINT_BYTES // size)}")
            conn.execute("PRAGMA cache_size = -32768")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('next_seq', 1)",
                (SCHEMA_VERSION,),
            )
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"store {self.path} was written by a newer eda (schema {version})")
            if scan and (scan.torn_bytes or scan.uncommitted):
                self._repair(conn, scan)
            columns = [row[1] for row in conn.execute("PRAGMA table_info(batches)")]
            if "cum" not in columns:  # a new store, or one of schema 1: one pass, one transaction
                conn.execute("BEGIN")
                for statement in _UPGRADE_2.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("COMMIT")
        except BaseException as exc:
            conn.close()
            if not isinstance(exc, sqlite3.Error):
                raise
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
                raise StoreFullError(f"cannot open store {self.path}: the disk is full") from None
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        return conn

    def _repair(self, conn: sqlite3.Connection, scan: wal.WalScan) -> None:
        """SQLite has dropped the damaged tail; check the rest, make it final, and say so."""
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise StoreError(f"store {self.path} is damaged beyond its last write: {verdict}")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        last = conn.execute("SELECT max(seq + count - 1) FROM batches").fetchone()[0] or 0
        if scan.torn_bytes:
            self.repairs.append(
                f"store {self.path}: the last write was torn ({scan.torn_bytes} damaged bytes at "
                f"the end of the write-ahead log); it was discarded and the store is back to its "
                f"last complete commit, sequence {last}"
            )
        else:
            self.repairs.append(
                f"store {self.path}: discarded a transaction that was never committed "
                f"({scan.uncommitted} pages); the store ends at sequence {last}"
            )

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
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(exc):
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

    def _spec(self, patterns_json: str) -> Matcher:
        return self._matcher(json.loads(patterns_json))

    # -- durable consumers ----------------------------------------------------
    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self._begin()
            self._conn.execute(sql, args)
        except Exception as exc:
            raise self._failed(exc) from None
        if self.fsync == "always":
            self.commit()

    def consumer(self, name: str, patterns: Sequence[str], start: int) -> int:
        check_name(name, "consumer")
        spec = json.dumps(Matcher(patterns).patterns)
        row = self._conn.execute(
            "SELECT next, patterns FROM consumers WHERE name = ?", (name,)
        ).fetchone()
        if row:
            if row[1] != spec:  # resumed with other patterns: its lag is counted by the new ones
                self._write("UPDATE consumers SET patterns = ? WHERE name = ?", (spec, name))
            return int(row[0])
        start = max(1, min(start, self._next))
        self._write("INSERT INTO consumers VALUES (?, ?, ?)", (name, spec, start))
        return start

    def position(self, name: str) -> int:
        row = self._conn.execute("SELECT next FROM consumers WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        return int(row[0])

    def ack(self, name: str, seq: int) -> int:
        current = self.position(name)
        if seq > self.last_seq:
            raise UsageError(f"consumer {name!r} acknowledged {seq}, beyond the last event")
        if seq + 1 > current:
            self._write("UPDATE consumers SET next = ? WHERE name = ?", (seq + 1, name))
            current = seq + 1
        return current

    def patterns_of(self, name: str) -> tuple[str, ...] | None:
        sql = "SELECT patterns FROM consumers WHERE name = ?"
        row = self._conn.execute(sql, (name,)).fetchone()
        return None if row is None else tuple(self._spec(row[0]).patterns)

    def move(self, name: str, seq: int) -> int:
        self.position(name)  # NotFoundError if unknown
        seq = max(1, min(seq, self._next))
        self._write("UPDATE consumers SET next = ? WHERE name = ?", (seq, name))
        return seq

    def drop_consumer(self, name: str) -> None:
        n = self._conn.execute(
            "SELECT (SELECT count(*) FROM consumers WHERE name = ?)"
            " + (SELECT count(*) FROM groups WHERE name = ?)",
            (name, name),
        ).fetchone()[0]
        if not n:
            raise NotFoundError(f"no durable consumer or group {name!r}")
        self._write("DELETE FROM consumers WHERE name = ?", (name,))
        self._write("DELETE FROM groups WHERE name = ?", (name,))
        self._write("DELETE FROM leases WHERE grp = ?", (name,))

    # -- consumer groups ------------------------------------------------------
    def _group(self, group: str, patterns: Sequence[str], start: int | None) -> tuple[Matcher, int]:
        check_name(group, "group")
        spec = json.dumps(Matcher(patterns).patterns)
        row = self._conn.execute(
            "SELECT patterns, next FROM groups WHERE name = ?", (group,)
        ).fetchone()
        if row is None:
            nxt = self._durable + 1 if start is None else max(1, min(start, self._next))
            self._write("INSERT INTO groups VALUES (?, ?, ?)", (group, spec, nxt))
            return self._spec(spec), nxt
        if row[0] != spec:
            raise UsageError(f"group {group!r} has patterns {json.loads(row[0])}, not {patterns}")
        return self._spec(spec), int(row[1])

    def claim(
        self, group: str, member: str, patterns: Sequence[str], limit: int, start: int | None = None
    ) -> list[Record]:
        check_name(member, "member")
        matcher, nxt = self._group(group, patterns, start)
        out: list[Record] = []
        got = 0
        released = self._conn.execute(
            "SELECT first, last FROM leases WHERE grp = ? AND member = '' ORDER BY first", (group,)
        ).fetchall()
        for first, last in released:
            if got >= limit:
                return out
            records = list(self.read(first, last, matcher))
            self._write(
                "UPDATE leases SET member = ? WHERE grp = ? AND first = ?", (member, group, first)
            )
            out += records
            got += sum(r.size for r in records)
        if got >= limit or nxt > self._durable:
            return out
        records = list(self.read(nxt, None, matcher, limit - got))
        reached = self._durable
        if records and sum(r.size for r in records) >= limit - got:
            reached = records[-1].seq + records[-1].size - 1
        if records:
            self._write(
                "INSERT INTO leases VALUES (?, ?, ?, ?)",
                (group, records[0].seq, reached, member),
            )
        self._write("UPDATE groups SET next = ? WHERE name = ?", (reached + 1, group))
        return out + records

    def group_ack(self, group: str, member: str, seq: int) -> int:
        if not 0 <= seq <= MAX_SEQ:
            raise UsageError(f"group {group!r}: acknowledged sequence {seq} is out of range")
        matcher = self._group_matcher(group)
        leases = self._conn.execute(
            "SELECT first, last FROM leases WHERE grp = ? AND member = ? AND first <= ?",
            (group, member, seq),
        ).fetchall()
        settled = 0
        for first, last in leases:
            settled += self._count(first, min(last, seq), matcher)
            if last <= seq:
                self._write("DELETE FROM leases WHERE grp = ? AND first = ?", (group, first))
            else:
                self._write(
                    "UPDATE leases SET first = ? WHERE grp = ? AND first = ?",
                    (seq + 1, group, first),
                )
        return settled

    def release(self, group: str, member: str) -> int:
        matcher = self._group_matcher(group)
        leases = self._conn.execute(
            "SELECT first, last FROM leases WHERE grp = ? AND member = ?", (group, member)
        ).fetchall()
        if leases:
            self._write(
                "UPDATE leases SET member = '' WHERE grp = ? AND member = ?", (group, member)
            )
        return sum(self._count(first, last, matcher) for first, last in leases)

    def held(self, group: str) -> dict[str, list[tuple[int, int]]]:
        self._group_matcher(group)
        out: dict[str, list[tuple[int, int]]] = {}
        for first, last, member in self._conn.execute(
            "SELECT first, last, member FROM leases WHERE grp = ? ORDER BY first", (group,)
        ):
            out.setdefault(member, []).append((first, last))
        return out

    def _group_matcher(self, group: str) -> Matcher:
        row = self._conn.execute("SELECT patterns FROM groups WHERE name = ?", (group,)).fetchone()
        if row is None:
            raise NotFoundError(f"no consumer group {group!r}")
        return self._spec(row[0])

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
                conn.execute("DELETE FROM leases WHERE last < ?", (keep,))
                conn.execute("UPDATE leases SET first = ? WHERE first < ?", (keep, keep))
            if max_age is not None:  # a publisher silent for longer is forgotten
                conn.execute("DELETE FROM streams WHERE seen < ?", (now - max_age,))
        except Exception as exc:
            raise self._failed(exc) from None
        self.commit()
        self._load()
        try:
            conn.execute("PRAGMA incremental_vacuum")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._closed = True
            self._conn.close()
            os.close(self._lock_fd)


def _implements(engine: SQLiteEngine) -> Engine:
    return engine  # mypy checks here that SQLiteEngine has every method of Engine

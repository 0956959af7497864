"""What every bus engine does the same way: append planning, read slicing, counting, retention.

The embedded engine (:mod:`.sqlite`) and the NATS JetStream engine
(:mod:`.nats`) differ in where batches, positions and the index live; the
rules around them are written once here, so the two cannot drift:

* :class:`Ledger`: the publisher sequences stored per stream (pubid, topic),
  for exactly-once storage, **bounded**: a stream split into more than
  ``max_ranges`` ranges (a publisher that skips numbers) refuses batches that
  would split it further until the gaps are filled, as Kafka refuses
  out-of-order sequences; a stream none of whose events the store holds any
  more is forgotten :data:`FORGET_AFTER` seconds on (every publisher run
  takes a new id: kept for ever, they would grow without end); and the plan
  of an append (which parts of each batch are new, the bus sequences they
  take, the receipts).
* :class:`EngineBase`: the engine methods whose logic is the engine's
  contract rather than its storage (``read``'s bounds and slicing,
  ``seq_for_last``, counting events in a range, ``retain``'s plan, the
  ``Stats`` totals), over a few primitives each engine provides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Final, NamedTuple, Self

from ..codec import Batch
from ..errors import UsageError
from ..topics import Matcher
from . import retention
from .engine import ConsumerStats, Purged, Receipt, Record, Retained, Stats, TopicStats
from .streams import MAX_SEQ, Ranges, add, check_batch, overlaps, subtract

DEFAULT_MAX_RANGES: Final = 1024  # separate ranges of publisher sequences kept per stream
# s a stream is still known after retention removed its last event (a late resend of one
# of them is a duplicate until then); with --max-age, until its publisher was silent that long
FORGET_AFTER: Final = 600.0

Stream = tuple[str, str]  # (pubid, topic)
Span = tuple[int, int, str]  # (bus sequence of a batch's first event, its events, its topic)


class Piece(NamedTuple):
    """A new part of an appended batch, as one unit of storage (a row, a message)."""

    batch: Batch
    seq: int  # bus sequence of its first event
    pubseq: int  # publisher sequence of its first event
    size: int
    body: bytes  # its events joined by b"\n"
    ext: str  # the batch's extension attributes as a JSON object, or ""


def pieces(
    batch: Batch, spans: Sequence[tuple[int, int]], room: int | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """The publisher sequences [a, z) of *spans* of *batch* with their bodies, cut in
    pieces whose bodies hold at most *room* bytes (None: one piece per span)."""
    lo = batch.seq
    parts: list[bytes] | None = None
    for a, z in spans:
        if z - a == batch.size and (room is None or len(batch.body) <= room):
            yield a, z, batch.body
            continue
        parts = parts or ([batch.body] if batch.size == 1 else batch.body.split(b"\n"))
        if room is None:
            yield a, z, b"\n".join(parts[a - lo : z - lo])
            continue
        first, used = a, -1
        for i in range(a, z):
            size = len(parts[i - lo]) + 1
            if i > first and used + size > room:
                yield first, i, b"\n".join(parts[first - lo : i - lo])
                first, used = i, -1
            used += size
        yield first, z, b"\n".join(parts[first - lo : z - lo])


class Ledger:
    """The publisher sequences each stream has stored, as sorted half-open ranges.

    ``ranges`` holds what the store holds (normally one range per stream);
    ``fresh`` what was planned since the last commit (a resend of those must
    wait for the commit before it is confirmed).  At most ``max_ranges``
    ranges per stream: see :meth:`check`.
    """

    def __init__(self, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        self.max_ranges = max_ranges
        self.ranges: dict[Stream, Ranges] = {}
        self.fresh: dict[Stream, Ranges] = {}

    def clear(self) -> None:
        self.ranges.clear()
        self.fresh.clear()

    def forget(self, keys: Iterable[Stream]) -> None:
        """The streams *keys* have no event in the store any more: forgotten."""
        for key in keys:
            self.ranges.pop(key, None)
            self.fresh.pop(key, None)

    def add(self, key: Stream, lo: int, hi: int) -> None:
        """Publisher sequences [lo, hi) of *key* are in the store (read back, not planned)."""
        add(self.ranges.setdefault(key, []), lo, hi)

    def check(self, batch: Batch) -> None:
        """Refuse a batch that would split its stream into more than ``max_ranges`` ranges.

        This bounds the state kept per stream (a call's own batches may add a
        few more).  Like Kafka's out-of-order sequence error: the publisher
        sends the missing events first.
        """
        ranges = self.ranges.get((batch.pubid, batch.topic))
        if not ranges or len(ranges) < self.max_ranges or ranges[-1][1] == batch.seq:
            return
        trial = [r[:] for r in ranges]
        for a, z in subtract(ranges, batch.seq, batch.seq + batch.size)[0]:
            add(trial, a, z)
        if len(trial) > len(ranges):
            raise UsageError(
                f"publisher {batch.pubid} on {batch.topic} has {len(ranges) - 1} gaps in its "
                f"sequence: batch from {batch.seq} refused; send the missing events first"
            )

    def plan(
        self, batches: Sequence[Batch], next_seq: int, rooms: Sequence[int | None] | None = None
    ) -> tuple[list[Piece], list[Receipt]]:
        """Cut *batches* against what is stored: the new pieces, numbered from *next_seq*
        on (each cut to its batch's room, if given), and one receipt per batch.

        The pieces are recorded as stored (and fresh): an engine that fails to
        store them rebuilds its ledger from what the store holds.
        """
        out: list[Piece] = []
        receipts: list[Receipt] = []
        for i, b in enumerate(batches):
            key = (b.pubid, b.topic)
            ranges = self.ranges.setdefault(key, [])
            lo, hi = b.seq, b.seq + b.size
            if not ranges or ranges[-1][1] <= lo:  # the usual case: the stream goes on
                new, dup = [(lo, hi)], list[tuple[int, int]]()
            else:
                new, dup = subtract(ranges, lo, hi)
            confirm_at = next_seq - 1 if overlaps(self.fresh.get(key), dup) else 0
            stored = []
            ext = ("{" + b.extensions.json[1:] + "}") if new and b.extensions.json else ""
            for a, z, body in pieces(b, new, rooms[i] if rooms else None):
                out.append(Piece(b, next_seq, a, z - a, body, ext))
                stored.append((a, next_seq, z - a))
                next_seq += z - a
                add(ranges, a, z)
                add(self.fresh.setdefault(key, []), a, z)
            if stored:
                confirm_at = next_seq - 1
            receipts.append(Receipt(tuple(stored), tuple((a, z - a) for a, z in dup), confirm_at))
        return out, receipts


class EngineBase(ABC):
    """The shared half of an engine (see the module docstring).

    A subclass keeps ``_next`` (the next bus sequence) and ``_durable`` and
    provides the storage primitives below; it implements the rest of
    :class:`.engine.Engine` itself.
    """

    _next: int
    _durable: int
    _closed: bool
    shared = False  # other processes write to the store too: ``refresh`` finds their writes

    def __init__(
        self, *, max_event_bytes: int, max_ranges: int, clock: Callable[[], float]
    ) -> None:
        self.max_event_bytes = max_event_bytes
        self._clock = clock
        self._ledger = Ledger(max_ranges)
        self._topics_ok: set[str] = set()
        self._matchers: dict[tuple[str, ...], Matcher] = {}

    @property
    def round_full(self) -> bool:
        """Enough was appended for one commit round: the server leaves the rest for the
        next one, so confirmations keep coming (the NATS engine's cloudevents format)."""
        return False

    @property
    def max_ranges(self) -> int:
        return self._ledger.max_ranges

    # -- the primitives of a store ----------------------------------------------
    @abstractmethod
    def _usable(self) -> None:
        """Raise StoreError when the store is closed."""

    @property
    @abstractmethod
    def first_seq(self) -> int: ...

    @property
    def kept_from(self) -> int:
        """Where retention cut the log (an engine without purge holes: its first event)."""
        return self.first_seq

    @abstractmethod
    def commit(self) -> int: ...

    @abstractmethod
    def purge(self, pattern: str) -> Purged:
        """Remove every stored event of the topics *pattern* matches (see ``Engine.purge``)."""

    @abstractmethod
    def _records(
        self, start: int, end: int, matcher: Matcher | None, left: int
    ) -> Iterator[Record]:
        """Whole stored records, in order, that hold events in [start, end] and match
        (the caller slices them; it stops once it has *left* events)."""

    @abstractmethod
    def _spans(self, first: int, last: int) -> Iterator[Span]:
        """The stored batches holding events in [first, last], in order."""

    @abstractmethod
    def _backwards(self, pos: int) -> Iterator[Span]:
        """The stored batches starting at or before *pos*, newest first."""

    @abstractmethod
    def _sizes(self) -> Generator[tuple[int, int, float, int], None, None]:
        """Every stored batch as ``(seq, count, stored time, payload bytes)``, oldest first."""

    @abstractmethod
    def _stored_bytes(self) -> int:
        """Payload bytes of every stored event."""

    @abstractmethod
    def _remove(self, plan: retention.Cut | None, max_age: float | None, now: float) -> None:
        """Carry out a retention plan (None: nothing to remove, but age out what else ages)."""

    # -- the contract, once ------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self._next - 1

    @property
    def durable_seq(self) -> int:
        return self._durable

    def refresh(self) -> int:
        """Take in what other writers stored (a store this process alone writes: nothing)."""
        self._usable()
        return self._durable

    def _check(self, batch: Batch) -> None:
        """Refuse a batch before anything of its call is stored (see ``Engine.append``)."""
        check_batch(batch, self.max_event_bytes, self._topics_ok)
        self._ledger.check(batch)

    def _matcher(self, patterns: Sequence[str]) -> Matcher:
        key = tuple(patterns)
        m = self._matchers.get(key)
        if m is None:
            m = self._matchers[key] = Matcher(list(patterns))
        return m

    def read(
        self,
        start: int,
        end: int | None = None,
        matcher: Matcher | None = None,
        limit: int | None = None,
    ) -> Iterator[Record]:
        self._usable()
        end = self._durable if end is None else min(end, self._durable)
        left = limit if limit is not None else MAX_SEQ
        start = max(start, 1)
        if left <= 0 or start > end:
            return
        for record in self._records(start, end, matcher, left):
            top = record.seq + record.size - 1
            if top < start:
                continue
            lo = max(start, record.seq)
            hi = min(end, top, lo + left - 1)
            if lo != record.seq or hi != top:
                record = self._slice(record, lo, hi)
            left -= record.size
            yield record
            if left <= 0:
                return

    def _slice(self, record: Record, lo: int, hi: int) -> Record:
        return record.slice(lo, hi)

    def seq_for_last(self, n: int, matcher: Matcher | None = None) -> int:
        if n <= 0:
            return self._durable + 1
        for seq, count, topic in self._backwards(self._durable):
            if matcher is None or matcher(topic):
                if count >= n:
                    return seq + count - n
                n -= count
        return self.first_seq

    def _count(self, first: int, last: int, matcher: Matcher | None) -> int:
        """Stored events with bus sequences in [first, last] that *matcher* accepts."""
        if last < first:
            return 0
        total = 0
        for seq, count, topic in self._spans(first, last):
            if matcher is None or matcher(topic):
                total += max(0, min(seq + count - 1, last) - max(seq, first) + 1)
        return total

    def _stats(
        self, topics: dict[str, TopicStats], consumers: list[ConsumerStats], file_bytes: int
    ) -> Stats:
        return Stats(
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            durable_seq=self._durable,
            events=sum(t.events for t in topics.values()),
            bytes=sum(t.bytes for t in topics.values()),
            file_bytes=file_bytes,
            topics=topics,
            consumers=consumers,
        )

    def retain(
        self, max_age: float | None = None, max_bytes: int | None = None, now: float | None = None
    ) -> Retained:
        self.commit()
        now = self._clock() if now is None else now
        rows = self._sizes()
        try:
            plan = retention.cut(rows, self._stored_bytes(), max_age, max_bytes, now)
        finally:
            rows.close()
        self._remove(plan, max_age, now)
        if plan is None:
            return Retained(0, 0, self.first_seq)
        return Retained(plan.events, plan.bytes, self.first_seq)

    @abstractmethod
    def _release(self) -> None:
        """Let go of the store (connection, lock, threads); called once, by close."""

    def close(self) -> None:
        """Commit what is pending and release the store (also when the commit fails)."""
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._closed = True
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The storage engine interface of eda-bus, and the values it trades in.

An engine is a durable, ordered log of event batches plus the bookkeeping a
bus needs around it.  The embedded engine is :class:`eda.core.bus.sqlite.SQLiteEngine`;
the NATS JetStream engine (:mod:`.nats`) implements the same protocol, so the daemon
above never knows which one it drives.

Terms used throughout:

* **bus sequence**: one number per stored event, per bus, starting at 1 and
  only ever increasing (never reused, also after retention or a purge removed
  events).  Retention removes the oldest events (a reader behind it lost them);
  a purge removes one topic's events anywhere (holes nobody lost).
* **stream**: the events of one publisher on one topic, ``(pubid, topic)``,
  numbered by the publisher (the wire's sequence).  An event is identified
  by ``(pubid, topic, publisher sequence)``; ``append`` stores each at most
  once, like Kafka's idempotent producer.
* **durable**: covered by a ``commit()``.  Reads only return durable events and
  a daemon confirms an append only once ``commit()`` has returned a sequence at
  or beyond the receipt's ``confirm_at``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple, Protocol

from ..codec import Batch
from ..errors import EdaError, UsageError
from ..topics import Matcher

Fsync = Literal["always", "batch", "never"]
FSYNC_MODES: tuple[Fsync, ...] = ("always", "batch", "never")


class StoreError(EdaError):
    """The store cannot do what was asked (I/O error, damaged file); nothing half-done stays."""


class StoreFullError(StoreError):
    """The disk is full: the pending appends were rolled back and nothing was confirmed."""


class EventTooLargeError(UsageError, ValueError):
    """An event is larger than the store's configured maximum; its batch was refused."""


class Receipt(NamedTuple):
    """What ``append`` did with one batch.

    ``stored`` lists ``(publisher sequence, bus sequence, count)`` spans that
    were new; ``duplicates`` lists ``(publisher sequence, count)`` spans that
    were already stored.  ``confirm_at`` is the bus sequence that must be
    durable before the publisher may be told the whole batch is kept (0: it
    already is, e.g. a resend of something committed long ago).
    """

    stored: tuple[tuple[int, int, int], ...]
    duplicates: tuple[tuple[int, int], ...]
    confirm_at: int


class Record(NamedTuple):
    """Stored events of one batch (or the part of one that a read asked for)."""

    seq: int  # bus sequence of the first event
    size: int  # number of events
    stored: float  # unix time the bus stored it (non-decreasing with seq)
    topic: str
    kind: int  # codec.TEXT, JSON or ENVELOPE
    time: float  # the publisher's batch time
    pubid: str
    pubseq: int  # publisher sequence of the first event: event ids are f"{pubid}-{pubseq + i}"
    source: str
    extensions: bytes  # the wire's extension attributes frame (JSON object) or b""
    body: bytes  # one payload, or ``size`` payloads joined by b"\n" (as on the wire)

    def payloads(self) -> list[bytes]:
        return [self.body] if self.size == 1 else self.body.split(b"\n")

    def ids(self) -> list[str]:
        """The event ids of TEXT and JSON events (envelopes carry their own)."""
        return [f"{self.pubid}-{self.pubseq + i}" for i in range(self.size)]

    def slice(self, start: int, end: int) -> Record:
        """The events with bus sequences in [start, end] (clamped to this record)."""
        lo, hi = max(start, self.seq), min(end, self.seq + self.size - 1)
        if lo == self.seq and hi == self.seq + self.size - 1:
            return self
        parts = self.payloads()[lo - self.seq : hi - self.seq + 1]
        return self._replace(
            seq=lo, size=len(parts), pubseq=self.pubseq + lo - self.seq, body=b"\n".join(parts)
        )


class TopicStats(NamedTuple):
    events: int
    bytes: int  # payload bytes


class ConsumerStats(NamedTuple):
    name: str
    kind: Literal["durable", "group"]
    patterns: tuple[str, ...]
    next: int  # next bus sequence it has not acknowledged (durable) or not been handed (group)
    lag: int  # stored events matching its patterns from ``next`` on, plus events held unacked
    held: int  # group: events handed to members and not acknowledged yet (0 for durable)


class Stats(NamedTuple):
    first_seq: int  # oldest stored event (last_seq + 1 when empty)
    last_seq: int  # newest appended event (0 when nothing was ever stored)
    durable_seq: int  # newest committed event
    events: int
    bytes: int  # payload bytes of the stored events
    file_bytes: int  # size of the store on disk
    topics: dict[str, TopicStats]
    consumers: list[ConsumerStats]


class Retained(NamedTuple):
    """What a retention pass removed, and the oldest sequence left."""

    events: int
    bytes: int
    first_seq: int


class Purged(NamedTuple):
    """What a purge removed: every stored event of *topics*."""

    events: int
    bytes: int
    topics: tuple[str, ...]


class Engine(Protocol):
    """What eda-bus needs from a store.  All methods run on the caller's thread.

    The rules every engine follows the same way (append planning, read
    slicing, counting, retention) are written once in :mod:`.base`.
    """

    #: other processes write to the store too (a NATS stream behind several
    #: fronts): the daemon calls ``refresh`` often to take in their writes
    shared: bool

    @property
    def round_full(self) -> bool:
        """Enough was appended for one commit round: the daemon commits before taking more."""

    @property
    def last_seq(self) -> int:
        """The newest appended bus sequence (0 when nothing was ever stored)."""

    @property
    def durable_seq(self) -> int:
        """The newest bus sequence covered by a commit."""

    @property
    def first_seq(self) -> int:
        """The oldest stored bus sequence (``last_seq + 1`` when the store is empty)."""

    @property
    def kept_from(self) -> int:
        """Where retention cut the log: a reader positioned before it lost the events in
        between; sequences missing from it on were purged on purpose (not a loss)."""

    # -- writing --------------------------------------------------------------
    def append(self, batches: Sequence[Batch]) -> list[Receipt]:
        """Store *batches* (decoded wire batches) in order; one receipt each.

        Events already stored (same pubid, topic and publisher sequence) are
        skipped, also when only part of a batch was stored before.  Every batch
        is checked before anything is stored, so a refused call stores nothing
        (EventTooLargeError, UsageError).  StoreFullError/StoreError roll back
        everything not yet committed.
        """

    def commit(self) -> int:
        """Make every append so far durable (per the fsync mode); return ``durable_seq``."""

    def refresh(self) -> int:
        """Take in what other writers stored; return ``durable_seq`` (cheap when unshared)."""

    # -- reading (durable events only) ----------------------------------------
    def read(
        self,
        start: int,
        end: int | None = None,
        matcher: Matcher | None = None,
        limit: int | None = None,
    ) -> Iterator[Record]:
        """Records of events in [start, end] (default: durable_seq) in order, <= *limit* events."""

    def seq_at(self, when: float) -> int:
        """The first bus sequence stored at or after unix time *when* (last_seq + 1 if none)."""

    def seq_for_last(self, n: int, matcher: Matcher | None = None) -> int:
        """The bus sequence from which reading yields the last *n* (matching) durable events."""

    # -- durable consumers ----------------------------------------------------
    def consumer(self, name: str, patterns: Sequence[str], start: int) -> int:
        """Create durable consumer *name* positioned at *start*, or return where it resumes."""

    def ack(self, name: str, seq: int) -> int:
        """Consumer *name* has handled everything up to *seq*; return its next sequence."""

    def position(self, name: str) -> int:
        """The next sequence consumer *name* has not acknowledged (NotFoundError if unknown)."""

    def patterns_of(self, name: str) -> tuple[str, ...] | None:
        """The patterns of durable consumer *name* (None if there is none)."""

    def move(self, name: str, seq: int) -> int:
        """Set durable consumer *name*'s next sequence to *seq* (clamped); return it."""

    def drop_consumer(self, name: str) -> None:
        """Forget a durable consumer or a group (NotFoundError if unknown)."""

    # -- consumer groups ------------------------------------------------------
    def claim(
        self, group: str, member: str, patterns: Sequence[str], limit: int, start: int | None = None
    ) -> list[Record]:
        """Hand *member* up to about *limit* matching events no other live member holds.

        Events released by dead members come first, then new ones.  A group is
        created on first use with its cursor at *start* (default: after the
        newest durable event).
        """

    def group_ack(self, group: str, member: str, seq: int, first: int = 0) -> int:
        """*member* has handled what it holds from *first* to *seq* (0: all up to *seq*);
        return how many events that settled.  What it holds outside them stays held
        (it may have been handed released events after newer ones, not written yet)."""

    def release(self, group: str, member: str) -> int:
        """*member* is dead: what it held goes to the next claims; return how many events."""

    def held(self, group: str) -> dict[str, list[tuple[int, int]]]:
        """Unacknowledged ``(first, last)`` bus sequence ranges by member ("" = released)."""

    # -- housekeeping ---------------------------------------------------------
    def stats(self) -> Stats: ...

    def retain(
        self, max_age: float | None = None, max_bytes: int | None = None, now: float | None = None
    ) -> Retained:
        """Remove the oldest events: stored more than *max_age* s ago, or beyond *max_bytes*."""

    def purge(self, pattern: str) -> Purged:
        """Remove every stored event whose topic *pattern* matches, wherever it is in the log.

        Bus sequences are not reused, consumers keep their positions (and skip the
        holes), publisher sequences stay known (a resend is still a duplicate).
        """

    def close(self) -> None:
        """Commit what is pending and release the store."""

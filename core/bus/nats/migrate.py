"""``eda-bus migrate``: copy an embedded store into a NATS stream, each event once."""

from __future__ import annotations

from typing import NamedTuple

from ...codec import Batch, _extension_frame
from ..engine import Engine
from ..streams import MAX_SEQ, subtract
from .engine import NatsEngine


class Migrated(NamedTuple):
    """What :func:`migrate` did: events copied, and events of the source the target
    already held (of those it looked at: with a limit, it stops at the first new
    event beyond it)."""

    copied: int
    present: int


def migrate(
    source: Engine, dest: NatsEngine, *, limit: int | None = None, chunk: int = 256
) -> Migrated:
    """Copy the events of *source* (e.g. an embedded store) into *dest*.

    Event ids (pubid, topic, publisher sequence), order, stored times and,
    when *dest* starts empty, bus sequences are kept.  Each event is copied
    once whatever *dest* already holds (other events, part of this copy):
    what is there is known by identity, the publisher sequences *dest* holds
    for that pubid and topic, never by bus sequence.  So running it again
    after an interruption (or after *limit* events copied) copies only the
    rest, and into a stream other publishers use, events take the next bus
    sequences there (and stored times no earlier than the newest there).
    """
    if dest.last_seq == 0 and source.first_seq > 1:
        dest._run(dest._kv_put("floor", {"next": source.first_seq}))  # same sequences
        dest._next = source.first_seq
        dest._durable = dest._next - 1
    left = MAX_SEQ if limit is None else limit
    copied = present = pending = 0
    clock = dest._clock
    try:
        for record in source.read(source.first_seq):
            held = dest._ledger.ranges.get((record.pubid, record.topic))
            lo, hi = record.pubseq, record.pubseq + record.size
            new = subtract(held, lo, hi)[0] if held else [(lo, hi)]
            fresh = sum(z - a for a, z in new)
            present += record.size - fresh
            if not fresh:
                continue
            if left <= 0:
                break
            if fresh > left:  # only the first *left* new events now
                need, end = left, lo
                for a, z in new:
                    end, need = a + min(z - a, need), need - min(z - a, need)
                    if not need:
                        break
                record = record.slice(record.seq, record.seq + end - lo - 1)
            ext = _extension_frame(record.extensions) if record.extensions else None
            batch = Batch(record.topic, record.kind, record.size, record.pubseq, record.time,
                          record.pubid, record.source, record.body,
                          *((ext,) if ext else ()))  # fmt: skip
            dest._clock = lambda stored=record.stored: stored  # type: ignore[misc]
            n = sum(c for _, _, c in dest.append([batch])[0].stored)
            copied, left, pending = copied + n, left - n, pending + n
            if pending >= chunk:
                dest.commit()
                pending = 0
        dest.commit()
    finally:
        dest._clock = clock
    return Migrated(copied, present)

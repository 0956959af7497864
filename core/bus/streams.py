"""What every bus engine checks and counts the same way: batches, names, sequence ranges.

Shared by the embedded SQLite engine and the NATS JetStream engine, so both
refuse the same input with the same words and track publisher sequences
(for exactly-once storage) with the same range arithmetic.
"""

from __future__ import annotations

from typing import Final

from .. import codec
from ..codec import Batch
from ..errors import UsageError
from ..topics import validate_topic
from .engine import EventTooLargeError

DEFAULT_MAX_EVENT: Final = 1 << 20
MAX_NAME: Final = 255  # consumer, group and member names
MAX_SEQ: Final = (1 << 63) - 1
# a publisher id carries at least 128 random bits (32 hex digits, as eda's
# publishers draw it from ``secrets``): ids are chosen by publishers, and the
# bus keeps each (id, topic)'s sequences for exactly-once storage, so two ids
# that collide would have a new run's events dropped as duplicates
MIN_PUBID: Final = 32


def check_publisher(pubid: str) -> None:
    """Refuse (UsageError) a publisher id too short to be unique among every run.

    The server calls it on what publishers send, before any engine sees it;
    engines themselves also take (and migrate) events stored under older,
    shorter ids.
    """
    if len(pubid) < MIN_PUBID:
        raise UsageError(
            f"publisher id {pubid!r} is shorter than {MIN_PUBID} characters (128 random bits):"
            " its events could be taken for another publisher's and dropped as duplicates;"
            " upgrade the publisher (eda-pub draws 128-bit ids)"
        )


def check_batch(batch: Batch, max_event_bytes: int, topics_ok: set[str]) -> None:
    """Refuse (UsageError, EventTooLargeError) a batch no engine may store.

    *topics_ok* caches topics already validated (the caller keeps it).
    """
    if batch.topic not in topics_ok:
        validate_topic(batch.topic)
        topics_ok.add(batch.topic)
    if batch.kind not in (codec.TEXT, codec.JSON, codec.ENVELOPE):
        raise UsageError(f"bad batch: unknown kind {batch.kind}")
    if batch.size < 1 or not 0 <= batch.seq <= MAX_SEQ - batch.size:
        raise UsageError(f"bad batch: {batch.size} events from sequence {batch.seq}")
    if batch.size > 1 and batch.body.count(b"\n") != batch.size - 1:
        raise UsageError(f"bad batch: it announces {batch.size} events, its body differs")
    check_events(batch, max_event_bytes, f"the maximum of {max_event_bytes}")


def check_events(batch: Batch, limit: int, what: str) -> None:
    """Refuse (EventTooLargeError) a batch with an event over *limit* bytes (*what* says
    which limit, for the message); the batch's size alone decides when it is within."""
    if len(batch.body) <= limit:
        return
    parts = [batch.body] if batch.size == 1 else batch.body.split(b"\n")
    for i, part in enumerate(parts):
        if len(part) > limit:
            raise EventTooLargeError(
                f"event {batch.pubid}-{batch.seq + i} on {batch.topic} is {len(part)} bytes, "
                f"more than {what}: batch refused"
            )


Ranges = list[list[int]]  # sorted, disjoint, non-adjacent half-open [lo, hi)


def subtract(
    ranges: Ranges, lo: int, hi: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split [lo, hi) into the parts not in *ranges* (new) and those in it (duplicates)."""
    new: list[tuple[int, int]] = []
    dup: list[tuple[int, int]] = []
    pos = lo
    for a, b in ranges:
        if b <= pos:
            continue
        if a >= hi:
            break
        if a > pos:
            new.append((pos, a))
        dup.append((max(a, pos), min(b, hi)))
        pos = b
        if pos >= hi:
            break
    if pos < hi:
        new.append((pos, hi))
    return new, dup


def add(ranges: Ranges, lo: int, hi: int) -> None:
    """Add [lo, hi) (disjoint from *ranges*) to *ranges*, merging neighbours."""
    if not ranges or ranges[-1][1] <= lo:  # the usual case: the stream goes on
        if ranges and ranges[-1][1] == lo:
            ranges[-1][1] = hi
        else:
            ranges.append([lo, hi])
        return
    ranges.append([lo, hi])
    ranges.sort()
    merged: Ranges = [ranges[0]]
    for a, b in ranges[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ranges[:] = merged


def overlaps(ranges: Ranges | None, spans: list[tuple[int, int]]) -> bool:
    return bool(ranges) and any(a < hi and lo < b for lo, hi in spans for a, b in ranges or ())


def check_name(name: str, what: str) -> str:
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise UsageError(f"invalid {what} name {name!r}: 1 to {MAX_NAME} printable characters")
    return name

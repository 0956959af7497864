"""The wire protocol between eda-bus and its clients (one DEALER per client, one ROUTER).

Every message starts with a one-byte kind frame.  Client to bus:

    P  tag, topic, header, body[, extensions]   publish one wire batch (eda.core.codec);
                                                 *tag* is 8 bytes the bus echoes in its
                                                 confirmation
    R  JSON request (eda.core.reqrep rules: op, rid)

Bus to client:

    C  tags                 8-byte tags of batches now durable (one frame, concatenated)
    N  tag, JSON            a batch refused: ``{"error", "code", "retry"}``; with
                            ``retry`` true (disk full, store error) it was not stored and
                            may be sent again later, else it never will be
    A  JSON                 the reply to a request (``rid``, ``ok``...); a request the
                            store failed (e.g. a JetStream stream electing a leader) is
                            refused with ``retry`` true: the client asks again later
    D  busseq, topic, header, body[, extensions]
                            stored events for a subscription; the header's sequence is
                            the publisher's (event ids kept), *busseq* (8 bytes) the bus
                            sequence of the first event
    X  JSON                 the bus does not know this client's subscription (it was
                            restarted, or the client was cut off): subscribe again
    L  JSON                 ``{"lost": n}``: events removed by retention before delivery

Requests (op): ``sub`` (patterns, from, durable, group, member, credit, pending: a
group member's most events held unacknowledged, as JetStream's ``max_ack_pending``
(absent: its credit alone bounds it; a batch is never split on NATS, so a member
holding nothing may be given one whole batch over it), reset: move an existing
durable to *from*, admin), ``credit``
(n), ``ack`` (seq[, ranges]: a group member's ``[[first, last], ...]``, the bus
sequences it wrote out, at most MAX_ACK_RANGES; without them, everything up to
*seq*), ``hb``, ``bye``, ``stats``, ``retain`` (max_age, max_bytes), ``purge``
(pattern), ``drop`` (name: a durable consumer or group nobody is subscribed as).
"""

from __future__ import annotations

import struct
from typing import Final

BUS_TYPE: Final = "_eda-bus._tcp.local."
CACHE_KEY: Final = "bus-endpoints"
ENV_BUS: Final = "EDA_BUS"

PUBLISH: Final = b"P"
REQUEST: Final = b"R"
CONFIRM: Final = b"C"
REFUSED: Final = b"N"
ANSWER: Final = b"A"
DELIVER: Final = b"D"
UNKNOWN: Final = b"X"
LOST: Final = b"L"

TAG: Final = struct.Struct("!Q")
OPS: Final = frozenset(
    {"sub", "credit", "ack", "hb", "bye", "stats", "retain", "drop", "purge"}
)

MAX_CREDIT: Final = 1 << 20  # events a subscriber may have in flight
MAX_PATTERNS: Final = 64
MAX_ACK_RANGES: Final = 1024  # ranges of bus sequences in one acknowledgement
HEARTBEAT: Final = 1.0  # s between a subscriber's heartbeats
GONE_AFTER: Final = 5.0  # s without a word from a subscriber: it is gone (group: redelivered)


def pack_tags(tags: list[int]) -> bytes:
    return struct.pack(f"!{len(tags)}Q", *tags)


def unpack_tags(frame: bytes) -> tuple[int, ...]:
    if len(frame) % 8:
        raise ValueError("tags frame is not a multiple of 8 bytes")
    return struct.unpack(f"!{len(frame) // 8}Q", frame)

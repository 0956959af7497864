"""The wire codec: how events travel inside ZeroMQ messages.  This is the hot path.

One ZeroMQ message carries a *batch* of events of one topic from one publisher:

    frame 0  topic (UTF-8; SUB sockets filter on its prefix)
    frame 1  header: struct ``!BBIQd`` (version, kind, count, first sequence,
             unix time) followed by ``pubid \\0 source`` in UTF-8
    frame 2  body
    frame 3  optional: JSON object of extension attributes shared by the batch

Body by kind:

    TEXT / JSON   count == 1: the payload itself (any bytes);
                  count > 1: payloads joined by ``\\n`` (none contains one)
    ENVELOPE      CloudEvents JSON objects, compact, joined by ``\\n``

Batching is what makes a Python pipe fast: the publisher sends whatever it
has read in one message, so per-event cost on either side is a slice, not a
syscall.  Sequence numbers count events (not messages) per publisher and
topic, so a subscriber detects any gap exactly.

Control messages start with a NUL byte, which no topic can: ``\\0W<pubid>``
is the publisher's welcome (sent by XPUB to each new peer) and a
subscription to ``\\0S<subid>`` is a subscriber's beacon, which tells the
publisher that subscriber is connected.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from .errors import EdaError

VERSION: Final = 1
TEXT: Final = 0
JSON: Final = 1
ENVELOPE: Final = 2

WELCOME_PREFIX: Final = b"\x00W"
BEACON_PREFIX: Final = b"\x00S"

_HEADER = struct.Struct("!BBIQd")
_HEADER_SIZE = _HEADER.size


class WireError(EdaError, ValueError):
    """A message on the wire is not an eda batch."""


class Batch(NamedTuple):
    topic: str
    kind: int
    size: int  # number of events
    seq: int
    time: float
    pubid: str
    source: str
    body: bytes
    extensions: bytes  # JSON object text, b"" when there are none


def encode_header(kind: int, count: int, seq: int, time: float, origin: bytes) -> bytes:
    """Frame 1 of a batch; *origin* is ``pubid \\0 source`` pre-encoded once."""
    return _HEADER.pack(VERSION, kind, count, seq, time) + origin


def encode_origin(pubid: str, source: str) -> bytes:
    return pubid.encode() + b"\x00" + source.encode()


def decode(frames: list[bytes]) -> Batch:
    """Parse a batch; raise WireError on anything that is not one."""
    if len(frames) < 3:
        raise WireError(f"expected at least 3 frames, got {len(frames)}")
    header = frames[1]
    if len(header) < _HEADER_SIZE:
        raise WireError("short header")
    version, kind, count, seq, time = _HEADER.unpack_from(header)
    if version != VERSION:
        raise WireError(f"unsupported wire version {version}")
    if kind > ENVELOPE or count == 0:
        raise WireError(f"bad batch kind {kind} or count {count}")
    pubid, sep, source = header[_HEADER_SIZE:].partition(b"\x00")
    if not sep:
        raise WireError("header lacks publisher id")
    try:
        return Batch(
            frames[0].decode(),
            kind,
            count,
            seq,
            time,
            pubid.decode(),
            source.decode(),
            frames[2],
            frames[3] if len(frames) > 3 else b"",
        )
    except UnicodeDecodeError as exc:
        raise WireError(f"undecodable header: {exc}") from None


def split_body(batch: Batch) -> list[bytes]:
    """The individual payloads (or envelope lines) of a batch."""
    if batch.size == 1:
        return [batch.body]
    parts = batch.body.split(b"\n")
    if len(parts) != batch.size:
        raise WireError(f"batch announces {batch.size} events but holds {len(parts)}")
    return parts


def take(batches: list[Batch], n: int) -> tuple[list[Batch], int]:
    """The first *n* events of *batches*, and how many of *n* are still wanted."""
    out: list[Batch] = []
    for batch in batches:
        if n <= 0:
            break
        if batch.size <= n:
            out.append(batch)
            n -= batch.size
        else:
            parts = split_body(batch)[:n]
            out.append(batch._replace(size=n, body=b"\n".join(parts)))
            n = 0
    return out, n


# -- end of stream, acknowledgement, goodbye (protocol in eda.core.pubsub) ------
# Frame 0 of an end-of-stream message is BEACON_PREFIX + subid, so it reaches
# that one subscriber; frame 1 is END_MARK; frame 2 a JSON object
# {"p": pubid, "s": source, "t": {topic: [first sequence due, next sequence]}}.
END_MARK: Final = b"eda-end/1"
MAX_END_BYTES: Final = 1 << 22  # a larger end-of-stream message is malformed
# A subscriber "sends" by subscribing (XPUB_VERBOSE hands subscriptions up):
ACK_PREFIX: Final = b"\x00A"  # + b"<pubid> <subid> <lost>": end of stream confirmed
BYE_PREFIX: Final = b"\x00B"  # + b"<subid>": leaving on purpose (-C, SIGINT, SIGTERM)
# A batch of several events holds at most about this many bytes (the feed's
# read size); a subscriber's queue bound in bytes is derived from it.
MAX_BATCH_BYTES: Final = 1 << 17

"""The wire codec: how events travel inside ZeroMQ messages.  This is the hot path.

One ZeroMQ message carries a *batch* of events of one topic from one publisher:

    frame 0  topic (UTF-8; SUB sockets filter on its prefix)
    frame 1  header: struct ``!BBIQd`` (version, kind, count, first sequence,
             unix time) followed by ``pubid \\0 source`` in UTF-8
    frame 2  body
    frame 3  optional: JSON object of extension attributes shared by the batch
             (CloudEvents names and scalar values; never a core attribute)

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

import re
import struct
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from . import attributes
from .errors import EdaError, UsageError
from .topics import validate_topic

VERSION: Final = 1
TEXT: Final = 0
JSON: Final = 1
ENVELOPE: Final = 2

WELCOME_PREFIX: Final = b"\x00W"
BEACON_PREFIX: Final = b"\x00S"

_HEADER = struct.Struct("!BBIQd")
_HEADER_SIZE = _HEADER.size

# limits of what decode() accepts (stated in the README's security model)
MAX_TIME: Final = 253_402_300_800.0  # 10000-01-01T00:00:00Z, exclusive
MAX_PUBID: Final = 64
MAX_EXTENSIONS: Final = 65_536  # bytes of the extension attributes frame
_PUBID = re.compile(r"[A-Za-z0-9._:~-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CACHE_SIZE = 4096  # distinct topics, origins and extension frames remembered


class WireError(EdaError, ValueError):
    """A message on the wire is not an eda batch."""


class Extensions(NamedTuple):
    """The extension attributes of a batch: checked values and their JSON members."""

    values: Mapping[str, Any]  # shared by every batch with the same frame: do not change
    json: str  # ',"name":value' for each attribute, "" when there are none


NO_EXTENSIONS: Final = Extensions({}, "")


class Batch(NamedTuple):
    topic: str
    kind: int
    size: int  # number of events
    seq: int
    time: float
    pubid: str
    source: str
    body: bytes
    extensions: Extensions = NO_EXTENSIONS


def encode_header(kind: int, count: int, seq: int, time: float, origin: bytes) -> bytes:
    """Frame 1 of a batch; *origin* is ``pubid \\0 source`` pre-encoded once."""
    return _HEADER.pack(VERSION, kind, count, seq, time) + origin


def encode_origin(pubid: str, source: str) -> bytes:
    return pubid.encode() + b"\x00" + source.encode()


# what decode() has already checked, by the bytes it came from: a publisher
# sends the same topic, origin and extensions frame again and again
_topics: dict[bytes, str] = {}
_origins: dict[bytes, tuple[str, str]] = {}
_extensions: dict[bytes, Extensions] = {}


def _remember(cache: dict[bytes, Any], key: bytes, value: Any) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value


def _topic(raw: bytes) -> str:
    try:
        topic = validate_topic(raw.decode())
    except (UnicodeDecodeError, UsageError):
        raise WireError("topic is not valid UTF-8 or not a valid topic") from None
    _remember(_topics, raw, topic)
    return topic


def _origin(raw: bytes) -> tuple[str, str]:
    pubid_raw, sep, source_raw = raw.partition(b"\x00")
    try:
        pubid, source = pubid_raw.decode("ascii"), source_raw.decode()
    except UnicodeDecodeError:
        raise WireError("publisher id or source is not valid UTF-8") from None
    if not sep or not _PUBID.fullmatch(pubid):
        raise WireError(f"publisher id is not 1 to {MAX_PUBID} letters, digits or ._:~-")
    if not source or len(source) > attributes.MAX_ATTRIBUTE or _CONTROL.search(source):
        raise WireError("source is empty, too long or holds control characters")
    _remember(_origins, raw, (pubid, source))
    return pubid, source


def _extension_frame(raw: bytes) -> Extensions:
    if len(raw) > MAX_EXTENSIONS:
        raise WireError(f"extension attributes frame is larger than {MAX_EXTENSIONS} bytes")
    try:
        values = attributes.extensions(raw)
    except ValueError as exc:
        raise WireError(f"bad extension attributes: {exc}") from None
    members = attributes.dumps(values)[1:-1]
    ext = Extensions(values, "," + members if members else "")
    _remember(_extensions, raw, ext)
    return ext


def decode(frames: list[bytes]) -> Batch:
    """Parse and check a batch; raise WireError on anything that is not a valid one.

    Everything is checked here, once: header values in range, the event count
    against the body, topic, publisher id, source, extension attributes, and
    (for JSON and envelope batches) every payload.  A batch that passes can
    be rendered without further checks and never changes sequence state
    unless it is valid.
    """
    if not 3 <= len(frames) <= 4:
        raise WireError(f"expected 3 or 4 frames, got {len(frames)}")
    header = frames[1]
    if len(header) < _HEADER_SIZE:
        raise WireError("short header")
    version, kind, count, seq, time = _HEADER.unpack_from(header)
    if version != VERSION:
        raise WireError(f"unsupported wire version {version}")
    if kind > ENVELOPE or count == 0:
        raise WireError(f"bad batch kind {kind} or count {count}")
    if not 0.0 <= time < MAX_TIME:  # also false for NaN
        raise WireError(f"batch time {time!r} out of range")
    body = frames[2]
    if count > 1 and body.count(b"\n") != count - 1:
        raise WireError(f"batch announces {count} events but its body holds another number")
    topic = _topics.get(frames[0]) or _topic(frames[0])
    origin = header[_HEADER_SIZE:]
    pubid, source = _origins.get(origin) or _origin(origin)
    ext = NO_EXTENSIONS
    if len(frames) == 4 and frames[3]:
        ext = _extensions.get(frames[3]) or _extension_frame(frames[3])
    batch = Batch(topic, kind, count, seq, time, pubid, source, body, ext)
    if kind == JSON:
        json_values(batch)
    elif kind == ENVELOPE:
        envelopes(batch)
    return batch


def split_body(batch: Batch) -> list[bytes]:
    """The individual payloads (or envelope lines) of a batch."""
    if batch.size == 1:
        return [batch.body]
    parts = batch.body.split(b"\n")
    if len(parts) != batch.size:
        raise WireError(f"batch announces {batch.size} events but holds {len(parts)}")
    return parts


# decode() parses JSON and envelope payloads to check them; rendering and the
# duplicate filter need the same values right after.  Keep the last batches'
# parsed values (keyed by their body object, which is kept alive here, so an id
# is never reused while cached) instead of parsing every payload two or three times.
_PARSED_MAX: Final = 256  # batches: as many as one Subscriber.receive() returns
_parsed: dict[int, tuple[bytes, str, int, int, list[Any]]] = {}


def _cached(batch: Batch, parse: Callable[[Batch], list[Any]]) -> list[Any]:
    """*parse(batch)*, computed once per batch body; callers must not mutate the result."""
    hit = _parsed.get(id(batch.body))
    if hit is not None:
        body, topic, kind, size, values = hit
        if body is batch.body and (topic, kind, size) == (batch.topic, batch.kind, batch.size):
            return values
    values = parse(batch)
    if len(_parsed) >= _PARSED_MAX:
        del _parsed[next(iter(_parsed))]
    _parsed[id(batch.body)] = (batch.body, batch.topic, batch.kind, batch.size, values)
    return values


def json_values(batch: Batch) -> list[Any]:
    """The payloads of a JSON batch, parsed strictly (see :mod:`attributes`)."""
    return _cached(batch, _parse_json_values)


def envelopes(batch: Batch) -> list[dict[str, Any]]:
    """The events of an ENVELOPE batch, parsed and checked; each one's type is the topic."""
    return _cached(batch, _parse_envelopes)


def _parse_json_values(batch: Batch) -> list[Any]:
    try:
        return [attributes.loads(part) for part in split_body(batch)]
    except ValueError as exc:
        raise WireError(f"bad JSON payload: {exc}") from None


def _parse_envelopes(batch: Batch) -> list[Any]:
    if batch.size == 1 and b"\n" in batch.body:
        raise WireError("an envelope spans lines")
    events = []
    for line in split_body(batch):
        try:
            event = attributes.check_event(attributes.loads(line))
        except ValueError as exc:
            raise WireError(f"bad envelope: {exc}") from None
        if event["type"] != batch.topic:
            raise WireError("an envelope's type is not the topic it was sent on")
        events.append(event)
    return events


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

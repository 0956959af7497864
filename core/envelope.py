"""CloudEvents 1.0 structured-mode JSON: what eda-sub prints and eda-pub --envelope reads.

Every batch reaching this module passed :func:`eda.core.codec.decode`, so its
header values, extension attributes and payloads are known to be valid; the
renderers here only assemble them.  Values from the wire always go through a
JSON encoder (``json.dumps``), once per batch for what the batch shares;
per event, only the sequence number and the payload are added.

Payloads that are not UTF-8 text are rendered as CloudEvents ``data_base64``
(with ``datacontenttype`` ``application/octet-stream``), so binary data
round-trips byte for byte through ``eda-sub | eda-pub --envelope``.
"""

from __future__ import annotations

import base64
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from . import attributes, codec
from .attributes import BUS_SEQUENCE, CORE_ATTRIBUTES, SEQUENCE
from .errors import InputError, UsageError
from .topics import validate_topic

__all__ = ["CORE_ATTRIBUTES", "SEQUENCE"]

CONTENT_TYPES: Final = {codec.TEXT: "text/plain", codec.JSON: "application/json"}
BINARY_TYPE: Final = "application/octet-stream"

_dumps = attributes.dumps


def rfc3339(ts: float) -> str:
    """UTC timestamp with microseconds, e.g. 2026-11-27T15:52:52.123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x09\x0b-\x1f]')


def batch_to_json_lines(batch: codec.Batch) -> str:
    """Render the events of a batch as CloudEvents JSON lines, each ending in a newline.

    Per-event work is one string format: everything shared by the batch is
    encoded once (with ``json.dumps``), and text payloads are escaped per
    event only when the batch holds a character JSON must escape.
    """
    seq = batch.seq
    if batch.kind == codec.ENVELOPE:
        events = codec.envelopes(batch)
        return "".join([_dumps({**ev, SEQUENCE: seq + i}) + "\n" for i, ev in enumerate(events)])
    head = '{"specversion":"1.0","id":' + _dumps(batch.pubid + "-")[:-1]
    shared = (
        '","source":'
        + _dumps(batch.source)
        + ',"type":'
        + _dumps(batch.topic)
        + ',"time":"'
        + rfc3339(batch.time)
        + '","datacontenttype":'
    )
    after = batch.extensions.json + ',"' + SEQUENCE + '":'
    middle = shared + '"' + CONTENT_TYPES[batch.kind] + '"' + after
    if batch.kind == codec.JSON:
        text = batch.body.decode()  # checked by decode()
        if "\n" in text or "\r" in text:
            parts = [_dumps(v) for v in codec.json_values(batch)]
        else:
            parts = text.split("\n") if batch.size > 1 else [text]
        return "".join(
            [f'{head}{seq + i}{middle}{seq + i},"data":{p}}}\n' for i, p in enumerate(parts)]
        )
    try:
        text = batch.body.decode()
    except UnicodeDecodeError:
        binary = shared + '"' + BINARY_TYPE + '"' + after
        return _mixed_lines(batch, head, middle, binary)
    if batch.size == 1:
        parts = [text]
        escape = "\n" in text or _NEEDS_ESCAPE.search(text) is not None
    else:
        parts = text.split("\n")
        escape = _NEEDS_ESCAPE.search(text) is not None
    if not escape:
        return "".join(
            [f'{head}{seq + i}{middle}{seq + i},"data":"{p}"}}\n' for i, p in enumerate(parts)]
        )
    return "".join(
        [f'{head}{seq + i}{middle}{seq + i},"data":{_dumps(p)}}}\n' for i, p in enumerate(parts)]
    )


def _mixed_lines(batch: codec.Batch, head: str, middle: str, binary: str) -> str:
    """Text payloads as ``data``, the others as ``data_base64`` (the slow path)."""
    out = []
    for i, part in enumerate(codec.split_body(batch)):
        seq = batch.seq + i
        try:
            out.append(f'{head}{seq}{middle}{seq},"data":{_dumps(part.decode())}}}\n')
        except UnicodeDecodeError:
            encoded = base64.b64encode(part).decode("ascii")
            out.append(f'{head}{seq}{binary}{seq},"data_base64":"{encoded}"}}\n')
    return "".join(out)


def _attributes(batch: codec.Batch, seq: int, time: str, content_type: str) -> dict[str, Any]:
    """The attributes of event *seq* of a TEXT or JSON batch (everything but its data)."""
    return {
        "specversion": attributes.SPECVERSION,
        "id": f"{batch.pubid}-{seq}",
        "source": batch.source,
        "type": batch.topic,
        "time": time,
        "datacontenttype": content_type,
        **batch.extensions.values,
        SEQUENCE: seq,
    }


def bus_json_lines(
    busseq: int, batch: codec.Batch, stamp: Mapping[str, str] | None = None
) -> list[str]:
    """The events of *batch*, stored from bus sequence *busseq*, as eda-sub --bus prints
    them (and the bus's HTTP stream sends them): CloudEvents JSON lines, each ending in a
    newline, with its ``edabusseq`` and the constant attributes of *stamp*."""
    stamp = stamp or {}
    if batch.kind == codec.ENVELOPE:  # may carry an edabusseq of another bus: replaced
        return [
            attributes.safe_dumps({**ev, BUS_SEQUENCE: busseq + i, **stamp}) + "\n"
            for i, ev in enumerate(batch_to_events(batch))
        ]
    tail = "".join(f',"{k}":"{v}"' for k, v in stamp.items()) + "}\n"
    lines = batch_to_json_lines(batch).split("\n")[:-1]
    return [f'{ln[:-1]},"{BUS_SEQUENCE}":{busseq + i}{tail}' for i, ln in enumerate(lines)]


def batch_to_events(batch: codec.Batch) -> list[dict[str, Any]]:
    """The events of a batch as dictionaries (for templates, terminal views and --exec)."""
    if batch.kind == codec.ENVELOPE:
        return [{**ev, SEQUENCE: batch.seq + i} for i, ev in enumerate(codec.envelopes(batch))]
    time = rfc3339(batch.time)
    content_type = CONTENT_TYPES[batch.kind]
    values: list[Any] = (
        codec.json_values(batch) if batch.kind == codec.JSON else codec.split_body(batch)
    )
    events = []
    for i, value in enumerate(values):
        event = _attributes(batch, batch.seq + i, time, content_type)
        if isinstance(value, bytes):
            try:
                event["data"] = value.decode()
            except UnicodeDecodeError:
                event["datacontenttype"] = BINARY_TYPE
                event["data_base64"] = base64.b64encode(value).decode("ascii")
        else:
            event["data"] = value
        events.append(event)
    return events


def binary_events(batch: codec.Batch) -> list[tuple[dict[str, Any], bytes]]:
    """The events of a TEXT or JSON batch for a binding's binary content mode: each
    one's attributes as :func:`batch_to_events` renders them (without ``data``) and
    its data, the payload's bytes as published (``application/octet-stream`` for a
    TEXT payload that is not UTF-8)."""
    time = rfc3339(batch.time)
    content_type = CONTENT_TYPES[batch.kind]
    parts = codec.split_body(batch)
    try:
        batch.body.decode()
        binary: list[bool] | None = None
    except UnicodeDecodeError:
        binary = [not _utf8(part) for part in parts]
    return [
        (
            _attributes(batch, batch.seq + i, time, BINARY_TYPE if binary and binary[i] else
                        content_type),
            part,
        )
        for i, part in enumerate(parts)
    ]  # fmt: skip


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def data_text(event: dict[str, Any]) -> str:
    """The payload as a line of text: strings as they are, binary data as its base64
    text, anything else as JSON."""
    if "data_base64" in event:
        return str(event["data_base64"])
    data = event.get("data")
    if isinstance(data, str):
        return data
    return attributes.safe_dumps(data)


def payload(event: dict[str, Any]) -> bytes:
    """The payload as bytes (``--raw``): binary data decoded, text as UTF-8, else JSON."""
    if "data_base64" in event:
        return base64.b64decode(event["data_base64"])
    return data_text(event).encode()


def batch_payloads(batch: codec.Batch) -> bytes:
    """The payloads of a batch, one per line (``--raw``)."""
    if batch.kind != codec.ENVELOPE:
        return batch.body + b"\n"
    return b"".join(payload(ev) + b"\n" for ev in codec.envelopes(batch))


def parse_envelope(
    line: bytes, lineno: int, topic: str | None, source: str, new_id: Callable[[], str]
) -> tuple[str, bytes]:
    """Check one input envelope line; return (topic, compact JSON line).

    The event's own id, source, time, data (or data_base64) and extension
    attributes are kept; *topic*, when given, replaces its type; a missing
    id or source is filled in from *new_id* and *source*.  What eda added
    (:data:`~eda.core.attributes.EDA_ATTRIBUTES`: ``edaseq``, ``edabusseq``,
    or an integer ``sequence`` as eda before 0.2 printed its sequence)
    belongs to the hop and is dropped: the publisher stamps its own.  A
    string ``sequence`` is the CloudEvents sequence extension and is kept.
    """
    try:
        event = attributes.loads(line)
    except ValueError as exc:
        raise InputError(f"invalid JSON envelope: {exc}", lineno) from None
    if not isinstance(event, dict):
        raise InputError("an envelope must be a JSON object", lineno)
    if topic is not None:
        event["type"] = topic
    event_type = event.get("type")
    if not isinstance(event_type, str):
        raise InputError("envelope has no 'type' (the topic); give TOPIC to set one", lineno)
    try:
        validate_topic(event_type)
    except UsageError as exc:
        raise InputError(str(exc), lineno) from None
    for name in attributes.EDA_ATTRIBUTES:
        event.pop(name, None)
    if isinstance(event.get("sequence"), int):
        del event["sequence"]
    event.setdefault("specversion", attributes.SPECVERSION)
    if "id" not in event:
        event["id"] = new_id()
    event.setdefault("source", source)
    try:
        attributes.check_event(event)
    except ValueError as exc:
        raise InputError(f"invalid envelope: {exc}", lineno) from None
    return event_type, _dumps(event).encode()


DEDUP_WINDOW: Final = 100_000  # events remembered per publisher and topic (as ranges)
ID_WINDOW: Final = 16_384  # ids of republished (envelope) events remembered, a few MB at most
_MAX_SCOPES: Final = 10_000  # (source, type, publisher) ranges remembered
_EDA_ID = re.compile(r"(.+)-(\d+)")


class RecentEvents:
    """The events a subscriber delivered lately, to drop copies that come back.

    CloudEvents identifies an event by ``source`` and ``id``; eda adds
    ``type`` (a republished event under a new topic is a new event).  An
    event whose (source, id, type) was delivered within the window is a copy
    -- such as ``eda-sub 'orders.>' | eda-pub --envelope`` sending every
    event back to the subscriber that printed it -- and is dropped, so a loop
    dies after one hop.  Like NATS JetStream's duplicate window, the memory
    is bounded: the last :data:`DEDUP_WINDOW` events of each publisher and
    topic (kept as ranges, no per-event cost), and the last :data:`ID_WINDOW`
    ids of republished events.
    """

    def __init__(self, window: int = DEDUP_WINDOW, ids: int = ID_WINDOW) -> None:
        self.window = window
        self.id_window = ids
        self.dropped = 0
        # (source, type, pubid) -> [first, next] sequence numbers delivered
        self._ranges: dict[tuple[str, str, str], list[int]] = {}
        self._ids: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # (source, id, type)
        self._id_scopes: dict[tuple[str, str], int] = {}  # (source, type) -> ids held

    def fresh(self, batch: codec.Batch) -> list[codec.Batch]:
        """*batch* without the events delivered before (as one batch per run of new ones)."""
        if batch.kind == codec.ENVELOPE:
            return self._fresh_envelopes(batch)
        if (batch.source, batch.topic) in self._id_scopes:
            keep = [
                (batch.source, f"{batch.pubid}-{batch.seq + i}", batch.topic) not in self._ids
                for i in range(batch.size)
            ]
            if not all(keep):
                return self._runs(batch, keep)
        self._record_range(batch.source, batch.topic, batch.pubid, batch.seq, batch.size)
        return [batch]

    def _record_range(self, source: str, topic: str, pubid: str, seq: int, size: int) -> None:
        key = (source, topic, pubid)
        span = self._ranges.get(key)
        end = seq + size
        if span is None or not span[0] <= seq <= span[1]:
            if span is None and len(self._ranges) >= _MAX_SCOPES:
                del self._ranges[next(iter(self._ranges))]
            self._ranges[key] = [seq, end]
        elif end > span[1]:
            span[1] = end
            span[0] = max(span[0], end - self.window)

    def _seen(self, key: tuple[str, str, str]) -> bool:
        if key in self._ids:
            return True
        source, event_id, topic = key
        match = _EDA_ID.fullmatch(event_id)
        if match is None:
            return False
        span = self._ranges.get((source, topic, match[1]))
        return span is not None and span[0] <= int(match[2]) < span[1]

    def _remember(self, key: tuple[str, str, str]) -> None:
        self._ids[key] = None
        scope = (key[0], key[2])
        self._id_scopes[scope] = self._id_scopes.get(scope, 0) + 1
        if len(self._ids) > self.id_window:
            old, _ = self._ids.popitem(last=False)
            old_scope = (old[0], old[2])
            left = self._id_scopes[old_scope] - 1
            if left:
                self._id_scopes[old_scope] = left
            else:
                del self._id_scopes[old_scope]

    def _fresh_envelopes(self, batch: codec.Batch) -> list[codec.Batch]:
        keep = []
        for event in codec.envelopes(batch):
            key = (event["source"], event["id"], event["type"])
            new = not self._seen(key)
            if new:
                self._remember(key)
            keep.append(new)
        return self._runs(batch, keep) if not all(keep) else [batch]

    def _runs(self, batch: codec.Batch, keep: list[bool]) -> list[codec.Batch]:
        self.dropped += keep.count(False)
        parts = codec.split_body(batch)
        out = []
        i = 0
        while i < len(parts):
            if not keep[i]:
                i += 1
                continue
            j = i
            while j < len(parts) and keep[j]:
                j += 1
            run = batch._replace(seq=batch.seq + i, size=j - i, body=b"\n".join(parts[i:j]))
            if run.kind != codec.ENVELOPE:
                self._record_range(run.source, run.topic, run.pubid, run.seq, run.size)
            out.append(run)
            i = j
        return out

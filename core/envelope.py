"""CloudEvents 1.0 structured-mode JSON: what eda-sub prints and eda-pub --envelope reads."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from . import codec
from .errors import InputError
from .topics import validate_topic

CORE_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "time", "datacontenttype", "data", "sequence"}
)
CONTENT_TYPES = {codec.TEXT: "text/plain", codec.JSON: "application/json"}

_dumps = json.dumps


def rfc3339(ts: float) -> str:
    """UTC timestamp with microseconds, e.g. 2026-11-27T15:52:52.123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x09\x0b-\x1f]')


def batch_to_json_lines(batch: codec.Batch) -> str:
    """Render the events of a batch as CloudEvents JSON lines, each ending in a newline.

    Per-event work is one string format: everything shared by the batch is
    rendered once, and text payloads are escaped per event only when the
    batch holds a character JSON must escape.  Raises ValueError (WireError
    included) on a batch whose body does not hold what its header says.
    """
    seq = batch.seq
    if batch.kind == codec.ENVELOPE:
        out = []
        for i, event in enumerate(_wire_envelopes(batch)):
            event["sequence"] = seq + i
            out.append(_dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
        return "".join(out)
    ext = batch.extensions.decode()
    ext_part = "," + ext[1:-1] if len(ext) > 2 else ""
    head = '{"specversion":"1.0","id":"' + batch.pubid + "-"
    middle = (
        '","source":'
        + _dumps(batch.source)
        + ',"type":'
        + _dumps(batch.topic)
        + ',"time":"'
        + rfc3339(batch.time)
        + '","datacontenttype":"'
        + CONTENT_TYPES[batch.kind]
        + '"'
        + ext_part
        + ',"sequence":'
    )
    text = batch.body.decode(errors="replace")
    if batch.size == 1:
        parts = [text]
        escape = batch.kind == codec.TEXT and ("\n" in text or _NEEDS_ESCAPE.search(text))
    else:
        parts = text.split("\n")
        if len(parts) != batch.size:
            raise codec.WireError(f"batch announces {batch.size} events, holds {len(parts)}")
        escape = batch.kind == codec.TEXT and _NEEDS_ESCAPE.search(text) is not None
    if batch.kind == codec.JSON:
        parts = _checked_json(parts)
        return "".join(
            [f'{head}{seq + i}{middle}{seq + i},"data":{p}}}\n' for i, p in enumerate(parts)]
        )
    if not escape:
        return "".join(
            [f'{head}{seq + i}{middle}{seq + i},"data":"{p}"}}\n' for i, p in enumerate(parts)]
        )
    return "".join(
        [
            f'{head}{seq + i}{middle}{seq + i},"data":{_dumps(p, ensure_ascii=False)}}}\n'
            for i, p in enumerate(parts)
        ]
    )


def _checked_json(parts: list[str]) -> list[str]:
    """*parts* if each is one JSON value on one line (one parse per batch), else WireError.

    eda-pub sends compact JSON, but any peer on the LAN can send a batch: a
    bad payload must not become a broken line in the output.
    """
    try:
        values = json.loads("[" + ",".join(parts) + "]")
    except (ValueError, RecursionError) as exc:
        raise codec.WireError(f"bad JSON payload on the wire: {exc}") from None
    if len(values) != len(parts):
        raise codec.WireError("a JSON payload on the wire holds several values")
    if any("\n" in p for p in parts):
        return [_dumps(v, separators=(",", ":"), ensure_ascii=False) for v in values]
    return parts


def _wire_envelopes(batch: codec.Batch) -> list[dict[str, Any]]:
    """The envelopes of an ENVELOPE batch; WireError if any is not a JSON object."""
    try:
        events = [json.loads(line) for line in codec.split_body(batch)]
    except (ValueError, RecursionError) as exc:
        raise codec.WireError(f"bad envelope on the wire: {exc}") from None
    if not all(isinstance(e, dict) for e in events):
        raise codec.WireError("an envelope on the wire is not a JSON object")
    return events


def batch_to_events(batch: codec.Batch) -> Iterator[dict[str, Any]]:
    """The events of a batch as dictionaries (for templates and terminal views)."""
    payloads = codec.split_body(batch)
    if batch.kind == codec.ENVELOPE:
        for i, event in enumerate(_wire_envelopes(batch)):
            event["sequence"] = batch.seq + i
            yield event
        return
    shared: dict[str, Any] = {
        "specversion": "1.0",
        "source": batch.source,
        "type": batch.topic,
        "time": rfc3339(batch.time),
        "datacontenttype": CONTENT_TYPES[batch.kind],
    }
    if batch.extensions:
        shared.update(json.loads(batch.extensions))
    for i, p in enumerate(payloads):
        text = p.decode(errors="replace")
        data: Any = json.loads(text) if batch.kind == codec.JSON else text
        seq = batch.seq + i
        yield {**shared, "id": f"{batch.pubid}-{seq}", "sequence": seq, "data": data}


def data_text(event: dict[str, Any]) -> str:
    """The payload as a line of text: strings as they are, anything else as JSON."""
    data = event.get("data")
    if isinstance(data, str):
        return data
    return _dumps(data, separators=(",", ":"), ensure_ascii=False)


def parse_envelope(
    line: bytes, lineno: int, topic: str | None, source: str, new_id: Callable[[], str]
) -> tuple[str, bytes]:
    """Check one input envelope line; return (topic, compact JSON line).

    The event's own id, source, time, data and extension attributes are kept;
    *topic*, when given, replaces its type; a missing id or source is filled
    in from *new_id* and *source*.  ``sequence`` belongs to the hop
    and is dropped (the publisher stamps its own).
    """
    try:
        event = json.loads(line)
    except (ValueError, RecursionError) as exc:
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
    except Exception as exc:
        raise InputError(str(exc), lineno) from None
    event.pop("sequence", None)
    event.setdefault("specversion", "1.0")
    if "id" not in event:
        event["id"] = new_id()
    event.setdefault("source", source)
    return event_type, _dumps(event, separators=(",", ":"), ensure_ascii=False).encode()

"""How eda's batches look in JetStream: names, message ids, headers, the head of a message.

See the package docstring for the format (subjects ``<prefix>.<topic>``,
headers ``Eda-Seq``, ``Eda-Count``, ``Eda-Meta``, ``Nats-Msg-Id``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final, Literal, NamedTuple

from ... import binding, codec, envelope
from ...attributes import BUS_SEQUENCE
from ...errors import UsageError
from ..base import Piece
from ..engine import Record

Format = Literal["eda", "cloudevents"]
FORMATS: Final[tuple[Format, ...]] = ("eda", "cloudevents")
# structured content mode: the message body is the event in the JSON event format
STRUCTURED: Final = "application/cloudevents+json"

NAME_OK = re.compile(r"[A-Za-z0-9_-]{1,200}")  # stream, group names NATS accepts everywhere


class _Head(NamedTuple):
    sseq: int  # stream sequence
    seq: int  # bus sequence of the first event
    size: int
    stored: float
    topic: str
    pubid: str
    pubseq: int
    nbytes: int


def msg_id(pubid: str, topic: str, pubseq: int) -> str:
    return hashlib.sha256(f"{pubid}\0{topic}\0{pubseq}".encode()).hexdigest()[:32]


def header_bytes(headers: dict[str, str]) -> int:
    """Bytes *headers* take in a NATS message: a status line, a line each, an empty line."""
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def bucket_key(kind: str, name: str) -> str:
    return kind + base64.b32encode(name.encode()).decode().rstrip("=")


def nats_name(name: str, what: str) -> str:
    """*name* if NATS accepts it as a stream or consumer name, else a UsageError."""
    if not NAME_OK.fullmatch(name):
        raise UsageError(
            f"invalid {what} name {name!r} for NATS JetStream: use 1 to 200 letters, digits, "
            f"'-' or '_'"
        )
    return name


def head_of(prefix: str, sseq: int, subject: str, hdrs: Any, data: bytes | None) -> _Head | None:
    """The head of a stored message (None: not written by eda, skipped by every read)."""
    if not hdrs or "Eda-Seq" not in hdrs:
        return None
    meta = json.loads(hdrs["Eda-Meta"])
    return _Head(
        sseq,
        int(hdrs["Eda-Seq"]),
        int(hdrs["Eda-Count"]),
        float(meta["stored"]),
        subject[len(prefix) + 1 :],
        meta["pubid"],
        int(meta["pubseq"]),
        len(data or b""),
    )


def cloudevent_headers(piece: Piece) -> dict[str, str]:
    """The CloudEvents NATS binding's headers of a one-event *piece* (format ``cloudevents``).

    Binary content mode for a text or JSON event: a ``ce-`` header per
    attribute (as eda-sub --bus prints the event: ``edaseq``, ``edabusseq``
    included), the payload as the body.  Structured content mode for an
    envelope (an event published whole, eda-pub --envelope): the body is the
    event in the JSON event format, as published, and ``Content-Type`` says so.
    """
    batch = piece.batch
    if batch.kind == codec.ENVELOPE:
        return {"Content-Type": STRUCTURED}
    one = batch._replace(seq=piece.pubseq, size=1, body=piece.body)
    ((attributes, _),) = envelope.binary_events(one)
    attributes[BUS_SEQUENCE] = piece.seq
    return binding.to_headers(attributes)


def record(head: _Head, msg: Any) -> Record:
    """The record of a stored message whose head is *head*."""
    meta = json.loads(msg.headers["Eda-Meta"])
    return Record(
        head.seq, head.size, head.stored, head.topic, int(meta["kind"]), float(meta["time"]),
        head.pubid, head.pubseq, meta["source"], meta["ext"].encode(), msg.data or b"",
    )  # fmt: skip


def joined(records: Iterable[Record]) -> Iterator[Record]:
    """*records* with the runs of one batch's events joined again (format ``cloudevents``
    stores one per message): what follows a record in the same publisher stream, bus
    sequences, time, source, extensions and store round is part of it, unless a payload
    holds a newline (only a batch of one event may)."""
    run: Record | None = None
    for r in records:
        if (
            run is not None
            and r.seq == run.seq + run.size
            and r.pubseq == run.pubseq + run.size
            and r[3:7] == run[3:7]  # topic, kind, time, pubid
            and (r.source, r.extensions, r.stored) == (run.source, run.extensions, run.stored)
            and b"\n" not in r.body
            and (run.size > 1 or b"\n" not in run.body)
        ):
            run = run._replace(size=run.size + r.size, body=run.body + b"\n" + r.body)
            continue
        if run is not None:
            yield run
        run = r
    if run is not None:
        yield run

"""The bus over HTTP (``eda-bus serve --http HOST:PORT``), with the CloudEvents HTTP binding.

``POST /events`` publishes, in any of the binding's three modes:

* binary: the payload is the body, its ``Content-Type`` the event's
  ``datacontenttype``, the attributes ``ce-*`` headers (decoded by
  :func:`eda.core.binding.from_headers`, as the NATS binding's are); a JSON
  type makes the body the event's JSON ``data``, ``application/octet-stream``
  its ``data_base64``, any other its text (``data_base64`` if not UTF-8); without
  a ``Content-Type``, a body that parses as JSON is taken as JSON (the SDKs' default);
* structured: ``Content-Type: application/cloudevents+json``, one event as JSON;
* batched: ``Content-Type: application/cloudevents-batch+json``, a JSON array.

The event's ``type`` is its topic.  Events are checked as ``eda-pub --envelope``
checks them (:func:`eda.core.envelope.parse_envelope`: an event without ``id``
or ``source`` gets one) and stored as envelope batches, in order, one batch per
run of events of one topic; every event of a request is stored, or none.  The
answer comes only once a commit made them durable: ``201`` with
``{"stored": N, "first_seq": F, "last_seq": L}`` (their bus sequences), or a
problem (RFC 9457) saying that none of them was stored and whether to retry
(``503``, ``507`` a full disk; ``400``, ``413``, ``415`` the request's own fault).

The path is the bus's own: each batch is encoded as a publisher's and checked
by :func:`eda.core.codec.decode`, appended with the engine's idempotence (one
publisher id per front, drawn with 128 random bits), and covered by a group
commit per loop round; the bus's ZeroMQ rounds settle these appends first
(:attr:`.server.BusServer.before_round`), so a rollback there can never be taken
for a commit here.  Then :meth:`.server.BusServer.committed` delivers them.

``GET /events?topic=PATTERN`` (repeatable) streams stored and live events as
Server-Sent Events: ``id:`` the bus sequence, ``data:`` the event exactly as
``eda-sub --bus`` prints it (:func:`eda.core.envelope.bus_json_lines`).  It
starts live, or at ``from-start``, ``from-seq=N``, ``since=TIME`` (RFC 3339,
unix seconds or an age), ``last=N``, or after the ``Last-Event-ID`` a
reconnecting browser sends; ``durable=NAME`` resumes a durable consumer, which
acknowledges events as they are written to the connection.  Retention
overtaking a stream is told by an ``event: lost`` with ``{"lost": N}``.

Secure mode: an HTTP client proves no key, so HTTP is served on a loopback
address only, and not at all with ``--acl`` (rights are given by key).
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from .. import binding, codec, envelope, http
from ..attributes import SPECVERSION, dumps, loads
from ..endpoint import Endpoint
from ..errors import EdaError, InputError, ProtocolError, UsageError
from ..http import HttpError, Request, Stream, problem, sse
from ..registry.http import http_address
from ..topics import Matcher
from . import peerinput as check
from .engine import EventTooLargeError, Record, StoreError, StoreFullError
from .startat import start_spec

if TYPE_CHECKING:
    from .server import BusServer

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
MAX_BATCH = 10_000  # events in one batched request
MAX_STREAMS = 256  # event streams open at once
PUMP_EVENTS = 1000  # events one stream is sent per turn, at most
RETRY_AFTER = "1"


def serve_address(text: str, acl: bool) -> Endpoint:
    """Where to serve HTTP (UsageError in secure mode unless loopback, or with an ACL)."""
    if acl:
        raise UsageError(
            "--http cannot be used with --acl: HTTP clients prove no key to give rights"
            " to; publish and subscribe with eda-pub and eda-sub"
        )
    return http_address(text)


@dataclass(eq=False)
class _Waiting:
    request: Request
    confirm_at: int
    stored: int
    first: int
    last: int


@dataclass(eq=False)
class _Reader:
    stream: Stream
    matcher: Matcher
    cursor: int
    durable: str | None
    blocked: bool = False
    acked: int = 0


class BusHttp:
    """Serves *bus* over HTTP on *address*, in the bus's own loop."""

    def __init__(self, bus: BusServer, address: str | Endpoint) -> None:
        """A request's body may be as large as a publisher's message to *bus*."""
        self.bus = bus
        where = address if isinstance(address, Endpoint) else http_address(address)
        limits = http.Limits(body_bytes=max(1 << 20, int(bus.sock.getsockopt(zmq.MAXMSGSIZE))))
        self.server = http.Server(bus, where, what="HTTP", limits=limits)
        self.pubid = secrets.token_hex(16)
        self.source = f"eda://{socket.gethostname()}/bus-http"
        self.origin = codec.encode_origin(self.pubid, self.source)
        self.seq = 1  # the next publisher sequence of this front
        self.ids = 0
        self.waiting: list[_Waiting] = []
        self.settling: Any = None
        self.readers: dict[Stream, _Reader] = {}
        self.published = 0  # events stored through HTTP
        self.server.route("POST", "/events", self.publish)
        self.server.route("GET", "/events", self.subscribe)
        bus.before_round.append(self.settle)
        bus.on_durable.append(lambda _durable: self.pump())

    @property
    def url(self) -> str:
        return self.server.url

    # -- publishing ------------------------------------------------------------------
    def publish(self, req: Request) -> http.Response | None:
        lines = self._events(req)
        if not lines:
            raise HttpError(400, "no event in the request")
        batches = self._batches(lines)
        try:
            receipts = self.bus.engine.append(batches)
        except (EventTooLargeError, codec.WireError) as exc:
            raise HttpError(413 if isinstance(exc, EventTooLargeError) else 400,
                            f"nothing stored: {exc}"[:500]) from None  # fmt: skip
        except UsageError as exc:
            raise HttpError(400, f"nothing stored: {exc}"[:500]) from None
        except StoreError as exc:  # rolled back with every append not committed yet
            self._refuse_all(exc)
            return self._not_stored(len(lines), exc)
        spans = [span for r in receipts for span in r.stored]
        first = min((s[1] for s in spans), default=0)
        last = max((s[1] + s[2] - 1 for s in spans), default=0)
        confirm_at = max(r.confirm_at for r in receipts)
        self.waiting.append(_Waiting(req, confirm_at, len(lines), first, last))
        if self.settling is None:  # one commit for what this round of the loop took in
            self.settling = self.bus.after(0, "HTTP commit", self.settle)
        return None

    def _events(self, req: Request) -> list[tuple[str, bytes]]:
        kind = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind == STRUCTURED:
            return [self._checked(req.body, 0)]
        if kind == BATCH:
            events = req.json()
            if not isinstance(events, list) or len(events) > MAX_BATCH:
                raise HttpError(400, f"a batch is a JSON array of at most {MAX_BATCH} events")
            return [self._checked(dumps(ev).encode(), i + 1) for i, ev in enumerate(events)]
        if "ce-specversion" not in req.headers:
            raise HttpError(415, "not a CloudEvent: send ce-specversion, ce-type (the topic), "
                            f"ce-id and ce-source headers (binary mode), or {STRUCTURED}"
                            f" or {BATCH}")  # fmt: skip
        return [self._checked(dumps(self._binary(req, kind)).encode(), 0)]

    def _binary(self, req: Request, kind: str) -> dict[str, Any]:
        """The event of a binary-mode request: ce-* headers, the body as its data."""
        try:
            event: dict[str, Any] = dict(binding.from_headers(req.headers.items()))
        except ValueError as exc:
            raise HttpError(400, str(exc)[:500]) from None
        if event.get("specversion") != SPECVERSION:
            raise HttpError(400, f"ce-specversion must be {SPECVERSION}")
        for name in ("data", "data_base64"):
            if name in event:
                raise HttpError(400, f"ce-{name} is not an attribute: the body is the data")
        if "content-type" in req.headers:  # (the binding's datacontenttype)
            event["datacontenttype"] = req.headers["content-type"]
        if req.body:
            if kind == "application/json" or kind.endswith("+json"):
                event["data"] = req.json()
            elif kind == "application/octet-stream":
                event["data_base64"] = _b64(req.body)
            elif not kind and _json(req.body):  # no type: JSON when it is (the SDKs' default)
                event["data"] = loads(req.body)
            else:
                try:
                    event["data"] = req.body.decode()
                except UnicodeDecodeError:
                    event["data_base64"] = _b64(req.body)
        return event

    def _checked(self, line: bytes, n: int) -> tuple[str, bytes]:
        """(topic, compact envelope line) of one event, checked as eda-pub --envelope does."""
        try:
            return envelope.parse_envelope(line, n, None, self.source, self._new_id)
        except InputError as exc:
            where = f"event {n}: " if n else ""
            raise HttpError(400, f"nothing stored: {where}{exc.args[0]}"[:500]) from None

    def _new_id(self) -> str:
        self.ids += 1
        return f"{self.pubid}-h{self.ids}"

    def _batches(self, lines: list[tuple[str, bytes]]) -> list[codec.Batch]:
        """One envelope batch per run of events of one topic, in order, as a publisher's."""
        runs: list[tuple[str, list[bytes]]] = []
        for topic, line in lines:
            if runs and runs[-1][0] == topic:
                runs[-1][1].append(line)
            else:
                runs.append((topic, [line]))
        batches = []
        now = time.time()
        for topic, run in runs:
            header = codec.encode_header(codec.ENVELOPE, len(run), self.seq, now, self.origin)
            batches.append(codec.decode([topic.encode(), header, b"\n".join(run)]))
            self.seq += len(run)
        return batches

    def settle(self) -> None:
        """Commit what was appended, answer each request its commit covers, refuse the
        others (nothing of theirs is stored), deliver."""
        if self.settling is not None:
            self.settling.cancel()
            self.settling = None
        if not self.waiting:
            return
        waiting, self.waiting = self.waiting, []
        try:
            durable = self.bus.engine.commit()
        except StoreError as exc:
            self.bus.limited("commit", f"HTTP commit failed: {exc}")
            for w in waiting:
                w.request.respond(*self._not_stored(w.stored, exc))
            return
        for w in waiting:
            if w.confirm_at <= durable:
                self.published += w.stored
                body = {"stored": w.stored, "first_seq": w.first, "last_seq": w.last}
                w.request.respond(*http.json_response(201, body))
            else:
                missed = StoreError("the events were not covered by a commit")
                w.request.respond(*self._not_stored(w.stored, missed))
        self.bus.committed(durable)

    def _refuse_all(self, exc: StoreError) -> None:
        """The store rolled back what was not committed: every request waiting lost its
        appends (refused at once, before a later append can reuse their sequences)."""
        waiting, self.waiting = self.waiting, []
        for w in waiting:
            w.request.respond(*self._not_stored(w.stored, exc))

    @staticmethod
    def _not_stored(count: int, exc: StoreError) -> http.Response:
        status = 507 if isinstance(exc, StoreFullError) else 503
        what = "the event was" if count == 1 else f"none of the {count} events was"
        got = problem(status, f"{what} not stored: {exc}; retry"[:500], retry=True)
        return got[0], [*got[1], ("retry-after", RETRY_AFTER)], got[2]

    # -- streaming ------------------------------------------------------------------
    def subscribe(self, req: Request) -> None:
        try:
            patterns = check.patterns({"patterns": req.query.get("topic", [])})
            matcher = Matcher(patterns)
            durable = check.name({"durable": req.arg("durable")}, "durable")
            spec = start_spec(req.arg("from-start") is not None, _int(req.arg("from-seq")),
                              req.arg("since"), _int(req.arg("last")), "")  # fmt: skip
        except (ProtocolError, UsageError) as exc:
            raise HttpError(400, f"{exc}; e.g. /events?topic=orders.>&from-start") from None
        last_id = req.headers.get("last-event-id", "")
        if spec is None and last_id.isdigit() and len(last_id) < 19:
            spec = {"seq": int(last_id) + 1}  # a browser reconnecting: resume after it
        if len(self.readers) >= MAX_STREAMS:
            raise HttpError(503, f"{MAX_STREAMS} event streams are open; try again later")
        if durable is not None and any(r.durable == durable for r in self.readers.values()):
            raise HttpError(409, f"durable consumer {durable!r} is already streaming here")
        bus = self.bus
        start = bus._start("start" if spec is None and durable is not None else spec, matcher)
        cursor = start
        if durable is not None:
            try:
                cursor = bus.engine.consumer(durable, patterns, start)
                bus._commit()
            except EdaError as exc:
                raise HttpError(409 if isinstance(exc, UsageError) else 503, str(exc)) from None
        stream = req.stream()
        reader = _Reader(stream, matcher, cursor, durable)
        self.readers[stream] = reader
        stream.on_close = lambda: self.readers.pop(stream, None)
        stream.on_room = lambda: self._unblock(reader)
        stream.send(f": from bus sequence {cursor}\n\n".encode())
        self._pump(reader, bus._durable)

    def _unblock(self, reader: _Reader) -> None:
        reader.blocked = False
        self._pump(reader, self.bus._durable)

    def pump(self) -> None:
        durable = self.bus._durable
        for reader in list(self.readers.values()):
            if not reader.blocked:
                self._pump(reader, durable)

    def _pump(self, reader: _Reader, durable: int) -> None:
        engine, stream = self.bus.engine, reader.stream
        while reader.cursor <= durable and not stream.closed:
            first = engine.kept_from
            if reader.cursor < first:  # retention removed what it had not read yet
                lost = first - reader.cursor
                stream.send(sse(dumps({"lost": lost}), event="lost"))
                reader.cursor = first
            sent = 0
            for record in engine.read(reader.cursor, durable, reader.matcher, PUMP_EVENTS):
                if not stream.room():
                    reader.blocked = True  # on_room resumes it
                    break
                stream.send(self._render(record))
                sent += record.size
                reader.cursor = record.seq + record.size
            else:
                if sent < PUMP_EVENTS:
                    reader.cursor = durable + 1  # nothing else matching up to there
            if reader.blocked or sent == 0:
                break
        if reader.durable is not None and reader.cursor - 1 > reader.acked:
            reader.acked = reader.cursor - 1  # as written to the connection
            engine.ack(reader.durable, min(reader.acked, durable))

    @staticmethod
    def _render(record: Record) -> bytes:
        """SSE events of *record*, each exactly as eda-sub --bus prints it."""
        header = codec.encode_header(record.kind, record.size, record.pubseq, record.time,
                                     codec.encode_origin(record.pubid, record.source))  # fmt: skip
        frames = [record.topic.encode(), header, record.body]
        if record.extensions:
            frames.append(record.extensions)
        lines = envelope.bus_json_lines(record.seq, codec.decode(frames))
        return b"".join(
            sse(line[:-1], id=record.seq + i) for i, line in enumerate(lines)
        )


    def close(self) -> None:
        self.server.close()


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18:
        raise UsageError(f"not a sequence number: {text[:40]!r}")
    return int(text)


def _json(body: bytes) -> bool:
    try:
        loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


"""The NATS JetStream engine: eda-bus's log kept in a (replicated) JetStream stream.

Shape, and why:

* **One stream** (``EDA`` by default) over the subjects ``eda.<topic>``.  eda's
  topics are dot-separated tokens and its patterns use NATS's own wildcards
  (``*`` one token, ``>`` one or more trailing tokens), so a topic maps onto a
  subject 1:1 and a pattern onto a subject filter, without escaping.  Topics
  and names NATS would refuse are refused with a UsageError, never mangled.
* **One JetStream message carries one eda batch** (or the part of one that
  was new): JetStream costs about the same per message whatever its size, so
  a batch of hundreds of events costs one replicated write instead of
  hundreds.  A batch larger than the server's max payload (read from the
  connection; headers count) is cut into several messages; an event that
  does not fit in one by itself is refused (EventTooLargeError) before
  anything is stored.  The body is the wire batch's body (payloads joined by ``\\n``),
  so a plain NATS consumer of ``eda.>`` sees, per message, the subject
  ``eda.<topic>``, one event per line (a CloudEvents JSON object per line for
  envelopes) and the headers below; it must split lines itself.
* **Headers**: ``Eda-Seq`` (bus sequence of the first event), ``Eda-Count``
  (events in the message) and ``Eda-Meta`` (JSON: kind, publisher time,
  pubid, first publisher sequence, source, extensions, stored time).  Bus
  sequences are a running event count kept in the messages themselves: the
  message after one with ``Eda-Seq`` s and ``Eda-Count`` n starts at s + n.
  Every publish carries ``Nats-Expected-Last-Sequence``, so two writers can
  never assign the same bus sequences: the second one's publish is refused
  and this engine resynchronises from the stream (StoreError, nothing
  confirmed; the publisher resends).
* **Exactly-once storage**: ``Nats-Msg-Id`` = a digest of (pubid, topic,
  first publisher sequence) makes JetStream drop a resent message within its
  duplicate window (also one sent by another front, or before a crash); the
  engine also cuts each batch against the publisher sequences it has seen,
  as the embedded engine does, so a resend overlapping a stored batch only
  stores its new part, also after the duplicate window.
* **Durability**: ``append`` publishes without waiting; ``commit`` waits for
  the stream's acknowledgements (given by the Raft quorum when ``replicas`` >
  1) and only then moves ``durable_seq``.  Sequences and publisher ranges an
  unacknowledged or refused publish took are forgotten again (the engine
  reads back what the stream holds), so a resend is stored, never taken for
  a duplicate.
* **Deadlines**: once open, no call waits for NATS longer than
  ``SERVE_DEADLINE`` (2 s), well inside a publisher's patience: a server
  that is slow, gone, or that lost acknowledgements with a restart costs a
  refused round (the publishers resend) or one error, never a stalled bus.
* **Durable consumers** keep their exact position (a bus sequence, which may
  fall inside a message) in the key-value bucket ``<stream>_consumers``
  (itself a JetStream stream with the same replicas): a JetStream consumer
  acknowledges whole messages and is pulled by the server, whereas the bus
  reads by sequence and acknowledges per event.
* **Groups** are JetStream durable pull consumers (``eda_g_<group>``) with
  explicit acks: members claim by fetching, a message is acknowledged once a
  member acknowledged all its events, ``release`` naks what a dead member
  held (redelivered at once), what live members hold is reported in progress
  on every claim and ack of the group, and JetStream itself redelivers what
  a crashed engine held after ``ack_wait``.
* **Index**: the heads of the stored batches (stream sequence, bus sequence,
  count, stored time, topic, publisher stream) are kept in memory, read from
  the stream on open, so lookups by bus sequence and time, ``seq_for_last``
  and stats never scan messages.  Opening costs one read of the stream; a
  store of millions of messages would want this index persisted (later).
* **Retention** purges the oldest messages (``retain``) and records the next
  bus sequence in the bucket, so sequences are never reused; ``max_age`` and
  ``max_bytes`` given when the stream is created also become its own limits.
  ``replicas`` (1 to 5) is likewise set when the stream is created.  Opened
  again with other ``replicas``, ``max_age`` or ``max_bytes`` (given ones
  only), the existing stream is updated in place (``changes`` says what), or
  the change is refused with a UsageError when JetStream refuses it.

Differences from the embedded engine, by design: what a group member holds
(``held``, ``release``) is this engine's view; when the engine itself dies,
JetStream redelivers what its members held after ``ack_wait``.  A group
message is acknowledged once all its events are, so a member that dies after
acknowledging part of a batch has the whole batch redelivered (at least
once).  A failed ``commit`` may have stored a prefix of the pending batches:
they are durable and read back; their publishers, unconfirmed, resend and
are told they are duplicates.  There is no ``fsync`` mode: JetStream's file
store and its quorum decide durability.

:func:`migrate` copies an embedded store into a stream (``eda-bus migrate``).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Final, NamedTuple, TypeVar

from .. import codec
from ..codec import Batch
from ..errors import NotFoundError, UsageError
from ..topics import Matcher, validate_topic
from . import retention
from .base import DEFAULT_MAX_RANGES, EngineBase, Span
from .engine import (
    ConsumerStats,
    Engine,
    Receipt,
    Record,
    Stats,
    StoreError,
    TopicStats,
)
from .streams import DEFAULT_MAX_EVENT, MAX_SEQ, Ranges, add, check_events, check_name, subtract

try:
    import nats
    from nats.errors import Error as NatsError
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js import api as jsapi
    from nats.js.errors import APIError as JsApiError
    from nats.js.errors import NotFoundError as JsNotFound
    from nats.js.errors import ServiceUnavailableError as ServiceUnavailable
except ImportError:  # pragma: no cover - the extra is not installed
    nats = None  # type: ignore[assignment]

T = TypeVar("T")
DEFAULT_STREAM: Final = "EDA"
_NAME_OK = re.compile(r"[A-Za-z0-9_-]{1,200}")  # stream, group names NATS accepts everywhere
_CHUNK: Final = 128  # messages fetched concurrently while reading
_CHUNK_BYTES: Final = 8 << 20  # ... and at most about this many bytes of them
# The longest any one call of the serving loop waits for NATS (an ack, a pull, an
# API answer): well inside a publisher's patience (eda-pub --timeout, BusPublisher's
# default 10 s without a confirmation) and eda-bus stats' 5 s, so a NATS server that
# is slow, gone or stuck costs the bus a refused round (publishers resend) or one
# error reply, never a stalled front.
SERVE_DEADLINE: Final = 2.0
# nats-server 2.9 never answers a no-wait pull on a consumer that held messages a
# purge removed (it answers at once otherwise).  A group whose pull went unanswered
# this long is pulled with an expiry instead for a while (the server answers by then,
# as it also waits that long when it has nothing: a cost only such groups pay).
_NO_WAIT_ANSWER: Final = 0.5
_PULL_EXPIRES: Final = 0.05
_EXPIRING_FOR: Final = 60.0


class _Head(NamedTuple):
    sseq: int  # stream sequence
    seq: int  # bus sequence of the first event
    size: int
    stored: float
    topic: str
    pubid: str
    pubseq: int
    nbytes: int


class _Held(NamedTuple):
    first: int
    last: int
    msg: Any  # nats.aio.msg.Msg
    since: float  # monotonic time it was claimed or last reported in progress


def _msg_id(pubid: str, topic: str, pubseq: int) -> str:
    return hashlib.sha256(f"{pubid}\0{topic}\0{pubseq}".encode()).hexdigest()[:32]


def _header_bytes(headers: dict[str, str]) -> int:
    """Bytes *headers* take in a NATS message: a status line, a line each, an empty line."""
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def _key(kind: str, name: str) -> str:
    return kind + base64.b32encode(name.encode()).decode().rstrip("=")


def nats_name(name: str, what: str) -> str:
    """*name* if NATS accepts it as a stream or consumer name, else a UsageError."""
    if not _NAME_OK.fullmatch(name):
        raise UsageError(
            f"invalid {what} name {name!r} for NATS JetStream: use 1 to 200 letters, digits, "
            f"'-' or '_'"
        )
    return name


class NatsEngine(EngineBase):
    """eda-bus's store on a NATS JetStream stream (see the module docstring).

    Not thread-safe: use it from one thread at a time.  It runs its own
    asyncio loop in a background thread; every method waits for its result.
    """

    shared = True  # other fronts write to the same stream

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        stream: str = DEFAULT_STREAM,
        prefix: str = "eda",
        replicas: int | None = None,
        duplicate_window: float = 120.0,
        max_age: float | None = None,
        max_bytes: int | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT,
        max_ranges: int = DEFAULT_MAX_RANGES,
        ack_wait: float = 30.0,
        timeout: float = 10.0,
        deadline: float = SERVE_DEADLINE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if nats is None:
            raise UsageError("the NATS engine needs nats-py: pip install 'eda[nats]'")
        self.stream = nats_name(stream, "stream")
        self.prefix = validate_topic(prefix)
        if replicas is not None and not 1 <= replicas <= 5:
            raise UsageError(f"invalid replicas {replicas}: JetStream allows 1 to 5")
        self._want_replicas = replicas  # None: as the stream has it (1 when created)
        self.replicas = replicas or 1
        self.changes: list[str] = []  # what opening changed in an existing stream's config
        self.warnings: list[str] = []  # what the caller should tell its user
        super().__init__(max_event_bytes=max_event_bytes, max_ranges=max_ranges, clock=clock)
        self.ack_wait = ack_wait
        self.timeout = timeout  # opening (patient: a cluster may be electing leaders)
        self.deadline = min(deadline, timeout)  # every call once open (see SERVE_DEADLINE)
        self._servers = [servers] if isinstance(servers, str) else list(servers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="nats")
        self._thread.start()
        self._closed = False
        self._heads: list[_Head] = []
        self._head_seqs: list[int] = []  # bus sequences of _heads, for bisect
        self._pending: list[tuple[_Head, asyncio.Future[Any]]] = []
        # publisher sequences of events no longer in the stream (retention), kept for a
        # while so that a late resend of one is still a duplicate, also after a resync
        # or a reopen (JetStream's duplicate window refuses its Msg-Id meanwhile)
        self._gone: dict[tuple[str, str], tuple[Ranges, float]] = {}
        self._gone_for = max(2 * duplicate_window, 600.0)
        self._groups: dict[str, list[str]] = {}  # group -> patterns (its consumer exists)
        self._held: dict[str, dict[str, list[_Held]]] = {}  # group -> member -> messages
        self._unanswered: dict[str, float] = {}  # group -> when a no-wait pull went unanswered
        try:
            # patient: a cluster that just lost a node elects new leaders first
            self._run(self._open(duplicate_window, max_age, max_bytes), timeout * 10)
        except BaseException:
            if hasattr(self, "_nc"):
                with contextlib.suppress(Exception):
                    self._run(self._nc.close(), self.timeout)
            self._stop()
            raise

    # -- the loop -------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout if timeout is not None else self.deadline)
        except TimeoutError:
            fut.cancel()
            raise StoreError(f"NATS stream {self.stream}: no answer in time") from None
        except NatsError as exc:  # nats-py's errors: not reachable, refused, timed out
            raise StoreError(f"NATS stream {self.stream}: {exc or type(exc).__name__}") from None

    def _stop(self) -> None:
        async def cancel_all() -> None:  # the client's reader, flusher, pingers, reconnects
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _usable(self) -> None:
        if self._closed:
            raise StoreError(f"NATS stream {self.stream} is closed")

    # -- opening --------------------------------------------------------------
    async def _open(self, window: float, max_age: float | None, max_bytes: int | None) -> None:
        self.errors: list[str] = []  # the client's last connection errors (it reconnects)

        async def on_error(exc: Exception) -> None:
            self.errors[:] = [*self.errors[-9:], str(exc) or type(exc).__name__]

        try:  # nats-py retries the first connect forever when reconnecting is on
            self._nc = await asyncio.wait_for(
                nats.connect(
                    servers=self._servers,
                    connect_timeout=min(2.0, self.timeout),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2,
                    allow_reconnect=True,
                    # a server cut off by the network is silent: found dead after two
                    # unanswered pings (not nats-py's 2 x 120 s), then another is used
                    ping_interval=max(1, int(self.timeout / 4)),
                    max_outstanding_pings=2,
                    error_cb=on_error,
                ),
                self.timeout,
            )
        except Exception as exc:  # nats-py raises several kinds here
            why = self.errors[-1] if isinstance(exc, TimeoutError) and self.errors else exc
            raise StoreError(f"cannot reach NATS at {','.join(self._servers)}: {why}") from None
        self._js = self._nc.jetstream(timeout=self.timeout)
        deadline = time.monotonic() + self.timeout * 7
        while True:  # a cluster that just lost or regained a node answers 503 for a while
            try:
                return await self._setup(window, max_age, max_bytes)
            except (ServiceUnavailable, NatsTimeout):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)

    async def _setup(self, window: float, max_age: float | None, max_bytes: int | None) -> None:
        """The stream, the bucket and the index; safe to run again after a failure."""
        config = jsapi.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            storage=jsapi.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=window,
            max_age=max_age,
            max_bytes=max_bytes,
            discard=jsapi.DiscardPolicy.OLD,
        )
        try:
            info = await self._js.stream_info(self.stream)
        except JsNotFound:
            await self._js.add_stream(config)
        else:
            subjects = info.config.subjects or []
            if f"{self.prefix}.>" not in subjects:
                raise UsageError(
                    f"NATS stream {self.stream} holds subjects {subjects}, not {self.prefix}.>: "
                    f"choose another stream name or prefix"
                )
            await self._reconfigure(info, max_age, max_bytes)
        bucket = f"{self.stream}_consumers"
        try:
            self._kv = await self._js.key_value(bucket)
        except Exception:
            self._kv = await self._js.create_key_value(
                bucket=bucket, history=1, replicas=self.replicas
            )
        await self._catch_up()
        limit = int(self._nc.max_payload)
        if self.max_event_bytes > limit:
            self.warnings[:] = [
                f"events larger than the NATS server's max payload ({limit} bytes, less "
                f"headers) are refused, though the event limit is {self.max_event_bytes}"
            ]

    async def _reconfigure(self, info: Any, max_age: float | None, max_bytes: int | None) -> None:
        """Give an existing stream the limits and replicas asked for (those given only).

        JetStream changes them in place (a replicated stream grows or shrinks
        its copies); what it refuses (more replicas than servers, ...) is a
        UsageError naming the change.  The consumers' bucket follows the
        stream's replicas.
        """
        config = info.config
        want: dict[str, Any] = {}
        if self._want_replicas is not None and config.num_replicas != self._want_replicas:
            want["num_replicas"] = self._want_replicas
        if max_age is not None and (config.max_age or 0.0) != max_age:
            want["max_age"] = max_age
        if max_bytes is not None and config.max_bytes != max_bytes:
            want["max_bytes"] = max_bytes
        if not want:
            self.replicas = config.num_replicas or 1
            return
        said = ", ".join(
            f"{k.removeprefix('num_')} {getattr(config, k)} -> {v}" for k, v in want.items()
        )
        if want.get("num_replicas", 1) > 1 and info.cluster is None:
            # a single server would record the number and keep one copy
            raise UsageError(
                f"cannot change NATS stream {self.stream} ({said}): the server is not "
                f"clustered, so it keeps one copy (more need a JetStream cluster)"
            )
        try:
            await self._js.update_stream(dataclasses.replace(config, **want))
            if "num_replicas" in want:
                kv = (await self._js.stream_info(f"KV_{self.stream}_consumers")).config
                if kv.num_replicas != self.replicas:
                    await self._js.update_stream(
                        dataclasses.replace(kv, num_replicas=self.replicas)
                    )
        except JsNotFound:
            pass  # no bucket yet: created with these replicas
        except JsApiError as exc:
            why = exc.description or type(exc).__name__
            raise UsageError(f"cannot change NATS stream {self.stream} ({said}): {why}") from None
        self.changes.append(f"NATS stream {self.stream} changed: {said}")

    async def _fetch(self, sseqs: Sequence[int]) -> list[Any]:
        """The stored messages at *sseqs* (None where a message is gone), concurrently."""

        async def one(s: int) -> Any:
            try:
                return await self._js.get_msg(self.stream, s)
            except JsNotFound:
                return None

        return list(await asyncio.gather(*(one(s) for s in sseqs)))

    async def _catch_up(self) -> None:
        """Read the heads of messages this engine has not seen (all of them on open)."""
        info = await self._js.stream_info(self.stream)
        last = info.state.last_seq
        pos = max(info.state.first_seq, self._heads[-1].sseq + 1 if self._heads else 1)
        gone = bisect.bisect_left([h.sseq for h in self._heads], info.state.first_seq)
        if gone:  # removed by the stream's own limits (max_age, max_bytes) or another front
            self._forget(self._heads[:gone])
            del self._heads[:gone]
            del self._head_seqs[:gone]
        while pos <= last:
            chunk = list(range(pos, min(last, pos + _CHUNK - 1) + 1))
            for msg in await self._fetch(chunk):
                if msg is not None:
                    self._index(msg)
            pos = chunk[-1] + 1
        self._sseq = last
        floor = await self._kv_get("floor")  # bus sequences are never reused after a purge
        top = self._heads[-1].seq + self._heads[-1].size if self._heads else 1
        self._next = max(top, int(floor["next"]) if floor else 1)
        self._durable = self._next - 1
        self._load_gone(await self._kv_get("retained"))

    def _forget(self, heads: Sequence[_Head]) -> None:
        """*heads* leave the stream: remember their publisher sequences (see _gone)."""
        now = time.time()
        for h in heads:
            ranges, _ = self._gone.get((h.pubid, h.topic), ([], now))
            add(ranges, h.pubseq, h.pubseq + h.size)
            self._gone[h.pubid, h.topic] = (ranges, now)
        self._gone = {k: v for k, v in self._gone.items() if v[1] > now - self._gone_for}

    def _load_gone(self, value: dict[str, Any] | None) -> None:
        """Merge what retention (of any front) wrote to the bucket; malformed rows are skipped."""
        rows = value.get("streams") if isinstance(value, dict) else None
        for row in rows if isinstance(rows, list) else []:
            try:
                pubid, topic, spans, when = row
                key, when = (str(pubid), str(topic)), float(when)
                ranges, seen = self._gone.get(key, ([], when))
                for lo, hi in spans:
                    if 1 <= int(lo) < int(hi) <= MAX_SEQ + 1:
                        add(ranges, int(lo), int(hi))
                self._gone[key] = (ranges, max(seen, when))
            except (TypeError, ValueError):
                continue
        for key, (ranges, _) in self._gone.items():
            for lo, hi in ranges:
                self._ledger.add(key, lo, hi)

    def _gone_value(self) -> dict[str, Any]:
        return {"streams": [[k[0], k[1], r, when] for k, (r, when) in self._gone.items()]}

    def _index(self, msg: Any) -> _Head | None:
        head = self._head_of(msg.seq, msg.subject, msg.headers, msg.data)
        if head is None:
            return None  # not written by eda: skipped by every read
        self._add_head(head)
        return head

    def _head_of(self, sseq: int, subject: str, hdrs: Any, data: bytes | None) -> _Head | None:
        if not hdrs or "Eda-Seq" not in hdrs:
            return None
        meta = json.loads(hdrs["Eda-Meta"])
        return _Head(
            sseq,
            int(hdrs["Eda-Seq"]),
            int(hdrs["Eda-Count"]),
            float(meta["stored"]),
            subject[len(self.prefix) + 1 :],
            meta["pubid"],
            int(meta["pubseq"]),
            len(data or b""),
        )

    def _add_head(self, head: _Head) -> None:
        self._heads.append(head)
        self._head_seqs.append(head.seq)
        self._ledger.add((head.pubid, head.topic), head.pubseq, head.pubseq + head.size)

    # -- state ----------------------------------------------------------------
    @property
    def first_seq(self) -> int:
        return self._heads[0].seq if self._heads else self._durable + 1

    # -- writing --------------------------------------------------------------
    def _check(self, batch: Batch) -> None:
        subject_bytes = len(self.prefix) + 1 + len(batch.topic.encode())
        if batch.topic not in self._topics_ok and subject_bytes > 4000:
            raise UsageError(f"topic {batch.topic[:40]!r}… is too long for a NATS subject")
        super()._check(batch)

    def _room(self, batch: Batch) -> int:
        """Payload bytes one message of *batch* may carry: the server's max payload
        (read from the connection: it counts headers too) less the largest headers
        this batch's messages can have.  EventTooLargeError when one event alone
        does not fit, so it is refused before anything is stored."""
        ext = ("{" + batch.extensions.json[1:] + "}") if batch.extensions.json else ""
        limit = int(self._nc.max_payload)
        # the common case, cheaply: headers of fixed size plus strings JSON escapes
        # at most 12-fold (an astral character as two \\uXXXX escapes)
        bound = 512 + 12 * (len(batch.pubid) + len(batch.source) + len(ext))
        if len(batch.body) + bound <= limit:
            return limit - bound
        meta = {"kind": batch.kind, "time": batch.time, "pubid": batch.pubid, "pubseq": MAX_SEQ,
                "source": batch.source, "ext": ext, "stored": -1.2345678901234567e308}  # fmt: skip
        widest = str(MAX_SEQ)
        headers = {"Eda-Seq": widest, "Eda-Count": widest, "Eda-Meta": json.dumps(meta),
                   "Nats-Msg-Id": "0" * 32, "Nats-Expected-Last-Sequence": widest}  # fmt: skip
        room = limit - _header_bytes(headers)
        what = f"the NATS server's max payload of {limit} (less {limit - room} bytes of headers)"
        check_events(batch, room, what)
        return room

    def append(self, batches: Sequence[Batch]) -> list[Receipt]:
        self._usable()
        rooms = []
        for batch in batches:
            self._check(batch)
            rooms.append(self._room(batch))
        last_stored = self._heads[-1].stored if self._heads else 0.0
        now = max(self._clock(), self._pending[-1][0].stored if self._pending else last_stored)
        # what a publish refuses is forgotten again by _abandon (and what the
        # stream does not acknowledge by commit's _resync): never confirmed
        pieces, receipts = self._ledger.plan(batches, self._next, rooms)
        out: list[tuple[str, bytes, dict[str, str], _Head]] = []
        for p in pieces:
            b = p.batch
            meta = {"kind": b.kind, "time": b.time, "pubid": b.pubid, "pubseq": p.pubseq,
                    "source": b.source, "ext": p.ext, "stored": now}  # fmt: skip
            self._sseq += 1
            headers = {
                "Eda-Seq": str(p.seq),
                "Eda-Count": str(p.size),
                "Eda-Meta": json.dumps(meta),
                "Nats-Msg-Id": _msg_id(b.pubid, b.topic, p.pubseq),
                "Nats-Expected-Last-Sequence": str(self._sseq - 1),
            }
            head = _Head(self._sseq, p.seq, p.size, now, b.topic, b.pubid, p.pubseq, len(p.body))
            out.append((f"{self.prefix}.{b.topic}", p.body, headers, head))
            self._next = p.seq + p.size
        if out:
            sent: list[asyncio.Future[Any]] = []
            try:
                self._run(self._publish([(s, d, h) for s, d, h, _ in out], sent))
            except StoreError as exc:
                self._pending += [(m[3], f) for m, f in zip(out, sent, strict=False)]
                self._abandon()
                raise StoreError(
                    f"{exc}; nothing after sequence {self._durable} is confirmed: the "
                    f"publishers resend it"
                ) from None
            self._pending += [(m[3], f) for m, f in zip(out, sent, strict=True)]
        return receipts

    def _abandon(self) -> None:
        """Give up on every unacknowledged publish: forget the sequences and ranges
        they took and read back what the stream really holds."""
        pending, self._pending = self._pending, []

        def forget() -> None:
            for _, fut in pending:
                fut.cancel()
            getattr(self, "_acks", {}).clear()

        self._loop.call_soon_threadsafe(forget)
        self._resync()

    async def _publish(
        self, msgs: list[tuple[str, bytes, dict[str, str]]], futures: list[asyncio.Future[Any]]
    ) -> None:
        """Send *msgs* in order without waiting for their acks; one future per message
        sent, appended to *futures* (so a failure part-way leaves those of the sent ones)."""
        if not hasattr(self, "_inbox"):
            self._inbox = self._nc.new_inbox()
            self._acks: dict[str, asyncio.Future[Any]] = {}
            self._ackn = 0

            async def on_ack(msg: Any) -> None:
                fut = self._acks.pop(msg.subject, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

            await self._nc.subscribe(f"{self._inbox}.*", cb=on_ack)
        for subject, data, headers in msgs:
            self._ackn += 1
            reply = f"{self._inbox}.{self._ackn}"
            fut: asyncio.Future[Any] = self._loop.create_future()
            self._acks[reply] = fut
            await self._nc.publish(subject, data, reply=reply, headers=headers)
            futures.append(fut)

    def commit(self) -> int:
        self._usable()
        if not self._pending:
            return self._durable
        pending, self._pending = self._pending, []
        try:
            failure = self._run(self._settle(pending))
        except StoreError as exc:
            failure = str(exc)
        if failure is None:
            for head, _ in pending:
                self._add_head_indexed(head)
            self._ledger.fresh.clear()
            self._durable = self._next - 1
            return self._durable
        self._resync()
        raise StoreError(
            f"NATS stream {self.stream}: {failure}; nothing after sequence {self._durable} is "
            f"confirmed: the publishers resend it"
        )

    def _add_head_indexed(self, head: _Head) -> None:
        self._heads.append(head)
        self._head_seqs.append(head.seq)

    async def _settle(self, pending: list[tuple[_Head, asyncio.Future[Any]]]) -> str | None:
        """Wait for every ack; None when each message was stored where it was meant to be."""
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(f for _, f in pending)), self.deadline * 0.9
            )
        except TimeoutError:
            for _, f in pending:
                f.cancel()
            return "the stream did not acknowledge in time"
        for (head, _), reply in zip(pending, replies, strict=True):
            if not reply.data:  # a status instead of an ack: 503, no stream leader right now
                status = (reply.headers or {}).get("Status", "?")
                return f"the stream did not store it (status {status}: no leader or no quorum)"
            ack = json.loads(reply.data)
            if ack.get("error", {}).get("err_code") == 10071:  # wrong last sequence
                return "another writer appended to the stream"
            if "error" in ack:
                return f"refused: {ack['error'].get('description', ack['error'])}"
            if ack.get("duplicate") or ack.get("seq") != head.sseq:
                return "another writer appended to the stream"
        return None

    def _resync(self) -> None:
        """Forget what was not acknowledged and read what the stream really holds."""
        self._ledger.clear()
        for key, (ranges, _) in self._gone.items():
            for lo, hi in ranges:
                self._ledger.add(key, lo, hi)
        for h in self._heads:
            self._ledger.add((h.pubid, h.topic), h.pubseq, h.pubseq + h.size)
        try:
            if not self._nc.is_connected:  # not now: the next commit or refresh reads it
                raise StoreError("not connected")
            self._run(self._catch_up())
        except StoreError:
            self._sseq = self._heads[-1].sseq if self._heads else 0
            self._next = self._durable + 1

    # -- reading --------------------------------------------------------------
    def _locate(self, seq: int) -> int:
        """Index in _heads of the batch holding bus sequence *seq* (or the next one)."""
        i = bisect.bisect_right(self._head_seqs, seq) - 1
        if i >= 0 and self._heads[i].seq + self._heads[i].size <= seq:
            i += 1
        return max(i, 0)

    def _record(self, head: _Head, msg: Any) -> Record:
        meta = json.loads(msg.headers["Eda-Meta"])
        return Record(
            head.seq, head.size, head.stored, head.topic, int(meta["kind"]), float(meta["time"]),
            head.pubid, head.pubseq, meta["source"], meta["ext"].encode(), msg.data or b"",
        )  # fmt: skip

    def _records(
        self, start: int, end: int, matcher: Matcher | None, left: int
    ) -> Iterator[Record]:
        i = self._locate(start)
        while i < len(self._heads) and self._heads[i].seq <= end:
            heads: list[_Head] = []
            want = nbytes = 0
            while i < len(self._heads) and len(heads) < _CHUNK and self._heads[i].seq <= end:
                h = self._heads[i]
                i += 1
                if matcher is None or matcher(h.topic):
                    heads.append(h)
                    want += min(h.seq + h.size - 1, end) - max(h.seq, start) + 1
                    nbytes += h.nbytes
                    if want >= left or nbytes >= _CHUNK_BYTES:  # one fetch, one deadline
                        break
            msgs = self._run(self._fetch([h.sseq for h in heads]))
            left = max(1, left - want)  # the caller stops reading once it has enough
            for head, msg in zip(heads, msgs, strict=True):
                if msg is not None:  # else removed by retention meanwhile
                    yield self._record(head, msg)

    def seq_at(self, when: float) -> int:
        stored = [h.stored for h in self._heads]
        i = bisect.bisect_left(stored, when)
        return self._heads[i].seq if i < len(self._heads) else self._next

    def _backwards(self, pos: int) -> Iterator[Span]:
        for h in reversed(self._heads):
            if h.seq <= pos:
                yield h.seq, h.size, h.topic

    def _spans(self, first: int, last: int) -> Iterator[Span]:
        for i in range(self._locate(first), len(self._heads)):
            h = self._heads[i]
            if h.seq > last:
                return
            yield h.seq, h.size, h.topic

    # -- durable consumers (positions in the key-value bucket) -----------------
    async def _kv_get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self._kv.get(key)
        except Exception as exc:  # KeyNotFoundError / KeyDeletedError
            if "NotFound" in type(exc).__name__ or "Deleted" in type(exc).__name__:
                return None
            raise
        if not entry.value:
            return None
        value: dict[str, Any] = json.loads(entry.value)
        return value

    async def _kv_put(self, key: str, value: dict[str, Any]) -> None:
        await self._kv.put(key, json.dumps(value).encode())

    def consumer(self, name: str, patterns: Sequence[str], start: int) -> int:
        self._usable()
        check_name(name, "consumer")
        spec = self._matcher(patterns).patterns
        key = _key("c", name)
        row = self._run(self._kv_get(key))
        if row:
            if row["patterns"] != list(spec):
                self._run(self._kv_put(key, {**row, "patterns": list(spec)}))
            return int(row["next"])
        start = max(1, min(start, self._next))
        self._run(self._kv_put(key, {"name": name, "patterns": list(spec), "next": start}))
        return start

    def position(self, name: str) -> int:
        self._usable()
        row = self._run(self._kv_get(_key("c", name)))
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        return int(row["next"])

    def ack(self, name: str, seq: int) -> int:
        key = _key("c", name)
        row = self._run(self._kv_get(key))
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        if seq > self.last_seq:
            raise UsageError(f"consumer {name!r} acknowledged {seq}, beyond the last event")
        if seq + 1 > row["next"]:
            row["next"] = seq + 1
            self._run(self._kv_put(key, row))
        return int(row["next"])

    def patterns_of(self, name: str) -> tuple[str, ...] | None:
        self._usable()
        row = self._run(self._kv_get(_key("c", name)))
        return None if row is None else tuple(str(x) for x in row["patterns"])

    def move(self, name: str, seq: int) -> int:
        self._usable()
        key = _key("c", name)
        row = self._run(self._kv_get(key))
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        row["next"] = max(1, min(seq, self._next))
        self._run(self._kv_put(key, row))
        return int(row["next"])

    def drop_consumer(self, name: str) -> None:
        self._usable()
        found = False
        for key in (_key("c", name), _key("g", name)):
            if self._run(self._kv_get(key)) is not None:
                self._run(self._kv.delete(key))
                found = True
        if not found:
            raise NotFoundError(f"no durable consumer or group {name!r}")
        if _NAME_OK.fullmatch(name):
            with contextlib.suppress(StoreError):  # a group never claimed from has none
                self._run(self._js.delete_consumer(self.stream, f"eda_g_{name}"))
            self._groups.pop(name, None)
            self._held.pop(name, None)

    # -- consumer groups (JetStream durable pull consumers) --------------------
    def _group(self, group: str, patterns: Sequence[str], start: int | None) -> Matcher:
        nats_name(check_name(group, "group"), "group")
        spec = list(self._matcher(patterns).patterns)
        known = self._groups.get(group)
        if known is None:
            row = self._run(self._kv_get(_key("g", group)))
            if row is None:
                first = self._durable + 1 if start is None else max(1, min(start, self._next))
                i = self._locate(first)
                sseq = self._heads[i].sseq if i < len(self._heads) else self._sseq + 1
                self._run(self._kv_put(_key("g", group), {"name": group, "patterns": spec}))
                known = spec
            else:
                known, sseq = list(row["patterns"]), 1
            self._run(self._bind(group, known, sseq))  # the consumer, if it is not there yet
            self._groups[group] = known
        if known != spec:
            raise UsageError(f"group {group!r} has patterns {known}, not {spec}")
        return self._matcher(spec)

    async def _bind(self, group: str, patterns: list[str], sseq: int) -> None:
        durable = f"eda_g_{group}"
        try:
            await self._js.consumer_info(self.stream, durable)
        except JsNotFound:
            subject = f"{self.prefix}.{patterns[0]}" if len(patterns) == 1 else None
            config = jsapi.ConsumerConfig(
                durable_name=durable,
                deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=sseq,
                ack_policy=jsapi.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                filter_subject=subject or f"{self.prefix}.>",
                max_ack_pending=-1,
            )
            await self._js.add_consumer(self.stream, config)

    def claim(
        self, group: str, member: str, patterns: Sequence[str], limit: int, start: int | None = None
    ) -> list[Record]:
        self._usable()
        check_name(member, "member")
        matcher = self._group(group, patterns, start)
        self._touch(group)
        out: list[Record] = []
        held = self._held.setdefault(group, {}).setdefault(member, [])
        got = 0
        # a message holds one batch: ask for about as many as *limit* events fill
        avg = max(1, sum(h.size for h in self._heads[-64:]) // max(1, len(self._heads[-64:])))
        while got < limit:
            msgs = self._run(self._pull(group, max(1, min((limit - got) // avg, 256))))
            if not msgs:
                break
            for msg in msgs:
                head = self._head_of(msg.metadata.sequence.stream, msg.subject, msg.headers,
                                     msg.data)  # fmt: skip
                if head is None or not matcher(head.topic):
                    self._run(msg.ack_sync(timeout=self.deadline / 2))
                    continue
                out.append(self._record(head, msg))
                held.append(_Held(head.seq, head.seq + head.size - 1, msg, time.monotonic()))
                got += head.size
        return out

    async def _pull(self, group: str, n: int) -> list[Any]:
        """Up to *n* messages the group's consumer has now; never waits for new ones.

        A ``no_wait`` pull request: the server answers at once with what it
        has and a 404 status when that is less than *n* (nats-py's fetch
        would wait for its timeout on an idle consumer, stalling the bus).
        For a group whose consumer left one unanswered (see _NO_WAIT_ANSWER),
        the request also expires after _PULL_EXPIRES; what came by the
        deadline is all there is.
        """
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        msgs: list[Any] = []
        now = time.monotonic()
        expiring = now - self._unanswered.get(group, -_EXPIRING_FOR) < _EXPIRING_FOR
        answered = False
        try:
            request: dict[str, Any] = {"batch": n, "no_wait": True}
            if expiring:
                request["expires"] = int(min(_PULL_EXPIRES, self.deadline / 4) * 1e9)
            api = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.eda_g_{group}"
            await self._nc.publish(api, json.dumps(request).encode(), reply=inbox)
            until = now + self.deadline / 2
            first = until if expiring else now + min(_NO_WAIT_ANSWER, self.deadline / 2)
            while len(msgs) < n:
                wait = (until if msgs else first) - time.monotonic()
                msg = await sub.next_msg(timeout=max(0.001, wait))
                if not msg.data and msg.headers and "Status" in msg.headers:
                    answered = True  # 404 no messages, 408 request expired
                    break
                msgs.append(msg)
        except NatsTimeout:
            pass  # no answer: what came is what there is now (JetStream redelivers the rest)
        finally:
            await sub.unsubscribe()
        if not answered and len(msgs) < n and not expiring:
            self._unanswered[group] = time.monotonic()
        return msgs

    def _touch(self, group: str) -> None:
        """Tell JetStream that what live members hold is in progress (restarts ack_wait).

        Called on every claim and group_ack of the group, so a member that
        works longer than ``ack_wait`` does not see its messages redelivered
        to another while the bus is serving the group.
        """
        now = time.monotonic()
        stale = [
            (member, i, h)
            for member, hs in self._held.get(group, {}).items()
            for i, h in enumerate(hs)
            if now - h.since > self.ack_wait / 3
        ]
        if not stale:
            return

        async def progress() -> None:
            for _, _, h in stale:
                await self._nc.publish(h.msg.reply, b"+WPI")
            await self._nc.flush(max(1, int(self.deadline / 2)))

        self._run(progress())
        for member, i, h in stale:
            self._held[group][member][i] = h._replace(since=now)

    def group_ack(self, group: str, member: str, seq: int) -> int:
        self._group_known(group)
        self._touch(group)
        held = self._held.get(group, {}).get(member, [])
        done = [h for h in held if h.last <= seq]
        acked = self._run(self._each([h.msg.ack_sync(timeout=self.deadline / 2) for h in done]))
        unacked = {id(h) for h, ok in zip(done, acked, strict=True) if not ok}
        settled = 0
        keep: list[_Held] = []
        for h in held:
            if id(h) in unacked:  # no answer (server gone, message purged): acked again later
                keep.append(h)
                continue
            settled += max(0, min(h.last, seq) - h.first + 1)
            if h.first <= seq < h.last:
                keep.append(h._replace(first=seq + 1))
            elif seq < h.first:
                keep.append(h)
        held[:] = keep
        return settled

    def release(self, group: str, member: str) -> int:
        self._group_known(group)
        held = self._held.get(group, {}).pop(member, [])
        # each answered by the server, so the next claim sees it; one left unanswered
        # (a purged message, a server gone) is redelivered by JetStream after ack_wait
        naks = [self._nc.request(h.msg.reply, b"-NAK", timeout=self.deadline / 2) for h in held]
        self._run(self._each(naks))
        return sum(h.last - h.first + 1 for h in held)

    async def _each(self, calls: Sequence[Coroutine[Any, Any, Any]]) -> list[bool]:
        """Run *calls* concurrently (each with its own timeout); which of them succeeded."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [not isinstance(r, BaseException) for r in results]

    def held(self, group: str) -> dict[str, list[tuple[int, int]]]:
        self._group_known(group)
        return {
            m: [(h.first, h.last) for h in hs] for m, hs in self._held.get(group, {}).items() if hs
        }

    def _group_known(self, group: str) -> dict[str, Any]:
        self._usable()
        row = self._run(self._kv_get(_key("g", group)))
        if row is None:
            raise NotFoundError(f"no consumer group {group!r}")
        return row

    def refresh(self) -> int:
        """Take in what other writers (fronts) stored; the new ``durable_seq``.

        One stream info request (short timeout) when nothing of ours is
        pending, and a read of the new heads only when the stream moved.
        """
        self._usable()
        if self._pending or not self._nc.is_connected:
            return self._durable

        async def moved() -> None:
            state = (await self._js.stream_info(self.stream)).state
            first = self._heads[0].sseq if self._heads else state.first_seq
            if state.last_seq != self._sseq or (self._heads and state.first_seq > first):
                await self._catch_up()

        self._run(moved(), min(1.0, self.timeout))
        return self._durable

    # -- housekeeping ---------------------------------------------------------
    async def _stats_sources(self) -> tuple[Any, list[tuple[str, dict[str, Any], Any]]]:
        """The stream's info and every consumer's row (with its JetStream consumer's
        info for a group), asked concurrently: one deadline covers all of stats."""
        if not self._pending:
            await self._catch_up()  # what other fronts wrote, what the limits removed
        keys = [k for k in await self._keys() if k[:1] in ("c", "g")]
        info, *rows = await asyncio.gather(
            self._js.stream_info(self.stream), *(self._kv_get(k) for k in keys)
        )

        async def group_info(key: str, row: dict[str, Any] | None) -> Any:
            if row is None or not key.startswith("g"):
                return None
            return await self._js.consumer_info(self.stream, f"eda_g_{row['name']}")

        infos = await asyncio.gather(*(group_info(k, r) for k, r in zip(keys, rows, strict=True)))
        found = zip(keys, rows, infos, strict=True)
        return info, [(k, r, ci) for k, r, ci in found if r is not None]

    def stats(self) -> Stats:
        self._usable()
        info, rows = self._run(self._stats_sources())
        topics: dict[str, TopicStats] = {}
        for h in self._heads:
            t = topics.get(h.topic, TopicStats(0, 0))
            topics[h.topic] = TopicStats(t.events + h.size, t.bytes + h.nbytes)
        consumers: list[ConsumerStats] = []
        last = self.last_seq
        for key, row, ci in rows:
            m = self._matcher(row["patterns"])
            if key.startswith("c"):
                nxt = int(row["next"])
                consumers.append(ConsumerStats(row["name"], "durable", tuple(m.patterns), nxt,
                                               self._count(nxt, last, m), 0))  # fmt: skip
                continue
            delivered = ci.delivered.stream_seq if ci.delivered else 0
            i = bisect.bisect_right([h.sseq for h in self._heads], delivered)
            nxt = self._heads[i].seq if i < len(self._heads) else self._next
            held = sum(
                h.last - h.first + 1 for hs in self._held.get(row["name"], {}).values() for h in hs
            )
            lag = self._count(nxt, last, m) + held
            consumers.append(ConsumerStats(row["name"], "group", tuple(m.patterns), nxt, lag,
                                           held))  # fmt: skip
        return self._stats(topics, consumers, int(info.state.bytes))

    async def _keys(self) -> list[str]:
        try:
            keys: list[str] = await self._kv.keys()
        except Exception as exc:  # NoKeysError when the bucket is empty
            if "NoKeys" in type(exc).__name__:
                return []
            raise
        return sorted(keys)

    def _sizes(self) -> Generator[tuple[int, int, float, int], None, None]:
        for h in self._heads:
            yield h.seq, h.size, h.stored, h.nbytes

    def _stored_bytes(self) -> int:
        return sum(h.nbytes for h in self._heads)

    def _remove(self, plan: retention.Cut | None, max_age: float | None, now: float) -> None:
        if plan is None:
            return
        i = self._locate(plan.keep_from)
        sseq = self._heads[i].sseq if i < len(self._heads) else self._sseq + 1
        self._run(self._kv_put("floor", {"next": self._next}))
        self._forget(self._heads[:i])
        self._run(self._kv_put("retained", self._gone_value()))
        self._run(self._js.purge_stream(self.stream, seq=sseq))
        del self._heads[:i]
        del self._head_seqs[:i]

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._closed = True
            with contextlib.suppress(Exception):  # closing a broken connection
                self._run(self._nc.close(), self.timeout)
            self._stop()


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
            ext = codec._extension_frame(record.extensions) if record.extensions else None
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


def _implements(engine: NatsEngine) -> Engine:
    return engine  # mypy checks here that NatsEngine has every method of Engine

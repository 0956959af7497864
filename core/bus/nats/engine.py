"""The NATS JetStream engine itself: opening, writing (publish, commit, resync), retention.

The layers below it, one module each: :mod:`.state` (what they share),
:mod:`.index` (heads in memory, reads), :mod:`.setup` (stream and bucket),
:mod:`.consumers`, :mod:`.groups`, :mod:`.stats`; the rules every engine
follows the same way come from :mod:`..base`.  The design is in the package
docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ...codec import Batch
from ...errors import UsageError
from ...topics import validate_topic
from .. import retention
from ..base import DEFAULT_MAX_RANGES, FORGET_AFTER
from ..engine import Engine, Purged, Receipt, StoreError
from ..streams import DEFAULT_MAX_EVENT, MAX_SEQ, check_events
from .bridge import Bridge
from .client import nats
from .connect import NatsAuth, prepare
from .stats import StatsOf
from .wire import FORMATS, Format, _Head, cloudevent_headers, header_bytes, msg_id, nats_name

DEFAULT_STREAM: Final = "EDA"
# The longest any one call of the serving loop waits for NATS (an ack, a pull, an
# API answer): well inside a publisher's patience (eda-pub --timeout, BusPublisher's
# default 30 s without a confirmation) and eda-bus stats' 5 s, so a NATS server that
# is slow, gone or stuck costs the bus a refused round (publishers resend) or one
# error reply, never a stalled front.
SERVE_DEADLINE: Final = 2.0
# When its leader dies, a replicated stream has none until JetStream elects another
# (4 to 9 s after the last heartbeat: nats-server's Raft election timeout, not an
# option).  Meanwhile a publish is answered 503 at once, but an API request gets no
# answer at all, so a call that asked would sit out its deadline and hold the
# serving loop past the election.  Instead, while the stream seems to have no leader,
# a call first asks whether it has one again, and waits this long at most: the loop,
# which asks every round and every refresh, notices the new leader within this time.
PROBE_DEADLINE: Final = 0.25
# The longest a replicated stream goes without a leader after its leader's kill -9: the
# election timeout's 9 s plus the vote.  eda-pub --bus --confirm's default --timeout
# (and BusPublisher's) outlasts it with SERVE_DEADLINE to spare, so a failover that
# loses nothing never ends a confirmed stream with exit 4 (make bench: bus_failover).
LEADERLESS_AT_MOST: Final = 10.0
# A round of more messages than this (the cloudevents format stores one per event)
# waits for its acks as long as they keep coming, within SERVE_DEADLINE of each other:
# JetStream acknowledges a few thousand messages a second on a loaded machine.
ACKS_PER_DEADLINE: Final = 100
# Messages of the cloudevents format one commit round takes at most (see round_full)
ROUND_MESSAGES: Final = 2000
# ... those questions still unanswered (each lives until the JetStream API timeout;
# a slow answer is still taken by a later call) at most
PROBES_IN_FLIGHT: Final = 16


class NatsEngine(StatsOf):
    """eda-bus's store on a NATS JetStream stream (see the package docstring).

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
        auth: NatsAuth | None = None,
        message_format: Format | None = None,
    ) -> None:
        if nats is None:
            raise UsageError("the NATS engine needs nats-py: pip install 'eda[nats]'")
        self.stream = nats_name(stream, "stream")
        self.prefix = validate_topic(prefix)
        if replicas is not None and not 1 <= replicas <= 5:
            raise UsageError(f"invalid replicas {replicas}: JetStream allows 1 to 5")
        self._want_replicas = replicas  # None: as the stream has it (1 when created)
        if message_format is not None and message_format not in FORMATS:
            raise UsageError(f"invalid NATS message format {message_format!r}: eda or cloudevents")
        self._want_format = message_format  # None: as the stream has it (eda when created)
        self.format: Format = message_format or "eda"
        self.replicas = replicas or 1
        self.changes: list[str] = []  # what opening changed in an existing stream's config
        self.warnings: list[str] = []  # what the caller should tell its user
        super().__init__(max_event_bytes=max_event_bytes, max_ranges=max_ranges, clock=clock)
        self.ack_wait = ack_wait
        self.timeout = timeout  # opening (patient: a cluster may be electing leaders)
        self.deadline = min(deadline, timeout)  # every call once open (see SERVE_DEADLINE)
        # credentials and TLS checked before connecting; the URLs kept carry no secret
        self._plan = prepare([servers] if isinstance(servers, str) else servers, auth)
        self._servers = self._plan.servers
        self._bridge = Bridge(f"NATS stream {self.stream}", self.deadline)
        self._closed = False
        # a publish was answered 503 (no leader), or not at all: see PROBE_DEADLINE
        self._leaderless = False
        self._probes: set[asyncio.Future[Any]] = set()
        self._heads = []
        self._head_seqs = []
        self._pending = []  # heads appended, not committed yet
        self._outbox: list[tuple[str, bytes, dict[str, str]]] = []  # (their messages)
        self._acks: dict[str, asyncio.Future[Any]] = {}  # reply subject -> its publish's ack
        self._gone = {}  # see NatsState
        self._gone_for = max(2 * duplicate_window, FORGET_AFTER)
        self._groups = {}
        self._held = {}
        self._unanswered = {}
        try:
            # patient: a cluster that just lost a node elects new leaders first
            self._run(self._open(duplicate_window, max_age, max_bytes), timeout * 10)
        except BaseException:
            if hasattr(self, "_nc"):
                with contextlib.suppress(Exception):
                    self._run(self._nc.close(), self.timeout)
            self._bridge.stop()
            raise

    # -- writing --------------------------------------------------------------
    @property
    def round_full(self) -> bool:
        """In the cloudevents format, ROUND_MESSAGES appended: the bus commits them
        before it takes more (a round of a million messages would hold every
        confirmation of it until the last is acknowledged)."""
        return self.format == "cloudevents" and len(self._outbox) >= ROUND_MESSAGES

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
        if self.format == "cloudevents":  # one message per event: cut them one by one
            # ... and the ce- headers: fixed ones, and the strings percent-encoded at
            # most 3 characters per UTF-8 byte
            texts = (batch.pubid, batch.source, batch.topic, ext)
            bound += 512 + 3 * sum(len(t.encode()) for t in texts)
            check_events(batch, limit - bound, f"the NATS server's max payload of {limit} "
                         f"(less {bound} bytes of headers)")  # fmt: skip
            return 0
        if len(batch.body) + bound <= limit:
            return limit - bound
        meta = {"kind": batch.kind, "time": batch.time, "pubid": batch.pubid, "pubseq": MAX_SEQ,
                "source": batch.source, "ext": ext, "stored": -1.2345678901234567e308}  # fmt: skip
        widest = str(MAX_SEQ)
        headers = {"Eda-Seq": widest, "Eda-Count": widest, "Eda-Meta": json.dumps(meta),
                   "Nats-Msg-Id": "0" * 32, "Nats-Expected-Last-Sequence": widest}  # fmt: skip
        room = limit - header_bytes(headers)
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
        now = max(self._clock(), self._pending[-1].stored if self._pending else last_stored)
        # what the stream does not acknowledge is forgotten again by commit's
        # _resync: never confirmed
        pieces, receipts = self._ledger.plan(batches, self._next, rooms)
        for p in pieces:
            b = p.batch
            meta = {"kind": b.kind, "time": b.time, "pubid": b.pubid, "pubseq": p.pubseq,
                    "source": b.source, "ext": p.ext, "stored": now}  # fmt: skip
            self._sseq += 1
            headers = {
                "Eda-Seq": str(p.seq),
                "Eda-Count": str(p.size),
                "Eda-Meta": json.dumps(meta),
                "Nats-Msg-Id": msg_id(b.pubid, b.topic, p.pubseq),
                "Nats-Expected-Last-Sequence": str(self._sseq - 1),
            }
            if self.format == "cloudevents":
                headers.update(cloudevent_headers(p))
            head = _Head(self._sseq, p.seq, p.size, now, b.topic, b.pubid, p.pubseq, len(p.body))
            self._pending.append(head)
            self._outbox.append((f"{self.prefix}.{b.topic}", p.body, headers))
            self._next = p.seq + p.size
        if self.format == "cloudevents":  # the spans of a batch, not of its messages
            receipts = [r._replace(stored=_joined(r.stored)) for r in receipts]
        return receipts

    async def _store(
        self, msgs: list[tuple[str, bytes, dict[str, str]]], heads: list[_Head]
    ) -> str | None:
        """Publish *msgs* in order, then wait for their acks (:meth:`_settle`); after a
        failure no ack is awaited any more."""
        futures: list[asyncio.Future[Any]] = []
        try:
            await self._publish(msgs, futures)
            failure = await self._settle(list(zip(heads, futures, strict=True)))
        except BaseException:  # nats-py failed, or the caller's deadline cancelled it
            self._acks.clear()
            raise
        if failure is not None:
            self._acks.clear()
        return failure

    async def _publish(
        self, msgs: list[tuple[str, bytes, dict[str, str]]], futures: list[asyncio.Future[Any]]
    ) -> None:
        """Send *msgs* in order without waiting for their acks; one future per message
        sent, appended to *futures*."""
        if not hasattr(self, "_inbox"):
            self._inbox = self._nc.new_inbox()
            self._ackn = 0

            async def on_ack(msg: Any) -> None:
                fut = self._acks.pop(msg.subject, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

            await self._nc.subscribe(f"{self._inbox}.*", cb=on_ack)
        for subject, data, headers in msgs:
            self._ackn += 1
            reply = f"{self._inbox}.{self._ackn}"
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._acks[reply] = fut
            await self._nc.publish(subject, data, reply=reply, headers=headers)
            futures.append(fut)

    def commit(self) -> int:
        self._usable()
        if not self._pending:
            return self._durable
        pending, self._pending = self._pending, []
        outbox, self._outbox = self._outbox, []
        # the cloudevents format's round is a message per event: it may take longer,
        # as long as acks keep coming (see _acked)
        most = self.deadline * max(1.0, len(outbox) / ACKS_PER_DEADLINE)
        try:  # the round's messages go out together: one call to the loop, one flush
            failure = self._run(self._store(outbox, pending), most)
        except StoreError as exc:
            failure = str(exc)
        if failure is None:
            for head in pending:
                self._add_head_indexed(head)
            self._ledger.fresh.clear()
            self._durable = self._next - 1
            return self._durable
        self._resync()
        raise StoreError(
            f"NATS stream {self.stream}: {failure}; nothing after sequence {self._durable} is "
            f"confirmed: the publishers resend it"
        )

    async def _disconnected(self) -> None:
        """nats-py lost its connection (it reconnects, to another server of the cluster
        when that one is gone): an ack for a message sent on the old connection will not
        come, so the commit waiting for it fails now rather than at its deadline (the
        publishers resend; JetStream drops what was stored after all by its Msg-Id)."""
        for fut in self._acks.values():
            if not fut.done():
                fut.set_result(None)
        self._acks.clear()

    def _add_head_indexed(self, head: _Head) -> None:
        self._heads.append(head)
        self._head_seqs.append(head.seq)

    async def _settle(self, pending: list[tuple[_Head, asyncio.Future[Any]]]) -> str | None:
        """Wait for every ack; None when each message was stored where it was meant to be."""
        try:
            futures = [f for _, f in pending]
            if len(futures) <= ACKS_PER_DEADLINE:
                replies = await asyncio.wait_for(asyncio.gather(*futures), self.deadline * 0.9)
            else:
                replies = await self._acked(futures)
        except TimeoutError:
            for _, f in pending:
                f.cancel()
            self._leaderless = True
            return "the stream did not acknowledge in time"
        for (head, _), reply in zip(pending, replies, strict=True):
            if reply is None:  # (see _disconnected)
                self._leaderless = True
                return "the connection to NATS broke before the stream acknowledged"
            if not reply.data:  # a status instead of an ack: 503, no stream leader right now
                self._leaderless = True
                status = (reply.headers or {}).get("Status", "?")
                return f"the stream did not store it (status {status}: no leader or no quorum)"
            self._leaderless = False  # its leader answered
            ack = json.loads(reply.data)
            if ack.get("error", {}).get("err_code") == 10071:  # wrong last sequence
                return "another writer appended to the stream"
            if "error" in ack:
                return f"refused: {ack['error'].get('description', ack['error'])}"
            if ack.get("duplicate") or ack.get("seq") != head.sseq:
                return "another writer appended to the stream"
        return None

    async def _acked(self, futures: list[asyncio.Future[Any]]) -> list[Any]:
        """The acks of a round of many messages (the cloudevents format: one per event),
        in order; TimeoutError once none came for the deadline (a stall, not the work)."""
        for fut in futures:
            if not fut.done():
                await asyncio.wait_for(asyncio.shield(fut), self.deadline * 0.9)
        return [fut.result() for fut in futures]

    def _resync(self) -> None:
        """Forget what was not acknowledged and read what the stream really holds."""
        self._ledger.clear()
        for key, (ranges, _) in self._gone.items():
            for lo, hi in ranges:
                self._ledger.add(key, lo, hi)
        for h in self._heads:
            self._ledger.add((h.pubid, h.topic), h.pubseq, h.pubseq + h.size)
        try:
            if not self._nc.is_connected or not self._has_leader():
                raise StoreError("not now")  # the next commit or refresh reads it
            self._run(self._catch_up())
        except StoreError:  # cut off: what was read so far (refresh reads the rest)
            # what the stream holds beyond is found by the next publish: its expected
            # last sequence is refused (10071) and the resync after that reads it
            self._took_in(self._heads[-1].sseq if self._heads else 0, self._durable + 1)

    def _has_leader(self) -> bool:
        """False while the stream seems to have no leader (a publish was answered 503 or
        not at all) and :meth:`_probe` finds none within PROBE_DEADLINE."""
        if self._leaderless:
            with contextlib.suppress(StoreError):  # no answer yet: still in flight
                self._leaderless = not self._run(self._probe(), PROBE_DEADLINE)
        return not self._leaderless

    async def _probe(self) -> bool:
        """Whether the stream has a leader: the first answer to this call's stream info
        request or to one an earlier call left in flight."""
        if len(self._probes) < PROBES_IN_FLIGHT:
            asking = asyncio.ensure_future(self._js.stream_info(self.stream))
            asking.add_done_callback(_answered)  # (also when no call takes the answer)
            self._probes.add(asking)
        while self._probes:
            done, _ = await asyncio.wait(self._probes, return_when=asyncio.FIRST_COMPLETED)
            self._probes -= done
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    cluster = task.result().cluster  # None: one server, its own leader
                    if cluster is None or cluster.leader:
                        return True
        return False

    def refresh(self) -> int:
        """Take in what other writers (fronts) stored; the new ``durable_seq``.

        One stream info request (short timeout) when nothing of ours is
        pending, and a read of the new heads only when the stream moved.
        """
        self._usable()
        if self._pending or not self._nc.is_connected or not self._has_leader():
            return self._durable

        async def moved() -> None:
            state = (await self._js.stream_info(self.stream)).state
            first = self._heads[0].sseq if self._heads else state.first_seq
            if state.last_seq != self._sseq or (self._heads and state.first_seq > first):
                await self._catch_up()

        self._run(moved(), min(1.0, self.timeout))
        return self._durable

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

    def purge(self, pattern: str) -> Purged:
        """Refused: every front of the stream indexes it in memory assuming only its
        oldest messages ever leave it (retention), so a subject purge in the middle
        would leave the other fronts reading messages that are gone."""
        raise UsageError(
            f"cannot purge {pattern!r}: the NATS engine only removes the oldest events "
            "(eda-bus retain); purge one topic with the embedded engine"
        )

    def _release(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection
            self._run(self._nc.close(), self.timeout)
        self._bridge.stop()


def _joined(spans: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, int, int], ...]:
    """Stored spans (publisher sequence, bus sequence, count) with adjacent ones joined."""
    out: list[tuple[int, int, int]] = []
    for pubseq, seq, count in spans:
        if out and out[-1][0] + out[-1][2] == pubseq and out[-1][1] + out[-1][2] == seq:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + count)
        else:
            out.append((pubseq, seq, count))
    return tuple(out)


def _answered(task: asyncio.Future[Any]) -> None:
    """A probe's answer is taken or not: a failed one is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _implements(engine: NatsEngine) -> Engine:
    return engine  # mypy checks here that NatsEngine has every method of Engine

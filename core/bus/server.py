"""The eda-bus daemon: confirmed publishing into an engine, replay and live delivery out of it.

One ROUTER socket serves every client (:mod:`.protocol`).  The loop, per round:

* take in a bounded batch of messages; publish batches are checked
  (:func:`eda.core.codec.decode`) and appended; requests answered;
* commit once (group commit: one fsync covers every batch of the round) and
  only then confirm the batches it covered; any other commit or write of the
  round that fails (a subscription's, an ack's...) refuses (retry) at once the
  batches its rollback took;
* pump the subscriptions: each reads from the engine, from its own cursor,
  at most as many events as its credit allows.  Replay and live delivery are
  the same path (live is a replay that caught up), so the switch from one to
  the other can neither skip nor repeat an event, and a slow subscriber only
  lags on disk: the bus holds no events for it in memory.

A subscriber grants credit (events) as it writes events out, heartbeats every
:data:`~.protocol.HEARTBEAT` seconds, and is dropped after
:data:`~.protocol.GONE_AFTER` seconds of silence; a dropped group member's
unacknowledged events go to the other members.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import codec
from ..daemon import DRAIN_LIMIT, Daemon, Log, port_of, received
from ..errors import EdaError, ProtocolError, UsageError
from ..limits import QueuedBytes, raise_fd_limit
from ..reqrep import check_rid, decode_request, encode, error_reply, request_id, split_envelope
from ..topics import Matcher, validate_pattern
from . import protocol as p
from .engine import Engine, EventTooLargeError, Record, StoreError
from .streams import MAX_SEQ, check_publisher

PUMP_EVENTS = 1 << 16  # events one subscription is sent per round, at most
SEND_HWM = 256  # messages queued per client on the ROUTER
MAX_SUBSCRIPTIONS = 4096  # live subscriptions (a silent one is dropped after GONE_AFTER)
HANDSHAKE_MS = 5000  # a connection that has not completed the ZMTP greeting by then is closed
FD_RESERVE = 64  # descriptors kept for the store, discovery and the sockets of the bus itself
CUT_AFTER = p.GONE_AFTER  # s a subscriber at its queued-bytes bound may go without taking any
LIE_AFTER = 2 * p.HEARTBEAT  # s of a full queue after which granting credit is a lie
ADMIN_OPS = frozenset({"retain", "drop"})  # ops only a client on the bus's own host may ask for
REPLY_OPS = frozenset({"stats", "retain", "drop"})  # one reply each: a REQ socket may ask them


@dataclass
class Connection:
    """The TCP connection a client's requests come from (to cut it off)."""

    fd: int
    peer: Any  # getpeername() when first seen: a reused descriptor is not cut by mistake


@dataclass
class Subscription:
    ident: bytes
    matcher: Matcher
    cursor: int
    credit: int
    seen: float
    durable: str | None = None
    group: str | None = None
    member: str = ""
    start: int | None = None
    blocked: bool = False
    sent: int = 0
    backlog: list[Record] = field(default_factory=list)  # group: claimed, not sent yet
    conn: Connection | None = None
    waiting: float | None = None  # since when its queued-bytes bound holds events back
    stalled: float | None = None  # since when its queue (SEND_HWM messages) has been full
    credited: float = 0.0  # when it last granted credit
    max_pending: int | None = None  # group: events held (claimed, not acknowledged) at most
    pending: int = 0  # group: events claimed for this member and not acknowledged yet


@dataclass
class Settings:
    bind: str = "tcp://*:0"
    max_age: float | None = None
    max_bytes: int | None = None
    retain_every: float = 60.0
    mdns: bool = True
    name: str = ""
    max_connections: int = 0  # 0: as many as the descriptor limit allows
    client_bytes: int = 64 << 20  # queued for one client (JetStream cuts a slow consumer there)
    queued_bytes: int = 512 << 20  # queued for all clients together
    port_file: str | None = None  # where the port is remembered across restarts


class BusServer(Daemon):
    """Serves one engine on one ROUTER socket."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        log: Log = lambda _m: None,
        warn: Log | None = None,
        interface: str | None = None,
        max_message: int = 4 << 20,
    ) -> None:
        super().__init__(log, warn, interface=interface)
        self.engine = engine
        self.settings = settings
        self.sock = self.socket(zmq.ROUTER, max_message=max_message)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        self.max_connections = settings.max_connections or max(16, raise_fd_limit() - FD_RESERVE)
        self.connections: set[int] = set()
        self._watch_connections()
        self.endpoint = self.bind_remembered(self.sock, settings.bind, settings.port_file)
        self.queued = QueuedBytes(settings.client_bytes, settings.queued_bytes)
        self._sender: zmq.Frame | None = None  # a frame of the message being handled
        self._own: set[str] = set()
        self.cut = 0  # subscribers cut off for not reading
        self.subs: dict[bytes, Subscription] = {}
        self.confirmed = 0
        self._waiting: list[tuple[bytes, int, int]] = []  # (client, tag, confirm_at) this round
        self._safe = 0  # durable_seq after the round's last message that did not fail
        self.refused = 0
        self._durable = engine.durable_seq
        self._groups_dirty = True
        self.watch(self.sock, "clients", self.drain)
        self.every(0.05, "delivery", self._retry)
        self.every(1.0, "heartbeats", self._check_gone)
        if engine.shared:  # a shared store (NATS): other fronts write to it too
            self.every(0.2, "others' writes", self._refresh)
        if settings.max_age is not None or settings.max_bytes is not None:
            self.every(settings.retain_every, "retention", self._retain, first=0.0)
        self._releasing: Any = None
        self._try_release_all()

    def _try_release_all(self) -> None:
        """:meth:`_release_all`, retried every 2 s while the store cannot answer yet
        (a JetStream cluster electing leaders after losing a node): the bus serves
        meanwhile, and what dead members held waits for the release."""
        try:
            self._release_all()
        except StoreError as exc:
            if self._releasing is None:
                self.warn(f"warning: group members' events not released yet ({exc}); retrying")
                self._releasing = self.every(2.0, "release", self._try_release_all, first=2.0)
            return
        if self._releasing is not None:
            self._releasing.cancel()
            self._releasing = None
            self.log("group members' events released")

    def _refresh(self) -> None:
        """Deliver what other fronts of a shared store stored (the store tells its durable_seq)."""
        try:
            durable = self.engine.refresh()
        except StoreError:
            return  # unreachable for now: publishing and stats report it
        if durable != self._durable:
            self._durable = durable
            self._groups_dirty = True
            self.pump()

    @property
    def port(self) -> int:
        return port_of(self.endpoint)

    def start(self) -> None:
        if self.settings.mdns:
            name = self.settings.name or f"bus-{self.port}"
            self.announce(
                p.BUS_TYPE,
                name,
                self.port,
                [f"id={name}", f"v={codec.VERSION}"],
                on_ready=lambda: self.log(f"announced bus {name} by mDNS"),
            )

    def _release_all(self) -> None:
        """After a restart no group member is live: what they held goes to the next claims."""
        for consumer in self.engine.stats().consumers:
            if consumer.kind == "group":
                for member in self.engine.held(consumer.name):
                    if member:
                        self.engine.release(consumer.name, member)
        self.engine.commit()

    # -- input -------------------------------------------------------------------
    def drain(self) -> None:
        """One round: take in a bounded batch of messages, commit, confirm, pump.

        A confirmation only ever follows the commit that covers it.  Each batch
        appended this round waits in :attr:`_waiting` with the bus sequence that
        must be durable first; whatever else shares the round (a subscription's
        commit, an ack, a retention pass, a release) may fail and roll the open
        transaction back, and then the batches it took with it are refused
        (retry) at once (:meth:`_rolled_back`).  Each message is handled on its
        own: whatever one raises, the others' work goes on.
        """
        self._waiting = []
        self._safe = self.engine.durable_seq
        for frames in self._incoming():  # each noting where it came from
            self.guarded("message", self._take, frames)
            self._safe = self.engine.durable_seq
        waiting, self._waiting = self._waiting, []
        try:
            durable = self.engine.commit()
        except StoreError as exc:
            self.limited("commit", f"commit failed: {exc}")
            self._answer(waiting, self._safe, exc)
            return
        if durable != self._durable:
            self._durable = durable
            self._groups_dirty = True
        self._answer(waiting, durable, StoreError("the batch was not covered by a commit"))
        self.pump()

    def _commit(self) -> int:
        """Commit mid-round (a request's own writes): the batches it made durable are
        safe from a rollback later in the round, even within the same message."""
        durable = self.engine.commit()
        self._safe = max(self._safe, durable)
        return durable

    def _take(self, frames: list[bytes]) -> None:
        envelope, body = split_envelope(frames, (p.PUBLISH, p.REQUEST))
        if not body:
            return
        ident, route, kind = envelope[0], envelope[1:], body[0]
        if route:  # a REQ socket: one request, one reply, nothing streamed
            if kind == p.REQUEST:
                self._request(ident, body[1:], route)
            else:
                exc = ProtocolError("a REQ socket may only send requests")
                self.dropped("message", exc)
                self._send(ident, [p.ANSWER, encode(error_reply(None, exc))], route)
        elif kind == p.PUBLISH:
            self._publish(ident, body[1:])
        elif kind == p.REQUEST:
            self._request(ident, body[1:])
        else:
            self.dropped("message", ProtocolError(f"unknown message kind {kind[:8]!r}"))

    def _answer(self, waiting: list[tuple[bytes, int, int]], durable: int, exc: Exception) -> None:
        """Confirm the batches *durable* covers; refuse (retry) the others."""
        confirms: dict[bytes, list[int]] = {}
        for ident, tag, confirm_at in waiting:
            if confirm_at <= durable:
                confirms.setdefault(ident, []).append(tag)
            else:
                self._refuse(ident, tag, exc, retry=True)
        for ident, tags in confirms.items():
            self.confirmed += len(tags)
            self._send(ident, [p.CONFIRM, p.pack_tags(tags)])

    def _rolled_back(self, exc: StoreError) -> None:
        """The store failed mid-round and rolled back what was not committed: refuse
        (retry) the batches waiting that no commit covered before this message (the
        store's ``durable_seq`` after a failure may count others' writes: a shared
        NATS stream re-read).  Done at once, so a later append that reuses their bus
        sequences cannot be taken for them."""
        kept = []
        for ident, tag, confirm_at in self._waiting:
            if confirm_at <= self._safe:
                kept.append((ident, tag, confirm_at))
            else:
                self._refuse(ident, tag, exc, retry=True)
        self._waiting = kept

    def _publish(self, ident: bytes, frames: list[bytes]) -> None:
        if len(frames) < 4 or len(frames[0]) != 8:
            self.dropped("publish", ProtocolError("publish message without tag and batch"))
            return
        (tag,) = p.TAG.unpack(frames[0])
        try:
            batch = codec.decode(frames[1:])
            check_publisher(batch.pubid)
            (receipt,) = self.engine.append([batch])
        except (codec.WireError, EventTooLargeError, UsageError) as exc:
            self.dropped("batch", exc)
            self._refuse(ident, tag, exc, retry=False)
            return
        except StoreError as exc:  # full disk, I/O: what this round appended was rolled back
            self.limited("store", f"cannot store: {exc}")
            self._rolled_back(exc)
            self._refuse(ident, tag, exc, retry=True)
            return
        except Exception as exc:  # a bug: say so, refuse this batch, serve the others
            self.failures += 1
            self.limited("publish", f"publish failed: {type(exc).__name__}: {exc}"[:300])
            self._refuse(ident, tag, EdaError("the bus failed to store the batch"), retry=False)
            return
        self._waiting.append((ident, tag, receipt.confirm_at))

    def _refuse(self, ident: bytes, tag: int, exc: Exception, *, retry: bool) -> None:
        self.refused += 1
        code = exc.exit_code if isinstance(exc, EdaError) else 1
        body = encode({"error": str(exc)[:300], "code": code, "retry": retry})
        self._send(ident, [p.REFUSED, p.TAG.pack(tag), body])

    def _send(self, ident: bytes, frames: list[bytes], route: Sequence[bytes] = ()) -> bool:
        """Send to one client without ever blocking; False when its queue is full or it is gone.

        *route* is the rest of a REQ client's envelope (up to its empty delimiter).
        """
        try:
            self.sock.send_multipart([ident, *route, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _request(self, ident: bytes, frames: list[bytes], route: Sequence[bytes] = ()) -> None:
        """Answer a request; *route*: from a REQ socket (see :meth:`_send`), which
        can only make requests that get one reply (no subscription)."""
        rid = None
        try:
            if len(frames) != 1:
                raise ProtocolError("malformed request: expected one frame")
            msg = decode_request(frames[0], p.OPS)
            check_rid(msg)
            rid = request_id(msg)
            if route and msg["op"] not in REPLY_OPS:
                raise ProtocolError(f"a REQ socket cannot {msg['op']!r}: subscribe from a DEALER")
            reply = self._handle(ident, msg)
        except (ProtocolError, UsageError) as exc:
            self.dropped("request", exc)
            reply = error_reply(rid, exc)
        except StoreError as exc:  # its commit (or write) failed: the round's batches with it
            self.limited("store", f"request failed: {exc}")
            self._rolled_back(exc)
            reply = error_reply(rid, exc)
        except EdaError as exc:
            reply = error_reply(rid, exc)
        except Exception as exc:  # a bug: say so, answer, serve the others
            self.failures += 1
            self.limited("request", f"request failed: {type(exc).__name__}: {exc}"[:300])
            reply = error_reply(rid, EdaError("the bus failed to handle the request"))
        if reply is None:
            return
        reply.setdefault("ok", True)
        reply["rid"] = rid
        self._send(ident, [p.ANSWER, encode(reply)], route)

    def _handle(self, ident: bytes, msg: dict[str, Any]) -> dict[str, Any] | None:
        op = msg["op"]
        if op == "sub":
            return self._subscribe(ident, msg)
        if op == "stats":
            return {"stats": _stats_json(self.engine)}
        if op in ADMIN_OPS and not self._from_own_host():
            raise EdaError(f"{op} is only accepted from the bus's own host; run it there")
        if op == "retain":
            age, size = _number(msg, "max_age"), _number(msg, "max_bytes")
            done = self.engine.retain(age, None if size is None else int(size))
            self._commit()
            return {"events": done.events, "bytes": done.bytes, "first_seq": done.first_seq}
        if op == "drop":
            return self._drop_consumer(msg)
        sub = self.subs.get(ident)
        if sub is None:  # restarted bus, or cut off: the client subscribes again
            if op != "bye":
                self._send(ident, [p.UNKNOWN, encode({"error": "unknown subscription"})])
            return None
        sub.seen = time.monotonic()
        sub.conn = self._connection(sub.conn)
        if op == "credit":
            n = _integer(msg.get("n"), "credit")
            sub.credit = min(sub.credit + n, p.MAX_CREDIT)
            if n:
                self.queued.release(ident, n)
                sub.credited = time.monotonic()
            sub.blocked = False
            self._groups_dirty = self._groups_dirty or sub.group is not None
        elif op == "ack":
            seq = _integer(msg.get("seq"), "ack seq")
            if sub.durable is not None:
                self.engine.ack(sub.durable, min(seq, self._durable))
            elif sub.group is not None:
                settled = self.engine.group_ack(sub.group, sub.member, seq)
                sub.pending = max(0, sub.pending - settled)
                self._groups_dirty = True  # room for the next claim, under max_pending
        elif op == "bye":
            self._drop(ident)
        return None

    def _drop_consumer(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Delete a durable consumer or a group nobody is subscribed as (admin)."""
        name = _name(msg, "name")
        if name is None:
            raise ProtocolError("drop needs a name")
        live = sum(1 for s in self.subs.values() if name in (s.durable, s.group))
        if live:
            raise EdaError(f"{name!r} has {live} live subscriber(s); stop them first")
        self.engine.drop_consumer(name)
        self._commit()
        self.log(f"consumer {name!r} deleted")
        return {"deleted": name}

    def _subscribe(self, ident: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        patterns = msg.get("patterns")
        if (
            not isinstance(patterns, list)
            or not 0 < len(patterns) <= p.MAX_PATTERNS
            or not all(isinstance(x, str) for x in patterns)
        ):
            raise ProtocolError(f"patterns must be a list of 1 to {p.MAX_PATTERNS} strings")
        for pattern in patterns:
            validate_pattern(pattern)
        matcher = Matcher(patterns)
        durable, group = _name(msg, "durable"), _name(msg, "group")
        reset = msg.get("reset", False)
        if not isinstance(reset, bool):
            raise ProtocolError("reset must be true or false")
        given = msg.get("from")
        if reset:
            if durable is None or given is None:
                raise UsageError("reset moves a durable consumer: give durable and from")
            if not self._from_own_host():
                raise EdaError("moving a durable consumer is only accepted from the bus's own host")
            others = sum(1 for i, s in self.subs.items() if s.durable == durable and i != ident)
            if others:
                raise EdaError(f"{durable!r} has {others} live subscriber(s); stop them first")
        spec = "start" if given is None and durable is not None else given
        # (a new durable consumer gets everything stored, as JetStream's)
        start = self._start(spec, matcher)
        old = None if durable is None else self.engine.patterns_of(durable)
        credit = _integer(msg.get("credit", 0), "credit")
        pending = msg.get("pending")
        if pending is not None and not 0 < _integer(pending, "pending") <= p.MAX_CREDIT:
            raise ProtocolError(f"pending must be an integer from 1 to {p.MAX_CREDIT}")
        if ident in self.subs:
            self._drop(ident, resubscribing=True)
        elif len(self.subs) >= MAX_SUBSCRIPTIONS:
            raise EdaError(f"too many subscriptions ({MAX_SUBSCRIPTIONS}); try again later")
        sub = Subscription(ident, matcher, 0, min(credit, p.MAX_CREDIT), time.monotonic())
        sub.conn, sub.credited = self._connection(None), sub.seen
        if durable is not None:
            sub.durable = durable
            sub.cursor = self.engine.consumer(durable, patterns, start)
            if reset and sub.cursor != start:
                sub.cursor = self.engine.move(durable, start)
        elif group is not None:
            member = _name(msg, "member") or ident.hex()
            sub.group, sub.member, sub.start = group, member, start
            sub.max_pending = pending
            # creates the group, or refuses now a member whose patterns are not the group's
            self.engine.claim(group, member, patterns, 0, start)
            sub.cursor = start
        else:
            sub.cursor = start
        self._commit()
        self.subs[ident] = sub
        self._groups_dirty = True
        self.log(f"subscription {ident.hex()} {patterns} from {sub.cursor}")
        reply: dict[str, Any] = {"from": sub.cursor, "last": self._durable}
        if old is not None and not reset:  # it resumed: what the client asked may not hold
            reply["resumed"] = {"patterns": list(old), "asked_from": given is not None}
        return reply

    def _start(self, spec: Any, matcher: Matcher) -> int:
        engine = self.engine
        if spec is None or spec == "live":
            return self._durable + 1
        if spec == "start":
            return engine.first_seq
        if isinstance(spec, dict) and len(spec) == 1:
            ((key, value),) = spec.items()
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ProtocolError("from: a number is needed")
            if key == "seq":
                return max(_integer(value, "from seq"), 1)
            if key == "time" and 0 <= value < codec.MAX_TIME:
                return engine.seq_at(float(value))
            if key == "last":
                return engine.seq_for_last(_integer(value, "from last"), matcher)
        raise ProtocolError("from: use 'start', 'live', {seq: N}, {time: T} or {last: N}")

    # -- delivery ----------------------------------------------------------------
    def pump(self) -> None:
        if not self.subs:
            return
        durable = self._durable
        groups_dirty, self._groups_dirty = self._groups_dirty, False
        first = None
        for sub in list(self.subs.values()):
            if sub.credit <= 0 or sub.blocked:
                continue
            if sub.group is not None:
                if groups_dirty:
                    self._pump_member(sub)
                continue
            if sub.cursor > durable:
                continue
            if first is None:
                first = self.engine.first_seq
            if sub.cursor < first:
                self._send(sub.ident, [p.LOST, encode({"lost": first - sub.cursor})])
                sub.cursor = first
            self._pump(sub, durable)

    def _pump(self, sub: Subscription, durable: int) -> None:
        limit = min(sub.credit, PUMP_EVENTS)
        sent = 0
        for record in self.engine.read(sub.cursor, durable, sub.matcher, limit):
            if not self._deliver(sub, record):
                sub.blocked = True
                return
            sent += record.size
            sub.cursor = record.seq + record.size
        if sent < limit:
            sub.cursor = durable + 1  # nothing else matching up to there

    def _pump_member(self, sub: Subscription) -> None:
        assert sub.group is not None
        if not sub.backlog:
            limit = min(sub.credit, PUMP_EVENTS)
            if sub.max_pending is not None:
                limit = min(limit, sub.max_pending - sub.pending)
                if limit <= 0:
                    return  # it holds its max: its next ack makes room
            try:
                sub.backlog = self.engine.claim(
                    sub.group, sub.member, sub.matcher.patterns, limit, sub.start
                )
                sub.pending += sum(r.size for r in sub.backlog)
            except StoreError as exc:  # not now: the next round (or retry) claims again
                self.limited("claim", f"group {sub.group}: cannot hand out events: {exc}")
                self._groups_dirty = True
                return
            except EdaError as exc:  # this member's own fault: it alone is dropped
                self.dropped("subscription", exc)
                self._drop(sub.ident)
                return
            sub.backlog.reverse()
        if sub.backlog:
            self._groups_dirty = True  # more may be waiting
        while sub.backlog:
            # claimed, so held by this member: sent now, or when its queue has room
            if not self._deliver(sub, sub.backlog[-1]):
                sub.blocked = True
                return
            sub.backlog.pop()

    def _deliver(self, sub: Subscription, record: Record) -> bool:
        header = codec.encode_header(
            record.kind, record.size, record.pubseq, record.time,
            codec.encode_origin(record.pubid, record.source),
        )  # fmt: skip
        frames = [p.DELIVER, p.TAG.pack(record.seq), record.topic.encode(), header, record.body]
        if record.extensions:
            frames.append(record.extensions)
        size = sum(map(len, frames))
        if not self.queued.room(sub.ident, size):
            if sub.waiting is None:
                sub.waiting = time.monotonic()
            return False
        if not self._send(sub.ident, frames):
            if sub.stalled is None:
                sub.stalled = time.monotonic()
            return False
        sub.waiting = sub.stalled = None
        self.queued.add(sub.ident, record.size, size)
        sub.credit -= record.size
        sub.sent += record.size
        return True

    def _retry(self) -> None:
        """Try again the subscriptions whose queue was full (it may have room now)."""
        for sub in self.subs.values():
            if sub.blocked:
                sub.blocked = False
                self._groups_dirty = self._groups_dirty or sub.group is not None
        self.pump()

    def _check_gone(self) -> None:
        now = time.monotonic()
        for ident, sub in list(self.subs.items()):
            if now - sub.seen > p.GONE_AFTER:
                self.log(f"subscription {ident.hex()} silent for {p.GONE_AFTER:g}s: dropped")
                self._drop(ident)
            elif sub.waiting is not None and now - max(sub.waiting, sub.credited) > CUT_AFTER:
                held = self.queued.held(ident)
                self._cut_off(sub, f"{held} bytes queued and none taken for {CUT_AFTER:g}s "
                              f"(at most {self.settings.client_bytes} per client)")  # fmt: skip
            elif sub.stalled is not None and sub.credited - sub.stalled > LIE_AFTER:
                # its queue has had no room for seconds: it read nothing, yet says it took events
                self._cut_off(sub, "it grants credit for events it does not take")

    def _cut_off(self, sub: Subscription, reason: str) -> None:
        """A subscriber that does not take what is queued for it: told, dropped, hung up on.

        Hanging up frees what its connection queued; it may connect and
        subscribe again (a durable or plain one resumes where it was).
        """
        why = f"cut off: {reason}; read faster and subscribe again"
        self.cut += 1
        self.limited("cut", f"subscriber {sub.ident.hex()} {why}")
        self._send(sub.ident, [p.UNKNOWN, encode({"error": why})])
        self._drop(sub.ident, hang_up=True)

    def _drop(self, ident: bytes, *, resubscribing: bool = False, hang_up: bool = False) -> None:
        """End a subscription.  What is queued for it stays counted while the client
        subscribes again on the same connection; else its connection is hung up on
        (which frees what is queued) when something is queued or *hang_up* says so."""
        sub = self.subs.pop(ident, None)
        if not resubscribing:
            if sub is not None and (hang_up or self.queued.held(ident)):
                self._hang_up(sub.conn)
            self.queued.forget(ident)
        if sub is not None and sub.group is not None:
            self.engine.release(sub.group, sub.member)
            self._commit()
            self._groups_dirty = True

    # -- clients' connections ------------------------------------------------------
    def _incoming(self) -> Iterator[list[bytes]]:
        """The messages waiting (as :func:`~eda.core.daemon.received`), each noting
        in :attr:`_sender` the frame that tells where it came from."""
        sock = self.sock
        for _ in range(DRAIN_LIMIT):
            try:
                frames = [sock.recv(zmq.NOBLOCK)]
            except zmq.Again:
                return
            if sock.getsockopt(zmq.RCVMORE):
                kind = sock.recv(copy=False)
                self._sender = kind  # the routing id frame carries no properties
                frames.append(kind.bytes)
                while sock.getsockopt(zmq.RCVMORE):
                    frames.append(sock.recv())
            yield frames
            self._sender = None

    def _connection(self, known: Connection | None) -> Connection | None:
        """The connection the message being handled came from (*known* if the same)."""
        try:
            fd = int(self._sender.get(zmq.SRCFD)) if self._sender is not None else -1
        except zmq.ZMQError:
            fd = -1
        if fd < 0:
            return known
        if known is not None and known.fd == fd:
            return known
        return Connection(fd, _peer_of(fd))

    def _hang_up(self, conn: Connection | None) -> None:
        """Close a client's connection (libzmq frees what it queued for it)."""
        if conn is not None and conn.peer is not None and _peer_of(conn.fd) == conn.peer:
            _shutdown(conn.fd)

    def _from_own_host(self) -> bool:
        """Whether the request being handled came from this host (loopback or one of its
        addresses); a transport without addresses (ipc, inproc) is this host's."""
        if self._sender is None:
            return True
        try:
            address = str(self._sender.get("Peer-Address"))
        except zmq.ZMQError:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or str(ip) in self._own:
            return True
        self._own = _own_addresses()  # addresses change (DHCP): read again before refusing
        return str(ip) in self._own

    def _watch_connections(self) -> None:
        """Count TCP connections (socket monitor); beyond :attr:`max_connections` a new
        one is closed at once, so idle connections cannot take every descriptor."""
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        self._monitor = self.sock.get_monitor_socket(events)
        self._sockets.append(self._monitor)
        self.watch(self._monitor, "connections", self._connection_events)

    def _connection_events(self) -> None:
        for frames in received(self._monitor):
            event = parse_monitor_message(frames)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                if len(self.connections) >= self.max_connections:
                    self.limited("connections", f"too many connections ({self.max_connections})"
                                 "; closing new ones")  # fmt: skip
                    _shutdown(fd)
                else:
                    self.connections.add(fd)
            else:
                self.connections.discard(fd)

    def _retain(self) -> None:
        done = self.engine.retain(self.settings.max_age, self.settings.max_bytes)
        self._commit()
        if done.events:
            self.log(f"retention removed {done.events} event(s), {done.bytes} bytes")

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError, AttributeError):
            self.sock.disable_monitor()
        super().close()
        with contextlib.suppress(StoreError):
            self.engine.close()


def _integer(value: Any, what: str) -> int:
    """*value* if it is an integer in the range of bus sequences and counts, [0, 2**63 - 1]
    (what SQLite stores), else :class:`ProtocolError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ProtocolError(f"{what} must be an integer from 0 to {MAX_SEQ}")
    return value


def _peer_of(fd: int) -> Any:
    """The peer address of connected socket *fd*, or None."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.getpeername()
    except OSError:
        return None


def _shutdown(fd: int) -> None:
    """End the connection on *fd* without closing the descriptor libzmq owns."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _own_addresses() -> set[str]:
    import ifaddr

    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.add(ip.ip if isinstance(ip.ip, str) else ip.ip[0].split("%")[0])
    return found


def _name(msg: dict[str, Any], key: str) -> str | None:
    value = msg.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 255 or not value.isprintable():
        raise ProtocolError(f"{key} must be a printable name of 1 to 255 characters")
    return value


def _number(msg: dict[str, Any], key: str) -> float | None:
    value = msg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e18:
        raise ProtocolError(f"{key} must be a non-negative number")
    return float(value)


def _stats_json(engine: Engine) -> dict[str, Any]:
    s = engine.stats()
    return {
        "first_seq": s.first_seq,
        "last_seq": s.last_seq,
        "durable_seq": s.durable_seq,
        "events": s.events,
        "bytes": s.bytes,
        "file_bytes": s.file_bytes,
        "topics": {t: {"events": v.events, "bytes": v.bytes} for t, v in s.topics.items()},
        "consumers": [
            {
                "name": c.name,
                "kind": c.kind,
                "patterns": list(c.patterns),
                "next": c.next,
                "lag": c.lag,
                "held": c.held,
            }
            for c in s.consumers
        ],
    }


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))

"""The eda-bus daemon: confirmed publishing into an engine, replay and live delivery out of it.

One ROUTER socket serves every client (:mod:`.protocol`).  The loop, per round:

* take in a bounded batch of messages; publish batches are checked
  (:func:`eda.core.codec.decode`) and appended; requests answered;
* commit once (group commit: one fsync covers every batch of the round) and
  only then confirm the batches it covered;
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
import json
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from .. import codec
from ..daemon import Daemon, Log, port_of, received
from ..errors import EdaError, UsageError
from ..reqrep import ProtocolError, check_rid, decode_request, encode, error_reply, request_id
from ..topics import Matcher, validate_pattern
from . import protocol as p
from .engine import Engine, EventTooLargeError, Record, StoreError
from .streams import check_publisher

PUMP_EVENTS = 1 << 16  # events one subscription is sent per round, at most
SEND_HWM = 256  # messages queued per client on the ROUTER
MAX_SUBSCRIPTIONS = 4096  # live subscriptions (a silent one is dropped after GONE_AFTER)


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


@dataclass
class Settings:
    bind: str = "tcp://*:0"
    max_age: float | None = None
    max_bytes: int | None = None
    retain_every: float = 60.0
    mdns: bool = True
    name: str = ""
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
        self.endpoint = self.bind_remembered(self.sock, settings.bind, settings.port_file)
        self.subs: dict[bytes, Subscription] = {}
        self.confirmed = 0
        self.refused = 0
        self._durable = engine.durable_seq
        self._groups_dirty = True
        self.watch(self.sock, "clients", self.drain)
        self.every(0.05, "delivery", self._retry)
        self.every(1.0, "heartbeats", self._check_gone)
        if hasattr(engine, "refresh"):  # a shared store (NATS): other fronts write to it too
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
            durable = int(self.engine.refresh())  # type: ignore[attr-defined]
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
        confirms: dict[bytes, list[int]] = {}
        for frames in received(self.sock):
            if len(frames) < 2:
                continue
            ident, kind = frames[0], frames[1]
            if kind == p.PUBLISH:
                self._publish(ident, frames[2:], confirms)
            elif kind == p.REQUEST:
                self._request(ident, frames[2:])
            else:
                self.dropped("message", ProtocolError(f"unknown message kind {kind[:8]!r}"))
        try:
            durable = self.engine.commit()
        except StoreError as exc:
            self.limited("commit", f"commit failed: {exc}")
            for ident, tags in confirms.items():
                for tag in tags:
                    self._refuse(ident, tag, exc, retry=True)
            return
        if durable != self._durable:
            self._durable = durable
            self._groups_dirty = True
        for ident, tags in confirms.items():
            self.confirmed += len(tags)
            self._send(ident, [p.CONFIRM, p.pack_tags(tags)])
        self.pump()

    def _publish(self, ident: bytes, frames: list[bytes], confirms: dict[bytes, list[int]]) -> None:
        if len(frames) < 4 or len(frames[0]) != 8:
            self.dropped("publish", ProtocolError("publish message without tag and batch"))
            return
        (tag,) = p.TAG.unpack(frames[0])
        try:
            batch = codec.decode(frames[1:])
            check_publisher(batch.pubid)
            self.engine.append([batch])
        except (codec.WireError, EventTooLargeError, UsageError) as exc:
            self.dropped("batch", exc)
            self._refuse(ident, tag, exc, retry=False)
            return
        except StoreError as exc:  # full disk, I/O: what this round appended was rolled back
            self.limited("store", f"cannot store: {exc}")
            for other, tags in confirms.items():
                for earlier in tags:
                    self._refuse(other, earlier, exc, retry=True)
            confirms.clear()
            self._refuse(ident, tag, exc, retry=True)
            return
        confirms.setdefault(ident, []).append(tag)

    def _refuse(self, ident: bytes, tag: int, exc: Exception, *, retry: bool) -> None:
        self.refused += 1
        code = exc.exit_code if isinstance(exc, EdaError) else 1
        body = encode({"error": str(exc)[:300], "code": code, "retry": retry})
        self._send(ident, [p.REFUSED, p.TAG.pack(tag), body])

    def _send(self, ident: bytes, frames: list[bytes]) -> bool:
        """Send to one client without ever blocking; False when its queue is full or it is gone."""
        try:
            self.sock.send_multipart([ident, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _request(self, ident: bytes, frames: list[bytes]) -> None:
        rid = None
        try:
            if len(frames) != 1:
                raise ProtocolError("malformed request: expected one frame")
            msg = decode_request(frames[0], p.OPS)
            check_rid(msg)
            rid = request_id(msg)
            reply = self._handle(ident, msg)
        except (ProtocolError, UsageError) as exc:
            self.dropped("request", exc)
            reply = error_reply(rid, exc)
        except EdaError as exc:
            reply = error_reply(rid, exc)
        if reply is None:
            return
        reply.setdefault("ok", True)
        reply["rid"] = rid
        self._send(ident, [p.ANSWER, encode(reply)])

    def _handle(self, ident: bytes, msg: dict[str, Any]) -> dict[str, Any] | None:
        op = msg["op"]
        if op == "sub":
            return self._subscribe(ident, msg)
        if op == "stats":
            return {"stats": _stats_json(self.engine)}
        if op == "retain":
            age, size = _number(msg, "max_age"), _number(msg, "max_bytes")
            done = self.engine.retain(age, None if size is None else int(size))
            self.engine.commit()
            return {"events": done.events, "bytes": done.bytes, "first_seq": done.first_seq}
        sub = self.subs.get(ident)
        if sub is None:  # restarted bus, or cut off: the client subscribes again
            if op != "bye":
                self._send(ident, [p.UNKNOWN, encode({"error": "unknown subscription"})])
            return None
        sub.seen = time.monotonic()
        if op == "credit":
            n = msg.get("n")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ProtocolError("credit must be a non-negative integer")
            sub.credit = min(sub.credit + n, p.MAX_CREDIT)
            sub.blocked = False
            self._groups_dirty = self._groups_dirty or sub.group is not None
        elif op == "ack":
            seq = msg.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise ProtocolError("ack seq must be a non-negative integer")
            if sub.durable is not None:
                self.engine.ack(sub.durable, min(seq, self._durable))
            elif sub.group is not None:
                self.engine.group_ack(sub.group, sub.member, seq)
        elif op == "bye":
            self._drop(ident)
        return None

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
        spec = msg.get("from")
        if spec is None and durable is not None:
            spec = "start"  # a new durable consumer gets everything stored (as JetStream's)
        start = self._start(spec, matcher)
        credit = msg.get("credit", 0)
        if not isinstance(credit, int) or isinstance(credit, bool) or credit < 0:
            raise ProtocolError("credit must be a non-negative integer")
        if ident in self.subs:
            self._drop(ident)
        elif len(self.subs) >= MAX_SUBSCRIPTIONS:
            raise EdaError(f"too many subscriptions ({MAX_SUBSCRIPTIONS}); try again later")
        sub = Subscription(ident, matcher, 0, min(credit, p.MAX_CREDIT), time.monotonic())
        if durable is not None:
            sub.durable = durable
            sub.cursor = self.engine.consumer(durable, patterns, start)
        elif group is not None:
            member = _name(msg, "member") or ident.hex()
            sub.group, sub.member, sub.start = group, member, start
            sub.cursor = start
        else:
            sub.cursor = start
        self.engine.commit()
        self.subs[ident] = sub
        self._groups_dirty = True
        self.log(f"subscription {ident.hex()} {patterns} from {sub.cursor}")
        return {"from": sub.cursor, "last": self._durable}

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
            if key == "seq" and isinstance(value, int) and value >= 0:
                return max(value, 1)
            if key == "time" and 0 <= value < codec.MAX_TIME:
                return engine.seq_at(float(value))
            if key == "last" and isinstance(value, int) and value >= 0:
                return engine.seq_for_last(value, matcher)
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
            sub.backlog = self.engine.claim(
                sub.group, sub.member, sub.matcher.patterns, limit, sub.start
            )
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
        if not self._send(sub.ident, frames):
            return False
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

    def _drop(self, ident: bytes) -> None:
        sub = self.subs.pop(ident, None)
        if sub is not None and sub.group is not None:
            self.engine.release(sub.group, sub.member)
            self.engine.commit()
            self._groups_dirty = True

    def _retain(self) -> None:
        done = self.engine.retain(self.settings.max_age, self.settings.max_bytes)
        self.engine.commit()
        if done.events:
            self.log(f"retention removed {done.events} event(s), {done.bytes} bytes")

    def close(self) -> None:
        super().close()
        with contextlib.suppress(StoreError):
            self.engine.close()


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

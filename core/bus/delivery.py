"""The bus's subscriptions: replay and live delivery, credit, groups, dropping the silent.

:meth:`Delivering.pump` runs after every round: each subscription reads from
the engine, from its own cursor, at most as many events as its credit allows.
Replay and live delivery are the same path (live is a replay that caught up),
so the switch from one to the other can neither skip nor repeat an event, and
a slow subscriber only lags on disk: the bus holds no events for it in memory.

A group member claims events from the engine (held by it until it
acknowledges them; a member dropped has them released to the others), at
most its credit and at most ``max_pending`` held unacknowledged at a time
(JetStream's ``max_ack_pending``): its acknowledgements make room.  The limit
lives here, so it holds on every engine.

A subscriber heartbeats every :data:`~.protocol.HEARTBEAT` seconds and is
dropped after :data:`~.protocol.GONE_AFTER` seconds of silence; one that takes
nothing of what is queued for it, or grants credit for events it never took,
is cut off (:meth:`Delivering._cut_off`).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import codec
from ..errors import EdaError
from ..limits import QueuedBytes
from ..reqrep import encode
from ..topics import Matcher
from . import protocol as p
from .connections import ClientLinks, Connection
from .engine import Engine, Record, StoreError

if TYPE_CHECKING:
    from .server import Settings

PUMP_EVENTS = 1 << 16  # events one subscription is sent per round, at most
CUT_AFTER = p.GONE_AFTER  # s a subscriber at its queued-bytes bound may go without taking any
LIE_AFTER = 2 * p.HEARTBEAT  # s of a full queue after which granting credit is a lie


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
    wanted: int = 0  # the bytes of the event its queued-bytes bound held back
    stalled: float | None = None  # since when its queue (SEND_HWM messages) has been full
    credited: float = 0.0  # when it last granted credit
    max_pending: int | None = None  # group: events held (claimed, not acknowledged) at most
    pending: int = 0  # group: events claimed for this member and not acknowledged yet


class Delivering(ClientLinks):
    """The subscriptions half of :class:`.server.BusServer` (see the module docstring)."""

    engine: Engine
    queued: QueuedBytes  # bytes queued per client and in all
    subs: dict[bytes, Subscription]
    cut: int  # subscribers cut off for not reading
    lost: int  # events reported lost to subscribers (retention removed them unread)
    delivered_before: int  # events sent to subscriptions that have ended
    _durable: int  # the engine's durable_seq as last seen: delivered up to there
    _groups_dirty: bool  # a group member may be able to claim (new events, acks, room)
    settings: Settings

    @abstractmethod
    def _commit(self) -> int:
        """Commit the engine mid-round (the serving loop's rule)."""

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
            if first is None:  # (a purge's holes after it are no loss: the reads skip them)
                first = self.engine.kept_from
            if sub.cursor < first:
                self.lost += first - sub.cursor
                self._send(sub.ident, [p.LOST, encode({"lost": first - sub.cursor})])
                sub.cursor = first
            if sub.waiting is not None and not self.queued.room(sub.ident, sub.wanted):
                continue  # still no room for what it was refused: not read again for nothing
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
            sub.wanted = size
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

    def _settle(self, sub: Subscription, ranges: list[tuple[int, int]]) -> None:
        """Group member *sub* wrote out the events in *ranges* (bus sequences): those it
        holds are settled, and only those.  It may hold lower ones not written yet
        (released by a member gone, handed to it after newer ones): "everything up to
        the last one written" would settle them too, and nobody would ever write them
        if it died before it did."""
        assert sub.group is not None
        settled = sum(self.engine.group_ack(sub.group, sub.member, last, first)
                      for first, last in ranges)  # fmt: skip
        sub.pending = max(0, sub.pending - settled)
        self._groups_dirty = True  # room for the next claim, under max_pending

    def _replace_member(self, ident: bytes, group: str, member: str) -> None:
        """Member *member* of *group* subscribes from *ident*: a subscription it still has
        from another connection (dropped by ZeroMQ heartbeats, or the bus found
        elsewhere) ends now, its events handed out again.  Left to be dropped as silent
        seconds later, it would release what the new one holds by then, which the new
        one would acknowledge in vain, its max_pending full for ever."""
        for other, sub in list(self.subs.items()):
            if other != ident and sub.group == group and sub.member == member:
                self.log(f"subscription {other.hex()}: member {member} subscribed again")
                self._drop(other)

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
        if sub is not None:
            self.delivered_before += sub.sent  # (metrics: the live ones' are summed at scrape)
        if not resubscribing:
            if sub is not None and (hang_up or self.queued.held(ident)):
                self._hang_up(sub.conn)
            self.queued.forget(ident)
        if sub is not None and sub.group is not None:
            self.engine.release(sub.group, sub.member)
            self._commit()
            self._groups_dirty = True

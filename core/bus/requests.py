"""The bus's requests: subscribe, credit, ack, heartbeat, bye, and the one-shot
ones (stats, retain, purge a topic, drop a consumer).

Every request gets one reply (``A``), except credit, ack, hb and bye on a
live subscription (none: they only keep it going).  A request from a REQ
socket (:func:`eda.core.reqrep.split_envelope` gave its route) may only ask
the ones with one reply each (:data:`REPLY_OPS`); retain, purge, drop and moving a
durable consumer are accepted only from the bus's own host.  What a peer
sends is checked by :mod:`.peerinput`; whatever one request raises, the
others' work goes on.  With an ACL (:mod:`.acl`), a subscription needs the
subscribe right on each of its patterns, stats one subscribe pattern (and
shows what lies within them), retain, purge and drop the admin right; credit, ack,
hb and bye only go on with a subscription already accepted.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from .. import codec
from ..errors import EdaError, ProtocolError, UsageError
from ..reqrep import encode, error_reply, parse_request, request_id
from ..topics import Matcher
from . import peerinput as check
from . import protocol as p
from .delivery import Delivering, Subscription
from .engine import Engine, StoreError

MAX_SUBSCRIPTIONS = 4096  # live subscriptions (a silent one is dropped after GONE_AFTER)
# ops only a client on the bus's own host may ask for
ADMIN_OPS = frozenset({"retain", "purge", "drop"})
# one reply each: a REQ socket may ask them
REPLY_OPS = frozenset({"stats", "retain", "purge", "drop"})


class Answering(Delivering):
    """The requests half of :class:`.server.BusServer` (see the module docstring)."""

    @abstractmethod
    def _rolled_back(self, exc: StoreError) -> None:
        """The store failed mid-request: refuse (retry) what its rollback took."""

    def _request(self, ident: bytes, frames: list[bytes], route: Sequence[bytes] = ()) -> None:
        """Answer a request; *route*: from a REQ socket (see :meth:`_send`), which
        can only make requests that get one reply (no subscription)."""
        rid = None
        try:
            msg = parse_request(frames, p.OPS)
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
            reply = {**error_reply(rid, exc), "retry": True}  # the store may be back soon
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
            return {"stats": stats_json(self.engine, self._readable())}
        if op in ADMIN_OPS:
            if self.acl is not None:
                self._access().administer("delete a consumer" if op == "drop" else op)
            if not self._from_own_host():
                raise EdaError(f"{op} is only accepted from the bus's own host; run it there")
        if op == "retain":
            age, size = check.number(msg, "max_age"), check.number(msg, "max_bytes")
            done = self.engine.retain(age, None if size is None else int(size))
            self._commit()
            return {"events": done.events, "bytes": done.bytes, "first_seq": done.first_seq}
        if op == "purge":
            return self._purge(msg)
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
            n = check.integer(msg.get("n"), "credit")
            sub.credit = min(sub.credit + n, p.MAX_CREDIT)
            if n:
                self.queued.release(ident, n)
                sub.credited = time.monotonic()
            sub.blocked = False
            self._groups_dirty = self._groups_dirty or sub.group is not None
        elif op == "ack":
            seq = check.integer(msg.get("seq"), "ack seq")
            if sub.durable is not None:
                self.engine.ack(sub.durable, min(seq, self._durable))
            elif sub.group is not None:
                self._settle(sub, check.ranges(msg, seq))
        elif op == "bye":
            self._drop(ident)
        return None

    def _purge(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Remove every stored event of the topics a pattern matches (admin)."""
        pattern = check.pattern(msg, "pattern")
        done = self.engine.purge(pattern)
        self._commit()
        self._groups_dirty = True  # (leases on purged events only are settled)
        self.log(f"purged {done.events} events of {pattern!r} ({len(done.topics)} topics)")
        return {"events": done.events, "bytes": done.bytes, "topics": list(done.topics)}

    def _drop_consumer(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Delete a durable consumer or a group nobody is subscribed as (admin)."""
        name = check.name(msg, "name")
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
        patterns = check.patterns(msg)
        matcher = Matcher(patterns)
        durable, group = check.name(msg, "durable"), check.name(msg, "group")
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
        if self.acl is not None:  # (and resuming a durable, the patterns it had: its position)
            self._access().read([*patterns, *(old or ())])
        credit = check.integer(msg.get("credit", 0), "credit")
        pending = msg.get("pending")
        if pending is not None and not 0 < check.integer(pending, "pending") <= p.MAX_CREDIT:
            raise ProtocolError(f"pending must be an integer from 1 to {p.MAX_CREDIT}")
        if group is not None:  # the same member from a new connection: its old one ends
            self._replace_member(ident, group, check.name(msg, "member") or ident.hex())
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
            member = check.name(msg, "member") or ident.hex()
            sub.group, sub.member, sub.start = group, member, start
            sub.max_pending = pending
            # creates the group, or refuses now a member whose patterns are not the group's
            self.engine.claim(group, member, patterns, 0, start)
            sub.cursor = start
        else:
            sub.cursor = start
        self._commit()
        self.subs[ident] = sub
        if self.acl is not None:  # asked again when the ACL or the trusted keys change
            self._readers[ident] = self._sender_key()
        self._groups_dirty = True
        self.log(f"subscription {ident.hex()} {patterns} from {sub.cursor}")
        reply: dict[str, Any] = {"from": sub.cursor, "last": self._durable}
        if old is not None and not reset:  # it resumed: what the client asked may not hold
            reply["resumed"] = {"patterns": list(old), "asked_from": given is not None}
        return reply

    def _readable(self) -> Callable[[str], bool] | None:
        """Which topics (and patterns) the client asking for stats may see (None: all)."""
        if self.acl is None:
            return None
        access = self._access()
        access.stats()
        return access.rights.may_read

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
                return max(check.integer(value, "from seq"), 1)
            if key == "time" and 0 <= value < codec.MAX_TIME:
                return engine.seq_at(float(value))
            if key == "last":
                return engine.seq_for_last(check.integer(value, "from last"), matcher)
        raise ProtocolError("from: use 'start', 'live', {seq: N}, {time: T} or {last: N}")


def stats_json(engine: Engine, readable: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The stats reply; with *readable*, only the topics and consumers it accepts."""
    s = engine.stats()
    topics, consumers = s.topics, s.consumers
    if readable is not None:
        topics = {t: v for t, v in topics.items() if readable(t)}
        consumers = [c for c in consumers if all(readable(x) for x in c.patterns)]
    return {
        "first_seq": s.first_seq,
        "last_seq": s.last_seq,
        "durable_seq": s.durable_seq,
        "events": s.events,
        "bytes": s.bytes,
        "file_bytes": s.file_bytes,
        "topics": {t: {"events": v.events, "bytes": v.bytes} for t, v in topics.items()},
        "consumers": [
            {
                "name": c.name,
                "kind": c.kind,
                "patterns": list(c.patterns),
                "next": c.next,
                "lag": c.lag,
                "held": c.held,
            }
            for c in consumers
        ],
    }

"""Clients of eda-bus: finding the bus, confirmed publishing, subscribing with credit.

:class:`BusPublisher` has the ``send(topic, body, count, kind)`` shape of
:class:`eda.core.pubsub.Publisher`, so :class:`eda.core.feed.Feeder` feeds it
unchanged.  Batches go out pipelined (up to a window); each is kept until the
bus confirms it durable.  When no confirmation arrives for
:data:`RESEND_AFTER` seconds (a bus restart, a lost connection), every
unconfirmed batch is sent again with the same publisher id and sequences:
the bus stores each event at most once, so resending is always safe.

:class:`BusSubscriber` subscribes with a starting point, grants credit as the
caller takes events, heartbeats, and subscribes again (from the event after
the last one it received, or by its durable name) when the bus says it does
not know it (after a bus restart).

Where the bus is, and the one-shot requests (stats, retain, drop), are
:class:`BusClient`'s: :class:`eda.core.reqrep.Client` (given, else cached
with a TCP probe, else mDNS) with the bus protocol's framing.  The module is a
little over 500 lines because it holds every client of the bus protocol,
which share the dealer socket and the rule for finding a bus that moved.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import zmq

from .. import codec, reqrep
from ..endpoint import Endpoint
from ..errors import EdaError, ExitStatus, NotFoundError, ProtocolError
from ..reqrep import client_endpoint, decode, encode, tcp_reachable
from ..sockets import connect, new_socket
from . import protocol as p

RESEND_AFTER = 1.0  # s without any confirmation while some are due: send them all again
LOOK_AGAIN_AFTER = 2.0  # s without an answer: look for the bus again (it may have moved)
WINDOW_BYTES = 32 << 20  # unconfirmed bytes in flight before send() waits
WINDOW_BATCHES = 4096
CREDIT = 1 << 17  # events a subscriber lets the bus send ahead
GROUP_CREDIT = 1000  # a group member takes less ahead: the others get their share
# a group member's events held unacknowledged at most (JetStream's max_ack_pending,
# RabbitMQ's prefetch): a handler slow per event (--exec) holds one, so the next job
# goes to a member that is free; a fast one (writing out) a modest batch per round trip
GROUP_PENDING = 100
GROUP_PENDING_SLOW = 1
GRANT_BYTES = 4 << 20  # bytes of events taken after which credit is granted again


class NoBus(NotFoundError):
    """No bus is known: none given, none cached, none answering mDNS (exit 3: not found)."""


class ConfirmTimeout(EdaError):
    """The bus did not confirm every batch in time."""

    exit_code = ExitStatus.TIMEOUT


class Unconfirmed(NamedTuple):
    topic: str
    first: int  # publisher sequence of the first event
    events: int
    pubid: str

    def __str__(self) -> str:
        last = self.first + self.events - 1
        ids = f"{self.pubid}-{self.first}" + (f"..{self.pubid}-{last}" if self.events > 1 else "")
        return f"{self.topic} {ids} ({self.events} event(s))"


class BusClient(reqrep.Client):
    """Where the bus is (``--bus``, else ``EDA_BUS``, else the cached one, else
    mDNS), and its requests (stats, retain, drop) with :class:`reqrep.Client`'s
    round trip, framed as the bus protocol says (kind ``R``, answer ``A``)."""

    what = "bus"
    cache_key = p.CACHE_KEY
    service_type = p.BUS_TYPE
    request_frames = (p.REQUEST,)
    reply_frames = (p.ANSWER,)

    def none_found(self) -> EdaError:
        return NoBus("no bus found; start one with 'eda-bus serve' or give --bus tcp://HOST:PORT")

    def none_answered(self, tried: set[Endpoint]) -> EdaError:
        where = reqrep.listed(tried, limit=3)
        return ConfirmTimeout(f"the bus at {where} did not answer within {self.timeout:g}s")


def find_bus(
    endpoint: Endpoint | str | None = None,
    *,
    interface: str | None = None,
    use_mdns: bool = True,
    timeout: float = 0.3,
) -> Endpoint:
    """The bus to use: *endpoint*, else ``EDA_BUS``, else the cached one, else mDNS."""
    explicit = endpoint or os.environ.get(p.ENV_BUS) or None
    client = BusClient([explicit] if explicit else [], use_mdns=use_mdns, interface=interface,
                       discover_timeout=timeout)  # fmt: skip
    if client.explicit:
        return client.explicit[0]  # given: used as it is, even when it is down now
    return client.find()


def _dealer(endpoint: Endpoint) -> zmq.Socket[bytes]:
    sock = new_socket(zmq.DEALER, sndhwm=1000, rcvhwm=0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    connect(sock, endpoint)
    return sock


Relocate = Callable[[], Endpoint | str]


def _moved(relocate: Relocate, endpoint: Endpoint) -> Endpoint | None:
    """Where *relocate* finds the bus now, if not at *endpoint* (None: it did not
    move, or none is found now)."""
    try:
        found = client_endpoint(relocate(), "bus")
    except EdaError:
        return None
    return None if found == endpoint else found


class BusPublisher:
    """Confirmed publishing to a bus (see the module docstring)."""

    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        headers: dict[str, str] | None = None,
        source: str | None = None,
        timeout: float = 10.0,
        resend_after: float = RESEND_AFTER,
        relocate: Relocate | None = None,
    ) -> None:
        """*relocate* finds the bus again (e.g. :func:`find_bus`: cache, then mDNS) when
        it stops answering; the pending batches then go to where it is now."""
        self.endpoint = client_endpoint(endpoint, "bus")
        self._relocate = relocate
        self._looked = 0.0
        # 128 random bits: the bus keeps every (pubid, topic)'s sequences, so an id
        # another run ever used would have this run's events dropped as duplicates
        self.pubid = secrets.token_hex(16)
        self.source = source or f"eda://{socket.gethostname()}/pub/{self.pubid}"
        self._origin = codec.encode_origin(self.pubid, self.source)
        self._ext = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
        self.timeout = timeout
        self.resend_after = resend_after
        self.sock = _dealer(self.endpoint)
        self._seq: dict[str, int] = {}
        self._envelope_ids = 0
        self._tags = 0
        self.pending: collections.OrderedDict[int, list[bytes]] = collections.OrderedDict()
        self._pending_bytes = 0
        self._progress = time.monotonic()  # last confirmation (or start of waiting)
        self._resent_at = 0.0
        self.confirmed = 0  # events
        self.resent = 0  # batches sent again
        self.refused: list[tuple[Unconfirmed, str]] = []  # batches the bus will never take
        self.warnings: list[str] = []  # retryable refusals (disk full...), newest last

    # -- the Publisher shape Feeder uses --------------------------------------------
    def send(self, topic: str, body: bytes, count: int, kind: int = codec.TEXT) -> None:
        seq = self._seq.get(topic, 1)
        self._seq[topic] = seq + count
        self._tags += 1
        tag = self._tags
        frames = [
            p.PUBLISH,
            p.TAG.pack(tag),
            topic.encode(),
            codec.encode_header(kind, count, seq, time.time(), self._origin),
            body,
        ]
        if self._ext:
            frames.append(self._ext)
        if not self.pending:
            self._progress = time.monotonic()
        self.pending[tag] = frames
        self._pending_bytes += len(body)
        self._push(frames)
        self.service()
        while len(self.pending) >= WINDOW_BATCHES or self._pending_bytes >= WINDOW_BYTES:
            self._wait(time.monotonic() + self.timeout, stall=True)

    def service(self) -> None:
        """Take in confirmations that arrived (never waits)."""
        while self.sock.poll(0):
            self._receive()

    def bind_for_announce(self) -> None:  # a bus publisher is never announced
        pass

    def announce(self, *_args: Any) -> None:
        pass

    def next_envelope_id(self) -> str:
        self._envelope_ids += 1
        return f"{self.pubid}-e{self._envelope_ids}"

    @property
    def total_sent(self) -> int:
        return sum(self._seq.values()) - len(self._seq)

    # -- confirmations ----------------------------------------------------------------
    def _push(self, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[4]) < 65536)
        except zmq.Again:
            return False  # sent again after RESEND_AFTER
        return True

    def _receive(self) -> None:
        frames = self.sock.recv_multipart()
        kind = frames[0]
        if kind == p.CONFIRM and len(frames) == 2:
            try:
                tags = p.unpack_tags(frames[1])
            except ValueError:
                return
            for tag in tags:
                self._settle(tag)
            self._progress = time.monotonic()
        elif kind == p.REFUSED and len(frames) == 3 and len(frames[1]) == 8:
            (tag,) = p.TAG.unpack(frames[1])
            try:
                info = decode(frames[2])
            except ProtocolError:
                return
            error = str(info.get("error", "refused"))[:300]
            if info.get("retry"):
                self.warnings.append(error)
                return
            batch = self.pending.get(tag)
            if batch is not None:
                self.refused.append((self._describe(batch), error))
                self._settle(tag, stored=False)

    def _settle(self, tag: int, *, stored: bool = True) -> None:
        frames = self.pending.pop(tag, None)
        if frames is not None:
            self._pending_bytes -= len(frames[4])
            if stored:  # a refused batch is settled, never counted as confirmed
                self.confirmed += struct_count(frames[3])

    def _describe(self, frames: list[bytes]) -> Unconfirmed:
        return Unconfirmed(frames[2].decode(), struct_seq(frames[3]), struct_count(frames[3]),
                           self.pubid)  # fmt: skip

    def _wait(self, deadline: float, *, stall: bool = False, limit: float | None = None) -> None:
        """Wait for confirmations until *deadline*, resending when they stop coming."""
        while self.pending:
            now = time.monotonic()
            if stall:
                deadline = self._progress + (self.timeout if limit is None else limit)
            if now >= deadline:
                raise ConfirmTimeout(self._timeout_text())
            since = max(self._progress, self._resent_at)
            if now - since >= self.resend_after:
                self._look_again(now)
                self._resend()
                since = now
            wait = min(deadline, since + self.resend_after) - now
            if self.sock.poll(max(1, int(wait * 1000))):
                self.service()
                if limit is None and stall and len(self.pending) < WINDOW_BATCHES // 2:
                    return

    def _look_again(self, now: float) -> None:
        """No answer for a while: find the bus again; if it moved, talk to it there."""
        silent = now - self._progress
        if self._relocate is None or silent < LOOK_AGAIN_AFTER or now - self._looked < 1.0:
            return
        self._looked = now
        endpoint = _moved(self._relocate, self.endpoint)
        if endpoint is not None:  # (None: not moved, or none found now: resend where it was)
            self.sock.close()
            self.sock = _dealer(endpoint)
            self.endpoint = endpoint

    def _resend(self) -> None:
        self._resent_at = time.monotonic()
        for frames in list(self.pending.values()):
            if not self._push(frames):
                break
            self.resent += 1

    def finish(self, timeout: float | None = None) -> None:
        """Wait until every batch is confirmed; :class:`ConfirmTimeout` after *timeout*
        seconds without confirmation progress."""
        self._progress = time.monotonic()
        limit = self.timeout if timeout is None else timeout
        self._wait(self._progress + limit, stall=True, limit=limit)

    def unconfirmed(self) -> list[Unconfirmed]:
        return [self._describe(frames) for frames in self.pending.values()]

    def _timeout_text(self) -> str:
        missing = self.unconfirmed()
        events = sum(u.events for u in missing)
        shown = "; ".join(str(u) for u in missing[:5])
        more = f" and {len(missing) - 5} more batch(es)" if len(missing) > 5 else ""
        why = f" (bus said: {self.warnings[-1]})" if self.warnings else ""
        return (
            f"the bus at {self.endpoint.zmq} did not confirm {events} event(s) within"
            f" {self.timeout:g}s{why}: {shown}{more}"
        )

    def close(self) -> None:
        self.sock.close()


def struct_count(header: bytes) -> int:
    return int.from_bytes(header[2:6], "big")


def struct_seq(header: bytes) -> int:
    return int.from_bytes(header[6:14], "big")


class Delivery(NamedTuple):
    busseq: int  # bus sequence of the batch's first event
    batch: codec.Batch


class BusSubscriber:
    """A subscription on a bus: replay from a starting point, then live (credit-based)."""

    def __init__(
        self,
        endpoint: Endpoint | str,
        patterns: list[str],
        *,
        start: Any = None,
        durable: str | None = None,
        group: str | None = None,
        credit: int | None = None,
        relocate: Relocate | None = None,
        reset: bool = False,
        max_pending: int | None = None,
    ) -> None:
        """*relocate* finds the bus again (e.g. :func:`find_bus`) when it stops
        answering: the subscription then goes on where it is now.  *reset* moves
        the existing durable consumer to *start* (asked until the bus agrees once).
        *max_pending*: a group member holds at most that many events delivered and
        not acknowledged (default :data:`GROUP_PENDING`)."""
        self.endpoint = client_endpoint(endpoint, "bus")
        self._relocate = relocate
        self._heard = self._looked = time.monotonic()
        self.patterns = patterns
        self.start = start
        self.durable = durable
        self.group = group
        self.member = secrets.token_hex(6)
        self.credit = credit or (GROUP_CREDIT if group else CREDIT)
        self.max_pending = max_pending or GROUP_PENDING
        self.sock = _dealer(self.endpoint)
        self.malformed = 0
        self.lost = 0
        self.last = 0  # bus sequence of the newest event received
        self.acked = 0
        self._owed = 0  # events taken since credit was last granted
        self._owed_bytes = 0  # and their bytes
        self._rid = 0
        self._last_send = 0.0
        self._subscribed = False
        self.resubscribed = 0
        self.errors: list[str] = []
        self.reset = reset
        # a durable that already existed: (its position, its patterns before, a start was asked)
        self.resumed: tuple[int, list[str], bool] | None = None
        self._answered = False  # the bus answered a subscribe of ours

    def _request(self, msg: dict[str, Any]) -> None:
        self._rid += 1
        with contextlib.suppress(zmq.Again):  # the bus is away and the queue full: said again
            self.sock.send_multipart([p.REQUEST, encode({**msg, "rid": self._rid})], zmq.NOBLOCK)
        self._last_send = time.monotonic()

    def subscribe(self) -> None:
        msg: dict[str, Any] = {"op": "sub", "patterns": self.patterns, "credit": self.credit}
        if self.durable is not None:
            msg["durable"] = self.durable
        if self.group is not None:
            msg["group"], msg["member"] = self.group, self.member
            msg["pending"] = self.max_pending
        start = self.start
        if self._subscribed and self.durable is None and self.group is None:
            start = {"seq": self.last + 1} if self.last else self.start
        if start is not None:
            msg["from"] = start
        if self.reset:
            msg["reset"] = True
        self._owed = self._owed_bytes = 0
        self._request(msg)
        self._subscribed = True

    def poll(self, timeout: float | None) -> bool:
        """Wait up to *timeout* seconds (None: forever) for a message; heartbeats meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._heartbeat()
            self._look_again()
            wait = p.HEARTBEAT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            if self.sock.poll(max(1, int(wait * 1000))):
                return True

    def _look_again(self) -> None:
        """Nothing heard for a while and the bus refuses connections: find it again."""
        now = time.monotonic()
        if self._relocate is None or min(now - self._heard, now - self._looked) < LOOK_AGAIN_AFTER:
            return
        self._looked = now
        if tcp_reachable(self.endpoint):
            return  # there, only quiet
        endpoint = _moved(self._relocate, self.endpoint)
        if endpoint is not None:
            self.sock.close()
            self.sock = _dealer(endpoint)
            self.endpoint = endpoint
            self.resubscribed += 1
            self.subscribe()

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_send >= p.HEARTBEAT:
            if self._owed:  # what was taken is granted again at least this often
                self._grant()
            else:
                self._request({"op": "hb"})

    def _grant(self) -> None:
        self._request({"op": "credit", "n": self._owed})
        self._owed = self._owed_bytes = 0

    def receive(self, limit: int = 1 << 16) -> list[Delivery]:
        """The events waiting (about *limit* at most), without blocking."""
        out: list[Delivery] = []
        n = 0
        while n < limit and self.sock.poll(0):
            frames = self.sock.recv_multipart()
            self._heard = time.monotonic()
            kind = frames[0]
            if kind == p.DELIVER and len(frames) >= 5 and len(frames[1]) == 8:
                try:
                    batch = codec.decode(frames[2:])
                except codec.WireError:
                    self.malformed += 1
                    continue
                (busseq,) = p.TAG.unpack(frames[1])
                if busseq <= self.last and self.durable is None and self.group is None:
                    continue  # sent before a resubscription took effect
                out.append(Delivery(busseq, batch))
                self.last = max(self.last, busseq + batch.size - 1)
                n += batch.size
                self._owed_bytes += sum(map(len, frames))
            elif kind == p.UNKNOWN:
                self.resubscribed += 1
                self.subscribe()
            elif kind == p.LOST:
                self._lost(frames)
            elif kind == p.ANSWER and len(frames) == 2:
                self._answer(frames[1])
            else:
                self.malformed += 1
        self._owed += n
        self._heartbeat()
        # the bus queues a client a bounded number of bytes: large events are granted sooner
        if self._owed >= max(1, self.credit // 4) or self._owed_bytes >= GRANT_BYTES:
            self._grant()
        return out

    def _lost(self, frames: list[bytes]) -> None:
        try:
            n = decode(frames[1]).get("lost") if len(frames) == 2 else None
        except ProtocolError:
            n = None
        if isinstance(n, int) and n > 0:
            self.lost += n

    def _answer(self, frame: bytes) -> None:
        try:
            reply = decode(frame)
        except ProtocolError:
            self.malformed += 1
            return
        if not reply.get("ok"):
            self.errors.append(str(reply.get("error", "request refused"))[:300])
            return
        if "from" not in reply:
            return
        first, self.reset, self._answered = not self._answered, False, True
        if not first:  # a subscribe again (after a bus restart) resumes, as it should
            return
        resumed, position = reply.get("resumed"), reply.get("from")
        if isinstance(resumed, dict) and isinstance(position, int):
            old = resumed.get("patterns")
            if isinstance(old, list) and all(isinstance(x, str) for x in old):
                self.resumed = (position, old[:64], resumed.get("asked_from") is True)

    def ack(self, seq: int) -> None:
        """The events up to bus sequence *seq* are written out (durable and group only).

        A group member acknowledges each time: what it is given again (released by
        a member gone, or its own after a bus restart) may lie below what it
        acknowledged before, and the bus counts it held (against max_pending) until then."""
        if (self.durable is not None and seq > self.acked) or self.group is not None:
            self.acked = max(self.acked, seq)
            self._request({"op": "ack", "seq": seq})

    def close(self) -> None:
        try:
            self._request({"op": "bye"})
            self.sock.setsockopt(zmq.LINGER, 500)
        finally:
            self.sock.close()


def request(endpoint: Endpoint | str, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to a bus (stats, retain, drop): its reply, or an error."""
    client = BusClient([endpoint], timeout=timeout)
    try:
        return client.request(msg)
    except (reqrep.RemoteError, NotFoundError) as exc:  # a refusal is exit 1, as it always was
        raise EdaError(str(exc)) from None
    finally:
        client.close()


def deliveries_events(deliveries: list[Delivery]) -> Iterator[int]:
    for d in deliveries:
        yield d.batch.size

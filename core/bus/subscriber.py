"""Subscribing to eda-bus with credit.

:class:`BusSubscriber` subscribes with a starting point, grants credit as the
caller takes events, heartbeats, and subscribes again (from the event after
the last one it received, or by its durable name) when the bus says it does
not know it (after a bus restart).  A group member also says how many events
it may hold unacknowledged (``max_pending``); the bus hands it more as it
acknowledges.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import zmq

from .. import codec
from ..endpoint import Endpoint
from ..errors import ProtocolError
from ..reqrep import client_endpoint, decode, encode, tcp_reachable
from . import protocol as p
from .link import LOOK_AGAIN_AFTER, Relocate, dealer, moved

CREDIT = 1 << 17  # events a subscriber lets the bus send ahead
GROUP_CREDIT = 1000  # a group member takes less ahead: the others get their share
# a group member's events held unacknowledged at most (JetStream's max_ack_pending,
# RabbitMQ's prefetch): a handler slow per event (--exec) holds one, so the next job
# goes to a member that is free; a fast one (writing out) a modest batch per round trip
GROUP_PENDING = 100
GROUP_PENDING_SLOW = 1
GRANT_BYTES = 4 << 20  # bytes of events taken after which credit is granted again
RETRY_AFTER = 1.0  # a request the bus's store failed (``retry``): subscribe again after


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
        # (os.urandom(n).hex(): secrets.token_hex(n) without importing hmac and OpenSSL)
        self.member = os.urandom(6).hex()
        self.credit = credit or (GROUP_CREDIT if group else CREDIT)
        self.max_pending = max_pending or GROUP_PENDING
        self.sock = dealer(self.endpoint)
        self.malformed = 0
        self.lost = 0
        self.last = 0  # bus sequence of the newest event received
        self._began = 0  # where the bus said a plain subscription began (0: not told yet)
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
        self._retry_at: float | None = None  # subscribe again then: the store failed

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
        # again: where it got to, or began (a live one forgotten before its first event,
        # cut off, dropped or by a restart, must not skip what was stored meanwhile)
        plain = self.durable is None and self.group is None
        if self._subscribed and plain and (self.last or self._began):
            start = {"seq": max(self.last + 1, self._began)}
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
            self.housekeeping()
            wait = p.HEARTBEAT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            if self.sock.poll(max(1, int(wait * 1000))):
                return True

    def housekeeping(self) -> None:
        """What goes on while no message arrives (:meth:`poll` does it; a caller
        waiting on this socket with others does it at least every :data:`p.HEARTBEAT`
        seconds): heartbeats and credit, looking for the bus when it went quiet."""
        self._heartbeat()
        self._look_again()
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None  # a durable or group resumes where the bus kept it
            self.resubscribed += 1
            self.subscribe()

    def _look_again(self) -> None:
        """Nothing heard for a while and the bus refuses connections: find it again."""
        now = time.monotonic()
        if self._relocate is None or min(now - self._heard, now - self._looked) < LOOK_AGAIN_AFTER:
            return
        self._looked = now
        if tcp_reachable(self.endpoint):
            return  # there, only quiet
        endpoint = moved(self._relocate, self.endpoint)
        if endpoint is not None:
            self.sock.close()
            self.sock = dealer(endpoint)
            self.endpoint = endpoint
            self.resubscribed += 1
            self.subscribe()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Heartbeats go on from a thread while the caller works on what it received
        (an --exec job may take longer than GONE_AFTER): the bus does not take the
        member for dead and give its events to another.  The caller must not use
        this subscriber meanwhile (one thread at a time on the socket)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(p.HEARTBEAT):
                self._request({"op": "hb"})

        thread = threading.Thread(target=beat, name="bus-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

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
            if reply.get("retry") is True:  # the store failed (a JetStream election): not us
                self._retry_at = time.monotonic() + RETRY_AFTER
                return
            self.errors.append(str(reply.get("error", "request refused"))[:300])
            return
        if "from" not in reply:
            return
        first, self.reset, self._answered = not self._answered, False, True
        if not first:  # a subscribe again (after a bus restart) resumes, as it should
            return
        resumed, position = reply.get("resumed"), reply.get("from")
        if isinstance(position, int) and position > 0:
            self._began = position
        if isinstance(resumed, dict) and isinstance(position, int):
            old = resumed.get("patterns")
            if isinstance(old, list) and all(isinstance(x, str) for x in old):
                self.resumed = (position, old[:64], resumed.get("asked_from") is True)

    def ack(self, seq: int, ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """The events up to bus sequence *seq* are written out (durable and group only);
        a group member's *ranges*: exactly which (:meth:`written` gives them).

        A group member acknowledges each time: what it is given again (released by
        a member gone, or its own after a bus restart) may lie below what it
        acknowledged before, and the bus counts it held (against max_pending) until then."""
        if (self.durable is not None and seq > self.acked) or self.group is not None:
            self.acked = max(self.acked, seq)
            msg: dict[str, Any] = {"op": "ack", "seq": seq}
            if ranges and self.group is not None:
                msg["ranges"] = [list(r) for r in ranges]
            self._request(msg)

    def written(self, deliveries: Sequence[Delivery]) -> None:
        """*deliveries* (as :meth:`receive` gave them, in order) are written out: acknowledged.

        A durable consumer acknowledges up to the last one.  A group member says
        exactly which bus sequences it wrote: it may be handed events released by a
        member gone after newer ones, and hold some not written yet below the last
        one it wrote (the bus would take those for done, and nobody would write them
        if this member died first)."""
        if not deliveries:
            return
        top = deliveries[-1]
        seq = top.busseq + top.batch.size - 1
        if self.group is None:
            self.ack(seq)
            return
        ranges: list[tuple[int, int]] = []
        for d in deliveries:
            first, last = d.busseq, d.busseq + d.batch.size - 1
            if ranges and ranges[-1][1] + 1 == first:  # right after the one before
                ranges[-1] = (ranges[-1][0], last)
            else:
                ranges.append((first, last))
        for i in range(0, len(ranges), p.MAX_ACK_RANGES):
            chunk = ranges[i : i + p.MAX_ACK_RANGES]
            # (seq: a bus before ranges acknowledges up to it, as it always did)
            self.ack(seq if i + p.MAX_ACK_RANGES >= len(ranges) else chunk[-1][1], chunk)

    def close(self) -> None:
        try:
            self._request({"op": "bye"})
            self.sock.setsockopt(zmq.LINGER, 500)
        finally:
            self.sock.close()

"""Serving 2PC requests: group commit, batched messages and deferred replies.

Both daemons answer through :class:`BatchService`: what one turn of the
loop drained is answered after one ``flush`` (the journal's fsync), so
whatever a reply promises is durable first; the messages themselves are
specified in :mod:`.protocol`.  In secure mode each request's handler can read
the key its sender proved in the CURVE handshake (:attr:`Service.sender_key
<eda.core.reqrep.Service.sender_key>`), as every request service does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from ..daemon import Daemon
from ..errors import EdaError, ProtocolError
from ..reqrep import Envelope, Service, encode, error_reply, split_envelope
from .protocol import DEFER, MAX_BATCH, MAX_FRAME

# s: how long replies carried over to the next batch (already there) may wait for it, at most
CARRY_WAIT = 0.002


class BatchService(Service):
    """A request service with group commit, batched messages and deferred replies.

    The replies to one drained batch are sent after *flush* () returned (the
    owner's journal fsync): whatever a reply promises is durable first, and
    one fsync covers the whole batch.  A message may carry several requests,
    one per frame (a :class:`Peer` sends what it has in one go); the replies
    to one asker go back together, one per frame, as one message.  A handler
    that returns ``{DEFER: True}`` answers later with :meth:`reply`, using
    :attr:`current` (the asking peer's envelope) and the request's rid, saved at the
    time; between :meth:`hold` and :meth:`release` those replies are gathered
    too.  :attr:`ahead`, when set, sees the whole batch first (to start its
    work in one go).  Replies that :attr:`lazy` accepts (acknowledgements
    nobody waits on) wait for the next flush, whatever makes it, up to
    :attr:`linger` seconds: then they are flushed on their own.
    :attr:`sender_key` is the key the
    sender of the request being handled proved (secure mode; "" otherwise).
    With :attr:`carry`, the replies
    of a batch wait for the next batch when its requests are there already:
    an owner that syncs its journal early in a batch (a participant's
    "preparing" marks, before their actions run) sends them with
    :meth:`send_durable` right after that sync, so one fsync serves both
    batches; otherwise the end of the next batch flushes them.  Replies are
    carried over one batch at most, and never past :data:`CARRY_WAIT`.
    """

    def __init__(
        self,
        daemon: Daemon,
        handlers: Mapping[str, Callable[[Any], Mapping[str, Any]]],
        *,
        flush: Callable[[], None],
    ) -> None:
        # a frame of the largest data, every character escaped as \\uXXXX, still arrives
        super().__init__(daemon, handlers, max_message=MAX_FRAME)
        self.flush = flush
        self.current: Envelope = ()
        self.ahead: Callable[[list[list[bytes]]], None] | None = None
        self.held: dict[Envelope, list[bytes]] | None = None
        self.lazy: Callable[[dict[str, Any]], bool] | None = None
        self.linger = CARRY_WAIT  # (a participant lets its acks wait longer: ACK_LINGER)
        self.waiting: dict[Envelope, list[bytes]] = {}
        self.lingering: Any = None  # the timer that sends lingering replies
        self.carry = False  # replies may wait for the next batch's first sync (see above)
        self.carried = False  # the waiting replies were carried over from the last batch

    def drain(self) -> None:
        """Answer a batch of requests; one flush, then every reply of the batch."""
        requests: list[list[bytes]] = []
        keys: list[str] = []  # who sent each one (secure mode)
        for frames in itertools.islice(self.pending(), 256):
            envelope, bodies = split_envelope(frames)
            if len(bodies) > MAX_BATCH:
                self.daemon.dropped("request", ProtocolError(f"over {MAX_BATCH} requests"))
            requests += [[*envelope, body] for body in bodies[:MAX_BATCH]]
            keys += [self.sender_key] * min(len(bodies), MAX_BATCH)
        if self.ahead is not None and len(requests) > 1:
            self.daemon.guarded("look-ahead", self.ahead, requests)
        urgent = False
        for (*route, body), key in zip(requests, keys, strict=True):
            identity = tuple(route)
            self.requests += 1
            self.current = identity
            self.sender_key = key
            reply = self.answer([body])
            if not reply.get(DEFER):
                self.waiting.setdefault(identity, []).append(self._encode(reply))
                urgent = urgent or self.lazy is None or not self.lazy(reply)
        self.sender_key = ""
        if self.carried or (urgent and not (self.carry and self._more())):
            self.answer_waiting()  # (replies carried over go with this batch at the latest)
        elif urgent:
            self.carried = True  # the next batch, already here, makes them durable
            self._wait(CARRY_WAIT)  # (and if it does not come after all: soon anyway)
        elif self.waiting:
            self._wait(self.linger)

    def _wait(self, delay: float) -> None:
        """Send the waiting replies within *delay* seconds at the latest (sooner when
        a flush comes first)."""
        timer = self.daemon.after(delay, "replies", self.answer_waiting)
        if self.lingering is not None:
            if self.lingering.due <= timer.due:
                timer.cancel()
                return
            self.lingering.cancel()
        self.lingering = timer

    def _more(self) -> bool:
        """Whether requests are waiting to be read now."""
        try:
            events = self.sock.getsockopt(zmq.EVENTS)
        except zmq.ZMQError:
            return False
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def answer_waiting(self) -> None:
        """Flush, then send every reply waiting."""
        if self.waiting:
            self.flush()
        self.send_durable()

    def send_durable(self) -> None:
        """Send every reply waiting: the owner's journal was just synced, so what
        they promise is durable."""
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        self.carried = False
        waiting, self.waiting = self.waiting, {}
        if waiting:
            self._send(waiting)

    def _encode(self, reply: Mapping[str, Any]) -> bytes:
        try:
            return encode(reply)
        except (ValueError, TypeError, RecursionError) as exc:  # a handler's bug
            self.daemon.limited("reply", f"cannot encode a reply: {exc}")
            return encode(error_reply(reply.get("rid"), EdaError("request failed")))

    def _send(self, out: Mapping[Envelope, list[bytes]]) -> None:
        for identity, replies in out.items():
            try:  # noqa: SIM105 (per reply: cheaper than contextlib.suppress)
                self.sock.send_multipart([*identity, *replies], zmq.NOBLOCK)
            except zmq.ZMQError:  # the client is gone or not reading
                pass

    def reply(self, identity: Envelope, rid: object, fields: Mapping[str, Any]) -> None:
        """Answer a deferred request (at :meth:`release`, if held)."""
        data = self._encode({**fields, "rid": rid, "ok": True})
        if self.held is not None:
            self.held.setdefault(identity, []).append(data)
        else:
            self._send({identity: [data]})

    def hold(self) -> None:
        """Gather deferred replies until :meth:`release` (one message per asker)."""
        if self.held is None:
            self.held = {}

    def release(self) -> None:
        held, self.held = self.held, None
        if held:
            self._send(held)

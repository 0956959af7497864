"""Asking other 2PC daemons from inside a poll loop, never blocking it.

The blocking :class:`~eda.core.reqrep.Client` would stall every other
transaction; a :class:`Peer` queues requests and sends what a turn of the
loop queued as one message, and the replies come back through the loop.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from ..daemon import Daemon, received
from ..errors import ProtocolError
from ..reqrep import decode, encode
from .protocol import MAX_BATCH, printable

Callback = Callable[[dict[str, Any] | None], None]


class Peer:
    """Requests to one endpoint from inside a daemon's loop, never blocking it.

    :meth:`ask` queues the request and returns at once; :meth:`flush` sends
    every queued request as one message (called at the end of the loop's
    turn by :class:`Peers`: one wake-up of the peer for many requests).  The
    callback gets the reply (``None`` when the peer refused it as malformed,
    never for silence: the caller's own timers decide when silence means
    "no").  Garbled replies and replies to forgotten requests are dropped.
    """

    _rids = itertools.count(1)

    def __init__(
        self,
        daemon: Daemon,
        endpoint: str,
        max_pending: int = 100_000,
        queued: Callable[[Peer], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.endpoint = endpoint
        self.max_pending = max_pending
        self.pending: dict[int, Callback] = {}
        self.outbox: list[bytes] = []
        self.queued = queued
        self.sock = daemon.socket(zmq.DEALER, max_message=1 << 20)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)  # a peer long gone: retries are dropped
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:  # an endpoint zmq refuses: no socket left behind
            daemon.close_socket(self.sock)
            raise ProtocolError(f"cannot connect to {printable(endpoint, 80)}: {exc}") from None
        daemon.watch(self.sock, f"replies from {endpoint}", self._drain)

    def ask(self, msg: dict[str, Any] | bytes, callback: Callback) -> int:
        """Queue *msg* (an object, or one already encoded, without its rid)."""
        rid = next(self._rids)
        if len(self.pending) >= self.max_pending:  # a peer that never answers: forget the oldest
            self.pending.pop(next(iter(self.pending)))
        self.pending[rid] = callback
        if isinstance(msg, bytes):  # encoded once for every participant: splice the rid in
            frame = b'{"rid":%d,%s' % (rid, msg[1:])
        else:
            msg["rid"] = rid
            frame = encode(msg)
        self.outbox.append(frame)
        if len(self.outbox) == 1:
            if self.queued is None:
                self.flush()
            else:
                self.queued(self)
        return rid

    def flush(self) -> None:
        """Send the queued requests, as few messages as :data:`MAX_BATCH` allows."""
        outbox, self.outbox = self.outbox, []
        for start in range(0, len(outbox), MAX_BATCH):
            try:  # noqa: SIM105 (per message)
                self.sock.send_multipart(outbox[start : start + MAX_BATCH], zmq.NOBLOCK)
            except zmq.ZMQError:  # unanswered: the caller's timers take it from there
                pass

    def forget(self, rid: int) -> None:
        self.pending.pop(rid, None)

    def _drain(self) -> None:
        for (frame,) in received(self.sock, multipart=False):
            try:
                reply = decode(frame)
            except ProtocolError as exc:
                self.daemon.dropped(f"reply from {self.endpoint}", exc)
                continue
            rid = reply.get("rid")
            callback = self.pending.pop(rid, None) if isinstance(rid, int) else None
            if callback is not None:
                self.daemon.guarded("reply", callback, reply)

    def close(self) -> None:
        self.pending.clear()
        self.daemon.close_socket(self.sock)


MAX_PEERS = 256  # endpoints with a socket open at once (the least recently used is closed)


class Peers:
    """One :class:`Peer` per endpoint, made when first needed; what they queue
    during a turn of the loop is sent at its end (or at :meth:`flush`).

    At most *max_peers* stay open: endpoints come from peers' messages (a
    prepare's ``reply_to``), and a flood of made-up ones must not use up the
    daemon's descriptors.  Closing one forgets its unanswered requests; the
    callers' timers take it from there, as for any silent peer.
    """

    def __init__(self, daemon: Daemon, max_peers: int = MAX_PEERS) -> None:
        self.daemon = daemon
        self.max_peers = max_peers
        self.by_endpoint: OrderedDict[str, Peer] = OrderedDict()
        self.dirty: list[Peer] = []

    def get(self, endpoint: str) -> Peer:
        peer = self.by_endpoint.get(endpoint)
        if peer is None:
            while len(self.by_endpoint) >= self.max_peers:
                _, old = self.by_endpoint.popitem(last=False)
                if old in self.dirty:
                    old.flush()
                    self.dirty.remove(old)
                old.close()
            peer = self.by_endpoint[endpoint] = Peer(self.daemon, endpoint, queued=self._queued)
        elif len(self.by_endpoint) > 1:
            self.by_endpoint.move_to_end(endpoint)
        return peer

    def _queued(self, peer: Peer) -> None:
        if not self.dirty:
            self.daemon.after(0, "send", self.flush)
        self.dirty.append(peer)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for peer in dirty:
            peer.flush()

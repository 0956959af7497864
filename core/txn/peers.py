"""Asking other 2PC daemons from inside a poll loop, never blocking it.

The blocking :class:`~eda.core.reqrep.Client` would stall every other
transaction; a :class:`Peer` queues requests and sends what a turn of the
loop queued as one message, and the replies come back through the loop.
Its socket is a long-lived link (:data:`eda.core.sockets.LONG_LIVED`): a
connection cut off by a partition is dropped by ZeroMQ heartbeats and made
again within seconds of the heal.  What the dropped connection carried is the
callers' timers' business, as for any silent peer: a coordinator aborts what
did not vote in time and drives phase two again, a participant in doubt
inquires again.

Secure mode: a peer is a CURVE server whose key was pinned where its endpoint
was learned (:func:`eda.core.reqrep.pin`: a ``--peer NAME=KEY@tcp://...``, a
trusted registry record or announcement, the key a coordinator proved when it
sent a prepare); an endpoint without a pinned key is never connected.  A peer
that refuses this daemon's key (the socket monitor's handshake events) fails
every request waiting for it at once, with the reason, so a transaction aborts
saying why instead of waiting for its vote timeout; for :data:`REFUSED_FOR`
seconds new requests fail the same way, then a new handshake is tried.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from .. import reqrep, security, sockets
from ..daemon import Daemon, received
from ..endpoint import Endpoint
from ..errors import ProtocolError, UsageError
from ..reqrep import decode, encode
from .protocol import MAX_BATCH, printable

Callback = Callable[[dict[str, Any] | None], None]
REFUSED_FOR = 1.0  # s: a peer that refused this key fails requests at once, then is retried


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
        roles: tuple[str, str] = ("peer", "daemon"),
    ) -> None:
        """*roles*: what the peer is and what this daemon is, as refusals name them
        (``("participant", "coordinator")``)."""
        self.daemon = daemon
        self.endpoint = endpoint
        self.max_pending = max_pending
        self.pending: dict[int, Callback] = {}
        self.outbox: list[bytes] = []
        self.queued = queued
        self.roles = roles
        self.refusal: str | None = None  # why the peer refused this daemon's key
        self.refused_at = 0.0
        where = Endpoint.from_peer(endpoint)
        if where is None:
            raise ProtocolError(f"cannot connect to {printable(endpoint, 80)}: not tcp://HOST:PORT")
        self.where = where
        secure = security.active() is not None
        self.key = reqrep.pinned_key(where) if secure else None  # the server key it pins
        if secure and self.key is None:
            raise ProtocolError(f"no trusted key is known for the {roles[0]} at {where.zmq}")
        # a long-lived link: held through a partition, a connection would stay silent
        # until TCP's next retransmission after the heal (seconds to minutes)
        self.sock = daemon.socket(zmq.DEALER, max_message=1 << 20, liveness=sockets.LONG_LIVED)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)  # a peer long gone: retries are dropped
        # secure mode: told at once when the peer refuses this key (before connecting:
        # no handshake event is missed)
        self.mon = self.sock.get_monitor_socket(security.FAILURE_EVENTS) if secure else None
        try:
            sockets.connect(self.sock, where, self.key)
        except (zmq.ZMQError, UsageError) as exc:  # an endpoint zmq refuses: nothing left behind
            self.close()
            raise ProtocolError(f"cannot connect to {printable(endpoint, 80)}: {exc}") from None
        daemon.watch(self.sock, f"replies from {endpoint}", self._drain)
        if self.mon is not None:
            daemon.watch(self.mon, f"handshakes with {endpoint}", self._handshake)

    def ask(self, msg: dict[str, Any] | bytes, callback: Callback) -> int:
        """Queue *msg* (an object, or one already encoded, without its rid).  A peer
        that refused this daemon's key answers at once: ``ok`` false, ``refused`` true."""
        rid = next(self._rids)
        if self.refusal is not None:
            refused = {"ok": False, "refused": True, "error": self.refusal}
            self.daemon.after(0, "refused", lambda: callback(refused))
            return rid
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

    def _handshake(self) -> None:
        """The peer refused this daemon's key (or the handshake failed): every request
        waiting fails now, with the reason, and the socket is closed (no reconnecting
        in the background; :class:`Peers` makes a new one after :data:`REFUSED_FOR`)."""
        why = reqrep.handshake_refusal(self.mon)
        active = security.active()
        if why is None or active is None:
            return
        what, me = self.roles
        why = why.replace("this key", f"the {me}'s key")
        self.refusal = f"the {what} at {self.endpoint} {why} (eda-keys show: {active.public_key})"
        self.refused_at = time.monotonic()
        self.daemon.limited(f"refused:{self.endpoint}", f"warning: {self.refusal}")
        self.outbox.clear()
        pending, self.pending = self.pending, {}
        refused = {"ok": False, "refused": True, "error": self.refusal}
        for callback in pending.values():
            self.daemon.guarded("refused", callback, refused)
        self.close()

    def retry_due(self) -> bool:
        """Whether this peer refused this daemon's key long enough ago to try anew."""
        return self.refusal is not None and time.monotonic() - self.refused_at >= REFUSED_FOR

    def close(self) -> None:
        self.pending.clear()
        if self.mon is not None:
            self.daemon.forget(self.mon)
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.mon.close(0)
            self.mon = None
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

    def __init__(
        self,
        daemon: Daemon,
        max_peers: int = MAX_PEERS,
        roles: tuple[str, str] = ("peer", "daemon"),
    ) -> None:
        """*roles*: what the peers are and what *daemon* is (see :class:`Peer`)."""
        self.daemon = daemon
        self.max_peers = max_peers
        self.roles = roles
        self.by_endpoint: OrderedDict[str, Peer] = OrderedDict()
        self.dirty: list[Peer] = []
        sockets.liveness_scale()  # a bad EDA_LIVENESS_SCALE: an error now, not per peer later

    def get(self, endpoint: str) -> Peer:
        peer = self.by_endpoint.get(endpoint)
        if peer is not None and self._outdated(peer):
            self._drop(endpoint)
            peer = None
        if peer is None:
            while len(self.by_endpoint) >= self.max_peers:
                _, old = self.by_endpoint.popitem(last=False)
                if old in self.dirty:
                    old.flush()
                    self.dirty.remove(old)
                old.close()
            peer = Peer(self.daemon, endpoint, queued=self._queued, roles=self.roles)
            self.by_endpoint[endpoint] = peer
        elif len(self.by_endpoint) > 1:
            self.by_endpoint.move_to_end(endpoint)
        return peer

    def _outdated(self, peer: Peer) -> bool:
        """Whether *peer* must be made anew: it refused this key a while ago (try a new
        handshake), or secure mode pinned another key for its endpoint since."""
        if peer.retry_due():
            return True
        return peer.key is not None and reqrep.pinned_key(peer.where) not in (None, peer.key)

    def _drop(self, endpoint: str) -> None:
        old = self.by_endpoint.pop(endpoint)
        if old in self.dirty:
            self.dirty.remove(old)
        old.close()

    def _queued(self, peer: Peer) -> None:
        if not self.dirty:
            self.daemon.after(0, "send", self.flush)
        self.dirty.append(peer)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for peer in dirty:
            peer.flush()

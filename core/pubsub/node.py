"""The part publishers and subscribers share: a node's socket, its discovery and
watched connections, the limits on per-peer state (the design is in the package
docstring, :mod:`eda.core.pubsub`)."""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import codec, discovery, security, sockets
from ..daemon import bind_socket
from ..endpoint import Endpoint
from ..errors import EdaError, UsageError
from ..limits import BoundedSet

LossCallback = Callable[[str, str, int], None]

GONE_GRACE = 3.0  # s: a subscriber whose connection dropped and is not back by then is reported
END_RESEND = 0.25  # s: an unconfirmed end-of-stream message is sent again this often
CLOSE_LINGER = 0.5  # s: a closing subscriber's goodbye gets this long to leave
UNREADY_AFTER = 3.0  # s: an explicit --connect with no handshake by then is reported
QUEUE_BYTES = 64 << 20  # a subscriber queues at most about this many bytes of batches
MAX_EVENTS_PER_RECEIVE = 1 << 16  # Subscriber.receive returns about this many events at most
_RECV_HWM_CAP = max(16, QUEUE_BYTES // codec.MAX_BATCH_BYTES)
MAX_DISCOVERED = 64  # connections one node makes to peers found by mDNS
# per-peer state keyed by what peers send (CONVENTIONS.md §7): beyond these, the least
# recently used keys are forgotten, counted in ``evicted`` (shown by eda-pub/eda-sub -v)
MAX_PEERS = 4096  # peer ids a node remembers (publishers greeting, subscribers joining)
MAX_STREAMS = 16_384  # (publisher, topic) sequences a subscriber follows
HANDSHAKE_TIMEOUT = 3.0  # seconds a discovered peer has to greet us before it may be dropped


def new_id() -> str:
    # os.urandom is what secrets.token_hex reads; secrets would load OpenSSL (hashlib, for
    # hmac) on every one-shot command's start-up
    return os.urandom(4).hex()


_PEER_ID = re.compile(r"[0-9A-Za-z_-]{1,32}")  # what a beacon, goodbye or ack may name


def _check_resolvable(endpoint: Endpoint) -> None:
    """Resolve a host name now: ZeroMQ would retry an unknown name silently forever."""
    if endpoint.is_literal:
        return
    try:
        socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise EdaError(
            f"cannot connect to {endpoint.zmq}: cannot resolve {endpoint.host!r}: {reason}"
        ) from None


def _connect(sock: zmq.Socket[Any], endpoint: Endpoint, key: bytes | None = None) -> str:
    """Connect *sock* to *endpoint* (secure mode: the server whose public key is *key*);
    the ``tcp://`` text connected to."""
    if endpoint.host == "*" or endpoint.port == 0:
        raise UsageError(f"cannot connect to {endpoint.zmq}: give a host and a port")
    _check_resolvable(endpoint)
    try:
        return sockets.connect(sock, endpoint, key)
    except zmq.ZMQError as exc:
        raise UsageError(f"cannot connect to {endpoint.zmq}: {exc}") from None


class _Watch:
    """Explicitly given endpoints, followed by a socket monitor until each completes a
    ZMTP handshake (a closed port or a stalled peer never does).

    In secure mode (*secure*) it also watches for failed handshakes on every
    connection this node made (a server refusing its key), for the node's
    whole life: :attr:`failed` collects (endpoint, reason).
    """

    def __init__(self, sock: zmq.Socket[bytes], secure: bool = False) -> None:
        self._sock = sock
        self._secure = secure
        self._mon: zmq.Socket[bytes] | None = None
        self.since: dict[str, float] = {}  # endpoint -> when connected; gone once it answered
        self.refused: set[str] = set()
        self.reported: set[str] = set()
        self.failed: list[tuple[str, str]] = []  # (endpoint, why), taken by the node

    def open(self) -> None:
        """Start monitoring (before connecting, so no handshake event is missed)."""
        if self._mon is None:
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED
            if self._secure:
                events |= security.FAILURE_EVENTS
            self._mon = self._sock.get_monitor_socket(events)

    def add(self, endpoint: str) -> None:
        self.since.setdefault(endpoint, time.monotonic())

    def update(self) -> None:
        for event in sockets.monitor_events(self._mon):
            endpoint = event.endpoint
            if event.event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.since.pop(endpoint, None)
                self.refused.discard(endpoint)
                continue
            why = security.handshake_failure(event.event, event.value)
            if why is not None:
                self.failed.append((endpoint, why))
            elif endpoint in self.since:
                self.refused.add(endpoint)
        if self._mon is not None and not self.since and not self._secure:
            self.close()  # everything answered: no more monitoring cost

    def unready(self, older_than: float = 0.0) -> list[tuple[str, bool]]:
        """(endpoint, refused) for endpoints without a handshake for *older_than* seconds."""
        self.update()
        now = time.monotonic()
        return [(ep, ep in self.refused) for ep, t in self.since.items() if now - t >= older_than]

    def close(self) -> None:
        if self._mon is not None:
            self._sock.disable_monitor()
            self._mon.close(0)
            self._mon = None


def ephemeral_endpoint(interface: str | None) -> Endpoint:
    """Any port on *interface* (an address), or on every interface."""
    return Endpoint(interface or "*", 0)


class _Node:
    """What publishers and subscribers share: a socket, its wiring and its mDNS presence.

    Discovered peers arrive from zeroconf's thread on a queue; the socket's
    own thread connects to them (ZeroMQ sockets are not thread-safe), skipping
    those already connected to us (*linked* holds their ids).
    """

    announce_type = ""  # DNS-SD type this node announces
    browse_type = ""  # DNS-SD type of the peers it looks for

    def __init__(
        self, ctx: zmq.Context[Any], sock: zmq.Socket[bytes], interface: str | None
    ) -> None:
        self.id = new_id()
        self.ctx = ctx  # one context per node: closing one never waits for another's sockets
        self.sock = sock
        self._watch: _Watch | None = None
        self.interface = interface
        self.endpoints: list[str] = []  # bound, as tcp://HOST:PORT
        self.bound: list[Endpoint] = []  # the same, typed
        self.linked: BoundedSet[str] = BoundedSet(MAX_PEERS)  # peer ids connected to us
        # called for each discovered peer this node is connected with, whichever side
        # dialed: we connected to it, or it had connected to us first (once; both
        # sides browse, so which one dials first is a race)
        self.on_connect: Callable[[discovery.Peer], None] | None = None
        self._reported: BoundedSet[str] = BoundedSet(MAX_PEERS)  # peer ids on_connect got
        self._connected: set[str] = set()  # endpoints we connected to
        # discovered peers (or the names of withdrawn ones) from zeroconf's threads
        self._peers: queue.SimpleQueue[discovery.Peer | str] = queue.SimpleQueue()
        self._discovery: discovery.Discovery | None = None
        # endpoint -> (peer, when connected) for connections made from discovery
        self._from_discovery: dict[str, tuple[discovery.Peer, float]] = {}
        self._backlog: collections.deque[discovery.Peer] = collections.deque(maxlen=MAX_DISCOVERED)
        self.unreachable: list[discovery.Peer] = []  # announced, but no answer to a probe in time
        self.seen_before = 0  # peers the discovery cache knew (one-shot discovery)
        self.security = security.active()
        # secure mode: a discovered peer skipped, and why (untrusted key, or not secure;
        # or, not secure here, a secure peer); called from the socket's thread
        self.on_ignored: Callable[[discovery.Peer, str], None] | None = None
        # secure mode: a server refused this node's key, (endpoint, why); dropped then
        self.on_refused: Callable[[str, str], None] | None = None
        self.refused: dict[str, str] = {}  # endpoint -> why its server refused us
        self._peer_at: dict[str, str] = {}  # endpoint -> peer id, for connections we made
        if self.security is not None:
            self._watch = _Watch(sock, secure=True)
            self._watch.open()

    def admit(self, peer: discovery.Peer) -> bytes | None:
        """The key to connect to a discovered *peer* with (b"": plain ZeroMQ), or None to
        skip it: secure and insecure never mix, and a secure node pins trusted keys only."""
        key, why = security.admission(peer.key)
        if key is None:
            self._ignore(peer, why)
        return key

    def _ignore(self, peer: discovery.Peer, why: str) -> None:
        if self.on_ignored is not None:
            self.on_ignored(peer, why)

    def take_refusals(self) -> list[tuple[str, str]]:
        """Servers that refused this node's key since the last call, as (endpoint, why).

        Each such connection is dropped (libzmq would retry it forever).
        """
        watch = self._watch
        if watch is None or self.security is None:
            return []
        watch.update()
        failed, watch.failed = watch.failed, []
        out = []
        for endpoint, why in failed:
            if endpoint not in self._connected or endpoint in self.refused:
                continue  # a client refused at our bound port, or already reported
            self.refused[endpoint] = why
            self._connected.discard(endpoint)
            self._from_discovery.pop(endpoint, None)
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disconnect(endpoint)
            out.append((endpoint, why))
            if self.on_refused is not None:
                self.on_refused(endpoint, why)
        return out

    def bind(self, endpoint: Endpoint | str) -> str:
        """Bind (text is parsed first: :class:`UsageError`); the ``tcp://`` endpoint bound."""
        real = bind_socket(self.sock, endpoint)
        self.bound.append(real)
        self.endpoints.append(real.zmq)
        return real.zmq

    def connect(
        self, endpoint: Endpoint | str, *, watch: bool = False, key: bytes | None = None
    ) -> None:
        """Connect to *endpoint*; with *watch*, follow it until it answers (see :meth:`unready`).

        Text is parsed first (:class:`UsageError`); a host name that does not
        resolve is an EdaError at once.  Secure mode: *key* is the server's
        public key; text may name it as ``NAME@tcp://HOST:PORT`` (NAME trusted).
        """
        if isinstance(endpoint, str) and self.security is not None and key is None:
            key, endpoint = self.security.pinned(endpoint)
        where = endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint, "connect")
        text = where.zmq
        if text not in self._connected:
            if watch:
                if self._watch is None:
                    self._watch = _Watch(self.sock)
                self._watch.open()
            _connect(self.sock, where, key or None)
            self._connected.add(text)
            if watch and self._watch is not None:
                self._watch.add(text)

    def unready(self, older_than: float = 0.0) -> list[tuple[str, bool]]:
        """Watched endpoints that have not completed a handshake within *older_than*
        seconds of connecting, as (endpoint, connection refused)."""
        return self._watch.unready(older_than) if self._watch is not None else []

    def bind_for_announce(self) -> None:
        """Bind the port :meth:`announce` will announce (from the socket's thread)."""
        if not self.endpoints:
            self.bind(ephemeral_endpoint(self.interface))

    def announce(self, patterns: list[str], on_ready: Callable[[], None] | None = None) -> None:
        """Announce this node and keep finding peers (safe from any thread).

        *on_ready* is called (from another thread) once the announcement is
        registered, i.e. peers can find this node.
        """
        port = self.bound[0].port
        found = discovery.Discovery(self.interface)
        key = self.security.public_key if self.security is not None else None
        # the id is random (32 bits) and new for each process: no conflict to probe for,
        # so a starting subscriber is found at once, not after about a second
        found.announce_peer(
            self.announce_type, self.id, port, patterns, on_ready, unique=True, key=key
        )
        found.browse(self.browse_type, self._peers.put, self._peers.put)
        self._discovery = found

    def connect_discovered(self) -> None:
        """Connect to the peers discovered since the last call.

        :attr:`on_connect` hears of each connection made, and once of a peer
        found already connected to us (it greeted first), which is not dialed.
        At most :data:`MAX_DISCOVERED` connections come from discovery; more
        peers wait in a bounded backlog.  When that is full, a connection
        whose peer never greeted us (no welcome or beacon within
        :data:`HANDSHAKE_TIMEOUT`) makes room; one whose peer withdrew its
        announcement before greeting is closed at once.  Peers that did greet
        are never disconnected here (their last messages may be in flight).
        """
        mine = self._from_discovery

        def drop(endpoint: str) -> None:
            mine.pop(endpoint, None)
            if endpoint in self._connected:
                self._connected.discard(endpoint)
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.disconnect(endpoint)

        def report(peer: discovery.Peer, again: bool = False) -> None:
            if again or peer.id not in self._reported:
                self._reported.add(peer.id)
                if self.on_connect is not None:
                    self.on_connect(peer)

        def connect_waiting() -> None:
            while self._backlog and len(mine) < MAX_DISCOVERED:
                peer = self._backlog.popleft()
                if peer.id in self.linked:
                    report(peer)  # it connected to us first: linked all the same
                    continue
                if peer.endpoint in self._connected:
                    continue
                key = self.admit(peer)
                if key is None:
                    continue
                self.connect(peer.endpoint, key=key)
                mine[peer.endpoint] = (peer, time.monotonic())
                report(peer, again=True)  # (each connection we make, as before)

        while True:
            try:
                item = self._peers.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):  # withdrawn
                for endpoint in [
                    e for e, (p, _) in mine.items() if p.name == item and p.id not in self.linked
                ]:
                    drop(endpoint)
            elif item.id in self.linked:
                report(item)  # it connected to us first: linked all the same
            elif not (item.endpoint in self._connected or item in self._backlog):
                self._backlog.append(item)  # when full, the oldest waiting one is dropped
            connect_waiting()
        if self._backlog and len(mine) >= MAX_DISCOVERED:
            now = time.monotonic()
            stale = [
                e
                for e, (p, since) in mine.items()
                if p.id not in self.linked and now - since > HANDSHAKE_TIMEOUT
            ]
            for endpoint in stale[: len(self._backlog)]:
                drop(endpoint)
            connect_waiting()

    def close(self, linger: float = 0.0) -> None:
        """Withdraw from mDNS; hand queued messages to the network (at most *linger* s)."""
        if self._discovery is not None:
            self._discovery.close()
        if self._watch is not None:
            self._watch.close()
        self.sock.setsockopt(zmq.LINGER, int(linger * 1000))
        self.sock.close()
        if self.security is not None:
            self.security.release(self.ctx)  # its ZAP handler, before the context ends
        self.ctx.term()  # this node's context only: returns once its queue left or linger ran out

"""Brokerless publish/subscribe over ZeroMQ XPUB/SUB sockets, wired by mDNS.

Both sides can connect: a subscriber binds an ephemeral port and announces
it (``_eda-sub._tcp``), so a publisher that starts later connects straight to
every running subscriber and waits until each one's subscriptions have
arrived before sending (the slow-joiner fix); a streaming publisher also
binds and announces (``_eda-pub._tcp``), so subscribers that start later
connect to it.  The welcome message and beacon subscriptions of
:mod:`eda.core.codec` tell each side who is already connected to it, so a
pair never ends up with two connections; sequence numbers drop any
duplicate that a race still lets through.
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from . import codec, discovery
from .errors import UsageError
from .topics import Matcher

LossCallback = Callable[[str, str, int], None]

MAX_DISCOVERED = 64  # connections one node makes to peers found by mDNS
HANDSHAKE_TIMEOUT = 3.0  # seconds a discovered peer has to greet us before it may be dropped


def new_id() -> str:
    return secrets.token_hex(4)


def _bind(sock: zmq.Socket[Any], endpoint: str) -> str:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise UsageError(f"cannot bind {endpoint}: {exc}") from None
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def _connect(sock: zmq.Socket[Any], endpoint: str) -> None:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise UsageError(f"cannot connect to {endpoint}: {exc}") from None


def ephemeral_endpoint(interface: str | None) -> str:
    return f"tcp://{interface or '*'}:*"


class _Node:
    """What publishers and subscribers share: a socket, its wiring and its mDNS presence.

    Discovered peers arrive from zeroconf's thread on a queue; the socket's
    own thread connects to them (ZeroMQ sockets are not thread-safe), skipping
    those already connected to us (*linked* holds their ids).
    """

    announce_type = ""  # DNS-SD type this node announces
    browse_type = ""  # DNS-SD type of the peers it looks for

    def __init__(self, sock: zmq.Socket[bytes], interface: str | None) -> None:
        self.id = new_id()
        self.sock = sock
        self.interface = interface
        self.endpoints: list[str] = []
        self.linked: set[str] = set()  # peer ids known to be connected to us
        self.on_connect: Callable[[discovery.Peer], None] | None = None
        self._connected: set[str] = set()  # endpoints we connected to
        # discovered peers (or the names of withdrawn ones) from zeroconf's threads
        self._peers: queue.SimpleQueue[discovery.Peer | str] = queue.SimpleQueue()
        self._discovery: discovery.Discovery | None = None
        # endpoint -> (peer, when connected) for connections made from discovery
        self._from_discovery: dict[str, tuple[discovery.Peer, float]] = {}
        self._backlog: collections.deque[discovery.Peer] = collections.deque(maxlen=MAX_DISCOVERED)
        self.unreachable: list[discovery.Peer] = []  # announced, but no answer to a probe in time
        self.seen_before = 0  # peers the discovery cache knew (one-shot discovery)

    def bind(self, endpoint: str) -> str:
        real = _bind(self.sock, endpoint)
        self.endpoints.append(real)
        return real

    def connect(self, endpoint: str) -> None:
        if endpoint not in self._connected:
            _connect(self.sock, endpoint)
            self._connected.add(endpoint)

    def bind_for_announce(self) -> None:
        """Bind the port :meth:`announce` will announce (from the socket's thread)."""
        if not self.endpoints:
            self.bind(ephemeral_endpoint(self.interface))

    def announce(self, patterns: list[str], on_ready: Callable[[], None] | None = None) -> None:
        """Announce this node and keep finding peers (safe from any thread).

        *on_ready* is called (from another thread) once the announcement is
        registered, i.e. peers can find this node.
        """
        port = int(self.endpoints[0].rsplit(":", 1)[1])
        found = discovery.Discovery(self.interface)
        found.announce_peer(self.announce_type, self.id, port, patterns, on_ready)
        found.browse(self.browse_type, self._peers.put, self._peers.put)
        self._discovery = found

    def connect_discovered(self) -> None:
        """Connect to the peers discovered since the last call.

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

        def connect_waiting() -> None:
            while self._backlog and len(mine) < MAX_DISCOVERED:
                peer = self._backlog.popleft()
                if peer.id in self.linked or peer.endpoint in self._connected:
                    continue
                self.connect(peer.endpoint)
                mine[peer.endpoint] = (peer, time.monotonic())
                if self.on_connect is not None:
                    self.on_connect(peer)

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
            elif not (
                item.id in self.linked or item.endpoint in self._connected or item in self._backlog
            ):
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
        self.sock.setsockopt(zmq.LINGER, int(linger * 1000))
        self.sock.close()
        zmq.Context.instance().term()  # returns once queued messages left or linger ran out


class Publisher(_Node):
    """An XPUB socket that sends batches of events with per-topic sequence numbers."""

    announce_type = discovery.PUB_TYPE
    browse_type = discovery.SUB_TYPE

    def __init__(
        self,
        *,
        headers: dict[str, str] | None = None,
        source: str | None = None,
        interface: str | None = None,
        hwm: int = 10_000,
        block: bool = False,
    ) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
        super().__init__(sock, interface)
        self.pubid = self.id
        self.source = source or f"eda://{socket.gethostname()}/pub/{self.pubid}"
        self._origin = codec.encode_origin(self.pubid, self.source)
        self._ext = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
        self._seq: dict[str, int] = {}
        self._envelope_ids = 0
        self.subscribers = self.linked  # ids whose beacon arrived
        # called with a subscriber's id once its subscriptions have arrived
        self.on_subscriber: Callable[[str], None] | None = None
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        sock.setsockopt(zmq.XPUB_WELCOME_MSG, codec.WELCOME_PREFIX + self.pubid.encode())
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_NODROP, int(block))
        sock.setsockopt(zmq.LINGER, 0)

    def connect_subscribers(self, timeout: float = 0.15) -> set[str]:
        """Connect to every subscriber found now; return the ids to wait for.

        Found means: answering a one-shot mDNS query (asked several times
        within *timeout*), or remembered in the discovery cache; either way
        answering a probe (TCP connect and ZMTP greeting).  Announced
        subscribers that do not answer the probe in time are left out and
        listed in :attr:`unreachable`; :attr:`seen_before` is how many the
        cache knew.
        """
        found = discovery.discover(discovery.SUB_TYPE, interface=self.interface, timeout=timeout)
        self.unreachable = found.unreachable
        self.seen_before = found.cached
        ids = set()
        for peer in found.peers:
            self.connect(peer.endpoint)
            ids.add(peer.id)
        return ids

    def service(self) -> None:
        """Read subscription messages and act on newly discovered subscribers."""
        sock = self.sock
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01" and msg[1:3] == codec.BEACON_PREFIX:
                subid = msg[3:].decode(errors="replace")
                if subid not in self.subscribers:
                    self.subscribers.add(subid)
                    if self.on_subscriber is not None:
                        self.on_subscriber(subid)
        self.connect_discovered()

    def wait_for(self, ids: Iterable[str], count: int, timeout: float) -> set[str]:
        """Wait until the subscribers *ids* (and at least *count* in all) are connected.

        Returns the ids still missing when *timeout* ran out.
        """
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            self.service()
            missing = wanted - self.subscribers
            if not missing and len(self.subscribers) >= count:
                return set()
            left = deadline - time.monotonic()
            if left <= 0:
                return missing
            self.sock.poll(max(1, int(min(left, 0.05) * 1000)))

    # -- sending (hot path) ---------------------------------------------------
    def send(self, topic: str, body: bytes, count: int, kind: int = codec.TEXT) -> None:
        """Send *count* events of *topic* as one batch (see :mod:`eda.core.codec`)."""
        seq = self._seq.get(topic, 1)
        self._seq[topic] = seq + count
        frames = [
            topic.encode(),
            codec.encode_header(kind, count, seq, time.time(), self._origin),
            body,
        ]
        if self._ext:
            frames.append(self._ext)
        self.sock.send_multipart(frames, copy=len(body) < 65536)

    def next_envelope_id(self) -> str:
        self._envelope_ids += 1
        return f"{self.pubid}-e{self._envelope_ids}"

    @property
    def total_sent(self) -> int:
        return sum(self._seq.values()) - len(self._seq)


class Subscriber(_Node):
    """A SUB socket that yields accepted batches, reporting gaps and dropping duplicates."""

    announce_type = discovery.SUB_TYPE
    browse_type = discovery.PUB_TYPE

    def __init__(
        self,
        patterns: list[str],
        *,
        interface: str | None = None,
        hwm: int = 10_000,
        on_loss: LossCallback | None = None,
        on_connect: Callable[[discovery.Peer], None] | None = None,
    ) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        super().__init__(sock, interface)
        self.matcher = Matcher(patterns)
        self.on_connect = on_connect
        self.subid = self.id
        self.on_loss = on_loss
        self.malformed = 0
        self.publishers = self.linked  # pubids whose welcome arrived
        self._next: dict[tuple[str, str], int] = {}
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        for prefix in self.matcher.prefixes():
            sock.subscribe(prefix.encode())
        sock.subscribe(codec.WELCOME_PREFIX)
        sock.subscribe(codec.BEACON_PREFIX + self.subid.encode())

    def poll(self, timeout: float | None) -> bool:
        """Wait up to *timeout* seconds (None: forever) for a message."""
        self.connect_discovered()
        if timeout is None:
            while not self.sock.poll(100):
                self.connect_discovered()
            return True
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self.sock.poll(max(0, int(min(left, 0.1) * 1000))):
                return True
            self.connect_discovered()
            if left <= 0.1:
                return bool(self.sock.poll(0))

    def receive(self, max_messages: int = 256) -> list[codec.Batch]:
        """Accept every message waiting now (at most *max_messages*), without blocking."""
        out: list[codec.Batch] = []
        recv = self.sock.recv_multipart
        matcher = self.matcher
        nxt = self._next
        for _ in range(max_messages):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[0][:1] == b"\x00":
                if frames[0][:2] == codec.WELCOME_PREFIX:
                    self.publishers.add(frames[0][2:].decode(errors="replace"))
                continue
            try:
                batch = codec.decode(frames)
            except codec.WireError:
                self.malformed += 1
                continue
            if not matcher(batch.topic):
                continue
            key = (batch.pubid, batch.topic)
            expected = nxt.get(key)
            nxt[key] = batch.seq + batch.size
            if expected is None or batch.seq == expected:
                out.append(batch)
            elif batch.seq > expected:
                if self.on_loss is not None:
                    self.on_loss(batch.source, batch.topic, batch.seq - expected)
                out.append(batch)
            else:
                nxt[key] = max(expected, batch.seq + batch.size)
                trimmed = _trim(batch, expected)
                if trimmed is not None:
                    out.append(trimmed)
        return out


def _trim(batch: codec.Batch, first_seq: int) -> codec.Batch | None:
    """*batch* without the events before *first_seq* (duplicates), or None."""
    skip = first_seq - batch.seq
    if skip >= batch.size:
        return None
    parts = codec.split_body(batch)[skip:]
    return batch._replace(seq=first_seq, size=len(parts), body=b"\n".join(parts))

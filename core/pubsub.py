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

Loss is accounted on both sides (README, "Loss is never silent"):

* Publisher sockets set ``ZMQ_IMMEDIATE``, so a subscriber whose connection
  drops (killed, exited) loses its queue at once instead of blocking
  ``--block`` forever.  (No ZMTP heartbeats: libzmq 4.3 stops them while a
  queue is full and can abort on them once a full connection closes; and a
  frozen peer cannot be told from a slow reader at the TCP level.)
  XPUB then hands up the removal of that subscriber's beacon subscription,
  which tells the publisher *who* went; unless it is back within
  ``GONE_GRACE`` seconds it is reported with the number of events it missed.
* At the end, :meth:`Publisher.finish` sends every subscriber an
  end-of-stream message (addressed by its beacon, so only it receives it)
  carrying, per topic, the first sequence due to it (when it joined) and the
  next sequence.  The subscriber reports any head or tail gap it shows and
  acknowledges by subscribing to ``\\0A<pubid> <subid> <lost>`` (and
  unsubscribing at once).  The end is resent until acknowledged or the
  linger runs out; what was not confirmed is reported by the publisher.
* A subscriber that leaves on purpose (``-C``, SIGINT) says goodbye
  (``\\0B<subid>``), so its departure is not reported as loss.

None of this touches the per-event path: it costs one message per subscriber
at the end and a few control messages when subscribers come and go.

Secure mode (:mod:`eda.core.security`, turned on before a node is made):
every connection is CURVE.  A node announces its public key (TXT ``k``) and
connects only to discovered peers whose announced key it trusts, pinning
that key (CURVE proves the peer holds it); a peer announcing an untrusted
key, or none, is skipped and handed to :attr:`_Node.on_ignored`.  Peers
connecting to a node's bound port are admitted by the ZAP handler (trusted
keys only).  An explicit ``--connect`` names the server's trusted name,
``NAME@tcp://HOST:PORT``.  The socket monitor reports a server refusing
this key (``EVENT_HANDSHAKE_FAILED_AUTH``) within milliseconds; the
connection is then dropped and the refusal handed to :attr:`_Node.on_refused`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import codec, discovery, security, sockets
from .daemon import bind_socket
from .endpoint import Endpoint
from .errors import EdaError, UsageError
from .limits import BoundedMap, BoundedSet
from .sockets import new_socket
from .topics import Matcher

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
    return secrets.token_hex(4)


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
        from zmq.utils.monitor import recv_monitor_message

        mon = self._mon
        while mon is not None and mon.poll(0):
            event = recv_monitor_message(mon)
            endpoint = event["endpoint"].decode(errors="replace")
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.since.pop(endpoint, None)
                self.refused.discard(endpoint)
                continue
            why = security.handshake_failure(event["event"], event["value"])
            if why is not None:
                self.failed.append((endpoint, why))
            elif endpoint in self.since:
                self.refused.add(endpoint)
        if mon is not None and not self.since and not self._secure:
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
        if self.security is None:
            if peer.key:
                self._ignore(peer, "it is in secure mode (--secure) and this program is not")
                return None
            return b""
        if not peer.key:
            self._ignore(peer, "it is not in secure mode")
            return None
        if self.security.trusts(peer.key) is None:
            self._ignore(peer, f"its key {peer.key} is not trusted (eda-keys trust NAME KEY)")
            return None
        return peer.key.encode()

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


@dataclass(frozen=True)
class Departure:
    """A subscriber whose connection dropped and did not come back."""

    subid: str
    after: float  # seconds since its connection dropped
    sent_before: int  # events sent between its joining and the drop (the last of them may be lost)
    sent_after: int  # events sent since (none of them reached it)


@dataclass
class Outcome:
    """What :meth:`Publisher.finish` found out about each subscriber."""

    lost: dict[str, int] = field(default_factory=dict)  # subid -> events it confirmed lost
    unconfirmed: dict[str, int] = field(default_factory=dict)  # subid -> events due to it
    gone: list[Departure] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.unconfirmed or self.gone)


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
        ctx: zmq.Context[Any] = zmq.Context()
        sock = new_socket(zmq.XPUB, context=ctx)
        super().__init__(ctx, sock, interface)
        # what its events and end of stream carry: 128 random bits, since a subscriber
        # that outlives publisher runs takes an id it saw before for the same stream
        # and drops sequences it already had as copies (self.id, in mDNS names and
        # the welcome, stays short)
        self.pubid = secrets.token_hex(16)
        self.source = source or f"eda://{socket.gethostname()}/pub/{self.pubid}"
        self._origin = codec.encode_origin(self.pubid, self.source)
        self._ext = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
        self._seq: dict[str, int] = {}
        self._envelope_ids = 0
        self.subscribers = self.linked  # ids whose beacon arrived (at most MAX_PEERS)
        self.linked.on_evict = self._forget_subscribers
        # called with a subscriber's id once its subscriptions have arrived
        self.on_subscriber: Callable[[str], None] | None = None
        # called with a departed subscriber's record once it is reported gone
        self.on_gone: Callable[[Departure], None] | None = None
        # subid -> next sequences when it joined (entries go with the subscriber)
        self._joined: dict[str, dict[str, int]] = {}
        self.joined = 0  # subscribers that joined at some point
        self._acks: BoundedMap[str, int] = BoundedMap(MAX_PEERS)  # subid -> it confirmed lost
        self._left: BoundedSet[str] = BoundedSet(MAX_PEERS)  # subscribers that said goodbye
        self._dropped: dict[str, tuple[float, int]] = {}  # subid -> (when, total_sent then)
        # subscribers reported gone: the last MAX_PEERS of them, and how many in all
        self.gone: collections.deque[Departure] = collections.deque(maxlen=MAX_PEERS)
        self.gone_count = 0
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        sock.setsockopt(zmq.XPUB_WELCOME_MSG, codec.WELCOME_PREFIX + self.id.encode())
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_NODROP, int(block))
        # queue only to live connections: a dropped subscriber's queue goes with it,
        # so --block cannot wait forever on a dead peer (and XPUB reports who left)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)

    def connect_subscribers(self, timeout: float = 0.15, topic: str | None = None) -> set[str]:
        """Connect to every subscriber found now; return the ids to wait for.

        Found means: answering a one-shot mDNS query (asked several times
        within *timeout*), or remembered in the discovery cache; either way
        answering a probe (TCP connect and ZMTP greeting).  Announced
        subscribers that do not answer the probe in time are left out and
        listed in :attr:`unreachable`; :attr:`seen_before` is how many the
        cache knew that may want *topic* and are gone now.  With *topic*,
        subscribers whose announced patterns cannot match it are connected
        (a later topic may be theirs) but not waited for.
        """
        found = discovery.discover(discovery.SUB_TYPE, interface=self.interface, timeout=timeout)
        self.unreachable = [
            p for p in found.unreachable if topic is None or discovery.may_want(p, topic)
        ]
        # seen before and wanting this topic, but not found now: gone
        here = {p.id for p in found.peers} | {p.id for p in found.unreachable}
        self.seen_before = sum(
            1
            for p in found.seen
            if p.id not in here and (topic is None or discovery.may_want(p, topic))
        )
        ids = set()
        for peer in found.peers:
            key = self.admit(peer)
            if key is None:
                continue
            self.connect(peer.endpoint, key=key)
            self._peer_at[peer.endpoint] = peer.id
            if topic is None or discovery.may_want(peer, topic):
                ids.add(peer.id)
        return ids

    def service(self) -> None:
        """Read subscription messages: subscribers joining, leaving, confirming."""
        sock = self.sock
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[1:2] == b"\x00":  # a control subscription; topics never start with NUL
                self._control(msg[:1] == b"\x01", msg[1:3], msg[3:])
        if self.security is not None:
            self.take_refusals()
        if self._dropped:
            self._report_gone(GONE_GRACE)
        self.connect_discovered()

    def _control(self, subscribe: bool, tag: bytes, rest: bytes) -> None:
        text = rest.decode(errors="replace")
        if tag != codec.ACK_PREFIX and not _PEER_ID.fullmatch(text):
            return  # not an id eda gives (a peer's odd subscription): never state
        if tag == codec.BEACON_PREFIX:
            if subscribe:
                self._dropped.pop(text, None)  # (back within the grace period: not reported)
                if text not in self.subscribers and text not in self._left:
                    self.subscribers.add(text)
                    self._joined[text] = dict(self._seq)
                    self.joined += 1
                    if self.on_subscriber is not None:
                        self.on_subscriber(text)
            elif text in self._left:
                self._forget(text)
            elif text in self.subscribers:
                self._dropped.setdefault(text, (time.monotonic(), self.total_sent))
        elif subscribe and tag == codec.BYE_PREFIX:
            self._left.add(text)
            self._dropped.pop(text, None)
        elif subscribe and tag == codec.ACK_PREFIX:
            pubid, subid, lost = [*text.split(" "), "", ""][:3]
            if pubid == self.pubid and subid in self.subscribers and lost.isdigit():
                self._acks[subid] = int(lost[:18])

    def _report_gone(self, grace: float) -> None:
        """Report subscribers whose connection dropped *grace* seconds ago and did not return."""
        now = time.monotonic()
        for subid, (since, sent) in list(self._dropped.items()):
            if now - since < grace:
                continue
            joined = sum(self._joined.get(subid, {}).values()) - len(self._joined.get(subid, {}))
            self._forget(subid)
            departure = Departure(subid, now - since, sent - joined, self.total_sent - sent)
            self.gone.append(departure)
            self.gone_count += 1
            if self.on_gone is not None:
                self.on_gone(departure)

    def _forget(self, subid: str) -> None:
        """*subid* is no longer a subscriber (it left, or is reported gone)."""
        self.subscribers.discard(subid)
        self._forget_subscribers({subid: None})

    def _forget_subscribers(self, subids: dict[str, None]) -> None:
        """What is kept about each of *subids* (evicted, or gone) goes with it (but
        the loss it confirmed, reported at the end)."""
        for subid in subids:
            self._dropped.pop(subid, None)
            self._joined.pop(subid, None)

    @property
    def evicted(self) -> int:
        """Subscriber ids forgotten to stay within :data:`MAX_PEERS` (a peer inventing ids)."""
        return self.subscribers.evicted + self._left.evicted + self._acks.evicted

    def wait_for(
        self, ids: Iterable[str], count: int, timeout: float, at_least: float = 0.0
    ) -> set[str]:
        """Wait until the subscribers *ids* (and at least *count* in all) are connected.

        With *at_least*, wait that long in any case (a grace period for
        subscribers that connect to a bound endpoint: nobody knows they exist
        until they do).  Returns the ids still missing when *timeout* ran out.
        """
        wanted = set(ids)
        start = time.monotonic()
        deadline = start + timeout
        while True:
            self.service()
            # a subscriber that refused our key will not come: not waited for
            wanted -= {self._peer_at.get(e, "") for e in self.refused}
            missing = wanted - self.subscribers.keys()
            if (
                not missing
                and len(self.subscribers) >= count
                and time.monotonic() - start >= at_least
            ):
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
    def ever_joined(self) -> int:
        """How many subscribers joined at some point (0: every event reached nobody)."""
        return self.joined

    @property
    def total_sent(self) -> int:
        return sum(self._seq.values()) - len(self._seq)

    # -- the end of the stream ----------------------------------------------------
    def _due(self, subid: str) -> dict[str, list[int]]:
        """Per topic sent since *subid* joined: [first sequence due to it, next sequence]."""
        joined = self._joined.get(subid, {})
        return {
            topic: [joined.get(topic, 1), nxt]
            for topic, nxt in self._seq.items()
            if nxt > joined.get(topic, 1)
        }

    def _send_end(self, subid: str) -> None:
        payload = {"p": self.pubid, "s": self.source, "t": self._due(subid)}
        frames = [
            codec.BEACON_PREFIX + subid.encode(),
            codec.END_MARK,
            json.dumps(payload, separators=(",", ":")).encode(),
        ]
        with contextlib.suppress(zmq.Again):  # --block, queue full: again next round
            self.sock.send_multipart(frames, zmq.NOBLOCK)

    def finish(self, linger: float) -> Outcome:
        """End the stream: wait up to *linger* seconds until every subscriber confirmed it.

        An acknowledgement comes after everything sent before it (one
        connection keeps order), so a confirmed subscriber has nothing queued
        any more and reports exactly what it lost.
        """
        deadline = time.monotonic() + linger
        pending = self.subscribers.keys() - self._left.keys()
        resend = 0.0
        while True:
            self.service()
            pending -= self._left.keys() | self._acks.keys()
            pending &= self.subscribers.keys() | self._dropped.keys()
            now = time.monotonic()
            if pending and now >= resend:  # (sent at least once, even with no linger)
                for subid in pending - self._dropped.keys():
                    self._send_end(subid)
                resend = now + END_RESEND
            if not pending or now >= deadline:
                break
            self.sock.poll(max(1, int(min(deadline - now, resend - now, 0.05) * 1000)))
        self._report_gone(0.0)
        unconfirmed = {
            subid: sum(n - first for first, n in self._due(subid).values())
            for subid in pending
            if subid in self.subscribers
        }
        lost = {subid: n for subid, n in self._acks.items() if n}
        return Outcome(lost, unconfirmed, list(self.gone))


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
        on_unreachable: Callable[[str, bool], None] | None = None,
    ) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = new_socket(zmq.SUB, context=ctx)
        super().__init__(ctx, sock, interface)
        self.matcher = Matcher(patterns)
        self.on_connect = on_connect
        self.subid = self.id
        self.on_loss = on_loss
        # called once per watched endpoint (connect(..., watch=True)) that has not
        # answered UNREADY_AFTER seconds after connecting, with "connection refused"
        self.on_unreachable = on_unreachable
        self.malformed = 0
        self.publishers = self.linked  # pubids whose welcome arrived
        # (pubid, topic) -> [next sequence, first sequence seen (0: unknown)]
        self._streams: BoundedMap[tuple[str, str], list[int]] = BoundedMap(MAX_STREAMS)
        self._lost: BoundedMap[str, int] = BoundedMap(MAX_PEERS)  # pubid -> lost in gaps so far
        # pubid -> events lost, once its end of stream came
        self._ended: BoundedMap[str, int] = BoundedMap(MAX_PEERS)
        # events an end of stream said were sent whose fate is unknown here: their
        # stream was forgotten (more than MAX_STREAMS), so neither delivered nor lost
        self.unaccounted = 0
        self._alarm = False  # a publisher refused this key since poll last returned
        # the queue is bounded in bytes too: a batch of many small events is up to
        # codec.MAX_BATCH_BYTES, so --hwm batches of any size cannot take gigabytes
        sock.setsockopt(zmq.RCVHWM, min(hwm, _RECV_HWM_CAP))
        sock.setsockopt(zmq.IMMEDIATE, 1)  # subscriptions (and the goodbye) go to live peers only
        sock.setsockopt(zmq.LINGER, 0)
        for prefix in self.matcher.prefixes():
            sock.subscribe(prefix.encode())
        sock.subscribe(codec.WELCOME_PREFIX)
        sock.subscribe(codec.BEACON_PREFIX + self.subid.encode())

    def poll(self, timeout: float | None) -> bool:
        """Wait up to *timeout* seconds (None: forever) for a message.

        False (no message) also as soon as a publisher refused this key (secure
        mode: see :meth:`take_refusals`), so a caller never waits in vain.
        """
        self._housekeeping()
        if timeout is None:
            while not self.sock.poll(100):
                self._housekeeping()
                if self._alarm:
                    self._alarm = False
                    return False
            return True
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self.sock.poll(max(0, int(min(left, 0.1) * 1000))):
                return True
            self._housekeeping()
            if self._alarm:
                self._alarm = False
                return False
            if left <= 0.1:
                return bool(self.sock.poll(0))

    def _housekeeping(self) -> None:
        self.connect_discovered()
        if self.security is not None and self.take_refusals():
            self._alarm = True  # poll returns: the caller may have to give up
        if self._watch is not None and self.on_unreachable is not None:
            for endpoint, refused in self._watch.unready(UNREADY_AFTER):
                if endpoint not in self._watch.reported:
                    self._watch.reported.add(endpoint)
                    self.on_unreachable(endpoint, refused)

    def receive(
        self, max_messages: int = 256, max_events: int = MAX_EVENTS_PER_RECEIVE
    ) -> list[codec.Batch]:
        """Accept the messages waiting now, without blocking: at most *max_messages*,
        and no more once *max_events* events are taken (so output keeps flowing
        and memory stays bounded under a burst)."""
        out: list[codec.Batch] = []
        recv = self.sock.recv_multipart
        matcher = self.matcher
        streams = self._streams
        recent = streams.recent.get  # (a hit here is all the per-batch lookup costs)
        events = 0
        for _ in range(max_messages):
            if events >= max_events:
                break
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[0][:1] == b"\x00":
                if frames[0][:2] == codec.WELCOME_PREFIX:
                    pubid = frames[0][2:].decode(errors="replace")
                    if _PEER_ID.fullmatch(pubid):
                        self.publishers.add(pubid)
                    else:
                        self.malformed += 1
                elif frames[0][:2] == codec.BEACON_PREFIX:
                    self._end_of_stream(frames)
                continue
            try:
                batch = codec.decode(frames)
            except codec.WireError:
                self.malformed += 1
                continue
            if not matcher(batch.topic):
                continue
            events += batch.size
            key = (batch.pubid, batch.topic)
            stream = recent(key) or streams.get(key)
            if stream is None:
                # a new stream; after streams were forgotten it may be one of them
                # coming back, whose first sequence is then unknown
                streams[key] = [batch.seq + batch.size, 0 if streams.evicted else batch.seq]
                out.append(batch)
                continue
            expected = stream[0]
            if batch.seq == expected:
                stream[0] = expected + batch.size
                out.append(batch)
            elif batch.seq > expected:
                stream[0] = batch.seq + batch.size
                self._lost[batch.pubid] = self._lost.get(batch.pubid, 0) + batch.seq - expected
                if self.on_loss is not None:
                    self.on_loss(batch.source, batch.topic, batch.seq - expected)
                out.append(batch)
            else:
                stream[0] = max(expected, batch.seq + batch.size)
                trimmed = _trim(batch, expected)
                if trimmed is not None:
                    out.append(trimmed)
        return out

    @property
    def evicted(self) -> int:
        """Publishers and streams forgotten to stay within :data:`MAX_PEERS` and
        :data:`MAX_STREAMS` (a peer inventing ids, or a very wide stream)."""
        return self._streams.evicted + self.publishers.evicted + self._lost.evicted

    def _end_of_stream(self, frames: list[bytes]) -> None:
        """A publisher's end of stream: report head and tail gaps, then acknowledge."""
        try:
            pubid, source, due = _parse_end(frames)
        except ValueError:
            self.malformed += 1
            return
        ended = self._ended.get(pubid)
        if ended is None:
            ended = self._ended[pubid] = self._gaps(pubid, source, due)
        self._acknowledge(pubid, ended)

    def _gaps(self, pubid: str, source: str, due: dict[str, tuple[int, int]]) -> int:
        """Events of *pubid* lost here, given what its end of stream says was sent."""
        lost = self._lost.pop(pubid, 0)
        streams = self._streams
        for topic, (first, end) in due.items():
            if not self.matcher(topic):
                continue
            stream = streams.get((pubid, topic))
            if stream is None and streams.evicted:
                self.unaccounted += end - first  # forgotten, or never arrived: unknown
                continue
            if stream is None:
                missing = end - first  # not one of them arrived
            else:
                got, seen = stream
                head = max(0, seen - first) if seen else 0  # (0: first one unknown)
                missing = head + max(0, end - got)
            if missing > 0:
                lost += missing
                if self.on_loss is not None:
                    self.on_loss(source, topic, missing)
        return lost

    def _acknowledge(self, pubid: str, lost: int) -> None:
        """Tell publisher *pubid* how many of its events were lost here."""
        ack = codec.ACK_PREFIX + f"{pubid} {self.subid} {lost}".encode()
        self.sock.subscribe(ack)  # XPUB_VERBOSE hands this to the publisher...
        self.sock.unsubscribe(ack)  # ...and nothing stays subscribed

    def close(self, linger: float = CLOSE_LINGER) -> None:
        """Say goodbye to every publisher (leaving on purpose is not loss), then close.

        A publisher whose events were lost here (a gap, before its end of
        stream) is first told how many, as an acknowledgement would: leaving
        early (``--strict``, ``-C``) must not hide that loss from it.
        """
        for pubid, lost in self._lost.items():
            if lost and pubid not in self._ended:
                self._acknowledge(pubid, lost)
        self.sock.subscribe(codec.BYE_PREFIX + self.subid.encode())
        super().close(linger)


def _parse_end(frames: list[bytes]) -> tuple[str, str, dict[str, tuple[int, int]]]:
    """Validate an end-of-stream message; ValueError when it is not one."""
    if len(frames) != 3 or frames[1] != codec.END_MARK or len(frames[2]) > codec.MAX_END_BYTES:
        raise ValueError("not an end-of-stream message")
    try:
        value = json.loads(frames[2])
    except (ValueError, RecursionError):
        raise ValueError("invalid end-of-stream JSON") from None
    if not isinstance(value, dict):
        raise ValueError("end of stream is not an object")
    pubid, source, topics = value.get("p"), value.get("s"), value.get("t")
    if not isinstance(pubid, str) or not isinstance(source, str) or not isinstance(topics, dict):
        raise ValueError("end of stream lacks p, s or t")
    due: dict[str, tuple[int, int]] = {}
    for topic, pair in topics.items():
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(type(n) is int and 1 <= n < 1 << 63 for n in pair)
            or pair[0] > pair[1]
        ):
            raise ValueError(f"bad sequence range for topic {topic!r}")
        due[topic] = (pair[0], pair[1])
    return pubid, source, due


def _trim(batch: codec.Batch, first_seq: int) -> codec.Batch | None:
    """*batch* without the events before *first_seq* (duplicates), or None."""
    skip = first_seq - batch.seq
    if skip >= batch.size:
        return None
    parts = codec.split_body(batch)[skip:]
    return batch._replace(seq=first_seq, size=len(parts), body=b"\n".join(parts))

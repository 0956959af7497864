"""A registry's replication with its peer registries: links, hellos, change streams, snapshots.

Each peer registry (given with ``--peer``, announced by mDNS, or named in a
peer's hello) gets a DEALER to its request socket (a :class:`PeerLink`): a
*hello* answers with its id, its change stream's port and its live peers;
*snapshot* with every instance it owns. One SUB takes every peer's change
stream (changes and ticks). A peer whose ticks stop for the peer timeout is
*silent*: its instances get one TTL to heartbeat somewhere else
(:meth:`.store.Store.peer_lost`); its first tick back asks for a snapshot.

The links are long-lived (:data:`eda.core.sockets.LONG_LIVED`): ZeroMQ
heartbeats drop a connection held through a partition, and it is made again
within seconds of the heal rather than after TCP's retransmission back-off.
A stream whose connection dropped lost what the peer published meanwhile,
even when the peer never counted as silent: its first tick back (sent as
soon as the subscription is live again) asks for a snapshot too, and a
snapshot asked and not received is asked again.

Secure mode: each link is pinned to its peer's key (announced, given as
``NAME@tcp://...``, or ``KEY@tcp://...`` as a peer's hello names them);
untrusted or plain ones are skipped.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from .. import reqrep, security, sockets
from ..daemon import received
from ..endpoint import Endpoint
from ..errors import EdaError, UsageError
from . import protocol
from .client import named_peer
from .model import from_dict, validate_registry_id
from .protocol import ProtocolError, decode, encode

if TYPE_CHECKING:
    from ..discovery import Peer
    from .server import Server

MAX_PEERS = 32  # peer registries one registry links to (a hostile hello may name thousands)
HELLO_EVERY = 2.0  # s between two hellos to a peer that has not answered one
SNAPSHOT_RETRY = 2.0  # s: a snapshot asked of a peer and not received is asked again


@dataclass
class PeerLink:
    address: Endpoint
    sock: zmq.Socket[bytes]
    id: str = ""
    last_tick: float = 0.0
    alive: bool = False
    hello_sent: float = 0.0
    stream: str = ""  # its change stream, once its hello named it
    resync: bool = False  # the stream's connection dropped: changes may have been missed
    snapshot_asked: float = 0.0  # when a snapshot was asked for and not yet received

    @property
    def endpoint(self) -> str:
        return self.address.zmq


def peer_endpoint(text: str) -> Endpoint:
    """A peer registry's endpoint given by the user (``--peer``), or :class:`UsageError`.

    In secure mode it names the peer's trusted key, ``NAME@tcp://HOST:PORT``
    (as every secure ``--connect``), and that key is pinned for the endpoint.
    """
    secure = security.active()
    key = b""
    if secure is not None:
        key, text = secure.pinned(text, "--peer")
    parsed = reqrep.client_endpoint(text, "--peer")
    if key:
        reqrep.pin(parsed, key)
    return parsed


class Peers:
    """The links of *server* (a registry) to its peers, on its poll loop."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.links: dict[str, PeerLink] = {}
        self.subscribed: set[str] = set()  # change streams the SUB is connected to
        self.found: queue.SimpleQueue[Peer] = queue.SimpleQueue()  # registries announced
        self.sub = server.socket(
            zmq.SUB, max_message=4 * protocol.MAX_MESSAGE, liveness=sockets.LONG_LIVED
        )
        for topic in (protocol.EVENTS, protocol.TICK):
            self.sub.subscribe(topic)
        server.watch(self.sub, "peer stream", self._drain_stream)
        # a stream's connection dropped: what its peer published meanwhile is lost to us
        monitor = self.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitor: zmq.Socket[bytes] | None = monitor
        server.watch(monitor, "peer stream connections", self._drain_monitor)

    def live(self) -> list[PeerLink]:
        return [link for link in self.links.values() if link.alive]

    def tick(self) -> None:
        """Every tick: peers gone silent, hellos and snapshots to repeat, peers announced."""
        now = time.monotonic()
        timeout = self.server.settings.peer_timeout
        for link in self.links.values():
            if link.alive and now - link.last_tick > timeout:
                link.alive = False
                self.server.store.peer_lost(link.id)
                self.server.log(f"peer registry {link.id} at {link.endpoint} went silent")
            if link.id and not link.alive and now - link.last_tick > 2 * timeout:
                link.id = ""  # it may have restarted under a new id: say hello again
            if not link.id and now - link.hello_sent > HELLO_EVERY:
                self._send(link, {"op": "hello"})
            if link.alive and link.snapshot_asked and now - link.snapshot_asked > SNAPSHOT_RETRY:
                self._ask_snapshot(link)  # the request or its reply was lost with a connection
        self._drain_found()

    def _drain_found(self) -> None:
        server = self.server
        while True:
            try:
                peer = self.found.get_nowait()
            except queue.Empty:
                return
            where = Endpoint.from_peer(peer.endpoint)  # (from mDNS: checked there already)
            if where is None or where.zmq in self.links:
                continue
            key, why = security.admission(peer.key)  # secure and plain never mix
            if key is None:
                text = f"ignoring registry {peer.id[:64]!r} at {where.zmq}: {why}"
                if server.security is not None and peer.key:
                    server.limited("untrusted", text)  # a forged announcement, likely
                else:
                    server.log(text)
                continue
            if key:
                reqrep.pin(where, key)
            self.add(where)

    def add(self, where: Endpoint) -> None:
        """Link to the peer registry at *where* (once; :data:`MAX_PEERS` at most)."""
        server = self.server
        endpoint = where.zmq
        if endpoint in self.links or endpoint == server.endpoint:
            return
        if len(self.links) >= MAX_PEERS:
            server.limited("peers", f"not linking to {endpoint[:80]}: {MAX_PEERS} peers already")
            return
        sock = server.socket(
            zmq.DEALER, max_message=64 * protocol.MAX_MESSAGE, liveness=sockets.LONG_LIVED
        )
        try:  # secure mode: pinned where it was found (a peer without a key is a UsageError)
            sockets.connect(sock, where, reqrep.pinned_key(where))
        except zmq.ZMQError as exc:
            server.close_socket(sock)
            raise UsageError(f"bad peer endpoint {endpoint}: {exc}") from None
        link = PeerLink(where, sock)
        self.links[endpoint] = link
        server.watch(sock, "peer replies", lambda: self._drain_replies(link))
        self._send(link, {"op": "hello"})

    def _send(self, link: PeerLink, msg: dict[str, Any]) -> None:
        if msg["op"] == "hello":
            link.hello_sent = time.monotonic()
        elif msg["op"] == "snapshot":
            link.snapshot_asked = time.monotonic()
        with contextlib.suppress(zmq.ZMQError):
            link.sock.send(encode(msg), zmq.NOBLOCK)

    def _ask_snapshot(self, link: PeerLink) -> None:
        """Ask *link*'s peer for every instance it owns (merged by ``Store.merge_peer``)."""
        self._send(link, {"op": "snapshot", "owned": True})

    def _drain_replies(self, link: PeerLink) -> None:
        for (raw,) in received(link.sock, 100, multipart=False):
            try:
                reply = decode(raw)
                if "pub_port" in reply:
                    self._on_hello(link, reply)
                elif "instances" in reply and reply.get("registry") == link.id:
                    if not isinstance(reply["instances"], list):
                        raise ProtocolError("instances is not a list")
                    # all or nothing: a record left out would read as deleted by the peer
                    records = [from_dict(d) for d in reply["instances"]]
                    link.snapshot_asked = 0.0
                    self.server._publish(self.server.store.merge_peer(link.id, records))
            except (EdaError, ValueError, TypeError, KeyError, zmq.ZMQError) as e:
                self.server.dropped(f"reply from peer {link.endpoint}", e)

    def _on_hello(self, link: PeerLink, reply: dict[str, Any]) -> None:
        peer_id = validate_registry_id(reply.get("registry", ""))
        if not peer_id or peer_id == self.server.id or link.id:
            return
        pub_port = reply.get("pub_port")
        if isinstance(pub_port, bool) or not isinstance(pub_port, int) or not 0 < pub_port < 65536:
            raise ProtocolError("bad pub_port in a peer's hello")
        peers = reply.get("peers", [])
        if not isinstance(peers, list):
            raise ProtocolError("bad peers in a peer's hello")
        link.id = peer_id
        # heard of now: the id is kept until the peer stays unheard of for twice the peer
        # timeout (its first tick comes once the stream's subscription is live)
        link.last_tick = time.monotonic()
        pub = link.address.with_port(pub_port)  # its change stream: same host
        link.stream = pub.zmq
        if pub.zmq not in self.subscribed:
            self.subscribed.add(pub.zmq)
            # the same process, so the same key as its requests' socket
            sockets.connect(self.sub, pub, reqrep.pinned_key(link.address))
        self.server.log(f"replicating with peer registry {peer_id} at {link.endpoint}")
        for text in peers[:MAX_PEERS]:
            where = named_peer(text)  # malformed, untrusted or mixed ones are skipped
            if where is not None:
                with contextlib.suppress(UsageError):
                    self.add(where)

    def _drain_stream(self) -> None:
        server = self.server
        for frames in received(self.sub):
            try:
                if len(frames) != 2:
                    raise ProtocolError(f"{len(frames)} frames, not 2")
                msg = decode(frames[1])
                if frames[0] == protocol.TICK:
                    self._on_tick(validate_registry_id(msg.get("registry", "")))
                elif msg.get("registry") != server.id:
                    server._publish(server.store.apply_remote(msg))
            except (EdaError, ValueError, TypeError, KeyError) as exc:
                server.dropped("change from a peer", exc)

    def _on_tick(self, peer_id: str) -> None:
        link = next((lk for lk in self.links.values() if lk.id == peer_id), None)
        if link is None or peer_id == self.server.id:
            return
        link.last_tick = time.monotonic()
        if not link.alive:
            link.alive = True
            link.resync = False
            self.server.store.peer_alive(peer_id)
            self.server.log(f"change stream of peer registry {peer_id} live: asking for a snapshot")
            self._ask_snapshot(link)
        elif link.resync:  # its first tick since the stream connected again
            link.resync = False
            self.server.log(f"change stream of peer registry {peer_id} back: asking for a snapshot")
            self._ask_snapshot(link)

    def _drain_monitor(self) -> None:
        """A peer's change stream dropped (ZeroMQ connects it again by itself): its next
        tick, which comes once the subscription is live again, asks for a snapshot."""
        for event in sockets.monitor_events(self.monitor):
            for link in self.links.values():
                if link.stream == event.endpoint and not link.resync:
                    link.resync = True
                    self.server.log(
                        f"change stream of peer registry {link.id} dropped: reconnecting"
                    )

    def close(self) -> None:
        """Stop the stream's monitor (the sockets are the server's to close)."""
        if self.monitor is not None:
            self.server.forget(self.monitor)
            sockets.stop_monitor(self.sub, self.monitor)
            self.monitor = None

"""The registry daemon: one thread, one poll loop over every socket it owns.

Sockets: a ROUTER for requests (see :mod:`.protocol`), an XPUB for the
change stream, a SUB and one DEALER per peer registry for replication, and
optionally a UDP socket for the DNS interface.  Being single-threaded, the
store needs no locks and the order of events is the order of changes.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ..errors import EdaError, UsageError
from . import protocol
from .dns import Responder
from .model import InvalidRecord, from_dict, validate_name
from .persist import Journal
from .protocol import ProtocolError, decode, decode_request, encode, error_reply
from .store import Event, Store

Log = Callable[[str], None]


@dataclass
class Settings:
    bind: str = "tcp://*:7700"
    interface: str | None = None
    data: str | None = None
    mdns: bool = True
    peers: tuple[str, ...] = ()
    dns: str | None = None  # host:port
    tick: float = 0.5
    peer_timeout: float = 3.0
    snapshot_interval: float = 1.0


@dataclass
class PeerLink:
    endpoint: str
    sock: zmq.Socket[bytes]
    id: str = ""
    last_tick: float = 0.0
    alive: bool = False
    hello_sent: float = 0.0


def _split_hostport(value: str, default_host: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"bad address {value!r}: use HOST:PORT")
    return host or default_host, int(port)


class Server:
    """A registry: serves requests, expires instances, replicates with peers."""

    def __init__(self, settings: Settings, log: Log = lambda _msg: None) -> None:
        self.settings = settings
        self.log = log
        self.journal = Journal(settings.data) if settings.data else None
        self.id = self.journal.registry_id() if self.journal else secrets.token_hex(4)
        self.store = Store(self.id)
        if self.journal is not None:
            records, seq = self.journal.load()
            self.store.restore(records, seq)
            if self.journal.skipped:
                skipped = self.journal.skipped
                log(f"warning: skipped {skipped} unreadable record(s) in {settings.data}")
        self.zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.poller = zmq.Poller()
        self.router = self._socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE)
        self.endpoint = self._bind(self.router, settings.bind)
        self.xpub = self._socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub_endpoint = self._bind(self.xpub, settings.bind.rsplit(":", 1)[0] + ":*")
        self.peer_sub = self._socket(zmq.SUB)
        self.peer_sub.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE)
        for topic in (protocol.EVENTS, protocol.TICK):
            self.peer_sub.subscribe(topic)
        self.links: dict[str, PeerLink] = {}
        self.subscribed: set[str] = set()
        self.found: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.udp: socket.socket | None = None
        self.responder = Responder(self._dns_lookup)
        self.dns_address = ""
        if settings.dns:
            self._bind_dns(settings.dns)
        for sock in (self.router, self.xpub, self.peer_sub):
            self.poller.register(sock, zmq.POLLIN)
        self.discovery: Any = None
        self.requests = 0
        self.malformed = 0

    # -- setup ---------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _bind(self, sock: zmq.Socket[bytes], endpoint: str) -> str:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise UsageError(f"cannot bind {endpoint}: {exc}") from None
        return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def _bind_dns(self, address: str) -> None:
        host, port = _split_hostport(address, "127.0.0.1")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind((host, port))
        except OSError as exc:
            udp.close()
            raise UsageError(f"cannot bind DNS on {address}: {exc.strerror}") from None
        udp.setblocking(False)
        self.udp = udp
        host, port = udp.getsockname()
        self.dns_address = f"{host}:{port}"
        self.poller.register(udp, zmq.POLLIN)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def start(self) -> None:
        """Announce by mDNS, browse for peer registries, connect to explicit peers."""
        for endpoint in self.settings.peers:
            self._add_peer(endpoint)
        if self.settings.mdns:
            from ..discovery import Discovery

            self.discovery = Discovery(self.settings.interface)
            self.discovery.announce(
                protocol.REGISTRY_TYPE,
                self.id,
                self.port,
                [],
                on_ready=lambda: self.log(f"announced registry {self.id} by mDNS"),
            )
            self.discovery.browse(
                protocol.REGISTRY_TYPE,
                lambda peer: self.found.put(peer.endpoint) if peer.id != self.id else None,
            )

    # -- main loop --------------------------------------------------------------
    def serve(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run until *until* returns true (or a signal raises out of the poll)."""
        s = self.settings
        now = time.monotonic()
        next_expire, next_tick, next_snapshot = now, now, now + s.snapshot_interval
        while not until():
            timeout = max(0.0, min(next_expire, next_tick, next_snapshot) - time.monotonic())
            ready = dict(self.poller.poll(int(timeout * 1000) + 1))
            if self.router in ready:
                self._drain_requests()
            if self.xpub in ready:
                self._drain_subscriptions()
            if self.peer_sub in ready:
                self._drain_peer_stream()
            if self.udp is not None and self.udp.fileno() in ready:
                self._drain_dns()
            for link in list(self.links.values()):
                if link.sock in ready:
                    self._drain_peer_replies(link)
            now = time.monotonic()
            if now >= next_expire:
                self._publish(self.store.expire())
                next_expire = now + 0.05
            if now >= next_tick:
                self._tick()
                next_tick = now + s.tick
            if now >= next_snapshot:
                self.persist()
                next_snapshot = now + s.snapshot_interval

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            if self.journal is not None:
                try:
                    self.journal.append(event)
                except OSError as exc:  # disk full: keep serving; the snapshot retries
                    self.log(f"warning: cannot append to the change log: {exc.strerror}")
            self.xpub.send_multipart([protocol.event_topic(event["service"]), encode(event)])
            inst = event["instance"]
            self.log(f"{event['type']} {inst['service']}/{inst['id']}: {event['reason']}")

    def persist(self) -> None:
        if self.journal is not None:
            try:
                self.journal.snapshot(self.store.instances(with_stale=True), self.store.seq)
            except OSError as exc:
                self.log(f"warning: cannot write snapshot: {exc.strerror}")

    # -- requests -------------------------------------------------------------------
    def _drain_requests(self) -> None:
        for _ in range(1000):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.requests += 1
            ident, body = frames[0], frames[1:]
            if len(body) != 1:
                self.malformed += 1
                reply = error_reply(None, ProtocolError("malformed request: expected one frame"))
            else:
                reply = self._handle(body[0])
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart([ident, encode(reply)], zmq.NOBLOCK)

    def _handle(self, raw: bytes) -> dict[str, Any]:
        rid: object = None
        try:
            msg = decode_request(raw)
            rid = msg.get("rid")
            reply = getattr(self, "_op_" + msg["op"])(msg)
        except (EdaError, ValueError, TypeError, KeyError) as exc:
            if isinstance(exc, ProtocolError):
                self.malformed += 1
            if not isinstance(exc, EdaError):
                exc = ProtocolError(f"malformed request: {exc}")
            return error_reply(rid, exc)
        except Exception as exc:  # a daemon survives any request; say what broke
            self.log(f"warning: request failed: {type(exc).__name__}: {exc}")
            return error_reply(rid, EdaError(f"request failed: {type(exc).__name__}"))
        reply["rid"] = rid
        reply["ok"] = True
        return dict(reply)

    def _op_hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "registry": self.id,
            "tick": self.settings.tick,
            "pub_port": int(self.pub_endpoint.rsplit(":", 1)[1]),
            "peers": sorted(link.endpoint for link in self.links.values() if link.alive),
        }

    def _op_register(self, msg: dict[str, Any]) -> dict[str, Any]:
        inst = from_dict(msg.get("instance"))
        register = msg["op"] == "register"
        self._publish(self.store.heartbeat(inst, register=register))
        return {"instance": inst.to_dict()} if register else {"rev": inst.rev}

    _op_heartbeat = _op_register

    def _op_deregister(self, msg: dict[str, Any]) -> dict[str, Any]:
        inst_id = msg.get("id")
        if not isinstance(inst_id, str):
            raise InvalidRecord("deregister needs an instance id")
        self._publish(self.store.deregister(inst_id))
        return {}

    def _op_lookup(self, msg: dict[str, Any]) -> dict[str, Any]:
        service = validate_name(msg.get("service"))
        found = self.store.lookup(service, bool(msg.get("all")))
        return {"instances": [i.to_dict() for i in found]}

    def _op_list(self, msg: dict[str, Any]) -> dict[str, Any]:
        service = msg.get("service")
        name = validate_name(service) if service is not None else None
        return {"instances": [i.to_dict() for i in self.store.instances(name)]}

    def _op_snapshot(self, msg: dict[str, Any]) -> dict[str, Any]:
        service = msg.get("service")
        name = validate_name(service) if service is not None else None
        found = self.store.instances(name, with_stale=True)
        if msg.get("owned"):
            found = [i for i in found if i.registry == self.id]
        return {
            "registry": self.id,
            "seq": self.store.seq,
            "instances": [i.to_dict() for i in found],
        }

    # -- change stream ---------------------------------------------------------------
    def _tick(self) -> None:
        tick = encode({"registry": self.id, "seq": self.store.seq})
        self.xpub.send_multipart([protocol.TICK, tick])
        now = time.monotonic()
        for link in self.links.values():
            if link.alive and now - link.last_tick > self.settings.peer_timeout:
                link.alive = False
                self.store.peer_lost(link.id)
                self.log(f"peer registry {link.id} at {link.endpoint} went silent")
            if link.id and not link.alive and now - link.last_tick > 2 * self.settings.peer_timeout:
                link.id = ""  # it may have restarted under a new id: say hello again
            if not link.id and now - link.hello_sent > 2.0:
                self._send(link, {"op": "hello"})
        self._drain_found()

    def _drain_subscriptions(self) -> None:
        joined = False
        for _ in range(1000):
            try:
                msg = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            joined = joined or msg[:1] == b"\x01"
        if joined:  # tell the new subscriber at once that its subscription is live
            self.xpub.send_multipart(
                [protocol.TICK, encode({"registry": self.id, "seq": self.store.seq})]
            )

    # -- replication --------------------------------------------------------------------
    def _drain_found(self) -> None:
        while True:
            try:
                endpoint = self.found.get_nowait()
            except queue.Empty:
                return
            self._add_peer(endpoint)

    def _add_peer(self, endpoint: str) -> None:
        if endpoint in self.links or endpoint == self.endpoint:
            return
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * protocol.MAX_MESSAGE)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise UsageError(f"bad peer endpoint {endpoint}: {exc}") from None
        link = PeerLink(endpoint, sock)
        self.links[endpoint] = link
        self.poller.register(sock, zmq.POLLIN)
        self._send(link, {"op": "hello"})

    def _send(self, link: PeerLink, msg: dict[str, Any]) -> None:
        if msg["op"] == "hello":
            link.hello_sent = time.monotonic()
        with contextlib.suppress(zmq.ZMQError):
            link.sock.send(encode(msg), zmq.NOBLOCK)

    def _drain_peer_replies(self, link: PeerLink) -> None:
        for _ in range(100):
            try:
                raw = link.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode(raw)
                if "pub_port" in reply:
                    self._on_hello(link, reply)
                elif "instances" in reply and reply.get("registry") == link.id:
                    records = [from_dict(d) for d in reply["instances"]]
                    self._publish(self.store.merge_peer(link.id, records))
            except (EdaError, ValueError, TypeError, KeyError, ArithmeticError, zmq.ZMQError) as e:
                self.log(f"warning: bad reply from peer {link.endpoint}: {e}")

    def _on_hello(self, link: PeerLink, reply: dict[str, Any]) -> None:
        peer_id = str(reply.get("registry", ""))
        if not peer_id or peer_id == self.id or link.id:
            return
        link.id = peer_id
        host = link.endpoint.rsplit(":", 1)[0]
        pub = f"{host}:{int(reply['pub_port'])}"
        if pub not in self.subscribed:
            self.subscribed.add(pub)
            self.peer_sub.connect(pub)
        self.log(f"replicating with peer registry {peer_id} at {link.endpoint}")
        for endpoint in reply.get("peers", []):
            if isinstance(endpoint, str):
                with contextlib.suppress(UsageError):
                    self._add_peer(endpoint)

    def _drain_peer_stream(self) -> None:
        for _ in range(1000):
            try:
                frames = self.peer_sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            try:
                msg = decode(frames[1])
                if frames[0] == protocol.TICK:
                    self._on_peer_tick(str(msg.get("registry", "")))
                elif msg.get("registry") != self.id:
                    self._publish(self.store.apply_remote(msg))
            except (EdaError, ValueError, TypeError, KeyError, ArithmeticError) as exc:
                self.log(f"warning: bad change from a peer: {exc}")

    def _on_peer_tick(self, peer_id: str) -> None:
        link = next((lk for lk in self.links.values() if lk.id == peer_id), None)
        if link is None or peer_id == self.id:
            return
        link.last_tick = time.monotonic()
        if not link.alive:
            link.alive = True
            self.store.peer_alive(peer_id)
            self._send(link, {"op": "snapshot", "owned": True})

    # -- DNS ------------------------------------------------------------------------------
    def _dns_lookup(self, service: str) -> list[Any] | None:
        if service not in self.store.services:
            return None
        return self.store.lookup(service)

    def _drain_dns(self) -> None:
        assert self.udp is not None
        for _ in range(100):
            try:
                packet, addr = self.udp.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            reply = self.responder.answer(packet)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(reply, addr)

    # -- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        if self.discovery is not None:
            self.discovery.close()
        self.persist()
        if self.journal is not None:
            self.journal.close()
        if self.udp is not None:
            self.udp.close()
        for link in self.links.values():
            link.sock.close()
        for sock in (self.router, self.xpub, self.peer_sub):
            sock.close()
        self.zctx.term()

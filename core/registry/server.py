"""The registry daemon: one thread, one poll loop over every socket it owns.

Sockets: a ROUTER for requests (see :mod:`.protocol`), an XPUB for the
change stream, a SUB and one DEALER per peer registry for replication, and
optionally a UDP socket and a TCP listener for the DNS interface.  Being
single-threaded, the store needs no locks and the order of events is the
order of changes.

Hostile input: every request, peer message and DNS packet is validated at
the edge (:func:`.protocol.parse_request`, :func:`.model.from_dict`,
:func:`.dns.parse_query`); what fails is answered with an error or dropped,
counted in :attr:`Server.malformed`, and reported by a rate-limited warning.
It never changes state, and no single request, record or failed write ends
the loop: each step of the loop is guarded on its own.
"""

from __future__ import annotations

import contextlib
import errno
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
from .dns import Responder, TcpConnections
from .model import from_dict, validate_registry_id
from .persist import Journal
from .protocol import (
    ProtocolError,
    Request,
    decode,
    decode_request,
    encode,
    error_reply,
    request_from,
    request_id,
)
from .store import Event, Store

Log = Callable[[str], None]
MAX_PEERS = 32  # peer registries one registry links to (a hostile hello may name thousands)
WARN_EVERY = 10.0  # seconds between two warnings of the same kind


class RateLimited:
    """A warning said at once, then at most every *every* seconds with a count."""

    def __init__(self, warn: Log, every: float = WARN_EVERY) -> None:
        self.warn, self.every = warn, every
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.every) < self.every:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        held = self.held.pop(kind, 0)
        self.last[kind] = now
        more = f" (and {held} more since the last warning)" if held else ""
        self.warn(f"warning: {message}{more}")


class BindError(EdaError):
    """An address to listen on is taken or unavailable: a runtime error, not a usage one."""


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

    def __init__(
        self, settings: Settings, log: Log = lambda _msg: None, warn: Log | None = None
    ) -> None:
        """*log* takes diagnostics (shown with -v), *warn* warnings (always shown)."""
        self.settings = settings
        self.log = log
        self.warn: Log = warn or log
        self.limited = RateLimited(self.warn)
        self.journal = Journal(settings.data) if settings.data else None
        self.id = self.journal.registry_id() if self.journal else secrets.token_hex(4)
        self.store = Store(self.id)
        self.persist_failed = False
        if self.journal is not None:
            records, seq = self.journal.load()
            self.store.restore(records, seq)
            if self.journal.skipped:
                skipped = self.journal.skipped
                self.warn(f"warning: skipped {skipped} unreadable record(s) in {settings.data}")
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
        self.dns_tcp: TcpConnections | None = None
        self.responder = Responder(self._dns_lookup)
        self.dns_address = ""
        self.requests = 0
        self.malformed = 0
        if settings.dns:
            self._bind_dns(settings.dns)
        for sock in (self.router, self.xpub, self.peer_sub):
            self.poller.register(sock, zmq.POLLIN)
        self.discovery: Any = None

    # -- setup ---------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _bind(self, sock: zmq.Socket[bytes], endpoint: str) -> str:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                raise BindError(f"cannot bind {endpoint}: {exc}") from None
            raise UsageError(f"cannot bind {endpoint}: {exc}") from None
        return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def _bind_dns(self, address: str) -> None:
        """UDP and TCP on the same port (a port of 0 picks one free for both)."""
        host, port = _split_hostport(address, "127.0.0.1")
        for _ in range(20 if port == 0 else 1):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((host, port))
                tcp.bind((host, udp.getsockname()[1]))
                tcp.listen(64)
                break
            except OSError as exc:
                udp.close()
                tcp.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the UDP port was free, its TCP twin not: pick another
                self.close()
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                    raise BindError(f"cannot bind DNS on {address}: {exc.strerror}") from None
                raise UsageError(f"cannot bind DNS on {address}: {exc.strerror}") from None
        else:
            self.close()
            raise BindError(f"cannot bind DNS on {address}: no port free for UDP and TCP")
        udp.setblocking(False)
        self.udp = udp
        host, port = udp.getsockname()
        self.dns_address = f"{host}:{port}"
        self.poller.register(udp, zmq.POLLIN)
        self.dns_tcp = TcpConnections(tcp, self.responder, self._watch_fd)

    def _watch_fd(self, fd: int, readable: bool, writable: bool) -> None:
        flags = (zmq.POLLIN if readable else 0) | (zmq.POLLOUT if writable else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(fd)
        if flags:
            self.poller.register(fd, flags)

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
                self._guarded("requests", self._drain_requests)
            if self.xpub in ready:
                self._guarded("subscriptions", self._drain_subscriptions)
            if self.peer_sub in ready:
                self._guarded("peer stream", self._drain_peer_stream)
            if self.udp is not None and self.udp.fileno() in ready:
                self._guarded("DNS", self._drain_dns)
            if self.dns_tcp is not None:
                for fd, events in ready.items():
                    if isinstance(fd, int) and (self.udp is None or fd != self.udp.fileno()):
                        self._guarded("DNS over TCP", self._dns_tcp_ready, fd, events)
            for link in list(self.links.values()):
                if link.sock in ready:
                    self._guarded("peer replies", self._drain_peer_replies, link)
            now = time.monotonic()
            if now >= next_expire:
                self._guarded("expiry", lambda: self._publish(self.store.expire()))
                next_expire = now + 0.05
            if now >= next_tick:
                self._guarded("tick", self._tick)
                next_tick = now + s.tick
            if now >= next_snapshot:
                self._guarded("snapshot", self.persist)
                next_snapshot = now + s.snapshot_interval

    def _guarded(self, what: str, step: Callable[..., object], *args: Any) -> None:
        """Run one step of the loop; whatever it raises, the daemon goes on serving."""
        try:
            step(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug or a record nothing caught: say so, keep serving
            self.limited(f"step:{what}", f"{what} failed: {type(exc).__name__}: {exc}"[:300])

    def _dns_tcp_ready(self, fd: int, events: int) -> None:
        assert self.dns_tcp is not None
        self.dns_tcp.ready(fd, events, zmq.POLLIN, zmq.POLLOUT)

    def _malformed(self, where: str, exc: BaseException) -> None:
        self.malformed += 1
        self.limited(
            f"malformed:{where}",
            f"dropped malformed {where} (#{self.malformed}): {str(exc)[:200]}",
        )

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            if self.journal is not None:
                try:
                    self.journal.append(event)
                except OSError as exc:  # disk full: keep serving; the snapshot retries
                    self._persist_failed("append to the change log", exc)
            with contextlib.suppress(zmq.ZMQError):
                self.xpub.send_multipart(
                    [protocol.event_topic(event["service"]), encode(event)], zmq.NOBLOCK
                )
            inst = event["instance"]
            self.log(f"{event['type']} {inst['service']}/{inst['id']}: {event['reason']}")

    def _persist_failed(self, what: str, exc: OSError) -> None:
        self.persist_failed = True
        self.limited(
            f"persist:{what}",
            f"cannot {what} in {self.settings.data}: {exc.strerror or exc}; "
            "changes are kept in memory only until a write succeeds",
        )

    def persist(self) -> None:
        if self.journal is not None:
            try:
                self.journal.snapshot(self.store.instances(with_stale=True), self.store.seq)
            except OSError as exc:
                self._persist_failed("write the snapshot", exc)
                return
            if self.persist_failed:
                self.persist_failed = False
                self.warn(f"snapshot written to {self.settings.data} again: state is durable")

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
                exc = ProtocolError("malformed request: expected one frame")
                self._malformed("request", exc)
                reply = error_reply(None, exc)
            else:
                reply = self._handle(body[0])
            try:
                data = encode(reply)
            except (ValueError, TypeError, RecursionError) as exc:  # never: replies are typed
                self.limited("reply", f"cannot encode a reply: {exc}")
                data = encode(error_reply(None, EdaError("request failed")))
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart([ident, data], zmq.NOBLOCK)

    def _handle(self, raw: bytes) -> dict[str, Any]:
        """Validate *raw* once into a :class:`Request`, then act on typed values only."""
        rid = None
        try:
            msg = decode_request(raw)
            rid = request_id(msg)
            req = request_from(msg)
        except EdaError as exc:  # malformed, or a record this registry refuses
            self._malformed("request", exc)
            return error_reply(rid, exc)
        try:
            reply = getattr(self, "_op_" + req.op)(req)
        except EdaError as exc:  # refused on the merits (not found, wrong service...)
            return error_reply(req.rid, exc)
        except Exception as exc:  # a daemon survives any request; say what broke
            self.limited("request", f"request failed: {type(exc).__name__}: {exc}"[:300])
            return error_reply(req.rid, EdaError(f"request failed: {type(exc).__name__}"))
        reply["rid"] = req.rid
        reply["ok"] = True
        return dict(reply)

    def _op_hello(self, req: Request) -> dict[str, Any]:
        return {
            "registry": self.id,
            "tick": self.settings.tick,
            "pub_port": int(self.pub_endpoint.rsplit(":", 1)[1]),
            "peers": sorted(link.endpoint for link in self.links.values() if link.alive),
        }

    def _op_register(self, req: Request) -> dict[str, Any]:
        inst = req.instance
        assert inst is not None
        register = req.op == "register"
        self._publish(self.store.heartbeat(inst, register=register))
        return {"instance": inst.to_dict()} if register else {"rev": inst.rev}

    _op_heartbeat = _op_register

    def _op_deregister(self, req: Request) -> dict[str, Any]:
        self._publish(self.store.deregister(req.id))
        return {}

    def _op_lookup(self, req: Request) -> dict[str, Any]:
        assert req.service is not None
        found = self.store.lookup(req.service, req.all)
        return {"instances": [i.to_dict() for i in found]}

    def _op_list(self, req: Request) -> dict[str, Any]:
        return {"instances": [i.to_dict() for i in self.store.instances(req.service)]}

    def _op_snapshot(self, req: Request) -> dict[str, Any]:
        found = self.store.instances(req.service, with_stale=True)
        if req.owned:
            found = [i for i in found if i.registry == self.id]
        return {
            "registry": self.id,
            "seq": self.store.seq,
            "instances": [i.to_dict() for i in found],
        }

    # -- change stream ---------------------------------------------------------------
    def _tick(self) -> None:
        if self.dns_tcp is not None:
            self.dns_tcp.expire()  # idle DNS-over-TCP connections
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
        if len(self.links) >= MAX_PEERS:
            self.limited("peers", f"not linking to {endpoint[:80]}: {MAX_PEERS} peers already")
            return
        from .client import check_endpoint

        check_endpoint(endpoint)
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
                    if not isinstance(reply["instances"], list):
                        raise ProtocolError("instances is not a list")
                    # all or nothing: a record left out would read as deleted by the peer
                    records = [from_dict(d) for d in reply["instances"]]
                    self._publish(self.store.merge_peer(link.id, records))
            except (EdaError, ValueError, TypeError, KeyError, zmq.ZMQError) as e:
                self._malformed(f"reply from peer {link.endpoint}", e)

    def _on_hello(self, link: PeerLink, reply: dict[str, Any]) -> None:
        peer_id = validate_registry_id(reply.get("registry", ""))
        if not peer_id or peer_id == self.id or link.id:
            return
        pub_port = reply.get("pub_port")
        if isinstance(pub_port, bool) or not isinstance(pub_port, int) or not 0 < pub_port < 65536:
            raise ProtocolError("bad pub_port in a peer's hello")
        peers = reply.get("peers", [])
        if not isinstance(peers, list):
            raise ProtocolError("bad peers in a peer's hello")
        link.id = peer_id
        host = link.endpoint.rsplit(":", 1)[0]
        pub = f"{host}:{pub_port}"
        if pub not in self.subscribed:
            self.subscribed.add(pub)
            self.peer_sub.connect(pub)
        self.log(f"replicating with peer registry {peer_id} at {link.endpoint}")
        for endpoint in peers[:MAX_PEERS]:
            if isinstance(endpoint, str) and len(endpoint) <= 300:
                with contextlib.suppress(UsageError):
                    self._add_peer(endpoint)

    def _drain_peer_stream(self) -> None:
        for _ in range(1000):
            try:
                frames = self.peer_sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 2:
                    raise ProtocolError(f"{len(frames)} frames, not 2")
                msg = decode(frames[1])
                if frames[0] == protocol.TICK:
                    self._on_peer_tick(validate_registry_id(msg.get("registry", "")))
                elif msg.get("registry") != self.id:
                    self._publish(self.store.apply_remote(msg))
            except (EdaError, ValueError, TypeError, KeyError) as exc:
                self._malformed("change from a peer", exc)

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
        """Release everything (safe on a half-built server: a failed bind calls it)."""
        if getattr(self, "discovery", None) is not None:
            self.discovery.close()
        if getattr(self, "router", None) is not None and getattr(self, "peer_sub", None):
            self._guarded("snapshot", self.persist)
        if self.journal is not None:
            self.journal.close()
        if getattr(self, "udp", None) is not None:
            assert self.udp is not None
            self.udp.close()
        if getattr(self, "dns_tcp", None) is not None:
            assert self.dns_tcp is not None
            self.dns_tcp.close()
        for link in getattr(self, "links", {}).values():
            link.sock.close()
        for name in ("router", "xpub", "peer_sub"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close()
        self.zctx.term()

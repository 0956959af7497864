"""The registry daemon: one thread, one poll loop over every socket it owns.

Sockets: a ROUTER for requests (see :mod:`.protocol`), an XPUB for the
change stream, a SUB and one DEALER per peer registry for replication
(:mod:`.peers`), and optionally a UDP socket and a TCP listener for the DNS interface.  Being
single-threaded, the store needs no locks and the order of events is the
order of changes.

Hostile input: every request, peer message and DNS packet is validated at
the edge (:func:`.protocol.parse_request`, :func:`.model.from_dict`,
:func:`.dns.parse_query`); what fails is answered with an error or dropped,
counted in :attr:`Server.malformed`, and reported by a rate-limited warning.
It never changes state, and no single request, record or failed write ends
the loop: each step of the loop is guarded on its own.

Secure mode (:mod:`eda.core.security`, on before the server is made): the
request socket and the change stream are CURVE servers admitting trusted keys
only, the announcement carries this registry's key (``k=``), and peer
registries are pinned to their keys (announced, ``NAME@tcp://...`` given, or
``KEY@tcp://...`` as a peer's hello names them; untrusted or plain ones are
skipped).  A record carries the key its registrant's connection proved
(:attr:`eda.core.reqrep.Service.sender_key`, never the one a request claims),
and only that key heartbeats or deregisters it.

The loop, its guards, timers, binding and mDNS announcing are
:class:`eda.core.daemon.Daemon`'s; request framing, validation up to the op
and error replies are :class:`eda.core.reqrep.Service`'s.  This module holds
what only a registry does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from .. import reqrep, security
from ..daemon import BindError, Daemon, Log, bind_failed, port_file, port_of, received
from ..endpoint import Endpoint
from ..errors import EdaError
from ..reqrep import Handler, Service
from . import protocol
from .dns import TCP_IDLE_SECONDS, Responder, TcpConnections
from .lateness import Lateness
from .model import DEFAULT_MAX_INSTANCES, Records
from .peers import Peers
from .peers import peer_endpoint as peer_endpoint  # (cli/registryserve.py imports it here)
from .persist import Journal
from .protocol import Request, encode
from .store import Event, Store

EXPIRE_EVERY = 0.05  # seconds between two expiry passes
# requests answered in one turn of the loop before its other sockets (HTTP, the peer
# stream, DNS) have theirs: an HTTP lookup waits behind this many queued heartbeats at most
REQUESTS_PER_TURN = 32


@dataclass
class Settings:
    bind: str = "tcp://*:7700"
    interface: str | None = None
    data: str | None = None
    mdns: bool = True
    peers: tuple[str, ...] = ()
    dns: str | None = None  # host:port
    dns_idle: float = TCP_IDLE_SECONDS  # a DNS-over-TCP connection idle this long is closed
    tick: float = 0.5
    peer_timeout: float = 3.0
    max_instances: int = DEFAULT_MAX_INSTANCES  # registrations of new ids past it are refused
    snapshot_interval: float = 1.0
    # remember a port bound as '*' (in --data, else $XDG_STATE_HOME/eda/registry.port), so
    # that a registry restarted with the same command comes back where its clients are
    remember: bool = False


class NotOwner(EdaError):
    """A heartbeat or deregistration of an instance registered under another key."""


class Server(Daemon):
    """A registry: serves requests, expires instances, replicates with peers."""

    def __init__(
        self, settings: Settings, log: Log = lambda _msg: None, warn: Log | None = None
    ) -> None:
        """*log* takes diagnostics (shown with -v), *warn* warnings (always shown)."""
        super().__init__(log, warn, interface=settings.interface)
        self.settings = settings
        self.journal = Journal(settings.data) if settings.data else None
        self.id = self.journal.registry_id() if self.journal else secrets.token_hex(4)
        self.store = Store(self.id, max_instances=settings.max_instances)
        self.lateness = Lateness()  # how late each heartbeat arrives, at least
        self.persist_failed = False
        self.counted: collections.Counter[str] = collections.Counter()  # changes, heartbeats
        if self.journal is not None:
            records, seq = self.journal.load()
            self.store.restore(records, seq)
            if self.journal.skipped:
                skipped = self.journal.skipped
                self.warn(f"warning: skipped {skipped} unreadable record(s) in {settings.data}")
        self.on_change: list[Callable[[Event], object]] = []  # told every change (HTTP's SSE)
        self.security = security.active()
        self.udp: socket.socket | None = None
        self.dns_tcp: TcpConnections | None = None
        self.responder = Responder(self._dns_lookup)
        self.dns_address = ""
        try:
            self._open_sockets(settings)
        except BaseException:
            self.close()
            raise
        self.every(EXPIRE_EVERY, "expiry", lambda: self._publish(self.store.expire()))
        self.every(settings.tick, "tick", self._tick)
        first = settings.snapshot_interval
        self.every(settings.snapshot_interval, "snapshot", self.persist, first=first)

    # -- setup ---------------------------------------------------------------
    def _open_sockets(self, settings: Settings) -> None:
        records = Records()  # heartbeats repeat their record: validated once, while it holds
        self.service = Service(self, self._handlers(),
                               parse=lambda msg: protocol.request_from(msg, records),
                               batch=REQUESTS_PER_TURN)  # fmt: skip
        self.router = self.service.sock
        state = port_file("registry", settings.data) if settings.remember else None
        self.endpoint = self.bind_remembered(self.router, settings.bind, state)
        self.xpub = self.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.SNDHWM, 100_000)
        # the change stream: any port on the same interface as requests
        where = Endpoint.parse(settings.bind, "bind").with_port(0)
        self.pub_endpoint = self.bind(self.xpub, where).zmq
        self.watch(self.xpub, "subscriptions", self._drain_subscriptions)
        self.peers = Peers(self)  # replication
        self.links = self.peers.links
        if settings.dns:
            self._bind_dns(settings.dns)

    def _handlers(self) -> dict[str, Handler]:
        return {op: getattr(self, "_op_" + op) for op in protocol.OPS}

    def _bind_dns(self, address: str) -> None:
        """UDP and TCP on the same port (a port of 0 picks one free for both)."""
        where = Endpoint.parse(address, "DNS", default_host="127.0.0.1")
        family = socket.AF_INET6 if where.is_ipv6 else socket.AF_INET
        host = "0.0.0.0" if where.host == "*" else where.host
        port = where.port
        for _ in range(20 if port == 0 else 1):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
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
                raise bind_failed(f"DNS on {address}", exc.errno, exc.strerror) from None
        else:
            raise BindError(f"cannot bind DNS on {address}: no port free for UDP and TCP")
        udp.setblocking(False)
        self.udp = udp
        host, port = udp.getsockname()[:2]
        self.dns_address = str(Endpoint(host, port))
        self.watch(udp, "DNS", self._drain_dns)
        self.dns_tcp = TcpConnections(
            tcp, self.responder, self._watch_fd, idle=self.settings.dns_idle
        )

    def _watch_fd(self, fd: int, readable: bool, writable: bool) -> None:
        flags = (zmq.POLLIN if readable else 0) | (zmq.POLLOUT if writable else 0)
        if not flags:
            self.forget(fd)
            return
        self.watch_events(fd, "DNS over TCP", lambda events: self._dns_tcp_ready(fd, events), flags)

    @property
    def port(self) -> int:
        return port_of(self.endpoint)

    def start(self) -> None:
        """Announce by mDNS, browse for peer registries, connect to explicit peers."""
        for endpoint in self.settings.peers:
            self.peers.add(peer_endpoint(endpoint))
        if self.settings.mdns:
            discovery = self.announce(
                protocol.REGISTRY_TYPE,
                self.id,
                self.port,
                on_ready=lambda: self.log(f"announced registry {self.id} by mDNS"),
                key=self.security.public_key if self.security is not None else None,
            )
            discovery.browse(
                protocol.REGISTRY_TYPE,
                lambda peer: self.peers.found.put(peer) if peer.id != self.id else None,
            )

    def _dns_tcp_ready(self, fd: int, events: int) -> None:
        assert self.dns_tcp is not None
        self.dns_tcp.ready(fd, events, zmq.POLLIN, zmq.POLLOUT)

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            self.counted[event["type"]] += 1
            if self.journal is not None:
                try:
                    self.journal.append(event)
                except OSError as exc:  # disk full: keep serving; the snapshot retries
                    self._persist_failed("append to the change log", exc)
            with contextlib.suppress(zmq.ZMQError):
                self.xpub.send_multipart(
                    [protocol.event_topic(event["service"]), encode(event)], zmq.NOBLOCK
                )
            for listener in self.on_change:
                self.guarded("change listener", listener, event)
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

    # -- requests (validated by Service, then protocol.request_from) -----------------
    def _op_hello(self, req: Request) -> dict[str, Any]:
        # the live peers, for failover; in secure mode each with its key (KEY@tcp://...)
        return {
            "registry": self.id,
            "tick": self.settings.tick,
            "pub_port": port_of(self.pub_endpoint),
            "peers": sorted(reqrep.cache_entry(link.address) for link in self.peers.live()),
        }

    def _op_register(self, req: Request) -> dict[str, Any]:
        inst = req.instance
        assert inst is not None
        register = req.op == "register"
        self.counted[req.op] += 1
        inst.key = self.service.sender_key  # proven by the handshake; a claimed key is ignored
        self._check_owner(inst.id, req.op)
        late = self.lateness.of(inst.id, req.sent)
        self._publish(self.store.heartbeat(inst, register=register, late=late))
        return {"instance": inst.to_dict()} if register else {"rev": inst.rev}

    _op_heartbeat = _op_register

    def _check_owner(self, inst_id: str, op: str, operator: bool = False) -> None:
        """Refuse *op* on an instance registered under another key than the sender's:
        nobody heartbeats, re-registers or deregisters someone else's instance, an
        operator included.  A record without a key (registered in plain mode, before
        this registry was secure) is anyone's to take over."""
        entry = self.store.entries.get(inst_id)
        owner = entry.inst.key if entry is not None else ""
        if not owner or owner == self.service.sender_key:
            return
        name = self.security.trusted.name_of(owner.encode()) if self.security else None
        who = f"key {owner}" + (f" ({name})" if name else "")
        hint = (
            "; deregister it with that key (--key FILE), or stop it and let it expire"
            if operator
            else ""
        )
        raise NotOwner(f"{op} refused: instance {inst_id!r} is registered by {who}, "
                       f"not by this key{hint}")  # fmt: skip

    def _op_deregister(self, req: Request) -> dict[str, Any]:
        self._check_owner(req.id, "deregister", req.operator)
        if req.operator:
            self._publish(self.store.deregister(req.id, "deregistered by an operator"))
        else:
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

    # -- metrics (core/metrics.py) ----------------------------------------------------
    def metrics(self) -> Iterator[Any]:
        from .metrics import families

        return families(self)

    def metric_routes(self) -> list[tuple[str, str, Any]]:
        from .metrics import routes

        return routes(self)

    # -- change stream ---------------------------------------------------------------
    def _tick(self) -> None:
        if self.dns_tcp is not None:
            self.dns_tcp.expire()  # idle DNS-over-TCP connections
        tick = encode({"registry": self.id, "seq": self.store.seq})
        self.xpub.send_multipart([protocol.TICK, tick])
        self.peers.tick()

    def _drain_subscriptions(self) -> None:
        joined = False
        for (msg,) in received(self.xpub, multipart=False):
            joined = joined or msg[:1] == b"\x01"
        if joined:  # tell the new subscriber at once that its subscription is live
            self.xpub.send_multipart(
                [protocol.TICK, encode({"registry": self.id, "seq": self.store.seq})]
            )

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
        self.withdraw()
        if getattr(self, "peers", None) is not None:  # built: save what it holds
            self.guarded("snapshot", self.persist)
            self.peers.close()
        if self.journal is not None:
            self.journal.close()
        if self.udp is not None:
            self.udp.close()
        if self.dns_tcp is not None:
            self.dns_tcp.close()
        super().close()  # every socket, links included
        if self.security is not None:
            self.security.release(self.zctx)  # its ZAP handler, before the context ends

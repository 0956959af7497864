"""A caller's connections to a service's instances: found, probed, live, dropped.

:class:`Pool` keeps one DEALER per instance (a worker, or a broker with
``via``) and puts it in the caller's :class:`~.balancer.Balancer` once it
answered a ping:

- **liveness**: every *heartbeat* seconds each instance is pinged, and one
  silent for three intervals (or whose connection closes) is dropped: its
  socket closed, its requests handed back to the caller to retry elsewhere
  at once, and probed again on a fresh socket;
- **discovery**: instances come from :meth:`Pool.use`, or from a lookup of
  the service repeated in the background (:meth:`Pool.follow`), so new
  instances are used and deregistered ones are drained (when two lookups in
  a row leave them out: one mDNS answer can be lost);
- **bounds**: at most :data:`MAX_PROBING` instances are waiting for their
  first answer at once (and :data:`MAX_CONNS` connected): one that does not
  answer in three heartbeats is closed and the next one found is tried, so a
  flood of announced instances costs a bounded number of sockets and the real
  ones are still reached in turn;
- **secure mode**: each connection is made with the key pinned for its
  endpoint (:mod:`.pins`: instances found with an untrusted or no key are
  left out); an instance whose handshake fails (it does not trust this
  caller's key, or does not hold the key pinned) is closed, not tried again,
  and told to *on_refused* with why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from .. import security
from ..endpoint import Endpoint
from ..registry.model import Instance
from ..reqrep import pinned_key
from ..sockets import connect, monitor_events, stop_monitor
from . import protocol as p
from .balancer import Backend, Balancer
from .pins import Ignored, usable

if TYPE_CHECKING:
    from ..daemon import Daemon

MISSES = 2  # lookups in a row without an instance before it is drained
# Instances found are connected to a few at a time: anyone on the LAN can announce as
# many as they like by mDNS, and each connection costs sockets (ZeroMQ allows ~1000).
MAX_PROBING = 64  # connections waiting for a first answer at once
MAX_CONNS = 256  # connections at once, live ones included
PROBE_TIME = 1.0  # seconds at least a new connection has to answer (else: the next one)


@dataclass(eq=False)
class Conn:
    """One instance: its endpoint, socket and liveness."""

    key: str  # the endpoint
    weight: int
    sock: zmq.Socket[bytes] | None = None
    monitor: zmq.Socket[bytes] | None = None
    backend: Backend | None = None  # set while it is in the balancer (alive)
    last_seen: float = 0.0
    since: float = 0.0  # when the current socket was made
    gone: bool = False  # no longer listed by the registry: drain, then close
    inflight: dict[bytes, Any] = field(default_factory=dict)  # rid -> the caller's Request
    deaths: int = 0
    missed: int = 0  # lookups in a row that did not list it


def endpoint_of(inst: Instance) -> str:
    """The endpoint callers use for *inst* (a worker, or a broker's frontend)."""
    return Endpoint(inst.host, inst.port).zmq


class Pool:
    """The connections of one caller (see the module's doc).

    *on_replies* reads a connection's socket when it is readable; *on_live*
    is called when an instance joins the balancer; *on_dead* gets the
    requests a dropped instance had in flight.
    """

    def __init__(
        self,
        daemon: Daemon,
        balancer: Balancer,
        *,
        heartbeat: float,
        max_request: int,
        relookup: float,
        on_replies: Callable[[Conn, zmq.Socket[bytes]], None],
        on_live: Callable[[], None],
        on_dead: Callable[[list[Any], float], None],
    ) -> None:
        self.daemon, self.balancer = daemon, balancer
        self.heartbeat, self.max_request, self.relookup = heartbeat, max_request, relookup
        self.on_replies, self.on_live, self.on_dead = on_replies, on_live, on_dead
        # secure mode: instances found and left out, and why (an untrusted key...)
        self.on_ignored: Ignored | None = None
        # secure mode: (endpoint, why) of each instance that refused this key, when none
        # accepts it (tell_refusals); while another serves, a warning says it
        self.on_refused: Callable[[str, str], None] | None = None
        self.what = "worker"  # what the instances are, in those messages (or "broker")
        self.security = security.active()
        self.refused: dict[str, str] = {}  # endpoint -> why its handshake failed
        self.held: list[tuple[str, str]] = []  # refusals not told yet (none live so far)
        self.conns: dict[str, Conn] = {}
        self.candidates: dict[str, int] = {}  # found, not connected yet: endpoint -> weight
        self.wanted: dict[str, int] = {}  # the latest instances found
        self.finder: Any = None
        self.started = time.monotonic()
        self.ping_seq = 0
        self.ever_live = False
        self.dropped = 0  # instances dropped (silent, or their connection closed)

    # -- instances found -------------------------------------------------------------------
    def use(self, endpoints: Iterable[tuple[str, int]], *, final: bool = False) -> None:
        """Call these (endpoint, weight) pairs from now on: new ones are probed, missing ones
        drained (at once if *final*, else when two calls in a row leave them out)."""
        wanted = self.wanted = {}
        for key, weight in endpoints:
            if Endpoint.from_peer(key) is None:
                self.daemon.warn(f"warning: instance endpoint {key[:80]!r} is malformed: ignored")
            elif key not in self.refused:  # (refused this caller's key: not tried again)
                wanted[key] = weight
        candidates = self.candidates
        for key in [k for k in candidates if k not in wanted]:
            del candidates[key]
        for key, weight in wanted.items():
            conn = self.conns.get(key)
            if conn is None:
                candidates[key] = weight
            else:
                conn.gone = False
                if conn.weight != weight:
                    conn.weight = weight
                    if conn.backend is not None:
                        self.balancer.add(key, weight)
        for key, conn in list(self.conns.items()):
            if key in wanted:
                conn.missed = 0
            elif not conn.gone:
                # one lookup can miss an instance (an mDNS answer lost): drain it only when
                # two in a row do; one that died is dropped by its heartbeats anyway
                conn.missed += 1
                if conn.missed < MISSES and not final:
                    continue
                conn.gone = True
                self._unbalance(conn)
                if not conn.inflight:
                    self.close(conn)
        self._probe()

    def follow(self, finder: Any) -> None:
        """Take the instances *finder* (a :class:`~eda.core.presence.Finder`) keeps finding."""
        self.finder = finder
        self.daemon.every(min(self.relookup, 1.0), "lookup", self._apply_lookup, first=0.2)

    def _apply_lookup(self) -> None:
        found = self.finder.take()
        if found is not None:
            self.use((endpoint_of(i), i.weight) for i in usable(found, self.on_ignored))

    def _probe(self) -> None:
        """Connect to more of the instances found, within the bounds."""
        candidates = self.candidates
        if not candidates:
            return
        conns = self.conns
        probing = sum(1 for c in conns.values() if c.backend is None)
        while candidates and probing < MAX_PROBING and len(conns) < MAX_CONNS:
            key = next(iter(candidates))
            conn = conns[key] = Conn(key, candidates.pop(key))
            self._open(conn)
            probing += 1

    def _rotate(self, now: float) -> None:
        """Close the connections that never answered in time, to try the next instances
        found (they go last in the line, if they are still listed)."""
        if not self.candidates:
            return
        limit = max(PROBE_TIME, 3 * self.heartbeat)
        for conn in list(self.conns.values()):
            if conn.backend is None and not conn.inflight and now - conn.since > limit:
                self._pass_over(conn)

    def _pass_over(self, conn: Conn) -> None:
        conn.gone = True
        self.close(conn)
        if conn.key in self.wanted:
            self.candidates[conn.key] = conn.weight
        self._probe()

    # -- one connection ----------------------------------------------------------------------
    def _open(self, conn: Conn) -> None:
        daemon = self.daemon
        sock = daemon.socket(zmq.DEALER, max_message=self.max_request + 65536)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        endpoint = Endpoint.from_peer(conn.key)
        assert endpoint is not None  # checked by use()
        # a dead process's connection closes at once: act on that, not on heartbeats alone
        # (and one that refuses the connection, announced but not there, is passed over;
        # in secure mode, one that refuses this key is told at once): watched from before
        # the connect, so that no handshake is missed
        events = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        secure = self.security is not None
        monitor = sock.get_monitor_socket(events | security.FAILURE_EVENTS if secure else events)
        conn.monitor = monitor
        # an IPv6 endpoint needs ZeroMQ's IPV6 option: connect says so; secure mode: the key
        # pinned where the instance was found (or given)
        connect(sock, endpoint, pinned_key(endpoint))
        conn.sock, conn.since = sock, time.monotonic()
        daemon.watch(sock, "replies", lambda: self.on_replies(conn, sock))
        daemon.watch(monitor, "disconnects", lambda: self._on_disconnect(conn, sock))
        self._ping(conn)

    def _on_disconnect(self, conn: Conn, sock: zmq.Socket[bytes]) -> None:
        monitor = conn.monitor
        if conn.sock is not sock or monitor is None:
            return
        events = refused = 0
        failed = None
        for event in monitor_events(monitor):
            if event.event == zmq.EVENT_CONNECT_RETRIED:
                refused += 1
            elif event.event & security.FAILURE_EVENTS:
                failed = failed or security.handshake_failure(event.event, event.value)
            else:
                events += 1
        if failed is not None:
            self._refused(conn, failed)
        elif events and (conn.backend is not None or conn.inflight):
            self._dead(conn, time.monotonic(), "its connection closed")
        elif refused and conn.backend is None and not conn.inflight and self.candidates:
            self._pass_over(conn)  # not there: try the next instance found

    def _refused(self, conn: Conn, why: str) -> None:
        """Secure mode: *conn*'s handshake failed (why): closed for good, its requests
        retried elsewhere, the caller told."""
        self.refused[conn.key] = why
        self.candidates.pop(conn.key, None)
        requests = list(conn.inflight.values())
        conn.inflight.clear()
        conn.gone = True
        self.close(conn)
        self.held.append((conn.key, why))
        if self.balancer:
            self.tell_refusals(fatal=False)
        if requests:
            self.on_dead(requests, time.monotonic())
        self._probe()

    def tell_refusals(self, *, fatal: bool) -> None:
        """Say the refusals not told yet: to :attr:`on_refused` when *fatal* (no instance
        accepts this key), else as warnings (the others serve)."""
        held, self.held = self.held, []
        key = self.security.public_key if self.security is not None else ""
        for endpoint, why in held:
            if fatal and self.on_refused is not None:
                self.on_refused(endpoint, why)
            else:
                others = "" if fatal else "; the others serve"
                level = "error" if fatal else "warning"
                self.daemon.warn(
                    f"{level}: the {self.what} at {endpoint} {why} (eda-keys show: {key}){others}"
                )

    def close(self, conn: Conn) -> None:
        """Close *conn*'s socket (and forget it if it is gone)."""
        self._unbalance(conn)
        if conn.monitor is not None:
            self.daemon.forget(conn.monitor)
            stop_monitor(conn.sock, conn.monitor)
            conn.monitor = None
        if conn.sock is not None:
            self.daemon.close_socket(conn.sock)
            conn.sock = None
        if conn.gone:
            self.conns.pop(conn.key, None)

    def _unbalance(self, conn: Conn) -> None:
        if conn.backend is not None:
            self.balancer.remove(conn.key)
            conn.backend = None

    def alive(self, conn: Conn, now: float) -> None:
        """*conn* answered: into the balancer (slow start unless it is there from the start)."""
        if conn.gone or conn.backend is not None:
            return
        warm = now - self.started > 1.0
        conn.backend = self.balancer.add(conn.key, conn.weight, conn, warm=warm)
        self.ever_live = True
        self.daemon.log(f"instance {conn.key} is live")
        if self.held:  # refused by some, served by this one: those refusals are warnings
            self.tell_refusals(fatal=False)
        self.on_live()

    # -- liveness ------------------------------------------------------------------------------
    def _ping(self, conn: Conn) -> None:
        self.ping_seq += 1
        if conn.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                conn.sock.send_multipart(p.ping(self.ping_seq), zmq.NOBLOCK)

    def heartbeats(self) -> None:
        now = time.monotonic()
        self._rotate(now)
        limit = 3 * self.heartbeat
        for conn in list(self.conns.values()):
            if conn.backend is not None and now - conn.last_seen > limit:
                self._dead(conn, now)
            elif conn.inflight and now - max(conn.last_seen, conn.since) > limit:
                self._dead(conn, now)  # drained (gone) instance that stopped answering
            elif conn.sock is not None:
                self._ping(conn)

    def _dead(self, conn: Conn, now: float, why: str = "it stopped answering") -> None:
        """*conn* is dead: its requests go back to the caller; probe it afresh."""
        self.daemon.warn(f"warning: instance {conn.key} dropped: {why}")
        self.dropped += 1
        conn.deaths += 1
        self._unbalance(conn)
        requests = list(conn.inflight.values())
        conn.inflight.clear()
        gone = conn.gone
        self.close(conn)
        if not gone:
            self._open(conn)  # a fresh socket: nothing queued for the dead one is ever sent
        self.on_dead(requests, now)

    # -- the whole pool --------------------------------------------------------------------------
    def probing(self) -> bool:
        """Whether an instance connected to has not answered yet."""
        return any(c.backend is None for c in self.conns.values())

    def none_to_hope_for(self, now: float, wait: float) -> bool:
        """No instance ever answered, none is left to try, and every one connected to
        had *wait* seconds to answer."""
        if self.ever_live or self.candidates:
            return False
        return all(now - c.since >= wait for c in self.conns.values())

    def all_refused(self) -> bool:
        """Secure mode: no instance ever answered, and every one found refused this
        caller's key (or failed the handshake): nothing to wait for."""
        return bool(self.refused) and not (self.ever_live or self.candidates or self.conns)

    def forget_requests(self) -> None:
        for conn in self.conns.values():
            conn.inflight.clear()

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            conn.gone = True
            self.close(conn)

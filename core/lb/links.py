"""A worker's links to the brokers of its service: the broker side of the worker API.

An eda-lb worker (:mod:`.worker`) serves callers directly and, besides,
the brokers (``eda-lb serve``) of its service that *find* returns: a
DEALER to each broker's backend says ``W`` (ready: service, id,
concurrency, weight, capacity) when it connects and again on every
reconnection ZeroMQ makes by itself, ``H`` heartbeats every interval both
ways; a broker silent for three intervals is reconnected with backoff and
jitter (:meth:`BrokerLinks.schedule`), one no longer listed is told ``D``
and left, and at most :data:`MAX_BROKERS` are served at once (anyone can
announce one).  Requests from a broker go through the worker's own
admission, as a caller's do.

Secure mode: each link is a CURVE client of the broker's key, pinned where
the broker was found or given (:mod:`.pins`); a broker that refuses this
worker's key (its ``--allow``) is a rate-limited warning and is tried again
with the backoff (the worker goes on serving its callers directly).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from .. import security
from ..endpoint import Endpoint
from ..errors import ProtocolError, UsageError
from ..reqrep import pinned_key
from ..sockets import connect, monitor_events, stop_monitor
from . import protocol as p

if TYPE_CHECKING:
    from .worker import Worker

MAX_BROKERS = 16  # brokers served at once (anyone can announce one: each costs sockets)


@dataclass
class BrokerLink:
    """A DEALER to one broker's backend."""

    endpoint: str
    sock: zmq.Socket[bytes] | None = None
    monitor: zmq.Socket[bytes] | None = None  # connection events of sock
    connects: int = 0  # connections made by sock
    last_seen: float = 0.0
    backoff: float = 0.5
    retry_at: float = 0.0
    heard: bool = False  # it ever sent H: a broker, not just a port that accepts


class BrokerLinks:
    """The links of *worker* to the brokers *find* returns (None: no news)."""

    def __init__(self, worker: Worker, find: Callable[[], list[str] | None]) -> None:
        self.worker = worker
        self.find = find
        self.links: dict[str, BrokerLink] = {}
        self.found: list[str] = []  # the latest found, in the order they are tried

    def goodbye(self) -> None:
        """Tell every broker ``D`` (the worker is leaving); the links stay."""
        for link in self.links.values():
            if link.sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    link.sock.send_multipart(p.disconnect(), zmq.NOBLOCK)

    def close(self) -> None:
        for link in self.links.values():
            self.drop(link)  # a goodbye sent still goes out (linger)

    def tend(self) -> None:
        """Connect to what *find* lists, heartbeat the live, reconnect the silent."""
        if self.worker.draining:  # said goodbye: no heartbeats, no reconnects
            return
        now = time.monotonic()
        found = self.find()
        if found is not None:
            listed = dict.fromkeys(found)  # in the order tried so far, new ones last
            self.found = [e for e in self.found if e in listed]
            known = set(self.found)
            self.found += [e for e in listed if e not in known]
            for endpoint in [e for e in self.links if e not in self.found]:
                self.worker.log(f"broker {endpoint} no longer listed: leaving it")
                self.drop(self.links.pop(endpoint), goodbye=True)
        for endpoint in self.found:
            if len(self.links) >= MAX_BROKERS:
                break
            if endpoint not in self.links:
                self.links[endpoint] = BrokerLink(endpoint)
        silent = 3 * self.worker.heartbeat_interval
        for link in list(self.links.values()):
            if link.sock is None:
                if now >= link.retry_at:
                    self._connect(link, now)
            elif now - link.last_seen > silent:
                self.worker.log(f"broker {link.endpoint} silent for {silent:g} s: reconnecting")
                self.drop(link)
                self.schedule(link, now)
                if not link.heard and len(self.found) > MAX_BROKERS:
                    # never a word from it, and others wait for a place: give them its turn
                    del self.links[link.endpoint]
                    self.found.remove(link.endpoint)
                    self.found.append(link.endpoint)
            else:
                with contextlib.suppress(zmq.ZMQError):
                    # behind the replies waiting for it, if any: never dropped on a full pipe
                    self.worker.pump.send(link.sock, None, p.heartbeat())

    def _connect(self, link: BrokerLink, now: float) -> None:
        w = self.worker
        sock = w.socket(zmq.DEALER, linger=1000, max_message=2 * w.max_request + 65536)
        w.outbox.adopt(sock)
        # a restarted broker is reconnected to by ZeroMQ on its own, under a new identity:
        # say W again then, rather than wait to find it silent (watched from before the
        # connect, so that the first connection is counted)
        secure = security.active()
        events = zmq.EVENT_CONNECTED | (security.FAILURE_EVENTS if secure is not None else 0)
        link.monitor = sock.get_monitor_socket(events)
        try:
            endpoint = Endpoint.from_peer(link.endpoint)
            if endpoint is None:
                raise UsageError("malformed endpoint")
            connect(sock, endpoint, pinned_key(endpoint))  # secure mode: the broker's key
        except (zmq.ZMQError, UsageError) as exc:
            link.sock = sock
            self.drop(link)
            w.limited("broker", f"cannot connect to broker {link.endpoint}: {exc}")
            self.schedule(link, now)
            return
        link.sock, link.last_seen, link.connects = sock, now, 0
        w.pump.watch(sock, "broker", lambda: w.read_requests(sock, 0))
        w.watch(link.monitor, "broker connects", lambda: self._connected(link, sock))
        self._ready(sock)
        w.log(f"connecting to broker {link.endpoint}")

    def _ready(self, sock: zmq.Socket[bytes]) -> None:
        w = self.worker
        ready = p.ready(w.service, w.inst_id, w.concurrency, w.weight, w.capacity)
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(ready, zmq.NOBLOCK)

    def _connected(self, link: BrokerLink, sock: zmq.Socket[bytes]) -> None:
        if link.sock is not sock or link.monitor is None:
            return
        for event in monitor_events(link.monitor):
            if event.event != zmq.EVENT_CONNECTED:
                self._refused(link, event.event, event.value)
                return
            link.connects += 1
            if link.connects > 1:  # the first connection carried the W sent at connect
                self.worker.log(f"reconnected to broker {link.endpoint}: ready again")
                link.last_seen = time.monotonic()
                self._ready(sock)

    def _refused(self, link: BrokerLink, kind: int, value: int) -> None:
        """Secure mode: the broker's handshake failed (it does not trust this worker's
        key, or does not hold the key pinned): say so, leave it, try again later."""
        why = security.handshake_failure(kind, value) or "failed the secure handshake"
        secure = security.active()
        key = secure.public_key if secure is not None else ""
        self.worker.limited(
            f"refused:{link.endpoint}",
            f"the broker at {link.endpoint} {why} (eda-keys show: {key}): not serving it",
        )
        self.drop(link)
        self.schedule(link, time.monotonic())

    def schedule(self, link: BrokerLink, now: float) -> None:
        """When to try *link* again: its backoff, doubled each time, jittered +-50%."""
        link.retry_at = now + link.backoff * random.uniform(0.5, 1.5)
        link.backoff = min(link.backoff * 2, 10.0)

    def drop(self, link: BrokerLink, goodbye: bool = False) -> None:
        if link.monitor is not None:
            self.worker.forget(link.monitor)
            stop_monitor(link.sock, link.monitor)
            link.monitor = None
        if link.sock is not None:
            if goodbye:
                with contextlib.suppress(zmq.ZMQError):
                    link.sock.send_multipart(p.disconnect(), zmq.NOBLOCK)
            self.worker.pump.forget(link.sock)
            self.worker.close_socket(link.sock)
            link.sock = None

    def on_message(self, sock: zmq.Socket[bytes], msg: p.Message) -> None:
        link = next((b for b in self.links.values() if b.sock is sock), None)
        if link is None:
            return
        if msg.kind == p.HEARTBEAT:
            link.last_seen = time.monotonic()
            link.backoff = 0.5
            link.heard = True
        elif msg.kind == p.DISCONNECT:
            self.worker.log(f"broker {link.endpoint} said goodbye: reconnecting later")
            self.drop(link)
            self.schedule(link, time.monotonic())
        else:
            unexpected = ProtocolError(f"unexpected {msg.kind.decode()} from a broker")
            self.worker.dropped("message", unexpected)

"""The broker (``eda-lb serve NAME``): callers on one side, workers on the other.

Callers connect a DEALER to the *frontend* ROUTER and speak to it exactly as
to a worker (Q, P, S); workers connect a DEALER to the *backend* ROUTER, say
W (ready, with their concurrency, capacity and weight), then exchange H heartbeats
with the broker and answer the Q it forwards (:mod:`.protocol`).  Each
request goes to a ready worker with a free slot, chosen by the same
:class:`~.balancer.Balancer` callers use (strategies, outlier ejection, slow
start, panic threshold); when every slot is taken it waits in a bounded queue.

Nothing is lost when a worker dies: a worker silent for three heartbeat
intervals (or saying D) is dropped and its requests in flight go to another
worker with the same request id, up to *retries* times.  A caller that
retries (the same rid again) while its request is still running gets it run
on a second worker too; the first answer is the one forwarded, once.

Everything from either socket is validated at the edge; what fails is
counted and dropped (a rate-limited warning), and changes no state.

This module is the broker's poll loop and its decisions; what it keeps lives
next to it: the requests and their bounded queue (core/lb/brokerqueue.py),
the workers connected (core/lb/brokerworkers.py), and the figures of its S
answer (core/lb/stats.py).  About 540 lines for a reason: what is left is
the two sockets' handlers and the decisions they share each turn (pick,
send, requeue a dead worker's requests, the first answer of a retried one):
split, a reader would follow one request across modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import zmq

from ..daemon import Daemon, Log, port_file, port_of
from ..errors import ProtocolError, UsageError
from ..outbox import Pump
from .balancer import STRATEGIES, Balancer
from .brokerqueue import Pending, Waiting
from .brokerworkers import Worker, Workers
from .protocol import (
    BUSY,
    DISCONNECT,
    ERR,
    HEARTBEAT,
    MAX_BODY,
    OK,
    PING,
    READY,
    REPLY,
    REQUEST,
    STATS,
    STATS_QUERY,
    TAG,
    Budget,
    Message,
    TooLarge,
    forward_request,
    messages,
    parse,
    parse_reply,
    parse_request,
    pong,
    send,
)
from .stats import broker_figures

BATCH_BYTES = 16 << 20  # caller bytes read at once before the workers' side gets its turn
_DISCONNECT = [TAG, DISCONNECT]
_HEARTBEAT = [TAG, HEARTBEAT]


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class Settings:
    """What ``eda-lb serve`` was asked for."""

    service: str
    bind: str = "tcp://*:*"  # frontend: callers
    backend: str = "tcp://*:*"  # workers
    strategy: str = "round-robin"
    heartbeat: float = 1.0  # seconds between heartbeats, both ways
    queue: int = 10_000  # requests waiting for a free worker, at most
    queue_bytes: int = 64 << 20  # and their bodies, in bytes at most
    max_request: int = MAX_BODY  # bytes of one request body
    retries: int = 2  # re-sends of a request whose worker died
    pipeline: int = 0  # requests sent ahead per worker slot; 0: as many as the worker's W
    # says it takes (its capacity: a persistent worker pipelines requests into its processes)
    eject_after: int = 5  # consecutive failures that eject a worker
    eject_base: float = 1.0  # seconds of the first ejection (doubling, capped)
    eject_max: float = 30.0
    slow_start: float = 0.0  # seconds a new or returning worker ramps up over
    panic: float = 50.0  # percent healthy below which all workers are used
    # remember ports bound as '*' (in $XDG_STATE_HOME/eda/lb-SERVICE[.backend].port), so
    # that a broker restarted with the same command comes back where callers and workers are
    remember: bool = False


class Broker(Daemon):
    """``eda-lb serve``: balance callers' requests over the workers connected to it."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: Log = _quiet,
        warn: Log | None = None,
        interface: str | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        super().__init__(log, warn, interface=interface, context=context)
        if settings.strategy not in STRATEGIES:
            raise UsageError(
                f"unknown strategy {settings.strategy!r}: use one of {', '.join(STRATEGIES)}"
            )
        self.settings = settings
        self.balancer = Balancer(
            settings.strategy,
            eject_after=settings.eject_after,
            eject_base=settings.eject_base,
            eject_max=settings.eject_max,
            slow_start=settings.slow_start,
            panic=settings.panic,
        )
        self.members = Workers(self.balancer, settings.heartbeat, settings.pipeline)
        self.pending: dict[tuple[bytes, bytes], Pending] = {}
        # request bytes each caller has at the broker (queued or at a worker), at most
        # half of --queue-bytes: a caller that sends and never reads holds that much
        self.held: dict[bytes, int] = {}
        self.caller_bytes = max(settings.max_request, settings.queue_bytes // 2)
        self.queue = Waiting(settings.queue, settings.queue_bytes)
        self.requests = 0  # requests accepted from callers
        self.answered = 0  # replies sent to callers
        self.errors = 0  # of which err
        self.refused = 0  # busy replies (queue full)
        self.retried = 0  # re-sends after a worker died, was busy or failed
        self.stale = 0  # worker replies for nothing in flight
        self.expired = 0  # requests whose deadline passed (queued, or at a silent worker)
        self.stats_budget = Budget()
        self.stats_dropped = 0  # S over the budget
        self.pump = Pump(self)  # replies a caller did not read yet, bounded in bytes
        self.outbox = self.pump.outbox
        self.id = ""
        self.endpoint = self.backend_endpoint = ""
        self.draining = False

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both sockets and start the timers; raises BindError / UsageError."""
        limit = 2 * self.settings.max_request + 65_536  # a bigger message drops its peer
        self.front = self.socket(zmq.ROUTER, max_message=limit)
        self.back = self.socket(zmq.ROUTER, max_message=limit)
        # callers: what ZeroMQ queues per caller is bounded in bytes, and a reply its
        # pipe cannot take waits in the outbox (bounded too); workers: up to their
        # capacity in flight each (they read at once), so their pipes hold that many
        self.outbox.adopt(self.front)
        self.back.setsockopt(zmq.SNDHWM, 100_000)
        self.back.setsockopt(zmq.RCVHWM, 100_000)
        name = f"lb-{self.settings.service}"
        front, back = (port_file(n) if self.settings.remember else None
                       for n in (name, f"{name}.backend"))  # fmt: skip
        self.endpoint = self.bind_remembered(self.front, self.settings.bind, front)
        self.backend_endpoint = self.bind_remembered(self.back, self.settings.backend, back)
        self.pump.watch(self.front, "caller message", self._on_front)
        self.watch(self.back, "worker message", self._on_back)
        self.every(self.settings.heartbeat, "heartbeat", self._heartbeat)
        self.every(min(0.1, self.settings.heartbeat), "deadlines", self._expire)

    @property
    def port(self) -> int:
        return port_of(self.endpoint)

    @property
    def backend_port(self) -> int:
        return port_of(self.backend_endpoint)

    def drain(self, grace: float) -> None:
        """Stop taking requests (callers get busy, and retry elsewhere), let those
        running finish for *grace* seconds at most; what is left is answered busy."""
        self.draining = True
        for p in self.queue.take_all():
            self._answer(p, BUSY, b"broker shutting down")
        end = time.monotonic() + grace
        self.serve(lambda: not self.pending or time.monotonic() > end)

    def close(self) -> None:
        """Tell every worker (D), answer what is still pending (busy: never run, or the
        caller retries it under the same rid), close."""
        if getattr(self, "back", None) is not None:
            for ident in list(self.workers):
                with contextlib.suppress(zmq.ZMQError):
                    send(self.back, [ident, *_DISCONNECT])
            for p in list(self.pending.values()):
                with contextlib.suppress(zmq.ZMQError):
                    self._answer(p, BUSY, b"broker shutting down")
        super().close()

    def _message(self, msg: list[bytes], max_body: int, what: str) -> Message | None:
        """The message after *msg*'s identity frame, or None: dropped as a malformed *what*."""
        try:
            return parse(msg, 1, max_body)
        except ProtocolError as exc:
            self.dropped(what, exc)
            return None

    # -- callers ------------------------------------------------------------------------
    def _on_front(self) -> None:
        max_body = self.settings.max_request
        # at most BATCH_BYTES, then the workers' side gets its turn (replies, heartbeats)
        for msg in messages(self.front, max_bytes=BATCH_BYTES):
            if len(msg) == 6 and msg[2] == REQUEST:
                try:
                    rid, ms, body = parse_request(msg, 1, max_body)
                except TooLarge as exc:
                    self.requests += 1
                    self._reply(msg[0], exc.rid, ERR, str(exc).encode())
                except ProtocolError as exc:
                    self.dropped("caller request", exc)
                else:
                    self._request(msg[0], rid, ms, body)
                continue
            m = self._message(msg, max_body, "caller message")
            if m is None:
                continue
            if m.kind == PING:
                load = pong(m.seq, self.inflight, self.capacity, len(self.queue))
                self.pump.send(self.front, msg[0], load)
            elif m.kind == STATS_QUERY:
                if not self.stats_budget.take():  # a flood: answered STATS_RATE times a second
                    self.stats_dropped += 1
                    continue
                figures = json.dumps(self.stats(), allow_nan=False).encode()
                self.pump.send(self.front, msg[0], [TAG, STATS, figures])
            else:
                self.dropped("caller message", ProtocolError(f"{m.kind!r} is not for a broker"))

    def _request(self, client: bytes, rid: bytes, ms: int, body: bytes) -> None:
        now = time.monotonic()
        deadline = now + ms / 1000 if ms else math.inf
        key = (client, rid)
        p = self.pending.get(key)
        if p is not None:  # the caller retries: run it on another worker as well (when
            p.deadline = max(p.deadline, deadline)  # none is free, the running one may answer)
            if p.running and p.attempts <= self.settings.retries:
                self._send(p, now)
            return
        self.requests += 1
        if self.draining:
            self._reply(client, rid, BUSY, b"broker shutting down")
            return
        if self.outbox.waiting and self.outbox.full(self.front, client):
            # it does not read its replies: nothing more is run for it (the busy reply is
            # counted by the outbox as refused: its pipe cannot take that either)
            self.refused += 1
            self._reply(client, rid, BUSY, b"caller not reading its replies")
            return
        held = self.held.get(client, 0) + len(body)
        if held > self.caller_bytes:  # queued or running: one caller's share is taken
            self.refused += 1
            self._reply(client, rid, BUSY, b"too many of this caller's requests waiting")
            return
        p = Pending(client, rid, body, deadline)
        if not self.queue and self._send(p, now):
            self.pending[key] = p
            self.held[client] = held
        elif self.queue.fits(p):
            self.pending[key] = p
            self.held[client] = held
            self.queue.push(p)
        else:
            self.refused += 1
            self._reply(client, rid, BUSY, b"broker queue full")

    def _reply(self, client: bytes, rid: bytes, status: bytes, body: bytes) -> None:
        self.answered += 1
        if status == ERR:
            self.errors += 1
        self.pump.send(self.front, client, [TAG, REPLY, rid, status, body])

    def _answer(self, p: Pending, status: bytes, body: bytes) -> None:
        """The one reply to *p* (later ones are dropped)."""
        if p.done:
            return
        p.done = True
        self._forget(p)
        self._reply(p.client, p.rid, status, body)

    def _forget(self, p: Pending) -> None:
        """*p* is answered (or expired): no longer pending, its bytes no longer held."""
        if self.pending.pop((p.client, p.rid), None) is None:
            return
        left = self.held[p.client] - len(p.body)
        if left > 0:
            self.held[p.client] = left
        else:
            del self.held[p.client]

    # -- choosing a worker ----------------------------------------------------------------
    def _pick(self, p: Pending) -> Worker | None:
        """A worker with a free slot not already running *p*, by the balancer: workers
        *p* went to before are avoided while another one can take it."""
        full = self.members.full
        chosen = self.balancer.pick(full.union(p.tried) if p.tried else full)
        if chosen is None:
            return None
        w: Worker = chosen.data
        if w.free and p.rid not in w.inflight and chosen.key not in p.refused:
            return w
        # every free worker had it already, or one runs another caller's same rid; a
        # worker that answered busy is not asked again: the request waits for the others
        hard = full.union(x.backend.key for x in self.workers.values() if p.rid in x.inflight)
        hard |= p.refused
        chosen = self.balancer.pick(hard)
        if chosen is None or chosen.key in hard:
            return None
        w = chosen.data
        return w

    def _send(self, p: Pending, now: float) -> bool:
        """Send *p* to a worker; False when none has a free slot."""
        w = self._pick(p)
        if w is None:
            return False
        left = p.deadline - now
        ms = 0 if left == math.inf else max(1, int(left * 1000))
        w.inflight[p.rid] = (p, now)
        backend = w.backend
        self.balancer.started(backend)
        if len(w.inflight) >= w.limit:
            self.members.full.add(backend.key)
        p.attempts += 1
        p.running += 1
        p.tried.append(backend.key)
        forward_request(self.back, w.ident, p.rid, b"%d" % ms, p.body)
        return True

    def _dispatch(self) -> None:
        """Send queued requests while some worker has a free slot."""
        items = self.queue.items
        now = time.monotonic()
        while items:
            p = items[0]
            if p.done or self._send(p, now):
                self.queue.pop()
            elif self._all_refused(p):  # the workers it waited for are gone
                self.queue.pop()
                self._answer(p, BUSY, b"every worker is busy")
            else:
                return

    # -- workers ------------------------------------------------------------------------
    def _on_back(self) -> None:
        now = time.monotonic()
        freed = False
        max_body = self.settings.max_request
        workers = self.workers
        for msg in messages(self.back):
            ident = msg[0]
            w = workers.get(ident)
            if len(msg) == 6 and msg[2] == REPLY and w is not None:
                try:
                    rid, status, body = parse_reply(msg, 1, max_body)
                except ProtocolError as exc:
                    self.dropped("worker reply", exc)
                    continue
                w.seen = now
                freed = self._result(w, rid, status, body, now) or freed
                continue
            m = self._message(msg, max_body, "worker message")
            if m is None:
                continue
            if m.kind == READY:
                assert m.data is not None
                freed = self._ready(ident, m.data, now) or freed
            elif w is None:
                if m.kind != DISCONNECT:
                    self._stranger(ident)
            elif m.kind == HEARTBEAT:
                self._beat(w, now)
            elif m.kind == DISCONNECT:
                self._drop(w, "disconnected")
                freed = True
            else:
                self.dropped("worker message", ProtocolError(f"{m.kind!r} is not for a broker"))
        if freed:
            self._dispatch()

    def _stranger(self, ident: bytes) -> None:
        """A message from a worker we do not know (we restarted, or dropped it): say D,
        so that it says W again at once instead of waiting for our silence."""
        send(self.back, [ident, *_DISCONNECT])

    def _ready(self, ident: bytes, data: dict[str, Any], now: float) -> bool:
        if data["service"] != self.settings.service:
            self.dropped("worker ready", ProtocolError(f"a worker of {data['service']!r}"))
            send(self.back, [ident, *_DISCONNECT])
            known = self.workers.get(ident)
            if known is not None:
                self._drop(known, "changed service")
            return False
        try:
            w = self.members.ready(ident, data, now)
        except OverflowError as exc:
            self.dropped("worker ready", ProtocolError(str(exc)))
            return False
        if w is not None:
            self.log(f"worker {w.id} ready (concurrency {w.concurrency}, weight {data['weight']})")
            send(self.back, [ident, *_HEARTBEAT])
        return True

    def _result(self, w: Worker, rid: bytes, status: bytes, body: bytes, now: float) -> bool:
        entry = w.inflight.pop(rid, None)
        if entry is None:
            self.stale += 1  # a reply after its deadline, or made up
            return False
        if len(w.inflight) < w.limit:
            self.members.full.discard(w.backend.key)
        p, t0 = entry
        p.running -= 1
        if status == BUSY:  # not a failure, and not an attempt: try another worker
            self.balancer.released(w.backend)
            p.busy += 1
            p.refused.add(w.backend.key)
            p.attempts -= 1
            if p.done:
                pass
            elif self._all_refused(p):
                self._answer(p, BUSY, b"every worker is busy")
            else:
                self._again(p)  # to a worker that did not say busy, now or once one is free
            return True
        self.balancer.finished(w.backend, status == OK)  # an error reply is a failure (5xx)
        w.requests += 1
        w.latencies.append(now - t0)
        w.latency.observe(now - t0)
        if status != OK:
            w.errors += 1
        self._answer(p, status, body)
        return True

    def _all_refused(self, p: Pending) -> bool:
        """Whether every worker there is answered *p* busy."""
        return bool(p.refused) and all(w.backend.key in p.refused for w in self.workers.values())

    def _again(self, p: Pending) -> None:
        """Send *p* once more (first in the queue), or give up after the retries."""
        if p.running or p.done:
            return  # another worker still runs it
        if p.attempts > self.settings.retries:
            self._answer(p, ERR, f"failed on {p.attempts} workers".encode())
            return
        self.retried += 1
        if not self._send(p, time.monotonic()):
            self.queue.push(p, first=True)

    def _drop(self, w: Worker, why: str) -> None:
        """Forget *w*; what it was running goes to other workers (same rid)."""
        lost = self.members.remove(w)
        if lost is None:
            return
        if lost:
            self.warn(f"warning: worker {w.id} {why}: re-sending its {len(lost)} request(s)")
        else:
            self.log(f"worker {w.id} {why}")
        for p, _t0 in reversed(lost):
            p.running -= 1
            self._again(p)
        self._dispatch()

    # -- timers -------------------------------------------------------------------------
    def _beat(self, w: Worker, now: float) -> None:
        """A worker's H: answered at once, so that a worker whose heartbeat is faster
        than ours still hears from us in time."""
        self.members.beat(w, now)
        send(self.back, [w.ident, *_HEARTBEAT])

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if self.members.silent(w, now):
                self._drop(w, "went silent")
            else:
                send(self.back, [w.ident, *_HEARTBEAT])

    def _expire(self) -> None:
        """Requests whose deadline (the caller's time) passed: a queued one is answered
        busy (not run: the caller may try elsewhere); a running one whose worker did not
        answer within a heartbeat interval after it is a failure of that worker and is
        forgotten -- the caller's own timeout, at the same moment, retries or reports it,
        whereas an error reply racing that timeout would end the request for good."""
        now = time.monotonic()
        for p in self.queue.take_expired(now):
            self.expired += 1
            self._answer(p, BUSY, b"no free worker in time")
        grace = now - self.settings.heartbeat
        freed = False
        for w in list(self.workers.values()):
            late = [rid for rid, (p, _t0) in w.inflight.items() if p.deadline < grace]
            for rid in late:
                p, _t0 = w.inflight.pop(rid)
                p.running -= 1
                w.errors += 1
                self.balancer.finished(w.backend, False)
                if not p.running and not p.done:
                    self.expired += 1
                    p.done = True  # a retry of its rid is a new request
                    self._forget(p)
                freed = True
            if late:
                self.members.fullness(w)
        if freed:
            self._dispatch()

    # -- figures ------------------------------------------------------------------------
    @property
    def workers(self) -> dict[bytes, Worker]:
        return self.members.by_ident

    @property
    def inflight(self) -> int:
        return self.members.inflight

    @property
    def capacity(self) -> int:
        return self.members.capacity

    def metrics(self) -> Any:
        """What --metrics exports (core/lb/metrics.py)."""
        from .metrics import broker_families

        return broker_families(self)

    def stats(self) -> dict[str, Any]:
        """What S answers (core/lb/stats.py)."""
        return broker_figures(self)

"""The broker (``eda-lb serve NAME``): callers on one side, workers on the other.

Callers connect a DEALER to the *frontend* ROUTER and speak to it exactly as
to a worker (REQUEST, PING, STATS); workers connect a DEALER to the *backend* ROUTER,
say READY (ready, with their concurrency and weight), then exchange BEAT
heartbeats with the broker and answer the REQUEST it forwards.  Each request goes
to one ready worker with a free slot, chosen by the same balancer callers
use; when every slot is taken it waits in a bounded queue.

Nothing is lost when a worker dies: a worker silent for three heartbeat
intervals (or saying BYE) is dropped and its requests in flight go to another
worker with the same request id, up to *retries* times.  A caller that
retries (the same rid again) while its request is still running gets it
run on a second worker too; the first answer is the one forwarded, once.

Everything from either socket is validated here, at the edge; what fails is
counted and dropped (a rate-limited warning), and changes no state.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..daemon import Daemon, Log, port_of, received
from ..errors import EdaError, UsageError

TAG = b"EDALB1"
RID_RE = re.compile(rb"[\x21-\x7e]{1,64}")
ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
MAX_TIMEOUT_MS = 86_400_000  # a day: longer is read as "no deadline"
MAX_READY = 4096  # bytes of a READY frame's JSON
MAX_WORKERS = 10_000  # ready workers one broker keeps (a flood of READY is refused beyond)
MAX_CONCURRENCY = 10_000
MAX_WEIGHT = 65_535
DEAD_KEPT = 64  # dropped workers still listed by stats (state "dead")
LATENCIES = 2048  # latency samples per worker for the percentiles
MISSED = 3  # heartbeat intervals of silence after which a worker is dropped

REQUEST, REPLY, PING, PONG, STATS, FIGURES = b"Q", b"R", b"P", b"O", b"S", b"T"
READY, BEAT, BYE = b"W", b"H", b"D"
OK, ERR, BUSY = b"ok", b"err", b"busy"


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
    max_request: int = 1 << 20  # bytes of one request body
    retries: int = 2  # re-sends of a request whose worker died


@dataclass(eq=False, slots=True)
class Pending:
    """One caller's request, from its REQUEST until its reply went out."""

    client: bytes  # the caller's identity on the frontend
    rid: bytes
    body: bytes
    deadline: float  # monotonic; math.inf without one
    attempts: int = 0  # times sent to a worker
    running: int = 0  # workers running it now
    done: bool = False  # answered: later replies are only freed slots
    tried: list[bytes] = field(default_factory=list)  # worker identities, in order


@dataclass(eq=False)
class Worker:
    """A worker connected to the backend, with its figures."""

    ident: bytes
    id: str
    concurrency: int
    weight: int
    seen: float  # monotonic time of its last message
    joined: float  # wall time of its READY
    inflight: dict[bytes, tuple[Pending, float]] = field(default_factory=dict)  # rid -> (req, t0)
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES))
    state: str = "healthy"

    @property
    def free(self) -> bool:
        return len(self.inflight) < self.concurrency


def percentile(ordered: list[float], p: float) -> float | None:
    """The *p*-th percentile (nearest rank) of sorted *ordered*, None when empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def figures(latencies: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(latencies)
    out: dict[str, float | None] = {}
    for p in (50, 90, 99):
        value = percentile(ordered, p)
        out[f"p{p}_ms"] = None if value is None else round(value * 1000, 3)
    return out


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
        self.workers: dict[bytes, Worker] = {}
        self.dead: deque[Worker] = deque(maxlen=DEAD_KEPT)
        self.pending: dict[tuple[bytes, bytes], Pending] = {}
        self.queue: deque[Pending] = deque()
        self.requests = 0  # requests accepted from callers
        self.answered = 0  # replies sent to callers
        self.errors = 0  # of which errors
        self.refused = 0  # busy replies (queue full)
        self.retried = 0  # re-sends after a worker died or was busy
        self.stale = 0  # worker replies for nothing in flight
        self.id = ""
        self.endpoint = self.backend_endpoint = ""
        self._rr = 0
        self._limit = 2 * settings.max_request + 65_536  # a bigger message drops its peer

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both sockets and start the heartbeat; raises BindError / UsageError."""
        self.front = self.socket(zmq.ROUTER, max_message=self._limit)
        self.back = self.socket(zmq.ROUTER, max_message=self._limit)
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
        self.endpoint = self.bind(self.front, self.settings.bind)
        self.backend_endpoint = self.bind(self.back, self.settings.backend)
        self.watch(self.front, "caller request", self._on_front)
        self.watch(self.back, "worker message", self._on_back)
        self.every(self.settings.heartbeat, "heartbeat", self._heartbeat)
        self.every(min(0.1, self.settings.heartbeat), "deadlines", self._expire)

    @property
    def port(self) -> int:
        return port_of(self.endpoint)

    @property
    def backend_port(self) -> int:
        return port_of(self.backend_endpoint)

    def close(self) -> None:
        """Tell every worker (BYE), answer what is still pending (err), close."""
        back = getattr(self, "back", None)
        if back is not None:
            for ident in list(self.workers):
                with contextlib.suppress(zmq.ZMQError):
                    back.send_multipart([ident, TAG, BYE], zmq.NOBLOCK)
            for p in list(self.pending.values()):
                self._answer(p, ERR, b"broker shutting down")
        super().close()

    # -- callers ------------------------------------------------------------------------
    def _on_front(self) -> None:
        for msg in received(self.front):
            n = len(msg)
            if n < 3 or msg[1] != TAG:
                self.dropped("caller message", ValueError("not an eda-lb message"))
                continue
            kind = msg[2]
            if kind == REQUEST and n == 6:
                self._request(msg[0], msg[3], msg[4], msg[5])
            elif kind == PING and n == 4 and len(msg[3]) <= 64:
                load = {"inflight": self.inflight, "concurrency": self.capacity}
                load["queued"] = len(self.queue)
                self.front.send_multipart([msg[0], TAG, PONG, msg[3], json.dumps(load).encode()])
            elif kind == STATS and n == 3:
                self.front.send_multipart([msg[0], TAG, FIGURES, json.dumps(self.stats()).encode()])
            else:
                self.dropped("caller message", ValueError(f"bad frames ({n}, type {kind[:8]!r})"))

    def _request(self, client: bytes, rid: bytes, timeout: bytes, body: bytes) -> None:
        if RID_RE.fullmatch(rid) is None:
            self.dropped("caller request", ValueError("bad request id"))
            return
        if not timeout.isdigit() or len(timeout) > 12:
            self.dropped("caller request", ValueError("bad timeout"))
            return
        ms = int(timeout)
        now = time.monotonic()
        deadline = now + ms / 1000 if 0 < ms <= MAX_TIMEOUT_MS else math.inf
        key = (client, rid)
        p = self.pending.get(key)
        if p is not None:  # the caller retries: run it on another worker as well
            p.deadline = max(p.deadline, deadline)
            if p.running and p.attempts <= self.settings.retries and not self._send(p, now):
                pass  # no other free worker: the running attempts may still answer
            return
        self.requests += 1
        if len(body) > self.settings.max_request:
            self._reply(client, rid, ERR, f"request too large ({len(body)} bytes)".encode())
            return
        p = Pending(client, rid, body, deadline)
        if not self.queue and self._send(p, now):
            self.pending[key] = p
            return
        if len(self.queue) >= self.settings.queue:
            self.refused += 1
            self._reply(client, rid, BUSY, b"broker queue full")
            return
        self.pending[key] = p
        self.queue.append(p)

    def _reply(self, client: bytes, rid: bytes, status: bytes, body: bytes) -> None:
        self.answered += 1
        if status != OK:
            self.errors += status == ERR
        self.front.send_multipart([client, TAG, REPLY, rid, status, body])

    def _answer(self, p: Pending, status: bytes, body: bytes) -> None:
        """The one reply to *p* (later ones are dropped)."""
        if p.done:
            return
        p.done = True
        self.pending.pop((p.client, p.rid), None)
        self._reply(p.client, p.rid, status, body)

    # -- choosing a worker ----------------------------------------------------------------
    def _pick(self, p: Pending) -> Worker | None:
        """A worker with a free slot not yet running *p*, by the strategy."""
        rid = p.rid
        ready = [w for w in self.workers.values() if w.free and rid not in w.inflight]
        if p.tried and len(ready) > 1:  # a retry: rather a worker that has not had it
            fresh = [w for w in ready if w.ident not in p.tried]
            ready = fresh or ready
        if not ready:
            return None
        self._rr += 1
        return ready[self._rr % len(ready)]

    def _send(self, p: Pending, now: float) -> bool:
        """Send *p* to a worker; False when none has a free slot."""
        w = self._pick(p)
        if w is None:
            return False
        left = p.deadline - now
        ms = b"0" if left == math.inf else str(max(1, int(left * 1000))).encode()
        w.inflight[p.rid] = (p, now)
        p.attempts += 1
        p.running += 1
        p.tried.append(w.ident)
        self.back.send_multipart([w.ident, TAG, REQUEST, p.rid, ms, p.body])
        return True

    def _dispatch(self) -> None:
        """Send queued requests while some worker has a free slot."""
        queue = self.queue
        now = time.monotonic()
        while queue:
            p = queue[0]
            if p.done or self._send(p, now):
                queue.popleft()
            else:
                return

    # -- workers ------------------------------------------------------------------------
    def _on_back(self) -> None:
        now = time.monotonic()
        freed = False
        for msg in received(self.back):
            n = len(msg)
            if n < 3 or msg[1] != TAG:
                self.dropped("worker message", ValueError("not an eda-lb message"))
                continue
            ident, kind = msg[0], msg[2]
            w = self.workers.get(ident)
            if kind == REPLY and n == 6:
                if w is None:
                    self._stranger(ident)
                else:
                    w.seen = now
                    freed = self._result(w, msg[3], msg[4], msg[5], now) or freed
            elif kind == BEAT and n == 3:
                if w is None:
                    self._stranger(ident)
                else:
                    w.seen = now
            elif kind == READY and n == 4:
                freed = self._ready(ident, msg[3], now) or freed
            elif kind == BYE and n == 3:
                if w is not None:
                    self._drop(w, "disconnected")
                    freed = True
            else:
                self.dropped("worker message", ValueError(f"bad frames ({n}, type {kind[:8]!r})"))
        if freed:
            self._dispatch()

    def _stranger(self, ident: bytes) -> None:
        """A message from a worker we do not know (we restarted, or dropped it): say BYE,
        so it says READY again at once instead of waiting for our silence."""
        self.back.send_multipart([ident, TAG, BYE])

    def _ready(self, ident: bytes, raw: bytes, now: float) -> bool:
        try:
            service, inst_id, concurrency, weight = parse_ready(raw)
        except ValueError as exc:
            self.dropped("worker ready", exc)
            return False
        if service != self.settings.service:
            self.dropped("worker ready", ValueError(f"worker of another service {service!r}"))
            self.back.send_multipart([ident, TAG, BYE])
            return False
        w = self.workers.get(ident)
        if w is not None:  # READY again: new figures, same requests in flight
            w.concurrency, w.weight, w.id, w.seen = concurrency, weight, inst_id, now
            return True
        if len(self.workers) >= MAX_WORKERS:
            self.dropped("worker ready", ValueError("too many workers"))
            return False
        self.workers[ident] = Worker(ident, inst_id, concurrency, weight, now, time.time())
        self.log(f"worker {inst_id} ready (concurrency {concurrency}, weight {weight})")
        self.back.send_multipart([ident, TAG, BEAT])
        return True

    def _result(self, w: Worker, rid: bytes, status: bytes, body: bytes, now: float) -> bool:
        entry = w.inflight.pop(rid, None)
        if entry is None:
            self.stale += 1  # a reply after its deadline, or made up
            return False
        p, t0 = entry
        p.running -= 1
        if status in (OK, ERR):
            w.requests += 1
            w.latencies.append(now - t0)
            if status == ERR:
                w.errors += 1
            self._answer(p, status, body)
        elif status == BUSY or p.done:
            if not p.done:
                self._again(p)
        else:
            self.dropped("worker reply", ValueError(f"bad status {status[:16]!r}"))
            w.errors += 1
            if not p.done and not p.running:
                self._again(p)
        return True

    def _again(self, p: Pending) -> None:
        """Send *p* once more (front of the queue), or give up after the retries."""
        if p.running:
            return  # another worker still runs it
        if p.attempts > self.settings.retries:
            self._answer(p, ERR, f"failed on {p.attempts} workers".encode())
            return
        self.retried += 1
        if not self._send(p, time.monotonic()):
            self.queue.appendleft(p)

    def _drop(self, w: Worker, why: str) -> None:
        """Forget *w*; what it was running goes to other workers (same rid)."""
        if self.workers.pop(w.ident, None) is None:
            return
        w.state = "dead"
        self.dead.append(w)
        lost = list(w.inflight.values())
        w.inflight.clear()
        if lost:
            self.warn(f"warning: worker {w.id} {why}: re-sending its {len(lost)} request(s)")
        else:
            self.log(f"worker {w.id} {why}")
        for p, _t0 in reversed(lost):
            p.running -= 1
            if not p.done:
                self._again(p)
        self._dispatch()

    # -- timers -------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        limit = time.monotonic() - MISSED * self.settings.heartbeat
        for w in list(self.workers.values()):
            if w.seen < limit:
                self._drop(w, "went silent")
            else:
                self.back.send_multipart([w.ident, TAG, BEAT])

    def _expire(self) -> None:
        """Answer requests whose deadline passed: queued ones, and running ones whose
        worker did not answer within a heartbeat interval after it."""
        now = time.monotonic()
        if self.queue:
            kept: deque[Pending] = deque()
            for p in self.queue:
                if p.done:
                    continue
                if p.deadline < now:
                    self._answer(p, ERR, b"timed out waiting for a free worker")
                else:
                    kept.append(p)
            self.queue = kept
        grace = now - self.settings.heartbeat
        for w in list(self.workers.values()):
            late = [rid for rid, (p, _t0) in w.inflight.items() if p.deadline < grace]
            for rid in late:
                p, _t0 = w.inflight.pop(rid)
                p.running -= 1
                w.errors += 1
                if not p.running:
                    self._answer(p, ERR, f"timed out on worker {w.id}".encode())
        if any(w.free for w in self.workers.values()):
            self._dispatch()

    # -- figures ------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) for w in self.workers.values())

    @property
    def capacity(self) -> int:
        return sum(w.concurrency for w in self.workers.values())

    def stats(self) -> dict[str, Any]:
        """What STATS answers: the broker's totals and one entry per worker (dead ones too)."""
        instances = []
        for w in [*self.workers.values(), *self.dead]:
            instances.append(
                {
                    "id": w.id,
                    "state": w.state,
                    "requests": w.requests,
                    "errors": w.errors,
                    "inflight": len(w.inflight),
                    "concurrency": w.concurrency,
                    "weight": w.weight,
                    **figures(w.latencies),
                }
            )
        return {
            "role": "broker",
            "service": self.settings.service,
            "id": self.id,
            "strategy": self.settings.strategy,
            "requests": self.requests,
            "answered": self.answered,
            "errors": self.errors,
            "refused": self.refused,
            "retried": self.retried,
            "inflight": self.inflight,
            "queued": len(self.queue),
            "malformed": self.malformed,
            "instances": instances,
        }


STRATEGIES = ("round-robin", "weighted", "least-conn", "random", "p2c")


def parse_ready(raw: bytes) -> tuple[str, str, int, int]:
    """A READY frame's JSON: (service, id, concurrency, weight); ValueError when malformed."""
    if len(raw) > MAX_READY:
        raise ValueError("ready message too large")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"ready message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("ready message is not an object")
    service, inst_id = data.get("service"), data.get("id")
    concurrency, weight = data.get("concurrency", 1), data.get("weight", 1)
    if not isinstance(service, str) or not service or len(service) > 63:
        raise ValueError("ready message without a valid service")
    if not isinstance(inst_id, str) or ID_RE.fullmatch(inst_id) is None:
        raise ValueError("ready message without a valid id")
    for name, value, top in (
        ("concurrency", concurrency, MAX_CONCURRENCY),
        ("weight", weight, MAX_WEIGHT),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top:
            raise ValueError(f"ready message with a bad {name}")
    return service, inst_id, concurrency, weight


# -- being found -----------------------------------------------------------------------------
class Presence:
    """Keeps one instance registered from a background thread: with a registry
    (register, heartbeat, deregister), else by mDNS (serverless mode)."""

    def __init__(self, record: dict[str, Any], access: Any, *, log: Log, warn: Log) -> None:
        self.record, self.access, self.log, self.warn = record, access, log, warn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.inst: Any = None

    def start(self) -> Any:
        """Choose registry or mDNS now (errors raise here); register in the background."""
        from ..registry import access as reg

        client = reg.connect_for_registration(self.access, self.record["interval"])
        self.inst = reg.finish(self.record, client, self.access.interface)
        self._thread = threading.Thread(
            target=self._run, args=(client,), name="registration", daemon=True
        )
        self._thread.start()
        return self.inst

    def _run(self, client: Any) -> None:
        try:
            if client is None:
                self._announce()
            else:
                self._heartbeat(client)
        except Exception as exc:  # the broker serves on; it just cannot be found
            self.warn(f"warning: registration of {self.inst.id} failed: {exc}")

    def _heartbeat(self, client: Any) -> None:
        from ..registry.agent import Agent

        agent = Agent(client, self.inst, self.warn)
        try:
            while not self._stop.is_set():
                try:
                    agent.register()
                    break
                except EdaError as exc:
                    self.warn(f"warning: cannot register {self.inst.id}: {exc}; retrying")
                    self._stop.wait(self.inst.interval)
            else:
                return
            self.log(f"registered {self.inst.service}/{self.inst.id} with registry")
            while not self._stop.wait(self.inst.interval):
                agent.beat("passing")
            agent.deregister()
        finally:
            client.close()

    def _announce(self) -> None:
        from ..registry.serverless import Announcer

        announcer = Announcer(self.inst, self.access.interface)
        try:
            announcer.start()
            self.log(f"registered {self.inst.service}/{self.inst.id} by mDNS")
            self._stop.wait()
        finally:
            announcer.close()

    def close(self) -> None:
        """Deregister (or withdraw the mDNS records) and wait for it, a few seconds at most."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# -- asking for figures ------------------------------------------------------------------------
MAX_STATS = 1 << 20  # bytes of one FIGURES answer


def ask_stats(
    endpoints: Iterable[str],
    timeout: float = 2.0,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> dict[str, dict[str, Any] | str]:
    """Send STATS to each endpoint at once; each one's FIGURES object, or why there is none.

    An answer that is not a JSON object (or too large, or not a FIGURES) is an
    error string for that endpoint, never an exception.
    """
    ctx = context or zmq.Context.instance()
    socks: dict[zmq.Socket[bytes], str] = {}
    results: dict[str, dict[str, Any] | str] = {}
    poller = zmq.Poller()
    try:
        for endpoint in endpoints:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_STATS + 4096)
            socks[sock] = endpoint
            results[endpoint] = "no answer"
            sock.connect(endpoint)
            sock.send_multipart([TAG, STATS], zmq.NOBLOCK)
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        waiting = set(socks)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(int(left * 1000) + 1):
                for msg in received(sock, 16):
                    answer = _stats_answer(msg)
                    if answer is not None:
                        results[socks[sock]] = answer
                        waiting.discard(sock)
                        poller.unregister(sock)
                        break
    finally:
        for sock in socks:
            sock.close()
    return results


def _stats_answer(msg: list[bytes]) -> dict[str, Any] | str | None:
    if len(msg) != 3 or msg[0] != TAG or msg[1] != FIGURES:
        return None  # something else (a late pong...): keep waiting
    try:
        data = json.loads(msg[2])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "malformed stats answer (not JSON)"
    if not isinstance(data, dict):
        return "malformed stats answer (not an object)"
    return data

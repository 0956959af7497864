"""A service instance: each request runs a shell command, its output is the reply.

This is the worker API, in Majordomo's terms: the link to callers and
brokers.  :class:`Worker` is a :class:`~eda.core.daemon.Daemon` binding a
ROUTER that speaks the eda-lb wire (:mod:`.protocol`) to callers, and a
DEALER to each broker of its service it finds (``W`` ready, ``H``
heartbeats both ways, reconnect with backoff and jitter).  It admits
requests up to its capacity (its credit, announced in ``W``) and hands them
to the application, :mod:`.commands`, which runs the command in one of two
ways:

- **per request** (default): the command is started per request, the body
  and a newline on its stdin, ``EDA_REQUEST_ID`` in its environment; its
  stdout (one trailing newline removed) is the reply; a failure is an
  ``err`` reply carrying :mod:`eda.core.runner`'s reason (``exit status 3:
  it broke``: the last line of its stderr, else of its stdout); up to
  *concurrency* at once;
- **persistent**: *concurrency* long-running processes, each fed one request
  line at a time and answering with one line per request line, in order;
  requests are pipelined into them (up to :data:`DEPTH` each).  With
  *with_id*, each line fed is ``ID<TAB>body`` (ID: the request id); a reply
  line ``ID<TAB>reply`` answers request ID, in any order, and any other
  line answers the oldest request, as without it.  A body with a newline
  would be two lines: it gets an ``err`` reply instead.

Beyond capacity, requests wait in a bounded queue; beyond that they get a
``busy`` reply (the caller tries elsewhere).  A request whose deadline
(the caller's ``timeout_ms``) passes is answered ``err`` and its command
stopped; a malformed message is counted and dropped; nothing a peer sends
ends the worker.  Everything runs on the daemon's one thread, without
blocking: the processes' pipes are non-blocking descriptors in the same
poll loop.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..daemon import DRAIN_LIMIT, Daemon, Log
from ..errors import ProtocolError, UsageError
from ..measure import latency_ms
from ..metrics import Histogram
from ..outbox import RELEASE_AFTER, Pump, release_memory
from . import protocol as p
from .commands import DEPTH, Job, PerRequest, Persistent, Running
from .links import MAX_BROKERS, BrokerLink, BrokerLinks

__all__ = ["DEPTH", "MAX_BROKERS", "BrokerLink", "Job", "Worker"]

QUEUE = 1024  # requests waiting for a free slot before "busy" is answered
QUEUE_BYTES = 64 << 20  # and their bodies, in bytes (beyond: "busy")
CALLER_QUEUE_BYTES = 16 << 20  # of which one caller's requests (one broker counts as one)
FRAME_COST = 64  # bytes counted per queued request beyond its body
BATCH_BYTES = 16 << 20  # request bytes read from one socket before the others' turn
BROKER_LOOKUP_EVERY = 3.0
LATENCIES = 4096  # recent request latencies kept for the stats percentiles


class Worker(Daemon):
    """Serves requests for *service* by running *argv* (see the module's doc)."""

    def __init__(
        self,
        service: str,
        argv: list[str],
        *,
        persistent: bool = False,
        with_id: bool = False,
        concurrency: int = 1,
        queue: int | None = None,
        max_request: int = p.MAX_BODY,
        timeout: float = 0.0,
        heartbeat: float = 1.0,
        weight: int = 1,
        inst_id: str = "",
        log: Log = lambda _m: None,
        warn: Log | None = None,
        interface: str | None = None,
        find_brokers: Callable[[], list[str] | None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(log, warn, interface=interface)
        if not argv:
            raise UsageError("give the command to run after --")
        if concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        self.service, self.argv = service, list(argv)
        if with_id and not persistent:
            raise UsageError("--with-id goes with --persistent (a command run per request "
                             "has its id in EDA_REQUEST_ID)")  # fmt: skip
        self.persistent, self.with_id = persistent, with_id
        self.concurrency = concurrency
        self.queue_limit = queue if queue is not None else QUEUE
        self.max_request = max_request
        self.command_timeout = timeout
        self.heartbeat_interval = heartbeat
        self.weight = weight
        self.inst_id = inst_id or f"{service}-{os.getpid()}"
        self.find_brokers = find_brokers
        self.env = dict(os.environ if env is None else env)
        self.env["EDA_SERVICE"] = service
        self.queue: collections.deque[Job] = collections.deque()
        self.queue_bytes = 0  # bodies waiting in the queue (plus FRAME_COST each)
        self.queue_high = 0  # the most queue_bytes since memory was last given back
        self.queued_by: dict[tuple[zmq.Socket[bytes], bytes | None], int] = {}  # per caller
        self.pump = Pump(self)  # replies a caller did not read yet, bounded in bytes
        self.outbox = self.pump.outbox
        self.requests = self.errors = self.busy = self.timeouts = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES)
        self.latency = Histogram()  # every request's latency (--metrics)
        self.links: BrokerLinks | None = None  # to the brokers of the service, if asked
        self.stats_budget = p.Budget()
        self.stats_dropped = 0  # S over the budget
        self.started = time.monotonic()
        self.draining = False
        self.endpoint = ""
        self.sock: zmq.Socket[bytes] | None = None
        self.app: Persistent | PerRequest = (  # the application: runs the command
            Persistent(self, self.argv, self.env, concurrency, max_request, with_id)
            if persistent
            else PerRequest(self, self.argv, self.env, concurrency, max_request)
        )
        self.capacity = self.app.capacity

    @property
    def brokers(self) -> dict[str, BrokerLink]:
        """The links to brokers, by endpoint."""
        return self.links.links if self.links is not None else {}

    @property
    def inflight(self) -> int:
        """Requests the application holds (their slots)."""
        return self.app.inflight

    @property
    def runs(self) -> dict[int, Running]:
        """Commands running per request."""
        return self.app.runs

    @property
    def procs(self) -> list[Any]:
        """Persistent processes (none per request)."""
        return self.app.procs if isinstance(self.app, Persistent) else []

    # -- start and stop ---------------------------------------------------------------------
    def start(self, bind: str = "tcp://*:*") -> str:
        """Bind the ROUTER (the endpoint really bound), start persistent processes and timers."""
        # a message a little over the body limit still gets its "too large" reply;
        # one far beyond it only costs its sender the connection
        limit = 2 * self.max_request + 65536
        self.sock = self.socket(zmq.ROUTER, linger=1000, max_message=limit)  # last replies out
        self.outbox.adopt(self.sock)  # a caller's pipes bounded in bytes
        self.endpoint = self.bind(self.sock, bind)
        self.pump.watch(self.sock, "requests", self._on_requests)
        self.app.start()
        self.every(0.05, "deadlines", self._check_deadlines)
        if self.find_brokers is not None:
            self.follow_brokers(self.find_brokers)
        return self.endpoint

    def follow_brokers(self, find: Callable[[], list[str] | None]) -> None:
        """Serve the brokers whose backend endpoints *find* returns (None: no news),
        asked every heartbeat interval."""
        self.find_brokers = find
        if self.links is not None:  # followed already: ask *find* from now on
            self.links.find = find
            return
        self.links = BrokerLinks(self, find)
        self.every(self.heartbeat_interval, "brokers", self.links.tend)

    def drain(self, grace: float) -> None:
        """Stop taking requests (they get ``busy``: callers go elsewhere), tell brokers
        goodbye, and serve until the running requests are answered or *grace* seconds pass."""
        self.draining = True
        self._goodbye()
        for job in self._take_queue():
            self.refuse(job)
        self.app.drain()
        deadline = time.monotonic() + grace
        self.serve(until=lambda: self.inflight <= 0 or time.monotonic() >= deadline)

    def _goodbye(self) -> None:
        if self.links is not None:
            self.links.goodbye()

    def shutdown(self) -> None:
        """Say goodbye to brokers, send what waits back (busy: to be run elsewhere),
        answer what runs with err, stop every process."""
        if not self.draining:
            self._goodbye()
        for job in self._take_queue():
            self._send(job, p.BUSY, b"")
        self.outbox.flush()  # what the callers' pipes take now; the rest is lost with them
        self.app.shutdown()
        if self.links is not None:
            self.links.close()  # the goodbye still goes out (linger)
        self.close()

    # -- requests ---------------------------------------------------------------------------
    def _on_requests(self) -> None:
        assert self.sock is not None
        self.read_requests(self.sock, 1)

    def read_requests(self, sock: zmq.Socket[bytes], start: int) -> None:
        now = time.monotonic()
        max_request = self.max_request
        # at most BATCH_BYTES, then the other sockets get their turn (heartbeats, replies)
        for frames in p.messages(sock, DRAIN_LIMIT, BATCH_BYTES):
            if len(frames) == start + 5 and frames[start + 1] == p.REQUEST:
                try:
                    rid, timeout_ms, body = p.parse_request(frames, start, max_request)
                except p.TooLarge as exc:
                    self._answer_now(sock, frames, start, exc.rid, p.ERR, str(exc).encode())
                    self.requests += 1
                    self.errors += 1
                    continue
                except ProtocolError as exc:
                    self.dropped("request", exc)
                    continue
                # the caller gives up (and retries elsewhere) at its timeout: kill a little
                # later, so that our "timed out" never preempts its retry
                deadline = now + timeout_ms * 0.0011 + 0.05 if timeout_ms else 0.0
                if self.command_timeout:
                    cap = now + self.command_timeout
                    deadline = min(deadline, cap) if deadline else cap
                self._admit(Job(sock, frames[0] if start else None, rid, body, deadline, now))
            else:
                self._control(sock, frames, start)
                if sock.closed:  # a broker's goodbye closed its link
                    break
        self.app.flush()

    def _answer_now(
        self,
        sock: zmq.Socket[bytes],
        frames: list[bytes],
        start: int,
        rid: bytes,
        status: bytes,
        body: bytes,
    ) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.pump.send(sock, frames[0] if start else None, p.reply(rid, status, body))

    def _control(self, sock: zmq.Socket[bytes], frames: list[bytes], start: int) -> None:
        try:
            msg = p.parse(frames, start, self.max_request)
        except ProtocolError as exc:
            self.dropped("message", exc)
            return
        route = frames[:start]
        if msg.kind == p.PING:
            load = p.pong(msg.seq, self.inflight, self.concurrency, len(self.queue))
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([*route, *load], zmq.NOBLOCK)
        elif msg.kind == p.STATS_QUERY:
            if not self.stats_budget.take():  # a flood: answered STATS_RATE times a second
                self.stats_dropped += 1
                return
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([*route, *p.stats(self.figures())], zmq.NOBLOCK)
        elif start == 0 and self.links is not None:  # from a broker
            self.links.on_message(sock, msg)
        else:
            self.dropped("message", ProtocolError(f"unexpected {msg.kind.decode()} from a caller"))

    def _admit(self, job: Job) -> None:
        self.requests += 1
        if self.draining:
            self.refuse(job)
        elif self.outbox.waiting and self.outbox.full(job.sock, job.ident):
            # it does not read its replies: run nothing more for it (the busy reply is
            # counted as refused by the outbox, as it cannot take it either)
            self.refuse(job)
        elif self.app.inflight < self.capacity and not self.queue and self.app.dispatch(job):
            pass
        elif self._fits(job):
            self.queue.append(job)
            self._queued(job, 1)
        else:
            self.refuse(job)

    def _fits(self, job: Job) -> bool:
        """Whether *job* may wait in the queue: places, bytes, and its caller's bytes."""
        size = len(job.body) + FRAME_COST
        return (
            len(self.queue) < self.queue_limit
            and self.queue_bytes + size <= QUEUE_BYTES
            and self.queued_by.get((job.sock, job.ident), 0) + size <= CALLER_QUEUE_BYTES
        )

    def _queued(self, job: Job, sign: int) -> None:
        """Count *job* into (+1) or out of (-1) the queue's bytes."""
        size = sign * (len(job.body) + FRAME_COST)
        self.queue_bytes += size
        self.queue_high = max(self.queue_high, self.queue_bytes)
        key = (job.sock, job.ident)
        left = self.queued_by.get(key, 0) + size
        if left > 0:
            self.queued_by[key] = left
        else:
            del self.queued_by[key]

    def _dequeue(self) -> Job:
        job = self.queue.popleft()
        self._queued(job, -1)
        if not self.queue and self.queue_high >= RELEASE_AFTER:
            self.queue_high = 0
            release_memory()  # a burst of large requests is gone: so is its memory
        return job

    def _take_queue(self) -> list[Job]:
        jobs = list(self.queue)
        self.queue.clear()
        self.queue_bytes = 0
        self.queued_by.clear()
        return jobs

    def _send(self, job: Job, status: bytes, body: bytes) -> None:
        try:  # noqa: SIM105  (per reply: contextlib.suppress costs more than the send)
            self.pump.send(job.sock, job.ident, [p.TAG, p.REPLY, job.rid, status, body])
        except zmq.ZMQError:  # its socket is closed (a broker link that ended)
            pass

    def reply(self, job: Job, status: bytes, body: bytes, now: float = 0.0) -> None:
        """The one reply of an admitted request (counted, its latency kept)."""
        if status == p.ERR:
            self.errors += 1
        took = (now or time.monotonic()) - job.received
        self.latencies.append(took)
        self.latency.observe(took)
        self._send(job, status, body)

    def refuse(self, job: Job) -> None:
        """Answer ``busy``: the caller tries elsewhere."""
        self.busy += 1
        self._send(job, p.BUSY, b"")

    def run_queued(self) -> None:
        """Run queued requests while there is room (a slot, and a process's input)."""
        app = self.app
        now = time.monotonic()
        while self.queue and app.inflight < self.capacity:
            job = self._dequeue()
            if job.deadline and job.deadline <= now:
                self.timeouts += 1
                self.reply(job, p.ERR, b"timed out in the queue", now)
                continue
            if not app.dispatch(job):  # every process's input is full: it waits, first
                self.queue.appendleft(job)
                self._queued(job, 1)
                return

    # -- deadlines ---------------------------------------------------------------------------------
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        self.app.check_deadlines(now)
        while self.queue and self.queue[0].deadline and self.queue[0].deadline <= now:
            self.timeouts += 1
            self.reply(self._dequeue(), p.ERR, b"timed out in the queue", now)

    # -- stats -------------------------------------------------------------------------------------
    def metrics(self) -> Any:
        """What --metrics exports (core/lb/metrics.py)."""
        from .metrics import worker_families

        return worker_families(self)

    def figures(self) -> dict[str, Any]:
        """This instance's figures, as its ``T`` reply carries them."""
        latency = {k: v or 0.0 for k, v in latency_ms(self.latencies).items()}

        return {
            "service": self.service,
            "id": self.inst_id,
            "role": "worker",
            "mode": "persistent" if self.persistent else "per-request",
            "requests": self.requests,
            "errors": self.errors,
            "busy": self.busy,
            "timeouts": self.timeouts,
            "malformed": self.malformed,
            "inflight": self.inflight,
            "queued": len(self.queue),
            "queued_bytes": self.queue_bytes,
            "unread_bytes": self.outbox.bytes,  # replies waiting for callers that do not read
            "unsent": self.outbox.refused + self.outbox.lost,  # replies over a bound, or lost
            "concurrency": self.concurrency,
            "weight": self.weight,
            "brokers": sum(1 for b in self.brokers.values() if b.sock is not None),
            "uptime": round(time.monotonic() - self.started, 3),
            "latency_ms": latency,
        }

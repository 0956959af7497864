"""Client-side balancing: requests pipelined over a service's instances.

:class:`Caller` is a :class:`~eda.core.daemon.Daemon` that sends requests
over the instances of a :class:`~.callpool.Pool` (one DEALER per instance,
liveness by heartbeats, discovery, bounds on connections) chosen by a
:class:`~.balancer.Balancer`, reading them from an :class:`~.callio.Input`
and writing the replies through an :class:`~.callio.Output` (input order
unless *unordered*).  This module is the requests' own part:

- **window**: up to *window* requests in flight at once, read from the
  input as replies free room (input is read only as fast as it is answered);
- **deadline**: *timeout* is each request's overall time, retries included;
  an attempt gets an equal share of what is left of it (the time left divided
  by the attempts left, no more than the live instances not tried yet), so
  the attempts' timeouts never add up to more;
- **retries**: a request whose attempt times out or whose instance dies is
  sent again, with the same rid, to another instance, up to *retries* times;
  a ``busy`` reply is tried elsewhere without using up a retry, within the
  request's overall time; an ``err`` reply is final;
- **no instance**: with no live instance for a whole *timeout* (or, before
  the first one, for three heartbeats after every instance found was tried),
  the requests sent are failed, :attr:`Summary.no_instance` is set, the first
  request not sent is reported through *failed* (``no live instance (not
  sent)``, not counted) and the rest are not read: the caller stops instead
  of failing every input line in turn;
- **once**: a request is answered at most once -- a late reply to an attempt
  that was already retried is taken if it comes first, and the later one is
  ignored;
- **secure mode**: an instance that refuses this caller's key is never sent a
  request; while others serve, that is a warning; when every instance found
  refused it, the caller stops at once (:attr:`Summary.refused`) and each
  refusal goes to :attr:`Caller.on_refused` (the error lines, exit 1).

Each failed request is reported through *failed* with its input, and counted.
Over 500 lines for a reason: a request's whole life (window, deadline,
retries, answered once) is one subject; connections (:mod:`.callpool`) and
input and output (:mod:`.callio`) are apart already.
"""

from __future__ import annotations

import collections
import heapq
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from .. import security
from ..daemon import Daemon, Log
from ..errors import NotFoundError, ProtocolError
from ..measure import percentile
from . import protocol as p
from .balancer import Balancer
from .callio import Input, Output
from .callpool import PROBE_TIME, Conn, Pool, endpoint_of
from .pins import Ignored, usable
from .protocol import send_request

LATENCIES = 200_000  # answered requests' latencies kept for the percentiles
REORDER_LIMIT = 100_000  # replies held back waiting for an earlier one before input pauses


def _quiet(_msg: str) -> None:
    pass


class Request:
    """One input line on its way: its place in the output, id, body and current attempt."""

    __slots__ = (
        "attempt", "body", "busy", "conn", "first", "rid", "seq", "stale", "tried", "tries",
    )  # fmt: skip

    def __init__(self, seq: int, rid: bytes, body: bytes) -> None:
        self.seq, self.rid, self.body = seq, rid, body
        self.conn: Conn | None = None  # where the current attempt went
        self.attempt = 0  # attempts sent (tells a stale deadline from the current one)
        self.tries = 0  # attempts that failed (timeout, instance died): counted against retries
        self.tried: set[str] | None = None
        self.stale: list[Conn] | None = None  # where attempts timed out (their answers may come)
        self.first = 0.0  # when it was first sent or queued
        self.busy = 0


@dataclass
class Summary:
    sent: int = 0  # attempts sent
    ok: int = 0
    failed: int = 0
    timed_out: int = 0  # failed requests whose last attempt timed out
    retried: int = 0
    busy: int = 0
    late: int = 0  # replies to requests already answered (ignored)
    dropped_instances: int = 0
    no_instance: bool = False  # stopped: no live instance for too long (the rest not sent)
    no_instance_for: float = 0.0  # then: seconds without one
    refused: bool = False  # then: because every instance refused this key (secure mode)
    unsent: int | None = None  # then: the first input line not sent (from 0), if any
    picks: dict[str, int] = field(default_factory=dict)


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


class _OfPool:
    """An attribute of a caller that is its pool's (read and set there)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, caller: Any, owner: type | None = None) -> Any:
        return self if caller is None else getattr(caller.pool, self.name)

    def __set__(self, caller: Any, value: Any) -> None:
        setattr(caller.pool, self.name, value)


class Caller(Daemon):
    """Sends requests for one service and collects their replies (see the module's doc)."""

    def __init__(
        self,
        *,
        out: Callable[[bytes], None],
        failed: Callable[[int, bytes, str], None],
        strategy: str = "round-robin",
        timeout: float = 10.0,
        retries: int = 2,
        window: int = 100,
        unordered: bool = False,
        heartbeat: float = 1.0,
        max_request: int = p.MAX_BODY,
        slow_start: float = 2.0,
        relookup: float = 2.0,
        log: Log = _quiet,
        warn: Log | None = None,
        interface: str | None = None,
        sent: Callable[[int, str], None] | None = None,
    ) -> None:
        """*sent*: told of every attempt, (input line index, the instance's endpoint)."""
        super().__init__(log, warn, interface=interface)
        self.out, self.failed_cb, self.sent_cb = out, failed, sent
        self.security = security.active()
        self.balancer = Balancer(strategy, slow_start=slow_start)
        self.timeout, self.retries, self.window = timeout, retries, max(1, window)
        self.unordered, self.heartbeat, self.max_request = unordered, heartbeat, max_request
        self.relookup = relookup
        self.pool = Pool(
            self,
            self.balancer,
            heartbeat=heartbeat,
            max_request=max_request,
            relookup=relookup,
            on_replies=self._on_replies,
            on_live=self._fill,
            on_dead=self._retry_all,
        )
        self.input = Input(self, max_request, self.window, self._fill)
        self.output = Output(out, unordered)
        self.pending: dict[bytes, Request] = {}
        self.waiting: collections.deque[Request] = collections.deque()  # to send (or resend)
        # (when, tie-breaker, request, attempt) of the attempts in flight, a heap
        self.deadlines: list[tuple[float, int, Request, int]] = []
        self.delayed: list[tuple[float, Request]] = []  # busy everywhere: to try again later
        self.summary = Summary()
        # (os.urandom(n).hex(): secrets.token_hex(n) without importing hmac and OpenSSL)
        self.prefix = f"{os.getpid():x}-{os.urandom(2).hex()}.".encode()
        self.next_seq = 0  # the next input line's number
        self.started = time.monotonic()
        self.empty_since: float | None = None
        self.holding = True
        self.hold_until = self.started + min(0.5, heartbeat, timeout)
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES)

    # -- instances and input (core/lb/callpool.py, core/lb/callio.py) -----------------------
    @property
    def conns(self) -> dict[str, Conn]:
        return self.pool.conns

    def use(self, endpoints: Iterable[tuple[str, int]], *, final: bool = False) -> None:
        """Call these (endpoint, weight) pairs from now on (see :meth:`Pool.use`)."""
        self.pool.use(endpoints, final=final)

    # secure mode (cli/secure.py's reports): instances found and left out, and those that
    # refused this caller's key when no instance accepts it (see Pool.refusals)
    on_ignored = _OfPool()
    on_refused = _OfPool()

    def follow(self, finder: Any) -> None:
        """Take the instances *finder* (a :class:`~eda.core.presence.Finder`) keeps finding."""
        self.pool.follow(finder)

    def feed(self, items: Iterable[bytes]) -> None:
        """Requests from *items* (one body each), e.g. the command line's arguments."""
        self.input.feed(items)

    def feed_fd(self, fd: int) -> None:
        """Requests from the lines read from *fd* (newlines removed)."""
        self.input.feed_fd(fd)

    def _retry_all(self, requests: list[Request], now: float) -> None:
        """The instance these were sent to died: retry each elsewhere."""
        self.summary.dropped_instances += 1
        for req in requests:
            self._attempt_failed(req, "its instance died", now)
        self._fill()

    # -- sending --------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Send while the window has room: retries first, then new input."""
        if not self.balancer:
            return
        now = time.monotonic()
        if self.holding:
            # at the start, give every known instance a moment to answer its first ping,
            # so the first requests do not all go to the quickest one
            if now < self.hold_until and self.pool.probing():
                return
            self.holding = False
        pending = self.pending
        window = self.window
        waiting = self.waiting
        while len(pending) < window:
            if waiting:
                req = waiting.popleft()
                if req.attempt and now >= req.first + self.timeout:
                    self._expire(req)
                    continue
            else:
                if self.next_seq - self.output.next_out > REORDER_LIMIT and not self.unordered:
                    return
                body = self.input.next_body()
                if body is None:
                    return
                seq = self.next_seq
                self.next_seq = seq + 1
                req = Request(seq, self.prefix + b"%d" % seq, body)
                req.first = now
                if len(body) > self.max_request:
                    size, limit = getattr(body, "size", len(body)), self.max_request
                    self._fail(req, f"request too large ({size} bytes; the limit is {limit})")
                    continue
            if not self._send(req, now):
                waiting.appendleft(req)
                return
        self.output.emit()

    def _attempts_left(self, req: Request) -> int:
        """The attempts *req* may still make, the one about to be sent included: its retries
        left, but no more than the live instances it was not tried on (a retry after a
        timeout on the same instance would only wait behind the same queue again).  Each
        attempt gets an equal share of the time left, so they never take longer than the
        request."""
        left = self.retries + 1 - req.tries
        if left > 1:
            balancer, tried = self.balancer, req.tried
            untried = len(balancer) - (sum(1 for k in tried if k in balancer) if tried else 0)
            left = max(1, min(left, untried))
        return max(1, left)

    def _send(self, req: Request, now: float) -> bool:
        backend = self.balancer.pick(req.tried or ())
        if backend is None:
            return False
        conn: Conn = backend.data
        sock = conn.sock
        assert sock is not None
        if not req.attempt and not req.busy:
            req.first = now  # the request's time starts when it is first sent
        share = max(0.001, (req.first + self.timeout - now) / self._attempts_left(req))
        try:
            send_request(sock, req.rid, b"%d" % max(1, int(share * 1000)), req.body)
        except zmq.ZMQError:
            return False
        self.balancer.started(backend)
        req.conn = conn
        req.attempt += 1
        conn.inflight[req.rid] = req
        self.pending[req.rid] = req
        heapq.heappush(self.deadlines, (now + share, self.summary.sent, req, req.attempt))
        self.summary.sent += 1
        if self.sent_cb is not None:
            self.sent_cb(req.seq, backend.key)
        return True

    # -- replies -------------------------------------------------------------------------------
    def _on_replies(self, conn: Conn, sock: zmq.Socket[bytes]) -> None:
        if conn.sock is not sock:  # a socket closed since the poll
            return
        now = time.monotonic()
        conn.last_seen = now
        pending = self.pending
        inflight = conn.inflight
        balancer = self.balancer
        backend = conn.backend
        answered = self.output.answered
        latencies = self.latencies
        recv = p.recv
        for _ in range(1000):
            try:
                frames = recv(sock)
            except zmq.Again:
                break
            if len(frames) == 5 and frames[1] == p.REPLY:
                try:
                    rid, status, body = p.parse_reply(frames, 0, self.max_request)
                except ProtocolError as exc:
                    self.dropped("reply", exc)
                    continue
                req = pending.get(rid)
                if req is None:
                    self.summary.late += 1
                    continue
                stale = req.stale
                if status != p.OK and stale and conn in stale:
                    stale.remove(conn)  # the late answer of an attempt that timed out
                    continue
                if req.conn is conn:
                    del inflight[rid]
                    if status == p.BUSY:
                        if backend is not None:
                            balancer.released(backend)
                        self._busy(req, now)
                        continue
                    if backend is not None:  # an error reply counts as a failure (5xx)
                        balancer.finished(backend, status == p.OK)
                elif stale and conn in stale:  # an earlier attempt answered first: take it
                    stale.remove(conn)
                    self._cancel_current(req)
                else:  # never sent there: someone else's rid
                    self.dropped("reply", ProtocolError("a reply to a request not sent there"))
                    continue
                del pending[rid]
                latencies.append(now - req.first)
                if status == p.OK:
                    self.summary.ok += 1
                    answered(req.seq, body)
                else:
                    self._fail(req, body.decode(errors="replace"))
            else:
                self._control(conn, frames, now)
        if backend is None and conn.backend is None and conn.sock is sock and not conn.gone:
            self.pool.alive(conn, now)
        if conn.gone and not conn.inflight:
            self.pool.close(conn)
        self._fill()
        self.output.emit()

    def _control(self, conn: Conn, frames: list[bytes], now: float) -> None:
        try:
            msg = p.parse(frames, 0, self.max_request)
        except ProtocolError as exc:
            self.dropped("message", exc)
            return
        if msg.kind != p.PONG:
            self.dropped("message", ProtocolError(f"unexpected {msg.kind.decode()}"))

    def _cancel_current(self, req: Request) -> None:
        conn = req.conn
        if conn is not None:
            conn.inflight.pop(req.rid, None)
            if conn.backend is not None:
                self.balancer.released(conn.backend)
        req.conn = None

    def _busy(self, req: Request, now: float) -> None:
        """Try elsewhere, within the request's overall time; not a failure of the instance."""
        self.summary.busy += 1
        del self.pending[req.rid]
        req.busy += 1
        conn = req.conn
        req.conn = None
        if now >= req.first + self.timeout:
            self._fail(req, "every instance is busy")
            return
        if conn is not None:
            req.tried = (req.tried or set()) | {conn.key}
            if len(req.tried) >= len(self.balancer):
                # every instance is full: wait a little (longer each time) before trying again
                req.tried = None
                self.delayed.append((now + min(0.2, 0.005 * 2**req.busy), req))
                return
        self.waiting.append(req)

    def _attempt_failed(self, req: Request, why: str, now: float) -> None:
        """The current attempt of *req* timed out or its instance died: retry or fail."""
        self.pending.pop(req.rid, None)
        conn = req.conn
        req.conn = None
        req.tries += 1
        if req.tries > self.retries or now >= req.first + self.timeout:
            if why == "timed out":
                self.summary.timed_out += 1
            self._fail(req, f"{why} ({_attempts(req.attempt)})")
            return
        self.summary.retried += 1
        if conn is not None:
            req.tried = (req.tried or set()) | {conn.key}
        self.waiting.appendleft(req)

    def _expire(self, req: Request) -> None:
        """*req*, sent and waiting to be sent again, is past its overall deadline."""
        self.pending.pop(req.rid, None)
        if not self.balancer:  # its instance died, and there is no other
            self._fail(req, f"no live instance ({_attempts(req.attempt)})")
        else:
            self.summary.timed_out += 1
            self._fail(req, f"timed out ({_attempts(req.attempt)})")

    def _fail(self, req: Request, reason: str) -> None:
        self.summary.failed += 1
        self.failed_cb(req.seq, req.body, reason)
        self.output.failed(req.seq)

    # -- deadlines ------------------------------------------------------------------------------
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        deadlines = self.deadlines
        expired = False
        while deadlines and deadlines[0][0] <= now:
            _, _, req, attempt = heapq.heappop(deadlines)
            if req.attempt != attempt or req.rid not in self.pending or req.conn is None:
                continue  # answered, or already retried
            conn = req.conn
            conn.inflight.pop(req.rid, None)
            req.stale = [*req.stale, conn] if req.stale else [conn]
            if conn.backend is not None:
                self.balancer.finished(conn.backend, False)
            self._attempt_failed(req, "timed out", now)
            expired = True
        if self.delayed:
            due = [d for d in self.delayed if d[0] <= now]
            if due:
                self.delayed = [d for d in self.delayed if d[0] > now]
                self.waiting.extend(req for _, req in due)
                expired = True
        if self.waiting:
            # retries that found no instance to go to: each ends at its overall deadline
            keep: collections.deque[Request] = collections.deque()
            for req in self.waiting:
                if req.attempt and now >= req.first + self.timeout:
                    self._expire(req)
                else:
                    keep.append(req)
            self.waiting = keep
        if not self.balancer:
            if self.empty_since is None:
                self.empty_since = now
            elif self._hopeless(now):
                self.summary.no_instance_for = now - self.empty_since
                self._give_up()
                return
        else:
            self.empty_since = None
        if expired:
            self._fill()
        self.output.emit()

    def _hopeless(self, now: float) -> bool:
        """No live instance, and none to hope for: for a whole request's time (for one to
        come back, or to be found); for a first one, three heartbeats (1 s at least) after
        every instance found was tried -- one that is up answers its first ping at once."""
        assert self.empty_since is not None
        if self.pool.all_refused():
            return True  # nothing to wait for
        empty = now - self.empty_since
        if empty >= self.timeout:
            return True
        wait = max(PROBE_TIME, 3 * self.heartbeat)
        return empty >= wait and self.pool.none_to_hope_for(now, wait)

    def _give_up(self) -> None:
        """No live instance for too long: fail the requests sent (they may have run, each is
        reported), send no more and stop (:attr:`Summary.no_instance`)."""
        sent = [*self.pending.values(), *self.waiting, *(req for _, req in self.delayed)]
        self.pending.clear()
        self.waiting.clear()
        self.delayed.clear()
        self.deadlines.clear()
        self.pool.forget_requests()
        more = self.input.more
        unsent: Request | None = None
        for req in sorted(sent, key=lambda r: r.seq):
            if req.attempt:
                self._fail(req, f"no live instance ({_attempts(req.attempt)})")
            elif unsent is None:
                unsent = req
        self.summary.no_instance = True
        if self.pool.all_refused():
            self.summary.refused = True
            self.pool.tell_refusals(fatal=True)
        if unsent is None and more:
            body = self.input.next_unsent()
            unsent = Request(self.next_seq, b"", body or b"")
        if unsent is not None:
            # the first request not sent is reported (not counted as failed): the others
            # after it are not read
            self.summary.unsent = unsent.seq
            self.failed_cb(unsent.seq, unsent.body, "no live instance (not sent)")
        self.input.stop()
        self.output.emit()
        self.stop()

    # -- running ----------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.input.exhausted and not self.pending and not self.waiting and not self.delayed

    def run(self) -> Summary:
        """Send every request and wait for every answer (or failure); the summary."""
        self.every(self.heartbeat, "heartbeats", self.pool.heartbeats, first=self.heartbeat)
        self.every(min(0.05, self.timeout / 4), "deadlines", self._check_deadlines)
        self.after(self.hold_until - time.monotonic(), "start", self._fill)
        self.input.start()
        try:
            self.serve(until=self.done)
        finally:
            self.input.restore()
        self.output.emit()
        return self.summary

    def close(self) -> None:
        self.pool.close_all()
        super().close()

    def percentile(self, q: float) -> float:
        """The *q* quantile (0..1) of recent request latencies, in milliseconds."""
        value = percentile(sorted(self.latencies), q)
        return 0.0 if value is None else value * 1000

    def figures(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in vars(self.summary).items() if k != "picks"},
            "latency_ms": {"p50": self.percentile(0.5), "p99": self.percentile(0.99)},
            "instances": self.balancer.snapshot(),
        }


def lookup_endpoints(
    service: str, access: Any, *, via: bool = False, on_ignored: Ignored | None = None
) -> tuple[Any, list[tuple[str, int]]]:
    """A :class:`~.presence.Finder` of *service*'s workers (brokers with *via*) and the
    instances it finds now; :class:`~eda.core.errors.NotFoundError` when there is none.
    Secure mode: only those with a trusted key, pinned (:func:`.pins.usable`; the
    others are told to *on_ignored*)."""
    from ..presence import Finder

    role = "broker" if via else "worker"
    finder = Finder(service, access, lambda i: i.meta.get("role") == role)
    found = usable(finder.once(), on_ignored)
    if not found:
        what = "broker" if via else "worker"
        raise NotFoundError(f"no passing {what} of service {service!r} found")
    return finder, [(endpoint_of(i), i.weight) for i in found]

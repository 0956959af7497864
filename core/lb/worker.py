"""A service instance: each request runs a shell command, its output is the reply.

:class:`Worker` is a :class:`~eda.core.daemon.Daemon` binding a ROUTER that
speaks the eda-lb wire (:mod:`.protocol`) to callers, and a DEALER to each
broker of its service it finds (``W`` ready, ``H`` heartbeats both ways,
reconnect with backoff and jitter).  Requests run in one of two ways:

- **per request** (default): the command is started per request, the body
  and a newline on its stdin, ``EDA_REQUEST_ID`` in its environment; its
  stdout (one trailing newline removed) is the reply; a non-zero exit is an
  ``err`` reply carrying stderr's last line; up to *concurrency* at once;
- **persistent**: *concurrency* long-running processes, each fed one request
  line at a time and answering with one line per request line, in order;
  requests are pipelined into them (up to :data:`DEPTH` each).  With
  *with_id*, each line fed is ``ID<TAB>body`` (ID: the request id); a reply
  line ``ID<TAB>reply`` answers request ID, in any order, and any other
  line answers the oldest request, as without it.  A body with a newline
  would be two lines: it gets an ``err`` reply instead.

Beyond capacity, requests wait in a bounded queue; beyond that they get a
``busy`` reply (the caller tries elsewhere).  A request whose deadline
(the caller's ``timeout_ms``) passes is killed and answered ``err``; a
malformed message is counted and dropped; nothing a peer sends ends the
worker.  Everything runs on the daemon's one thread, without blocking: the
processes' pipes are non-blocking descriptors in the same poll loop.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..daemon import DRAIN_LIMIT, Daemon, Log
from ..errors import ProtocolError, UsageError
from ..measure import latency_ms
from ..outbox import RELEASE_AFTER, Pump, release_memory
from . import protocol as p

DEPTH = 256  # request lines in flight in one persistent process
PROCESS_INPUT = 1 << 20  # request bytes waiting to be written to one persistent process
QUEUE = 1024  # requests waiting for a free slot before "busy" is answered
QUEUE_BYTES = 64 << 20  # and their bodies, in bytes (beyond: "busy")
CALLER_QUEUE_BYTES = 16 << 20  # of which one caller's requests (one broker counts as one)
FRAME_COST = 64  # bytes counted per queued request beyond its body
BATCH_BYTES = 16 << 20  # request bytes read from one socket before the others' turn
READ_CHUNK = 1 << 18
STDERR_KEEP = 4096  # bytes of a command's stderr kept for its error message
RESTART_DELAY = (0.1, 5.0)  # a persistent process that keeps dying restarts at most this slowly
BROKER_LOOKUP_EVERY = 3.0
MAX_BROKERS = 16  # brokers served at once (anyone can announce one: each costs sockets)
LATENCIES = 4096  # recent request latencies kept for the stats percentiles
NO_REPLY_LINE = (
    b"timed out: no reply line (a command writing to a pipe may buffer its output: "
    b"flush each line, e.g. stdbuf -oL CMD, sed -u, python3 -u)"
)


@dataclass(slots=True)
class Job:
    """One request: where its reply goes, its id, body and deadline (monotonic, 0: none)."""

    sock: zmq.Socket[bytes]
    ident: bytes | None  # the ROUTER identity; None for a broker's DEALER
    rid: bytes
    body: bytes
    deadline: float
    received: float


@dataclass
class Run:
    """One command started for one request."""

    job: Job
    proc: subprocess.Popen[bytes]
    pidfd: int
    pending: memoryview  # stdin still to write
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    done: bool = False


@dataclass
class Process:
    """One persistent process and the requests it is answering, in order."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    stdin: int = -1
    stdout: int = -1
    stderr: int = -1
    pidfd: int = -1
    jobs: collections.deque[Job] = field(default_factory=collections.deque)
    outbuf: bytearray = field(default_factory=bytearray)
    partial: bytes = b""
    err: bytearray = field(default_factory=bytearray)
    writable_watched: bool = False
    restarts: int = 0
    started: float = 0.0


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


def last_line(data: bytes | bytearray) -> str:
    """The last non-empty line of *data*, decoded, printable, at most 300 characters."""
    for line in reversed(bytes(data).splitlines()):
        text = line.decode(errors="replace").strip()
        if text:
            return "".join(c if c.isprintable() else "?" for c in text)[:300]
    return ""


def _nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _read(fd: int, limit: int = READ_CHUNK) -> bytes | None:
    """What is waiting on *fd* (b"" at EOF), or None when nothing is ready."""
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return None
        return b""


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
        self.capacity = concurrency * (DEPTH if persistent else 1)
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
        self.runs: dict[int, Run] = {}  # by pidfd
        self.procs: list[Process] = []
        self.inflight = 0
        self.requests = self.errors = self.busy = self.timeouts = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES)
        self.brokers: dict[str, BrokerLink] = {}
        self.stats_budget = p.Budget()
        self.stats_dropped = 0  # S over the budget
        self.found_brokers: list[str] = []  # the latest found, in the order they are tried
        self.started = time.monotonic()
        self.draining = False
        self.endpoint = ""
        self.sock: zmq.Socket[bytes] | None = None
        self._dispatch: Callable[[Job], bool] = (
            self._to_process if persistent else self._run_command
        )

    # -- start and stop ---------------------------------------------------------------------
    def start(self, bind: str = "tcp://*:*") -> str:
        """Bind the ROUTER (the endpoint really bound), start persistent processes and timers."""
        # a message a little over the body limit still gets its "too large" reply;
        # one far beyond it only costs its sender the connection
        limit = 2 * self.max_request + 65536
        self.sock = self.socket(zmq.ROUTER, linger=1000, max_message=limit)  # last replies out
        self.outbox.adopt(self.sock, self.max_request)  # a caller's pipes bounded in bytes
        self.endpoint = self.bind(self.sock, bind)
        self.pump.watch(self.sock, "requests", self._on_requests)
        if self.persistent:
            for i in range(self.concurrency):
                proc = Process(i)
                self.procs.append(proc)
                self._spawn(proc)
        self.every(0.05, "deadlines", self._check_deadlines)
        if self.find_brokers is not None:
            self.follow_brokers(self.find_brokers)
        return self.endpoint

    def follow_brokers(self, find: Callable[[], list[str] | None]) -> None:
        """Serve the brokers whose backend endpoints *find* returns (None: no news),
        asked every heartbeat interval."""
        self.find_brokers = find
        self.every(self.heartbeat_interval, "brokers", self._tend_brokers)

    def drain(self, grace: float) -> None:
        """Stop taking requests (they get ``busy``: callers go elsewhere), tell brokers
        goodbye, and serve until the running requests are answered or *grace* seconds pass."""
        self.draining = True
        self._goodbye()
        for job in self._take_queue():
            self.busy += 1
            self._send(job, p.BUSY, b"")
        if self.persistent:
            for proc in self.procs:
                if not proc.jobs:  # nothing to answer: no need to wait for it
                    self._stop_process(proc, b"worker shutting down")
        deadline = time.monotonic() + grace
        self.serve(until=lambda: self.inflight <= 0 or time.monotonic() >= deadline)

    def _goodbye(self) -> None:
        for link in self.brokers.values():
            if link.sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    link.sock.send_multipart(p.disconnect(), zmq.NOBLOCK)

    def shutdown(self) -> None:
        """Say goodbye to brokers, send what waits back (busy: to be run elsewhere),
        answer what runs with err, stop every process."""
        if not self.draining:
            self._goodbye()
        for job in self._take_queue():
            self._send(job, p.BUSY, b"")
        self.outbox.flush()  # what the callers' pipes take now; the rest is lost with them
        for run in list(self.runs.values()):
            self._kill(run.proc)
            self._finish_run(run, forced=b"worker shutting down")
        for proc in self.procs:
            self._stop_process(proc, b"worker shutting down")
        for link in self.brokers.values():
            self._drop_broker(link)  # the goodbye still goes out (linger)
        self.close()

    # -- requests ---------------------------------------------------------------------------
    def _on_requests(self) -> None:
        assert self.sock is not None
        self._drain(self.sock, 1)

    def _drain(self, sock: zmq.Socket[bytes], start: int) -> None:
        now = time.monotonic()
        max_request = self.max_request
        recv = p.recv
        budget = BATCH_BYTES  # then the other sockets get their turn (heartbeats, replies)
        for _ in range(DRAIN_LIMIT):
            if budget <= 0:
                break
            try:
                frames = recv(sock)
            except zmq.Again:
                break
            budget -= len(frames[-1])
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
        if self.persistent:
            for proc in self.procs:
                if proc.outbuf:
                    self._flush(proc)

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
        elif start == 0:  # from a broker
            self._from_broker(sock, msg)
        else:
            self.dropped("message", ProtocolError(f"unexpected {msg.kind.decode()} from a caller"))

    def _admit(self, job: Job) -> None:
        self.requests += 1
        if self.draining:
            self.busy += 1
            self._send(job, p.BUSY, b"")
        elif self.outbox.waiting and self.outbox.full(job.sock, job.ident):
            # it does not read its replies: run nothing more for it (the busy reply is
            # counted as refused by the outbox, as it cannot take it either)
            self.busy += 1
            self._send(job, p.BUSY, b"")
        elif self.inflight < self.capacity and not self.queue and self._dispatch(job):
            pass
        elif self._fits(job):
            self.queue.append(job)
            self._queued(job, 1)
        else:
            self.busy += 1
            self._send(job, p.BUSY, b"")

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

    def _reply(self, job: Job, status: bytes, body: bytes, now: float = 0.0) -> None:
        """The one reply of an admitted request; its slot goes to the next queued one."""
        if status == p.ERR:
            self.errors += 1
        self.latencies.append((now or time.monotonic()) - job.received)
        self._send(job, status, body)

    def _freed(self) -> None:
        """A slot is free: run the next queued request whose time is not up."""
        self.inflight -= 1
        self._pump()

    def _pump(self) -> None:
        """Run queued requests while there is room (a slot, and a process's input)."""
        now = time.monotonic()
        while self.queue and self.inflight < self.capacity:
            job = self._dequeue()
            if job.deadline and job.deadline <= now:
                self.timeouts += 1
                self._reply(job, p.ERR, b"timed out in the queue", now)
                continue
            if not self._dispatch(job):  # every process's input is full: it waits, first
                self.queue.appendleft(job)
                self._queued(job, 1)
                return

    # -- per-request commands -----------------------------------------------------------------
    def _run_command(self, job: Job) -> bool:
        """Start the command for *job* (it takes a slot); True: taken (or answered)."""
        self.inflight += 1
        env = self.env
        env["EDA_REQUEST_ID"] = job.rid.decode()
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # a timeout kills the command and its children
            )
        except OSError as exc:
            self._reply(job, p.ERR, f"cannot run {self.argv[0]}: {exc.strerror}".encode())
            self._freed()
            return True
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        pidfd = os.pidfd_open(proc.pid)
        run = Run(job, proc, pidfd, memoryview(job.body + b"\n"))
        self.runs[pidfd] = run
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            _nonblocking(pipe.fileno())
        self.watch(proc.stdout.fileno(), "command output", lambda: self._read_run(run))
        self.watch(proc.stderr.fileno(), "command errors", lambda: self._read_run(run))
        self.watch(pidfd, "command exit", lambda: self._run_exited(run))
        self._write_run(run)
        return True

    def _write_run(self, run: Run) -> None:
        stdin = run.proc.stdin
        assert stdin is not None
        if stdin.closed:
            return
        fd = stdin.fileno()
        try:
            while run.pending:
                written = os.write(fd, run.pending)
                run.pending = run.pending[written:]
        except BlockingIOError:
            self.watch_events(fd, "command input", lambda _e: self._write_run(run), zmq.POLLOUT)
            return
        except OSError:  # the command does not read its input: fine
            pass
        self.forget(fd)
        stdin.close()

    def _read_run(self, run: Run) -> None:
        proc = run.proc
        assert proc.stdout is not None and proc.stderr is not None
        for pipe, buf, limit in (
            (proc.stdout, run.out, self.max_request),
            (proc.stderr, run.err, 0),
        ):
            if pipe.closed:
                continue
            while True:
                data = _read(pipe.fileno())
                if data is None:
                    break
                if not data:
                    self.forget(pipe.fileno())
                    pipe.close()
                    break
                buf += data
                if limit and len(buf) > limit:
                    self._kill(proc)
                    self._finish_run(run, forced=b"reply too large")
                    return
                if not limit and len(buf) > STDERR_KEEP:
                    del buf[: len(buf) - STDERR_KEEP]

    def _run_exited(self, run: Run) -> None:
        self._read_run(run)  # what it wrote before exiting is all in the pipes now
        if not run.done:
            self._finish_run(run)

    def _finish_run(self, run: Run, forced: bytes = b"") -> None:
        if run.done:
            return
        run.done = True
        proc = run.proc
        self.forget(run.pidfd)
        os.close(run.pidfd)
        del self.runs[run.pidfd]
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                self.forget(pipe.fileno())
                pipe.close()
        code = proc.wait() if not forced else self._reap(proc)
        if forced:
            self._reply(run.job, p.ERR, forced)
        elif code == 0:
            out = run.out
            if out.endswith(b"\n"):
                del out[-1:]
            self._reply(run.job, p.OK, bytes(out))
        else:
            reason = f"exit {code}" if code > 0 else f"killed by signal {-code}"
            line = last_line(run.err)
            self._reply(run.job, p.ERR, (f"{reason}: {line}" if line else reason).encode())
        self._freed()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(2.0)
        except subprocess.TimeoutExpired:  # unkillable (stopped in the kernel): leave it
            return -9

    # -- persistent processes ---------------------------------------------------------------------
    def _spawn(self, proc: Process) -> None:
        try:
            child = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise UsageError(f"cannot run {self.argv[0]}: {exc.strerror}") from None
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        proc.proc = child
        proc.stdin, proc.stdout, proc.stderr = (
            child.stdin.fileno(),
            child.stdout.fileno(),
            child.stderr.fileno(),
        )
        for fd in (proc.stdin, proc.stdout, proc.stderr):
            _nonblocking(fd)
        proc.pidfd = os.pidfd_open(child.pid)
        proc.started = time.monotonic()
        proc.partial, proc.outbuf, proc.writable_watched = b"", bytearray(), False
        self.watch(proc.stdout, "process output", lambda: self._read_process(proc))
        self.watch(proc.stderr, "process errors", lambda: self._read_stderr(proc))
        self.watch(proc.pidfd, "process exit", lambda: self._process_died(proc))

    def _to_process(self, job: Job) -> bool:
        """Pipeline *job* into the least busy process (it takes a slot); True: taken (or
        answered), False: every process has PROCESS_INPUT bytes waiting already."""
        best = None
        running = False
        for proc in self.procs:
            if proc.proc is None:
                continue
            running = True
            if len(proc.outbuf) < PROCESS_INPUT and (
                best is None or len(proc.jobs) < len(best.jobs)
            ):
                best = proc
        if not running or (best is not None and len(best.jobs) >= DEPTH):  # all restarting
            self.busy += 1
            self._send(job, p.BUSY, b"")
            return True
        if best is None:
            return False
        body = job.body
        if b"\n" in body:  # it would be two requests to the process
            self._reply(job, p.ERR, b"a persistent worker takes one line per request")
            return True
        self.inflight += 1
        best.jobs.append(job)
        if self.with_id:
            best.outbuf += job.rid
            best.outbuf += b"\t"
        best.outbuf += body
        best.outbuf += b"\n"
        job.body = b""  # in the process's input now: kept once, not twice
        return True

    def _flush(self, proc: Process) -> None:
        try:
            written = os.write(proc.stdin, proc.outbuf)
            del proc.outbuf[:written]
        except BlockingIOError:
            pass
        except OSError:  # it closed its input: its exit is handled by _process_died
            proc.outbuf.clear()
            return
        if proc.outbuf and not proc.writable_watched:
            proc.writable_watched = True
            self.watch_events(
                proc.stdin, "process input", lambda _e: self._flush(proc), zmq.POLLOUT
            )
        elif not proc.outbuf and proc.writable_watched:
            proc.writable_watched = False
            self.forget(proc.stdin)
            if self.queue:  # requests that waited for room in a process's input
                self._pump()

    def _read_process(self, proc: Process) -> None:
        data = _read(proc.stdout)
        if not data:
            if data is not None:
                self.forget(proc.stdout)  # EOF: the exit follows
            return
        if proc.partial:
            data = proc.partial + data
        lines = data.split(b"\n")
        proc.partial = lines.pop()
        jobs = proc.jobs
        now = time.monotonic()
        answered = 0
        with_id = self.with_id
        for line in lines:
            if not jobs:
                self.limited("extra", f"{self.argv[0]} printed a line nobody asked for: dropped")
                continue
            job = jobs[0]
            if with_id:  # "ID<TAB>reply" answers that request, in any order
                rid, tab, rest = line.partition(b"\t")
                if tab:
                    if rid == job.rid:
                        line = rest
                    else:
                        found = self._find(jobs, rid)
                        if found is not None:
                            job, line = found, rest
            if job is jobs[0]:
                jobs.popleft()
            else:
                jobs.remove(job)
            self.latencies.append(now - job.received)
            self._send(job, p.OK, line)
            answered += 1
        if answered:
            self.inflight -= answered - 1
            self._freed()
        if len(proc.partial) > self.max_request:
            self._restart(proc, b"reply too large")

    @staticmethod
    def _find(jobs: collections.deque[Job], rid: bytes) -> Job | None:
        for job in jobs:
            if job.rid == rid:
                return job
        return None

    def _read_stderr(self, proc: Process) -> None:
        data = _read(proc.stderr)
        if not data:
            if data is not None:
                self.forget(proc.stderr)
            return
        proc.err += data
        if len(proc.err) > STDERR_KEEP:
            del proc.err[: len(proc.err) - STDERR_KEEP]

    def _process_died(self, proc: Process) -> None:
        assert proc.proc is not None
        self._read_process(proc)
        code = self._reap(proc.proc)
        reason = f"exit {code}" if code >= 0 else f"killed by signal {-code}"
        line = last_line(proc.err)
        message = f"{self.argv[0]} ended ({reason}{': ' + line if line else ''})"
        self.limited("died", message)
        self._stop_process(proc, message.encode())
        proc.restarts += 1
        quick = time.monotonic() - proc.started < 1.0
        delay = min(RESTART_DELAY[1], RESTART_DELAY[0] * 2**proc.restarts) if quick else 0.0
        if not quick:
            proc.restarts = 0
        if not self.draining:
            self.after(delay, "restart", lambda: self._spawn(proc))

    def _restart(self, proc: Process, why: bytes, status: bytes = p.ERR) -> None:
        if proc.proc is not None:
            self._kill(proc.proc)
            self._stop_process(proc, why, status)
            self._spawn(proc)

    def _stop_process(self, proc: Process, why: bytes, status: bytes = p.ERR) -> None:
        """Forget *proc*'s descriptors and answer its requests with *status* and *why*."""
        child = proc.proc
        if child is None:
            return
        for fd in (proc.stdin, proc.stdout, proc.stderr, proc.pidfd):
            self.forget(fd)
        self._kill(child)
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        os.close(proc.pidfd)
        self._reap(child)
        proc.proc = None
        jobs, proc.jobs = proc.jobs, collections.deque()
        now = time.monotonic()
        for job in jobs:
            self._reply(job, status, why if status == p.ERR else b"", now)
            self.inflight -= 1
        proc.err.clear()
        if jobs:
            self.inflight += 1
            self._freed()

    # -- deadlines ---------------------------------------------------------------------------------
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for run in list(self.runs.values()):
            if run.job.deadline and run.job.deadline <= now:
                self.timeouts += 1
                self._kill(run.proc)
                self._finish_run(run, forced=b"timed out")
        for proc in self.procs:
            if proc.jobs and proc.jobs[0].deadline and proc.jobs[0].deadline <= now:
                self.timeouts += 1
                head = proc.jobs.popleft()
                self._reply(head, p.ERR, NO_REPLY_LINE, now)
                self.inflight -= 1
                # the process is stuck on it: the requests after it cannot be answered here,
                # "busy" sends them elsewhere (they may have been read: hence the rid)
                self.busy += len(proc.jobs)
                self._restart(proc, b"", p.BUSY)
                self.inflight += 1
                self._freed()
        while self.queue and self.queue[0].deadline and self.queue[0].deadline <= now:
            self.timeouts += 1
            self._reply(self._dequeue(), p.ERR, b"timed out in the queue", now)

    # -- brokers -----------------------------------------------------------------------------------
    def _tend_brokers(self) -> None:
        assert self.find_brokers is not None
        if self.draining:  # said goodbye: no heartbeats, no reconnects
            return
        now = time.monotonic()
        found = self.find_brokers()
        if found is not None:
            listed = dict.fromkeys(found)  # in the order tried so far, new ones last
            self.found_brokers = [e for e in self.found_brokers if e in listed]
            known = set(self.found_brokers)
            self.found_brokers += [e for e in listed if e not in known]
            for endpoint in [e for e in self.brokers if e not in self.found_brokers]:
                self.log(f"broker {endpoint} no longer listed: leaving it")
                self._drop_broker(self.brokers.pop(endpoint), goodbye=True)
        for endpoint in self.found_brokers:
            if len(self.brokers) >= MAX_BROKERS:
                break
            if endpoint not in self.brokers:
                self.brokers[endpoint] = BrokerLink(endpoint)
        silent = 3 * self.heartbeat_interval
        for link in list(self.brokers.values()):
            if link.sock is None:
                if now >= link.retry_at:
                    self._connect_broker(link, now)
            elif now - link.last_seen > silent:
                self.log(f"broker {link.endpoint} silent for {silent:g} s: reconnecting")
                self._drop_broker(link)
                self._schedule(link, now)
                if not link.heard and len(self.found_brokers) > MAX_BROKERS:
                    # never a word from it, and others wait for a place: give them its turn
                    del self.brokers[link.endpoint]
                    self.found_brokers.remove(link.endpoint)
                    self.found_brokers.append(link.endpoint)
            else:
                with contextlib.suppress(zmq.ZMQError):
                    # behind the replies waiting for it, if any: never dropped on a full pipe
                    self.pump.send(link.sock, None, p.heartbeat())

    def _connect_broker(self, link: BrokerLink, now: float) -> None:
        sock = self.socket(zmq.DEALER, linger=1000, max_message=2 * self.max_request + 65536)
        self.outbox.adopt(sock, self.max_request)
        # a restarted broker is reconnected to by ZeroMQ on its own, under a new identity:
        # say W again then, rather than wait to find it silent (watched from before the
        # connect, so that the first connection is counted)
        link.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        try:
            sock.connect(link.endpoint)
        except zmq.ZMQError as exc:
            link.sock = sock
            self._drop_broker(link)
            self.limited("broker", f"cannot connect to broker {link.endpoint}: {exc}")
            self._schedule(link, now)
            return
        link.sock, link.last_seen, link.connects = sock, now, 0
        self.pump.watch(sock, "broker", lambda: self._drain(sock, 0))
        self.watch(link.monitor, "broker connects", lambda: self._broker_connected(link, sock))
        self._ready(sock)
        self.log(f"connecting to broker {link.endpoint}")

    def _ready(self, sock: zmq.Socket[bytes]) -> None:
        ready = p.ready(self.service, self.inst_id, self.concurrency, self.weight, self.capacity)
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(ready, zmq.NOBLOCK)

    def _broker_connected(self, link: BrokerLink, sock: zmq.Socket[bytes]) -> None:
        if link.sock is not sock or link.monitor is None:
            return
        with contextlib.suppress(zmq.Again):
            while True:
                link.monitor.recv_multipart(zmq.NOBLOCK)
                link.connects += 1
                if link.connects > 1:  # the first connection carried the W sent at connect
                    self.log(f"reconnected to broker {link.endpoint}: ready again")
                    link.last_seen = time.monotonic()
                    self._ready(sock)

    def _schedule(self, link: BrokerLink, now: float) -> None:
        link.retry_at = now + link.backoff * random.uniform(0.5, 1.5)
        link.backoff = min(link.backoff * 2, 10.0)

    def _drop_broker(self, link: BrokerLink, goodbye: bool = False) -> None:
        if link.monitor is not None:
            self.forget(link.monitor)
            if link.sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    link.sock.disable_monitor()
            link.monitor.close(0)
            link.monitor = None
        if link.sock is not None:
            if goodbye:
                with contextlib.suppress(zmq.ZMQError):
                    link.sock.send_multipart(p.disconnect(), zmq.NOBLOCK)
            self.pump.forget(link.sock)
            self.close_socket(link.sock)
            link.sock = None

    def _from_broker(self, sock: zmq.Socket[bytes], msg: p.Message) -> None:
        link = next((b for b in self.brokers.values() if b.sock is sock), None)
        if link is None:
            return
        if msg.kind == p.HEARTBEAT:
            link.last_seen = time.monotonic()
            link.backoff = 0.5
            link.heard = True
        elif msg.kind == p.DISCONNECT:
            self.log(f"broker {link.endpoint} said goodbye: reconnecting later")
            self._drop_broker(link)
            self._schedule(link, time.monotonic())
        else:
            self.dropped("message", ProtocolError(f"unexpected {msg.kind.decode()} from a broker"))

    # -- stats -------------------------------------------------------------------------------------
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

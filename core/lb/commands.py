"""The application of an eda-lb worker: running its command for each request.

In Majordomo's terms this is the worker application; :mod:`.worker` is the
worker API (the link to callers and brokers: wire, heartbeats, admission,
queue, stats).  The worker hands each admitted request (:class:`Job`) to
one of two applications, both on :mod:`eda.core.runner`, in the worker's
poll loop without blocking:

- :class:`PerRequest`: the command started per request (a
  :class:`~eda.core.runner.Run`), the body and a newline on its stdin,
  ``EDA_REQUEST_ID`` in its environment; its stdout (one trailing newline
  removed) is the reply; a failure is an ``err`` reply with the runner's
  reason (``exit status 3: it broke``); up to *concurrency* at once.  At
  its deadline a request is answered ``err`` (``timed out after Ns``) and
  its command's group stopped (SIGTERM, SIGKILL after a grace); its slot is
  free when the command is gone.
- :class:`Persistent`: *concurrency* long-running processes
  (:class:`~eda.core.lineprocess.LineProcess`), each fed one request line at a
  time, requests pipelined (up to :data:`DEPTH` each), answered one line
  per request line in order, or by id with *with_id* (see :mod:`.worker`).
  One stuck past a request's deadline is replaced: the old one retired
  (SIGTERM, SIGKILL after a grace, reaped by :meth:`check_deadlines`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from .. import runner
from ..daemon import RateLimited
from ..errors import UsageError
from ..lineprocess import LineProcess
from . import protocol as p

DEPTH = 256  # request lines in flight in one persistent process
PROCESS_INPUT = 1 << 20  # request bytes waiting to be written to one persistent process
RESTART_DELAY = (0.1, 5.0)  # a persistent process that keeps dying restarts at most this slowly
NO_REPLY_LINE = (
    b"timed out: no reply line (a command writing to a pipe may buffer its output: "
    b"flush each line, e.g. stdbuf -oL CMD, sed -u, python3 -u)"
)
SHUTTING_DOWN = b"worker shutting down"


@dataclass(slots=True)
class Job:
    """One request: where its reply goes, its id, body and deadline (monotonic, 0: none)."""

    sock: zmq.Socket[bytes]
    ident: bytes | None  # the ROUTER identity; None for a broker's DEALER
    rid: bytes
    body: bytes
    deadline: float
    received: float


class Host(Protocol):
    """What an application needs from its worker (:class:`.worker.Worker`)."""

    timeouts: int
    busy: int
    draining: bool
    limited: RateLimited

    def reply(self, job: Job, status: bytes, body: bytes, now: float = 0.0) -> None: ...

    def refuse(self, job: Job) -> None: ...

    def run_queued(self) -> None: ...

    def watch(self, target: Any, what: str, handler: Callable[[], object]) -> None: ...

    def watch_events(
        self, target: Any, what: str, handler: Callable[[int], object], events: int
    ) -> None: ...

    def forget(self, target: Any) -> None: ...

    def after(self, delay: float, what: str, step: Callable[[], object]) -> Any: ...


class DaemonLoop:
    """The runner's :class:`~eda.core.runner.Loop` on the worker's poll loop."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def on_readable(self, fd: int, handler: Callable[[], object]) -> None:
        self.host.watch(fd, "command output", handler)

    def on_writable(self, fd: int, handler: Callable[[], object]) -> None:
        self.host.watch_events(fd, "command input", lambda _e: handler(), zmq.POLLOUT)

    def forget(self, fd: int) -> None:
        self.host.forget(fd)


@dataclass(eq=False)
class Running:
    """One command started for one request."""

    job: Job
    run: runner.Run | None = None
    answered: bool = False


class PerRequest:
    """A command started per request (see the module's doc)."""

    def __init__(
        self, host: Host, argv: list[str], env: dict[str, str], concurrency: int,
        max_reply: int,
    ) -> None:  # fmt: skip
        self.host, self.argv, self.env = host, argv, env
        self.capacity = concurrency
        self.max_reply = max_reply
        self.loop = DaemonLoop(host)
        self.runs: dict[int, Running] = {}  # by id()
        self.inflight = 0

    def start(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def dispatch(self, job: Job) -> bool:
        """Start the command for *job* (it takes a slot); True: taken (or answered)."""
        self.inflight += 1
        env = self.env
        env["EDA_REQUEST_ID"] = job.rid.decode()
        try:
            child = runner.Child(self.argv, env=env)
        except runner.RunError as exc:
            self.host.reply(job, p.ERR, str(exc).encode())
            self._free()
            return True
        entry = Running(job)
        self.runs[id(entry)] = entry
        entry.run = runner.Run(
            child, self.loop, job.body + b"\n", lambda outcome: self._done(entry, outcome),
            max_output=self.max_reply,
        )  # fmt: skip
        return True

    def _done(self, entry: Running, outcome: runner.Outcome) -> None:
        del self.runs[id(entry)]
        if not entry.answered:
            entry.answered = True
            if outcome.overflow:
                self.host.reply(entry.job, p.ERR, b"reply too large")
            elif outcome.ok:
                out = outcome.stdout
                self.host.reply(entry.job, p.OK, out[:-1] if out.endswith(b"\n") else out)
            else:
                self.host.reply(entry.job, p.ERR, outcome.reason().encode())
        self._free()

    def _free(self) -> None:
        self.inflight -= 1
        self.host.run_queued()

    def check_deadlines(self, now: float) -> None:
        """Answer the requests whose time is up and stop their commands."""
        for entry in list(self.runs.values()):
            run = entry.run
            assert run is not None
            if not entry.answered and entry.job.deadline and entry.job.deadline <= now:
                self.host.timeouts += 1
                entry.answered = True
                took = round(entry.job.deadline - entry.job.received, 3)
                why = runner.reason(None, run.err, run.out, took)
                self.host.reply(entry.job, p.ERR, why.encode(), now)
                run.time_out(took)
            run.tick(now)

    def shutdown(self) -> None:
        for entry in list(self.runs.values()):
            assert entry.run is not None
            entry.run.abandon()
            del self.runs[id(entry)]
            self.inflight -= 1
            if not entry.answered:
                self.host.reply(entry.job, p.ERR, SHUTTING_DOWN)


@dataclass(eq=False)
class Process:
    """One persistent process and the requests it is answering, in order."""

    index: int
    line: LineProcess
    jobs: collections.deque[Job] = field(default_factory=collections.deque)
    restarts: int = 0


class Persistent:
    """*concurrency* persistent processes fed request lines (see the module's doc)."""

    def __init__(
        self, host: Host, argv: list[str], env: dict[str, str], concurrency: int,
        max_reply: int, with_id: bool,
    ) -> None:  # fmt: skip
        self.host, self.argv, self.env = host, argv, env
        self.concurrency = concurrency
        self.capacity = concurrency * DEPTH
        self.max_reply = max_reply
        self.with_id = with_id
        self.loop = DaemonLoop(host)
        self.procs: list[Process] = []
        self.retired: list[runner.Child] = []  # replaced processes asked to stop
        self.runs: dict[int, Running] = {}  # none: requests are lines here
        self.inflight = 0

    def _process(self, index: int) -> Process:
        proc: Process

        def lines(got: list[bytes]) -> None:
            self._lines(proc, got)

        line = LineProcess(
            self.argv, self.loop, on_lines=lines, on_exit=lambda o: self._died(proc, o),
            on_overflow=lambda: self._restart(proc, b"reply too large"),
            on_drained=self.host.run_queued, max_line=self.max_reply, env=self.env,
        )  # fmt: skip
        proc = Process(index, line)
        return proc

    def start(self) -> None:
        for i in range(self.concurrency):
            proc = self._process(i)
            self.procs.append(proc)
            self._spawn(proc)

    def _spawn(self, proc: Process) -> None:
        try:
            proc.line.start()
        except runner.RunError as exc:
            raise UsageError(str(exc)) from None

    def dispatch(self, job: Job) -> bool:
        """Pipeline *job* into the least busy process (it takes a slot); True: taken (or
        answered), False: every process has PROCESS_INPUT bytes waiting already."""
        best = None
        running = False
        for proc in self.procs:
            if not proc.line.running:
                continue
            running = True
            if len(proc.line.outbuf) < PROCESS_INPUT and (
                best is None or len(proc.jobs) < len(best.jobs)
            ):
                best = proc
        if not running or (best is not None and len(best.jobs) >= DEPTH):  # all restarting
            self.host.refuse(job)
            return True
        if best is None:
            return False
        body = job.body
        if b"\n" in body:  # it would be two requests to the process
            self.host.reply(job, p.ERR, b"a persistent worker takes one line per request")
            return True
        self.inflight += 1
        best.jobs.append(job)
        outbuf = best.line.outbuf
        if self.with_id:
            outbuf += job.rid
            outbuf += b"\t"
        outbuf += body
        outbuf += b"\n"
        job.body = b""  # in the process's input now: kept once, not twice
        return True

    def flush(self) -> None:
        """Write what the requests just admitted put in the processes' input."""
        for proc in self.procs:
            if proc.line.outbuf:
                proc.line.flush()

    def _lines(self, proc: Process, lines: list[bytes]) -> None:
        jobs = proc.jobs
        now = time.monotonic()
        answered = 0
        with_id = self.with_id
        reply = self.host.reply
        for line in lines:
            if not jobs:
                self.host.limited(
                    "extra", f"{self.argv[0]} printed a line nobody asked for: dropped"
                )
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
            reply(job, p.OK, line, now)
            answered += 1
        if answered:
            self._free(answered)

    @staticmethod
    def _find(jobs: collections.deque[Job], rid: bytes) -> Job | None:
        for job in jobs:
            if job.rid == rid:
                return job
        return None

    def _free(self, count: int) -> None:
        self.inflight -= count
        self.host.run_queued()

    def _died(self, proc: Process, outcome: runner.Outcome) -> None:
        message = f"{self.argv[0]} ended: {outcome.reason()}"
        self.host.limited("died", message)
        self._answer_all(proc, message.encode())
        proc.restarts += 1
        quick = time.monotonic() - proc.line.started < 1.0
        delay = min(RESTART_DELAY[1], RESTART_DELAY[0] * 2**proc.restarts) if quick else 0.0
        if not quick:
            proc.restarts = 0
        if not self.host.draining:
            self.host.after(delay, "restart", lambda: self._spawn(proc))

    def _restart(self, proc: Process, why: bytes, status: bytes = p.ERR) -> None:
        """Replace *proc* (stuck, or too long a line): its requests are answered, the old
        process gets SIGTERM (SIGKILL after a grace, see check_deadlines), a new one starts."""
        child = proc.line.retire()
        if child is not None:
            self.retired.append(child)
            self._answer_all(proc, why, status)
            self._spawn(proc)

    def _stop(self, proc: Process, why: bytes, status: bytes = p.ERR) -> None:
        """Kill *proc* and answer its requests with *status* and *why*."""
        if proc.line.running:
            proc.line.stop()
            self._answer_all(proc, why, status)

    def _answer_all(self, proc: Process, why: bytes, status: bytes = p.ERR) -> None:
        jobs, proc.jobs = proc.jobs, collections.deque()
        now = time.monotonic()
        for job in jobs:
            self.host.reply(job, status, why if status == p.ERR else b"", now)
        if jobs:
            self._free(len(jobs))

    def check_deadlines(self, now: float) -> None:
        if self.retired:
            self.retired = [child for child in self.retired if not child.gone(now)]
        for proc in self.procs:
            if proc.jobs and proc.jobs[0].deadline and proc.jobs[0].deadline <= now:
                self.host.timeouts += 1
                head = proc.jobs.popleft()
                self.host.reply(head, p.ERR, NO_REPLY_LINE, now)
                self.inflight -= 1
                # the process is stuck on it: the requests after it cannot be answered here,
                # "busy" sends them elsewhere (they may have been read: hence the rid)
                self.host.busy += len(proc.jobs)
                self._restart(proc, b"", p.BUSY)
                self.host.run_queued()

    def drain(self) -> None:
        for proc in self.procs:
            if not proc.jobs:  # nothing to answer: asked to stop now (SIGTERM)
                child = proc.line.retire()
                if child is not None:
                    self.retired.append(child)

    def shutdown(self) -> None:
        for proc in self.procs:
            self._stop(proc, SHUTTING_DOWN)
        for child in self.retired:
            child.close()  # (killed: the worker is leaving)
        self.retired.clear()

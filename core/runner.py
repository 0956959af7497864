"""Running shell commands: the one runner every eda program uses.

Users: eda-lb workers (a command per request, or persistent processes
answering lines), eda-txn participants (``--prepare/--commit/--abort``
commands, a ``--persistent`` agent), saga ``run`` steps, and
``eda-registry register --check``.

What every command gets, whoever runs it:

- **its own process group**, started with :mod:`subprocess` (``posix_spawn``
  or ``vfork``): never ``os.fork`` in a process that has threads.  A shell
  command string runs as ``sh -c COMMAND`` (:func:`shell`);
- **data on stdin** (``None``: ``/dev/null``), written without blocking while
  its output is read, so a command that answers as it reads never stalls;
- **output caps**: stdout up to *max_output* bytes (beyond: the command is
  killed, or its output discarded, as its caller says); stderr keeps its
  last :data:`STDERR_TAIL` bytes (and may be passed on as it comes);
- **a timeout** that stops the whole group: SIGTERM, then SIGKILL after
  :data:`GRACE` seconds; what is left of the group when the command exits
  after a timeout is killed too.

**Where a failure's reason comes from** (:func:`reason`), for every program:
what happened (``exit status N``, ``killed by signal S`` or ``timed out
after Ns``), then, after ``": "``, the command's own word: the last
non-empty line of its stderr, else the last non-empty line of its stdout,
made printable and cut to :data:`REASON_CHARS` characters::

    exit status 3: card declined
    killed by signal 9
    timed out after 0.5s: still waiting for the lock

Two ways to drive a command: :func:`run` blocks (the caller is a thread of
its own: eda-txn actions, saga steps, health checks); :class:`Run` is
attached to a :class:`Loop` (eda-lb's poll loop, or :class:`SelectLoop`
for a thread that waits on its commands), and so is
:class:`eda.core.lineprocess.LineProcess`, the persistent line protocol on
the same :class:`Child`.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import EdaError

GRACE = 2.0  # s between SIGTERM and SIGKILL when a command's time is up
STDERR_TAIL = 4096  # bytes of a command's stderr kept for its reason
REASON_CHARS = 200  # characters of a command's own line kept in a reason
MAX_OUTPUT = 1 << 20  # default stdout cap, bytes
READ_CHUNK = 1 << 18
DRAIN_CHUNKS = 16  # chunks read from one pipe before the loop's other work


class RunError(EdaError):
    """A command could not be started (not found, not executable, no resources)."""


def shell(command: str) -> list[str]:
    """The argv that runs the shell command line *command*."""
    return ["sh", "-c", command]


def last_line(data: bytes | bytearray) -> str:
    """The last non-empty line of *data*, decoded, printable, at most REASON_CHARS long."""
    for line in reversed(bytes(data).splitlines()):
        text = line.decode(errors="replace").strip()
        if text:
            return "".join(c if c.isprintable() else "?" for c in text)[:REASON_CHARS]
    return ""


def what_happened(status: int | None, timed_out: float = 0.0) -> str:
    """``timed out after Ns``, ``killed by signal S``, or ``exit status N``."""
    if timed_out:
        return f"timed out after {timed_out:g}s"
    if status is None:
        return "ended"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit status {status}"


def reason(
    status: int | None, stderr: bytes | bytearray, stdout: bytes | bytearray = b"",
    timed_out: float = 0.0,
) -> str:  # fmt: skip
    """Why a command failed, by the rule of this module's docstring."""
    head = what_happened(status, timed_out)
    said = last_line(stderr) or last_line(stdout)
    return f"{head}: {said}" if said else head


@dataclass
class Outcome:
    """How one command ended: its status (negative: the signal), output and stderr's tail."""

    status: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: float = 0.0  # the timeout (s) that stopped it, 0: none
    overflow: bool = False  # its stdout went over the cap (and was cut or it was killed)

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out

    def reason(self) -> str:
        return reason(self.status, self.stderr, self.stdout, self.timed_out)


class Loop(Protocol):
    """What a :class:`Run` or :class:`LineProcess` needs from an event loop."""

    def on_readable(self, fd: int, handler: Callable[[], object]) -> None: ...

    def on_writable(self, fd: int, handler: Callable[[], object]) -> None: ...

    def forget(self, fd: int) -> None: ...


class SelectLoop:
    """A :class:`Loop` for a thread that waits on its commands itself."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    def _set(self, fd: int, events: int, handler: Callable[[], object]) -> None:
        if fd in self._sel.get_map():
            self._sel.modify(fd, events, handler)
        else:
            self._sel.register(fd, events, handler)

    def on_readable(self, fd: int, handler: Callable[[], object]) -> None:
        self._set(fd, selectors.EVENT_READ, handler)

    def on_writable(self, fd: int, handler: Callable[[], object]) -> None:
        self._set(fd, selectors.EVENT_WRITE, handler)

    def forget(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fd)

    def step(self, timeout: float | None) -> None:
        """Wait up to *timeout* seconds (None: for ever) and run what is ready."""
        for key, _ in self._sel.select(None if timeout is None else max(0.0, timeout)):
            if key.fd in self._sel.get_map():  # an earlier handler may have forgotten it
                key.data()

    def close(self) -> None:
        self._sel.close()


def read_ready(fd: int) -> bytes | None:
    """What is waiting on *fd* (b"" at EOF), or None when nothing is ready."""
    try:
        return os.read(fd, READ_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def signal_group(pgid: int, sig: int) -> None:
    """Send *sig* to the process group *pgid* (no error when it is gone)."""
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)


class Child:
    """One command started in a process group of its own, its pipes non-blocking."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = True,
    ) -> None:
        if not argv:
            raise RunError("no command to run")
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd or None,
                process_group=0,  # a timeout stops the command and its children
            )
        except OSError as exc:
            raise RunError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        self.pid = self.proc.pid
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdin = self.proc.stdin.fileno() if self.proc.stdin is not None else -1
        self.stdout, self.stderr = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self.stdin, self.stdout, self.stderr):
            if fd >= 0:
                os.set_blocking(fd, False)
        self.pidfd = os.pidfd_open(self.pid)  # readable when it exits
        self.kill_at = 0.0  # when SIGKILL follows the SIGTERM of terminate()

    def signal(self, sig: int) -> None:
        """Send *sig* to the whole group (no error when it is gone)."""
        signal_group(self.pid, sig)

    def terminate(self, grace: float | None = None) -> None:
        """SIGTERM to the group; :meth:`escalate` sends SIGKILL after *grace* seconds
        (default :data:`GRACE`)."""
        if not self.kill_at:
            self.signal(signal.SIGTERM)
            self.kill_at = time.monotonic() + (GRACE if grace is None else grace)

    def escalate(self, now: float) -> None:
        """SIGKILL to the group if it was terminated *grace* seconds ago."""
        if self.kill_at and now >= self.kill_at:
            self.signal(signal.SIGKILL)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close_stdin(self) -> None:
        """Close its stdin (stop watching it first: its number is free for reuse)."""
        self.stdin = -1
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def gone(self, now: float) -> bool:
        """After :meth:`terminate`, without blocking: True once it has exited (what is
        left of its group killed, its descriptors closed); SIGKILL when the grace is up."""
        self.escalate(now)
        if self.proc.poll() is None:
            return False
        self.kill()  # what is left of its group
        self.close()
        return True

    def stop(self, grace: float | None = None) -> int:
        """Stop it, blocking: SIGTERM to the group, SIGKILL after *grace* seconds (default
        :data:`GRACE`) if it has not exited; its status."""
        self.terminate(grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(max(0.0, self.kill_at - time.monotonic()))
        self.kill()  # it, if it ignored SIGTERM, and what is left of its group
        return self.close()

    def close(self) -> int:
        """Close every descriptor and reap the command (killed first if it still runs):
        its status, negative for a signal."""
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.proc.poll() is None:
            self.kill()
        try:
            return self.proc.wait(2.0)
        except subprocess.TimeoutExpired:  # unkillable (stopped in the kernel): leave it
            return -signal.SIGKILL


class Run:
    """One command fed *data* and read to its end on *loop*; *on_done* gets its
    :class:`Outcome` once (not after :meth:`abandon`)."""

    def __init__(
        self,
        child: Child,
        loop: Loop,
        data: bytes | None,
        on_done: Callable[[Outcome], object],
        *,
        max_output: int = MAX_OUTPUT,
        kill_on_overflow: bool = True,
        on_stderr: Callable[[bytes], object] | None = None,
    ) -> None:
        self.child, self.loop, self.on_done = child, loop, on_done
        self.max_output, self.kill_on_overflow = max_output, kill_on_overflow
        self.on_stderr = on_stderr
        self.out, self.err = bytearray(), bytearray()
        self.overflow = False
        self.timed_out = 0.0
        self.done = False
        self._pending = memoryview(data or b"")
        self._open = [child.stdout, child.stderr]
        loop.on_readable(child.stdout, self._read_out)
        loop.on_readable(child.stderr, self._read_err)
        loop.on_readable(child.pidfd, self._exited)
        if child.stdin >= 0:
            self._write()

    def _write(self) -> None:
        fd = self.child.stdin
        try:
            while self._pending:
                self._pending = self._pending[os.write(fd, self._pending[:READ_CHUNK]) :]
        except BlockingIOError:
            self.loop.on_writable(fd, self._write)
            return
        except OSError:  # it does not read its input: fine
            pass
        self.loop.forget(fd)
        self.child.close_stdin()

    def _drain(self, fd: int, buf: bytearray, keep: int, more: bool) -> bool:
        """Read *fd* into *buf* (a bounded number of chunks: the loop's other work goes
        on); False at EOF (or, unless *more*, when nothing is ready)."""
        for _ in range(DRAIN_CHUNKS):
            data = read_ready(fd)
            if data is None:
                return more
            if not data:
                self.loop.forget(fd)
                with contextlib.suppress(ValueError):
                    self._open.remove(fd)
                return False
            if fd == self.child.stderr:
                if self.on_stderr is not None:
                    self.on_stderr(data)
                buf += data
                if len(buf) > keep:
                    del buf[: len(buf) - keep]
                continue
            if len(buf) + len(data) > keep:
                self.overflow = True
                buf += data[: max(0, keep - len(buf))]
                if self.kill_on_overflow:
                    self.child.kill()
                    self._finish()
                    return False
                continue
            buf += data
        return more

    def _read_out(self) -> None:
        self._drain(self.child.stdout, self.out, self.max_output, True)

    def _read_err(self) -> None:
        self._drain(self.child.stderr, self.err, STDERR_TAIL, True)

    def _exited(self) -> None:
        # what it wrote is in the pipes now; children it left running may hold them
        # open: take what is there, do not wait for them
        for fd, buf, keep in (
            (self.child.stdout, self.out, self.max_output),
            (self.child.stderr, self.err, STDERR_TAIL),
        ):
            if fd in self._open and not self.done:
                self._drain(fd, buf, keep, False)
        self._finish()

    def time_out(self, timeout: float) -> None:
        """Its time (*timeout* s) is up: stop its group (SIGTERM, SIGKILL after a grace)."""
        if not self.done and not self.timed_out:
            self.timed_out = timeout
            self.child.terminate()

    def tick(self, now: float) -> None:
        """SIGKILL a command that outlived the grace after its SIGTERM."""
        if not self.done:
            self.child.escalate(now)

    def _detach(self) -> int:
        self.done = True
        for fd in (self.child.stdin, self.child.stdout, self.child.stderr, self.child.pidfd):
            if fd >= 0:
                self.loop.forget(fd)
        return self.child.close()

    def _finish(self) -> None:
        if self.done:
            return
        status = self._detach()
        if self.timed_out:
            self.child.kill()  # what is left of its group
        self.on_done(
            Outcome(status, bytes(self.out), bytes(self.err), self.timed_out, self.overflow)
        )

    def abandon(self) -> None:
        """Kill it now and forget it, without an outcome."""
        if not self.done:
            self.child.kill()
            self._detach()


def run(
    argv: list[str],
    data: bytes | None = None,
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    max_output: int = MAX_OUTPUT,
    kill_on_overflow: bool = False,
    on_stderr: Callable[[bytes], object] | None = None,
    on_spawn: Callable[[int], object] | None = None,
) -> Outcome:
    """Run *argv* to its end (see the module's doc) and say how it ended.

    *on_spawn* gets the group's id once it runs (to kill it from elsewhere).
    Raises :class:`RunError` when it cannot start.
    """
    child = Child(argv, env=env, cwd=cwd, stdin=data is not None)
    loop = SelectLoop()
    done: list[Outcome] = []
    command: Run | None = None
    try:
        if on_spawn is not None:  # (the command runs meanwhile)
            on_spawn(child.pid)
        command = Run(
            child, loop, data, done.append, max_output=max_output,
            kill_on_overflow=kill_on_overflow, on_stderr=on_stderr,
        )  # fmt: skip
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done:
            now = time.monotonic()
            command.tick(now)
            wait = None
            if deadline is not None and not command.timed_out:
                if now >= deadline:
                    assert timeout is not None
                    command.time_out(timeout)
                    continue
                wait = deadline - now
            elif child.kill_at:
                wait = max(0.0, child.kill_at - now) + 0.01
            loop.step(wait)
    except BaseException:
        if command is not None:
            command.abandon()
        else:
            child.kill()
            child.close()
        raise
    finally:
        loop.close()
    return done[0]

"""The persistent line protocol, on :mod:`eda.core.runner`.

A long-running command fed request lines on stdin and answering with lines
on stdout: eda-lb's ``worker --persistent`` processes (in the worker's poll
loop, :mod:`eda.core.lb.commands`) and eda-txn's ``participant
--persistent`` agent (waited on by its thread, :mod:`eda.core.txn.actions`).
What a line means (in order, by id, JSON) is its caller's business; this
module starts the command as the runner does (its own process group, its
stderr's tail kept, and passed on if asked), writes without blocking,
splits the output into lines within a length limit, and says how the
command ended by the runner's rule (:meth:`~eda.core.runner.Outcome.reason`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable

from .runner import DRAIN_CHUNKS, MAX_OUTPUT, STDERR_TAIL, Child, Loop, Outcome, read_ready


class LineProcess:
    """A long-running command fed lines on stdin, answering lines on stdout (see the
    module's doc), on *loop*.

    *on_lines* gets the complete lines read (in order, without their newline);
    *on_overflow* is called when a line grows over *max_line* bytes unfinished;
    *on_exit* gets the :class:`Outcome` of a command that ended by itself (not
    after :meth:`stop`).  Nothing here restarts it: :meth:`start` again.
    """

    def __init__(
        self,
        argv: list[str],
        loop: Loop,
        *,
        on_lines: Callable[[list[bytes]], object],
        on_exit: Callable[[Outcome], object],
        on_overflow: Callable[[], object],
        on_drained: Callable[[], object] = lambda: None,
        on_stderr: Callable[[bytes], object] | None = None,
        max_line: int = MAX_OUTPUT,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.argv, self.loop = argv, loop
        self.on_lines, self.on_exit, self.on_overflow = on_lines, on_exit, on_overflow
        self.on_drained, self.on_stderr = on_drained, on_stderr
        self.max_line, self.env, self.cwd = max_line, env, cwd
        self.child: Child | None = None
        self.outbuf = bytearray()  # input not yet taken by the command
        self.err = bytearray()  # stderr's tail
        self.partial = b""  # an unfinished output line
        self.eof = False  # it closed its stdout
        self.started = 0.0
        self._writing = False

    @property
    def running(self) -> bool:
        return self.child is not None

    def start(self) -> None:
        """Start the command (:class:`RunError` if it cannot be)."""
        child = Child(self.argv, env=self.env, cwd=self.cwd)
        self.child = child
        self.outbuf, self.err, self.partial = bytearray(), bytearray(), b""
        self.eof, self._writing = False, False
        self.started = time.monotonic()
        self.loop.on_readable(child.stdout, self._read)
        self.loop.on_readable(child.stderr, self._read_err)
        self.loop.on_readable(child.pidfd, self._exited)

    def flush(self) -> None:
        """Write what :attr:`outbuf` holds, as much as the command takes now; the rest
        when it takes more (then *on_drained*)."""
        child = self.child
        if child is None:
            self.outbuf.clear()
            return
        try:
            del self.outbuf[: os.write(child.stdin, self.outbuf)]
        except BlockingIOError:
            pass
        except OSError:  # it closed its input: its exit follows
            self.outbuf.clear()
        if self.outbuf and not self._writing:
            self._writing = True
            self.loop.on_writable(child.stdin, self.flush)
        elif not self.outbuf and self._writing:
            self._writing = False
            self.loop.forget(child.stdin)
            self.on_drained()

    def send(self, data: bytes) -> None:
        """Queue *data* (whole lines) and write what the command takes now."""
        self.outbuf += data
        self.flush()

    def _read(self) -> bool:
        """Read one chunk of output; False when there was nothing (or EOF)."""
        assert self.child is not None
        data = read_ready(self.child.stdout)
        if not data:
            if data is not None:
                self.loop.forget(self.child.stdout)  # EOF: the exit follows
                self.eof = True
            return False
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if lines:
            self.on_lines(lines)
        if len(self.partial) > self.max_line and self.child is not None:
            self.on_overflow()
        return True

    def _read_err(self) -> None:
        assert self.child is not None
        data = read_ready(self.child.stderr)
        if not data:
            if data is not None:
                self.loop.forget(self.child.stderr)
            return
        if self.on_stderr is not None:
            self.on_stderr(data)
        self.err += data
        if len(self.err) > STDERR_TAIL:
            del self.err[: len(self.err) - STDERR_TAIL]

    def _exited(self) -> None:
        child = self.child
        assert child is not None
        for _ in range(DRAIN_CHUNKS):  # its last lines are in the pipe
            if self.eof or self.child is not child or not self._read():
                break
        if self.child is not child:  # its last lines stopped it
            return
        self._read_err()
        if self.child is not child:  # its last lines stopped it
            return
        status = self._detach()
        self.on_exit(Outcome(status, self.partial, bytes(self.err)))

    def _forget(self) -> Child:
        """Stop watching the command and drop what it was to be fed: the child."""
        child = self.child
        assert child is not None
        for fd in (child.stdin, child.stdout, child.stderr, child.pidfd):
            if fd >= 0:
                self.loop.forget(fd)
        self.child = None
        self.outbuf.clear()
        self._writing = False
        return child

    def _detach(self) -> int:
        return self._forget().close()

    def stop(self) -> None:
        """Kill the command's group now and forget it (no *on_exit*)."""
        if self.child is not None:
            self.child.kill()
            self._detach()

    def retire(self) -> Child | None:
        """Forget the command (no *on_exit*) and ask its group to stop (SIGTERM): the
        child, for :meth:`Child.gone` (or :meth:`Child.stop`) to finish; None if none."""
        if self.child is None:
            return None
        child = self._forget()
        # its input ends; its output stays open until it is gone (a shell that says
        # "Terminated" to a closed pipe would die of SIGPIPE before its own trap ran)
        child.close_stdin()
        child.terminate()
        return child

    def close_input(self, wait: float) -> None:
        """Close its stdin (the end of requests), give it *wait* seconds to exit, then stop it."""
        if self.child is None:
            return
        if self.child.stdin >= 0:
            self.loop.forget(self.child.stdin)
        self.child.close_stdin()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.proc.wait(wait)
        self.stop()

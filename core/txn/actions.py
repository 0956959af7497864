"""What a participant runs to prepare, commit and abort: shell commands or a persistent agent.

Shell commands (``--prepare/--commit/--abort``) run with ``sh -c`` in the
participant's directory, the transaction's data as JSON on stdin and
``EDA_TXN_ID``, ``EDA_PARTICIPANT``, ``EDA_PHASE`` and ``EDA_ATTEMPT`` in
their environment.  Prepare exiting 0 votes yes, anything else no; commit
and abort exiting 0 are done, anything else is retried.  A missing command
is a step with nothing to do.

A persistent agent (``--persistent -- CMD``) is started once and speaks JSON
Lines on its stdin and stdout, one request and one reply per line, replies
in the order of the requests::

    -> {"op": "prepare", "txn": "c1.18f...", "participant": "pay", "attempt": 1, "data": {...}}
    <- {"vote": "yes"}                      (or {"vote": "no", "reason": "card declined"})
    -> {"op": "commit", "txn": "c1.18f...", "participant": "pay", "attempt": 1, "data": {...}}
    <- {"ok": true}                         (or {"ok": false, "error": "..."}: retried)

A reply that is not such an object (garbage, a wrong ``txn`` echo) is a
"no" vote or a failed step; an agent that exits or stays silent past the
timeout is restarted, and its pending requests fail the same way.  The
reason says which: an agent that exited is reported with its exit status
and the last line of its stderr (which is passed on to the participant's
stderr as it comes, and its tail kept for this).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UsageError
from ..reqrep import printable

PREPARE, COMMIT, ABORT = "prepare", "commit", "abort"
MAX_LINE = 1 << 20
STDERR_TAIL = 4096  # bytes of an agent's stderr kept to say why it exited
EXIT_WAIT = 1.0  # s: an agent that closed its stdout gets this long to exit and flush stderr


@dataclass
class Call:
    phase: str  # prepare, commit or abort
    txn: str
    data: dict[str, Any]
    attempt: int


@dataclass
class Result:
    ok: bool  # prepare: voted yes; commit/abort: done
    reason: str = ""


class Actions(Protocol):
    def run(self, call: Call) -> Result: ...

    def run_many(self, calls: list[Call]) -> list[Result]: ...

    def close(self) -> None: ...


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class ShellActions:
    """``sh -c`` commands per phase; a command missing is a no-op that succeeds."""

    def __init__(
        self,
        participant: str,
        commands: dict[str, str | None],
        *,
        timeout: float = 10.0,
        cwd: str | None = None,
    ) -> None:
        self.participant = participant
        self.commands = commands
        self.timeout = timeout
        self.cwd = cwd

    def run(self, call: Call) -> Result:
        cmd = self.commands.get(call.phase)
        if not cmd:
            return Result(True)
        env = dict(
            os.environ,
            EDA_TXN_ID=call.txn,
            EDA_PARTICIPANT=self.participant,
            EDA_PHASE=call.phase,
            EDA_ATTEMPT=str(call.attempt),
        )
        data = json.dumps(call.data).encode()
        try:
            proc = subprocess.Popen(
                ["sh", "-c", cmd],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                env=env,
                cwd=self.cwd,
                process_group=0,  # a timeout kills the whole command, children too
            )
        except OSError as exc:
            return Result(False, f"cannot run {call.phase} command: {exc.strerror}")
        try:
            out, _ = proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Result(False, f"{call.phase} command timed out after {self.timeout:g}s")
        if proc.returncode == 0:
            return Result(True)
        said = out.decode(errors="replace").strip().splitlines()[-1:]  # its last line says why
        why = f": {said[0][:200]}" if said else ""
        return Result(False, f"{call.phase} exited {proc.returncode}{why}")

    def run_many(self, calls: list[Call]) -> list[Result]:
        return [self.run(call) for call in calls]

    def close(self) -> None:
        pass


class _StderrTail:
    """Passes an agent's stderr on to ours as it comes, keeping its last bytes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._tail = b""
        self._thread = threading.Thread(target=self._pump, name="eda-agent-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while chunk := os.read(self._fd, 65536):
                with contextlib.suppress(OSError):
                    os.write(2, chunk)  # where the agent's stderr went when inherited
                self._tail = (self._tail + chunk)[-STDERR_TAIL:]
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def last_line(self, wait: float) -> str:
        """The last non-blank line written (after up to *wait* s for the rest to come)."""
        self._thread.join(wait)
        lines = [x for x in self._tail.decode(errors="replace").splitlines() if x.strip()]
        return printable(lines[-1].strip(), 200) if lines else ""


def _status(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class PersistentAgent:
    """A long-running command speaking JSON Lines (see the module's docstring)."""

    def __init__(
        self, participant: str, argv: list[str], *, timeout: float = 10.0, cwd: str | None = None
    ) -> None:
        if not argv:
            raise UsageError("--persistent needs a command after --")
        self.participant = participant
        self.argv = argv
        self.timeout = timeout
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.buffer = b""
        self.restarts = 0
        self._stderr: _StderrTail | None = None
        self._eof = False  # the agent closed its stdout

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(os.environ, EDA_PARTICIPANT=self.participant),
                cwd=self.cwd,
                process_group=0,
            )
        except OSError as exc:
            raise UsageError(f"cannot run {self.argv[0]}: {exc.strerror}") from None
        assert self.proc.stderr is not None
        self._stderr = _StderrTail(os.dup(self.proc.stderr.fileno()))
        self.proc.stderr.close()
        self.buffer = b""
        self._eof = False

    def _exited(self) -> str | None:
        """Why the agent is gone (exit status, last stderr line), or None if it runs."""
        if self.proc is None:
            return None
        if self._eof:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_WAIT)
        returncode = self.proc.poll()
        if returncode is None:
            return "the agent closed its stdout" if self._eof else None
        said = self._stderr.last_line(EXIT_WAIT) if self._stderr is not None else ""
        return f"the agent {_status(returncode)}" + (f": {said}" if said else "")

    def _restart(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
        self.restarts += 1
        self.start()

    def _line(self, deadline: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                return None
            left = deadline - time.monotonic()
            if left <= 0 or not _wait(fd, select.POLLIN, left):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self._eof = True
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def run(self, call: Call) -> Result:
        return self.run_many([call])[0]

    def _write(self, data: bytes, deadline: float) -> bool:
        """Write *data* to the agent by *deadline*, reading its answers meanwhile (an
        agent that answers as it reads cannot fill its stdout and stall both)."""
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        fd, out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        if os.get_blocking(fd):
            os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if _wait(out, select.POLLIN, left, also=(fd, select.POLLOUT)) == out:
                chunk = os.read(out, 65536)
                if not chunk:
                    raise BrokenPipeError("the agent closed its stdout")
                if len(self.buffer) + len(chunk) > 4 * MAX_LINE:
                    return False  # an agent that only writes: treated as not reading
                self.buffer += chunk
        return True

    def run_many(self, calls: list[Call]) -> list[Result]:
        """Send every request at once, then read the replies in order (a pipeline)."""
        if self.proc is None or self.proc.poll() is not None:
            self._restart()
        assert self.proc is not None and self.proc.stdin is not None
        lines = [
            json.dumps(
                {
                    "op": call.phase,
                    "txn": call.txn,
                    "participant": self.participant,
                    "attempt": call.attempt,
                    "data": call.data,
                }
            )
            for call in calls
        ]
        deadline = time.monotonic() + self.timeout
        try:
            written = self._write(("\n".join(lines) + "\n").encode(), deadline)
        except OSError:
            self._eof = True
            why = self._exited() or "the agent exited"
            self._restart()
            return [Result(False, why)] * len(calls)
        if not written:  # an agent that stopped reading: never block the daemon on it
            self._restart()
            why = f"the agent did not read its requests within {self.timeout:g}s"
            return [Result(False, why)] * len(calls)
        results: list[Result] = []
        for call in calls:
            line = self._line(deadline)
            if line is None:
                why = self._exited() or f"the agent did not answer within {self.timeout:g}s"
                self._restart()
                missing = len(calls) - len(results)
                return [*results, *[Result(False, why)] * missing]
            results.append(judge(call, line))
        return results

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc)
            self.proc = None


def _wait(fd: int, events: int, timeout: float, also: tuple[int, int] | None = None) -> int | None:
    """The first of *fd* (for *events*) and *also* (fd, events) ready within *timeout*
    seconds, else None (poll(2): no FD_SETSIZE limit, unlike select)."""
    poller = select.poll()
    poller.register(fd, events | select.POLLHUP | select.POLLERR)
    if also is not None:
        poller.register(also[0], also[1] | select.POLLERR)
    ready = poller.poll(max(1, int(timeout * 1000)))
    if not ready:
        return None
    return next((f for f, _ in ready if f == fd), ready[0][0])


def judge(call: Call, line: bytes) -> Result:
    """An agent's reply line to *call*: anything but a well-formed yes/ok is a no/failure."""
    try:
        reply = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Result(False, "the agent answered garbage")
    if not isinstance(reply, dict) or reply.get("txn", call.txn) != call.txn:
        return Result(False, "the agent answered garbage")
    reason = reply.get("reason", reply.get("error", ""))
    reason = reason[:200] if isinstance(reason, str) else ""
    ok = reply.get("vote") == "yes" if call.phase == PREPARE else reply.get("ok") is True
    if ok:
        return Result(True)
    return Result(False, reason or ("the agent voted no" if call.phase == PREPARE else "failed"))

"""What a participant runs to prepare, commit and abort: shell commands or a persistent agent.

Shell commands (``--prepare/--commit/--abort``) run with ``sh -c`` in the
participant's directory, the transaction's data as JSON on stdin and
``EDA_TXN_ID``, ``EDA_PARTICIPANT``, ``EDA_PHASE`` and ``EDA_ATTEMPT`` in
their environment.  Prepare exiting 0 votes yes, anything else no; commit
and abort exiting 0 are done, anything else is retried.  A missing command
is a step with nothing to do.  A failed step's reason follows
:mod:`eda.core.runner`'s rule (``exit status 1: card declined``: the last
line of its stderr, else of its stdout); its stderr is passed on
to the participant's as it comes.

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
reason says which: an agent that exited is reported by the runner's rule,
``the agent ended: exit status 1: out of memory`` (its stderr is passed on
to the participant's stderr as it comes, and its tail kept for this).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .. import runner
from ..errors import UsageError
from ..lineprocess import LineProcess

PREPARE, COMMIT, ABORT = "prepare", "commit", "abort"
MAX_LINE = 1 << 20
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


def _pass_on(chunk: bytes) -> None:
    """A command's stderr goes on to ours as it comes (its tail is kept for its reason)."""
    with contextlib.suppress(OSError):
        os.write(2, chunk)


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
        try:
            outcome = runner.run(
                runner.shell(cmd), json.dumps(call.data).encode(), timeout=self.timeout,
                env=env, cwd=self.cwd, max_output=MAX_LINE, on_stderr=_pass_on,
            )  # fmt: skip
        except runner.RunError as exc:
            return Result(False, f"cannot run {call.phase} command: {exc}")
        if outcome.ok:
            return Result(True)
        return Result(False, outcome.reason())

    def run_many(self, calls: list[Call]) -> list[Result]:
        return [self.run(call) for call in calls]

    def close(self) -> None:
        pass


class PersistentAgent:
    """A long-running command speaking JSON Lines (see the module's docstring), on
    :class:`eda.core.lineprocess.LineProcess`, waited on by the calling thread."""

    def __init__(
        self, participant: str, argv: list[str], *, timeout: float = 10.0, cwd: str | None = None
    ) -> None:
        if not argv:
            raise UsageError("--persistent needs a command after --")
        self.participant = participant
        self.argv = argv
        self.timeout = timeout
        self.restarts = 0
        self._loop = runner.SelectLoop()
        self._replies: list[bytes] = []
        self._ended: runner.Outcome | None = None  # how it exited, if it did
        self._overflow = False
        self.process = LineProcess(
            argv, self._loop, on_lines=self._replies.extend, on_exit=self._exit,
            on_overflow=self._too_long, on_stderr=_pass_on, max_line=MAX_LINE,
            env=dict(os.environ, EDA_PARTICIPANT=participant), cwd=cwd,
        )  # fmt: skip

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The agent's process while it runs."""
        child = self.process.child
        return child.proc if child is not None else None

    def _exit(self, outcome: runner.Outcome) -> None:
        self._ended = outcome

    def _too_long(self) -> None:
        self._overflow = True

    def start(self) -> None:
        try:
            self.process.start()
        except runner.RunError as exc:
            raise UsageError(str(exc)) from None
        self._replies.clear()
        self._ended, self._overflow = None, False

    def _restart(self) -> None:
        child = self.process.retire()
        if child is not None:  # a silent or stuck agent: SIGTERM, SIGKILL after a grace
            child.stop()
        self.restarts += 1
        self.start()

    def _gone(self) -> str | None:
        """Why the agent is gone (its exit, by the runner's rule), or None if it runs."""
        if self._ended is None and self.process.eof:  # give it a moment to exit
            until = time.monotonic() + EXIT_WAIT
            while self._ended is None and time.monotonic() < until:
                self._loop.step(until - time.monotonic())
            if self._ended is None:
                return "the agent closed its stdout"
        if self._ended is None:
            return None
        return f"the agent ended: {self._ended.reason()}"

    def run(self, call: Call) -> Result:
        return self.run_many([call])[0]

    def run_many(self, calls: list[Call]) -> list[Result]:
        """Send every request at once, then read the replies in order (a pipeline)."""
        if not self.process.running or self._ended is not None:
            self._restart()
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
        self.process.send(("\n".join(lines) + "\n").encode())
        replies = self._replies
        # its replies are read while the requests are written: an agent that answers
        # as it reads cannot fill its stdout and stall both
        while (
            len(replies) < len(calls)
            and self._ended is None
            and not self.process.eof
            and not self._overflow
            and len(replies) <= 4 * len(calls) + 1024  # an agent that only writes
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._loop.step(left)
        results = [judge(call, line) for call, line in zip(calls, replies, strict=False)]
        del replies[: len(results)]
        if len(results) == len(calls):
            return results
        unread = self.process.outbuf  # an agent that stopped reading: never block on it
        if self._overflow:
            why = f"the agent answered a line over {MAX_LINE} bytes"
        elif unread:
            why = f"the agent did not read its requests within {self.timeout:g}s"
        else:
            why = f"the agent did not answer within {self.timeout:g}s"
        why = self._gone() or why
        self._restart()
        return [*results, *[Result(False, why)] * (len(calls) - len(results))]

    def close(self) -> None:
        self.process.close_input(2.0)
        self._loop.close()


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

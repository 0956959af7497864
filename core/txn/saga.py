"""The saga executor: steps in order, compensation in reverse, a durable log, resume.

Running
-------
:func:`start` creates a saga's log and returns a :class:`SagaRun`; :func:`resume`
reopens one; :meth:`SagaRun.run` carries it to an end and returns its status.
Steps run in file order, the members of a parallel group at once (in threads).
A step is tried up to ``retry.attempts`` times, with ``backoff`` doubling and
``jitter`` between tries, each try limited by ``timeout``; the steps after the
pivot are tried until they succeed.  When a step fails for good (its group's
other members finish their current try first), the steps that completed are
compensated in reverse file order -- not the failed step, which did not
complete.  A compensation is retried in the same way; one that fails for good
leaves the saga ``stuck`` and ``--resume`` tries it again, with a fresh budget.

Every action gets the saga data as one JSON object on stdin and, in its
environment, ``EDA_SAGA_ID``, ``EDA_STEP``, ``EDA_SAGA_PHASE`` (``action``
or ``compensate``) -- together the key that makes an action idempotent --
and ``EDA_ATTEMPT`` (1, 2, ... over the whole life of the saga, resumes
included).  A JSON object a step prints on stdout (all of it, or its last
line) is merged into the data (keys of later steps win; the members of a
group see the data as it was when the group started).  Shell
commands run with ``sh -c`` in the directory the saga was started from,
in a session of their own (a timeout kills the whole process group); their
stderr is passed on through :attr:`SagaRun.on_stderr`.

The log
-------
Every record is fsynced before the saga moves on; the records and the state
they describe (what ``eda-txn status`` shows) are specified in :mod:`.sagalog`.

Crash points (``EDA_CRASH_AT=saga:POINT``, :data:`CRASH_POINTS`) sit after
each record is durable: ``saga:after-step-started`` and so on.  Resuming
after a crash anywhere gives the outcome a run without the crash would have
had: a step that was running is run again (its action must be idempotent:
use the ids above); a step whose try failed resumes its retries; a saga
that was compensating goes on compensating.

About 500 lines: the executor as one subject (running, retrying,
compensating, resuming read the same run state); the plan, the file, the
log and the actions are modules of their own (sagaplan, sagafile, sagalog,
sagaactions).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import EdaError, NotFoundError, UsageError
from . import crash, journal
from .sagaactions import (
    Children,
    Invocation,
    Reach,
    Result,
    Runner,
    check_runnable,
    run_call,
    run_publish,
    run_shell,
)
from .sagalog import (
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    DONE,
    FAILED,
    FINISHED,
    PENDING,
    RETRYING,
    RUNNING,
    STEP_COMPENSATED,
    STEP_COMPENSATING,
    STEP_RUNNING,
    STEP_STUCK,
    STUCK,
    TO_COMPENSATE,
    SagaState,
    check_id,
    log_path,
    now_iso,
    read_saga,
    saga_status,
)
from .sagaplan import Action, Plan, Step

# re-exported: the saga API in one import (the log's names come from .sagalog)
__all__ = [
    "COMPENSATED", "COMPENSATING", "COMPLETED", "DONE", "FAILED", "FINISHED", "PENDING",
    "RETRYING", "RUNNING", "STEP_COMPENSATED", "STEP_COMPENSATING", "STEP_RUNNING", "STEP_STUCK",
    "STUCK", "TO_COMPENSATE", "Invocation", "Reach", "Result", "Runner", "SagaState", "check_id",
    "check_runnable", "log_path", "now_iso", "read_saga", "saga_status",
]  # fmt: skip

MAX_DATA = 256 << 10  # the initial data, as JSON

CRASH_POINTS = (
    "after-saga-started",
    "after-step-started",
    "after-step-done",
    "after-step-failed",
    "after-saga-aborting",
    "after-compensation-started",
    "after-compensation",
    "after-compensation-failed",
    "after-saga-stuck",
    "after-saga-resumed",
    "after-saga-completed",
    "after-saga-compensated",
)


class SagaBusy(EdaError):
    """Another process is running this saga now."""


def new_id(name: str) -> str:
    return f"{name[:40]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


# -- the executor -------------------------------------------------------------------------


class Crashed(BaseException):
    """A simulated crash (tests): the run stops on the spot and writes nothing more."""


class SagaRun:
    """One process running (or resuming) one saga: call :meth:`run`, then :meth:`close`."""

    def __init__(
        self,
        lock_fd: int,
        log: journal.Journal,
        state: SagaState,
        *,
        runner: Runner | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_stderr: Callable[[str, bytes], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        crash_hook: Callable[[str], None] | None = None,
        reach: Reach | None = None,
    ) -> None:
        self._lock_fd = lock_fd
        self.log = log
        self.state = state
        self.saga_id = state.saga_id
        self.runner: Runner = runner or self._run_action
        self._builtin = runner is None
        self.on_event = on_event
        self.on_stderr = on_stderr
        self.sleep = sleep
        self.rand = rand
        self.crash_hook = crash_hook
        self.reach = reach or Reach()
        self.repaired = log.repaired
        self.children = Children()
        self._lock = threading.Lock()
        self._dead = False

    @property
    def plan(self) -> Plan:
        assert self.state.plan is not None
        return self.state.plan

    # -- records --
    def _record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Log a record, durable on return; print it; then the crash point after it."""
        rec = self._append(event, **fields)
        self._commit(rec)
        return rec

    def _append(self, event: str, **fields: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"saga": self.saga_id, "event": event, "time": now_iso(), **fields}
        with self._lock:
            if self._dead:
                raise Crashed()
            self.log.append(rec)
            self.state.apply(rec)
        return rec

    def _commit(self, rec: dict[str, Any]) -> None:
        with self._lock:
            if self._dead:
                raise Crashed()
            self.log.sync()
            if self.on_event is not None:
                self.on_event(rec)
        event = rec["event"]
        self._point(f"after-{event}" if event != "compensation-done" else "after-compensation")

    def _point(self, name: str) -> None:
        crash.point("saga", name)
        if self.crash_hook is not None:
            try:
                self.crash_hook(name)
            except BaseException:
                self._dead = True
                raise

    def _try(self, action: Action, step: Step, attempt: int, phase: str, data: bytes) -> Result:
        """Log the start of a try and make it.

        A shell command is started while its start record is being fsynced
        (the record is durable before the command's output is read): one
        fsync less on each step's path.  Other actions start once it is.
        """
        event = "step-started" if phase == "action" else "compensation-started"
        rec = self._append(event, step=step.name, attempt=attempt)
        committed = False

        def commit() -> None:
            nonlocal committed
            if not committed:
                committed = True
                self._commit(rec)

        inv = Invocation(self.saga_id, step.name, attempt, phase, data, self.state.cwd)
        if self._builtin and action.kind == "run":
            result = self._run_action(action, inv, on_spawn=commit)
        else:
            commit()
            result = self.runner(action, inv)
        commit()
        return result

    def _run_action(
        self, action: Action, inv: Invocation, on_spawn: Callable[[], None] | None = None
    ) -> Result:
        if action.kind == "run":
            on_stderr = self.on_stderr
            return run_shell(
                action.target,
                inv,
                action.timeout,
                children=self.children,
                on_stderr=(lambda chunk: on_stderr(inv.step, chunk)) if on_stderr else None,
                on_spawn=on_spawn,
            )
        if action.kind == "publish":
            return run_publish(action, inv, self.reach)
        return run_call(action, inv, self.reach)

    def _data(self) -> bytes:
        with self._lock:
            data = self.state.data()
        return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def _wait(self, delay: float, stop: threading.Event | None) -> None:
        if stop is not None:
            stop.wait(delay)
        elif delay > 0:
            self.sleep(delay)

    # -- forward --
    def _forward(self, step: Step, data: bytes, stop: threading.Event | None) -> bool:
        """Try *step* until it is done (True) or failed for good (False).

        With *stop* set (a group member failed for good), no new try starts:
        the step is then neither done nor failed for good (False).
        """
        st = self.state.steps[step.name]
        action = step.action
        while True:
            if stop is not None and stop.is_set():
                return False
            attempt = st.attempts + 1
            result = self._try(action, step, attempt, "action", data)
            if result.ok:
                fields: dict[str, Any] = {"step": step.name, "attempt": attempt}
                if result.output is not None:
                    fields["output"] = result.output
                if result.note:
                    fields["note"] = result.note
                self._record("step-done", **fields)
                return True
            failures = st.failures + 1
            final = not step.retriable and failures >= action.retry.attempts
            delay = 0.0 if final else action.retry.delay(failures, self.rand())
            fields = {"step": step.name, "attempt": attempt, "error": result.error, "final": final}
            if not final:
                fields["retry_in"] = round(delay, 3)
            if final and stop is not None:  # the others start no new try from now on,
                stop.set()  # not only once this record is durable (an fsync: long on a busy disk)
            self._record("step-failed", **fields)
            if final:
                return False
            self._wait(delay, stop)

    def _stage(self, members: list[Step]) -> None:
        data = self._data()
        if len(members) == 1:
            self._forward(members[0], data, None)
            return
        stop = threading.Event()
        errors: list[BaseException] = []

        def member(step: Step) -> None:
            try:
                self._forward(step, data, stop)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=member, args=(s,), name=f"saga-{s.name}", daemon=True)
            for s in members
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:
            stop.set()
            self._halt()
            for t in threads:  # (their actions are killed: they end at once)
                t.join(5.0)
            raise
        if errors:
            raise errors[0]

    # -- backward --
    def _compensate(self, step: Step) -> bool:
        st = self.state.steps[step.name]
        action = step.compensate
        assert action is not None
        while True:
            attempt = st.comp_attempts + 1
            result = self._try(action, step, attempt, "compensate", self._data())
            if result.ok:
                self._record("compensation-done", step=step.name, attempt=attempt)
                return True
            failures = st.comp_failures + 1
            final = failures >= action.retry.attempts
            delay = 0.0 if final else action.retry.delay(failures, self.rand())
            fields: dict[str, Any] = {
                "step": step.name, "attempt": attempt, "error": result.error, "final": final
            }  # fmt: skip
            if not final:
                fields["retry_in"] = round(delay, 3)
            self._record("compensation-failed", **fields)
            if final:
                return False
            self._wait(delay, None)

    def run(self) -> str:
        """Carry the saga to an end: completed, compensated or stuck (returned)."""
        state = self.state
        try:
            if state.end in FINISHED:
                return state.end
            if state.failed_step is None:
                for stage in self.plan.stages():
                    todo = [s for s in stage if state.steps[s.name].status != DONE]
                    if todo:
                        self._stage(todo)
                    if state.failed_step is not None:
                        break
                else:
                    self._record("saga-completed")
                    return COMPLETED
            failed = state.failed_step
            assert failed is not None
            if not state.aborting:
                self._record("saga-aborting", step=failed, error=state.steps[failed].error)
            # a step left running by a crash (a group member) may have completed: settle it
            for step in self.plan.steps:
                if state.steps[step.name].status == STEP_RUNNING:
                    self._forward(step, self._data(), threading.Event())
            for step in reversed(self.plan.steps):
                st = state.steps[step.name]
                if step.compensate is None or st.status not in TO_COMPENSATE:
                    continue
                # (stuck: its last try was logged as final, then the process died)
                if st.status == STEP_STUCK or not self._compensate(step):
                    self._record("saga-stuck", step=step.name, error=st.error)
                    return STUCK
            self._record("saga-compensated", step=failed)
            return COMPENSATED
        except BaseException:
            self._halt()
            raise

    def _halt(self) -> None:
        """Interrupted (or crashed): write nothing more, kill the running actions.

        A try cut short this way is not a failed try: it is not logged, and a
        resume runs the step again."""
        with self._lock:
            self._dead = True
        self.children.kill_all()

    def close(self) -> None:
        self.log.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # (releases the run lock)
            self._lock_fd = -1

    def __enter__(self) -> SagaRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(fd: int, saga_id: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SagaBusy(f"saga {saga_id} is being run by another process") from None


def start(
    plan: Plan,
    data: dict[str, Any],
    log_dir: str | os.PathLike[str],
    *,
    saga_id: str | None = None,
    cwd: str | None = None,
    **options: Any,
) -> SagaRun:
    """Log a new saga (``saga-started``, durable) and return its run.

    *options* go to :class:`SagaRun` (runner, on_event, sleep, crash_hook...).
    """
    if not isinstance(data, dict):
        raise UsageError("the saga data must be a JSON object")
    encoded = json.dumps(data, ensure_ascii=False, allow_nan=False)
    if len(encoded) > MAX_DATA:
        raise UsageError(f"the saga data is {len(encoded)} bytes of JSON, over {MAX_DATA}")
    saga_id = check_id(saga_id) if saga_id else new_id(plan.name)
    path = log_path(log_dir, saga_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _lock(fd, saga_id)
    if os.fstat(fd).st_size > 0:
        os.close(fd)
        raise UsageError(
            f"saga {saga_id} exists already in {path.parent}; continue it with --resume"
        )
    log = journal.open_journal(path)
    state = SagaState()
    run = SagaRun(fd, log, state, **options)
    run.saga_id = saga_id
    try:
        run._record(
            "saga-started",
            name=plan.name,
            plan=plan.to_dict(),
            data=data,
            cwd=cwd or os.getcwd(),
        )
    except BaseException:
        run.close()
        raise
    return run


def resume(log_dir: str | os.PathLike[str], saga_id: str, **options: Any) -> SagaRun:
    """Reopen saga *saga_id* (its torn tail cut: :attr:`SagaRun.repaired`) to go on."""
    path = log_path(log_dir, check_id(saga_id))
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise NotFoundError(f"no saga {saga_id!r} in {path.parent}") from None
    _lock(fd, saga_id)
    try:
        log = journal.open_journal(path)
    except BaseException:
        os.close(fd)
        raise
    try:
        state = SagaState.from_records(log.records)
    except (KeyError, TypeError, ValueError, StopIteration) as exc:
        log.close()
        os.close(fd)
        raise journal.CorruptJournal(f"{path}: not a saga log ({exc})") from None
    if state.plan is None:
        log.close()
        os.close(fd)
        raise NotFoundError(f"saga {saga_id} never started (its log {path} is empty)")
    if state.end not in FINISHED and state.cwd and not os.path.isdir(state.cwd):
        log.close()
        os.close(fd)
        raise EdaError(
            f"saga {saga_id} runs its steps in {state.cwd}, which is gone: restore it to resume"
        )
    run = SagaRun(fd, log, state, **options)
    if state.end not in FINISHED:
        try:
            run._record("saga-resumed", **{"from": state.status})
        except BaseException:
            run.close()
            raise
    return run

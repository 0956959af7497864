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

The log (for ``eda-txn status`` and ``jq``)
-------------------------------------------
One file per saga, ``<log dir>/sagas/<id>.jsonl``, JSON Lines, each record
fsynced before the saga moves on (:mod:`.journal`; a shell command's start
record is fsynced while the command starts, before its outcome is read).  Every record has
``saga`` (the id), ``event`` and ``time`` (ISO 8601, UTC); by event:

=======================  ================================================================
``saga-started``         ``name``, ``plan`` (the checked saga file, so a resume does not
                         depend on the file), ``data`` (the initial data), ``cwd``
``step-started``         ``step``, ``attempt``
``step-done``            ``step``, ``attempt``, ``output`` (the JSON object merged, or
                         absent), ``note`` (why stdout was not merged, if it was JSON)
``step-failed``          ``step``, ``attempt``, ``error``, ``final`` (true: no more
                         tries), ``retry_in`` (seconds, when not final)
``saga-aborting``        ``step`` (the step that failed for good), ``error``
``compensation-started`` ``step``, ``attempt``
``compensation-done``    ``step``, ``attempt``
``compensation-failed``  ``step``, ``attempt``, ``error``, ``final``, ``retry_in``
``saga-resumed``         ``from`` (the status it resumed from)
``saga-completed``       (end: every step done; exit status 0)
``saga-compensated``     ``step`` (the failed step; end: exit status 5)
``saga-stuck``           ``step`` (whose compensation failed for good), ``error`` (exit 1)
=======================  ================================================================

:func:`saga_status` folds every log into one summary per saga (``status`` is
``running``, ``compensating``, ``completed``, ``compensated`` or ``stuck``;
``active`` tells whether a process is running it now, from the log's lock).
The same records are what ``eda-txn saga`` prints on stdout.

Crash points (``EDA_CRASH_AT=saga:POINT``, :data:`CRASH_POINTS`) sit after
each record is durable: ``saga:after-step-started`` and so on.  Resuming
after a crash anywhere gives the outcome a run without the crash would have
had: a step that was running is run again (its action must be idempotent:
use the ids above); a step whose try failed resumes its retries; a saga
that was compensating goes on compensating.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
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
from .sagafile import Action, Plan, Step

__all__ = ["Invocation", "Reach", "Result", "Runner", "check_runnable"]  # (re-exported for callers)

SAGAS = "sagas"  # the subdirectory of the log directory
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_DATA = 256 << 10  # the initial data, as JSON

# statuses of a saga
RUNNING, COMPENSATING = "running", "compensating"
COMPLETED, COMPENSATED, STUCK = "completed", "compensated", "stuck"
FINISHED = (COMPLETED, COMPENSATED)

# statuses of a step
PENDING, STEP_RUNNING, RETRYING, DONE, FAILED = "pending", "running", "retrying", "done", "failed"
STEP_COMPENSATING, STEP_COMPENSATED, STEP_STUCK = "compensating", "compensated", "stuck"
TO_COMPENSATE = (DONE, STEP_COMPENSATING, STEP_STUCK)  # a step in these has taken effect

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


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def new_id(name: str) -> str:
    return f"{name[:40]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def log_path(log_dir: str | os.PathLike[str], saga_id: str) -> Path:
    return Path(log_dir) / SAGAS / f"{saga_id}.jsonl"


def check_id(saga_id: str) -> str:
    if not ID.fullmatch(saga_id):
        raise UsageError(
            f"invalid saga id {saga_id!r}: letters, digits, '.', '_', '-' (at most 128)"
        )
    return saga_id


# -- the state a log describes ------------------------------------------------------------


@dataclass
class StepState:
    status: str = PENDING
    attempts: int = 0  # tries started; the last one's EDA_ATTEMPT
    failures: int = 0  # tries failed
    output: dict[str, Any] | None = None
    comp_attempts: int = 0
    comp_failures: int = 0  # since the saga last resumed from stuck
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "attempts": self.attempts}
        if self.comp_attempts:
            out["compensation_attempts"] = self.comp_attempts
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class SagaState:
    """What a saga's log says: fold its records in with :meth:`apply`."""

    saga_id: str = ""
    plan: Plan | None = None
    initial: dict[str, Any] = field(default_factory=dict)
    cwd: str = ""
    steps: dict[str, StepState] = field(default_factory=dict)
    failed_step: str | None = None  # the step that failed for good
    aborting: bool = False  # saga-aborting written
    end: str | None = None  # completed, compensated, stuck
    stuck_step: str | None = None
    started: str = ""
    updated: str = ""

    @property
    def status(self) -> str:
        if self.end is not None:
            return self.end
        return COMPENSATING if self.failed_step is not None else RUNNING

    def apply(self, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        self.updated = str(rec.get("time", self.updated))
        if event == "saga-started":
            self.saga_id = str(rec.get("saga", ""))
            self.plan = Plan.from_dict(rec["plan"])
            self.initial = dict(rec.get("data") or {})
            self.cwd = str(rec.get("cwd", ""))
            self.steps = {s.name: StepState() for s in self.plan.steps}
            self.started = self.updated
            return
        step = self.steps.get(str(rec.get("step", "")))
        if event == "step-started" and step is not None:
            step.status, step.attempts = STEP_RUNNING, int(rec["attempt"])
        elif event == "step-done" and step is not None:
            step.status, step.error = DONE, ""
            out = rec.get("output")
            step.output = out if isinstance(out, dict) else None
        elif event == "step-failed" and step is not None:
            step.failures += 1
            step.error = str(rec.get("error", ""))
            if rec.get("final"):
                step.status = FAILED
                if self.failed_step is None:
                    self.failed_step = str(rec["step"])
            else:
                step.status = RETRYING
        elif event == "saga-aborting":
            self.aborting = True
            if self.failed_step is None:
                self.failed_step = str(rec.get("step", ""))
        elif event == "compensation-started" and step is not None:
            step.status, step.comp_attempts = STEP_COMPENSATING, int(rec["attempt"])
        elif event == "compensation-done" and step is not None:
            step.status, step.error = STEP_COMPENSATED, ""
        elif event == "compensation-failed" and step is not None:
            step.comp_failures += 1
            step.error = str(rec.get("error", ""))
            if rec.get("final"):
                step.status = STEP_STUCK
        elif event == "saga-stuck":
            self.end, self.stuck_step = STUCK, str(rec.get("step", ""))
        elif event == "saga-resumed":
            if self.end == STUCK:
                self.end = None
                for st in self.steps.values():
                    if st.status == STEP_STUCK:
                        st.status = DONE  # to be compensated again, with a fresh budget
                        st.comp_failures = 0
        elif event == "saga-completed":
            self.end = COMPLETED
        elif event == "saga-compensated":
            self.end = COMPENSATED

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> SagaState:
        state = cls()
        for rec in records:
            state.apply(rec)
        return state

    def data(self) -> dict[str, Any]:
        """The initial data with the output of every step that completed, in file order."""
        data = dict(self.initial)
        if self.plan is not None:
            for step in self.plan.steps:
                out = self.steps[step.name].output
                if out:
                    data.update(out)
        return data

    def current_step(self) -> str | None:
        """The step a reader wants to know about: stuck, failed, or the latest one moving."""
        if self.stuck_step and self.end == STUCK:
            return self.stuck_step
        if self.failed_step:
            return self.failed_step
        if self.plan is None:
            return None
        moving = [
            s.name
            for s in self.plan.steps
            if self.steps[s.name].status in (STEP_RUNNING, RETRYING, STEP_COMPENSATING)
        ]
        return moving[-1] if moving else None

    def summary(self) -> dict[str, Any]:
        step = self.current_step()
        return {
            "kind": "saga",
            "id": self.saga_id,
            "name": self.plan.name if self.plan else "",
            "status": self.status,
            "step": step,
            "error": self.steps[step].error if step and step in self.steps else "",
            "started": self.started,
            "updated": self.updated,
            "steps": {name: st.to_dict() for name, st in self.steps.items()},
        }


def _locked(path: Path) -> bool:
    """Whether a process holds the run lock of the saga log at *path*."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def saga_status(log_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One summary per saga logged under *log_dir*, oldest first (see the module doc).

    Each has ``kind`` ("saga"), ``id``, ``name``, ``status``, ``active``,
    ``step`` and ``error`` (the step that matters now and its last error),
    ``started``, ``updated``, ``steps`` (name -> {status, attempts, ...}) and
    ``log`` (the file).  A log damaged before its end gets status ``damaged``.
    """
    out: list[dict[str, Any]] = []
    folder = Path(log_dir) / SAGAS
    if not folder.is_dir():
        return out
    for path in folder.glob("*.jsonl"):
        try:
            state = SagaState.from_records(journal.read(path))
        except (journal.CorruptJournal, KeyError, TypeError, ValueError) as exc:
            out.append(
                {"kind": "saga", "id": path.stem, "status": "damaged", "error": str(exc),
                 "log": str(path), "active": False, "started": "", "updated": ""}
            )  # fmt: skip
            continue
        if state.plan is None:
            continue  # created, never started (a crash before its first record)
        summary = state.summary()
        summary["active"] = state.end is None and _locked(path)
        summary["log"] = str(path)
        out.append(summary)
    out.sort(key=lambda s: (s["started"], s["id"]))
    return out


def read_saga(log_dir: str | os.PathLike[str], saga_id: str) -> SagaState:
    """The state of one saga (NotFoundError when there is no such log)."""
    path = log_path(log_dir, check_id(saga_id))
    if not path.exists():
        raise NotFoundError(f"no saga {saga_id!r} in {Path(log_dir) / SAGAS}")
    return SagaState.from_records(journal.read(path))


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
            self._record("step-failed", **fields)
            if final:
                if stop is not None:
                    stop.set()
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

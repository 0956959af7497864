"""A saga's log: its records, and the state they describe (for ``eda-txn status`` and ``jq``).

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

The executor (:mod:`.saga`) writes these records and folds them back in with
:class:`SagaState` when it resumes; ``eda-txn status`` reads them here
without loading the executor.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, UsageError
from . import journal
from .sagaplan import Plan

SAGAS = "sagas"  # the subdirectory of the log directory
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# statuses of a saga
RUNNING, COMPENSATING = "running", "compensating"
COMPLETED, COMPENSATED, STUCK = "completed", "compensated", "stuck"
FINISHED = (COMPLETED, COMPENSATED)

# statuses of a step
PENDING, STEP_RUNNING, RETRYING, DONE, FAILED = "pending", "running", "retrying", "done", "failed"
STEP_COMPENSATING, STEP_COMPENSATED, STEP_STUCK = "compensating", "compensated", "stuck"
TO_COMPENSATE = (DONE, STEP_COMPENSATING, STEP_STUCK)  # a step in these has taken effect


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


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

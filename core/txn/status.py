"""Where transactions stand, read from the journals of a log directory (``eda-txn status``).

A log directory holds ``coordinator-NAME.jsonl`` and ``participant-NAME.jsonl``
journals (2PC) and the saga executor's logs (``sagas/ID.jsonl``).  Reading never changes a file
(a torn tail is left for its owner to cut), so status works while the
daemons run and after they died.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import NotFoundError
from .journal import CorruptJournal, read
from .participant import IN_DOUBT, replay

FINAL = ("committed", "aborted")
ACTION_OF = {"committing": "commit", "aborting": "abort"}


def _row(rows: dict[str, dict[str, Any]], txn: str) -> dict[str, Any]:
    row = rows.get(txn)
    if row is None:
        row = rows[txn] = {
            "txn": txn,
            "kind": "2pc",
            "state": "unknown",
            "coordinator": txn.partition(".")[0],
            "decision": None,
            "participants": {},
            "reason": "",
            "hazards": [],
            "notes": [],
            "time": None,
        }
    return row


def _when(row: dict[str, Any], record: dict[str, Any]) -> None:
    t = record.get("time")
    if isinstance(t, int | float) and (row["time"] is None or t < row["time"]):
        row["time"] = t


def twopc(log_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per 2PC transaction in *log_dir*, oldest first, and the problems met reading."""
    base = Path(log_dir)
    rows: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    done: set[str] = set()
    for path in sorted(base.glob("coordinator-*.jsonl")):
        try:
            records = list(read(path))
        except CorruptJournal as exc:
            problems.append(f"{path}: {exc}")
            continue
        for record in records:
            txn = record.get("txn")
            if not isinstance(txn, str):
                continue
            row = _row(rows, txn)
            row["coordinator"] = path.stem.removeprefix("coordinator-")
            _when(row, record)
            state = record.get("state")
            if state in FINAL:
                row["decision"] = state
                row["reason"] = str(record.get("reason", ""))
                for name in record.get("participants") or {}:
                    row["participants"].setdefault(str(name), "unknown")
            elif state == "done":
                done.add(txn)
            if record.get("hazard"):
                row["hazards"].append(str(record["hazard"]))
    for path in sorted(base.glob("participant-*.jsonl")):
        name = path.stem.removeprefix("participant-")
        try:
            txns = replay(list(read(path)))
        except CorruptJournal as exc:
            problems.append(f"{path}: {exc}")
            continue
        for txn, record in txns.items():
            row = _row(rows, txn)
            _when(row, record)
            state = str(record.get("state", "unknown"))
            row["participants"][name] = state
            if state in IN_DOUBT and record.get("in_doubt"):
                row["notes"].append(f"{name}: {record['in_doubt']}")
            if state in ("committing", "aborting") and record.get("error"):
                row["notes"].append(f"{name}: {ACTION_OF[state]} failing: {record['error']}")
            if state == "hazard":
                row["hazards"].append(name)
    for txn, row in rows.items():
        row["state"] = overall(row, txn in done)
        row["hazards"] = sorted(set(row["hazards"]))
    ordered = sorted(rows.values(), key=lambda r: (r["time"] or 0, r["txn"]))
    return ordered, problems


def overall(row: dict[str, Any], done: bool) -> str:
    """One word for a transaction: hazard, in-doubt, committing, committed, aborting, aborted."""
    states = set(row["participants"].values())
    if row["hazards"] or "hazard" in states:
        return "hazard"
    decision = row["decision"]
    if states & IN_DOUBT and any("in doubt" in str(n) for n in row["notes"]):
        # waiting for a coordinator that does not answer
        return "in-doubt"
    if decision in FINAL:
        # "unknown": a participant whose journal is not here (another host, or never
        # reached): only the coordinator's done record says it acknowledged
        settled = done or states == {decision}
        return decision if settled else {"committed": "committing", "aborted": "aborting"}[decision]
    if states & IN_DOUBT:
        return "in-doubt"
    if states and states <= {"aborted", "aborting", "unknown"}:
        return "aborted"
    return "unknown"


def sagas(log_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the sagas in *log_dir* (``DIR/sagas/ID.jsonl``), in the shape of the 2PC ones.

    The saga logs (:mod:`eda.core.txn.sagalog`, without the executor) are
    summarized by ``saga_status(log_dir)``; each summary keeps its own fields
    and gains ``txn`` (its id), ``state`` (its status), ``reason`` and ``time``.
    """
    try:
        module = importlib.import_module(f"{__package__}.sagalog")
    except ImportError:
        return [], []
    summarize = getattr(module, "saga_status", None)
    if not callable(summarize):
        return [], []
    try:
        summaries = list(summarize(log_dir))
    except (OSError, CorruptJournal) as exc:
        return [], [f"sagas: {exc}"]
    rows = []
    for summary in summaries:
        steps = summary.get("steps")
        rows.append(
            {
                **summary,
                "txn": summary.get("id"),
                "kind": "saga",
                "state": summary.get("status"),
                "reason": summary.get("error") or "",
                "steps": {
                    str(name): step.get("status") if isinstance(step, dict) else step
                    for name, step in (steps.items() if isinstance(steps, dict) else ())
                },
                "time": _epoch(summary.get("started")),
            }
        )
    return rows, []


def _epoch(stamp: object) -> float | None:
    if isinstance(stamp, int | float):
        return float(stamp)
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def everything(log_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """2PC transactions and sagas together, oldest first."""
    rows, problems = twopc(log_dir)
    more, more_problems = sagas(log_dir)
    both = sorted(rows + more, key=lambda r: (r.get("time") or 0, str(r.get("txn"))))
    return both, problems + more_problems


# where a transaction or a saga ends: nothing changes it any more but an operator
ENDED = ("committed", "aborted", "hazard", "completed", "compensated", "stuck", "damaged")


def find(log_dir: str | os.PathLike[str], txn_id: str) -> tuple[dict[str, Any], list[str]]:
    """The row of transaction or saga *txn_id* (NotFoundError when the journals
    of *log_dir* have none), and the problems met reading them."""
    rows, problems = everything(log_dir)
    for row in rows:
        if row.get("txn") == txn_id:
            return row, problems
    raise NotFoundError(f"no transaction or saga {txn_id} in {log_dir}")


def _signature(base: Path) -> list[tuple[str, int, int]]:
    """What changes when a journal of *base* does (its files' names, sizes and times)."""
    seen = []
    for path in [*base.glob("*.jsonl"), *base.glob("sagas/*.jsonl")]:
        try:
            st = path.stat()
        except OSError:
            continue
        seen.append((str(path), st.st_size, st.st_mtime_ns))
    return sorted(seen)


def follow(
    log_dir: str | os.PathLike[str],
    txn_id: str,
    *,
    interval: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Changes of transaction or saga *txn_id* as its journals record them (as
    ``temporal workflow show --follow``): first where each participant or step
    stands, then one record per change -- ``{txn, kind, step, status, state,
    time}`` for a participant or a step, ``{txn, kind, state, time}`` for the
    whole -- until it ends (:data:`ENDED`).  The journals are read again only when
    one changed; NotFoundError at once when there is no *txn_id*.
    """
    base = Path(log_dir)
    parts: dict[str, Any] = {}
    state: Any = None
    signature: list[tuple[str, int, int]] | None = None
    while True:
        now = _signature(base)
        if now != signature:
            signature = now
            try:
                row, _ = find(log_dir, txn_id)
            except NotFoundError:
                if state is None:
                    raise
                row = None  # gone while followed (compacted): wait for it
            if row is not None:
                stamp = time.time()
                kind = row.get("kind")
                current = row.get("participants") or row.get("steps") or {}
                for name, status in current.items() if isinstance(current, dict) else ():
                    if parts.get(name) != status:
                        parts[name] = status
                        yield {"txn": txn_id, "kind": kind, "step": name, "status": status,
                               "state": row.get("state"), "time": stamp}  # fmt: skip
                if row.get("state") != state:
                    state = row.get("state")
                    yield {"txn": txn_id, "kind": kind, "state": state, "time": stamp}
                if state in ENDED:
                    return
        sleep(interval)

"""Where transactions stand, read from the journals of a log directory (``eda-txn status``).

A log directory holds ``coordinator-NAME.jsonl`` and ``participant-NAME.jsonl``
journals (2PC) and the saga executor's logs.  Reading never changes a file
(a torn tail is left for its owner to cut), so status works while the
daemons run and after they died.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .journal import CorruptJournal, read
from .participant import IN_DOUBT, replay

FINAL = ("committed", "aborted")


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
    if states & IN_DOUBT and row["notes"]:  # waiting for a coordinator that does not answer
        return "in-doubt"
    if decision in FINAL:
        settled = done or all(s in (decision, "unknown") for s in states)
        return decision if settled else {"committed": "committing", "aborted": "aborting"}[decision]
    if states & IN_DOUBT:
        return "in-doubt"
    if states and states <= {"aborted", "aborting", "unknown"}:
        return "aborted"
    return "unknown"


def sagas(log_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the sagas in *log_dir*: the hook for the saga executor.

    When :mod:`eda.core.txn.saga` provides ``status_rows(log_dir)`` (returning
    rows with at least ``txn``, ``kind`` = "saga" and ``state``), its rows
    are shown with the 2PC ones.
    """
    try:
        from . import saga  # type: ignore[attr-defined]
    except ImportError:
        return [], []
    status_rows = getattr(saga, "status_rows", None)
    if not callable(status_rows):
        return [], []
    try:
        return list(status_rows(log_dir)), []
    except (OSError, CorruptJournal) as exc:
        return [], [f"sagas: {exc}"]


def everything(log_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, problems = twopc(log_dir)
    more, more_problems = sagas(log_dir)
    return rows + more, problems + more_problems

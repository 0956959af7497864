"""Settling transactions in doubt by hand (``eda-txn resolve``): which participants
to ask, from their journals, and what their answers hold.

A participant's journal (``participant-NAME.jsonl`` in the log directory)
records where it listens and the state of each transaction; a participant
in doubt about a transaction *wanted* is asked to apply the operator's outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .journal import read
from .participant import replay


def objects(value: object) -> list[dict[str, Any]]:
    """The objects of a list from a reply (anything else: nothing)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def resolved_rows(reply: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """One row per transaction participant *name* says it settled."""
    return [
        {"txn": item.get("txn"), "participant": name, "state": item.get("state")}
        for item in objects(reply.get("resolved"))
    ]


def in_doubt(
    log_dir: str, wanted: Callable[[str, dict[str, Any]], bool], names: tuple[str, ...]
) -> dict[str, str]:
    """Endpoints of the participants of *log_dir* with a transaction *wanted*, or of *names*."""
    found: dict[str, str] = {}
    for path in sorted(Path(log_dir).glob("participant-*.jsonl")):
        name = path.stem.removeprefix("participant-")
        if names and name not in names:
            continue
        records = list(read(path))
        endpoint = next(
            (r["endpoint"] for r in reversed(records) if isinstance(r.get("endpoint"), str)), None
        )
        if endpoint is None:
            continue
        if names or any(wanted(t, r) for t, r in replay(records).items()):
            found[name] = endpoint  # a participant named is asked whatever its log says
    return found

"""Settling transactions in doubt by hand (``eda-txn resolve``): which participants
to ask, from their journals, and what their answers hold.

A participant's journal (``participant-NAME.jsonl`` in the log directory)
records where it listens and the state of each transaction; a participant
in doubt about a transaction *wanted* is asked to apply the operator's outcome.
Secure mode: the journal records the participant's public key too, pinned
when this program trusts it (a participant found by name comes with the key
its lookup pinned); a participant refusing this key is one error line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import reqrep, security
from ..endpoint import Endpoint
from ..errors import EdaError, NotFoundError
from .directory import pin_trusted
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
        start = next((r for r in reversed(records) if isinstance(r.get("endpoint"), str)), None)
        if start is None:
            continue
        if names or any(wanted(t, r) for t, r in replay(records).items()):
            found[name] = start["endpoint"]  # a participant named is asked whatever its log says
            pin_trusted(start["endpoint"], start.get("key"))
    return found


class ParticipantClient(reqrep.Client):
    """Requests to one participant (its refusals name it: "the participant at ...")."""

    what = "participant"


def whom(
    log_dir: str,
    txn_id: str | None,
    coordinator: str | None,
    names: tuple[str, ...],
    directory: Any,
) -> dict[str, str]:
    """Endpoints of the participants to ask: those of *log_dir* in doubt about
    *txn_id* (or, without one, about a transaction of *coordinator*, or any),
    and *names* found by *directory* (a :class:`~eda.core.txn.directory.Directory`).
    NotFoundError for a name nobody has; EdaError when a registry did not answer."""

    def wanted(txn: str, record: dict[str, Any]) -> bool:
        if record.get("state") != "prepared":
            return False
        if txn_id is not None:
            return txn == txn_id
        return coordinator is None or txn.partition(".")[0] == coordinator

    targets = in_doubt(log_dir, wanted, names)
    for name in names:
        if name not in targets:
            found = directory.endpoints(name)
            if not found:  # no answer from a registry is not "not found" (exit 1, not 3)
                missing = NotFoundError if name not in directory.lookups.failed else EdaError
                raise missing(directory.missing(name))
            targets[name] = found[0]
    return targets


def settle(
    name: str, endpoint: str, request: dict[str, Any], timeout: float | None = None
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Ask participant *name* at *endpoint* to apply *request* (one transaction, or
    every one a selection matches, a page per answer): per answer, the rows it
    settled and the transactions it failed to.  *timeout*: how long to wait for
    each answer (default 15 s for one transaction, 60 s for a page of a selection).
    EdaError when it cannot be asked (nothing listens: said at once, not after the
    request's timeout)."""
    one = request.get("txn")
    if not reqrep.tcp_reachable(endpoint, 1.0):
        raise EdaError(f"nothing listens at {endpoint} (is the participant running?)")
    where = Endpoint.from_peer(endpoint)
    if security.active() is not None and (where is None or reqrep.pinned_key(where) is None):
        raise EdaError(f"no trusted key is known for the participant at {endpoint}")
    if timeout is None:
        timeout = 15.0 if one is not None else 60.0
    client = ParticipantClient([endpoint], timeout=timeout)
    try:
        while True:
            reply = client.request(dict(request))
            if one is not None:
                yield [{"txn": one, "participant": name, "state": reply.get("state")}], []
                return
            done = resolved_rows(reply, name)
            yield done, objects(reply.get("failed"))
            if not done or not reply.get("more"):
                return
    finally:
        client.close()

"""What the 2PC coordinator and participants say to each other: the messages and their checks.

Both sides speak the JSON request/reply of :mod:`eda.core.reqrep` (one JSON
object per frame, ``op`` and ``rid`` in, ``ok`` and ``rid`` out; here a
message may carry several requests, one per frame, answered alike):

=============  ============================================  ===============================
to             request                                       reply
=============  ============================================  ===============================
coordinator    ``commit`` participants, data, timeout        txn, outcome, votes, reason
coordinator    ``outcome`` txn (a participant in doubt)      outcome: commit|abort|pending
participant    ``prepare`` txn, data, coordinator, reply_to  vote: yes|no, reason
participant    ``decide`` txn, outcome: commit|abort         done, hazard (an ack)
participant    ``resolve`` txn, outcome (an operator)        state
participant    ``resolve`` outcome, a filter (no txn: see    resolved, failed, more
               ``Filter``)
both           ``stats``                                     counters (fsyncs, outcomes...)
=============  ============================================  ===============================

This module holds the names, limits and checks of those fields (every field
from a peer goes through one of them: CONVENTIONS.md §7).  The pieces both
daemons share live next to it, one subject each:

- :mod:`.service`: :class:`~.service.BatchService`, answering a drained batch
  of requests after one journal fsync (group commit), replies deferred;
- :mod:`.peers`: :class:`~.peers.Peer` and :class:`~.peers.Peers`, asking
  other daemons from inside a poll loop without blocking it;
- :mod:`.directory`: finding a participant or a coordinator by name
  (explicit endpoints, else the registry, else mDNS) and staying findable
  (:class:`~.directory.Registration`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from ..endpoint import Endpoint
from ..errors import EdaError, ProtocolError, UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,49}")
TXN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,49}\.[0-9a-f]{4,32}")
MAX_PARTICIPANTS = 64
MAX_DATA = 32768  # bytes of a transaction's data as JSON (UTF-8)
MAX_FRAME = 8 * MAX_DATA  # bytes of one request frame (bigger ones drop the connection)
COORDINATOR_SERVICE = "txn-coordinator"
COMMIT, ABORT, PENDING = "commit", "abort", "pending"
DEFER = "__deferred__"  # a handler's reply meaning "answered later"
MAX_BATCH = 256  # requests in one message (its frames); more are dropped
MAX_RESOLVE = 1_000  # transactions one filtered resolve request settles (the rest: ask again)
PREPARED = "prepared"  # a participant's state once it voted yes: in doubt
PHASE_TWO_RETRY = 0.1  # s: a decision not acknowledged is sent again after this (then doubling)
# s: the longest a participant's ack waits for another fsync to share (half the first retry,
# so that an ack held back is never the reason a decision is sent again)
ACK_LINGER = PHASE_TWO_RETRY / 2

Log = Callable[[str], None]


def quiet(_message: str) -> None:
    """A :data:`Log` that says nothing (the daemons' default)."""


class TxnError(EdaError):
    """A transaction request that cannot be carried out."""


def check_name(name: object, what: str = "name") -> str:
    """A participant or coordinator name: letters, digits and '-', at most 50."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = str(name)[:60] if isinstance(name, str) else type(name).__name__
        raise UsageError(f"bad {what} {shown!r}: use 1-50 letters, digits and '-'")
    return name


def check_txn(txn: object) -> str:
    """A transaction id as coordinators make them: ``COORDINATOR.HEX``."""
    if not isinstance(txn, str) or not TXN_RE.fullmatch(txn):
        shown = str(txn)[:60] if isinstance(txn, str) else type(txn).__name__
        raise ProtocolError(f"bad transaction id {shown!r}")
    return txn


def owner_of(txn: str) -> str:
    """The name of the coordinator that made transaction id *txn*."""
    return txn.partition(".")[0]


def new_txn_id(coordinator: str) -> str:
    """A fresh id: unique across restarts (time and randomness), sortable by time."""
    # os.urandom(n).hex() is what secrets.token_hex(n) returns, without importing hmac and
    # OpenSSL (_hashlib) into every one-shot eda-txn commit (tests/test_startup.py)
    return f"{coordinator}.{int(time.time() * 1000):011x}{os.urandom(3).hex()}"


def data_json(data: object) -> str:
    """A transaction's data (a JSON object of bounded size) as compact JSON text."""
    if not isinstance(data, dict):
        raise ProtocolError("data must be a JSON object")
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ProtocolError("data is not valid JSON") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # JSON may spell a lone surrogate (\ud800): not UTF-8
        raise ProtocolError("data is not valid UTF-8 (a lone surrogate)") from None
    if size > MAX_DATA:
        raise ProtocolError(f"data of {size} bytes (as JSON) is over {MAX_DATA}")
    return text


def check_data(data: object) -> dict[str, Any]:
    """A transaction's data: a JSON object of bounded size."""
    data_json(data)
    return data  # type: ignore[return-value]


def printable(text: object, limit: int = 300) -> str:
    """*text* from a peer or an action, cut to *limit* characters, with newlines and
    other control characters escaped (``\\n``, ``\\x1b``): it cannot forge an output line
    or drive a terminal."""
    text = str(text)[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_reply_to(value: object) -> str:
    """A coordinator's endpoint as a prepare names it (``tcp://HOST:PORT``; see
    :meth:`~eda.core.endpoint.Endpoint.from_peer`), as ZeroMQ takes it."""
    checked = _reply_to.get(value) if isinstance(value, str) else None
    if checked is not None:  # every prepare of a coordinator names the same one
        return checked
    endpoint = Endpoint.from_peer(value)
    if endpoint is None:
        raise ProtocolError(f"bad coordinator endpoint {printable(value, 80)!r}")
    if len(_reply_to) >= MAX_REPLY_TO:  # endpoints made up by peers: bounded
        _reply_to.clear()
    _reply_to[str(value)] = endpoint.zmq
    return endpoint.zmq


MAX_REPLY_TO = 256  # coordinator endpoints remembered as checked
_reply_to: dict[str, str] = {}  # a prepare's reply_to -> the endpoint, checked


def check_outcome(value: object) -> str:
    if value not in (COMMIT, ABORT):
        raise ProtocolError("outcome must be 'commit' or 'abort'")
    return str(value)


def check_participants(value: object) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_PARTICIPANTS:
        raise ProtocolError(f"participants must be a list of 1-{MAX_PARTICIPANTS} names")
    names = [check_name(n, "participant name") for n in value]
    if len(set(names)) != len(names):
        raise ProtocolError("a participant is named twice")
    return names


def check_timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ProtocolError("timeout must be a number of seconds in (0, 3600]")
    return float(value)


class Filter:
    """Which in-doubt transactions a filtered ``resolve`` settles: all those (state
    ``prepared``) of *coordinator*, prepared at least *older_than* seconds ago, whose
    coordinator did not answer (*unanswered*); each given condition must hold."""

    def __init__(
        self,
        coordinator: str | None = None,
        older_than: float | None = None,
        unanswered: bool = False,
        limit: int = MAX_RESOLVE,
    ) -> None:
        self.coordinator = coordinator
        self.older_than = older_than
        self.unanswered = unanswered
        self.limit = limit

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Filter:
        coordinator = req.get("coordinator")
        if coordinator is not None:
            coordinator = check_name(coordinator, "coordinator name")
        older = req.get("older_than")
        if older is not None and (
            isinstance(older, bool) or not isinstance(older, int | float)
            or not 0 <= older <= 10 * 365 * 86400
        ):  # fmt: skip
            raise ProtocolError("older_than must be a number of seconds, at least 0")
        unanswered = req.get("unanswered", False)
        if not isinstance(unanswered, bool):
            raise ProtocolError("unanswered must be true or false")
        limit = req.get("limit", MAX_RESOLVE)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RESOLVE:
            raise ProtocolError(f"limit must be a whole number in [1, {MAX_RESOLVE}]")
        if coordinator is None and older is None and not unanswered:
            raise ProtocolError("give a transaction id, or a filter (coordinator, older_than)")
        return cls(coordinator, None if older is None else float(older), unanswered, limit)

    def matches(self, txn: str, record: dict[str, Any], now: float) -> bool:
        if record.get("state") != PREPARED:
            return False
        if self.coordinator is not None and owner_of(txn) != self.coordinator:
            return False
        if self.unanswered and not record.get("in_doubt"):
            return False
        if self.older_than is not None:
            since = record.get("since", record.get("time"))
            if not isinstance(since, int | float) or now - since < self.older_than:
                return False
        return True

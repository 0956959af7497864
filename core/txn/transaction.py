"""A transaction at its coordinator, from the votes to the last acknowledgement.

:class:`Txn` is what :class:`~.coordinator.Coordinator` keeps of one
transaction in flight: its participants and where they are, the votes, the
decision and who acknowledged it.  Its states, in order: ``voting`` (prepares
sent), ``deciding`` (commit decided, its record not yet fsynced), then
``committed`` or ``aborted`` (phase two, until every participant acked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .protocol import ABORT, COMMIT

VOTING, DECIDING, COMMITTED, ABORTED = "voting", "deciding", "committed", "aborted"
OUTCOME_OF = {COMMITTED: COMMIT, ABORTED: ABORT}

Reply = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class Txn:
    id: str
    participants: dict[str, str | None]  # name -> endpoint (None: not found)
    state: str = VOTING
    votes: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    acked: set[str] = field(default_factory=set)
    waiter: Reply | None = None
    deadline: float = float("inf")
    timeout: float = 0.0
    tries: int = 0
    next_try: float = 0.0
    asked: dict[str, Any] = field(default_factory=dict)  # name -> (peer, rid) outstanding
    prepare: bytes = b""  # the prepare message, while participants are being looked up
    ticket: int = 0  # the journal's ticket of its commit record, until it is durable
    hazards: list[str] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        return {
            "txn": self.id,
            "outcome": self.state,
            "votes": {n: self.votes.get(n, "none") for n in self.participants},
            "reason": self.reason,
        }

"""What ``eda-txn coordinator`` and ``participant`` export with ``--metrics`` (core/metrics.py).

Their ``stats`` answers, read at scrape time: a coordinator's transactions
by outcome and those in flight; a participant's by state (``prepared``: in
doubt, waiting for the coordinator's decision), hazards, and each one's
journal (fsyncs, bytes on disk).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import metrics

if TYPE_CHECKING:
    from .coordinator import Coordinator
    from .participant import Participant

STATES = ("preparing", "prepared", "committing", "aborting", "committed", "aborted")


def coordinator_families(coord: Coordinator) -> Iterator[Any]:
    p = "eda_txn_coordinator_"
    outcomes = CounterMetricFamily(
        p + "transactions", "Transactions decided, by outcome.", labels=["outcome"]
    )
    outcomes.add_metric(["committed"], coord.committed)
    outcomes.add_metric(["aborted"], coord.aborted)
    yield outcomes
    yield metrics.gauge(p + "active_transactions",
                        "Transactions not finished (voting or in phase two).", len(coord.active))
    yield metrics.gauge(p + "voting_transactions", "Transactions waiting for votes.",
                        coord.voting)
    yield from _journal(p, coord.journal)
    yield from metrics.daemon_families("txn_coordinator", coord)


def participant_families(part: Participant) -> Iterator[Any]:
    p = "eda_txn_participant_"
    states = part.stats({})["states"]
    by_state = GaugeMetricFamily(
        p + "transactions", "Transactions known (open and recently finished), by state.",
        labels=["state"],
    )  # fmt: skip
    for state in sorted(set(STATES) | set(states)):
        by_state.add_metric([state], states.get(state, 0))
    yield by_state
    yield metrics.gauge(p + "in_doubt_transactions", "Prepared transactions waiting for "
                        "their coordinator's decision.", states.get("prepared", 0))
    yield metrics.counter(p + "hazards", "Operator resolutions (--commit/--abort) against "
                          "the coordinator's decision.", part.hazards)
    yield from _journal(p, part.journal)
    yield from metrics.daemon_families("txn_participant", part)


def _journal(prefix: str, journal: Any) -> Iterator[Any]:
    yield metrics.counter(prefix + "journal_fsyncs", "Journal fsyncs.", journal.fsyncs)
    yield metrics.gauge(prefix + "journal_bytes", "Size of the journal on disk.", journal.size)

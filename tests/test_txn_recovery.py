"""eda-txn 2PC recovery: what a participant undoes on its own after a crash.

The daemons are forked children (see tests/test_txn_2pc.py, whose Cluster
this file reuses), so a crash point's SIGKILL ends exactly one of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eda.core.reqrep import Unavailable
from eda.core.txn.journal import read
from eda.core.txn.participant import journal_path as participant_journal
from tests.helpers import run, wait_until
from tests.test_txn_2pc import Cluster, only_txn


@pytest.fixture
def cluster(tmp_path: Path, procs: Any) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(names: list[str], **kw: Any) -> Cluster:
        c = Cluster(tmp_path, names, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_a_prepare_cut_short_by_a_crash_is_undone_after_both_restart(cluster: Any) -> None:
    """stock dies after its prepare ran, before its vote was logged; the coordinator is
    killed within the vote timeout.  After both restart, pay hears the presumed abort and
    stock runs its abort action on its own: nothing stays reserved."""
    c = cluster(["stock", "pay"], vote_timeout=30)
    c.start_all({"stock": "participant:before-vote-logged"})
    with pytest.raises(Unavailable):
        c.commit({"order": 7}, wait=1.0)
    wait_until(c.procs["stock"].crashed, 10, "stock to crash before logging its vote")
    txn = only_txn(c, "pay")
    assert f"prepare {txn}" in c.effects("stock")  # its prepare ran: something is reserved
    c.procs["coordinator"].kill()  # well within the vote timeout: no decision logged
    assert not [r for r in c.coordinator_records() if r.get("txn") == txn]
    c.restart_dead()
    wait_until(lambda: c.states(txn) == {"stock": "aborted", "pay": "aborted"}, 10, "both aborted")
    assert f"abort {txn}" in c.effects("stock")  # the reservation is released
    assert f"abort {txn}" in c.effects("pay")
    assert not any(line.startswith(f"commit {txn}") for n in c.names for line in c.effects(n))
    records = [r for r in read(participant_journal(c.log, "stock")) if r.get("txn") == txn]
    assert records[0]["state"] == "preparing"  # journaled before the action ran
    shown = json.loads(run("eda-txn", "status", txn, "--log", str(c.log)).stdout)
    assert shown["participants"] == {"stock": "aborted", "pay": "aborted"}
    assert shown["state"] == "aborted"
    # recovery ran the abort, never the prepare again
    assert c.effects("stock").count(f"prepare {txn}") == 1

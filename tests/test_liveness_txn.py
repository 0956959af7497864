"""A 2PC coordinator's link to a participant comes back after a partition (issue 18).

A coordinator on one host asks a participant on another; the hosts are
partitioned for longer than the link's heartbeats take to drop it, then
healed.  Held open through the partition, the coordinator's connection (and the
participant's back to it, for inquiries) would speak again only at TCP's next
retransmission, 7.5 s after this heal (:mod:`tests.liveness`): every transaction
meanwhile would abort for want of a vote.  ZeroMQ heartbeats on those links
(:data:`eda.core.sockets.LONG_LIVED`, shortened here by ``EDA_LIVENESS_SCALE``)
drop the connection and make it again with short tries, so commits resume
within the policy's figures, and no transaction is left in doubt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.helpers import Proc, wait_until
from tests.hosts import Host, Network
from tests.liveness import FAST, HEAL_SLACK, LIVE, PARTITION, fixed_rto, partition, resumed

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

VOTE_TIMEOUT = 0.5
# the first prepare after the cut leaves within a vote timeout of it (commits run one after
# another): the partition is longer by as much, so that its retransmissions too are all
# over before the heal but the last
CUT_FOR = PARTITION + VOTE_TIMEOUT
# after the heal, a commit succeeds within: the link connected again, a vote timeout (a
# commit whose prepare went before it connected) and room for a loaded machine's scheduling
RESUMED_WITHIN = LIVE.reconnected_within + VOTE_TIMEOUT + HEAL_SLACK

# one client, a commit every 50 ms or so (a process each would cost a second or two under
# load, and the test would measure that); each printed as {"start", "end", "outcome"}
COMMITS = """
import json, sys, time
from eda.core.txn.client import CoordinatorClient
client = CoordinatorClient(sys.argv[1], None, 5.0)
while True:
    start = time.monotonic()
    try:
        reply = client.request({"op": "commit", "participants": ["stock"], "data": {"n": 1},
                                "timeout": float(sys.argv[2])})
        outcome = reply.get("outcome")
    except Exception as exc:
        outcome = type(exc).__name__
    print(json.dumps({"start": start, "end": time.monotonic(), "outcome": outcome}), flush=True)
    time.sleep(0.05)
"""


def commits(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.lines() if line.startswith("{")]


def committed_after(proc: Proc, when: float) -> bool:
    return any(c["end"] > when and c["outcome"] == "committed" for c in commits(proc))


def states(host: Host, log: str) -> list[str]:
    status = host.run("eda-txn", "status", "--json", "--log", log)
    return [json.loads(line)["state"] for line in status.stdout.splitlines()]


@pytest.mark.long
def test_commits_resume_after_a_partition_and_none_is_left_in_doubt(
    network: Network, tmp_path: Path
) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    fixed_rto(a, b)
    coordinator, participant = f"tcp://{a.address}:7730", f"tcp://{b.address}:7740"
    coord_log, part_log = str(tmp_path / "a"), str(tmp_path / "b")
    coord = a.eda(
        "eda-txn", "coordinator", "-v", "--name", "ca", "--log", coord_log, "--no-mdns",
        "--bind", coordinator, "--peer", f"stock={participant}",
        "--vote-timeout", str(VOTE_TIMEOUT), "--retry-max", "0.5", env=FAST,
    )  # fmt: skip
    stock = b.eda(
        "eda-txn", "participant", "stock", "-v", "--log", part_log, "--no-mdns",
        "--bind", participant, "--inquire-after", "0.5", "--prepare", "true", "--commit", "true",
        env=FAST,
    )  # fmt: skip
    for proc in (coord, stock):
        proc.wait_stderr("listening on", 30)
    client = a.procs.start([*a.prefix, sys.executable, "-c", COMMITS, coordinator,
                            str(VOTE_TIMEOUT)], env=FAST)  # fmt: skip
    wait_until(lambda: committed_after(client, 0.0), 30, "a first commit")
    fault = partition(network, [a], CUT_FOR)
    resumed(lambda: committed_after(client, fault.healed), fault, RESUMED_WITHIN,
            "a commit after the heal")  # fmt: skip
    client.kill()
    during = [
        c["outcome"]
        for c in commits(client)
        if fault.split < c["start"] and c["end"] < fault.healed
    ]
    assert during and "committed" not in during  # the fault was real

    def settled() -> bool:  # the participant knows every outcome; the coordinator is done
        return not {"in-doubt", "committing", "aborting"} & {
            *states(b, part_log),
            *states(a, coord_log),
        }

    wait_until(settled, 15, "no transaction in doubt or still deciding")

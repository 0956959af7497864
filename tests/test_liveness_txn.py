"""A 2PC coordinator's link to a participant comes back after a partition (issue 18).

A coordinator on one host asks a participant on another; the hosts are
partitioned for longer than the link's heartbeats take to drop it, then
healed.  Held open through the partition, the coordinator's connection (and the
participant's back to it, for inquiries) would speak again only at TCP's next
retransmission, 5.5 s after this heal (:mod:`tests.liveness`): every transaction meanwhile would
abort for want of a vote.  ZeroMQ heartbeats on those links
(:data:`eda.core.sockets.LONG_LIVED`, shortened here by ``EDA_LIVENESS_SCALE``)
drop the connection and make it again with short tries, so commits resume
within the policy's figures, and no transaction is left in doubt.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import wait_until
from tests.hosts import Host, Network
from tests.liveness import FAST, HEAL_SLACK, LIVE, PARTITION, fixed_rto

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

VOTE_TIMEOUT = 0.5
# commits come one after another (a process each, 1 to 1.5 s on a loaded machine), so the
# first prepare after the cut may leave up to that long after it: the partition is longer
# by as much, so that its retransmissions too are all over before the heal but the last
CUT_FOR = PARTITION + 1.5
# after the heal, a commit started then succeeds within: the link connected again, a vote
# timeout (a commit started before it connected) and room for a loaded machine's scheduling
RESUMED_WITHIN = LIVE.reconnected_within + VOTE_TIMEOUT + HEAL_SLACK


class Commits:
    """One transaction after another, from a client on *host*: (started, exit status)."""

    def __init__(self, host: Host, coordinator: str) -> None:
        self.host, self.coordinator = host, coordinator
        self.done: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            result = self.host.run(
                "eda-txn", "commit", "-p", "stock", "--coordinator", self.coordinator,
                "--no-mdns", "--data", '{"n": 1}', "--wait", "5",
            )  # fmt: skip
            self.done.append((started, result.returncode))

    def committed_since(self, when: float) -> bool:
        return any(started >= when and rc == 0 for started, rc in self.done)

    def end(self) -> None:
        self._stop.set()
        self._thread.join(30)


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
    commits = Commits(a, coordinator)
    wait_until(lambda: commits.committed_since(0.0), 30, "a first commit")
    cut = time.monotonic()
    network.split([a])
    time.sleep(max(0.0, cut + CUT_FOR - time.monotonic()))  # the fault's length, not a wait
    network.join()
    healed = time.monotonic()
    left = max(1.0, healed + RESUMED_WITHIN - time.monotonic())
    try:
        wait_until(lambda: commits.committed_since(healed), left,
                   f"a commit started after the heal within {RESUMED_WITHIN:g} s")  # fmt: skip
    finally:
        commits.end()
    assert any(rc != 0 for started, rc in commits.done if cut < started < healed)  # the fault

    def settled() -> bool:  # the participant knows every outcome; the coordinator is done
        return not {"in-doubt", "committing", "aborting"} & {
            *states(b, part_log), *states(a, coord_log)
        }

    wait_until(settled, 15, "no transaction in doubt or still deciding")

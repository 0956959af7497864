"""The NATS engine across a JetStream failover: kill -9 of the stream leader's nats-server.

A 3-node cluster on namespaced hosts (``cluster`` of tests/test_bus_nats.py).
What is checked is the path the engine takes while the stream has no leader
(JetStream elects another 4 to 9 s after the last heartbeat), and that every
event is still stored once, in order; how long the stall lasts is a benchmark
(bench/bench_bus_failover.py), not a test.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from eda.core.bus import StoreError
from eda.core.bus.nats import NatsEngine
from eda.core.bus.nats.engine import PROBE_DEADLINE
from tests.helpers import wait_until
from tests.test_bus_nats import cluster, open_when_ready
from tests.test_bus_store import batch

Call = list[Any]  # [its coroutine's name, how long it may wait, its result]


def record_calls(store: NatsEngine, log: list[Call]) -> None:
    """Note in *log* each call *store* makes to NATS."""
    bridge = store._bridge
    run = bridge.run

    def recording(coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        call = [coro.__qualname__, bridge.deadline if timeout is None else timeout, None]
        log.append(call)
        call[2] = run(coro, timeout)  # (a StoreError leaves None)
        return call[2]

    bridge.run = recording  # type: ignore[method-assign]


@pytest.mark.long
def test_a_writer_on_the_killed_leader_resumes_on_a_survivor_and_only_probes_meanwhile(
    tmp_path: Path,
) -> None:
    """The engine is given only the stream leader's server (it learns the others from it).

    The leader is stopped, a batch sent to it, then it is killed: the commit fails
    because the connection broke, not after its deadline.  The engine reconnects to a
    survivor; until a new leader is elected, each publish is answered 503 and the
    engine only asks, PROBE_DEADLINE at most, whether the stream has a leader again
    (never a full-deadline read that no one answers).  Then the writer goes on and
    every event is stored exactly once, in order.
    """
    with cluster(tmp_path) as (hosts, urls, _):
        with open_when_ready(urls) as first:
            first.append([batch(1, 100)])
            assert first.commit() == 100
            leader = first._run(first._js.stream_info(first.stream)).cluster.leader
        dead = int(leader[1:]) - 1
        store = NatsEngine([urls[dead]], replicas=3, timeout=2.0)
        try:
            log: list[Call] = []
            record_calls(store, log)
            hosts[dead].started[0].signal(signal.SIGSTOP)  # takes it in, never answers
            store.append([batch(101, 100)])
            with ThreadPoolExecutor(1) as commit:
                failed = commit.submit(store.commit)
                wait_until(lambda: store._acks, 10, "the batch sent to the stopped leader")
                hosts[dead].kill()  # kill -9: its connections close
                with pytest.raises(StoreError, match="connection to NATS broke"):
                    failed.result()

            confirmed, outcomes, rounds = 100, [], []
            deadline = time.monotonic() + 60
            while confirmed < 1100:
                assert time.monotonic() < deadline, f"stuck at {confirmed}: {outcomes[-3:]}"
                rounds.append(len(log))  # where this round's calls begin in the log
                try:
                    store.append([batch(confirmed + 1, 100)])
                    store.commit()
                except StoreError as exc:  # resend everything after the last confirmation
                    outcomes.append(str(exc))
                    with contextlib.suppress(StoreError):
                        store.refresh()
                    continue
                outcomes.append("confirmed")
                confirmed += 100
            assert store._nc.connected_url.netloc != urls[dead].removeprefix("nats://")

            # until a new leader: every publish answered 503 at once (none waited for an
            # ack that could not come), and between them questions, of PROBE_DEADLINE
            # each, whether the stream has a leader again; a read or a stream info (that
            # no one would answer without a leader) only once one said yes
            first = outcomes.index("confirmed")
            assert first > 0 and all("status 503" in o for o in outcomes[:first]), outcomes
            meanwhile = log[: rounds[first]]
            probes = [(i, c) for i, c in enumerate(meanwhile) if c[0].endswith("._probe")]
            assert probes and all(wait <= PROBE_DEADLINE for _, (_, wait, _) in probes)
            for i, (what, _, _) in enumerate(meanwhile):
                if not what.endswith(("._store", "._probe")):
                    assert [said for j, (_, _, said) in probes if j < i][-1:] == [True], what
            store.refresh()  # a leader again: a refresh asks as it always did
            assert log[-1][:2] == ["NatsEngine.refresh.<locals>.moved", 1.0]

            pubseqs = [r.pubseq + i for r in store.read(1) for i in range(r.size)]
            assert pubseqs == list(range(1, 1101))  # each confirmed event exactly once
            seqs = [r.seq + i for r in store.read(1) for i in range(r.size)]
            assert seqs == list(range(1, 1101))
        finally:
            store.close()

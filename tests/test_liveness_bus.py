"""The bus publisher's link comes back after a partition (issue 18).

A publisher on one host streams to eda-bus on another; the hosts are
partitioned for longer than the link's heartbeats take to drop it, then
healed.  Held open through the partition, the TCP connection would next be
retransmitted at TCP's back-off, 7.5 s after this heal (:mod:`tests.liveness`);
ZeroMQ heartbeats on the publisher's DEALER (:data:`eda.core.sockets.LONG_LIVED`,
shortened here by ``EDA_LIVENESS_SCALE``) drop the connection and make it again with short tries, so the confirmed stream
resumes within the policy's figures.  Every event is stored exactly once: what
the dropped connection carried is resent with its publisher id and sequences.
A durable consumer and a group's only member on the publisher's side of the
partition, their links dropped too, subscribe again by their names and get
every event (from their acknowledged positions: none lost).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import together, wait_until
from tests.hosts import Network
from tests.liveness import FAST, HEAL_SLACK, LIVE, PARTITION, Stream, fixed_rto, numbers

# after the heal, events are stored again within: the link connected again, and room for
# a loaded machine's scheduling (a connection held through the partition waits 7.5 s more)
RESUMED_WITHIN = LIVE.reconnected_within + HEAL_SLACK


@pytest.mark.long
def test_confirmed_stream_and_durable_consumers_resume_after_a_partition(
    network: Network, tmp_path: Path
) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    fixed_rto(a, b)
    bus_at = f"tcp://{b.address}:5570"
    bus = b.eda("eda-bus", "serve", "-v", "--no-mdns", "--bind", bus_at,
                "--data", str(tmp_path / "bus"))  # fmt: skip
    bus.wait_stderr(r"serving \S+ on tcp://", 30)
    # on the bus's side of the partition: sees what the bus stored, as it stores it
    sub = b.eda("eda-sub", "--bus", bus_at, "--no-mdns", "--raw", "orders")
    # on the publisher's side: a durable consumer and a group's member, cut off too
    consumer = ("eda-sub", "--bus", bus_at, "--no-mdns", "--raw", "--from-start")
    durable = a.eda(*consumer, "--durable", "billing", "orders", env=FAST)
    group = a.eda(*consumer, "--group", "workers", "orders", env=FAST)
    pub = a.eda("eda-pub", "-v", "--bus", bus_at, "--confirm", "--no-mdns", "orders",
                stdin=subprocess.PIPE, env=FAST)  # fmt: skip
    stream = Stream(pub)
    try:
        wait_until(lambda: min(len(numbers(durable)), len(numbers(group))) >= 10, 30,
                   "the first events delivered")  # fmt: skip
        cut = time.monotonic()
        network.split([a])
        time.sleep(max(0.0, cut + PARTITION - time.monotonic()))  # the fault's length
        network.join()
        healed, after = time.monotonic(), stream.sent
        left = max(1.0, healed + RESUMED_WITHIN - time.monotonic())
        wait_until(lambda: any(n > after for n in numbers(sub)), left,
                   f"an event sent after the heal stored within {RESUMED_WITHIN:g} s")  # fmt: skip
    finally:
        total = stream.end()
    assert pub.wait(30) == 0, pub.stderr
    replay, stats = together(
        lambda: b.run("eda-sub", "--bus", bus_at, "--no-mdns", "--from-start", "--raw",
                      "-C", str(total), "-W", "10", "orders"),
        lambda: b.run("eda-bus", "stats", "--bus", bus_at, "--json"),
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    stored = [int(x) for x in replay.stdout.split()]
    assert sorted(stored) == list(range(1, total + 1))  # every event, once
    assert json.loads(stats.stdout.splitlines()[0])["events"] == total, stats  # none twice
    # the consumers subscribed again by their names, from their acknowledged positions
    for consumer in (durable, group):
        wait_until(lambda c=consumer: total in numbers(c), 15, "a consumer's last event")
        assert set(numbers(consumer)) == set(range(1, total + 1))  # none lost (at least once)

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
from pathlib import Path

import pytest

from tests.helpers import together, wait_until
from tests.hosts import Network
from tests.liveness import FAST, Stream, fixed_rto, numbers, stream_through_partition


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
    wait_until(lambda: min(len(numbers(durable)), len(numbers(group))) >= 10, 30,
               "the first events delivered")  # fmt: skip
    total = stream_through_partition(
        network, [a], stream, sub, "an event sent after the heal stored"
    )
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
    for reader in (durable, group):
        wait_until(lambda r=reader: total in numbers(r), 15, "a consumer's last event")
        assert set(numbers(reader)) == set(range(1, total + 1))  # none lost (at least once)

"""A brokerless subscriber's link to its publisher comes back after a partition (issue 18).

A publisher on one host streams to a subscriber on another; the hosts are
partitioned for longer than the link's heartbeats take to drop it, then
healed.  Held open through the partition, the connection would hide the
outage: the publisher queues into a dead pipe, and the stream stays silent
until TCP's next retransmission, 7.5 s after this heal (:mod:`tests.liveness`).
ZeroMQ heartbeats on the XPUB and the SUB (:data:`eda.core.sockets.LONG_LIVED`,
shortened here by ``EDA_LIVENESS_SCALE``) drop the connection and make it again
with short tries: the stream resumes within the policy's figures, and what the
partition cost is reported lost, by number (nothing delivered twice).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import wait_until
from tests.hosts import Network
from tests.liveness import FAST, Stream, fixed_rto, numbers, stream_through_partition


@pytest.mark.long
def test_stream_resumes_after_a_partition_and_what_it_cost_is_reported_lost(
    network: Network,
) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    fixed_rto(a, b)
    feed = f"tcp://{a.address}:5555"
    pub = a.eda("eda-pub", "-v", "--no-mdns", "--bind", feed, "--wait-subscribers", "1",
                "--wait", "30", "orders", stdin=subprocess.PIPE, env=FAST)  # fmt: skip
    sub = b.eda("eda-sub", "-v", "--no-mdns", "--connect", feed, "--raw", "orders", env=FAST)
    stream = Stream(pub)
    wait_until(lambda: len(numbers(sub)) >= 10, 30, "the first events")
    total = stream_through_partition(
        network, [a], stream, sub, "an event sent after the heal delivered"
    )
    assert pub.wait(30) == 5, pub.stderr  # the publisher says the subscriber lost events
    assert re.search(r"subscriber \w+ lost \d+ event", pub.stderr), pub.stderr
    wait_until(lambda: total in numbers(sub), 15, "the last event")
    got = numbers(sub)
    assert got == sorted(set(got))  # in order, none twice
    lost = sum(int(n) for n in re.findall(r"lost (\d+) events", sub.stderr))
    assert got[-1] - got[0] + 1 == len(got) + lost  # every gap reported, by number

"""What the liveness tests (tests/test_liveness_*.py) share: the policy's figures, shortened
for tests, and a TCP retransmission back-off that does not depend on the machine's load.

Each test partitions two hosts for longer than a long-lived link's heartbeats take to drop
it, then heals them, and asserts the link's traffic resumed within a bound set by
:data:`eda.core.sockets.LONG_LIVED` (scaled by ``EDA_LIVENESS_SCALE``).  Without the
heartbeats, a connection held through the partition speaks again only at TCP's next
retransmission: after 1, 3, 7, 15... RTOs.  The hosts' route to each other gets a minimum
RTO of :data:`RTO` (``ip route ... rto_min``), so those times are fixed (the RTO is that
minimum plus a round-trip time of milliseconds) rather than 0.2 s plus however long a loaded
machine takes to answer: a partition of :data:`PARTITION` ends after the second
retransmission (3 RTOs) and 7.5 s before the third (7 RTOs).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from eda.core.sockets import LONG_LIVED, SCALE_ENV
from tests.helpers import Proc, wait_until
from tests.hosts import Host, Network

SCALE = 0.25
LIVE = LONG_LIVED.scaled(SCALE)
FAST = {SCALE_ENV: str(SCALE)}  # the environment of the programs on the partitioned link
RTO = 2.0  # s, the minimum RTO on the partitioned link
PARTITION = 3 * RTO + 0.5  # the third retransmission comes 7 RTOs after the cut: 7.5 s later
# s, room for a loaded machine's scheduling (the suite runs at load 10 to 30 on two cores),
# well under the 7.5 s a connection held through the partition waits
HEAL_SLACK = 3.0


def fixed_rto(*hosts: Host) -> None:
    """Give each host's route to the others a minimum RTO of :data:`RTO` seconds."""
    for host in hosts:
        ip = [*host.prefix, "ip"]
        shown = subprocess.run([*ip, "-o", "route", "show", "proto", "kernel"], check=True,
                               capture_output=True, text=True).stdout  # fmt: skip
        for route in shown.splitlines():
            if route.startswith("10.231."):
                words = route.split()
                words = words[: words.index("\\")] if "\\" in words else words
                subprocess.run([*ip, "route", "replace", *words, "rto_min", f"{RTO * 1000:g}ms"],
                               check=True, capture_output=True)  # fmt: skip


class Fault(NamedTuple):
    split: float  # when the partition was in place (monotonic)
    healed: float  # when it was healed


def partition(network: Network, half: list[Host], length: float = PARTITION) -> Fault:
    """Cut *half* off the other hosts for *length* seconds, then heal."""
    cut = time.monotonic()
    network.split(half)
    split = time.monotonic()  # (the rules take a moment to be in place)
    time.sleep(max(0.0, cut + length - time.monotonic()))  # the fault's length, not a wait
    network.join()
    return Fault(split, time.monotonic())


def resumed(cond: Callable[[], Any], fault: Fault, within: float, what: str) -> None:
    """Wait for *cond* until *within* seconds after *fault* healed (the property tested)."""
    left = max(1.0, fault.healed + within - time.monotonic())
    wait_until(cond, left, f"{what} within {within:g} s of the heal")


EVERY = 0.05  # s between two events of the stream


class Stream:
    """Numbered events written to a publisher's stdin, one every :data:`EVERY` s."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        while not self._stop.wait(EVERY):
            try:
                stdin.write(b"%d\n" % (self.sent + 1))
                stdin.flush()
            except BrokenPipeError:  # the publisher is gone: the test says why
                return
            self.sent += 1

    def end(self) -> int:
        """Stop writing and close stdin (the publisher then waits for its confirmations)."""
        self._stop.set()
        self._thread.join()
        assert self.proc.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.popen.stdin.close()
        return self.sent


def numbers(sub: Proc) -> list[int]:
    """The numbered events a subscriber (``--raw``) printed, in order."""
    return [int(line) for line in sub.lines() if line.strip().isdigit()]


# after the heal, a stream's events arrive again within: the link connected again, and room
# for a loaded machine's scheduling (a connection held through the partition waits 7.5 s)
STREAM_RESUMED_WITHIN = LIVE.reconnected_within + HEAL_SLACK


def stream_through_partition(network: Network, half: list[Host], stream: Stream,
                             reader: Proc, what: str) -> int:  # fmt: skip
    """Partition *half* off while *stream* runs, heal, and wait until *reader* got an event
    sent after the heal (*what*, as the failure says); then end the stream: its length."""
    try:
        fault = partition(network, half)
        after = stream.sent  # (the stream goes on: later ones were sent after the heal)
        resumed(lambda: any(n > after for n in numbers(reader)), fault,
                STREAM_RESUMED_WITHIN, what)  # fmt: skip
    finally:
        total = stream.end()
    return total

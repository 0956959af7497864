"""eda-bus on one host, publishers and subscribers on two others, found by mDNS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.long
def test_bus_on_one_host_serves_publishers_and_consumers_on_two_others(
    network: Any, tmp_path: Path
) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    bus = a.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"), "-v")
    bus.wait_stderr("announced bus", 15)
    sent = b.run("eda-pub", "--bus", "--confirm", "orders.created", "one", "two")
    assert sent.returncode == 0, sent.stderr
    got = c.run("eda-sub", "--bus", "orders.>", "--from-start", "-C", "2", "-W", "10")
    assert got.returncode == 0, got.stderr
    events = [json.loads(line) for line in got.stdout.splitlines()]
    assert [e["data"] for e in events] == ["one", "two"]
    assert [e["edabusseq"] for e in events] == [1, 2]
    # a durable consumer on the third host
    first = c.run("eda-sub", "--bus", "orders.>", "--durable", "billing", "-C", "1", "--raw")
    assert first.stdout == "one\n", first.stderr
    again = c.run("eda-sub", "--bus", "orders.>", "--durable", "billing", "-C", "1", "--raw")
    assert again.stdout == "two\n", again.stderr

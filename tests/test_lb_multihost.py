"""eda-lb across hosts (network namespaces on a bridge): workers on two hosts, a
caller on a third, brokerless and through a broker on a fourth, all found by mDNS."""

from __future__ import annotations

import json
from typing import Any

from tests.helpers import PROGRAMS, wait_until
from tests.hosts import Host, Network

PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
HB = ("--heartbeat", "0.3")


def stats(host: Host) -> list[dict[str, Any]]:
    done = host.run("eda-lb", "stats", "upper", "--timeout", "2")
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_caller_balances_over_workers_on_two_hosts_directly_and_via_a_broker(
    network: Network,
) -> None:
    a, b, c, d = (network.add_host(n) for n in "abcd")
    for host in (a, b):
        worker = host.eda(
            "eda-lb", "worker", "upper", "-v", *HB, "--id", f"w-{host.name}", "--",
            "sh", "-c", f'echo "$(tr a-z A-Z) from {host.name}"',
        )  # fmt: skip
        worker.wait_stderr("serving upper on", 15)
    lines = "".join(f"hello {i}\n" for i in range(40))
    done = c.run("eda-lb", "call", "upper", "--window", "4", input=lines)
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()
    assert len(replies) == 40 and replies[0].startswith("HELLO 0")
    assert [r.split(" from ")[0] for r in replies] == [f"HELLO {i}" for i in range(40)]
    assert {r.rsplit(" ", 1)[1] for r in replies} == {"a", "b"}
    direct = {r["instance"]: r for r in stats(c)}
    assert set(direct) == {"w-a", "w-b"} and all(r["source"] == "direct" for r in direct.values())
    assert direct["w-a"]["requests"] + direct["w-b"]["requests"] == 40
    assert min(r["requests"] for r in direct.values()) >= 10  # both served

    broker = d.eda("eda-lb", "serve", "upper", "-v", *HB)
    broker.wait_stderr(r"listening on .*\(announced by mDNS\)", 15)
    # each worker finds the broker on host d by mDNS and connects to its backend
    wait_until(
        lambda: (
            {r["instance"] for r in stats(c) if r["state"] == "healthy"} == {"w-a", "w-b"}
            and all(r["source"] != "direct" for r in stats(c))
        ),
        20,
        "both workers at the broker",
    )
    done = c.run("eda-lb", "call", "upper", "--via", "upper", "--window", "4", input=lines)
    assert done.returncode == 0, done.stderr
    assert [r.split(" from")[0] for r in done.stdout.splitlines()] == [
        f"HELLO {i}" for i in range(40)
    ]
    via = {r["instance"]: r for r in stats(c)}
    assert via["w-a"]["requests"] + via["w-b"]["requests"] == 40
    assert min(r["requests"] for r in via.values()) >= 10
    broker_id = broker.wait_stderr(r"broker (\S+) for upper listening").group(1)
    assert {r["source"] for r in via.values()} == {broker_id}

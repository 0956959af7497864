"""eda-lb across hosts (network namespaces on a bridge), found by mDNS: workers on two
hosts and a caller on a third, through a kill -9 of a host; and the same brokerless and
via a broker on a fourth host, with the stats of each way."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.helpers import PROGRAMS, Proc, command, wait_until
from tests.hosts import Host, Network

LB = command("eda-lb")  # as installed (bin/eda-lb)


def lb(host: Host, *args: str, **kw: Any) -> Proc:
    proc = host.procs.start([*LB, *args], prefix=host.prefix, **host._env(kw))
    host.started.append(proc)
    return proc


def test_workers_on_two_hosts_serve_a_caller_on_a_third_through_a_kill_9(
    network: Network,
) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    for host in (a, b):
        loop = f'while read -r l; do echo "{host.name} $l"; done'
        worker = lb(host, "worker", "svc", "--serverless", "--persistent", "--", "sh", "-c", loop)
        worker.wait_stderr(rf"serving svc on tcp://{host.address}:\d+", 20)
    caller = lb(
        c, "call", "svc", "--serverless", "--heartbeat", "0.3", "--timeout", "3",
        stdin=subprocess.PIPE,
    )  # fmt: skip
    stdin = caller.popen.stdin
    assert stdin is not None
    sent = 0

    def both_answer() -> bool:
        # a lookup made just after the announcements may see one of them; the
        # caller's re-lookup (every 2 s) finds the other
        nonlocal sent
        stdin.write(b"".join(b"%d\n" % i for i in range(sent, sent + 10)))
        stdin.flush()
        sent += 10
        lines = caller.wait_lines(sent, 20)
        return {line.split()[0] for line in lines[-10:]} == {"a", "b"}

    wait_until(both_answer, 15, "workers on both hosts to answer")
    b.kill()  # SIGKILL of every process on b: no goodbye
    stdin.write(b"".join(b"%d\n" % i for i in range(sent, sent + 200)))
    stdin.close()
    assert caller.wait(20) == 0, caller.stderr
    lines = caller.lines()
    assert [line.split()[1] for line in lines] == [str(i) for i in range(sent + 200)]
    assert "dropped" in caller.stderr


# -- brokerless and via a broker (owner: lbbroker) ----------------------------------------
PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
HB = ("--heartbeat", "0.3")


def stats(host: Host) -> list[dict[str, Any]]:
    done = host.run("eda-lb", "stats", "upper", "--timeout", "2")
    return [json.loads(line) for line in done.stdout.splitlines()]


def worker_on(host: Host) -> Proc:
    """A worker of upper whose replies say which host answered."""
    reply = f'echo "$(tr a-z A-Z) from {host.name}"'
    return host.eda(
        "eda-lb", "worker", "upper", "-v", *HB, "--id", f"w-{host.name}", "--", "sh", "-c", reply
    )


@pytest.mark.long
def test_a_caller_balances_over_workers_on_two_hosts_directly_and_via_a_broker(
    network: Network,
) -> None:
    a, b, c, d = (network.add_host(n) for n in "abcd")
    workers = [worker_on(host) for host in (a, b)]
    for worker in workers:
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

    def at_broker() -> bool:
        rows = stats(c)
        healthy = {r["instance"] for r in rows if r["state"] == "healthy"}
        return healthy == {"w-a", "w-b"} and all(r["source"] != "direct" for r in rows)

    wait_until(at_broker, 20, "both workers at the broker")
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

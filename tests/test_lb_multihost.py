"""eda-lb across hosts (network namespaces on a bridge): workers found by mDNS, kill -9."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from tests.helpers import Proc, wait_until
from tests.hosts import Host, Network

LB = [sys.executable, "-m", "eda.cli.lb"]


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

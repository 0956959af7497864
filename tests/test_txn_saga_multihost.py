"""Sagas across hosts (network namespaces on a bridge): a saga's `call` step goes to
eda-lb workers on two other hosts, found by mDNS, and still completes when the host
that answered it is powered off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import PROGRAMS
from tests.hosts import Host, Network

PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

SAGA = """\
[[step]]
name = "reserve"
call = "stock"
timeout = 5
retry = { attempts = 4, backoff = 0.5 }
"""


def saga(host: Host, file: Path, log: Path, saga_id: str) -> dict[str, object]:
    """Run one saga on *host*; the output of its reserve step."""
    done = host.run(
        "eda-txn", "saga", str(file), "--serverless", "--log", str(log),
        "--id", saga_id, "--data", '{"qty": 2}', timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "saga-completed", events
    [output] = [e["output"] for e in events if e["event"] == "step-done"]
    assert isinstance(output, dict)
    return output


@pytest.mark.long
def test_a_saga_calls_workers_on_other_hosts_and_survives_losing_the_one_that_answered(
    network: Network, tmp_path: Path
) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    hosts = {"a": a, "b": b}
    for host in (a, b):
        reply = f'jq -c "{{reserved: .qty, by: \\"{host.name}\\"}}"'
        worker = host.eda(
            "eda-lb", "worker", "stock", "--serverless", "--heartbeat", "0.3",
            "--", "sh", "-c", reply,
        )  # fmt: skip
        worker.wait_stderr(rf"serving stock on tcp://{host.address}:\d+", 20)
    file = tmp_path / "order.toml"
    file.write_text(SAGA)
    first = saga(c, file, tmp_path / "txn", "order-1")
    assert first["reserved"] == 2 and first["by"] in hosts, first
    answered = str(first["by"])
    hosts[answered].kill()  # power off the host that answered: no goodbye
    other = "b" if answered == "a" else "a"
    second = saga(c, file, tmp_path / "txn", "order-2")
    assert second == {"reserved": 2, "by": other}
    # both sagas' logs are complete on the caller's host
    for saga_id in ("order-1", "order-2"):
        log = (tmp_path / "txn" / "sagas" / f"{saga_id}.jsonl").read_text().splitlines()
        assert json.loads(log[-1])["event"] == "saga-completed"

"""eda-txn across hosts: a coordinator on one, participants on two others, found by mDNS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.helpers import wait_until

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")


@pytest.mark.long
def test_two_phase_commit_across_three_hosts_found_by_mdns(network: Any, tmp_path: Path) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    log = str(tmp_path / "{}")
    coord = a.eda(
        "eda-txn",
        "coordinator",
        "-v",
        "--name",
        "ca",
        "--log",
        log.format("a"),
        "--vote-timeout",
        "2",
    )
    stock = b.eda(
        "eda-txn", "participant", "stock", "--log", log.format("b"), "--inquire-after", "0.5",
        "--prepare", f"cat > {tmp_path}/stock.$EDA_TXN_ID", "--commit", f"echo $EDA_TXN_ID >> {tmp_path}/stock.ok",
    )  # fmt: skip
    pay = c.eda(
        "eda-txn", "participant", "pay", "--log", log.format("c"),
        "--prepare", "grep -q card", "--commit", f"echo $EDA_TXN_ID >> {tmp_path}/pay.ok",
    )  # fmt: skip
    for proc in (coord, stock, pay):
        proc.wait_stderr("announced by mDNS", 20)
    assert f"listening on tcp://{a.address}:7730" in coord.stderr

    ok = c.run("eda-txn", "commit", "-p", "stock,pay", "--data", '{"order": 7, "card": 1}')
    assert ok.returncode == 0, ok.stderr
    txn = json.loads(ok.stdout)["txn"]
    assert txn.startswith("ca.")
    # applied by phase two, just after the client's answer (the coordinator's decision)
    wait_until(
        lambda: all(
            (tmp_path / f"{name}.ok").exists()
            and (tmp_path / f"{name}.ok").read_text() == f"{txn}\n"
            for name in ("stock", "pay")
        ),
        30,
        "both commits applied",
    )

    no = b.run("eda-txn", "commit", "-p", "stock,pay", "--data", '{"order": 8}')
    assert no.returncode == 5 and json.loads(no.stdout)["votes"]["pay"] == "no", no.stderr

    # the payment host loses its cable: its vote never comes, the transaction aborts in time
    c.cut()
    late = b.run("eda-txn", "commit", "-p", "stock,pay", "--timeout", "1", "--data", '{"card": 1}')
    assert late.returncode == 5 and "no vote from pay" in json.loads(late.stdout)["reason"], (
        late.stderr
    )
    c.reconnect()

    # each host's journal tells its own part
    def decisions() -> list[str]:  # an abort reaches the disk lazily (presumed abort)
        status = a.run("eda-txn", "status", "--log", log.format("a"))
        return [json.loads(line)["decision"] for line in status.stdout.splitlines()]

    wait_until(lambda: len(decisions()) == 3, 5)
    assert decisions() == ["committed", "aborted", "aborted"]
    stock_rows = a.run("eda-txn", "status", txn, "--log", log.format("b"))
    assert json.loads(stock_rows.stdout)["participants"] == {"stock": "committed"}


@pytest.mark.long
def test_2pc_daemons_started_before_a_registry_move_to_it_and_mdns_still_finds_the_rest(
    network: Any, tmp_path: Path
) -> None:
    """A coordinator and participants start with no registry (announced by mDNS); then
    a registry starts.  p1 moves to it (as eda-lb workers and eda-registry register do);
    p2 runs --serverless (mDNS only, never moves): the coordinator, now asking the
    registry, falls back to what mDNS knows for it.  Every commit goes through."""
    a, b, c = (network.add_host(n) for n in "abc")
    log = str(tmp_path / "{}")
    coord = a.eda("eda-txn", "coordinator", "-v", "--name", "ca", "--log", log.format("a"),
                  "--vote-timeout", "5")  # fmt: skip
    p1 = b.eda("eda-txn", "participant", "p1", "-v", "--log", log.format("b"))
    p2 = c.eda("eda-txn", "participant", "p2", "--serverless", "--log", log.format("c"))
    for proc in (coord, p1, p2):
        proc.wait_stderr("announced by mDNS", 20)
    registry = a.eda("eda-registry", "serve", "-v")
    registry.wait_stderr("announced registry", 15)
    p1.wait_stderr("a registry appeared", 15)

    def in_registry(service: str) -> list[Any]:
        found = c.run("eda-registry", "lookup", service, "--json")
        return [json.loads(line) for line in found.stdout.splitlines()]

    wait_until(lambda: in_registry("txn-p1"), 10, "p1 to be registered with the registry")
    assert not in_registry("txn-p2")  # announced by mDNS only
    for order in (1, 2):
        done = b.run("eda-txn", "commit", "-p", "p1,p2", "--data", json.dumps({"order": order}))
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert json.loads(done.stdout)["outcome"] == "committed"

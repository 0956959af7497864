"""eda-txn across hosts: a coordinator on one, participants on two others, found by mDNS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import helpers
from tests.helpers import wait_until

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")


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
    assert (tmp_path / "stock.ok").read_text() == f"{txn}\n" and (
        tmp_path / "pay.ok"
    ).read_text() == f"{txn}\n"

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

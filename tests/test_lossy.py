"""One-shot discovery on a lossy LAN: 25% of UDP packets dropped on input on both hosts.

Wi-Fi loses multicast at least 10% of the time.  A one-shot mDNS question
asked once, on such a link, is lost (or its answer is) about half of the
time at 25% loss each way; every such loss used to be a publish that
reached nobody, or a lookup answering "not found", with exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import wait_until
from tests.hosts import Network

LOSS = 25  # percent, on input, on both hosts
RUNS = 20


def test_one_shot_publishes_reach_a_subscriber_on_the_other_host(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    sub = b.sub_ready("lan.>")
    a.set_input_loss(LOSS)
    b.set_input_loss(LOSS)
    failed = []
    for n in range(RUNS):
        result = a.run("eda-pub", "lan.x", f"m{n}")
        if result.returncode != 0:
            failed.append((n, result.returncode, result.stderr))

    def received() -> set[str]:
        return {json.loads(line)["data"] for line in sub.lines()}

    expected = {f"m{n}" for n in range(RUNS)} - {f"m{n}" for n, _, _ in failed}
    wait_until(lambda: expected <= received(), 10, f"{sorted(expected - received())} to arrive")
    # nothing lost silently: a publish either arrived or said so with a non-zero exit
    assert received() == expected
    # and in fact none failed: a lost answer is made up by repeats and the cache
    assert failed == []


def test_first_contact_lookups_find_a_registered_service(network: Network, tmp_path: Path) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    serve = b.eda("eda-registry", "serve", "-v")
    serve.wait_stderr("announced registry", 15)
    reg = b.eda("eda-registry", "register", "-v", "orders", "--port", "8080")
    reg.wait_stderr("registered orders/", 15)
    first = a.run("eda-registry", "lookup", "orders")
    assert first.returncode == 0, first.stderr  # passing, before any loss
    a.set_input_loss(LOSS)
    b.set_input_loss(LOSS)
    codes = []
    for n in range(RUNS):
        # a fresh cache each time: the first contact, found by mDNS only
        result = a.run(
            "eda-registry", "lookup", "orders", env={"XDG_CACHE_HOME": str(tmp_path / f"fresh{n}")}
        )
        codes.append(result.returncode)
        if result.returncode == 0:
            [inst] = map(json.loads, result.stdout.splitlines())
            assert (inst["service"], inst["port"]) == ("orders", 8080)
    assert codes == [0] * RUNS

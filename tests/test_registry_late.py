"""A heartbeat that arrives late says nothing of now (issue 18, the nemesis's seed 3).

A registry peer served an instance 23.5 s after its registrant was frozen:
heartbeats the registrant sent before it froze had waited in a buffer (a
frozen registry's sockets, or a partition's retransmissions) and, read
afterwards, were taken as news.  Heartbeats now carry the registrant's own
clock and the registry bounds how late each one is (core/registry/lateness.py):
one a whole TTL late neither keeps nor revives its instance.
"""

from __future__ import annotations

import json
import time

import pytest

from eda.core.errors import ProtocolError
from eda.core.registry import model
from eda.core.registry.lateness import DRIFT, Lateness
from eda.core.registry.protocol import request_from
from eda.core.registry.store import Store
from tests.helpers import wait_until
from tests.hosts import Network

TTL = 1.5


def test_lateness_is_a_lower_bound_from_the_registrants_clock() -> None:
    now = [1000.0]
    late = Lateness(lambda: now[0])
    # the registrant's clock reads 5 when the registry's reads 1000, 0.01 s on the way
    assert late.of("a", ("c1", 4.99)) == 0.0
    now[0] += 1.0
    assert late.of("a", ("c1", 5.99)) == 0.0  # on time
    now[0] += 20.0  # sent 1 s later by its clock, read 20 s later: 19 s late at least
    assert late.of("a", ("c1", 6.99)) == pytest.approx(19.0 - DRIFT * 20, abs=1e-9)
    assert late.of("a", None) == 0.0  # an older registrant's heartbeat: on time
    assert late.of("a", ("c2", 7.0)) == 0.0  # a new process: its own clock
    assert late.of("b", ("c1", 6.99)) == 0.0  # another instance: its own base


def test_a_heartbeat_a_ttl_late_neither_keeps_nor_revives_its_instance() -> None:
    now = [1000.0]
    store = Store("r1", clock=lambda: now[0])

    def inst() -> model.Instance:
        return model.from_dict({"service": "orders", "id": "o1", "host": "h", "port": 1,
                                "ttl": 6.0})  # fmt: skip

    assert store.heartbeat(inst(), register=True)
    now[0] += 1.0
    assert store.heartbeat(inst(), late=6.0) == []  # sent 6 s ago: ignored
    assert store.entries["o1"].deadline == 1006.0  # still the registration's
    assert store.heartbeat(inst(), late=2.0) == []  # on time enough: counts from its sending
    assert (
        store.entries["o1"].deadline == 1005.0 + 1.0 and store.entries["o1"].inst.heartbeat == 999.0
    )
    assert store.heartbeat(inst()) == [] and store.entries["o1"].deadline == 1007.0
    store.heartbeat(inst(), late=4.0)  # a late one never shortens what a later one granted
    assert store.entries["o1"].deadline == 1007.0
    now[0] += 10.0
    assert [e["type"] for e in store.expire()] == ["expired"]
    assert store.heartbeat(inst(), late=6.5) == []  # nor revives it
    assert "o1" not in store.entries
    assert [e["reason"] for e in store.heartbeat(inst(), late=1.0)] == [
        "re-learned from a heartbeat"]  # fmt: skip


@pytest.mark.parametrize(
    "sent", [{"clock": "", "at": 1.0}, {"clock": "c", "at": "1"}, {"clock": "c", "at": True},
             {"clock": "c" * 65, "at": 1.0}, {"clock": "c", "at": float("nan")}, [1, 2]],
)  # fmt: skip
def test_a_malformed_sent_is_refused_at_the_edge(sent: object) -> None:
    msg = {"op": "heartbeat", "instance": {"service": "orders", "host": "h", "port": 1},
           "sent": sent}  # fmt: skip
    with pytest.raises(ProtocolError):
        request_from(msg)
    good = request_from({**msg, "sent": {"clock": "c", "at": 5}})
    assert good.sent == ("c", 5.0)


@pytest.mark.long
def test_heartbeats_queued_while_the_registry_was_frozen_do_not_revive_a_frozen_registrant(
    network: Network,
) -> None:
    host = network.add_host("a")
    endpoint = f"tcp://{host.address}:7700"
    registry = host.eda("eda-registry", "serve", "-v", "--no-mdns", "--tick", "0.2")
    registry.wait_stderr("listening", 30)
    registrant = host.eda(
        "eda-registry", "register", "-v", "orders", "--id", "late1", "--port", "8080",
        "--ttl", str(TTL), "--interval", "0.3", "--registry", endpoint, "--no-mdns",
    )  # fmt: skip
    registrant.wait_stderr("registered orders/", 30)
    host.stop(registry)  # its sockets keep what comes, unread
    registrant.wait_stderr("still trying", 30)  # heartbeats were sent to it, unanswered
    host.stop(registrant)
    frozen = time.time()
    time.sleep(3 * TTL)  # the scenario itself: both frozen for three TTLs
    host.cont(registry)  # it reads the queued heartbeats, all sent before `frozen`
    answers = []

    def gone() -> bool:
        r = host.run("eda-registry", "lookup", "orders", "--all", "--registry", endpoint,
                     "--no-mdns", timeout=30)  # fmt: skip
        found = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        answers.extend(found)
        return not found

    wait_until(gone, 30, "the frozen registrant's instance expired")
    # while it was still served, its last heartbeat was one from before it froze
    assert all(inst["heartbeat"] <= frozen for inst in answers), (answers, frozen)
    assert "re-learned from a heartbeat" not in registry.stderr

"""A registry holds at most --max-instances instances: registrations of new ids past it
are refused (one line, counted in /metrics), heartbeats of those held go on, and
replication is never refused (a replica that refused its peer's changes would never
converge).  Deleted ids are remembered for a while, at most MAX_TOMBSTONES of them."""

from __future__ import annotations

import urllib.request

import pytest

from eda.core.registry import store as store_module
from eda.core.registry.model import from_dict
from eda.core.registry.store import REGISTERED, RegistryFull, Store, make_event
from tests.helpers import Procs
from tests.test_http_registry import curl, post_json


def record(n: int, service: str = "orders") -> dict[str, object]:
    return {"id": f"i{n}", "service": service, "host": "127.0.0.1", "port": 9000 + n, "ttl": 30}


def test_a_full_store_refuses_new_ids_and_keeps_serving_those_it_holds() -> None:
    store = Store("r1", max_instances=2)
    store.heartbeat(from_dict(record(1)), register=True)
    store.heartbeat(from_dict(record(2)), register=True)
    with pytest.raises(RegistryFull, match=r"registry full: it holds 2 instances"):
        store.heartbeat(from_dict(record(3)), register=True)
    with pytest.raises(RegistryFull):  # a heartbeat that would re-learn a new id, too
        store.heartbeat(from_dict(record(4)))
    assert store.refused_full == 2 and sorted(store.entries) == ["i1", "i2"]
    assert store.heartbeat(from_dict(record(1) | {"status": "warning"}))  # held: taken
    store.deregister("i2")
    assert store.heartbeat(from_dict(record(3)), register=True)  # room again
    # a peer's change is applied past the cap
    remote = from_dict(record(5) | {"registry": "r2", "rev": 1})
    assert store.apply_remote(make_event(REGISTERED, remote, "registered", "r2", 0.0))
    assert "i5" in store.entries


def test_tombstones_are_bounded_oldest_forgotten_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_TOMBSTONES", 3)
    store = Store("r1")
    for n in range(6):
        store.heartbeat(from_dict(record(n)), register=True)
        store.deregister(f"i{n}")
    assert list(store.tombstones) == ["i3", "i4", "i5"]


def test_serve_refuses_registrations_past_max_instances(procs: Procs) -> None:
    reg = procs.eda("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                    "--max-instances", "2", "--http", "127.0.0.1:0",
                    "--metrics", "127.0.0.1:0")  # fmt: skip
    endpoint = reg.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    url = reg.wait_stderr(r"HTTP on (http://[^\s)]+)", 15).group(1)
    metrics = reg.wait_stderr(r"metrics on (http://127\.0\.0\.1:\d+)", 15).group(1)
    for n in (1, 2):
        assert post_json(f"{url}/v1/instances", record(n))[0] == 201
    status, body = post_json(f"{url}/v1/instances", record(3))
    assert status == 507 and body["title"] == "Registry full"
    assert "registry full: it holds 2 instances" in body["detail"]
    # over ZeroMQ, a registrant is told in one line
    refused = procs.eda("eda-registry", "register", "orders", "--port", "9003", "--no-mdns",
                        "--registry", endpoint)  # fmt: skip
    assert refused.wait(30) != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "registry full" in lines[0], lines
    # the instances held still heartbeat and are served
    assert post_json(f"{url}/v1/instances/i1/heartbeat", {}, "PUT")[0] == 200
    assert len(curl(f"{url}/v1/services/orders")[1]["instances"]) == 2
    scraped = urllib.request.urlopen(f"{metrics}/metrics", timeout=10).read().decode()
    assert "eda_registry_refused_registrations_total 2.0" in scraped

"""Prometheus metrics, in process: each daemon's families, names, histograms, SD targets.

The HTTP side (``--metrics`` on every daemon, a real Prometheus scraping them
through the registry's service discovery) is tests/test_metrics_prometheus.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from eda.core import metrics

# Prometheus's data model: metric and label names
NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
UNITS = ("_seconds", "_bytes", "_events", "_requests", "_transactions", "_sequence")


def scrape(daemon: Any) -> dict[str, Any]:
    """The families *daemon* exports, as a scrape renders and a Prometheus parser reads them."""
    text = metrics.Exporter(daemon.metrics).render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Any, suffix: str = "", **labels: str) -> float:
    found = [
        s.value for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]  # fmt: skip
    assert len(found) == 1, (family.name, labels, family.samples)
    return float(found[0])


def check_names(families: dict[str, Any], prefix: str) -> None:
    """Names per Prometheus's conventions: eda_PROGRAM_..., counters end in _total (the
    parser strips it from the family's name), histograms in _seconds, valid labels."""
    for name, family in families.items():
        assert NAME_RE.match(name), name
        if name.startswith(("process_", "python_")):
            continue  # prometheus-client's own
        assert name.startswith(prefix), name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name in (name + "_total", name + "_created"), sample.name
            for label in sample.labels:
                assert LABEL_RE.match(label) and not label.startswith("__"), label
                # Prometheus's own target labels: a metric's would be renamed exported_*
                assert label not in ("instance", "job"), (name, label)
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
    assert "process_resident_memory_bytes" in families  # the process collector


# -- the pieces ------------------------------------------------------------------------------
def test_histogram_buckets_are_cumulative_and_count_every_sample() -> None:
    hist = metrics.Histogram((0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 0.5, 2.0, 3.0):
        hist.observe(seconds)
    assert hist.buckets() == [("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 6)]
    assert hist.count == 6 and hist.sum == pytest.approx(5.565)


def test_a_registration_says_where_its_metrics_are_once_served() -> None:
    from eda.core.endpoint import Endpoint
    from eda.core.registry.access import registration

    saved = metrics._advertised
    try:
        metrics._advertised = None
        assert "metrics" not in registration("svc", 5000)["meta"]
        metrics.advertise(Endpoint("*", 9464))
        assert registration("svc", 5000)["meta"]["metrics"] == ":9464"
        metrics.advertise(Endpoint("10.0.0.5", 9464))
        assert registration("svc", 5000, meta=["role=worker"])["meta"] == {
            "role": "worker", "metrics": "10.0.0.5:9464",
        }  # fmt: skip
    finally:
        metrics._advertised = saved


@pytest.mark.parametrize(
    ("given", "host", "expected"),
    [
        (":9464", "10.0.0.7", "10.0.0.7:9464"),
        ("10.0.0.5:9100", "10.0.0.7", "10.0.0.5:9100"),
        ("[fe80::1]:9100", "10.0.0.7", "[fe80::1]:9100"),
        (":9464", "fe80::7", "[fe80::7]:9464"),
        (":0", "10.0.0.7", None),
        (":99999", "10.0.0.7", None),
        ("10.0.0.5", "10.0.0.7", None),
        ("a b:80", "10.0.0.7", None),
        ("x:80/../../admin", "10.0.0.7", None),
        ("\n:80", "10.0.0.7", None),
    ],
)
def test_a_peer_written_metrics_address_is_checked(
    given: str, host: str, expected: str | None
) -> None:
    bracketed = f"[{host}]" if ":" in host else host
    assert metrics.target(given, bracketed) == expected


@given(st.text(max_size=300))
def test_any_metrics_value_is_a_valid_target_or_none(text: str) -> None:
    found = metrics.target(text, "10.0.0.7")
    assert found is None or re.fullmatch(r"[\w.\-:\[\]]+:\d{1,5}", found)


def test_metrics_address_option_parses_host_port() -> None:
    from eda.core.errors import UsageError

    assert str(metrics.parse_address("127.0.0.1:9464")) == "127.0.0.1:9464"
    assert metrics.parse_address(":9464").host == "*"
    assert str(metrics.parse_address("[::1]:0")) == "[::1]:0"
    for bad in ("9464x", "host:", "host:70000", ""):
        with pytest.raises(UsageError):
            metrics.parse_address(bad)


# -- each daemon's families -------------------------------------------------------------------
@pytest.fixture
def registry() -> Iterator[Any]:
    from eda.core.registry.server import Server, Settings

    server = Server(Settings(bind="tcp://127.0.0.1:0", mdns=False))
    try:
        yield server
    finally:
        server.close()


def test_registry_exports_instances_heartbeats_and_expiries(registry: Any) -> None:
    from eda.core.registry.model import from_dict
    from eda.core.registry.protocol import Request

    def record(inst_id: str) -> Any:
        return from_dict({"service": "orders", "id": inst_id, "host": "10.0.0.7",
                          "port": 5000, "ttl": 30.0})  # fmt: skip

    registry._op_register(Request(op="register", instance=record("a")))
    registry._op_register(Request(op="register", instance=record("b")))
    registry._op_register(Request(op="heartbeat", instance=record("a")))
    registry.store.entries["b"].deadline = 0  # past its TTL: the next pass expires it
    registry._publish(registry.store.expire())
    found = scrape(registry)
    check_names(found, "eda_registry_")
    assert value(found["eda_registry_instances"], service="orders", status="passing") == 1
    assert value(found["eda_registry_heartbeats"], "_total") == 1
    assert value(found["eda_registry_registrations"], "_total") == 2
    assert value(found["eda_registry_changes"], "_total", kind="expired") == 1
    assert value(found["eda_registry_changes"], "_total", kind="registered") == 2


def test_registry_prometheus_sd_lists_instances_serving_metrics(registry: Any) -> None:
    from eda.core.registry.metrics import sd_groups
    from eda.core.registry.model import from_dict
    from eda.core.registry.protocol import Request

    for inst_id, meta in (("w1", {"metrics": ":9464", "role": "worker"}),
                          ("w2", {"metrics": "10.0.0.9:9100"}),
                          ("w3", {}),  # serves no metrics: not a target
                          ("w4", {"metrics": "bogus"})):  # fmt: skip
        inst = from_dict({"service": "orders", "id": inst_id, "host": "10.0.0.7",
                          "port": 5000, "meta": meta})  # fmt: skip
        registry._op_register(Request(op="register", instance=inst))
    saved = metrics._advertised
    try:
        metrics._advertised = None  # this registry serves none itself
        groups = sd_groups(registry)
        assert groups == sd_groups(registry, "orders")
        assert sd_groups(registry, "other") == []
    finally:
        metrics._advertised = saved
    assert [g["targets"] for g in groups] == [["10.0.0.7:9464"], ["10.0.0.9:9100"]]
    assert groups[0]["labels"] == {
        "__meta_eda_service": "orders", "__meta_eda_instance": "w1",
        "__meta_eda_status": "passing", "__meta_eda_role": "worker",
        "__meta_eda_registry": registry.id,
    }  # fmt: skip


def test_bus_exports_the_log_consumers_and_disk(tmp_path: Path) -> None:
    from eda.core.bus import SQLiteEngine
    from eda.core.bus.server import BusServer, Settings

    engine = SQLiteEngine(tmp_path / "bus.db")
    server = BusServer(engine, Settings(bind="tcp://127.0.0.1:0", mdns=False))
    try:
        found = scrape(server)
    finally:
        server.close()
        engine.close()
    check_names(found, "eda_bus_")
    assert value(found["eda_bus_events_stored"], "_total") == 0
    assert value(found["eda_bus_disk_bytes"]) > 0
    for name in ("eda_bus_events_delivered", "eda_bus_events_lost",
                 "eda_bus_batches_confirmed", "eda_bus_consumer_lag_events"):  # fmt: skip
        assert name in found, name


def test_lb_worker_and_broker_export_requests_and_latency_histograms() -> None:
    from eda.core.lb.balancer import Backend
    from eda.core.lb.broker import Broker, Settings
    from eda.core.lb.brokerworkers import Worker as Entry
    from eda.core.lb.worker import Worker

    worker = Worker("svc", ["cat"])
    broker = Broker(Settings(service="svc"))
    try:
        worker.inst_id = "svc-1"
        worker.requests = 3
        for seconds in (0.002, 0.02, 0.2):
            worker.latency.observe(seconds)
        entry = Entry(b"w", "w-1", 1, 1, Backend("w-1", 1), 0.0, 1.0)
        entry.requests = 2
        entry.latency.observe(0.004)
        entry.latency.observe(0.3)
        broker.workers[b"w"] = entry
        gone = Entry(b"v", "w-1", 1, 1, Backend("w-1", 1), 0.0, 1.0)  # its earlier connection
        gone.dead, gone.requests = True, 7
        broker.members.dead.append(gone)
        from_worker, from_broker = scrape(worker), scrape(broker)
    finally:
        worker.shutdown()
        broker.close()
    check_names(from_worker, "eda_lb_worker_")
    check_names(from_broker, "eda_lb_broker_")
    latency = from_worker["eda_lb_worker_request_duration_seconds"]
    assert value(latency, "_count") == 3
    assert value(latency, "_bucket", le="0.025") == 2
    per_instance = from_broker["eda_lb_broker_request_duration_seconds"]
    assert value(per_instance, "_count", worker="w-1") == 2
    # one series per worker id (value() asserts it): the live connection's
    assert value(from_broker["eda_lb_broker_instance_requests"], "_total", worker="w-1") == 2
    assert value(from_broker["eda_lb_broker_instance_state"], worker="w-1",
                 state="healthy") == 1  # fmt: skip
    assert "eda_lb_broker_ejections" in from_broker


def test_lb_proxy_families_come_from_its_figures() -> None:
    from eda.core.lb.metrics import proxy_families

    figures = {"backends": [
        {"id": "web-1", "state": "up", "sessions": 2, "sessions_total": 40, "bytes_in": 10,
         "bytes_out": 90, "connect_errors": 1},
        {"id": "web-2", "state": "down", "sessions": 0, "sessions_total": 0, "bytes_in": 0,
         "bytes_out": 0, "connect_errors": 5},
    ]}  # fmt: skip
    exporter = metrics.Exporter(proxy_families(lambda: figures))
    found = {f.name: f for f in text_string_to_metric_families(exporter.render().decode())}
    check_names(found, "eda_lb_proxy_")
    assert value(found["eda_lb_proxy_connections"], "_total", backend="web-1") == 40
    assert value(found["eda_lb_proxy_instance_up"], backend="web-2") == 0
    assert value(found["eda_lb_proxy_connect_errors"], "_total", backend="web-2") == 5


def test_txn_daemons_export_outcomes_and_in_doubt(tmp_path: Path) -> None:
    from eda.core.txn.actions import ShellActions
    from eda.core.txn.coordinator import Coordinator
    from eda.core.txn.directory import Directory
    from eda.core.txn.participant import Participant

    coord = Coordinator("c1", tmp_path / "c", directory=Directory({}),
                        bind="tcp://127.0.0.1:*")  # fmt: skip
    part = Participant("stock", ShellActions("stock", {}), tmp_path / "p",
                       bind="tcp://127.0.0.1:*")  # fmt: skip
    try:
        coord.committed, coord.aborted = 5, 2
        part.txns["t1"] = {"txn": "t1", "state": "prepared"}
        from_coord, from_part = scrape(coord), scrape(part)
    finally:
        coord.close()
        part.close()
    check_names(from_coord, "eda_txn_coordinator_")
    check_names(from_part, "eda_txn_participant_")
    outcomes = from_coord["eda_txn_coordinator_transactions"]
    assert value(outcomes, "_total", outcome="committed") == 5
    assert value(outcomes, "_total", outcome="aborted") == 2
    assert value(from_part["eda_txn_participant_in_doubt_transactions"]) == 1
    assert value(from_coord["eda_txn_coordinator_journal_bytes"]) >= 0


def test_the_grafana_dashboard_queries_only_exported_names(tmp_path: Path) -> None:
    """Every eda_* series contrib/grafana/eda.json asks for is one a daemon exports."""
    import json

    from eda.core.bus import SQLiteEngine
    from eda.core.bus.server import BusServer
    from eda.core.bus.server import Settings as BusSettings
    from eda.core.lb.broker import Broker
    from eda.core.lb.broker import Settings as BrokerSettings
    from eda.core.lb.metrics import proxy_families
    from eda.core.lb.worker import Worker
    from eda.core.registry.server import Server, Settings
    from eda.core.txn.actions import ShellActions
    from eda.core.txn.coordinator import Coordinator
    from eda.core.txn.directory import Directory
    from eda.core.txn.participant import Participant

    engine = SQLiteEngine(tmp_path / "bus.db")
    daemons = [
        Server(Settings(bind="tcp://127.0.0.1:0", mdns=False)),
        BusServer(engine, BusSettings(bind="tcp://127.0.0.1:0", mdns=False)),
        Broker(BrokerSettings(service="svc")),
        Coordinator("c1", tmp_path / "c", directory=Directory({}), bind="tcp://127.0.0.1:*"),
        Participant("p", ShellActions("p", {}), tmp_path / "p", bind="tcp://127.0.0.1:*"),
    ]
    worker = Worker("svc", ["cat"])
    exported: set[str] = set()
    try:
        for source in [*(d.metrics for d in daemons), worker.metrics,
                       proxy_families(lambda: {"backends": []})]:  # fmt: skip
            text = metrics.Exporter(source).render().decode()
            for family in text_string_to_metric_families(text):  # (empty ones too)
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
                exported.update(family.name + x for x in suffixes.get(family.type, ("",)))
    finally:
        worker.shutdown()
        for daemon in daemons:
            daemon.close()
        engine.close()
    exported |= {"eda_service", "eda_instance"}  # target labels the README's relabeling adds
    dashboard = json.loads((Path(__file__).parent.parent / "contrib/grafana/eda.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    asked = {name for e in exprs for name in re.findall(r"\beda_[a-z0-9_]*[a-z0-9]\b", e)}
    assert asked - exported == set()
    families_asked = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in asked}
    assert len(families_asked) > 25

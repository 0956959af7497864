"""``--metrics`` end to end: every daemon serves /metrics, and a real Prometheus
(the Debian package) scrapes the daemons it finds through the registry's HTTP SD."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Procs, require_tools, run, wait_until
from tests.test_metrics import check_names

LB = [sys.executable, "-m", "eda.cli.lb"]
TXN = [sys.executable, "-m", "eda.cli.txn"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def scraped(port: int) -> dict[str, Any]:
    """The families on http://127.0.0.1:PORT/metrics, once it answers."""
    _, text = wait_until(
        lambda: (lambda r: r if r[0] == 200 else None)(get(f"http://127.0.0.1:{port}/metrics")),
        20, f"/metrics on port {port}",
    )  # fmt: skip
    return {f.name: f for f in text_string_to_metric_families(text)}


def registry(procs: Procs, metrics: int) -> str:
    reg = procs.eda("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                    "--metrics", f"127.0.0.1:{metrics}")  # fmt: skip
    return reg.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)


def prometheus(procs: Procs, tmp_path: Path, sd_url: str) -> int:
    """A real Prometheus with one http_sd_configs entry (the registry's), scraping every
    second; its HTTP port."""
    require_tools("prometheus", install="prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: eda
    http_sd_configs:
      - url: {sd_url}
        refresh_interval: 1s
    relabel_configs:
      - source_labels: [__meta_eda_service]
        target_label: eda_service
      - source_labels: [__meta_eda_instance]
        target_label: eda_instance
""")
    procs.start([
        shutil.which("prometheus") or "prometheus", f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
    ])  # fmt: skip
    return port


def query(port: int, promql: str) -> list[dict[str, Any]]:
    status, text = get(
        f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    )
    if status != 200:
        return []
    answer = json.loads(text)
    return list(answer["data"]["result"]) if answer.get("status") == "success" else []


@pytest.mark.long
def test_prometheus_scrapes_the_daemons_the_registry_lists(procs: Procs, tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("registry", "worker", "broker", "part", "coord")}
    reg = registry(procs, ports["registry"])
    common = ("--no-mdns", "--registry", reg)
    worker = procs.start([*LB, "worker", "echo", *common, "--metrics",
                          f"127.0.0.1:{ports['worker']}", "--", "cat"])  # fmt: skip
    broker = procs.start([*LB, "serve", "echo", *common, "--bind", "tcp://127.0.0.1:*",
                          "--backend", "tcp://127.0.0.1:*", "--metrics",
                          f"127.0.0.1:{ports['broker']}"])  # fmt: skip
    part = procs.start([*TXN, "participant", "stock", *common, "--bind", "tcp://127.0.0.1:*",
                        "--log", str(tmp_path / "p"), "--prepare", "true", "--commit", "true",
                        "--abort", "true", "--metrics", f"127.0.0.1:{ports['part']}"])  # fmt: skip
    coord = procs.start([*TXN, "coordinator", "--name", "c1", *common, "--bind",
                         "tcp://127.0.0.1:*", "--log", str(tmp_path / "c"), "--metrics",
                         f"127.0.0.1:{ports['coord']}"])  # fmt: skip
    for proc, pattern in ((worker, "serving echo"), (broker, "broker .* for echo"),
                          (part, "participant stock listening"),
                          (coord, "coordinator c1 listening")):  # fmt: skip
        proc.wait_stderr(pattern, 20)
    # work for every daemon: requests through eda-lb, a transaction through 2PC
    called = subprocess.run([*LB, "call", "echo", *common, "one", "two", "three"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert called.returncode == 0, called.stderr
    committed = subprocess.run([*TXN, "commit", "-p", "stock", *common, "--data", "{}"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert committed.returncode == 0, committed.stderr

    # every daemon's own /metrics, names by Prometheus's conventions
    for name, prefix in (("registry", "eda_registry_"), ("worker", "eda_lb_worker_"),
                         ("broker", "eda_lb_broker_"), ("part", "eda_txn_participant_"),
                         ("coord", "eda_txn_coordinator_")):  # fmt: skip
        check_names(scraped(ports[name]), prefix)
    found = scraped(ports["worker"])
    latency = found["eda_lb_worker_request_duration_seconds"]
    assert [s.value for s in latency.samples if s.name.endswith("_count")] == [3.0]

    # the SD lists each of them, with where its /metrics is
    sd = f"http://127.0.0.1:{ports['registry']}/v1/prometheus-sd"
    groups = wait_until(
        lambda: (lambda g: g if len(g) == 5 else None)(json.loads(get(sd)[1])),
        20, "five targets in the service discovery",
    )  # fmt: skip
    assert {g["targets"][0] for g in groups} == {f"127.0.0.1:{p}" for p in ports.values()}
    assert {g["labels"]["__meta_eda_service"] for g in groups} == {
        "eda-registry", "echo", "txn-stock", "txn-coordinator",
    }  # fmt: skip
    status, one = get(sd + "/echo")
    assert status == 200 and {g["labels"]["__meta_eda_role"] for g in json.loads(one)} == {
        "worker", "broker",
    }  # fmt: skip

    # a real Prometheus, given only the SD URL, scrapes them all
    prom = prometheus(procs, tmp_path, sd)
    up = wait_until(
        lambda: (lambda r: r if len(r) == 5 else None)(query(prom, "up == 1")),
        60, "Prometheus scraping five eda targets",
    )  # fmt: skip
    assert {r["metric"]["eda_service"] for r in up} >= {"eda-registry", "echo"}
    series = wait_until(lambda: query(prom, "eda_lb_worker_requests_total"), 30,
                        "eda_lb_worker_requests_total in Prometheus")  # fmt: skip
    assert series[0]["value"][1] == "3"
    assert wait_until(lambda: query(prom, 'eda_txn_coordinator_transactions_total'
                                          '{outcome="committed"} == 1'), 30, "the commit")
    assert wait_until(lambda: query(
        prom, "histogram_quantile(0.5, eda_lb_broker_request_duration_seconds_bucket)"
    ), 30, "the broker's latency histogram")  # fmt: skip


def test_bus_and_tcp_proxy_serve_metrics(procs: Procs, tmp_path: Path) -> None:
    proxy_port, reg_port = free_port(), free_port()
    bus = procs.eda("eda-bus", "serve", "--no-mdns", "--data", str(tmp_path / "bus"),
                    "--bind", "tcp://127.0.0.1:*", "--metrics", "127.0.0.1:0")  # fmt: skip
    where = bus.wait_stderr(r"serving .* on (tcp://\S+)", 15).group(1)
    # port 0: any free one, said at start
    bus_port = int(bus.wait_stderr(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    published = run("eda-pub", "--bus", where, "--confirm", "orders.created",
                    input="a\nb\nc\n", env={"EDA_NO_MDNS": "1"})  # fmt: skip
    assert published.returncode == 0, published.stderr
    found = scraped(bus_port)
    check_names(found, "eda_bus_")
    stored = found["eda_bus_events_stored"].samples
    assert [s.value for s in stored if s.name.endswith("_total")] == [3.0]
    topic = found["eda_bus_topic_events"].samples
    assert [(s.labels["topic"], s.value) for s in topic] == [("orders.created", 3.0)]

    reg = registry(procs, reg_port)
    proxy = procs.start([*LB, "tcp", "web", "--listen", "127.0.0.1:0", "--no-mdns",
                         "--registry", reg, "--metrics", f"127.0.0.1:{proxy_port}"])  # fmt: skip
    proxy.wait_stderr("proxying", 15)
    check_names(scraped(proxy_port), "eda_lb_proxy_")
    # the proxy's stats instance is registered with where its metrics are
    sd = f"http://127.0.0.1:{reg_port}/v1/prometheus-sd/web"
    wait_until(lambda: json.loads(get(sd)[1]), 20, "the proxy in the service discovery")
    assert json.loads(get(sd)[1])[0]["targets"] == [f"127.0.0.1:{proxy_port}"]


def test_a_bad_or_taken_metrics_address_is_a_one_line_error(procs: Procs) -> None:
    bad = run("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
              "--metrics", "localhost:http")  # fmt: skip
    assert bad.returncode == 2 and "--metrics" in bad.stderr, bad.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        reg_port = free_port()
        reg = registry(procs, reg_port)
        worker = subprocess.run([*LB, "worker", "echo", "--no-mdns", "--registry", reg,
                                 "--metrics", f"127.0.0.1:{port}", "--", "cat"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        taken.close()
    assert worker.returncode == 1, worker.stderr
    assert worker.stderr.count("\n") == 1 and "eda-lb: error:" in worker.stderr
    assert "Traceback" not in worker.stderr
    # it never registered: nothing to find
    assert json.loads(get(f"http://127.0.0.1:{reg_port}/v1/prometheus-sd/echo")[1]) == []


@pytest.fixture(autouse=True)
def _no_xdg_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remembered ports and caches stay in this test's directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_metrics_port_keeps_answering_through_junk_and_forged_records(
    procs: Procs, tmp_path: Path
) -> None:
    port = free_port()
    reg = registry(procs, port)
    # a forged metrics address in a registration is left out of the discovery
    forged = procs.eda("eda-registry", "register", "svc", "--port", "5000", "--no-mdns",
                       "--registry", reg, "--meta", "metrics=evil/../x:80")  # fmt: skip
    honest = procs.eda("eda-registry", "register", "svc", "--port", "5001", "--no-mdns",
                       "--registry", reg, "--meta", "metrics=:9999")  # fmt: skip
    sd = f"http://127.0.0.1:{port}/v1/prometheus-sd/svc"
    wait_until(lambda: json.loads(get(sd)[1]), 20, "the honest instance in the discovery")
    junk = []
    for i in range(50):  # garbage, half requests, a request line that never ends
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall([b"\x00\xff" * 300, b"GET /metrics HTTP/1.1\r\nHost: x", b"GET /" * 2000][i % 3])
        junk.append(sock)
    try:
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "eda_registry_instances" in text
        groups = json.loads(get(sd)[1])
        assert [g["targets"] for g in groups] == [["127.0.0.1:9999"]]
    finally:
        for sock in junk:
            sock.close()
    assert forged.popen.poll() is None and honest.popen.poll() is None

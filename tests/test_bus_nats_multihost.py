"""eda-bus on NATS JetStream at CLI level, across namespaced hosts.

A 3-node JetStream cluster (three hosts, ``start_nodes`` of
tests/natsnodes.py), eda-bus fronts on hosts of their own, eda-pub and
eda-sub on two more hosts, finding a front by mDNS.  Failures: kill -9 of a
NATS node during a confirmed stream of 200,000 events, kill -9 of a front,
a partition cutting one node off.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Proc, wait_until
from tests.hosts import Host, Network, ip
from tests.natsnodes import front, start_nodes
from tests.test_bus import _feed


@pytest.fixture
def nodes(network: Network, tmp_path: Path) -> tuple[list[Host], list[str]]:
    """Three clustered ``nats-server -js`` nodes on hosts n1..n3; their URLs."""
    hosts = [network.add_host(f"n{i}") for i in range(1, 4)]
    # the test process reaches the nodes through an address on the bridge
    ip("addr", "add", f"10.231.{network.net}.1/24", "dev", network.bridge)
    return hosts, start_nodes(hosts, tmp_path)


async def _info(urls: list[str], stream: str) -> Any:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=2, allow_reconnect=False)
    try:
        return await nc.jetstream(timeout=5).stream_info(stream)
    finally:
        await nc.close()


def stream_info(urls: list[str], stream: str = "EDA") -> Any:
    """JetStream's own view of *stream* (nats-py StreamInfo)."""
    return asyncio.run(_info(urls, stream))


def leader(hosts: list[Host], urls: list[str]) -> Host:
    """The host of the node leading stream EDA (node n<i> runs on hosts[i-1])."""
    name = str(stream_info(urls).cluster.leader)
    return hosts[int(name[1:]) - 1]


def connected_to(host: Host, nodes: list[Host]) -> Host:
    """The node *host*'s NATS client is connected to (its one link to port 4222)."""
    out = subprocess.run([*host.prefix, "ss", "-Htn", "state", "established", "dport", "= :4222"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    (peer,) = {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines()}
    return next(n for n in nodes if n.address == peer)


def events_of(
    host: Host, pattern: str, n: int, *args: str, bus: str = "", front: Proc | None = None
) -> list[str]:
    """*n* events replayed on *host*, through the bus at *bus* (default: found by mDNS);
    a failure shows the log of *front* (the bus serving them) too."""
    where = [bus] if bus else []
    got = host.run("eda-sub", "--bus", *where, pattern, "--from-start", "-C", str(n), "-W", "15",
                   "--raw", *args, timeout=180)  # fmt: skip
    assert got.returncode == 0, got.stderr + (f"front:\n{front.stderr[-4000:]}" if front else "")
    return got.stdout.splitlines()


@pytest.mark.long
def test_200k_confirmed_events_survive_a_killed_node_and_fronts_are_found_by_mdns(
    network: Network, nodes: tuple[list[Host], list[str]]
) -> None:
    hosts, urls = nodes
    engine = ",".join(urls)
    f1, f2, pub_host, sub_host = (network.add_host(n) for n in ("f1", "f2", "pub", "sub"))
    bus1, ep1 = front(f1, engine)
    probe = pub_host.run("eda-pub", "--bus", "--confirm", "--timeout", "30", "probe.x", "one")
    assert probe.returncode == 0, probe.stderr  # found f1 by mDNS (and remembered it)
    bus2, ep2 = front(f2, engine)  # a second front on the same stream

    n = 200_000
    pub = pub_host.eda("eda-pub", "--bus", "--confirm", "--timeout", "60", "nums",
                       stdin=subprocess.PIPE)  # fmt: skip
    _feed(pub, range(1, 50_001))
    wait_until(lambda: _stored(pub_host, ep1) > 1, 30, "events stored")
    killed = leader(hosts, urls)
    killed.kill()  # kill -9 of the stream leader's nats-server, the stream going on
    _feed(pub, range(50_001, n + 1))
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    assert pub.wait(90) == 0, pub.stderr  # every event confirmed, no user action

    # replayed through the other front, which wrote none of them
    got = events_of(sub_host, "nums", n, bus=ep2, front=bus2)
    assert sorted(int(x) for x in got) == list(range(1, n + 1))  # each exactly once
    extra = sub_host.run("eda-sub", "--bus", ep2, "nums", "--from-seq", str(n + 2), "-W", "1")
    assert extra.returncode == 4 and extra.stdout == ""  # nothing beyond (seq 1 was probe.x)

    # two fronts found by mDNS: kill -9 of the one the publisher uses, the next finds the other
    bus1.kill()
    after = pub_host.run("eda-pub", "--bus", "--confirm", "--timeout", "30", "after.x", "two")
    assert after.returncode == 0, after.stderr
    assert events_of(sub_host, "after.x", 1) == ["two"]
    assert bus2.popen.poll() is None


def _stored(host: Host, ep: str) -> int:
    done = host.run("eda-bus", "stats", "--bus", ep, "--json")
    rows = [json.loads(x) for x in done.stdout.splitlines()]
    return int(next((r["events"] for r in rows if r.get("kind") == "bus"), 0) or 0)


@pytest.mark.long
def test_a_partition_confirms_on_the_majority_and_times_out_on_the_minority(
    network: Network, nodes: tuple[list[Host], list[str]]
) -> None:
    hosts, urls = nodes
    f1, pub_host, sub_host = (network.add_host(n) for n in ("f1", "pub", "sub"))
    bus1, _ = front(f1, ",".join(urls))
    first = pub_host.run("eda-pub", "--bus", "--confirm", "--timeout", "30", "maj.x",
                         input="".join(f"{i}\n" for i in range(1, 101)))  # fmt: skip
    assert first.returncode == 0, first.stderr
    cut = connected_to(f1, hosts)  # the node the front uses: the front must move on by itself
    # on the host to be cut off: a front that reaches only its own node, and a publisher
    _, ep_min = front(cut, "nats://127.0.0.1:4222", "--no-mdns", "--bind", "tcp://127.0.0.1:0")
    ep_min = ep_min.replace(cut.address, "127.0.0.1")
    minority = cut.eda("eda-pub", "--bus", ep_min, "--confirm", "--timeout", "8", "min.x",
                       stdin=subprocess.PIPE)  # fmt: skip
    cut.cut()
    _feed(minority, range(1, 11))
    assert minority.popen.stdin is not None
    minority.popen.stdin.close()
    # the majority side goes on: the two other nodes elect a leader, f1 confirms
    more = pub_host.run("eda-pub", "--bus", "--confirm", "--timeout", "40", "maj.x",
                        input="".join(f"{i}\n" for i in range(101, 1001)), timeout=60)  # fmt: skip
    assert more.returncode == 0, more.stderr
    assert minority.wait(30) == 4, minority.stderr  # a timeout, never a false confirmation
    assert "did not confirm 10 event(s)" in minority.stderr
    cut.reconnect()
    got = events_of(sub_host, "maj.x", 1000, front=bus1)
    assert got == [str(i) for i in range(1, 1001)]
    lone = sub_host.run("eda-sub", "--bus", "min.x", "--from-start", "-W", "3", "--raw")
    assert lone.stdout.split() in ([], [str(i) for i in range(1, 11)])  # at most once


@pytest.mark.long
def test_serve_changes_the_replicas_and_limits_of_an_existing_stream_or_refuses_clearly(
    network: Network, nodes: tuple[list[Host], list[str]]
) -> None:
    urls = nodes[1]
    engine = ",".join(urls)
    f1 = network.add_host("f1")

    def serve(*args: str) -> tuple[Proc, str]:
        return front(f1, engine, "--no-mdns", *args, replicas=False)

    bus, ep = serve("--replicas", "1", "--max-age", "1h", "--stream", "GROW")
    sent = f1.run("eda-pub", "--bus", ep, "--confirm", "g.x", input="".join(
        f"{i}\n" for i in range(1, 101)))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    bus.kill()
    cfg = stream_info(urls, "GROW").config
    assert (cfg.num_replicas, cfg.max_age) == (1, 3600)
    # served again with three copies and other limits: the stream is changed in place
    bus, ep = serve("--replicas", "3", "--max-age", "2h", "--max-bytes", "1GB", "--stream", "GROW")
    assert "NATS stream GROW changed: replicas 1 -> 3, max_age 1h -> 2h" in bus.stderr
    cfg = stream_info(urls, "GROW").config
    assert (cfg.num_replicas, cfg.max_age, cfg.max_bytes) == (3, 7200, 10**9)
    assert stream_info(urls, "KV_GROW_consumers").config.num_replicas == 3
    got = f1.run("eda-sub", "--bus", ep, "g.x", "--from-start", "-C", "100", "--raw", "-W", "10")
    assert got.stdout.split() == [str(i) for i in range(1, 101)], got.stderr
    bus.kill()
    # served without them: nothing changes (not back to one copy)
    bus, _ = serve("--stream", "GROW")
    assert "changed" not in bus.stderr
    assert stream_info(urls, "GROW").config.num_replicas == 3
    bus.kill()
    # a change JetStream refuses (5 copies on 3 servers): one line, status 2, nothing changed
    refused = f1.run("eda-bus", "serve", "--engine", engine, "--stream", "GROW",
                     "--replicas", "5", "--no-mdns", timeout=60)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("eda-bus: error: cannot change NATS stream GROW (replicas")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert stream_info(urls, "GROW").config.num_replicas == 3

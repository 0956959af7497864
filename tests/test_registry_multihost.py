"""eda-registry across hosts (network namespaces on a bridge), found by mDNS."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import Procs, wait_until
from tests.hosts import Host, Network

TTL = 1.0
FAST = ("--interval", "0.2", "--ttl", str(TTL))


def serve(host: Host, *args: str) -> str:
    proc = host.eda("eda-registry", "serve", "-v", "--tick", "0.1", "--peer-timeout", "0.6", *args)
    proc.wait_stderr("announced registry", 15)
    return proc.wait_stderr(r"registry (\w+) listening").group(1)


def found(result: subprocess.CompletedProcess[str]) -> list[tuple[str, int]]:
    return sorted((r["host"], r["port"]) for r in map(json.loads, result.stdout.splitlines()))


@pytest.mark.long
def test_instances_on_two_hosts_found_by_mdns_and_kill_9_expires(network: Network) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    serve(a)
    on_b = b.eda(
        "eda-registry", "register", "-v", "orders", "--port", "8080", "--interval", "0.3",
        "--ttl", "3",
    )  # fmt: skip
    on_c = c.eda("eda-registry", "register", "-v", "orders", "--port", "8080", *FAST)
    for proc in (on_b, on_c):
        proc.wait_stderr("registered orders/")
    result = c.run("eda-registry", "lookup", "orders")
    assert (result.returncode, result.stderr) == (0, "")
    assert found(result) == [(b.address, 8080), (c.address, 8080)]  # each host's own address
    watcher = a.eda("eda-registry", "watch", "-v", "orders")
    watcher.wait_stderr("watching registry", 15)
    b.kill()  # SIGKILL: no deregistration
    # the TTL is judged on the registry's own expiry time: a lookup process may start slowly
    wait_until(
        lambda: found(a.run("eda-registry", "lookup", "orders")) == [(c.address, 8080)],
        what="b's instance expired",
    )
    watcher.wait_lines(1)
    [expired] = [json.loads(line) for line in watcher.lines()]
    assert (expired["type"], expired["instance"]["host"]) == ("expired", b.address)
    expired_at = datetime.fromisoformat(expired["time"].replace("Z", "+00:00")).timestamp()
    # one TTL after the last heartbeat the registry saw, on its own clock: never early,
    # room for a loaded machine, yet well under two TTLs
    assert 3.0 - 0.001 <= expired_at - expired["instance"]["heartbeat"] < 3.0 + 2.0  # whole ms


@pytest.mark.long
def test_two_registries_replicate_and_clients_fail_over(network: Network) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    id_a = serve(a)
    id_b = serve(b)
    ep_a = f"tcp://{a.address}:7700"
    ep_b = f"tcp://{b.address}:7700"
    for host in (a, b):  # both have found and greeted each other
        wait_until(
            lambda h=host: "replicating with peer" in h.started[0].stderr,
            timeout=10,
            what="peering",
        )
    reg = c.eda(
        "eda-registry", "register", "-v", "orders", "--port", "8080", "--registry", ep_a, *FAST
    )
    reg.wait_stderr(f"with registry {id_a}")
    wait_until(
        lambda: (
            found(c.run("eda-registry", "lookup", "orders", "--registry", ep_b))
            == [(c.address, 8080)]
        ),
        what="registration replicated to b",
    )
    watcher = c.eda("eda-registry", "watch", "-v", "orders", "--registry", ep_b)
    watcher.wait_stderr("watching registry")
    follower = c.eda("eda-registry", "watch", "-v", "orders", "--registry", ep_a)
    follower.wait_stderr(f"watching registry {id_a}")
    # a plain lookup finds a registry by mDNS and remembers it and its peers
    assert found(c.run("eda-registry", "lookup", "orders")) == [(c.address, 8080)]
    a.kill()  # the registry the instance talks to dies
    reg.wait_stderr(f"heartbeats now go to registry {id_b}", 10)
    # well past the TTL and the peer timeout: b still serves it, now owning it
    wait_until(lambda: "went silent" in b.started[0].stderr, what="b notices a is gone")
    span, looked = time.monotonic() + 2 * TTL, 0  # lookups over two TTLs at least
    while looked < 3 or time.monotonic() < span:
        result = c.run("eda-registry", "lookup", "orders", "--registry", ep_b)
        assert found(result) == [(c.address, 8080)]
        looked += 1
    assert json.loads(result.stdout)["registry"] == id_b
    # clients that knew only a fail over by themselves
    plain = c.run("eda-registry", "lookup", "orders")
    assert found(plain) == [(c.address, 8080)], plain.stderr
    follower.wait_stderr("went silent; reconnecting", 15)
    reg.signal(15)
    assert reg.wait() == 0
    watcher.wait_lines(1)
    assert [json.loads(line)["type"] for line in watcher.lines()] == ["deregistered"]
    follower.wait_lines(1)  # it reached b by itself: b's change arrives
    assert [json.loads(line)["type"] for line in follower.lines()] == ["deregistered"]
    assert json.loads(follower.lines()[0])["registry"] == id_b


@pytest.mark.long
def test_serverless_register_lookup_watch_and_kill_9(network: Network, procs: Procs) -> None:
    a, b, c = (network.add_host(n) for n in "abc")
    watcher = c.eda("eda-registry", "watch", "-v", "orders")
    watcher.wait_stderr("serverless mode")
    killed = a.eda(
        "eda-registry", "register", "-v", "orders", "--port", "8080", "--meta", "zone=a", *FAST
    )
    killed.wait_stderr("no registry found: serverless mode")
    killed.wait_stderr("by mDNS", 15)
    stays = b.eda(
        "eda-registry", "register", "-v", "orders", "--port", "8081", "--serverless", *FAST
    )
    stays.wait_stderr("by mDNS", 15)
    result = c.run("eda-registry", "lookup", "orders")
    assert (result.returncode, result.stderr) == (0, "")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((r["host"], r["port"]) for r in records) == [(a.address, 8080), (b.address, 8081)]
    assert next(r for r in records if r["port"] == 8080)["meta"] == {"zone": "a"}
    a.kill()
    result = c.run(
        "eda-registry", "lookup", "orders"
    )  # asks the LAN now: the dead one cannot answer
    assert found(result) == [(b.address, 8081)]
    watcher.wait_lines(3, timeout=5)
    kinds = sorted((e["type"], e["instance"]["port"]) for e in map(json.loads, watcher.lines()))
    assert kinds == [("deregistered", 8080), ("registered", 8080), ("registered", 8081)]
    # standard DNS-SD: a generic browser sees the instance with its TXT record
    browsed = c.run("eda-registry", "browse", "_eda-svc._tcp", "-C", "1", "--duration", "5")
    assert browsed.returncode == 0, browsed.stderr
    item = json.loads(browsed.stdout)
    assert (item["event"], item["port"], item["txt"]["svc"], item["txt"]["st"]) == (
        "added",
        8081,
        "orders",
        "passing",
    )


BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""
AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
enable-dbus=yes
ratelimit-burst=1000
[publish]
publish-workstation=no
"""


def start_avahi(host: Host, workdir: Path) -> dict[str, str]:
    """avahi-daemon on *host* (its only multicast interface is the host's cable).

    A private D-Bus, and avahi's runtime directory on a tmpfs in a mount
    namespace of its own, so it never meets a system avahi.
    """
    socket_path = workdir / "bus"
    (workdir / "bus.conf").write_text(BUS_CONF.format(socket=socket_path))
    (workdir / "avahi.conf").write_text(AVAHI_CONF)
    bus = host.procs.start(
        ["dbus-daemon", "--nofork", f"--config-file={workdir / 'bus.conf'}"], prefix=host.prefix
    )
    host.started.append(bus)
    wait_until(socket_path.exists, 10, "private D-Bus")
    env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket_path}"}
    run_dir = "mkdir -p /run/avahi-daemon && mount -t tmpfs tmpfs /run/avahi-daemon"
    daemon = host.procs.start(
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"{run_dir} && exec avahi-daemon -f {workdir / 'avahi.conf'} "
            "--no-drop-root --no-chroot --no-rlimits",
        ],
        env=env,
        prefix=host.prefix,
    )  # fmt: skip
    host.started.append(daemon)
    daemon.wait_stderr("Server startup complete", 15)
    return env


def test_browse_sees_a_service_that_avahi_announces(network: Network, tmp_path: Path) -> None:
    """The foreign peer is avahi (not python-zeroconf, the library eda itself uses)."""
    a, b = network.add_host("a"), network.add_host("b")
    env = start_avahi(a, tmp_path)
    publisher = a.procs.start(
        ["avahi-publish", "-s", "printer page", "_http._tcp", "631", "path=/ipp"],
        env=env,
        prefix=a.prefix,
    )
    a.started.append(publisher)
    wait_until(lambda: "Established" in publisher.stdout + publisher.stderr, 15, "avahi-publish")
    result = b.run("eda-registry", "browse", "_http._tcp", "-C", "1", "--duration", "10")
    assert (result.returncode, result.stderr) == (0, "")
    item = json.loads(result.stdout)
    assert (item["name"], item["port"], item["addresses"][0], item["txt"]) == (
        "printer page",
        631,
        a.address,  # IPv4 first, whatever else avahi publishes (an IPv6 link-local address)
        {"path": "/ipp"},
    )

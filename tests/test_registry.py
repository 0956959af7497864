"""eda-registry end to end on one host: serve, register, lookup, list, watch, faults, bad input."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import socket
import stat
import struct
import subprocess
import termios
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.helpers import Proc, Procs, command, readable, run, wait_until

FAST = ("--interval", "0.2", "--ttl", "0.8")


def serve(procs: Procs, *args: str) -> tuple[Proc, str]:
    proc = procs.eda(
        "eda-registry",
        "serve",
        "-v",
        "--no-mdns",
        "--bind",
        "tcp://127.0.0.1:*",
        "--tick",
        "0.1",
        *args,
    )
    return proc, proc.wait_stderr(r"listening on (tcp://\S+)").group(1)


def register(procs: Procs, endpoint: str, name: str, port: int, *args: str) -> Proc:
    proc = procs.eda(
        "eda-registry",
        "register",
        "-v",
        name,
        "--port",
        str(port),
        "--registry",
        endpoint,
        *FAST,
        *args,
    )
    proc.wait_stderr(r"registered \S+ at", 30)  # a deadline for a loaded machine
    return proc


def lookup(endpoint: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run("eda-registry", "lookup", name, "--registry", endpoint, *args)


def ports(result: subprocess.CompletedProcess[str]) -> list[int]:
    return sorted(json.loads(line)["port"] for line in result.stdout.splitlines())


def watch(procs: Procs, endpoint: str, *args: str) -> Proc:
    proc = procs.eda("eda-registry", "watch", "-v", "--registry", endpoint, *args)
    proc.wait_stderr("watching registry")
    return proc


def events(proc: Proc) -> list[dict[str, object]]:
    return [json.loads(line) for line in proc.lines()]


def event_time(event: dict[str, object]) -> float:
    """When the registry made *event* (unix seconds)."""
    return datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()


def test_register_lookup_list_and_clean_stop(procs: Procs) -> None:
    _, ep = serve(procs)
    w = watch(procs, ep, "orders")
    a = register(procs, ep, "orders", 8080, "--meta", "version=2", "--weight", "3")
    register(procs, ep, "orders", 8081)
    register(procs, ep, "billing", 9000)
    result = lookup(ep, "orders")
    assert (result.returncode, result.stderr) == (0, "")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["port"] for r in records) == [8080, 8081]
    first = next(r for r in records if r["port"] == 8080)
    assert (first["meta"], first["weight"], first["status"], first["host"]) == (
        {"version": "2"},
        3,
        "passing",
        "127.0.0.1",
    )
    listed = run("eda-registry", "list", "--registry", ep, "--format", "{service} {port}")
    assert listed.returncode == 0 and sorted(listed.stdout.splitlines()) == [
        "billing 9000",
        "orders 8080",
        "orders 8081",
    ]
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    assert ports(lookup(ep, "orders")) == [8081]  # gone at once, not after the TTL
    w.wait_lines(3)
    assert [(e["type"], e["instance"]["port"]) for e in events(w)] == [  # type: ignore[index]
        ("registered", 8080),
        ("registered", 8081),
        ("deregistered", 8080),
    ]
    assert all(e["service"] == "orders" for e in events(w))


def test_killed_instance_expires_within_its_ttl_and_watch_says_why(procs: Procs) -> None:
    _, ep = serve(procs)
    w = watch(procs, ep)
    victim = register(procs, ep, "orders", 8080, "--interval", "0.3", "--ttl", "3")
    register(procs, ep, "orders", 8081)
    killed_at = time.time()
    victim.kill()
    # the deadline is the registry's, not this loop's: a lookup process may start slowly
    wait_until(lambda: ports(lookup(ep, "orders")) == [8081], what="expiry")
    expired = [e for e in events(w.wait_lines(3) and w) if e["type"] == "expired"]
    assert len(expired) == 1 and "no heartbeat for 3s" in str(expired[0]["reason"])
    inst = expired[0]["instance"]
    assert inst["port"] == 8080  # type: ignore[index]
    # timed on the registry's own clock, from the last heartbeat it saw: one TTL, never
    # early, and with room for a loaded machine, yet well under two TTLs
    since_beat = event_time(expired[0]) - inst["heartbeat"]  # type: ignore[index]
    assert 3.0 - 0.001 <= since_beat < 3.0 + 2.0, since_beat  # event times are in whole ms
    assert inst["heartbeat"] <= killed_at + 0.5  # type: ignore[index]


def test_lookup_of_unknown_service_exits_3_and_all_shows_unhealthy(procs: Procs) -> None:
    _, ep = serve(procs)
    result = lookup(ep, "nothing")
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr == "eda-registry: error: no passing instance of service 'nothing'\n"
    register(procs, ep, "orders", 8080, "--check", "exit 2", "--check-interval", "0.2")
    assert lookup(ep, "orders").returncode == 3
    every = lookup(ep, "orders", "--all")
    assert every.returncode == 0 and json.loads(every.stdout)["status"] == "critical"


def test_child_command_lives_with_its_registration_and_gives_its_status(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = serve(procs)
    gate = tmp_path / "gate"
    child = procs.eda(
        "eda-registry",
        "register",
        "-v",
        "job",
        "--port",
        "7000",
        "--registry",
        ep,
        *FAST,
        "--",
        "sh",
        "-c",
        f"while [ ! -e {gate} ]; do sleep 0.02; done; exit 7",
    )
    child.wait_stderr("registered job")
    assert ports(lookup(ep, "job")) == [7000]
    gate.touch()
    assert child.wait() == 7
    assert lookup(ep, "job").returncode == 3
    assert "deregistered" in child.stderr


def test_failed_registration_stops_the_child_and_exits_1(procs: Procs, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    result = run(
        "eda-registry",
        "register",
        "job",
        "--port",
        "7000",
        "--registry",
        "tcp://127.0.0.1:9",  # nothing listens: no registry answers
        "--",
        "sh",
        "-c",
        f"echo $$ > {pidfile}; exec sleep 30",
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "eda-registry: error: no registry answered (tried tcp://127.0.0.1:9)\n"
    )
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the child outlived a failed registration"


def test_check_kinds_warning_timeout_and_tcp(procs: Procs) -> None:
    _, ep = serve(procs)
    listener = socket.create_server(("127.0.0.1", 0))
    open_port = listener.getsockname()[1]
    with listener:
        register(procs, ep, "warned", 7001, "--check", "exit 1")
        register(procs, ep, "slow", 7002, "--check", "sleep 5", "--check-timeout", "0.2")
        register(procs, ep, "up", open_port, "--check", "tcp")
        register(procs, ep, "down", 9, "--check", "tcp")  # nothing listens on port 9
        statuses = {}
        for name in ("warned", "slow", "up", "down"):
            every = lookup(ep, name, "--all")
            assert every.returncode == 0, every.stderr
            statuses[name] = json.loads(every.stdout)["status"]
        assert statuses == {
            "warned": "warning",
            "slow": "critical",
            "up": "passing",
            "down": "critical",
        }
        assert lookup(ep, "warned").returncode == 3  # only passing instances by default
        assert ports(lookup(ep, "up")) == [open_port]


def test_sigterm_to_register_with_child_stops_child_and_deregisters(procs: Procs) -> None:
    _, ep = serve(procs)
    proc = procs.eda(
        "eda-registry",
        "register",
        "-v",
        "web",
        "--port",
        "7001",
        "--registry",
        ep,
        "--interval",  # a TTL a loaded machine outlasts (0.8 s expired it once under load,
        "1",  # exit 1); the lookup below then shows the deregistration, not an expiry
        "--ttl",
        "30",
        "--",
        "sleep",
        "30",
    )
    proc.wait_stderr("registered web")
    os.kill(proc.popen.pid, signal.SIGTERM)  # the register process only, not its group
    assert (
        proc.wait() == 128 + signal.SIGTERM
    )  # the child's status: killed by the forwarded SIGTERM
    assert lookup(ep, "web").returncode == 3


def test_bad_registrations_are_refused_and_disturb_nothing(procs: Procs) -> None:
    server, ep = serve(procs)
    register(procs, ep, "orders", 8080)
    cases = [
        (["register", "Bad_Name!", "--port", "1"], 2, "bad service name"),
        (["register", "orders", "--port", "70000"], 2, "70000 is not in the range"),
        (["register", "orders"], 2, "Missing option '--port'"),
        (["register", "orders", "--port", "1", "--meta", "k=" + "x" * 300], 2, "must fit in 255"),
        (["register", "orders", "--port", "1", "--meta", "novalue"], 2, "use KEY=VALUE"),
        (
            ["register", "orders", "--port", "1", "--ttl", "1", "--interval", "2"],
            2,
            "shorter than ttl",
        ),
        (["lookup", "Bad_Name!"], 2, "bad service name"),
        (["lookup", "orders", "--registry", "localhost:1"], 2, "bad registry endpoint"),
        (["lookup", "orders", "--registry", "tcp://*:7700"], 2, "bad registry endpoint"),  # hung
    ]
    for args, code, message in cases:
        extra = [] if "--registry" in args else ["--registry", ep]
        result = run("eda-registry", *args, *extra)
        assert result.returncode == code, (args, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("eda-registry: error: ") and message in lines[0]
        ), lines
    assert ports(lookup(ep, "orders")) == [8080]
    assert server.popen.poll() is None


def test_a_malformed_peer_registry_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    """--peer is parsed as an Endpoint where it is given: one line naming the
    option, before the registry binds anything."""
    for bad in ("tcp://a b:1", "tcp://h:0", "tcp://*:7700", "h:7700", "tcp://h:99999"):
        result = run(
            "eda-registry", "serve", "--no-mdns", "--data", str(tmp_path),
            "--bind", "tcp://127.0.0.1:*", "--peer", bad,
        )  # fmt: skip
        assert result.returncode == 2, (bad, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "bad --peer endpoint" in lines[0], (bad, lines)
    assert not list(tmp_path.iterdir())  # nothing started: no port remembered


def test_garbage_on_the_registry_socket_is_answered_or_dropped(procs: Procs) -> None:
    server, ep = serve(procs)
    register(procs, ep, "orders", 8080)
    host, port = ep.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:  # not even ZMTP
        raw.sendall(os.urandom(4096) + b"\xff" * 1024)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(ep)
    replies = []
    for frames in (
        [b"\x00\xff garbage"],
        [b"[1,2]"],
        [b'{"op":"explode"}'],
        [b"{}", b"extra"],
        [b'{"op":"register","instance":{"service":"x","port":"no"}}'],
        [
            b'{"op":"register","instance":'
            + json.dumps(
                {
                    "service": "big",
                    "host": "h",
                    "port": 1,
                    "meta": {f"k{i}": "v" * 200 for i in range(9)},
                }
            ).encode()
            + b"}"
        ],
        [b"[" * 60_000],  # the JSON decoder recurses per level
        [
            b'{"op":"register","instance":{"service":"x","host":"h","port":1,"registered":1'
            + b"0" * 400
            + b"}}"
        ],  # too big for a float
    ):
        dealer.send_multipart(frames)
        assert dealer.poll(5000), frames
        replies.append(json.loads(dealer.recv()))
    dealer.send(b"x" * 200_000)  # over the size limit: the registry drops the connection
    dealer.setsockopt(zmq.LINGER, 5000)  # really send it before closing
    dealer.close()
    ctx.term()
    assert [r["ok"] for r in replies] == [False] * 8
    # garbage is a runtime error (1); a well-formed request with an invalid record, the
    # requester's usage error (2)
    assert [r["code"] for r in replies] == [1, 1, 1, 1, 2, 2, 1, 2]
    assert "not JSON" in replies[0]["error"] and "unknown operation" in replies[2]["error"]
    assert "bad port" in replies[4]["error"] and "1300" in replies[5]["error"]
    assert "nested too deeply" in replies[6]["error"] and "timestamps" in replies[7]["error"]
    assert ports(lookup(ep, "orders")) == [8080]
    assert server.popen.poll() is None


def test_health_check_failure_drops_instance_and_recovery_brings_it_back(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = serve(procs)
    flag = tmp_path / "healthy"
    flag.touch()
    w = watch(procs, ep, "orders")
    register(
        procs,
        ep,
        "orders",
        8080,
        "--check",
        f"test -e {flag} || exit 2",
        "--check-interval",
        "0.05",
        "--rise",
        "2",
        "--fall",
        "2",
    )
    flag.unlink()
    wait_until(
        lambda: lookup(ep, "orders").returncode == 3, timeout=10, what="critical instance dropped"
    )
    flag.touch()
    wait_until(lambda: lookup(ep, "orders").returncode == 0, timeout=10, what="instance back")
    kinds = [(e["type"], e["reason"]) for e in events(w.wait_lines(3) and w)]
    assert kinds == [
        ("registered", "registered"),
        ("health", "passing -> critical"),
        ("health", "critical -> passing"),
    ]


@pytest.mark.long
def test_flapping_check_does_not_flap_lookups(procs: Procs, tmp_path: Path) -> None:
    _, ep = serve(procs)
    check = tmp_path / "flap.sh"
    count = tmp_path / "count"
    count.write_text("0")
    # passes and fails in turn; with --fall 3 it never fails three times in a row
    check.write_text(f"n=$(cat {count}); echo $((n+1)) > {count}; exit $((n % 2 * 2))\n")
    check.chmod(check.stat().st_mode | stat.S_IXUSR)
    w = watch(procs, ep, "orders")
    register(
        procs,
        ep,
        "orders",
        8080,
        "--check",
        f"sh {check}",
        "--check-interval",
        "0.03",
        "--rise",
        "3",
        "--fall",
        "3",
    )
    for _ in range(15):
        assert ports(lookup(ep, "orders")) == [8080]
    wait_until(lambda: int(count.read_text() or 0) >= 20, timeout=5, what="20 flapping checks")
    assert [e["type"] for e in events(w)] == ["registered"]


def test_watch_exec_runs_once_per_change_with_the_event_on_stdin(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = serve(procs)
    out = tmp_path / "seen"
    w = watch(procs, ep, "orders", "--exec", f"cat >> {out}; echo $EDA_EVENT >> {out}.kinds")
    # a TTL a loaded machine cannot outlast by accident (0.8 s expired it before SIGINT)
    a = register(procs, ep, "orders", 8080, "--interval", "1", "--ttl", "60")
    a.signal(signal.SIGINT)
    a.wait()
    wait_until(
        lambda: (
            Path(f"{out}.kinds").exists() and len(Path(f"{out}.kinds").read_text().split()) == 2
        ),
        what="two --exec runs",
    )
    assert Path(f"{out}.kinds").read_text().split() == ["registered", "deregistered"]
    assert [json.loads(line)["type"] for line in out.read_text().splitlines()] == [
        "registered",
        "deregistered",
    ]
    assert w.stdout == ""


def test_watch_snapshot_then_changes_and_count(procs: Procs) -> None:
    _, ep = serve(procs)
    register(procs, ep, "orders", 8080)
    w = procs.eda("eda-registry", "watch", "orders", "--snapshot", "-C", "2", "--registry", ep)
    w.wait_lines(1)
    register(procs, ep, "orders", 8081)
    assert w.wait() == 0
    first, second = events(w)
    assert (first["type"], first["snapshot"], second["type"]) == ("present", True, "registered")
    assert w.stderr == ""


@pytest.mark.long
def test_registry_restart_keeps_live_registrations_and_drops_dead_ones(
    procs: Procs, tmp_path: Path
) -> None:
    data = str(tmp_path / "data")
    server, ep = serve(procs, "--data", data, "--bind", "tcp://127.0.0.1:17700")
    w = watch(procs, ep, "orders")
    # a TTL well above a (slow) restart: the live one must never drop out, and the
    # watch must be back before the dead one expires, so its expiry is seen live
    register(procs, ep, "orders", 8080, "--interval", "0.3", "--ttl", "3")
    dead = register(procs, ep, "orders", 8081, "--interval", "0.3", "--ttl", "3")
    server.kill()
    dead.kill()
    server2, ep2 = serve(procs, "--data", data, "--bind", "tcp://127.0.0.1:17700")
    assert ep2 == ep
    # every registration written before the kill is restored (served at once if still
    # inside its TTL, else held back until its next heartbeat: both are in the snapshot)
    assert sorted(i["port"] for i in snapshot(ep)["instances"]) == [8080, 8081]
    # ...and once its TTL is out the dead one is gone, the live one still there
    wait_until(
        lambda: ports(lookup(ep, "orders")) == [8080],
        timeout=3 + 2,
        what="dead instance dropped",
    )
    for _ in range(5):
        assert ports(lookup(ep, "orders")) == [8080]
    w.wait_lines(3, timeout=5)
    kinds = [(e["type"], e["instance"]["port"]) for e in events(w)]  # type: ignore[index]
    # the watch reconnected: nothing replayed, the registration never shown twice
    assert kinds == [("registered", 8080), ("registered", 8081), ("expired", 8081)]
    assert server2.popen.poll() is None


def test_dns_interface_answers_dig_with_healthy_instances_rotated(procs: Procs) -> None:
    _, ep = serve(procs, "--dns", "127.0.0.1:0")
    match = procs.started[0].wait_stderr(r"DNS on 127\.0\.0\.1:(\d+)")
    port = match.group(1)
    register(procs, ep, "orders", 8080, "--host", "127.0.0.11", "--weight", "5")
    register(procs, ep, "orders", 8081, "--host", "127.0.0.12")
    register(procs, ep, "orders", 8082, "--host", "127.0.0.13", "--check", "exit 2")

    def dig(name: str, qtype: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["dig", "@127.0.0.1", "-p", port, "+short", "+tries=1", "+time=2", name, qtype],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )

    first, second = dig("orders.service.eda", "A"), dig("orders.service.eda", "A")
    assert first.returncode == 0 and second.returncode == 0
    assert sorted(first.stdout.split()) == ["127.0.0.11", "127.0.0.12"]  # not the critical one
    assert first.stdout.split() != second.stdout.split()  # rotated between queries
    srv = sorted(dig("orders.service.eda", "SRV").stdout.splitlines())
    assert srv == [
        "1 1 8081 orders-127-0-0-12-8081.orders.service.eda.",
        "1 5 8080 orders-127-0-0-11-8080.orders.service.eda.",
    ]
    full = subprocess.run(
        ["dig", "@127.0.0.1", "-p", port, "+tries=1", "nothing.service.eda", "A"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    assert "status: NXDOMAIN" in full.stdout


def test_serverless_fallback_moves_to_a_registry_that_appears(procs: Procs) -> None:
    early = procs.eda("eda-registry", "register", "-v", "orders", "--port", "8080", *FAST)
    early.wait_stderr("no registry found: serverless mode")
    early.wait_stderr(r"registered orders/\S+ at .* by mDNS", 15)
    reg = procs.eda("eda-registry", "serve", "-v", "--bind", "tcp://127.0.0.1:*", "--tick", "0.1")
    reg_id = reg.wait_stderr(r"registry (\w+) listening on").group(1)
    reg.wait_stderr("announced registry", 15)
    early.wait_stderr(f"registered orders/\\S+ at .* with registry {reg_id}", 15)
    assert "moving" in early.stderr
    endpoint = reg.wait_stderr(r"listening on (tcp://\S+)").group(1)
    assert ports(lookup(endpoint, "orders")) == [8080]
    early.signal(signal.SIGTERM)
    assert early.wait() == 0
    wait_until(lambda: lookup(endpoint, "orders").returncode == 3, 5, "clean deregistration")


def test_serverless_announce_update_and_goodbye_are_seen_by_browse(
    procs: Procs, tmp_path: Path
) -> None:
    """The serverless announcer goes through the shared discovery layer, and so does browse."""
    browser = procs.eda("eda-registry", "browse", "_eda-svc._tcp", "-v")
    flag = tmp_path / "healthy"
    flag.touch()
    reg = procs.eda(
        "eda-registry", "register", "-v", "--serverless", "orders", "--port", "8080",
        "--interval", "0.5", "--ttl", "10", "--meta", "zone=a",
        "--check", f"test -e {flag} || exit 2", "--check-interval", "0.05",
        "--rise", "1", "--fall", "1",
    )  # fmt: skip
    reg.wait_stderr(r"registered orders/\S+ at .* by mDNS", 15)
    browser.wait_lines(1, 15)
    added = json.loads(browser.lines()[0])
    assert (added["event"], added["port"], added["type"]) == ("added", 8080, "_eda-svc._tcp")
    assert (added["txt"]["svc"], added["txt"]["st"], added["txt"]["zone"]) == (
        "orders",
        "passing",
        "a",
    )
    assert "127.0.0.1" in added["addresses"]
    flag.unlink()  # the check fails: new TXT records are announced
    browser.wait_lines(2, 15)
    updated = json.loads(browser.lines()[1])
    assert (updated["event"], updated["name"]) == ("updated", added["name"])
    assert updated["txt"]["st"] == "critical"
    assert int(updated["txt"]["rv"]) > int(added["txt"]["rv"])
    reg.signal(signal.SIGTERM)  # goodbye packets: browsers drop it at once, not after the TTL
    assert reg.wait() == 0
    browser.wait_lines(3, 8)  # well under the records' 10 s TTL
    removed = json.loads(browser.lines()[2])
    assert (removed["event"], removed["name"]) == ("removed", added["name"])
    browser.signal(signal.SIGTERM)
    assert browser.wait() == 0


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def test_browse_survives_a_flood_and_crafted_txt_and_still_shows_real_services(
    procs: Procs,
) -> None:
    """Anyone on the LAN can announce anything: browse stays bounded and keeps reporting."""
    from eda.core import discovery, mdns
    from tests.helpers import MdnsResponder, dns_response, dns_rr, service_records

    browser = procs.eda("eda-registry", "browse", "_http._tcp")
    responder = MdnsResponder()
    try:
        real = service_records("_http._tcp.local.", "real", 8080, {"path": "/"}, "127.0.0.1")
        # repeated until heard: the browser has started listening
        wait_until(
            lambda: responder.multicast(dns_response(0, real)) or browser.lines(),
            15,
            "browse to show the real service",
        )
        peak = 0
        for first in range(0, 600, 20):  # names with no SRV/TXT/A: they never resolve
            records = [
                dns_rr(
                    "_http._tcp.local", mdns.TYPE_PTR, mdns.encode_name(f"junk{i}._http._tcp.local")
                )
                for i in range(first, first + 20)
            ]
            responder.multicast(dns_response(0, records))
            peak = max(peak, _threads(browser.popen.pid))
            time.sleep(0.01)  # paced, so the kernel does not drop the flood for us
        # crafted TXT: 200 keys, invalid UTF-8, a string claiming more bytes than it has
        inst = "crafted._http._tcp.local"
        strings = b"".join(bytes([len(s)]) + s for s in (f"k{i}=v".encode() for i in range(200)))
        txt = b"\x05b=\xff\xfe!" + strings + b"\xffshort"
        crafted = [
            dns_rr("_http._tcp.local", mdns.TYPE_PTR, mdns.encode_name(inst)),
            dns_rr(
                inst, mdns.TYPE_SRV, struct.pack("!HHH", 0, 0, 8081) + mdns.encode_name("c.local")
            ),
            dns_rr(inst, mdns.TYPE_TXT, txt),
            dns_rr("c.local", mdns.TYPE_A, socket.inet_aton("127.0.0.1")),
        ]
        later = service_records("_http._tcp.local.", "later", 8082, {"path": "/x"}, "127.0.0.1")

        def shown() -> dict[str, dict[str, Any]]:
            responder.multicast(dns_response(0, crafted))
            responder.multicast(dns_response(0, later))
            peak_now = _threads(browser.popen.pid)
            nonlocal peak
            peak = max(peak, peak_now)
            items = {i["name"]: i for i in map(json.loads, browser.lines())}
            return items if {"crafted", "later"} <= set(items) else {}

        items = wait_until(shown, 15, "browse to show services announced after the flood")
    finally:
        responder.close()
    assert peak <= 30, peak  # a thread per name would be hundreds
    assert (items["real"]["event"], items["real"]["txt"]) == ("added", {"path": "/"})
    assert (items["later"]["port"], items["later"]["txt"]) == (8082, {"path": "/x"})
    assert items["crafted"]["port"] == 8081
    assert len(items["crafted"]["txt"]) <= mdns.MAX_TXT_KEYS
    assert items["crafted"]["txt"]["b"] == "\ufffd\ufffd!"  # invalid UTF-8, replaced
    assert not any(name.startswith("junk") for name in items)
    assert discovery.MAX_PENDING < 600  # the flood exceeded the backlog
    assert browser.popen.poll() is None
    browser.signal(signal.SIGTERM)
    assert browser.wait() == 0


def test_config_file_feeds_subcommands_by_option_name(
    procs: Procs, tmp_path: Path, monkeypatch
) -> None:
    _, endpoint = serve(procs)
    register(procs, endpoint, "orders", 8080)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eda.toml").write_text(f'no-mdns = true\n[registry]\nregistry = ["{endpoint}"]\n')
    result = run("eda-registry", "lookup", "orders")  # the registry comes from eda.toml
    assert result.returncode == 0, result.stderr
    assert ports(result) == [8080]
    (tmp_path / "eda.toml").write_text("[registry]\nttl = 3.0\ncolour = 'red'\n")
    result = run("eda-registry", "lookup", "orders")
    assert result.returncode == 2
    assert result.stderr == (
        "eda-registry: error: eda.toml:3: key 'registry.colour' is not an option of eda-registry\n"
    )


def run_on_tty(*args: str, columns: int = 80, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run eda-registry with stdout on a pseudo-terminal *columns* wide; (code, out, err)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        command("eda-registry", *args),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no end of output after {timeout}s: {out!r}"
            ready = readable([master], left)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            out += data
        code = proc.wait(timeout)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, out.decode(errors="replace"), err


HOSTILE_META = ("--meta", "note=[/]", "--meta", "title=\x1b]0;pwned\x07", "--meta", "x=[bold]y")


def test_terminal_views_escape_peer_text_and_never_read_it_as_markup(procs: Procs) -> None:
    _, ep = serve(procs)
    register(procs, ep, "orders", 8080, *HOSTILE_META)
    for args in (["list"], ["lookup", "orders"]):
        code, out, err = run_on_tty(*args, "--registry", ep)
        assert (code, err) == (0, ""), (args, err)  # a MarkupError traceback once
        assert "note=[/]" in out and "x=[bold]y" in out
        assert "\x1b]0;" not in out and "\x07" not in out  # no window title from a peer
        assert "pwned\\x07" in out  # shown, escaped
    for template in ("{meta[title]}", "{meta}"):  # a template on a terminal is escaped too
        code, out, err = run_on_tty("lookup", "orders", "--registry", ep, "--format", template)
        assert (code, err) == (0, ""), err
        assert "\x1b]0;" not in out and "\x07" not in out and "pwned" in out


def test_terminal_table_never_cuts_an_address(procs: Procs) -> None:
    _, ep = serve(procs)
    meta = ("--meta", "description=" + "long words " * 12)
    register(procs, ep, "orders", 65535, "--host", "10.200.200.200", *meta)
    for args in (["list"], ["lookup", "orders"]):
        code, out, err = run_on_tty(*args, "--registry", ep, columns=60)
        assert (code, err) == (0, "")
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out)  # colours off: what the eye sees
        assert "10.200.200.200:65535" in plain, plain
        assert max(len(line) for line in plain.splitlines()) <= 60


def ask(endpoint: str, msg: dict[str, object]) -> dict[str, object]:
    """One request straight over the protocol; the reply."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send(json.dumps(msg).encode())
        assert dealer.poll(5000), f"no reply to {msg}"
        reply = json.loads(dealer.recv())
    finally:
        dealer.close()
        ctx.term()
    assert reply["ok"] is True, reply
    return dict(reply)


def snapshot(endpoint: str) -> dict[str, Any]:
    """Every record the registry holds, including those held back after a restart."""
    return ask(endpoint, {"op": "snapshot", "rid": 1})


def register_raw(endpoint: str, records: list[dict[str, object]]) -> None:
    """Register *records* straight over the protocol (long TTLs: no heartbeats needed)."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        for rid, record in enumerate(records):
            dealer.send(json.dumps({"op": "register", "rid": rid, "instance": record}).encode())
            assert dealer.poll(5000), "no reply to register"
            assert json.loads(dealer.recv())["ok"] is True
    finally:
        dealer.close()
        ctx.term()


def test_dns_serves_30_instances_over_udp_and_tcp_with_compressed_names(procs: Procs) -> None:
    server, ep = serve(procs, "--dns", "127.0.0.1:0")
    port = server.wait_stderr(r"DNS on 127\.0\.0\.1:(\d+)").group(1)
    records: list[dict[str, object]] = [
        {"service": "orders", "host": f"10.1.0.{i + 1}", "port": 9000 + i, "ttl": 120,
         "interval": 40}
        for i in range(30)
    ]  # fmt: skip
    register_raw(ep, records)
    expected = sorted(f"1 1 {9000 + i} orders-10-1-0-{i + 1}-{9000 + i}" for i in range(30))

    def dig(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["dig", "@127.0.0.1", "-p", port, "+tries=1", "+time=5", *args],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip

    for transport in ([], ["+tcp"]):  # UDP: truncated, and dig retries over TCP by itself
        result = dig(*transport, "+short", "orders.service.eda", "SRV")
        assert result.returncode == 0, result
        got = sorted(
            line.rsplit(".orders.service.eda.", 1)[0] for line in result.stdout.split("\n") if line
        )
        assert got == expected, (transport, result.stdout, result.stderr)
    # over UDP with EDNS (no retry): names are compressed, so 30 SRV + 30 A fit in 4 KB
    full = dig("+notcp", "+ignore", "+bufsize=4096", "orders.service.eda", "SRV")
    assert (
        "flags: qr aa" in full.stdout and " tc" not in full.stdout.split("flags:")[1].split(";")[0]
    )
    assert "ANSWER: 30, AUTHORITY: 0, ADDITIONAL: 30" in full.stdout
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", full.stdout).group(1))  # type: ignore[union-attr]
    uncompressed = 12 + 24 + 30 * (24 + 10 + 6 + 38) + 30 * (38 + 10 + 4)
    assert size < uncompressed - 30 * 20, size  # owner names are 2-byte pointers
    a_records = dig("+short", "+tcp", "orders.service.eda", "A")
    assert sorted(a_records.stdout.split()) == sorted(f"10.1.0.{i + 1}" for i in range(30))


def test_a_starting_service_is_found_as_soon_as_its_check_first_passes(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = serve(procs)
    gate = tmp_path / "listening"
    # checks every 30 s with rise 2: without the start-up rule, a minute before it is found
    register(
        procs, ep, "web", 8000, "--check", f"test -e {gate} || exit 2", "--check-interval", "30",
        "--rise", "2", "--interval", "0.3", "--ttl", "3",
    )  # fmt: skip
    every = lookup(ep, "web", "--all")
    assert json.loads(every.stdout)["status"] == "critical"  # the first check ran at once
    gate.touch()  # the service is up now
    wait_until(lambda: lookup(ep, "web").returncode == 0, 15, "the instance to pass")


def test_a_full_disk_is_a_warning_and_leaves_no_temp_file(procs: Procs, tmp_path: Path) -> None:
    small = tmp_path / "small"  # a 12 KiB tmpfs, mounted only in the registry's namespace
    small.mkdir()
    argv = command(
        "eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "--data",
        f"{small}/data",
    )  # fmt: skip
    mount = f'mount -t tmpfs -o size=12k tmpfs {small} && exec "$0" "$@"'
    server = procs.start(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, *argv]
    )
    ep = server.wait_stderr(r"listening on (tcp://\S+)").group(1)
    records: list[dict[str, object]] = [
        {"service": "orders", "host": "10.1.0.1", "port": 9000 + i, "ttl": 120, "interval": 40,
         "meta": {f"k{j}": "v" * 200 for j in range(5)}}
        for i in range(40)
    ]  # fmt: skip
    register_raw(ep, records)  # acknowledged: served from memory...
    server.wait_stderr(r"warning: cannot .* No space left on device; changes are kept in memory")
    assert len(ports(lookup(ep, "orders"))) == 40
    # ...said without -v, once per kind and interval, not once per change
    assert len(server.stderr.splitlines()) <= 4, server.stderr
    data = Path(f"/proc/{server.popen.pid}/root") / str(small).lstrip("/") / "data"
    assert (data / "changes.log").exists()  # looking at the registry's own mount
    wait_until(lambda: "write the snapshot" in server.stderr, 5, "a failed snapshot")
    assert not (data / "snapshot.json.tmp").exists()
    assert server.popen.poll() is None


def test_no_subcommand_prints_the_help_cleanly_and_exits_2() -> None:
    result = run("eda-registry")
    assert result.returncode == 2
    assert result.stderr.startswith("Usage: eda-registry") and "lookup" in result.stderr
    assert result.stdout == "" and "error:" not in result.stderr  # was "error: Usage: ..."


def test_format_fields_are_the_registrys_own_and_unknown_ones_are_refused(procs: Procs) -> None:
    for sub in ("lookup", "list", "watch", "browse"):
        shown = run("eda-registry", sub, "--help").stdout
        assert "{topic}" not in shown and "{data}" not in shown, sub  # pub/sub fields: blank
        assert "Fields:" in shown
    _, ep = serve(procs)
    register(procs, ep, "orders", 8080, "--meta", "version=2", "--meta", "zone=a")
    for sub in (["lookup", "orders"], ["list"], ["watch", "-C", "1"]):
        refused = run("eda-registry", *sub, "--registry", ep, "--format", "{tpoic}")
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert "unknown field {tpoic}" in refused.stderr
    shown = run(
        "eda-registry", "lookup", "orders", "--registry", ep,
        "--format", "{meta}|{meta[version]}|{meta.zone}|{address}",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    meta, version, zone, address = shown.stdout.rstrip("\n").split("|")
    assert json.loads(meta) == {"version": "2", "zone": "a"}  # JSON, not a Python dict
    assert (version, zone, address) == ("2", "a", "127.0.0.1:8080")


def test_serve_on_a_port_in_use_is_a_runtime_error(procs: Procs) -> None:
    taken = socket.create_server(("127.0.0.1", 0))  # held for the whole test: no race
    with taken:
        port = taken.getsockname()[1]
        result = run("eda-registry", "serve", "--no-mdns", "--bind", f"tcp://127.0.0.1:{port}")
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("eda-registry: error: cannot bind tcp://127.0.0.1:")
        assert len(result.stderr.splitlines()) == 1
        dns = run("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                  "--dns", f"127.0.0.1:{port}")  # fmt: skip
        assert dns.returncode == 1 and "cannot bind DNS" in dns.stderr, dns.stderr
    bad = run("eda-registry", "serve", "--no-mdns", "--bind", "nonsense://x")
    assert bad.returncode == 2, bad.stderr  # a malformed endpoint stays a usage error


def test_core_lookup_is_one_call_for_the_passing_instances(procs: Procs) -> None:
    """What a load balancer needs: passing backends of a service from core, no CLI."""
    from eda.core.registry.access import Access
    from eda.core.registry.access import lookup as core_lookup

    _, ep = serve(procs)
    register(procs, ep, "orders", 8080)
    register(procs, ep, "orders", 8081, "--check", "exit 2")
    access = Access(registries=(ep,), mdns=False)
    assert [i.port for i in core_lookup("orders", access)] == [8080]
    assert [i.port for i in core_lookup("orders", access, include_all=True)] == [8080, 8081]
    assert core_lookup("billing", access) == []


def test_an_unusable_data_directory_is_a_runtime_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run(
        "eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "--data",
        str(blocker / "data"),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("eda-registry: error: cannot use data directory")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.long
def test_a_stopped_registry_does_not_pass_for_an_empty_one(procs: Procs, tmp_path: Path) -> None:
    """A registry seen before (cached) that is down is said on stderr, and never "not found"."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # this test's dead registry stays here
    reg = procs.eda("eda-registry", "serve", "-v", "--bind", "tcp://127.0.0.1:*", "--tick", "0.1")
    endpoint = reg.wait_stderr(r"listening on (tcp://\S+)").group(1)
    reg.wait_stderr("announced registry", 15)
    register(procs, endpoint, "orders", 8080)
    found = run("eda-registry", "lookup", "orders", env=env)  # found by mDNS, then cached
    assert (found.returncode, ports(found)) == (0, [8080]), found.stderr
    reg.signal(signal.SIGKILL)
    reg.wait()
    wait_until(lambda: not _accepts(endpoint), 5, "the registry to be gone")

    missing = run("eda-registry", "lookup", "orders", env=env)
    assert missing.returncode == 1, missing.stderr  # a runtime error, not "not found" (3)
    assert missing.stdout == ""
    assert f"registry seen before ({endpoint}) does not answer" in missing.stderr
    assert "no passing instance" not in missing.stderr
    listed = run("eda-registry", "list", env=env)
    assert (listed.returncode, listed.stdout) == (1, ""), listed.stderr
    assert "does not answer" in listed.stderr

    # what the LAN announces meanwhile is shown, with the warning
    procs.eda(
        "eda-registry", "register", "-v", "--serverless", "orders", "--port", "8081", *FAST
    ).wait_stderr(r"registered orders/\S+ at .* by mDNS", 15)
    fallback = run("eda-registry", "lookup", "orders", env=env)
    assert (fallback.returncode, ports(fallback)) == (0, [8081]), fallback.stderr
    assert "does not answer" in fallback.stderr and "by mDNS" in fallback.stderr
    no_mdns = run("eda-registry", "lookup", "orders", "--no-mdns", env=env)
    assert no_mdns.returncode == 1 and "does not answer" in no_mdns.stderr
    watcher = procs.eda("eda-registry", "watch", "orders", env=env)
    watcher.wait_stderr(r"does not answer.*watching the LAN by mDNS instead", 15)
    watcher.signal(signal.SIGTERM)
    watcher.wait()
    # configured (EDA_REGISTRY): an error naming it, never an answer from elsewhere
    configured = run("eda-registry", "lookup", "orders", env={**env, "EDA_REGISTRY": endpoint})
    assert (configured.returncode, configured.stdout) == (1, ""), configured.stderr
    assert f"no registry answered (tried {endpoint})" in configured.stderr


def _accepts(endpoint: str) -> bool:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), 0.5).close()
    except OSError:
        return False
    return True

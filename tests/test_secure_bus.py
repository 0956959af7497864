"""Secure mode through eda-bus: eda-bus serve --secure, eda-pub/eda-sub --bus --secure,
eda-bus stats --secure, with real processes in the test namespace.

Each identity is a configuration home of its own (key pair, trusted
directory, discovery cache), as on separate hosts.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.helpers import Capture, Identity, Proc, Procs, run, trusting

SERVING = r"serving .+ on (tcp://\S+) \(seq"


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """The bus, alice and bob trust each other; mallory trusts them, nobody trusts mallory."""
    return trusting(tmp_path, ("bus", "alice", "bob"))


def serve(procs: Procs, tmp_path: Path, who: Identity | None, *args: str) -> tuple[Proc, str]:
    """A bus (secure as *who*, plain when None) announced by mDNS; its endpoint."""
    secure = ("--secure",) if who is not None else ()
    bus = procs.eda(
        "eda-bus", "serve", *secure, "--data", str(tmp_path / "data"),
        "--bind", "tcp://127.0.0.1:0", "-v", *args, env=who.env if who else None,
    )  # fmt: skip
    endpoint = bus.wait_stderr(SERVING, 30)[1]
    bus.wait_stderr("announced bus", 15)
    return bus, endpoint


def stored(endpoint: str, who: Identity) -> int:
    """Events the secure bus at *endpoint* stored (eda-bus stats as *who*, a trusted client)."""
    done = run("eda-bus", "stats", "--secure", "--json", "--bus", f"bus@{endpoint}", env=who.env)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return int(next(r for r in rows if r["kind"] == "bus")["events"])


def events(proc: Proc) -> list[str]:
    return [json.loads(line)["data"] for line in proc.lines()]


def test_trusted_publisher_and_subscriber_through_a_secure_bus(procs: Procs, tmp_path, ids):
    _, endpoint = serve(procs, tmp_path, ids["bus"], "--name", "main")
    sub = procs.eda(
        "eda-sub", "--secure", "--bus", "--from-start", "orders.>", "-C", "2", env=ids["bob"].env
    )
    result = run("eda-pub", "--secure", "--bus", "--confirm", "orders.created", "one", "two",
                 env=ids["alice"].env)  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert sub.wait() == 0, sub.stderr
    assert events(sub) == ["one", "two"]
    # explicit: the bus named by its trusted key, as a brokerless --connect
    assert stored(endpoint, ids["alice"]) == 2


def test_the_discovery_cache_remembers_the_bus_with_its_key(procs: Procs, tmp_path, ids):
    _, endpoint = serve(procs, tmp_path, ids["bus"])
    alice = ids["alice"]
    assert run("eda-pub", "--secure", "--bus", "--confirm", "t", "x", env=alice.env).returncode == 0
    cached = run("eda-bus", "stats", "--secure", "--no-mdns", "--json", env=alice.env)
    assert cached.returncode == 0, cached.stderr  # found in the cache, key and all
    assert (
        f"{ids['bus'].public}@{endpoint}"
        in (alice.home / "cache").joinpath("eda", "discovery.json").read_text()
    )
    alice.revoke("bus")  # a cached key no longer trusted is not used
    revoked = run("eda-bus", "stats", "--secure", "--no-mdns", "--json", env=alice.env)
    assert revoked.returncode == 3, revoked.stderr


def test_an_untrusted_client_is_refused_at_once_with_the_message(procs: Procs, tmp_path, ids):
    _, endpoint = serve(procs, tmp_path, ids["bus"])
    mallory = ids["mallory"].public
    refused = f"the bus at {endpoint} does not trust this key (eda-keys show: {mallory})"
    pub = run("eda-pub", "--secure", "--bus", f"bus@{endpoint}", "--confirm", "--timeout", "60",
              "t", "x", env=ids["mallory"].env)  # fmt: skip
    assert (pub.returncode, pub.stderr.strip()) == (1, f"eda-pub: error: {refused}")
    sub = run("eda-sub", "--secure", "--bus", f"bus@{endpoint}", "--from-start", "t",
              env=ids["mallory"].env)  # fmt: skip
    assert (sub.returncode, sub.stderr.strip()) == (1, f"eda-sub: error: {refused}")
    stats = run("eda-bus", "stats", "--secure", "--bus", f"bus@{endpoint}", "--timeout", "60",
                env=ids["mallory"].env)  # fmt: skip
    assert (stats.returncode, stats.stderr.strip()) == (1, f"eda-bus: error: {refused}")


def test_a_client_refuses_a_bus_with_an_unknown_key(procs: Procs, tmp_path, ids):
    """A bus announcing a key alice does not trust (mallory's) is skipped with a warning,
    never sent anything; named explicitly under a trusted name, the handshake fails."""
    bus, endpoint = serve(procs, tmp_path, ids["mallory"])
    result = run("eda-pub", "--secure", "--bus", "--confirm", "t", "secret", env=ids["alice"].env)
    assert result.returncode == 3  # no bus found
    assert f"its key {ids['mallory'].public} is not trusted" in result.stderr
    forged = run("eda-pub", "--secure", "--bus", f"bus@{endpoint}", "--confirm", "t", "secret",
                 env=ids["alice"].env)  # fmt: skip
    assert forged.returncode == 1
    assert f"the bus at {endpoint} failed the secure handshake" in forged.stderr
    stats = run("eda-bus", "stats", "--json", "--no-mdns", "--bus", endpoint, "--timeout", "2")
    assert stats.returncode == 4, stats.returncode  # a plain client is not served by a secure bus either
    bus.signal(2)
    bus.wait()
    assert "secret" not in bus.stdout + bus.stderr


def test_insecure_clients_and_secure_buses_never_mix(procs: Procs, tmp_path, ids):
    _, endpoint = serve(procs, tmp_path, ids["bus"])
    plain = run("eda-pub", "-v", "--bus", "--confirm", "t", "x")
    assert plain.returncode == 3
    assert "it is in secure mode (--secure) and this program is not" in plain.stderr
    given = run("eda-pub", "--bus", endpoint, "--confirm", "--timeout", "2", "t", "x")
    assert given.returncode == 4, given.returncode
    assert stored(endpoint, ids["alice"]) == 0  # nothing plain got in


def test_a_secure_client_ignores_an_insecure_bus(procs: Procs, tmp_path, ids):
    serve(procs, tmp_path, None)
    result = run("eda-pub", "--secure", "-v", "--bus", "--confirm", "t", "x", env=ids["alice"].env)
    assert result.returncode == 3
    assert "it is not in secure mode" in result.stderr
    given = run("eda-pub", "--secure", "--bus", "tcp://127.0.0.1:1", "t", "x", env=ids["alice"].env)
    assert given.returncode == 2
    assert "in secure mode name the server's trusted key" in given.stderr


@pytest.mark.parametrize("secure", [False, True])
def test_eavesdropping_sees_the_payload_only_without_secure_mode(
    procs: Procs, tmp_path, ids, secure
):
    flag = ("--secure",) if secure else ()
    payload = f"EAVESDROP-{secrets.token_hex(8)}"
    serve(procs, tmp_path, ids["bus"] if secure else None)
    capture = Capture()
    try:
        sub = procs.eda("eda-sub", *flag, "--bus", "--from-start", "t", "-C", "1",
                        env=ids["bob"].env)  # fmt: skip
        result = run("eda-pub", *flag, "--bus", "--confirm", "t", payload, env=ids["alice"].env)
        assert result.returncode == 0, result.stderr
        assert sub.wait() == 0 and events(sub) == [payload]  # it was delivered
    finally:
        seen = capture.stop()
    assert (payload.encode() in seen) is not secure
    assert len(seen) > 1000  # the capture saw the traffic either way


GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
            + b"\x00" * 32)  # fmt: skip


def _hello(body: bytes) -> bytes:
    """A ZMTP command frame HELLO (the CURVE client's first command) around *body*."""
    command = b"\x05HELLO" + body
    return b"\x04" + bytes([len(command)]) + command


def _half_handshakes(endpoint: str, each: int) -> list[socket.socket]:
    """*each* TCP connections of every kind that never completes a CURVE handshake, held
    open: garbage, half a greeting, a greeting then nothing, a HELLO whose box does not
    open (random keys), half a HELLO."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    payloads = [
        os.urandom(4096),
        GREETING[:7],
        GREETING,
        GREETING + _hello(b"\x01\x00" + b"\x00" * 72 + os.urandom(32 + 8 + 80)),
        GREETING + _hello(b"\x01\x00" + b"\x00" * 72 + os.urandom(32 + 8 + 80))[:90],
    ]
    held = []
    for _ in range(each):
        for payload in payloads:
            conn = socket.create_connection((host, int(port)), 5)
            conn.sendall(payload)
            held.append(conn)
    return held


def _untrusted_clients(endpoint: str, bus_key: str, n: int) -> tuple[zmq.Context[Any], list[Any]]:
    """*n* sockets with keys of their own (trusted by nobody) that complete the CURVE
    handshake, are refused by ZAP, and keep trying (ZeroMQ reconnects)."""
    zctx: zmq.Context[Any] = zmq.Context()
    socks = []
    for _ in range(n):
        public, secret = zmq.curve_keypair()
        sock = zctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = bus_key.encode()
        sock.connect(endpoint)
        sock.send_multipart([b"R", b'{"op": "stats", "rid": 1}'], zmq.NOBLOCK)
        socks.append(sock)
    return zctx, socks


def test_garbage_and_half_finished_handshakes_leave_a_secure_bus_serving(
    procs: Procs, tmp_path, ids
):
    bus, endpoint = serve(procs, tmp_path, ids["bus"])
    given = f"bus@{endpoint}"
    sub = procs.eda("eda-sub", "--secure", "--bus", given, "--from-start", "--raw", "orders.>",
                    env=ids["bob"].env)  # fmt: skip
    pub = procs.eda("eda-pub", "--secure", "--bus", given, "--confirm", "orders.n",
                    stdin=subprocess.PIPE, env=ids["alice"].env)  # fmt: skip
    feed(pub, range(1, 1001))
    sub.wait_lines(1000, 30)
    held = _half_handshakes(endpoint, 40)  # 200 connections stalled or broken at once
    zctx, refused = _untrusted_clients(endpoint, ids["bus"].public, 20)
    try:
        feed(pub, range(1001, 5001))  # served meanwhile
        sub.wait_lines(5000, 60)
        done = run("eda-pub", "--secure", "--bus", given, "--confirm", "orders.once", "during",
                   env=ids["alice"].env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        for conn in held:
            conn.close()
        for sock in refused:
            sock.close()
        zctx.term()
    feed(pub, range(5001, 6001))  # and after
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    assert pub.wait(60) == 0, pub.stderr  # every event confirmed
    sub.wait_lines(6001, 30)
    numbers = [line for line in sub.lines() if line != "during"]
    assert numbers == [str(i) for i in range(1, 6001)]
    assert bus.popen.poll() is None
    assert stored(endpoint, ids["alice"]) == 6001


def feed(proc: Proc, numbers: range) -> None:
    assert proc.popen.stdin is not None
    proc.popen.stdin.write("".join(f"{i}\n" for i in numbers).encode())
    proc.popen.stdin.flush()

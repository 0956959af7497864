"""Secure mode through eda-registry: serve --secure, the clients (register, lookup, list,
watch, deregister) --secure, peers replicating, serverless mode; real processes in the
test namespace.

Each identity is a configuration home of its own (key pair, trusted directory,
discovery cache), as on separate hosts.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from eda.core import keys
from tests.helpers import Capture, Identity, Proc, Procs, run, trusting, wait_until

LISTENING = r"listening on (tcp://\S+) \(changes on (tcp://\S+)\)"
HEARTBEATS = ("--interval", "0.5", "--ttl", "5")


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """Two registries (reg, reg2), alice and bob trust each other; mallory trusts them
    all (and itself, as 'self'); nobody trusts mallory."""
    people = trusting(tmp_path, ("reg", "reg2", "alice", "bob"))
    people["mallory"].trust("self", people["mallory"])
    return people


def _secure(who: Identity | None) -> tuple[str, ...]:
    return ("--secure",) if who is not None else ()


def _env(who: Identity | None) -> dict[str, str] | None:
    return who.env if who is not None else None


def serve(
    procs: Procs, tmp_path: Path, who: Identity | None, *args: str, mdns: bool = False
) -> tuple[Proc, str, str]:
    """A registry (secure as *who*, plain when None): the process, its request and
    change-stream endpoints."""
    data = tmp_path / f"data-{who.home.name if who else 'plain'}"
    proc = procs.eda(
        "eda-registry", "serve", "-v", *_secure(who), "--bind", "tcp://127.0.0.1:*",
        "--data", str(data), "--tick", "0.1", *(() if mdns else ("--no-mdns",)), *args,
        env=_env(who),
    )  # fmt: skip
    found = proc.wait_stderr(LISTENING, 30)
    if mdns:
        proc.wait_stderr("announced registry", 15)
    return proc, found.group(1), found.group(2)


def register(
    procs: Procs, who: Identity | None, registry: str | None, name: str, port: int, *args: str
) -> Proc:
    where = ("--registry", registry) if registry else ()
    proc = procs.eda(
        "eda-registry", "register", "-v", *_secure(who), name, "--port", str(port), *where,
        *HEARTBEATS, *args, env=_env(who),
    )  # fmt: skip
    proc.wait_stderr(r"registered \S+ at", 30)
    return proc


def ask(
    who: Identity | None, command: str, registry: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    """``eda-registry COMMAND`` as *who*, of the registry *registry* (None: found)."""
    where = ("--registry", registry) if registry else ()
    return run("eda-registry", command, *_secure(who), *where, *args, env=_env(who))


def found(result: subprocess.CompletedProcess[str]) -> dict[int, str]:
    """port -> key of the instances a lookup or list printed."""
    return {
        json.loads(line)["port"]: json.loads(line)["key"] for line in result.stdout.splitlines()
    }


def curve_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], who: Identity, server: Identity, endpoint: str
) -> zmq.Socket[bytes]:
    """A raw CURVE client of *server* as *who*: requests this test writes itself."""
    me = keys.load_identity(who.home / "eda" / "keys" / "id.key")
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_publickey, sock.curve_secretkey = me.public, me.secret
    sock.curve_serverkey = server.public.encode()
    sock.connect(endpoint)
    return sock


def request(sock: zmq.Socket[bytes], msg: dict[str, Any]) -> dict[str, Any]:
    sock.send(json.dumps(msg).encode())
    assert sock.poll(15_000), f"no reply to {msg['op']}"
    reply: dict[str, Any] = json.loads(sock.recv())
    return reply


def test_trusted_register_and_lookup_show_the_proven_key(procs: Procs, tmp_path, ids):
    _, endpoint, _ = serve(procs, tmp_path, ids["reg"])
    register(procs, ids["alice"], f"reg@{endpoint}", "orders", 9001)
    result = ask(ids["bob"], "lookup", f"reg@{endpoint}", "orders", "--json")
    assert result.returncode == 0, result.stderr
    assert found(result) == {9001: ids["alice"].public}
    listed = ask(ids["bob"], "list", f"reg@{endpoint}", "--format", "{port} {key}")
    assert listed.stdout.split() == ["9001", ids["alice"].public]
    services = ask(ids["bob"], "services", f"reg@{endpoint}", "--json")
    assert json.loads(services.stdout)["service"] == "orders"


def test_a_watch_follows_a_secure_registry(procs: Procs, tmp_path, ids):
    _, endpoint, _ = serve(procs, tmp_path, ids["reg"])
    watch = procs.eda("eda-registry", "watch", "-v", "--secure", "orders", "-C", "1",
                      "--registry", f"reg@{endpoint}", env=ids["bob"].env)  # fmt: skip
    watch.wait_stderr("watching registry", 30)  # its change stream is a CURVE server too
    register(procs, ids["alice"], f"reg@{endpoint}", "orders", 9001)
    assert watch.wait(30) == 0, watch.stderr
    [event] = [json.loads(line) for line in watch.lines()]
    assert (event["type"], event["instance"]["key"]) == ("registered", ids["alice"].public)


def test_an_untrusted_client_is_refused_at_once_with_the_message(procs: Procs, tmp_path, ids):
    _, endpoint, _ = serve(procs, tmp_path, ids["reg"])
    mallory = ids["mallory"]
    refused = (
        f"the registry at {endpoint} does not trust this key (eda-keys show: {mallory.public})"
    )
    for command, args in (
        ("lookup", ("orders",)),
        ("list", ()),
        ("services", ()),
        ("deregister", ("orders-1",)),
        ("watch", ("orders",)),
        ("register", ("orders", "--port", "9666")),
    ):
        result = ask(mallory, command, f"reg@{endpoint}", *args)
        # (the client's own timeout would say "no registry answered" instead)
        assert (result.returncode, result.stderr.strip()) == (1, f"eda-registry: error: {refused}")


def test_a_client_refuses_a_registry_with_an_unknown_key(procs: Procs, tmp_path, ids):
    """A registry announcing a key alice does not trust (mallory's) is skipped with a
    warning and sent nothing; named explicitly under a trusted name, the handshake fails."""
    forger, endpoint, _ = serve(procs, tmp_path, ids["mallory"], mdns=True)
    alice = ids["alice"]
    result = ask(alice, "lookup", None, "orders")
    assert result.returncode == 3  # none found: the LAN (mDNS) has no instance either
    assert f"its key {ids['mallory'].public} is not trusted" in result.stderr
    named = ask(alice, "lookup", f"reg@{endpoint}", "orders")
    assert named.returncode == 1
    assert f"the registry at {endpoint} failed the secure handshake" in named.stderr
    refused = procs.eda("eda-registry", "register", "--secure", "orders", "--port", "9001",
                        "--registry", f"reg@{endpoint}", env=alice.env)  # fmt: skip
    assert refused.wait(30) == 1
    assert "failed the secure handshake" in refused.stderr
    forger.signal(2)
    forger.wait()
    assert "orders" not in forger.stderr  # nothing registered with the forger


def test_a_record_carries_the_registrants_key_whatever_it_claims(procs: Procs, tmp_path, ids):
    _, endpoint, _ = serve(procs, tmp_path, ids["reg"])
    alice, bob = ids["alice"], ids["bob"]
    record = {"service": "orders", "id": "claimed", "host": "127.0.0.1", "port": 9001,
              "ttl": 60, "interval": 20}  # fmt: skip
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        as_alice = curve_dealer(ctx, alice, ids["reg"], endpoint)
        reply = request(as_alice, {"op": "register", "rid": 1,
                                   "instance": {**record, "key": bob.public}})  # fmt: skip
        assert reply["ok"] and reply["instance"]["key"] == alice.public
        shown = ask(bob, "lookup", f"reg@{endpoint}", "orders", "--json")
        assert found(shown) == {9001: alice.public}
        # bob heartbeats alice's instance, claiming her key: refused, nothing changes
        as_bob = curve_dealer(ctx, bob, ids["reg"], endpoint)
        claim = {**record, "key": alice.public, "port": 9002}
        for op in ("heartbeat", "register"):
            refused = request(as_bob, {"op": op, "rid": 2, "instance": claim})
            assert not refused["ok"] and refused["code"] == 1
            assert (
                f"instance 'claimed' is registered by key {alice.public} (alice)"
                in (refused["error"])
            )
        refused = request(as_bob, {"op": "deregister", "rid": 3, "id": "claimed"})
        assert not refused["ok"] and "registered by key" in refused["error"]
        assert found(ask(bob, "lookup", f"reg@{endpoint}", "orders", "--json")) == {
            9001: alice.public
        }
        # alice's own heartbeat is taken
        assert request(as_alice, {"op": "heartbeat", "rid": 4, "instance": record})["ok"]
    finally:
        ctx.destroy(0)


def test_only_the_registrants_key_deregisters_an_instance(procs: Procs, tmp_path, ids):
    _, endpoint, _ = serve(procs, tmp_path, ids["reg"])
    register(procs, ids["alice"], f"reg@{endpoint}", "orders", 9001, "--id", "orders-1")
    by_bob = ask(ids["bob"], "deregister", f"reg@{endpoint}", "orders-1")
    assert by_bob.returncode == 1
    [line] = by_bob.stderr.splitlines()
    assert line.startswith("eda-registry: error: deregister refused: instance 'orders-1' is ")
    assert f"registered by key {ids['alice'].public} (alice), not by this key" in line
    assert "deregister it with that key (--key FILE)" in line
    assert found(ask(ids["bob"], "lookup", f"reg@{endpoint}", "orders", "--json")) == {
        9001: ids["alice"].public
    }
    # an operator holding the registrant's key may
    by_alice = ask(ids["alice"], "deregister", f"reg@{endpoint}", "orders-1")
    assert (by_alice.returncode, by_alice.stderr) == (0, "")


def test_a_second_registration_under_another_key_is_refused(procs: Procs, tmp_path, ids):
    _, endpoint, _ = serve(procs, tmp_path, ids["reg"])
    register(procs, ids["alice"], f"reg@{endpoint}", "orders", 9001, "--id", "orders-1")
    taken = procs.eda("eda-registry", "register", "--secure", "orders", "--port", "9002",
                      "--id", "orders-1", "--registry", f"reg@{endpoint}",
                      env=ids["bob"].env)  # fmt: skip
    assert taken.wait(30) == 1
    assert "register refused: instance 'orders-1' is registered by key" in taken.stderr


def test_secure_peers_replicate_with_keys_and_an_untrusted_one_stays_out(
    procs: Procs, tmp_path, ids
):
    first, a, _ = serve(procs, tmp_path, ids["reg"], mdns=True)
    # b replicates from a, named by its trusted key; mallory's registry tries too
    _, b, _ = serve(procs, tmp_path, ids["reg2"], "--peer", f"reg@{a}")
    forger, m, _ = serve(procs, tmp_path, ids["mallory"], "--peer", f"reg@{a}", mdns=True)
    register(procs, ids["alice"], f"reg@{a}", "orders", 9001)
    register(procs, ids["mallory"], f"self@{m}", "orders", 9666)

    def replicated() -> subprocess.CompletedProcess[str] | None:
        result = ask(ids["bob"], "lookup", f"reg2@{b}", "orders", "--json")
        return result if found(result) else None

    assert found(wait_until(replicated, 30, "replication to reg2")) == {9001: ids["alice"].public}
    # a saw mallory's announcement and ignored it; mallory's own link to a was refused
    first.wait_stderr(re.escape(f"its key {ids['mallory'].public} is not trusted"), 15)
    assert found(ask(ids["bob"], "lookup", f"reg@{a}", "orders", "--json")) == {
        9001: ids["alice"].public
    }
    assert found(ask(ids["mallory"], "lookup", f"self@{m}", "orders", "--json")) == {
        9666: ids["mallory"].public
    }
    assert "replicating with peer registry" not in forger.stderr


def test_a_secure_peer_is_named_by_its_key(tmp_path, ids):
    result = run("eda-registry", "serve", "--secure", "--no-mdns", "--data", str(tmp_path / "d"),
                 "--bind", "tcp://127.0.0.1:*", "--peer", "tcp://127.0.0.1:7700",
                 env=ids["reg"].env)  # fmt: skip
    assert result.returncode == 2
    assert "--peer 'tcp://127.0.0.1:7700': in secure mode name the server's trusted key" in (
        result.stderr
    )
    unknown = run("eda-registry", "serve", "--secure", "--no-mdns", "--data", str(tmp_path / "d"),
                  "--bind", "tcp://127.0.0.1:*", "--peer", "carol@tcp://127.0.0.1:7700",
                  env=ids["reg"].env)  # fmt: skip
    assert unknown.returncode == 2 and "'carol' is not trusted" in unknown.stderr


@pytest.mark.long
def test_insecure_and_secure_registries_never_mix(procs: Procs, tmp_path, ids):
    secure, s, _ = serve(procs, tmp_path, ids["reg"], mdns=True)
    plain, p, _ = serve(procs, tmp_path, None, mdns=True)
    secure.wait_stderr(r"ignoring registry '\w+' at tcp://\S+: it is not in secure mode", 15)
    plain.wait_stderr(r"it is in secure mode \(--secure\) and this program is not", 15)
    register(procs, ids["alice"], f"reg@{s}", "orders", 9001)
    register(procs, None, p, "orders", 9002)
    # found by mDNS, each client uses the registry of its own kind
    by_plain = run("eda-registry", "lookup", "-v", "orders", "--json")
    assert found(by_plain) == {9002: ""}, by_plain.stderr
    assert "it is in secure mode (--secure) and this program is not" in by_plain.stderr
    by_secure = ask(ids["bob"], "lookup", None, "-v", "orders", "--json")
    assert found(by_secure) == {9001: ids["alice"].public}, by_secure.stderr
    assert "it is not in secure mode" in by_secure.stderr
    # a plain client named the secure registry gets nothing from it
    given = run("eda-registry", "lookup", "orders", "--no-mdns", "--registry", s)
    assert given.returncode == 1 and "no registry answered" in given.stderr
    assert "replicating with peer registry" not in secure.stderr + plain.stderr


@pytest.mark.long
def test_serverless_secure_lookups_keep_trusted_keys_only(procs: Procs, ids):
    register(procs, ids["alice"], None, "orders", 9001, "--serverless")
    register(procs, None, None, "orders", 9002, "--serverless")
    register(procs, ids["mallory"], None, "orders", 9003, "--serverless")
    plain_skipped = "it is not in secure mode"
    untrusted = f"its key {ids['mallory'].public} is not trusted"
    secure_skipped = "it is in secure mode (--secure) and this program is not"

    def lookup(
        who: Identity | None, heard_all: Callable[[str], bool]
    ) -> subprocess.CompletedProcess[str]:
        """A serverless lookup as *who* whose stderr shows it heard every instance
        (a one-shot mDNS query may miss an answer: asked again until it does)."""

        def heard() -> subprocess.CompletedProcess[str] | None:
            result = run("eda-registry", "lookup", "orders", "--serverless", "-v", "--json",
                         *_secure(who), env=_env(who))  # fmt: skip
            return result if result.returncode == 0 and heard_all(result.stderr) else None

        return wait_until(heard, 30, "a serverless lookup hearing every instance")

    secure = lookup(ids["bob"], lambda err: plain_skipped in err and untrusted in err)
    assert found(secure) == {9001: ids["alice"].public}
    assert secure_skipped not in secure.stderr
    plain = lookup(None, lambda err: err.count(secure_skipped) == 2)  # alice's and mallory's
    assert found(plain) == {9002: ""}


@pytest.mark.parametrize("secure", [False, True])
def test_eavesdropping_sees_metadata_only_without_secure_mode(procs: Procs, tmp_path, ids, secure):
    secret = f"EAVESDROP-{secrets.token_hex(8)}"
    registry, bob = (ids["reg"], ids["bob"]) if secure else (None, None)
    _, endpoint, _ = serve(procs, tmp_path, registry)
    name = f"reg@{endpoint}" if secure else endpoint
    capture = Capture()
    try:
        register(procs, ids["alice"] if secure else None, name, "orders", 9001,
                 "--meta", f"secret={secret}")  # fmt: skip
        result = ask(bob, "lookup", name, "orders", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["meta"] == {"secret": secret}  # it went through
    finally:
        seen = capture.stop()
    assert (secret.encode() in seen) is not secure
    assert len(seen) > 1000  # the capture saw the traffic either way


def test_garbage_and_half_handshakes_leave_a_secure_registry_serving(procs: Procs, tmp_path, ids):
    _, endpoint, changes = serve(procs, tmp_path, ids["reg"])
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
    greeting += b"\x00" * 32
    held = []
    for where in (endpoint, changes):
        host, port = where.removeprefix("tcp://").rsplit(":", 1)
        for payload in (b"garbage" * 100, greeting, greeting + b"\x04\xff" + b"\x00" * 300):
            conn = socket.create_connection((host, int(port)))
            conn.sendall(payload)  # garbage, a greeting and no HELLO, a broken HELLO
            held.append(conn)
    try:
        register(procs, ids["alice"], f"reg@{endpoint}", "orders", 9001)
        result = ask(ids["bob"], "lookup", f"reg@{endpoint}", "orders", "--json")
        assert result.returncode == 0, result.stderr
        assert found(result) == {9001: ids["alice"].public}
    finally:
        for conn in held:
            conn.close()
    after = ask(ids["bob"], "list", f"reg@{endpoint}", "--json")  # and after they are gone
    assert found(after) == {9001: ids["alice"].public}


def test_secure_mode_from_the_environment_and_the_config_file(tmp_path):
    """EDA_SECURE=1 and `secure = true` turn it on for eda-registry (seen by the missing key)."""
    home = {"XDG_CONFIG_HOME": str(tmp_path / "nobody")}
    by_env = run("eda-registry", "lookup", "orders", env={**home, "EDA_SECURE": "1"})
    config = tmp_path / "eda.toml"
    config.write_text(f'secure = true\ntrust = "{tmp_path}"\n')
    by_file = run("eda-registry", "serve", "--config", str(config), "--no-mdns", env=home)
    for result in (by_env, by_file):
        assert result.returncode == 2 and "run eda-keys init" in result.stderr, result.stderr


def test_the_key_is_a_reserved_metadata_name():
    from eda.core.registry.model import InvalidRecord, parse_meta

    with pytest.raises(InvalidRecord, match="'k' is reserved"):
        parse_meta(["k=forged"])

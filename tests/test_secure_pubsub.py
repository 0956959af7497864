"""Secure mode end to end: eda-pub / eda-sub --secure with real processes in the test namespace.

Each identity is a configuration home of its own (``XDG_CONFIG_HOME``) with
its key pair and trusted directory, as on separate hosts.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eda.core import discovery
from tests.helpers import (
    Capture,
    Identity,
    MdnsResponder,
    Procs,
    run,
    service_records,
    trusting,
    wait_until,
)


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """alice and bob trust each other; mallory trusts both, nobody trusts mallory."""
    return trusting(tmp_path, ("alice", "bob"))


def events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.lines()]


def test_a_trusted_pair_works(procs: Procs, ids):
    sub = procs.sub_ready("--secure", "orders.>", "-C", "2", env=ids["bob"].env)
    result = run("eda-pub", "--secure", "orders.created", "one", "two", env=ids["alice"].env)
    assert (result.returncode, result.stderr) == (0, "")
    assert sub.wait() == 0
    assert [e["data"] for e in events(sub)] == ["one", "two"]


@pytest.mark.long
def test_secure_and_insecure_never_mix(procs: Procs, ids):
    # the plain one ends at its first event (it must be y); the secure one at its second,
    # which must be z, published after y (y, from a plain publisher, must never come)
    plain = procs.sub_ready("t", "-C", "1", "-W", "60")
    secure = procs.sub_ready("--secure", "t", "-C", "2", "-W", "60", env=ids["bob"].env)
    result = run("eda-pub", "--secure", "-v", "t", "x", env=ids["alice"].env)
    assert result.returncode == 0
    assert "it is not in secure mode" in result.stderr  # said with -v only
    insecure = run("eda-pub", "-v", "t", "y")
    assert "it is in secure mode (--secure) and this program is not" in insecure.stderr
    assert plain.wait() == 0
    assert [e["data"] for e in events(plain)] == ["y"]  # never the secure event
    after = run("eda-pub", "--secure", "t", "z", env=ids["alice"].env)
    assert after.returncode == 0, after.stderr
    assert secure.wait() == 0 and [e["data"] for e in events(secure)] == ["x", "z"]


def test_an_untrusted_subscriber_gets_nothing_and_the_publisher_says_so(procs: Procs, ids):
    # (no -W: an idle timeout could end mallory before a slow-starting publisher on a
    # loaded machine saw its announcement)
    mallory = procs.sub_ready("--secure", "t", env=ids["mallory"].env)
    result = run("eda-pub", "--secure", "t", "secret", env=ids["alice"].env)
    assert result.returncode == 0  # nobody it trusts was there: not an error
    assert f"its key {ids['mallory'].public} is not trusted" in result.stderr
    assert result.stderr.count("is not trusted") == 1  # one warning (rate-limited)
    assert mallory.popen.poll() is None  # it was there all along
    mallory.signal(signal.SIGTERM)
    mallory.wait()
    assert mallory.stdout == ""


def test_an_untrusted_subscriber_is_told_fast_by_a_streaming_publisher(procs: Procs, ids):
    port, pub = _streaming_publisher(procs, ids["alice"])
    # mallory trusts alice, alice does not trust mallory: alice's ZAP handler refuses it
    started = time.monotonic()
    refused = run(
        "eda-sub", "--secure", "--no-mdns", "--connect", f"alice@tcp://127.0.0.1:{port}", "t",
        env=ids["mallory"].env,
    )  # fmt: skip
    took = time.monotonic() - started
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        f"eda-sub: error: the publisher at tcp://127.0.0.1:{port} does not trust this key"
        f" (eda-keys show: {ids['mallory'].public})\n"
    ), took
    pub.popen.stdin.close()
    assert pub.wait() == 0  # nothing published: nothing unconfirmed


def test_a_secure_connect_names_a_trusted_server(ids):
    missing = run("eda-sub", "--secure", "--no-mdns", "--connect", "tcp://127.0.0.1:1", "t",
                  env=ids["bob"].env)  # fmt: skip
    assert missing.returncode == 2 and "NAME@tcp://HOST:PORT" in missing.stderr
    unknown = run("eda-sub", "--secure", "--no-mdns", "--connect", "eve@tcp://127.0.0.1:1", "t",
                  env=ids["bob"].env)  # fmt: skip
    assert unknown.returncode == 2 and "'eve' is not trusted" in unknown.stderr


def test_key_problems_stop_a_secure_program_with_one_line(ids, tmp_path):
    nokey = run("eda-sub", "--secure", "t", env={"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert nokey.returncode == 2 and nokey.stderr.count("\n") == 1
    assert "id.key: run eda-keys init" in nokey.stderr
    key_file = ids["bob"].home / "eda" / "keys" / "id.key"
    key_file.chmod(0o640)
    loose = run("eda-pub", "--secure", "t", "x", env=ids["bob"].env)
    assert loose.returncode == 2 and f"key file {key_file} is readable by others" in loose.stderr
    key_file.chmod(0o600)
    (ids["bob"].trusted / "bad.pub").write_text("nope\n")
    bad = run("eda-pub", "--secure", "t", "x", env=ids["bob"].env)
    assert (
        bad.returncode == 2 and bad.stderr.count("\n") == 1 and "bad.pub is malformed" in bad.stderr
    )
    plain = run("eda-pub", "--key", str(key_file), "t", "x")
    assert plain.returncode == 2 and "--key and --trust are used with --secure" in plain.stderr


@pytest.fixture
def responder() -> Iterator[MdnsResponder]:
    fake = MdnsResponder()
    yield fake
    fake.close()


def test_a_forged_announcement_gets_nothing(procs: Procs, ids, responder):
    """A forger announcing bob's key at its own port: the handshake fails (it does not hold
    bob's secret key); announcing its own key: the publisher does not trust it."""
    port = _free_port()
    forger = procs.eda(
        "eda-sub", "--secure", "--no-mdns", "--bind", f"tcp://127.0.0.1:{port}", "t", "-W", "4",
        env=ids["mallory"].env,
    )  # fmt: skip
    wait_until(lambda: _listening(port), 10, "the forger listening")
    for label, key in (("hijack", ids["bob"].public), ("unknown", ids["mallory"].public)):
        txt = {"id": f"f0{len(label):06d}", "p": "t", "k": key}
        responder.add(
            discovery.SUB_TYPE,
            service_records(discovery.SUB_TYPE, label, port, txt, "127.0.0.1"),
        )
    result = run("eda-pub", "--secure", "--wait", "1", "t", "secret", env=ids["alice"].env)
    assert f"its key {ids['mallory'].public} is not trusted" in result.stderr
    assert forger.wait() == 4 and forger.stdout == ""


def test_revocation_takes_effect_without_a_restart(procs: Procs, ids):
    port, pub = _streaming_publisher(procs, ids["alice"])
    connect = ("--secure", "--no-mdns", "--connect", f"alice@tcp://127.0.0.1:{port}", "t")
    first = procs.eda("eda-sub", *connect, "-C", "1", env=ids["bob"].env)
    _feed_until(pub, first, "before")
    assert first.wait() == 0
    ids["alice"].revoke("bob")  # the running publisher re-reads its trusted directory
    again = run("eda-sub", *connect, env=ids["bob"].env)
    assert again.returncode == 1 and "does not trust this key" in again.stderr
    ids["alice"].trust("bob", ids["bob"])
    back = procs.eda("eda-sub", *connect, "-C", "1", env=ids["bob"].env)
    _feed_until(pub, back, "after")
    assert back.wait() == 0
    pub.popen.stdin.close()
    pub.wait()


def _streaming_publisher(procs: Procs, who: Identity) -> tuple[int, Any]:
    """A secure eda-pub reading stdin, bound to a port of 127.0.0.1 (no mDNS): (port, proc)."""
    port = _free_port()
    pub = procs.eda(
        "eda-pub", "--secure", "--no-mdns", "--bind", f"tcp://127.0.0.1:{port}", "t",
        stdin=subprocess.PIPE, env=who.env,
    )  # fmt: skip
    return port, pub


def _feed_until(pub, sub, text: str) -> None:
    """Publish *text* (again, every 0.1 s) until *sub* printed it (it connects meanwhile)."""

    def sent() -> bool:
        pub.popen.stdin.write(f"{text}\n".encode())
        pub.popen.stdin.flush()
        return any(e["data"] == text for e in events(sub))

    wait_until(sent, 15, f"{text!r} delivered")


# -- eavesdropping --------------------------------------------------------------------
@pytest.mark.parametrize("secure", [False, True])
def test_eavesdropping_sees_the_payload_only_without_secure_mode(procs: Procs, ids, secure):
    flag = ("--secure",) if secure else ()
    payload = f"EAVESDROP-{secrets.token_hex(8)}"
    capture = Capture()
    try:
        sub = procs.sub_ready(*flag, "t", "-C", "1", env=ids["bob"].env)
        result = run("eda-pub", *flag, "t", payload, env=ids["alice"].env)
        assert result.returncode == 0, result.stderr
        assert sub.wait() == 0 and events(sub)[0]["data"] == payload  # it was delivered
    finally:
        seen = capture.stop()
    assert (payload.encode() in seen) is not secure
    assert len(seen) > 1000  # the capture saw the traffic either way


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_subscriber_refusing_the_publisher_is_an_error_not_a_wait(procs: Procs, ids):
    ids["bob"].revoke("alice")  # alice still trusts bob; bob no longer trusts alice
    # (no -W: an idle timeout could end the subscriber before a slow-starting publisher
    # on a loaded machine found it, and then nothing would refuse anything)
    sub = procs.sub_ready("--secure", "t", env=ids["bob"].env)
    result = run("eda-pub", "--secure", "--wait", "30", "t", "x", env=ids["alice"].env)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eda-pub: error: the subscriber at tcp://")
    assert lines[0].endswith(f"does not trust this key (eda-keys show: {ids['alice'].public})")
    assert "not ready" not in result.stderr  # (not waited for: --wait 30 did not run out)
    assert sub.popen.poll() is None  # the subscriber was there all along
    sub.signal(signal.SIGTERM)
    sub.wait()
    assert sub.stdout == ""


def test_garbage_and_half_handshakes_do_not_stop_a_secure_subscriber(procs: Procs, ids):
    port = _free_port()
    sub = procs.eda(
        "eda-sub", "--secure", "-v", "--bind", f"tcp://127.0.0.1:{port}", "t", "-C", "1",
        env=ids["bob"].env,
    )  # fmt: skip
    sub.wait_stderr("announced as", 15)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
    greeting += b"\x00" * 32
    held = []
    for payload in (b"garbage" * 100, greeting, greeting + b"\x04\xff" + b"\x00" * 300):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(payload)  # garbage, a greeting and no HELLO, a broken HELLO
        held.append(conn)
    try:
        result = run("eda-pub", "--secure", "t", "still served", env=ids["alice"].env)
        assert result.returncode == 0, result.stderr
        assert sub.wait() == 0 and [e["data"] for e in events(sub)] == ["still served"]
    finally:
        for conn in held:
            conn.close()


def test_secure_mode_from_the_environment_and_the_config_file(tmp_path):
    """EDA_SECURE=1 and `secure = true` turn it on (seen here by the missing key)."""
    home = {"XDG_CONFIG_HOME": str(tmp_path / "nobody")}
    by_env = run("eda-sub", "t", env={**home, "EDA_SECURE": "1"})
    config = tmp_path / "eda.toml"
    config.write_text(f'secure = true\ntrust = "{tmp_path}"\n')
    by_file = run("eda-pub", "--config", str(config), "t", "x", env=home)
    for result in (by_env, by_file):
        assert result.returncode == 2 and "run eda-keys init" in result.stderr


def test_a_secure_subscriber_ignores_an_untrusted_publisher_and_says_so(procs: Procs, ids):
    sub = procs.sub_ready("--secure", "t", env=ids["bob"].env)
    pub = procs.eda("eda-pub", "--secure", "t", stdin=subprocess.PIPE, env=ids["mallory"].env)

    def warned() -> bool:  # a streaming publisher announces itself after half a second
        pub.popen.stdin.write(b"forged\n")
        pub.popen.stdin.flush()
        return "is not trusted" in sub.stderr

    wait_until(warned, 15, "the subscriber's warning")
    assert f"its key {ids['mallory'].public} is not trusted" in sub.stderr
    # mallory trusts bob and connects to him: bob's ZAP handler refuses it, and mallory is told
    pub.wait_stderr("the subscriber at tcp://.* does not trust this key", 15)
    pub.popen.stdin.close()
    assert pub.wait() == 1
    assert sub.stdout == ""

"""Secure mode in eda-lb: worker, call and serve (the broker) with --secure, with real
processes in the test namespace.

Each identity is a configuration home of its own (key pair, trusted directory), as on
separate hosts.  Workers run each request through ``tee -a LOG``: what a worker was
ever sent is in its command's output, LOG.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from eda.core import security
from eda.core.registry.model import Instance
from tests.helpers import PROGRAMS, Capture, Identity, Proc, Procs, run, trusting, wait_until

PROGRAMS.setdefault("eda-lb", "eda.cli.lb")  # as tests/test_lb_broker.py runs it

SERVING = r"serving \S+ on (tcp://\S+) \("
BROKER = r"listening on (tcp://\S+) \(callers\), (tcp://\S+) \(workers\)"
PEOPLE = ("w", "w2", "b", "reg", "alice", "bob")


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """Workers w and w2, broker b, registry reg, callers alice and bob trust each other;
    mallory trusts them all, nobody trusts mallory."""
    return trusting(tmp_path, PEOPLE)


def worker(procs: Procs, who: Identity | None, log: Path, *args: str) -> tuple[Proc, str]:
    """A worker of 'pay' (secure as *who*, plain when None), without registry or mDNS,
    each request through ``tee -a LOG``; the process and its endpoint."""
    secure = ("--secure",) if who is not None else ()
    proc = procs.eda(
        "eda-lb", "worker", "pay", *secure, "--no-mdns", "--bind", "tcp://127.0.0.1:0", *args,
        "--", "tee", "-a", str(log), env=who.env if who is not None else None,
    )  # fmt: skip
    return proc, proc.wait_stderr(SERVING, 30)[1]


def call(who: Identity, *args: str) -> subprocess.CompletedProcess[str]:
    """``eda-lb call pay --secure`` as *who* (its --timeout far beyond the run's own: a
    refusal must be told at once, never waited out)."""
    return run("eda-lb", "call", "pay", "--secure", "--no-mdns", "--timeout", "60", *args,
               env=who.env, timeout=30)  # fmt: skip


def assert_refused(done: subprocess.CompletedProcess[str], endpoint: str, who: Identity) -> None:
    """*done* (an eda-lb call) stopped with the one refusal line for *who*'s key, exit 1."""
    line = f"the worker at {endpoint} does not trust this key (eda-keys show: {who.public})"
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"eda-lb: error: {line}\n")


def sent(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def test_a_trusted_caller_is_served_by_a_secure_worker(procs: Procs, tmp_path: Path, ids):
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log)
    done = call(ids["alice"], "--connect", f"w@{endpoint}", "one", "two")
    assert (done.returncode, done.stdout, done.stderr) == (0, "one\ntwo\n", "")
    assert sent(log) == "one\ntwo\n"
    # secure mode names the worker's key; a name without --secure is a usage error
    plain = call(ids["alice"], "--connect", endpoint, "x")
    assert plain.returncode == 2 and "name the server's trusted key" in plain.stderr
    named = run("eda-lb", "call", "pay", "--connect", f"w@{endpoint}", "x", env=ids["alice"].env)
    assert named.returncode == 2 and "with --secure only" in named.stderr


def test_a_trusted_call_through_a_secure_broker(procs: Procs, tmp_path: Path, ids):
    broker = procs.eda(
        "eda-lb", "serve", "pay", "--secure", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
        "--backend", "tcp://127.0.0.1:*", env=ids["b"].env,
    )  # fmt: skip
    front, back = broker.wait_stderr(BROKER, 30).groups()
    log = tmp_path / "w.log"
    worker(procs, ids["w"], log, "--broker", f"b@{back}")
    broker.wait_stderr("worker .* ready", 20)
    done = call(ids["alice"], "--connect", f"b@{front}", "through", "the broker")
    assert (done.returncode, done.stdout, done.stderr) == (0, "through\nthe broker\n", "")
    assert sent(log) == "through\nthe broker\n"
    # mallory is refused by the broker, at once
    assert_refused(call(ids["mallory"], "--connect", f"b@{front}", "x"), front, ids["mallory"])
    assert sent(log) == "through\nthe broker\n"


def test_an_untrusted_caller_is_refused_at_once_with_the_message(procs: Procs, tmp_path: Path, ids):
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log)
    done = call(ids["mallory"], "--connect", f"w@{endpoint}", "steal")
    assert_refused(done, endpoint, ids["mallory"])
    assert sent(log) == ""


def test_a_caller_refuses_a_worker_holding_another_key(procs: Procs, tmp_path: Path, ids):
    """Mallory's worker at an endpoint alice names as w's: the handshake fails (it does
    not hold w's key), and it is never sent the request."""
    log = tmp_path / "mallory.log"
    forger, endpoint = worker(procs, ids["mallory"], log)
    done = call(ids["alice"], "--connect", f"w@{endpoint}", "secret")
    assert done.returncode == 1
    assert f"the worker at {endpoint} failed the secure handshake" in done.stderr
    forger.signal(2)
    forger.wait()
    assert sent(log) == "" and "secret" not in forger.stdout + forger.stderr


@pytest.fixture
def as_alice(ids) -> Iterator[security.Security]:
    """Secure mode in this process, as alice."""
    home = ids["alice"].home / "eda" / "keys"
    try:
        yield security.enable(home / "id.key", home / "trusted")
    finally:
        security.disable()


def secure_registry(procs: Procs, tmp_path: Path, ids: dict[str, Identity]) -> str:
    """A secure registry (as reg), without mDNS; its endpoint, named by its key."""
    registry = procs.eda(
        "eda-registry", "serve", "--secure", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
        "--data", str(tmp_path / "reg"), "--tick", "0.1", env=ids["reg"].env,
    )  # fmt: skip
    return "reg@" + registry.wait_stderr(r"listening on (tcp://\S+)", 30)[1]


def test_callers_pin_each_worker_key_from_its_registry_record(procs: Procs, tmp_path: Path, ids):
    """Found through a secure registry: each worker's key is the one its registration
    proved.  Alice no longer trusts w2: its record is left out with the warning and w2 is
    never sent a request; w serves everything."""
    at = secure_registry(procs, tmp_path, ids)
    logs = {name: tmp_path / f"{name}.log" for name in ("w", "w2")}
    for name in logs:
        proc, _ = worker(procs, ids[name], logs[name], "--registry", at)
        proc.wait_stderr(r"\(registered\)", 1)
    ids["alice"].revoke("w2")
    done = call(ids["alice"], "--registry", at, *(f"r{i}" for i in range(10)))
    assert (done.returncode, done.stdout) == (0, "".join(f"r{i}\n" for i in range(10)))
    assert f"its key {ids['w2'].public} is not trusted" in done.stderr
    assert sent(logs["w"]).count("\n") == 10 and sent(logs["w2"]) == ""


def test_stats_asks_each_instance_found_under_its_key(procs: Procs, tmp_path: Path, ids):
    """eda-lb stats --secure: w's figures; w2 (--allow bob) refuses alice's key: one
    error line at once, exit 1."""
    at = secure_registry(procs, tmp_path, ids)
    _, serving = worker(procs, ids["w"], tmp_path / "w.log", "--registry", at)
    _, refusing = worker(procs, ids["w2"], tmp_path / "w2.log", "--registry", at, "--allow", "bob")
    done = run("eda-lb", "stats", "pay", "--secure", "--no-mdns", "--registry", at, "--json",
               "--timeout", "60", env=ids["alice"].env, timeout=30)  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["source"] for r in rows] == ["direct"] and rows[0]["instance"].endswith(
        serving.rsplit(":", 1)[1]
    )
    alice = ids["alice"].public
    assert (done.returncode, done.stderr) == (
        1,
        f"eda-lb: error: the instance at {refusing} does not trust this key "
        f"(eda-keys show: {alice})\n",
    )


def test_callers_pin_each_worker_key_from_its_announcement(procs: Procs, tmp_path: Path, ids):
    """Serverless: each worker announces its key (k=); a secure caller uses the trusted
    one only: mallory's worker, announcing the same service, is never sent a request."""
    logs = {name: tmp_path / f"{name}.log" for name in ("w", "mallory")}
    for name, log in logs.items():
        proc = procs.eda(
            "eda-lb", "worker", "pay", "--secure", "--serverless", "--bind", "tcp://127.0.0.1:0",
            "--", "tee", "-a", str(log), env=ids[name].env,
        )  # fmt: skip
        proc.wait_stderr(r"\(announced by mDNS\)", 30)

    def heard() -> bool:  # alice's lookups hear w's announcement
        found = run("eda-registry", "lookup", "pay", "--secure", "--serverless", "--json",
                    env=ids["alice"].env)  # fmt: skip
        return ids["w"].public in found.stdout

    wait_until(heard, 30, "w's announcement")
    done = run("eda-lb", "call", "pay", "--secure", "--serverless", "--timeout", "60",
               *(f"r{i}" for i in range(10)), env=ids["alice"].env, timeout=30)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "".join(f"r{i}\n" for i in range(10)))
    assert sent(logs["w"]).count("\n") == 10 and sent(logs["mallory"]) == ""


def test_instances_found_with_an_untrusted_or_no_key_never_get_a_request(
    procs: Procs, tmp_path: Path, ids, as_alice
):
    """What a lookup finds (the registry record's key, or the announcement's k=): w's
    instance is pinned and called; mallory's (a forged record) and a plain one are left
    out, said why, and never sent anything."""
    from eda.core.lb.caller import Caller
    from eda.core.lb.callpool import endpoint_of
    from eda.core.lb.pins import usable

    logs = {name: tmp_path / f"{name}.log" for name in ("w", "mallory", "plain")}
    found = []
    for name, who in (("w", ids["w"]), ("mallory", ids["mallory"]), ("plain", None)):
        _, endpoint = worker(procs, who, logs[name])
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        key = who.public if who is not None else ""
        found.append(Instance(service="pay", id=name, host=host, port=int(port), key=key))
    ignored: list[tuple[str, str]] = []
    replies: list[bytes] = []
    caller = Caller(out=replies.append, failed=lambda *a: pytest.fail(f"failed: {a}"),
                    timeout=20)  # fmt: skip
    try:
        kept = usable(found, lambda peer, why: ignored.append((peer.id, why)))
        caller.use((endpoint_of(i), i.weight) for i in kept)
        caller.feed(b"request %d" % i for i in range(20))
        summary = caller.run()
    finally:
        caller.close()
    assert summary.ok == 20 and b"".join(replies).count(b"request") == 20
    assert [i.id for i in kept] == ["w"]
    assert ignored == [
        ("mallory", f"its key {ids['mallory'].public} is not trusted (eda-keys trust NAME KEY)"),
        ("plain", "it is not in secure mode"),
    ]
    assert sent(logs["w"]).count("request") == 20
    assert sent(logs["mallory"]) == sent(logs["plain"]) == ""


def test_stats_asks_each_instance_under_its_key_and_tells_a_refusal(
    procs: Procs, tmp_path: Path, ids, as_alice
):
    """eda-lb stats' gathering: each instance found asked with its pinned key; one that
    refuses this key is told (an error line in the command), not waited for."""
    from eda.core.lb.pins import usable
    from eda.core.lb.stats import ask_stats

    _, serving = worker(procs, ids["w"], tmp_path / "w.log")
    _, refusing = worker(procs, ids["w2"], tmp_path / "w2.log", "--allow", "bob")
    found = []
    for name, endpoint in (("w", serving), ("w2", refusing)):
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        found.append(Instance("pay", name, host, int(port), key=ids[name].public))
    assert len(usable(found)) == 2  # both keys trusted: pinned
    refused: list[tuple[str, str]] = []
    answers = ask_stats([serving, refusing], timeout=20,
                        on_refused=lambda endpoint, why: refused.append((endpoint, why)))  # fmt: skip
    served = answers[serving]
    assert isinstance(served, dict) and served["role"] == "worker", served
    assert answers[refusing] == "does not trust this key"
    assert refused == [(refusing, "does not trust this key")]


def test_allow_admits_one_trusted_key_and_refuses_another(procs: Procs, tmp_path: Path, ids):
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log, "--allow", "alice")
    ok = call(ids["alice"], "--connect", f"w@{endpoint}", "from alice")
    assert (ok.returncode, ok.stdout) == (0, "from alice\n"), ok.stderr
    assert_refused(call(ids["bob"], "--connect", f"w@{endpoint}", "from bob"), endpoint, ids["bob"])
    assert sent(log) == "from alice\n"
    # a name that is not trusted, and a broker the worker would not let call it: usage errors
    typo = run("eda-lb", "worker", "pay", "--secure", "--no-mdns", "--allow", "alcie", "--",
               "cat", env=ids["w"].env)  # fmt: skip
    assert typo.returncode == 2 and "'alcie': not a trusted name" in typo.stderr
    broker = run("eda-lb", "worker", "pay", "--secure", "--no-mdns", "--allow", "alice",
                 "--broker", "b@tcp://127.0.0.1:9", "--", "cat", env=ids["w"].env)  # fmt: skip
    assert broker.returncode == 2 and "'b' is not in --allow" in broker.stderr


def test_when_some_workers_refuse_the_others_serve(procs: Procs, tmp_path: Path, ids):
    """A warning for the one refusing this key (never sent a request), exit 0."""
    logs = [tmp_path / "w.log", tmp_path / "w2.log"]
    _, refusing = worker(procs, ids["w"], logs[0], "--allow", "bob")
    _, serving = worker(procs, ids["w2"], logs[1])
    done = call(ids["alice"], "--connect", f"w@{refusing}", "--connect", f"w2@{serving}",
                *(f"r{i}" for i in range(10)))  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "".join(f"r{i}\n" for i in range(10)))
    alice = ids["alice"].public
    assert done.stderr == (
        f"eda-lb: warning: the worker at {refusing} does not trust this key "
        f"(eda-keys show: {alice}); the others serve\n"
    )
    assert sent(logs[0]) == "" and sent(logs[1]).count("\n") == 10


def test_plain_callers_and_secure_workers_never_mix(procs: Procs, tmp_path: Path, ids):
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log)
    plain = run("eda-lb", "call", "pay", "--no-mdns", "--heartbeat", "0.2", "--connect",
                endpoint, "plain")  # fmt: skip
    assert plain.returncode == 3 and "no live instance" in plain.stderr
    assert sent(log) == ""


@pytest.mark.parametrize("secure", [False, True])
def test_eavesdropping_sees_the_request_only_without_secure_mode(
    procs: Procs, tmp_path: Path, ids, secure
):
    payload = f"EAVESDROP-{secrets.token_hex(8)}"
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"] if secure else None, log)
    flags = ("--secure", "--connect", f"w@{endpoint}") if secure else ("--connect", endpoint)
    capture = Capture()
    try:
        done = run("eda-lb", "call", "pay", "--no-mdns", *flags, payload, env=ids["alice"].env)
        assert (done.returncode, done.stdout) == (0, f"{payload}\n"), done.stderr
    finally:
        seen = capture.stop()
    assert sent(log) == f"{payload}\n"  # it was called
    assert (payload.encode() in seen) is not secure
    assert len(seen) > 1000  # the capture saw the traffic either way


def test_garbage_and_half_handshakes_do_not_stop_a_secure_worker(procs: Procs, tmp_path: Path, ids):
    log = tmp_path / "w.log"
    proc, endpoint = worker(procs, ids["w"], log)
    port = int(endpoint.rsplit(":", 1)[1])
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
    greeting += b"\x00" * 32
    held = []
    try:
        for payload in (b"garbage" * 100, greeting, greeting + b"\x04\xff" + b"\x00" * 300):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(payload)  # garbage, a greeting and no HELLO, a broken HELLO
            held.append(conn)
        for i in range(3):
            done = call(ids["alice"], "--connect", f"w@{endpoint}", f"still served {i}")
            assert (done.returncode, done.stdout) == (0, f"still served {i}\n"), done.stderr
    finally:
        for conn in held:
            conn.close()
    assert proc.popen.poll() is None  # still serving
    wait_until(lambda: sent(log).count("still served") == 3, 10, "every request logged")


def test_secure_mode_from_the_environment_and_the_config_file(tmp_path: Path):
    """EDA_SECURE=1 and `secure = true` turn it on (seen here by the missing key)."""
    home = {"XDG_CONFIG_HOME": str(tmp_path / "nobody")}
    by_env = run("eda-lb", "worker", "pay", "--no-mdns", "--", "cat",
                 env={**home, "EDA_SECURE": "1"})  # fmt: skip
    config = tmp_path / "eda.toml"
    config.write_text("secure = true\n")
    by_file = run("eda-lb", "--config", str(config), "call", "pay", "--no-mdns", "--connect",
                  "x@tcp://127.0.0.1:9", "x", env=home)  # fmt: skip
    for result in (by_env, by_file):
        assert result.returncode == 2 and "run eda-keys init" in result.stderr, result.stderr


def test_a_plain_caller_leaves_secure_instances_out(ids):
    """Secure and insecure never mix: without --secure, an instance found with a key (a
    secure worker's record or announcement) is left out, and said why (with -v)."""
    from eda.core.lb.pins import usable

    assert security.active() is None
    found = [Instance("pay", "secure", "127.0.0.1", 9, key=ids["w"].public),
             Instance("pay", "plain", "127.0.0.1", 10)]  # fmt: skip
    ignored: list[tuple[str, str]] = []
    kept = usable(found, lambda peer, why: ignored.append((peer.id, why)))
    assert [i.id for i in kept] == ["plain"]
    assert ignored == [("secure", "it is in secure mode (--secure) and this program is not")]


def test_a_secure_tcp_proxy_proxies_only_to_instances_under_a_trusted_key(ids, as_alice):
    """eda-lb tcp --secure: a record (or announcement) whose key is missing or untrusted
    gets no traffic, and is said so."""
    from eda.core.lb.tcp import instances_of

    record = {"service": "web", "host": "127.0.0.1", "status": "passing", "weight": 1}
    records = [
        {**record, "id": "trusted", "port": 8001, "key": ids["w"].public},
        {**record, "id": "forged", "port": 8002, "key": ids["mallory"].public},
        {**record, "id": "plain", "port": 8003},
    ]
    said: list[str] = []
    backends = instances_of(records, said.append)
    assert [b.id for b in backends] == ["trusted"]
    assert said == [
        f"warning: instance forged: its key {ids['mallory'].public} is not trusted "
        "(eda-keys trust NAME KEY); left out",
        "warning: instance plain: it is not in secure mode; left out",
    ]


def test_a_broker_refusing_the_worker_key_is_said_and_left(procs: Procs, tmp_path: Path, ids):
    """eda-lb serve --allow covers workers too: w, not allowed, is told at once (a
    warning: it goes on serving its callers directly) and never gets a request."""
    broker = procs.eda(
        "eda-lb", "serve", "pay", "--secure", "--no-mdns", "--allow", "alice",
        "--bind", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*", env=ids["b"].env,
    )  # fmt: skip
    front, back = broker.wait_stderr(BROKER, 30).groups()
    log = tmp_path / "w.log"
    proc, endpoint = worker(procs, ids["w"], log, "--broker", f"b@{back}")
    via = call(ids["alice"], "--connect", f"b@{front}", "--timeout", "2", "via the broker")
    assert via.returncode == 4 and via.stdout == "", via.returncode  # the broker has no worker
    proc.wait_stderr(
        f"warning: the broker at {back} does not trust this key "
        rf"\(eda-keys show: {re.escape(ids['w'].public)}\): not serving it",
        15,
    )
    direct = call(ids["alice"], "--connect", f"w@{endpoint}", "direct")
    assert (direct.returncode, direct.stdout) == (0, "direct\n"), direct.stderr
    assert sent(log) == "direct\n"

"""Secure mode across programs (the review of issue 17): paths that go through more than
one program -- a saga's call steps to eda-lb workers, callers finding brokers in a secure
registry, registries replicating with peers found by mDNS -- with real processes in the
test namespace.

Each identity is a configuration home of its own (key pair, trusted directory), as on
separate hosts.  Workers run each request through ``tee -a LOG``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import Identity, Proc, Procs, run, trusting, wait_until

helpers.PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

SERVING = r"serving \S+ on (tcp://\S+) \("
BROKER = r"listening on (tcp://\S+) \(callers\), (tcp://\S+) \(workers\)"
TRUSTING = ("w", "b", "reg", "reg2", "alice", "bob")


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """Everyone but mallory trusts one another; mallory trusts them all, nobody trusts
    mallory."""
    return trusting(tmp_path, TRUSTING)


def worker(procs: Procs, who: Identity, log: Path, *args: str) -> tuple[Proc, str]:
    """A secure worker of 'pay' as *who*, each request through ``tee -a LOG``."""
    proc = procs.eda(
        "eda-lb", "worker", "pay", "--secure", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:0",
        *args, "--", "tee", "-a", str(log), env=who.env,
    )  # fmt: skip
    return proc, proc.wait_stderr(SERVING, 30)[1]


def registry(procs: Procs, tmp_path: Path, who: Identity, *args: str, mdns: bool = False) -> Proc:
    return procs.eda(
        "eda-registry", "serve", "--secure", "-v", "--bind", "tcp://127.0.0.1:*",
        "--data", str(tmp_path / f"data-{who.home.name}"), "--tick", "0.1",
        *(() if mdns else ("--no-mdns",)), *args, env=who.env,
    )  # fmt: skip


def secure_registry(procs: Procs, tmp_path: Path, ids: dict[str, Identity]) -> str:
    """A secure registry (as reg) without mDNS; its endpoint named by its key."""
    proc = registry(procs, tmp_path, ids["reg"])
    return "reg@" + proc.wait_stderr(r"listening on (tcp://[^\s,]+)", 30)[1]


def register(procs: Procs, who: Identity, at: str, port: int) -> Proc:
    """Instance PORT of 'orders' registered at *at* as *who*, heartbeating."""
    proc = procs.eda("eda-registry", "register", "--secure", "-v", "orders", "--port", str(port),
                     "--registry", at, "--interval", "0.5", "--ttl", "3", env=who.env)  # fmt: skip
    proc.wait_stderr(r"registered \S+ at", 30)
    return proc


def sent(log: Path) -> str:
    return log.read_text() if log.exists() else ""


SAGA = """
name = "order"

[[step]]
name = "charge"
call = "pay"
{connect}
"""


def saga(
    tmp_path: Path, who: Identity, connect: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``eda-txn saga --secure`` of one call step to 'pay' as *who*."""
    plan = tmp_path / "order.toml"
    plan.write_text(SAGA.format(connect=connect))
    return run("eda-txn", "saga", "--secure", "--no-mdns", str(plan), "--log",
               str(tmp_path / f"txn-{who.home.name}"), "--data", '{"order": 7}', *args,
               env=who.env, timeout=60)  # fmt: skip


def test_a_saga_call_step_reaches_a_secure_worker_named_by_its_key(procs: Procs, tmp_path, ids):
    """``connect = "w@tcp://..."``: the step's request goes to the worker holding w's key
    (one rule for every explicit endpoint); a worker holding another key is never sent it,
    and a plain endpoint in secure mode is a usage error before any step runs."""
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log)
    done = saga(tmp_path, ids["alice"], f'connect = "w@{endpoint}"')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["event"] == "saga-completed"
    assert json.loads(sent(log)) == {"order": 7}
    # mallory's worker where alice's plan says w is: the handshake fails, nothing is sent
    forged = tmp_path / "mallory.log"
    _, theirs = worker(procs, ids["mallory"], forged)
    failed = saga(tmp_path, ids["alice"], f'connect = "w@{theirs}"')
    assert failed.returncode == 5 and sent(forged) == "", failed.returncode
    # an endpoint without its key's name, in secure mode
    plain = saga(tmp_path, ids["alice"], f'connect = "{endpoint}"')
    assert plain.returncode == 2, plain.stderr
    assert "name the server's trusted key" in plain.stderr
    assert json.loads(sent(log)) == {"order": 7}


def test_a_saga_call_step_refused_by_the_worker_fails_at_once_naming_it(
    procs: Procs, tmp_path, ids
):
    """The worker allows bob only: alice's saga step fails with the refusal, not after
    its timeout (60 s here), and the worker's command never runs."""
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log, "--allow", "bob")
    plan = f'connect = "w@{endpoint}"\ntimeout = 60\nretry = {{ attempts = 1 }}'
    done = saga(tmp_path, ids["alice"], plan)
    assert done.returncode == 5, done.stderr
    key = ids["alice"].public
    assert f"the worker at {endpoint} does not trust this key (eda-keys show: {key})" in (
        done.stderr
    )
    assert sent(log) == ""


def test_a_saga_call_step_pins_the_worker_key_from_a_secure_registry(procs: Procs, tmp_path, ids):
    """The worker is found through a secure registry: its record's proven key is pinned;
    bob no longer trusting w, the step finds no usable worker and sends nothing."""
    at = secure_registry(procs, tmp_path, ids)
    log = tmp_path / "w.log"
    proc, _ = worker(procs, ids["w"], log, "--registry", at)
    proc.wait_stderr(r"\(registered\)", 15)
    done = saga(tmp_path, ids["alice"], "", "--registry", at)
    assert done.returncode == 0, done.stderr
    assert json.loads(sent(log)) == {"order": 7}
    ids["bob"].revoke("w")
    refused = saga(tmp_path, ids["bob"], "", "--registry", at)
    assert refused.returncode == 5, refused.returncode
    assert sent(log).count("\n") == 1


def test_a_caller_goes_via_a_broker_found_in_a_secure_registry(procs: Procs, tmp_path, ids):
    """``eda-lb call --via`` with a secure registry: the broker's record pins its key, the
    worker reaches the broker through the registry too; mallory's caller is refused by
    the registry at once and nothing reaches the worker."""
    at = secure_registry(procs, tmp_path, ids)
    broker = procs.eda(
        "eda-lb", "serve", "pay", "--secure", "-v", "--no-mdns", "--registry", at,
        "--bind", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*", env=ids["b"].env,
    )  # fmt: skip
    broker.wait_stderr(BROKER, 30)
    log = tmp_path / "w.log"
    worker(procs, ids["w"], log, "--registry", at)
    broker.wait_stderr("worker .* ready", 30)
    done = run("eda-lb", "call", "pay", "--secure", "--no-mdns", "--registry", at, "--via",
               "pay", "one", "two", env=ids["alice"].env, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "one\ntwo\n"), done.stderr
    assert sent(log) == "one\ntwo\n"
    stolen = run("eda-lb", "call", "pay", "--secure", "--no-mdns", "--registry", at, "--via",
                 "pay", "x", env=ids["mallory"].env, timeout=60)  # fmt: skip
    assert stolen.returncode == 1 and "does not trust this key" in stolen.stderr
    assert sent(log) == "one\ntwo\n"


def test_a_worker_allowing_alice_serves_no_broker_it_does_not_allow(procs: Procs, tmp_path, ids):
    """``--allow alice`` on a worker: bob (trusted, not allowed) cannot get round it through
    a broker found in the registry -- the worker leaves the broker out, named, and bob's
    request never reaches the command; named explicitly, the broker is a usage error."""
    at = secure_registry(procs, tmp_path, ids)
    broker = procs.eda(
        "eda-lb", "serve", "pay", "--secure", "-v", "--no-mdns", "--registry", at,
        "--bind", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*", env=ids["b"].env,
    )  # fmt: skip
    back = broker.wait_stderr(BROKER, 30)[2]
    log = tmp_path / "w.log"
    proc, _ = worker(procs, ids["w"], log, "--registry", at, "--allow", "alice")
    proc.wait_stderr(re.escape("is not allowed to call (--allow)"), 30)
    done = run("eda-lb", "call", "pay", "--secure", "--no-mdns", "--registry", at, "--via",
               "pay", "--timeout", "2", "--retries", "0", "round", env=ids["bob"].env,
               timeout=60)  # fmt: skip
    # the broker has no worker for bob: it says so (1: "every instance is busy") or the
    # request times out there (4), whichever comes first on a loaded machine
    assert done.returncode in (1, 4) and sent(log) == "", (done.returncode, done.stderr)
    named = run("eda-lb", "worker", "pay", "--secure", "--no-mdns", "--allow", "alice",
                "--broker", f"b@{back}", "--", "cat", env=ids["w"].env, timeout=30)  # fmt: skip
    assert named.returncode == 2 and "'b' is not in --allow" in named.stderr


def test_secure_registries_found_by_mdns_replicate_both_ways(procs: Procs, tmp_path, ids):
    """Two secure registries with mDNS and no --peer find each other by their
    announcements (keys pinned from k=) and replicate both ways; mallory's registry,
    announced too, gets nothing and gives nothing."""
    first = registry(procs, tmp_path, ids["reg"], mdns=True)
    a = first.wait_stderr(r"listening on (tcp://[^\s,]+)", 30)[1]
    second = registry(procs, tmp_path, ids["reg2"], mdns=True)
    b = second.wait_stderr(r"listening on (tcp://[^\s,]+)", 30)[1]
    forger = registry(procs, tmp_path, ids["mallory"], mdns=True)
    m = forger.wait_stderr(r"listening on (tcp://[^\s,]+)", 30)[1]
    for who, at, port in (("alice", f"reg@{a}", 9001), ("bob", f"reg2@{b}", 9002)):
        register(procs, ids[who], at, port)
    ids["mallory"].trust("self", ids["mallory"])
    register(procs, ids["mallory"], f"self@{m}", 9666)

    def ports(at: str) -> dict[int, str] | None:
        done = run("eda-registry", "lookup", "--secure", "--no-mdns", "--registry", at,
                   "orders", "--json", env=ids["alice"].env)  # fmt: skip
        got = {
            json.loads(line)["port"]: json.loads(line)["key"] for line in done.stdout.splitlines()
        }
        return got if len(got) == 2 else None

    both = {9001: ids["alice"].public, 9002: ids["bob"].public}
    assert wait_until(lambda: ports(f"reg@{a}"), 30, "replication b -> a") == both
    assert wait_until(lambda: ports(f"reg2@{b}"), 30, "replication a -> b") == both
    first.wait_stderr(re.escape(f"its key {ids['mallory'].public} is not trusted"), 15)
    assert "replicating with peer registry" not in forger.stderr


# -- one rule for explicit endpoints ------------------------------------------------------
ENDPOINT_OPTIONS = ("--registry", "--bus", "--connect", "--broker", "--peer", "--coordinator")


def endpoint_options() -> list[tuple[str, str, str]]:
    """(program, subcommand, help) of every option that names a server to connect to."""
    import importlib

    import click

    found = []
    for program in ("bus", "lb", "registry", "txn", "pub", "sub"):
        command = importlib.import_module(f"eda.cli.{program}").command
        subs = command.commands if isinstance(command, click.Group) else {"": command}
        for sub_name, sub in subs.items():
            for param in sub.params:
                if not isinstance(param, click.Option) or "ENDPOINT" not in (param.metavar or ""):
                    continue
                if set(param.opts) & set(ENDPOINT_OPTIONS) and "secure" in {
                    p.name for p in sub.params
                }:
                    found.append(
                        (f"eda-{program} {sub_name}".strip(), param.opts[0], param.help or "")
                    )
    return found


def test_every_explicit_endpoint_option_says_the_one_secure_rule_in_one_wording():
    """--registry, --bus, --connect, --broker, --peer, --coordinator: the same text names
    the server's key (NAME@tcp://HOST:PORT; eda-txn's --peer NAME=KEY@tcp://HOST:PORT)."""
    from eda.cli.options import SECURE_ENDPOINT

    options = endpoint_options()
    assert len(options) > 20
    peer = (
        "with --secure: NAME=KEY@tcp://HOST:PORT, KEY the trusted name of its key (eda-keys list)"
    )
    for program, option, text in options:
        wanted = peer if (program, option) == ("eda-txn coordinator", "--peer") else SECURE_ENDPOINT
        assert wanted in " ".join(text.split()), (program, option, text)


def test_every_explicit_endpoint_is_refused_without_its_key_name_in_secure_mode(tmp_path, ids):
    """The one parser (Security.pinned): each program refuses a plain endpoint and an
    untrusted name in secure mode with the same usage error, exit 2."""
    env = ids["alice"].env
    at = "tcp://127.0.0.1:1"
    commands = [
        ("eda-pub", "--secure", "--no-mdns", "--connect", "{}", "t", "{{}}"),
        ("eda-sub", "--secure", "--no-mdns", "--connect", "{}", "t", "-W", "1"),
        ("eda-pub", "--secure", "--no-mdns", "--bus", "{}", "t", "{{}}"),
        ("eda-registry", "lookup", "--secure", "--no-mdns", "--registry", "{}", "orders"),
        ("eda-lb", "call", "pay", "--secure", "--no-mdns", "--connect", "{}", "x"),
        ("eda-txn", "commit", "--secure", "--no-mdns", "--coordinator", "{}", "-p", "a1"),
    ]
    for command in commands:
        for given, why in ((at, "in secure mode name the server's trusted key"),
                           (f"carol@{at}", "'carol' is not trusted")):  # fmt: skip
            args = [a.format(given) for a in command[1:]]
            done = run(command[0], *args, env=env, timeout=30)
            assert done.returncode == 2 and why in done.stderr, (command[0], args, done.stderr)


def test_a_revoked_key_reconnecting_is_refused_without_a_restart(procs: Procs, tmp_path, ids):
    """eda-keys revoke on a running worker's and registry's host: alice's next connection
    is refused with the one line, at once; the daemons keep serving bob."""
    log = tmp_path / "w.log"
    _, endpoint = worker(procs, ids["w"], log)
    at = secure_registry(procs, tmp_path, ids)
    register(procs, ids["bob"], at, 9001)

    def call(who: str) -> subprocess.CompletedProcess[str]:
        return run("eda-lb", "call", "pay", "--secure", "--no-mdns", "--timeout", "60",
                   "--connect", f"w@{endpoint}", who, env=ids[who].env, timeout=30)  # fmt: skip

    def lookup(who: str) -> subprocess.CompletedProcess[str]:
        return run("eda-registry", "lookup", "--secure", "--no-mdns", "--registry", at,
                   "orders", env=ids[who].env, timeout=30)  # fmt: skip

    assert call("alice").returncode == 0 and lookup("alice").returncode == 0
    ids["w"].revoke("alice")
    ids["reg"].revoke("alice")
    refused = wait_until(lambda: (r := call("alice")).returncode == 1 and r, 15, "revoked")
    line = f"does not trust this key (eda-keys show: {ids['alice'].public})"
    assert f"the worker at {endpoint} {line}" in refused.stderr
    gone = wait_until(lambda: (r := lookup("alice")).returncode == 1 and r, 15, "revoked")
    assert line in gone.stderr
    assert call("bob").returncode == 0 and lookup("bob").returncode == 0
    assert sent(log) == "alice\nbob\n"


def test_only_subcommands_that_open_no_zeromq_socket_lack_secure():
    """EDA_SECURE=1 never leaves a plain connection behind: every subcommand takes
    --secure but eda-keys (files), eda-txn status (journals), eda-registry browse (mDNS
    only, as avahi-browse) and eda-bus migrate (NATS, secured by its own options)."""
    import importlib

    import click

    without = set()
    for program in ("bus", "keys", "lb", "registry", "txn", "pub", "sub"):
        command = importlib.import_module(f"eda.cli.{program}").command
        subs = command.commands if isinstance(command, click.Group) else {"": command}
        for sub_name, sub in subs.items():
            if "secure" not in {p.name for p in sub.params}:
                without.add(f"eda-{program} {sub_name}".strip())
    keys = {f"eda-keys {c}" for c in ("init", "show", "trust", "list", "revoke")}
    assert without == {*keys, "eda-txn status", "eda-registry browse", "eda-bus migrate"}
    migrate = importlib.import_module("eda.cli.bus").command.commands["migrate"]
    assert {"nats_creds", "nats_tls_ca"} <= {p.name for p in migrate.params}

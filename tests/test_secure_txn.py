"""Secure mode through eda-txn: coordinator, participants, commit, resolve and saga --secure,
with real processes in the test namespace.

Each identity is a configuration home of its own (key pair, trusted
directory, discovery cache), as on separate hosts.  The participants are the
bank of tests/test_txn_2pc.py: accounts a1 and a2 of 100 each, whose total
every transfer keeps.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from eda.core import security
from eda.core.registry.model import Instance
from eda.core.registry.serverless import SVC_TYPE
from eda.core.txn.directory import Directory, usable
from eda.core.txn.journal import read
from eda.core.txn.participant import replay
from tests import helpers
from tests.helpers import (
    Capture,
    Identity,
    MdnsResponder,
    Proc,
    Procs,
    half_handshakes,
    run,
    service_records,
    trusting,
    wait_until,
)
from tests.test_txn_2pc import ABORT, ACCOUNT, COMMIT, PREPARE

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

TRUSTING = ("c1", "a1", "a2", "alice", "bob", "reg")  # trust one another, not mallory
LISTENING = r"{what} {name} listening on (tcp://[^\s,]+)"


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    return trusting(tmp_path, TRUSTING)


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    for name in ("a1", "a2"):
        committed = tmp_path / "bank" / name / "committed"
        committed.mkdir(parents=True)
        (committed / "initial").write_text("100\n")
    return tmp_path / "bank"


def balances(bank: Path) -> dict[str, int]:
    return {
        name: sum(int(p.read_text()) for p in (bank / name / "committed").iterdir())
        for name in ("a1", "a2")
    }


def settled(bank: Path, expected: dict[str, int]) -> None:
    """The balances become *expected*: a committed outcome is the coordinator's decision,
    which the participants apply just after it (not before the client has its answer)."""
    wait_until(lambda: balances(bank) == expected, 30, f"balances {expected}")


def holds(bank: Path) -> list[str]:
    return [p.name for name in ("a1", "a2") for p in (bank / name / "holds").glob("*")]


def participant(
    procs: Procs, tmp_path: Path, who: Identity | None, name: str, *extra: str,
    env: dict[str, str] | None = None, find: tuple[str, ...] = ("--no-mdns",),
) -> tuple[Proc, str]:  # fmt: skip
    """Bank account *name* as a participant (secure as *who*, plain when None), found
    as *find* says (by default: only by those given its endpoint)."""
    head = ACCOUNT.format(dir=tmp_path / "bank", name=name)
    secure = ("--secure",) if who is not None else ()
    proc = procs.eda(
        "eda-txn", "participant", name, *secure, *find, "--log", str(tmp_path / "txn"),
        "--bind", "tcp://127.0.0.1:*", "--prepare", head + PREPARE.format(name=name),
        "--commit", head + COMMIT, "--abort", head + ABORT, "--inquire-after", "0.3", *extra,
        env={**(who.env if who else {}), **(env or {})},
    )  # fmt: skip
    return proc, proc.wait_stderr(LISTENING.format(what="participant", name=name), 30)[1]


def coordinator(
    procs: Procs, tmp_path: Path, who: Identity | None, peers: dict[str, str], *extra: str,
    env: dict[str, str] | None = None, find: tuple[str, ...] = ("--no-mdns",),
) -> tuple[Proc, str]:  # fmt: skip
    """Coordinator c1 (secure as *who*, plain when None) asking *peers* (name: endpoint),
    the others found as *find* says."""
    secure = ("--secure",) if who is not None else ()
    given = [
        f"--peer={name}={name + '@' if who else ''}{endpoint}" for name, endpoint in peers.items()
    ]
    proc = procs.eda(
        "eda-txn", "coordinator", "--name", "c1", *secure, *find, "--log", str(tmp_path / "txn"),
        "--bind", "tcp://127.0.0.1:*", "--vote-timeout", "30", *given, *extra,
        env={**(who.env if who else {}), **(env or {})},
    )  # fmt: skip
    return proc, proc.wait_stderr(LISTENING.format(what="coordinator", name="c1"), 30)[1]


def transfer(
    who: Identity | None, endpoint: str, amount: int, *extra: str, **data: Any
) -> tuple[int, dict[str, Any], str]:
    """``eda-txn commit`` of a1 -> a2 as *who*: (exit status, result, stderr)."""
    secure = ("--secure",) if who is not None else ()
    where = f"c1@{endpoint}" if who is not None else endpoint
    payload = json.dumps({"from": "a1", "to": "a2", "amount": amount, **data})
    done = run(
        "eda-txn", "commit", *secure, "--no-mdns", "--coordinator", where, "-p", "a1,a2",
        "--data", payload, "--json", "--wait", "60", *extra, env=who.env if who else None,
    )  # fmt: skip
    result = json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}
    return done.returncode, result, done.stderr


def states(tmp_path: Path, name: str) -> dict[str, dict[str, Any]]:
    """Participant *name*'s transactions, each the merge of its journal records."""
    return replay(list(read(tmp_path / "txn" / f"participant-{name}.jsonl")))


def started_bank(procs: Procs, tmp_path: Path, ids: dict[str, Identity]) -> str:
    """Secure a1, a2 and c1; the coordinator's endpoint."""
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    _, a2 = participant(procs, tmp_path, ids["a2"], "a2")
    return coordinator(procs, tmp_path, ids["c1"], {"a1": a1, "a2": a2})[1]


def test_a_trusted_transfer_commits_in_secure_mode(procs: Procs, tmp_path, ids, bank):
    endpoint = started_bank(procs, tmp_path, ids)
    status, result, stderr = transfer(ids["alice"], endpoint, 30)
    assert (status, result.get("outcome")) == (0, "committed"), stderr
    status, result, stderr = transfer(ids["alice"], endpoint, 500)
    assert (status, result.get("outcome")) == (5, "aborted"), stderr
    assert result["reason"] == "a1 voted no: exit status 1: insufficient funds"
    settled(bank, {"a1": 70, "a2": 130})
    wait_until(lambda: holds(bank) == [], 30, "the aborted transfer's hold released")
    # the participants recorded the key the coordinator proved, to ask it when in doubt
    committed = [r for r in states(tmp_path, "a1").values() if r.get("state") == "committed"]
    assert [r["coordinator_key"] for r in committed] == [ids["c1"].public]


def test_participants_found_through_a_secure_registry_are_pinned_to_their_proven_keys(
    procs: Procs, tmp_path, ids, bank
):
    registry = procs.eda(
        "eda-registry", "serve", "--secure", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
        "--data", str(tmp_path / "registry"), env=ids["reg"].env,
    )  # fmt: skip
    where = registry.wait_stderr(r"listening on (tcp://\S+)", 30)[1]
    find = ("--no-mdns", "--registry", f"reg@{where}")
    for name in ("a1", "a2"):
        proc, _ = participant(procs, tmp_path, ids[name], name, find=find)
        proc.wait_stderr("announced by registry", 15)
    _, endpoint = coordinator(procs, tmp_path, ids["c1"], {}, find=find)
    status, result, stderr = transfer(ids["alice"], endpoint, 30)
    assert (status, result.get("outcome")) == (0, "committed"), stderr
    settled(bank, {"a1": 70, "a2": 130})


@pytest.mark.long
def test_participants_announced_by_mdns_are_pinned_to_their_announced_keys(
    procs: Procs, tmp_path, ids, bank
):
    for name in ("a1", "a2"):
        proc, _ = participant(procs, tmp_path, ids[name], name, find=())
        proc.wait_stderr("announced by mDNS", 15)
    _, endpoint = coordinator(procs, tmp_path, ids["c1"], {}, find=())
    status, result, stderr = transfer(ids["alice"], endpoint, 30)
    assert (status, result.get("outcome")) == (0, "committed"), stderr
    settled(bank, {"a1": 70, "a2": 130})
    # a client finds the coordinator by mDNS too, its key pinned from the announcement
    found = run("eda-txn", "commit", "--secure", "-p", "a1,a2", "--json", "--data",
                json.dumps({"from": "a2", "to": "a1", "amount": 5}), env=ids["alice"].env)  # fmt: skip
    assert found.returncode == 0, found.stderr
    settled(bank, {"a1": 75, "a2": 125})


def test_allow_on_the_coordinator_names_the_clients_that_may_start_transactions(
    procs: Procs, tmp_path, ids, bank
):
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    _, a2 = participant(procs, tmp_path, ids["a2"], "a2")
    allowed = ("--allow", "alice", "--allow", "a1", "--allow", "a2")
    _, endpoint = coordinator(procs, tmp_path, ids["c1"], {"a1": a1, "a2": a2}, *allowed)
    status, result, stderr = transfer(ids["alice"], endpoint, 30)
    assert (status, result.get("outcome")) == (0, "committed"), stderr
    status, _, stderr = transfer(ids["bob"], endpoint, 30)  # trusted, but not allowed
    bob = ids["bob"].public
    refused = f"the coordinator at {endpoint} does not trust this key (eda-keys show: {bob})"
    assert (status, stderr.strip()) == (1, f"eda-txn: error: {refused}")
    settled(bank, {"a1": 70, "a2": 130})


def test_an_untrusted_client_is_refused_at_once_with_the_message(procs, tmp_path, ids, bank):
    endpoint = started_bank(procs, tmp_path, ids)
    status, result, stderr = transfer(ids["mallory"], endpoint, 30)
    mallory = ids["mallory"].public
    refused = f"the coordinator at {endpoint} does not trust this key (eda-keys show: {mallory})"
    assert (status, stderr.strip(), result.get("outcome")) == (
        1,
        f"eda-txn: error: {refused}",
        None,
    )
    plain = transfer(None, endpoint, 30, "--wait", "2")
    assert plain[0] == 4  # a plain client gets no answer from a secure coordinator
    assert balances(bank) == {"a1": 100, "a2": 100}


def forger(procs: Procs, log: Path, who: Identity) -> str:
    """A participant a2 holding *who*'s key, whose prepare leaves a file in *log*."""
    proc = procs.eda(
        "eda-txn", "participant", "a2", "--secure", "--no-mdns", "--log", str(log),
        "--bind", "tcp://127.0.0.1:*", "--prepare", f"touch {log}/prepared", env=who.env,
    )  # fmt: skip
    return proc.wait_stderr(LISTENING.format(what="participant", name="a2"), 30)[1]


def test_a_participant_holding_an_untrusted_key_gets_no_request(procs, tmp_path, ids, bank):
    """A forger (mallory's key) at the endpoint given for a2 under a2's trusted name fails
    the handshake: the transaction aborts at once, naming it, and the forger hears nothing."""
    forger_log = tmp_path / "forger"
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    forged = forger(procs, forger_log, ids["mallory"])
    _, endpoint = coordinator(procs, tmp_path, ids["c1"], {"a1": a1, "a2": forged})
    status, result, stderr = transfer(ids["alice"], endpoint, 30)
    assert (status, result.get("outcome")) == (5, "aborted"), stderr
    assert result["reason"].startswith(
        f"a2 refused: the participant at {forged} failed the secure handshake"
    ), result
    assert not (forger_log / "prepared").exists()
    assert not [r for r in read(forger_log / "participant-a2.jsonl") if "txn" in r]
    wait_until(lambda: holds(bank) == [], 30, "a1's hold released")
    assert balances(bank) == {"a1": 100, "a2": 100}


def test_a_forged_announcement_of_a_participant_gets_nothing(procs, tmp_path, ids, bank):
    """A participant a2 announced by mDNS with a key the coordinator does not trust (or
    none) is never asked: the transaction aborts, a2 not found."""
    forger_log = tmp_path / "forger"
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    port = int(forger(procs, forger_log, ids["mallory"]).rpartition(":")[2])
    responder = MdnsResponder()
    try:
        txt = {"svc": "txn-a2", "id": "forged", "h": "127.0.0.1", "k": ids["mallory"].public}
        responder.add(SVC_TYPE, service_records(SVC_TYPE, "forged", port, txt, "127.0.0.1"))
        coord = procs.eda(
            "eda-txn", "coordinator", "--name", "c1", "--secure", "-v", "--log",
            str(tmp_path / "txn"), "--bind", "tcp://127.0.0.1:*", f"--peer=a1=a1@{a1}",
            env=ids["c1"].env,
        )  # fmt: skip
        endpoint = coord.wait_stderr(LISTENING.format(what="coordinator", name="c1"), 30)[1]
        status, result, stderr = transfer(ids["alice"], endpoint, 30)
    finally:
        responder.close()
    assert (status, result.get("outcome")) == (5, "aborted"), stderr
    mallory = ids["mallory"].public
    ignored = f"instance txn-a2/forged at 127.0.0.1:{port}: its key {mallory} is not trusted"
    assert result["reason"].startswith(f"participant a2 not found (ignored {ignored}"), result
    assert f"warning: ignoring {ignored}" in coord.stderr  # said on the coordinator's side
    assert not (forger_log / "prepared").exists()
    assert balances(bank) == {"a1": 100, "a2": 100}


def test_allow_on_a_participant_refuses_a_coordinator_it_does_not_name(procs, tmp_path, ids, bank):
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1", "--allow", "alice")
    _, a2 = participant(procs, tmp_path, ids["a2"], "a2", "--allow", "c1")
    _, endpoint = coordinator(procs, tmp_path, ids["c1"], {"a1": a1, "a2": a2})
    status, result, stderr = transfer(ids["alice"], endpoint, 30)
    assert (status, result.get("outcome")) == (5, "aborted"), stderr
    c1 = ids["c1"].public
    assert result["reason"] == (
        f"a1 refused: the participant at {a1} does not trust the coordinator's key"
        f" (eda-keys show: {c1})"
    )
    assert states(tmp_path, "a1") == {}  # a1 heard nothing
    # a2 (which allows c1) prepared and was told to abort: its hold is released
    wait_until(lambda: holds(bank) == [], 30, "a2's hold released")
    assert balances(bank) == {"a1": 100, "a2": 100}


def test_allow_names_only_trusted_keys(tmp_path, ids):
    done = run(
        "eda-txn", "participant", "a1", "--secure", "--allow", "nobody", "--no-mdns", "--log",
        str(tmp_path / "txn"), "--prepare", "true", env=ids["a1"].env,
    )  # fmt: skip
    assert done.returncode == 2 and "--allow 'nobody': not a trusted name" in done.stderr


def test_an_in_doubt_participant_asks_the_coordinator_under_its_proven_key(
    procs, tmp_path, ids, bank
):
    """The coordinator dies after the votes, before deciding; restarted, it is asked by
    the participants in doubt (pinned to the key it proved with the prepare): abort."""
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    _, a2 = participant(procs, tmp_path, ids["a2"], "a2")
    peers = {"a1": a1, "a2": a2}
    crashing = {"EDA_CRASH_AT": "coordinator:before-decision"}
    coord, endpoint = coordinator(procs, tmp_path, ids["c1"], peers, env=crashing)
    status, _, _ = transfer(ids["alice"], endpoint, 30, "--wait", "3")
    assert status == 4  # no answer: the outcome is unknown
    assert coord.wait() == -9  # SIGKILLed at its crash point
    assert len(holds(bank)) == 2  # both prepared, in doubt
    _, again = coordinator(procs, tmp_path, ids["c1"], peers)
    assert again == endpoint  # (the port is remembered)

    def settled() -> bool:
        return all(
            {r.get("state") for r in states(tmp_path, name).values()} == {"aborted"}
            for name in ("a1", "a2")
        )

    wait_until(settled, 20, "both participants learned the abort")
    wait_until(lambda: holds(bank) == [] and balances(bank) == {"a1": 100, "a2": 100}, 30,
               "the holds released and the balances untouched")  # fmt: skip


@pytest.mark.parametrize("secure", [False, True])
def test_eavesdropping_sees_the_data_only_without_secure_mode(
    procs: Procs, tmp_path, ids, bank, secure
):
    memo = f"EAVESDROP-{secrets.token_hex(8)}"

    def who(name: str) -> Identity | None:
        return ids[name] if secure else None

    capture = Capture()
    try:
        _, a1 = participant(procs, tmp_path, who("a1"), "a1")
        _, a2 = participant(procs, tmp_path, who("a2"), "a2")
        _, endpoint = coordinator(procs, tmp_path, who("c1"), {"a1": a1, "a2": a2})
        status, result, stderr = transfer(who("alice"), endpoint, 30, memo=memo)
        assert (status, result.get("outcome")) == (0, "committed"), stderr
    finally:
        seen = capture.stop()
    assert (memo.encode() in seen) is not secure
    assert len(seen) > 1000  # the capture saw the traffic either way
    settled(bank, {"a1": 70, "a2": 130})


def test_garbage_and_half_handshakes_do_not_stop_secure_daemons(procs, tmp_path, ids, bank):
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    _, a2 = participant(procs, tmp_path, ids["a2"], "a2")
    _, endpoint = coordinator(procs, tmp_path, ids["c1"], {"a1": a1, "a2": a2})
    held = half_handshakes([endpoint, a1])
    try:
        for amount in (10, 20, 30):
            status, result, stderr = transfer(ids["alice"], endpoint, amount)
            assert (status, result.get("outcome")) == (0, "committed"), stderr
    finally:
        for conn in held:
            conn.close()
    status, result, stderr = transfer(ids["alice"], endpoint, 5)  # and after
    assert (status, result.get("outcome")) == (0, "committed"), stderr
    settled(bank, {"a1": 35, "a2": 165})


def test_resolve_asks_a_participant_under_the_key_its_journal_records(procs, tmp_path, ids, bank):
    _, a1 = participant(procs, tmp_path, ids["a1"], "a1")
    _, a2 = participant(procs, tmp_path, ids["a2"], "a2")
    crashing = {"EDA_CRASH_AT": "coordinator:before-decision"}
    coord, endpoint = coordinator(procs, tmp_path, ids["c1"], {"a1": a1, "a2": a2}, env=crashing)
    assert transfer(ids["alice"], endpoint, 30, "--wait", "3")[0] == 4
    coord.wait()
    (txn,) = [t for t, r in states(tmp_path, "a1").items() if r.get("state") == "prepared"]
    log = str(tmp_path / "txn")
    refused = run("eda-txn", "resolve", txn, "--abort", "--secure", "--no-mdns", "--log", log,
                  env=ids["mallory"].env)  # fmt: skip
    assert refused.returncode == 1
    assert f"the participant at {a1} does not trust this key" in refused.stderr
    done = run("eda-txn", "resolve", txn, "--abort", "--secure", "--no-mdns", "--json", "--log",
               log, env=ids["alice"].env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["participant"] for r in rows) == ["a1", "a2"]
    wait_until(lambda: holds(bank) == [] and balances(bank) == {"a1": 100, "a2": 100}, 30,
               "the holds released and the balances untouched")  # fmt: skip


SAGA = """
name = "order"

[[step]]
name = "reserve"
run = "cat > {dir}/reserved"
compensate = "rm -f {dir}/reserved"

[[step]]
name = "announce"
publish = "orders.paid"
"""


def test_a_saga_completes_in_secure_mode_and_publishes_to_trusted_subscribers_only(
    procs: Procs, tmp_path, ids
):
    bob = procs.sub_ready("--secure", "orders.>", "-C", "1", env=ids["bob"].env)
    mallory = procs.sub_ready("--secure", "orders.>", "-W", "3", env=ids["mallory"].env)
    saga = tmp_path / "order.toml"
    saga.write_text(SAGA.format(dir=tmp_path))
    done = run("eda-txn", "saga", "--secure", str(saga), "--log", str(tmp_path / "txn"),
               "--data", '{"order": 7}', env=ids["alice"].env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["event"] == "saga-completed"
    assert json.loads((tmp_path / "reserved").read_text()) == {"order": 7}
    assert bob.wait() == 0
    assert [json.loads(line)["data"] for line in bob.lines()] == [{"order": 7}]
    assert mallory.wait() == 4 and mallory.stdout == ""


def test_secure_mode_from_the_environment_and_the_config_file(tmp_path, ids):
    by_env = run("eda-txn", "commit", "--no-mdns", "--coordinator", "tcp://127.0.0.1:1", "-p",
                 "a1", env={**ids["alice"].env, "EDA_SECURE": "1"})  # fmt: skip
    assert (
        by_env.returncode == 2 and "in secure mode name the server's trusted key" in by_env.stderr
    )
    config = tmp_path / "eda.toml"
    config.write_text("[txn]\nsecure = true\n")
    nobody = {"XDG_CONFIG_HOME": str(tmp_path / "nobody")}
    by_file = run("eda-txn", "--config", str(config), "coordinator", "--no-mdns", "--log",
                  str(tmp_path / "txn"), env=nobody)  # fmt: skip
    assert by_file.returncode == 2 and "run eda-keys init" in by_file.stderr


# -- in-process: which records a secure lookup uses -----------------------------------------
def record(port: int, key: str) -> Instance:
    return Instance(service="txn-a2", id=f"a2-{port}", host="127.0.0.1", port=port, key=key)


def test_a_lookup_uses_only_records_with_a_trusted_key_and_pins_it(ids, monkeypatch):
    from eda.core import reqrep
    from eda.core.endpoint import Endpoint
    from eda.core.txn import directory as txn_directory

    records = [record(7001, ids["a2"].public), record(7002, ids["mallory"].public),
               record(7003, "")]  # fmt: skip
    monkeypatch.setattr(txn_directory, "find_instances", lambda service, access, **kw: records)
    keys_dir = ids["c1"].home / "eda" / "keys"
    security.enable(keys_dir / "id.key", keys_dir / "trusted")
    try:
        ignored: list[tuple[str, str]] = []
        found = usable(records, lambda peer, why: ignored.append((peer.endpoint, why)))
        assert found == ["tcp://127.0.0.1:7001"]
        assert reqrep.pinned_key(Endpoint("127.0.0.1", 7001)) == ids["a2"].public.encode()
        assert reqrep.pinned_key(Endpoint("127.0.0.1", 7002)) is None
        untrusted = f"its key {ids['mallory'].public} is not trusted (eda-keys trust NAME KEY)"
        assert ignored == [
            ("tcp://127.0.0.1:7002", untrusted),
            ("tcp://127.0.0.1:7003", "it is not in secure mode"),
        ]
        # a participant whose only records are skipped: not found, and why
        records[:] = records[1:]
        directory = Directory(access=object())
        try:
            assert directory.endpoints("a2") == []
            assert directory.missing("a2") == (
                f"participant a2 not found (ignored tcp://127.0.0.1:7002: {untrusted} (and 1 more))"
            )
        finally:
            directory.close()
    finally:
        security.disable()
    # a plain process uses plain records only
    assert usable([record(7004, ids["a2"].public), record(7005, "")]) == ["tcp://127.0.0.1:7005"]

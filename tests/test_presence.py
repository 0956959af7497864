"""Staying registered (core/presence.py) never stalls a daemon's work, and daemons
restarted with the same command come back where their clients expect them."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from eda.core.reqrep import Client
from tests import helpers
from tests.helpers import Procs, run, wait_until

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")
helpers.PROGRAMS.setdefault("eda-lb", "eda.cli.lb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.long
def test_a_stopped_registry_does_not_stall_2pc(procs: Procs, tmp_path: Path) -> None:
    """The coordinator and the participant heartbeat two registries that are SIGSTOPped
    (they accept connections, never answer): transactions keep committing meanwhile,
    about as fast as before and after (compared with those rates, not with a clock)."""
    log = str(tmp_path / "txn")
    registries = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]  # replicating peers
    regs = [
        procs.eda("eda-registry", "serve", "--no-mdns", "--bind", mine, "--peer", other)
        for mine, other in (registries, registries[::-1])
    ]
    for reg in regs:
        reg.wait_stderr("listening on", 15)
    common = ("--no-mdns", "--registry", registries[0], "--registry", registries[1],
              "--log", log, "--bind", "tcp://127.0.0.1:*")  # fmt: skip
    coord = procs.eda("eda-txn", "coordinator", "--name", "c1", *common)
    part = procs.eda(
        "eda-txn", "participant", "pay", *common, "--prepare", "true", "--commit", "true"
    )
    endpoint = coord.wait_stderr(r"listening on (tcp://\S+), announced by registry", 15).group(1)
    part.wait_stderr("announced by registry", 15)
    client = Client([endpoint], timeout=60.0)
    try:

        def commit() -> None:
            reply = client.request({"op": "commit", "participants": ["pay"], "data": {}})
            assert reply["outcome"] == "committed", reply

        def rate(seconds: float) -> float:
            """Commits per second over at least *seconds* (a lower bound on time only)."""
            start, done = time.monotonic(), 0
            while time.monotonic() - start < seconds:
                commit()
                done += 1
            return done / (time.monotonic() - start)

        commit()  # the participant is found (through the registry) and known from now on
        before = rate(2.0)  # the same machine, the same load, the registries answering
        for reg in regs:
            reg.signal(signal.SIGSTOP)
        try:
            # heartbeats fall due every 2 s and now wait 1 s per registry in vain: sent
            # from the daemons' loops, they would stall them nearly all the time once the
            # first falls due, so the rate is measured from then on (commits go on meanwhile)
            rate(2.0)
            stopped = rate(3.0)  # at least one heartbeat per daemon falls due in it
        finally:
            for reg in regs:
                reg.signal(signal.SIGCONT)
        after = rate(2.0)
    finally:
        client.close()
    # a margin for the load of a shared machine: a stall costs about nine tenths here
    assert stopped >= min(before, after) / 3, (
        f"{stopped:.0f} commits/s with the registries stopped, {before:.0f}/s before, "
        f"{after:.0f}/s after"
    )


# -- restarted with the same command: the same endpoint, and clients carry on ---------------------
def _restarted(procs: Procs, program: str, argv: tuple[str, ...], env: dict[str, str],
               listening: str) -> tuple[str, str]:  # fmt: skip
    """Start *program*, kill -9 it, start it again with the same command: what the
    *listening* pattern matched each time."""
    first = procs.eda(program, *argv, env=env)
    before = first.wait_stderr(listening, 15).group(0)
    first.kill()
    second = procs.eda(program, *argv, env=env)
    after = second.wait_stderr(listening, 15).group(0)
    return before, after


def _ports(found: str) -> list[int]:
    return sorted(json.loads(line)["port"] for line in found.splitlines())


def test_a_registry_restarted_with_the_same_command_keeps_its_endpoint(
    procs: Procs, tmp_path: Path
) -> None:
    """A registry bound to any port (no --data: the port is remembered in
    $XDG_STATE_HOME/eda/registry.port) comes back there after kill -9; the instance
    kept by `eda-registry register` is registered there again by its heartbeats."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    argv = ("serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "--tick", "0.1")
    first = procs.eda("eda-registry", *argv, env=env)
    endpoint = first.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    keeper = procs.eda("eda-registry", "register", "-v", "web", "--port", "8080", "--host",
                       "127.0.0.1", "--registry", endpoint, "--no-mdns", "--interval", "0.2",
                       "--ttl", "0.8")  # fmt: skip
    keeper.wait_stderr(r"registered web/\S+ at .* with registry", 15)
    first.kill()
    second = procs.eda("eda-registry", *argv, env=env)
    assert second.wait_stderr(r"listening on (tcp://\S+)", 15).group(1) == endpoint
    remembered = (tmp_path / "state" / "eda" / "registry.port").read_text()
    assert remembered.strip() == endpoint.rsplit(":", 1)[1]

    def found() -> list[int]:
        done = run("eda-registry", "lookup", "web", "--registry", endpoint, "--no-mdns")
        return _ports(done.stdout) if done.returncode == 0 else []

    assert wait_until(found, 15, "web registered again at the restarted registry") == [8080]
    assert keeper.popen.poll() is None  # the keeper carried on


def test_a_registry_with_data_remembers_its_port_there(procs: Procs, tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    data = tmp_path / "reg"
    argv = ("serve", "--no-mdns", "--bind", "tcp://127.0.0.1:0", "--data", str(data))
    before, after = _restarted(procs, "eda-registry", argv, env, r"listening on tcp://\S+")
    assert before == after
    assert (data / "port").read_text().strip() == before.rsplit(":", 1)[1]
    assert not (tmp_path / "state" / "eda").exists()


def test_an_lb_broker_restarted_with_the_same_command_keeps_both_endpoints(
    procs: Procs, tmp_path: Path
) -> None:
    """eda-lb serve (any ports, the default) comes back at the same frontend and backend
    after kill -9: its worker reconnects and `eda-lb call --via` is served again."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    reg = procs.eda("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*")
    registry = reg.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    where = ("--no-mdns", "--registry", registry, "--heartbeat", "0.2")
    argv = ("serve", "again", "-v", *where)
    listening = r"listening on (\S+) \(callers\), (\S+) \(workers\)"
    first = procs.eda("eda-lb", *argv, env=env)
    before = first.wait_stderr(listening, 15).groups()
    procs.eda("eda-lb", "worker", "again", *where, "--", "tr", "a-z", "A-Z")
    call = ("call", "again", "--via", "again", "--no-mdns", "--registry", registry, "hello")

    def served() -> bool:
        done = run("eda-lb", *call, timeout=60)
        return done.returncode == 0 and done.stdout == "HELLO\n"

    wait_until(served, 30, "a call through the broker")
    first.kill()
    second = procs.eda("eda-lb", *argv, env=env)
    after = second.wait_stderr(listening, 15).groups()
    assert after == before
    wait_until(served, 30, "a call through the restarted broker")


def test_a_txn_coordinator_restarted_with_the_same_command_keeps_its_endpoint(
    procs: Procs, tmp_path: Path
) -> None:
    """A coordinator bound to any port remembers it next to its journal; the same
    `eda-txn commit --coordinator` works across its kill -9 and restart.  (By default
    it binds the fixed port 7730.)"""
    log = str(tmp_path / "txn")
    part = procs.eda("eda-txn", "participant", "pay", "--no-mdns", "--log", log, "--bind",
                     "tcp://127.0.0.1:*", "--prepare", "true", "--commit", "true")  # fmt: skip
    pay = part.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    argv = ("coordinator", "--name", "c1", "--no-mdns", "--log", log, "--peer", f"pay={pay}",
            "--bind", "tcp://127.0.0.1:*")  # fmt: skip
    first = procs.eda("eda-txn", *argv)
    endpoint = first.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    commit = ("commit", "--no-mdns", "--coordinator", endpoint, "-p", "pay", "--data", "{}")
    done = run("eda-txn", *commit)
    assert done.returncode == 0, done.stderr
    first.kill()
    second = procs.eda("eda-txn", *argv)
    assert second.wait_stderr(r"listening on (tcp://\S+)", 15).group(1) == endpoint
    assert (Path(log) / "coordinator-c1.port").read_text().strip() == endpoint.rsplit(":", 1)[1]
    done = run("eda-txn", *commit)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "committed"


def test_a_txn_participant_restarted_with_the_same_command_keeps_its_endpoint(
    procs: Procs, tmp_path: Path
) -> None:
    """A participant (any port by default) remembers it next to its journal: after its
    kill -9 and restart, the coordinator that found it through the registry reaches it
    where it was."""
    log = str(tmp_path / "txn")
    reg = procs.eda("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*")
    registry = reg.wait_stderr(r"listening on (tcp://\S+)", 15).group(1)
    where = ("--no-mdns", "--registry", registry, "--log", log)
    coord = procs.eda("eda-txn", "coordinator", "--name", "c1", *where, "--bind",
                      "tcp://127.0.0.1:*")  # fmt: skip
    endpoint = coord.wait_stderr(r"listening on (tcp://[^\s,]+)", 15).group(1)
    argv = ("participant", "pay", *where, "--prepare", "true", "--commit", "true")
    listening = r"listening on (tcp://[^\s,]+), announced by registry"
    first = procs.eda("eda-txn", *argv)
    before = first.wait_stderr(listening, 15).group(1)
    commit = ("commit", "--no-mdns", "--coordinator", endpoint, "-p", "pay", "--data", "{}")
    done = run("eda-txn", *commit)
    assert done.returncode == 0, done.stderr
    first.kill()
    second = procs.eda("eda-txn", *argv)
    assert second.wait_stderr(listening, 15).group(1) == before
    assert (Path(log) / "participant-pay.port").read_text().strip() == before.rsplit(":", 1)[1]
    done = run("eda-txn", *commit)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "committed"


# -- endpoints through the one Endpoint ----------------------------------------------------------
def test_txn_endpoints_from_the_registry_and_from_peers_go_through_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An IPv6 instance is connected to with brackets (tcp://[::1]:7730, not the
    tcp://::1:7730 zmq refuses); a prepare's reply_to follows Endpoint.from_peer."""
    from eda.core.errors import ProtocolError
    from eda.core.registry import access as reg
    from eda.core.registry.model import from_dict
    from eda.core.txn.directory import find_coordinators
    from eda.core.txn.protocol import check_reply_to

    found = [from_dict({"service": "txn-coordinator", "id": f"c{i}", "host": host, "port": 7730,
                        "meta": {"name": "c1"}}) for i, host in enumerate(("::1", "10.0.0.5"))]  # fmt: skip
    monkeypatch.setattr(reg, "lookup", lambda service, access: found)
    access = reg.Access(mdns=False)
    assert find_coordinators(access, "c1") == ["tcp://[::1]:7730", "tcp://10.0.0.5:7730"]
    assert check_reply_to("tcp://[::1]:7730") == "tcp://[::1]:7730"
    assert check_reply_to("tcp://host-1.lan:7730") == "tcp://host-1.lan:7730"
    for bad in ("tcp://a b:1", "tcp://*:7730", "tcp://h:0", "udp://h:1", "tcp://::1:7730", 7, None):
        with pytest.raises(ProtocolError, match="bad coordinator endpoint"):
            check_reply_to(bad)


def test_close_after_a_start_that_a_signal_cut_short_does_not_raise() -> None:
    """SIGTERM arriving while start() launches the heartbeat thread (the line 'registered'
    was printed just before, so a script that stops the program on seeing it lands there)
    leaves a thread object whose start never returned. close() must still deregister
    and return: a RuntimeError from joining it replaced the Terminated, and
    `eda-registry register -- CMD` exited 1 instead of with CMD's status (session 26, run 1)."""
    import threading

    from eda.core.presence import Presence
    from eda.core.registry import access as reg

    record = reg.registration("web", 7001, ttl=30, interval=1)
    presence = Presence(reg.Access(mdns=False), record)
    presence._thread = threading.Thread(target=lambda: None)  # created, its start cut short
    presence.close()
    assert presence._thread is None

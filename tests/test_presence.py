"""Staying registered (core/presence.py) never stalls a daemon's work, and daemons
restarted with the same command come back where their clients expect them."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from eda.core.reqrep import Client
from tests import helpers
from tests.helpers import Procs

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")
helpers.PROGRAMS.setdefault("eda-lb", "eda.cli.lb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_stopped_registry_does_not_stall_2pc(procs: Procs, tmp_path: Path) -> None:
    """The coordinator and the participant heartbeat two registries that are SIGSTOPped
    (they accept connections, never answer): transactions keep committing meanwhile, as
    fast as before (compared with the rate just before, not with a clock)."""
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
        before = rate(4.0)  # the same machine, the same load, the registry answering
        for reg in regs:
            reg.signal(signal.SIGSTOP)
        try:
            # heartbeats fall due every 2 s and now wait 1 s per registry in vain: a
            # heartbeat sent from the loop stalls it over half the time
            stopped = rate(8.0)
        finally:
            for reg in regs:
                reg.signal(signal.SIGCONT)
    finally:
        client.close()
    assert stopped >= before / 2, (
        f"{stopped:.0f}/s with the registry stopped, {before:.0f}/s before"
    )

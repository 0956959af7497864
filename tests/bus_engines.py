"""The two bus engines as pytest fixtures: ``opener`` runs a test on each of them.

One ``nats-server -js`` per test module (on 127.0.0.1 inside the suite's
private network namespace, its store in a tmp directory); each test gets its
own stream and subject prefix.  The SQLite engine gets a file in the test's
tmp directory.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eda.core.bus import SQLiteEngine
from eda.core.bus import nats as nats_engine
from eda.core.bus.nats import NatsEngine
from tests.helpers import Proc, Procs
from tests.natsnodes import nats_server

_ids = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One ``nats-server -js`` on 127.0.0.1."""

    def __init__(self, procs: Procs, store: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: Proc = procs.start(
            [nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]
        )
        self.proc.wait_stderr("Server is ready", 20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    nats_server()
    if nats_engine.nats is None:
        pytest.fail(
            "nats-py not found: install the test extras (pip install -e '.[test]')", pytrace=False
        )
    work = tmp_path_factory.mktemp("nats")
    procs = Procs(work)
    try:
        yield Server(procs, work / "store")
    finally:
        procs.kill_all()


Opener = Callable[..., Any]


@pytest.fixture
def nats_opener(server: Server) -> Opener:
    """Open a NatsEngine on this test's own stream (and subject prefix)."""
    n = next(_ids)

    def open_(**kw: Any) -> NatsEngine:
        return NatsEngine(server.url, stream=f"T{n}", prefix=f"t{n}", timeout=5.0, **kw)

    return open_


@pytest.fixture(params=["sqlite", "nats", "nats-cloudevents"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Open the same store again and again, on either engine (NATS in both its
    message formats: the same contract, one batch or one event per message)."""
    if request.param == "sqlite":
        return lambda **kw: SQLiteEngine(tmp_path / "bus.db", **kw)
    nats_open: Opener = request.getfixturevalue("nats_opener")
    if request.param == "nats":
        return nats_open
    return lambda **kw: nats_open(message_format="cloudevents", **kw)


@pytest.fixture(params=["sqlite", "nats"])
def batch_opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """As ``opener``, for checks of what is counted or removed per stored batch (bytes
    with the newlines between a batch's payloads, retention by whole batches): the
    NATS engine's eda format, which stores a batch per message, as the embedded one."""
    if request.param == "sqlite":
        return lambda **kw: SQLiteEngine(tmp_path / "bus.db", **kw)
    return request.getfixturevalue("nats_opener")  # type: ignore[no-any-return]

"""Secure mode in a program that only connects: no ZAP handler (a client has no use for
one), so a secure one-shot command starts as fast as a plain one, bar the keys.

A secure ``eda-registry list`` refused by a registry did not exit within the test's 30 s
on a CI box at load 25: its start-up, a third of it the ZAP handler's thread and the
import of asyncio it needs, ran some 30 times slower than alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

from eda.core import keys, security, sockets
from eda.core.endpoint import Endpoint
from eda.core.errors import UsageError
from tests.helpers import Identity
from tests.test_startup import imported


@pytest.fixture
def secure(tmp_path: Path):  # type: ignore[no-untyped-def]
    me = keys.create_identity(tmp_path / "me.key")
    keys.trust(tmp_path / "trusted", "me", me.public_text)
    active = security.enable(tmp_path / "me.key", tmp_path / "trusted")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield active, ctx
    finally:
        security.disable()
        ctx.destroy(linger=0)


def test_the_zap_handler_starts_when_a_secure_socket_binds_and_never_for_a_client(secure):
    active, ctx = secure
    client = sockets.new_socket(zmq.DEALER, context=ctx)
    sockets.connect(client, Endpoint.parse("tcp://127.0.0.1:9", "server"), active.identity.public)
    assert active._authenticators == {}  # a client: no handler
    server = sockets.new_socket(zmq.ROUTER, context=ctx)
    sockets.bind(server, Endpoint.parse("tcp://127.0.0.1:0", "bind"))
    assert list(active._authenticators) == [id(ctx)]  # started before the bind
    orphan = sockets.new_socket(zmq.ROUTER, context=ctx)
    security.disable()  # a secure socket with secure mode gone would admit every key
    with pytest.raises(UsageError, match="secure mode off"):
        sockets.bind(orphan, Endpoint.parse("tcp://127.0.0.1:0", "bind"))
    for sock in (client, server, orphan):
        sock.close(0)


def test_a_secure_one_shot_client_imports_no_zap_handler(tmp_path: Path) -> None:
    me = Identity(tmp_path / "me")
    me.trust("reg", Identity(tmp_path / "reg"))
    env = dict(os.environ, **me.env)
    args = ["-m", "eda.cli.registry", "lookup", "db", "--secure", "--no-mdns",
            "--registry", "reg@tcp://127.0.0.1:9"]  # fmt: skip
    _, names = imported(args, None, env)  # nobody there: no registry answered
    assert {"zmq", "eda.core.security"} <= names  # it was secure and asked
    assert not names & {"asyncio", "zmq.auth.thread", "zmq.asyncio"}
